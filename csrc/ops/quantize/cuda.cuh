// Launcher for the CUDA quantize (docs/design.md §2.1). Plain C++ header: no torch includes, so
// cuda.cu compiles with nvcc alone and cuda_binding.cpp with the host compiler.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/cuda_search_plan.h"

namespace vqdna::cuda {

// Rows per thread block of the quantize kernels (the lookup tile: exposed for tests / benchmarks).
constexpr int kQuantizeBlockRows = 128;

// codes [n] int32, dist [n] float32: exactly as launch_lookup (the same search, ties, NaN rule);
// quantized [n, d] (dtype of z, 16-byte aligned) = codebook[codes] rows, bit-exact;
// scratch int64 [3], ZEROED by the caller: the kernels add the float64 sum of dist (slot 0, as the
//   bits of a double), the count of rows with a non-finite dist (slot 1) and max over those rows of
//   n - row (slot 2) atomically; a one-thread kernel then writes
// sqdist_sum float32 [] = the float64 sum rounded once, and nonfinite int64 [2] = (count, first
//   non-finite row or -1). No host synchronisation.
//
// z [n, d] and codebook [k, d] are dense row-major of `dtype`; codebook_sqnorm [k] float32. All
// pointers are device pointers on the current device; everything is enqueued on `stream`. n == 0
// runs only the finishing kernel (sum 0, nonfinite (0, -1)).
//
// Returns cudaErrorInvalidValue for out-of-range sizes (n < 0, k < 1, k > 2^30, d < 0) or an unknown
// dtype, the error of cudaFuncSetAttribute if that fails, and otherwise cudaSuccess; launch errors
// are left for the caller (C10_CUDA_KERNEL_LAUNCH_CHECK).
cudaError_t launch_quantize(const void* z, const void* codebook, const float* codebook_sqnorm,
                            int32_t* codes, void* quantized, float* dist, int64_t* scratch,
                            float* sqdist_sum, int64_t* nonfinite, int64_t n, int64_t k, int64_t d,
                            DType dtype, cudaStream_t stream);

}  // namespace vqdna::cuda
