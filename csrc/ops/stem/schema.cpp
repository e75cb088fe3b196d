// Schemas of the stem ops: one per compiled backend (`vqdna::stem_native` on the CPU dispatch key,
// `vqdna::stem_cuda` on the CUDA key). The kernels register with TORCH_LIBRARY_IMPL in cpu.cpp and
// cuda_binding.cpp beside this file; the Python declaration is vqdna/kernels/ops/stem/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vqdna, m) {
  // Fused stem (docs/design.md §2.5): ids [B, L] uint8 / int32 / int64 (0..4 = A C G T N, 5 = pad: adds
  // nothing), weight [D, 5, W] (W odd), bias / ln_weight / ln_bias [D], all float32.
  // y[b, t] = bias + sum_j weight[:, ids[b, t + j - W/2], j] (off-edge taps add nothing), then
  // LayerNorm(ln_eps) and exact GELU, accumulated in float32; returns [B, L, D] in out_dtype
  // (float32 / bfloat16 / float16). The native kernel raises naming ids[b, t] for an id outside 0..5;
  // the CUDA kernel writes NaN at every position whose window holds one (the caller checks first).
  m.def("stem_native(Tensor ids, Tensor weight, Tensor bias, Tensor ln_weight, Tensor ln_bias, float ln_eps, ScalarType out_dtype) -> Tensor");
  m.def("stem_cuda(Tensor ids, Tensor weight, Tensor bias, Tensor ln_weight, Tensor ln_bias, float ln_eps, ScalarType out_dtype) -> Tensor");
}
