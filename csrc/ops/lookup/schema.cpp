// Schemas of the lookup ops: one per compiled backend (`vqdna::lookup_native` on the CPU dispatch key,
// `vqdna::lookup_cuda` on the CUDA key). The kernels register with TORCH_LIBRARY_IMPL in cpu.cpp and
// cuda_binding.cpp beside this file; the Python declaration is vqdna/kernels/ops/lookup/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vqdna, m) {
  // Nearest-code lookup (docs/design.md §2.1). z [N, D] contiguous (lookup_native also reads a transposed
  // z, stride(0) == 1, in place), codebook [K, D] contiguous, same dtype (float32 / bfloat16 / float16);
  // codebook_sqnorm [K] float32 = ||e_k||^2.
  // Returns codes int32 [N] (ties -> smallest k; a NaN distance never wins) and dist float32 [N]
  // = ||z_i - e_code||^2 clamped at 0 (non-finite when the row of z is non-finite).
  // Per-head codebooks: codebook [C, K, D] contiguous with z [N, C, D] contiguous and codebook_sqnorm
  // [C, K]: codes, dist [N, C], column c the search of z[:, c] in codebook[c] (one call for all heads).
  // CPU dispatch key: the native blocked kernel (cpu.cpp).
  m.def("lookup_native(Tensor z, Tensor codebook, Tensor codebook_sqnorm) -> (Tensor, Tensor)");
  // Same contract on CUDA tensors (cuda.cu); registered only when built with CUDA.
  m.def("lookup_cuda(Tensor z, Tensor codebook, Tensor codebook_sqnorm) -> (Tensor, Tensor)");
}
