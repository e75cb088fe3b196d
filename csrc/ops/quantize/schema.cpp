// Schemas of the quantize op: `vqdna::quantize_native` on the CPU dispatch key (cpu.cpp beside this
// file), `vqdna::quantize_cuda` on the CUDA key (cuda_binding.cpp); the Python declaration is
// vqdna/kernels/ops/quantize/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vqdna, m) {
  // lookup fused with the gather of the chosen rows, the commitment-loss sum and the non-finite row
  // report (docs/design.md §2.1; the spec is vqdna/kernels/reference.py:quantize). z [N, D], codebook [K, D]
  // (same dtype: float32 / bfloat16 / float16), codebook_sqnorm [K] float32.
  // Returns codes int32 [N], quantized [N, D] (dtype of z) = codebook[codes], dist float32 [N] (as lookup),
  // sqdist_sum float32 [] = sum of dist (float64 accumulation), nonfinite int64 [2] = (count of rows with
  // a non-finite dist, the first such row or -1). normalize: all of that for the unit rows l2norm(z)
  // (cosine similarity; the native kernel normalises each row as it packs it).
  m.def("quantize_native(Tensor z, Tensor codebook, Tensor codebook_sqnorm, bool normalize=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Same contract on CUDA tensors (cuda.cu; float64 accumulation by atomics; normalize: ATen normalises
  // z first); registered only when built with CUDA.
  m.def("quantize_cuda(Tensor z, Tensor codebook, Tensor codebook_sqnorm, bool normalize=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
