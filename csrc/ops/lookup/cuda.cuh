// Launcher for the CUDA nearest-code lookup (docs/design.md §2.1). Plain C++ header: no torch includes, so
// cuda.cu compiles with nvcc alone and cuda_binding.cpp with the host compiler.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/cuda_search_plan.h"

namespace vqdna::cuda {

// Rows per thread block of every lookup kernel (exposed for tests / benchmarks).
constexpr int kLookupBlockRows = 128;

// codes[i] = argmin_k (sqnorm[k] - 2 <z_i, e_k>)  (fp32 accumulation; ties -> smallest k; a NaN
//            distance never wins; a row whose distances are all NaN gets code 0)
// dist[i]  = min_k (...) + ||z_i||^2, clamped with `x < 0 ? 0 : x` (NaN stays NaN).
//
// z [n, d] and codebook [k, d] are dense row-major (row stride d elements) of `dtype`;
// codebook_sqnorm [k] float32; codes int32 [n]; dist float32 [n] (heads = 1). Per-head codebooks
// (heads = C > 1): z [n, C, d], codebook [C, k, d], codebook_sqnorm [C, k], codes and dist [n, C]
// (dense), column c the search of z[:, c] in codebook c, in one launch. All pointers are device pointers
// on the current device; the kernel is enqueued on `stream`. n == 0 launches nothing.
// bf16/fp16 use tensor-core mma.sync (fp32 accumulation); float32 uses exact fp32 FMA (no TF32).
//
// Returns cudaErrorInvalidValue for out-of-range sizes (n < 0, k < 1, k > 2^30, d < 0, heads outside
// [1, 65535], heads * d >= 2^31 with heads > 1) or an
// unknown dtype, the error of cudaFuncSetAttribute if that fails, and otherwise cudaSuccess;
// launch errors are left for the caller to collect with cudaGetLastError
// (C10_CUDA_KERNEL_LAUNCH_CHECK).
cudaError_t launch_lookup(const void* z, const void* codebook, const float* codebook_sqnorm,
                          int32_t* codes, float* dist, int64_t n, int64_t k, int64_t d, int64_t heads,
                          DType dtype, cudaStream_t stream);

}  // namespace vqdna::cuda
