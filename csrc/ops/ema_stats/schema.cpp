// Schemas of the ema_stats ops: one per compiled backend (`vqdna::ema_stats_native` on the CPU dispatch key,
// `vqdna::ema_stats_cuda` on the CUDA key). The kernels register with TORCH_LIBRARY_IMPL in cpu.cpp and
// cuda_binding.cpp beside this file; the Python declaration is vqdna/kernels/ops/ema_stats/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(vqdna, m) {
  // EMA statistics, the reduction of docs/design.md §2.3: counts[k] = sum_i w_i [codes_i = k],
  // sums[k] = sum_i w_i [codes_i = k] x_i, both float32, w_i = mask_i (1 when mask is None).
  // x [N, D] contiguous float32 / bfloat16 / float16; codes [N] int32 in [0, num_codes);
  // mask [N] bool or None. When prev_codes [N] int32 and prev_codebook [K', D] (dtype of x) are
  // given, the vector of row i is 2 x_i - prev_codebook[prev_codes_i] (HRQ's H_l, recomputed on the
  // fly). deterministic: no float atomics, bitwise repeatable run to run.
  m.def("ema_stats_native(Tensor x, Tensor codes, Tensor? mask, Tensor? prev_codes, Tensor? prev_codebook, int num_codes, bool deterministic) -> (Tensor, Tensor)");
  m.def("ema_stats_cuda(Tensor x, Tensor codes, Tensor? mask, Tensor? prev_codes, Tensor? prev_codebook, int num_codes, bool deterministic) -> (Tensor, Tensor)");
}
