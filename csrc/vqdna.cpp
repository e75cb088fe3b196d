// One registration point for every vqdna op schema. Backend implementations register
// themselves with TORCH_LIBRARY_IMPL in their own files (cpu/*.cpp, cuda/*.cpp).
#include <torch/extension.h>

TORCH_LIBRARY(vqdna, m) {
  // Nearest-code lookup (DESIGN 2.1). z [N, D] contiguous, codebook [K, D] contiguous, same dtype
  // (float32 / bfloat16 / float16); codebook_sqnorm [K] float32 = ||e_k||^2.
  // Returns codes int32 [N] (ties -> smallest k; a NaN distance never wins) and dist float32 [N]
  // = ||z_i - e_code||^2 clamped at 0 (non-finite when the row of z is non-finite).
  // CPU dispatch key: the native blocked kernel (cpu/lookup.cpp).
  m.def("lookup_native(Tensor z, Tensor codebook, Tensor codebook_sqnorm) -> (Tensor, Tensor)");
  // Same contract on CUDA tensors (cuda/lookup.cu); registered only when built with CUDA.
  m.def("lookup_cuda(Tensor z, Tensor codebook, Tensor codebook_sqnorm) -> (Tensor, Tensor)");

  // HRQ residual doubling, fused multi-level lookup (DESIGN 2.2). zs: L tensors [N, D], contiguous
  // (float32 / bfloat16 / float16; a list, so the caller's per-level tensors are never stacked); codebooks [sum_l K_l, D] contiguous, same dtype, level l's rows
  // at offset sum_{m<l} K_m; codebook_sqnorms [sum_l K_l] float32; codebook_sizes [L] = K_l.
  // H_0 = Z_0; H_l = 2 Z_l - C_{l-1}[M_{l-1}] (formed in float32, rounded to the input dtype before
  // the lookup, exactly as the reference does); M_l = lookup(H_l, C_l).
  // Returns codes int32 [L, N] (level-local indices) and zhat_levels [L, N, D] in the dtype of zs:
  // zhat_levels[l] = mean_{m<=l} C_m[M_m] (accumulated in float32). H_l is never written.
  // Forward only: the straight-through gradient is registered from Python.
  m.def("hrq_quantize_native(Tensor[] zs, Tensor codebooks, Tensor codebook_sqnorms, int[] codebook_sizes) -> (Tensor, Tensor)");
  m.def("hrq_quantize_cuda(Tensor[] zs, Tensor codebooks, Tensor codebook_sqnorms, int[] codebook_sizes) -> (Tensor, Tensor)");
  // The same into caller-owned outputs: codes int32 [L, N], zhat_levels [L, N, D] (dtype of zs), both
  // contiguous. Reusing them across calls spares the page faults (and the kernel's zero-filling) of a
  // fresh large output on every call.
  m.def("hrq_quantize_native_out(Tensor[] zs, Tensor codebooks, Tensor codebook_sqnorms, int[] codebook_sizes, "
        "Tensor(a!) codes, Tensor(b!) zhat_levels) -> ()");

  // EMA statistics, the reduction of DESIGN 2.3: counts[k] = sum_i w_i [codes_i = k],
  // sums[k] = sum_i w_i [codes_i = k] x_i, both float32, w_i = mask_i (1 when mask is None).
  // x [N, D] contiguous float32 / bfloat16 / float16; codes [N] int32 in [0, num_codes);
  // mask [N] bool or None. When prev_codes [N] int32 and prev_codebook [K', D] (dtype of x) are
  // given, the vector of row i is 2 x_i - prev_codebook[prev_codes_i] (HRQ's H_l, recomputed on the
  // fly). deterministic: no float atomics, bitwise repeatable run to run.
  m.def("ema_stats_native(Tensor x, Tensor codes, Tensor? mask, Tensor? prev_codes, Tensor? prev_codebook, int num_codes, bool deterministic) -> (Tensor, Tensor)");
  m.def("ema_stats_cuda(Tensor x, Tensor codes, Tensor? mask, Tensor? prev_codes, Tensor? prev_codebook, int num_codes, bool deterministic) -> (Tensor, Tensor)");

  // Fused stem (DESIGN 2.5): ids [B, L] uint8 / int32 / int64 (0..4 = A C G T N, 5 = pad: adds
  // nothing), weight [D, 5, W] (W odd), bias / ln_weight / ln_bias [D], all float32.
  // y[b, t] = bias + sum_j weight[:, ids[b, t + j - W/2], j] (off-edge taps add nothing), then
  // LayerNorm(ln_eps) and exact GELU, accumulated in float32; returns [B, L, D] in out_dtype
  // (float32 / bfloat16 / float16). The native kernel raises naming ids[b, t] for an id outside 0..5;
  // the CUDA kernel writes NaN at every position whose window holds one (the caller checks first).
  m.def("stem_native(Tensor ids, Tensor weight, Tensor bias, Tensor ln_weight, Tensor ln_bias, float ln_eps, ScalarType out_dtype) -> Tensor");
  m.def("stem_cuda(Tensor ids, Tensor weight, Tensor bias, Tensor ln_weight, Tensor ln_bias, float ln_eps, ScalarType out_dtype) -> Tensor");
}

static bool built_with_cuda() {
#ifdef VQDNA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA ops were compiled into vqdna._C");
}
