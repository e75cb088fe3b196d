// Launcher for the CUDA fused stem (docs/design.md §2.5). Plain C++ header: no torch includes, so cuda.cu
// compiles with nvcc alone and cuda_binding.cpp with the host compiler.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace vqdna::cuda {

enum class StemIds : int { kUInt8 = 0, kInt32 = 1, kInt64 = 2 };
enum class StemOut : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Largest D the kernel handles (a warp holds a position's D features in registers, 64 per lane).
constexpr int64_t kStemMaxDim = 2048;
// Largest kernel width W the launcher accepts (the table must also fit in shared memory).
constexpr int64_t kStemMaxWidth = 1024;

// out[p, :] = GELU(LayerNorm(bias + sum_j weight[:, ids[p + j - W/2], j]))  (exact erf GELU),
// p a flat position in [0, n) of rows of `length` (taps outside the row, and the pad id 5, add
// nothing), all arithmetic in float32, written once in `out_type`. An id outside 0..5 makes every
// position whose window holds it NaN (no out-of-bounds read); the caller checks ids beforehand.
//
// ids [n] contiguous of `id_type`; weight [d, 5, width] float32 contiguous (width odd); bias,
// ln_weight, ln_bias [d] float32; out [n, d]. Device pointers on the current device, enqueued on
// `stream`; n == 0 launches nothing. The [width, 5, d] weight table is staged in shared memory.
//
// Returns cudaErrorInvalidValue for d outside [1, kStemMaxDim], an even width or one outside
// [1, kStemMaxWidth], a table larger than the device's opt-in shared memory, or an unknown enum;
// the error of a CUDA attribute query or cudaFuncSetAttribute if one fails; otherwise cudaSuccess (launch errors are left for
// cudaGetLastError / C10_CUDA_KERNEL_LAUNCH_CHECK).
cudaError_t launch_stem(const void* ids, StemIds id_type, const float* weight, const float* bias,
                        const float* ln_weight, const float* ln_bias, void* out, StemOut out_type,
                        int64_t n, int64_t length, int64_t d, int64_t width, float ln_eps,
                        cudaStream_t stream);

// Shared memory the launch needs for this d and width (bytes). vqdna/kernels/cuda_launch.py mirrors
// this and the limits above (tests/build checks they agree).
inline int64_t stem_table_bytes(int64_t d, int64_t width) { return 5 * width * d * 4; }

}  // namespace vqdna::cuda
