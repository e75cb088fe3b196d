// Launchers for the CUDA EMA statistics (DESIGN 2.3). Plain C++ header: no torch includes, so
// ema_stats.cu compiles with nvcc alone and ema_stats_binding.cpp with the host compiler.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "lookup.cuh"  // DType

namespace vqdna::cuda {

// Both launchers compute, in float32,
//   counts[k] = sum_i w_i [codes_i = k],   sums[k, :] = sum_i w_i [codes_i = k] v_i
// with w_i = mask_i (1 when mask == nullptr; rows with mask_i == 0 are skipped entirely, exactly as
// the CPU kernel skips them) and v_i = x_i, or 2 x_i - prev_codebook[prev_codes_i] (formed in float32,
// no FMA contraction) when prev_codes != nullptr.
//
// x [n, d] and prev_codebook [prev_k, d] are dense row-major arrays of `dtype`; codes / prev_codes
// int32 [n]; mask uint8 [n] (torch bool) or nullptr. All pointers are device pointers; kernels are
// enqueued on `stream`. Rows whose code is outside [0, num_codes) or whose prev code is outside
// [0, prev_k) are ignored (the caller is expected to have rejected them already).
//
// Return value: cudaErrorInvalidValue for bad sizes / dtype, otherwise cudaSuccess; launch errors
// are left for the caller's cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK).

// Fast mode: float atomicAdd into `counts` [num_codes] and `sums` [num_codes, d], which the caller
// must have ZEROED. Run-to-run order of the float additions is unspecified.
cudaError_t launch_ema_stats_atomic(const void* x, const int32_t* codes, const uint8_t* mask,
                                    const int32_t* prev_codes, const void* prev_codebook,
                                    int64_t prev_k, float* counts, float* sums, int64_t n,
                                    int64_t d, int64_t num_codes, DType dtype,
                                    cudaStream_t stream);

// Deterministic mode: no float atomics. `order` [n] int64 is a STABLE argsort of codes and
// `starts` [num_codes + 1] int64 the segment boundaries (starts[k] = first position in sorted
// order with code >= k). One thread block per (code, tile of d) writes counts[k] and sums[k, tile]
// (every element of both outputs is written; they need no zeroing), summing the code's rows
// sequentially in sorted (= ascending row) order, i.e. in the same order as the CPU kernel, so the
// result is bitwise repeatable and bitwise equal to the CPU path.
cudaError_t launch_ema_stats_segment(const void* x, const int64_t* order, const int64_t* starts,
                                     const uint8_t* mask, const int32_t* prev_codes,
                                     const void* prev_codebook, int64_t prev_k, float* counts,
                                     float* sums, int64_t d, int64_t num_codes, DType dtype,
                                     cudaStream_t stream);

}  // namespace vqdna::cuda
