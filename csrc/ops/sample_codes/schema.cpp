// Schema of the sample_codes op: `vqdna::sample_codes_native` on the CPU dispatch key (cpu.cpp beside
// this file); the Python declaration is vqdna/kernels/ops/sample_codes/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vqdna, m) {
  // Gumbel-max code sampling (the spec is vqdna/kernels/reference.py:sample_codes). z [N, D], codebook
  // [K, D] float32; draws N K uniforms from the default CPU generator (as uniform_, row-major). Returns
  // codes int64 [N], quantized [N, D] float32 = codebook[codes], dist [N] float32 = ||z - quantized||^2.
  // Per-head codebooks: codebook [C, K, D] with z [N, C, D] -> codes [N, C], quantized [N, C, D], dist
  // [N, C] (head c from codebook c), drawing C N K uniforms in the order of [C, N, K] (one call for all heads).
  // seed (int64 [1], the Philox noise of reference.sample_codes_philox) is for the triton backend and
  // the reference op; the native kernel refuses one.
  m.def("sample_codes_native(Tensor z, Tensor codebook, float temp, bool cosine=False, int block_rows=4096, Tensor? seed=None) -> (Tensor, Tensor, Tensor)");
}
