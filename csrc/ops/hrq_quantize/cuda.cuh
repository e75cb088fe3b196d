// Launcher for the fused CUDA HRQ residual doubling (docs/design.md §2.2). Plain C++ header: no torch
// includes, so cuda.cu compiles with nvcc alone and cuda_binding.cpp with the host
// compiler.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/cuda_search_plan.h"

namespace vqdna::cuda {

// Most levels one launch takes (the per-level pointers and offsets travel as kernel parameters).
constexpr int64_t kHrqMaxLevels = 64;

// For each level l = 0 .. num_levels - 1 and every row i:
//   H_0 = Z_0;  H_l = T(T(2 Z_l) - C_{l-1}[M_{l-1}])  (float32 arithmetic, no FMA contraction, i.e.
//               the reference's `2.0 * z - prev_embedding` evaluated in the dtype T of z)
//   M_l = argmin_k (||C_l[k]||^2 - 2 <H_l, C_l[k]>)   (fp32 accumulation; ties -> smallest k; a NaN
//               distance never wins; a row whose distances are all NaN gets code 0)
//   zhat_levels[l] = T((C_0[M_0] + ... + C_l[M_l]) / (l + 1))  (sum in float32 in level order,
//               IEEE division, one rounding to T)
//   sqdist[l, i] = sum_d (Z_l[i, d] - zhat_levels[l, i, d])^2  (float32, the commitment loss's term)
// H_l is formed on chip and never written to global memory; all levels of a 128-row tile run in
// one thread block of one launch.
//
// zs: HOST array of num_levels DEVICE pointers, each a dense row-major [n, d] array of `dtype`;
// codebooks: dense [sum_l K_l, d] of `dtype`, level l's rows at offset sum_{m<l} K_m;
// codebook_sqnorms: [sum_l K_l] float32; codebook_sizes: HOST array of num_levels K_l in [1, 2^30];
// codes: int32 [num_levels, n] (level-local indices); zhat_levels: [num_levels, n, d] of `dtype`,
// or null: codes only (neither zhat_levels nor sqdist is written); sqdist: float32 [num_levels, n].
// Device pointers are on the current device; the kernel is enqueued on `stream`.
//
// Returns cudaErrorInvalidValue for out-of-range sizes (num_levels not in [1, kHrqMaxLevels], a K_l
// outside [1, 2^30], n < 0, d < 0) or an unknown dtype, the error of cudaFuncSetAttribute if that
// fails, and otherwise cudaSuccess; launch errors are left for the caller's cudaGetLastError
// (C10_CUDA_KERNEL_LAUNCH_CHECK). n == 0 launches nothing.
cudaError_t launch_hrq_quantize(const void* const* zs, int64_t num_levels, const void* codebooks,
                                const float* codebook_sqnorms, const int64_t* codebook_sizes,
                                int32_t* codes, void* zhat_levels, float* sqdist, int64_t n,
                                int64_t d, DType dtype, cudaStream_t stream);

}  // namespace vqdna::cuda
