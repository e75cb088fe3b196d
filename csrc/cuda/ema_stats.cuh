// Launchers for the CUDA EMA statistics (DESIGN 2.3). Plain C++ header: no torch includes, so
// ema_stats.cu compiles with nvcc alone and ema_stats_binding.cpp with the host compiler.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "lookup.cuh"  // DType

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
