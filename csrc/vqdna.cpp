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
