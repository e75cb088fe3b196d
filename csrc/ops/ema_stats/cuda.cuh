// Launchers for the CUDA EMA statistics (docs/design.md §2.3). Plain C++ header: no torch includes, so
// cuda.cu compiles with nvcc alone and cuda_binding.cpp with the host compiler.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/dtype.h"

namespace vqdna::cuda {

// Both modes compute, in float32,
//   counts[k] = sum_i w_i [codes_i = k],   sums[k, :] = sum_i w_i [codes_i = k] v_i
// with w_i = mask_i (1 when mask == nullptr; rows with mask_i == 0 are skipped, never added as
// zeros) and v_i = x_i, or 2 x_i - prev_codebook[prev_codes_i] formed in float32 (__fmul_rn /
// __fsub_rn, not rounded to the dtype) when prev_codes != nullptr.
//
// x [n, d] and prev_codebook [prev_k, d] are dense row-major arrays of `dtype`; codes / prev_codes
// int32 [n]; mask uint8 [n] (torch bool) or nullptr. All pointers are device pointers on the
// current device; work is enqueued on `stream`. Codes outside [0, num_codes) and prev codes
// outside [0, prev_k) are the CALLER'S ERROR: such rows are ignored (they never cause an
// out-of-bounds access), which is cheap to guarantee but is not a validation.
//
// Return value: cudaErrorInvalidValue for bad sizes / dtype (n < 0, d < 0, num_codes not in
// [1, 2^31 - 1], d too large for the grid), the error of a CUDA runtime call (attributes,
// memset), otherwise cudaSuccess; launch errors are left for the caller's cudaGetLastError
// (C10_CUDA_KERNEL_LAUNCH_CHECK).

// Fast mode: float atomicAdd into `counts` [num_codes] and `sums` [num_codes, d], which the caller
// must have ZEROED. Rows are aggregated on chip first (runs of equal codes in registers, then a
// per-block shared-memory table when num_codes x tile fits), so global atomics are few. The order
// of float additions varies run to run.
// How launch_ema_stats_atomic runs a call: a pure host function of the sizes, dtype, alignment and
// the device's shared memory (bytes), so it can be checked without a GPU
// (vqdna/kernels/cuda_launch.py mirrors it; tests/build compiles this header and checks they agree).
struct EmaAtomicPlan {
  bool smem_table;      // per-block shared-memory table; else global atomics (float4 on sm_90 with vec)
  int group_log2;       // lanes per row group, log2 (G = 2^g <= 32)
  int64_t table_bytes;  // dynamic shared memory of the launch (0 without the table)
  int64_t col_tiles;    // grid.y: column tiles of 2^(group_log2 + log2 V) columns
  bool vec;             // 16-byte vector loads (and, without the table, float4 atomics on sm_90)
};

inline int ema_ceil_log2(int64_t v) {  // smallest g with 2^g >= v (v >= 1)
  int g = 0;
  while ((int64_t{1} << g) < v) ++g;
  return g;
}

inline int64_t ema_padded_cols(int64_t d, int dtile_log2) {
  const int64_t t = int64_t{1} << dtile_log2;
  return ((d + t - 1) / t) * t - d;
}

// Lane-group width (log2) covering d with the fewest padded columns, at most 32 lanes; log_v =
// log2 of the elements in a lane's 16-byte vector (2 for float32, 3 for bf16 / fp16).
inline int ema_group_log2(int64_t d, int log_v) {
  constexpr int kMaxGroupLog2 = 5;
  if (d <= 0) return 0;
  int g = ema_ceil_log2((d + (int64_t{1} << log_v) - 1) >> log_v);
  if (g > kMaxGroupLog2) g = kMaxGroupLog2;
  if (g > 0 && ema_padded_cols(d, g - 1 + log_v) < ema_padded_cols(d, g + log_v)) --g;
  return g;
}

inline int64_t ema_col_tiles(int64_t d, int dtile_log2) {
  const int64_t t = int64_t{1} << dtile_log2;
  return d > 0 ? (d + t - 1) / t : 1;
}

// inputs_aligned16: x (and prev_codebook, if any) 16-byte aligned; sums_aligned16: the output sums.
inline EmaAtomicPlan ema_atomic_plan(int64_t d, int64_t num_codes, DType dtype, int64_t smem_per_sm,
                                     int64_t smem_optin, bool inputs_aligned16, bool sums_aligned16) {
  const int log_v = dtype == DType::kFloat32 ? 2 : 3;
  const int g_need = ema_group_log2(d, log_v);
  const int g_min = g_need < 2 ? g_need : 2;  // >= 4 lanes: >= 64-byte row segments
  auto table_bytes = [&](int g) { return num_codes * ((int64_t{1} << (g + log_v)) + 1) * 4; };
  // Prefer a table that leaves room for two blocks per SM; else one block per SM; else global.
  const int64_t two_per_sm = smem_per_sm / 2 > 2048 ? smem_per_sm / 2 - 2048 : 0;
  const int64_t budgets[2] = {two_per_sm < smem_optin ? two_per_sm : smem_optin, smem_optin};
  EmaAtomicPlan plan{false, g_need, 0, 0, false};
  for (int64_t budget : budgets) {
    int gg = g_need;
    while (gg > g_min && table_bytes(gg) > budget) --gg;
    if (table_bytes(gg) <= budget) {
      plan.smem_table = true;
      plan.group_log2 = gg;
      break;
    }
  }
  plan.table_bytes = plan.smem_table ? table_bytes(plan.group_log2) : 0;
  plan.col_tiles = ema_col_tiles(d, plan.group_log2 + log_v);
  plan.vec = d > 0 && d % (int64_t{1} << log_v) == 0 && inputs_aligned16 && (plan.smem_table || sums_aligned16);
  return plan;
}

cudaError_t launch_ema_stats_atomic(const void* x, const int32_t* codes, const uint8_t* mask,
                                    const int32_t* prev_codes, const void* prev_codebook,
                                    int64_t prev_k, float* counts, float* sums, int64_t n,
                                    int64_t d, int64_t num_codes, DType dtype,
                                    cudaStream_t stream);

// Deterministic mode: no float atomics; the result is bitwise repeatable run to run (for fixed
// inputs, sizes and device). Inputs: `sorted_codes` [n] int32 = codes sorted ascending and `order`
// [n] int64 the permutation (sorted_codes[p] = codes[order[p]]), e.g. from a STABLE sort (any fixed
// permutation gives repeatable results; a stable one sums each code's rows in ascending row order).
// Scratch (caller-allocated, no initialisation needed):
//   starts        int64 [num_codes + 1]
//   chunk_code    int32 [ema_stats_chunk_capacity(n, num_codes)]
//   partial       float [ema_stats_partial_capacity(n), d]
//   partial_count float [ema_stats_partial_capacity(n)]
// Every element of `counts` and `sums` is written (no zeroing needed).
int64_t ema_stats_chunk_capacity(int64_t n, int64_t num_codes);
int64_t ema_stats_partial_capacity(int64_t n);
cudaError_t launch_ema_stats_sorted(const void* x, const int32_t* sorted_codes, const int64_t* order,
                                    const uint8_t* mask, const int32_t* prev_codes,
                                    const void* prev_codebook, int64_t prev_k, int64_t* starts,
                                    int32_t* chunk_code, float* partial, float* partial_count,
                                    float* counts, float* sums, int64_t n, int64_t d,
                                    int64_t num_codes, DType dtype, cudaStream_t stream);

}  // namespace vqdna::cuda
