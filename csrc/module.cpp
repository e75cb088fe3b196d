// The vqdna._C module. The `vqdna` op namespace is declared here; each op's schemas are a
// TORCH_LIBRARY_FRAGMENT in csrc/ops/<op>/schema.cpp and its kernels register with
// TORCH_LIBRARY_IMPL beside them (cpu.cpp, cuda_binding.cpp).
#include <torch/extension.h>

#include "common/cpu_bf16_screen.h"

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
  m.def("bf16_screen_supported", &vqdna::cpu::bf16_screen_supported,
        "True when the native lookup / quantize can run their bf16-screened search on this CPU (AVX512_BF16)");
  m.def("native_search_stats", [] {
    const auto& s = vqdna::cpu::search_stats();
    pybind11::dict d;
    d["search"] = s.screened.load() ? "bf16" : "exact";
    d["rows_screened"] = s.rows_screened.load();
    d["rows_exact"] = s.rows_exact.load();
    d["candidates"] = s.candidates.load();
    return d;
  }, "What the last native lookup / quantize call searched with (cpu_bf16_screen.h)");
}
