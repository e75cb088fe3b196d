// CUDA HRQ residual doubling (DESIGN 2.2), first version built on the existing lookup kernel.
//
// NOTE: unlike the fused Triton kernel (vqdna/kernels/triton/hrq_quantize.py) and the CPU kernel,
// which form H_l on chip, this first version WRITES H_l to a global scratch buffer [N, D] (one
// buffer reused by every level; stream order makes the reuse safe) and then runs the standalone
// lookup kernel (lookup.cu, launch_lookup) on it. Per level l >= 1 that costs one extra
// elementwise kernel and an extra write + read of N x D elements; the results are the same.
//
// Kernels:
//   form_h_kernel:           H_l[i, :] = T(2 * float(Z_l[i, :]) - float(C_{l-1}[M_{l-1}[i], :]))
//                            (__fmul_rn / __fsub_rn: no FMA contraction; one rounding to T, as the
//                            reference's `2.0 * z - prev_embedding` in T and the CPU kernel do).
//   cumulative_means_kernel: one thread per (row, dim) walks the levels in order, acc (float32) =
//                            C_0[M_0] then acc += C_m[M_m] (__fadd_rn), and writes
//                            zhat_levels[l] = T(acc / (l + 1)) with __fdiv_rn (the reference's
//                            `running / (level + 1)`), i.e. rounded to T exactly once.
// Both are grid-stride loops over N * D with 64-bit indices. Codes come from the lookup kernel and
// are always in [0, K_l), so the gathers are in bounds by construction.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "hrq_quantize.cuh"

namespace vqdna::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    form_h_kernel(const T* __restrict__ z, const T* __restrict__ prev_cb,
                  const int32_t* __restrict__ prev_codes, T* __restrict__ h, int64_t n, int64_t d) {
  const int64_t total = n * d;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t row = idx / d;
    const int64_t col = idx - row * d;
    const float e = to_f(prev_cb[static_cast<int64_t>(prev_codes[row]) * d + col]);
    h[idx] = from_f<T>(__fsub_rn(__fmul_rn(2.f, to_f(z[idx])), e));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cumulative_means_kernel(const T* __restrict__ codebooks, const int64_t* __restrict__ level_offsets,
                            const int32_t* __restrict__ codes, T* __restrict__ zhat_levels,
                            int64_t num_levels, int64_t n, int64_t d) {
  const int64_t total = n * d;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t row = idx / d;
    const int64_t col = idx - row * d;
    float acc = 0.f;
    for (int64_t l = 0; l < num_levels; ++l) {
      const int64_t code = level_offsets[l] + codes[l * n + row];
      const float e = to_f(codebooks[code * d + col]);
      acc = l == 0 ? e : __fadd_rn(acc, e);
      zhat_levels[l * total + idx] = from_f<T>(__fdiv_rn(acc, static_cast<float>(l + 1)));
    }
  }
}

unsigned grid_for(int64_t total) {
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

template <typename T>
cudaError_t run_hrq(const void* const* zs, int64_t num_levels, const void* codebooks,
                    const float* sqnorms, const int64_t* offsets, const int64_t* offsets_dev,
                    void* h_scratch, float* dist, int32_t* codes, void* zhat, int64_t n, int64_t d,
                    DType dtype, cudaStream_t stream) {
  const T* cb = static_cast<const T*>(codebooks);
  T* h = static_cast<T*>(h_scratch);
  const int64_t total = n * d;
  for (int64_t l = 0; l < num_levels; ++l) {
    const void* query = zs[l];
    if (l > 0) {
      if (total > 0) {
        form_h_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(
            static_cast<const T*>(zs[l]), cb + offsets[l - 1] * d, codes + (l - 1) * n, h, n, d);
        const cudaError_t launch_err = cudaGetLastError();
        if (launch_err != cudaSuccess) return launch_err;
      }
      query = h;
    }
    const int64_t k = offsets[l + 1] - offsets[l];
    cudaError_t err = launch_lookup(query, cb + offsets[l] * d, sqnorms + offsets[l], codes + l * n, dist,
                                    n, k, d, dtype, stream);
    if (err != cudaSuccess) return err;
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (total > 0) {
    cumulative_means_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(cb, offsets_dev, codes, static_cast<T*>(zhat),
                                                                         num_levels, n, d);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_hrq_quantize(const void* const* zs, int64_t num_levels, const void* codebooks,
                                const float* codebook_sqnorms, const int64_t* level_offsets,
                                const int64_t* level_offsets_device, void* h_scratch,
                                float* dist_scratch, int32_t* codes, void* zhat_levels, int64_t n,
                                int64_t d, DType dtype, cudaStream_t stream) {
  if (num_levels < 1 || n < 0 || d < 0 || zs == nullptr || level_offsets == nullptr) return cudaErrorInvalidValue;
  if (level_offsets[0] != 0) return cudaErrorInvalidValue;
  for (int64_t l = 0; l < num_levels; ++l) {
    const int64_t k = level_offsets[l + 1] - level_offsets[l];
    if (k < 1 || k > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  if (num_levels > 1 && d > 0 && h_scratch == nullptr) return cudaErrorInvalidValue;
  if (level_offsets_device == nullptr || dist_scratch == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return run_hrq<float>(zs, num_levels, codebooks, codebook_sqnorms, level_offsets, level_offsets_device,
                            h_scratch, dist_scratch, codes, zhat_levels, n, d, dtype, stream);
    case DType::kBFloat16:
      return run_hrq<__nv_bfloat16>(zs, num_levels, codebooks, codebook_sqnorms, level_offsets,
                                    level_offsets_device, h_scratch, dist_scratch, codes, zhat_levels, n, d,
                                    dtype, stream);
    case DType::kFloat16:
      return run_hrq<__half>(zs, num_levels, codebooks, codebook_sqnorms, level_offsets, level_offsets_device,
                             h_scratch, dist_scratch, codes, zhat_levels, n, d, dtype, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vqdna::cuda
