// Schemas of the hrq_quantize ops: one per compiled backend (`vqdna::hrq_quantize_native` on the CPU dispatch key,
// `vqdna::hrq_quantize_cuda` on the CUDA key). The kernels register with TORCH_LIBRARY_IMPL in cpu.cpp and
// cuda_binding.cpp beside this file; the Python declaration is vqdna/kernels/ops/hrq_quantize/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vqdna, m) {
  // HRQ residual doubling, fused multi-level lookup (docs/design.md §2.2). zs: L tensors [N, D], contiguous
  // (float32 / bfloat16 / float16; a list, so the caller's per-level tensors are never stacked); codebooks [sum_l K_l, D] contiguous, same dtype, level l's rows
  // at offset sum_{m<l} K_m; codebook_sqnorms [sum_l K_l] float32; codebook_sizes [L] = K_l.
  // H_0 = Z_0; H_l = 2 Z_l - C_{l-1}[M_{l-1}] (formed in float32, rounded to the input dtype before
  // the lookup, exactly as the reference does); M_l = lookup(H_l, C_l).
  // Returns codes int32 [L, N] (level-local indices) and zhat_levels [L, N, D] in the dtype of zs:
  // zhat_levels[l] = mean_{m<=l} C_m[M_m] (accumulated in float32). H_l is never written.
  // In the same pass, per level (reference.hrq_level_losses): sqdist [L, N] float32 = ||Z_l - zhat_levels[l]||^2
  // per row, sqdist_sum [L] float32 (float64 accumulation), nonfinite int64 [L, 2] = (count of non-finite
  // sqdist rows, the first one's row or -1). codes_only: codes alone, no zhat_levels written; the other four
  // outputs are empty [0] tensors.
  // Forward only: the straight-through and commitment gradients are registered from Python.
  m.def("hrq_quantize_native(Tensor[] zs, Tensor codebooks, Tensor codebook_sqnorms, int[] codebook_sizes, "
        "bool codes_only=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("hrq_quantize_cuda(Tensor[] zs, Tensor codebooks, Tensor codebook_sqnorms, int[] codebook_sizes, "
        "bool codes_only=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same into caller-owned outputs: codes int32 [L, N], zhat_levels [L, N, D] (dtype of zs), both
  // contiguous. Reusing them across calls spares the page faults (and the kernel's zero-filling) of a
  // fresh large output on every call.
  m.def("hrq_quantize_native_out(Tensor[] zs, Tensor codebooks, Tensor codebook_sqnorms, int[] codebook_sizes, "
        "Tensor(a!) codes, Tensor(b!) zhat_levels) -> ()");
}
