// Launcher for the CUDA HRQ residual doubling (DESIGN 2.2). Plain C++ header: no torch includes, so
// hrq_quantize.cu compiles with nvcc alone and hrq_quantize_binding.cpp with the host compiler.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "lookup.cuh"  // DType, launch_lookup

namespace vqdna::cuda {

// For l = 0 .. num_levels-1:
//   H_0 = Z_0;  H_l = round_to_dtype(2 Z_l - C_{l-1}[M_{l-1}])  (float32, no FMA contraction)
//   M_l = lookup(H_l, C_l)  (launch_lookup: ties -> smallest code, NaN never wins)
// then zhat_levels[l] = round_to_dtype((sum_{m<=l} C_m[M_m]) / (l+1)), the sum in float32 in
// level order, divided with IEEE round-to-nearest, rounded to the dtype once.
//
// zs: HOST array of num_levels DEVICE pointers, each a dense [n, d] array of `dtype`;
// codebooks: dense [sum K_l, d] of `dtype`, level l's rows at level_offsets[l];
// codebook_sqnorms [sum K_l] float32; level_offsets: HOST array of num_levels + 1 int64
// (level_offsets[0] = 0, level_offsets[l+1] - level_offsets[l] = K_l in [1, 2^30]);
// level_offsets_device: the same first num_levels entries in DEVICE memory (read by the final
// kernel); h_scratch: device [n, d] of `dtype` (may be null when num_levels == 1);
// dist_scratch: device float32 [n]; codes: device int32 [num_levels, n] (level-local codes);
// zhat_levels: device [num_levels, n, d] of `dtype`. Everything is enqueued on `stream`.
//
// Returns cudaErrorInvalidValue for bad arguments, the first error reported by a launch
// (cudaGetLastError is polled after each launch), otherwise cudaSuccess.
cudaError_t launch_hrq_quantize(const void* const* zs, int64_t num_levels, const void* codebooks,
                                const float* codebook_sqnorms, const int64_t* level_offsets,
                                const int64_t* level_offsets_device, void* h_scratch,
                                float* dist_scratch, int32_t* codes, void* zhat_levels, int64_t n,
                                int64_t d, DType dtype, cudaStream_t stream);

}  // namespace vqdna::cuda
