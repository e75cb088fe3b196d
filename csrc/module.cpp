// The vqdna._C module. The `vqdna` op namespace is declared here; each op's schemas are a
// TORCH_LIBRARY_FRAGMENT in csrc/ops/<op>/schema.cpp and its kernels register with
// TORCH_LIBRARY_IMPL beside them (cpu.cpp, cuda_binding.cpp).
#include <torch/extension.h>

TORCH_LIBRARY(vqdna, m) {}

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
