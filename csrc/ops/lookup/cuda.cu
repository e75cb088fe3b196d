// CUDA nearest-code lookup (docs/design.md §2.1): codes[i] = argmin_k (||e_k||^2 - 2 z_i.e_k),
// dist[i] = min + ||z_i||^2 clamped at 0. The N x K distance matrix never leaves the SM.
//
// One thread block owns 128 rows of z and runs the shared tile search of common/cuda_codebook_search.cuh (design,
// tie and NaN rules, tails: see there) with the plain A source (rows of z, loaded like the codebook
// tiles: 16-byte cp.async for bf16/fp16 when z and codebook are 16-byte aligned and D % 8 == 0,
// otherwise bounds-checked 2-byte loads; 4-byte cp.async for float32).
//
// ||z_i||^2 is accumulated in fp32 from the z tiles in shared memory while the first K tile is
// processed (the zero padding of the D tail adds nothing).
//
// Per-head codebooks (z [n, heads, d], codebook [heads, k, d]): grid dimension y is the head; block
// (x, c) searches rows of the strided view z[:, c] (row stride heads * d) in codebook c and writes
// column c of codes / dist [n, heads]. heads = 1 is the single-codebook lookup.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ops/lookup/cuda.cuh"
#include "common/cuda_codebook_search.cuh"

namespace vqdna::cuda {
namespace {

using tile::kBM;
using tile::kThreads;
using tile::launch_with_smem;

static_assert(kBM == kLookupBlockRows, "cuda.cuh advertises the tile height");

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, 2)
    lookup_mma_kernel(const uint16_t* __restrict__ z, const uint16_t* __restrict__ cb,
                      const float* __restrict__ sqnorm, int32_t* __restrict__ codes,
                      float* __restrict__ dist, int64_t n, int k, int64_t d) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  float best = 0.f, zsq = 0.f;
  int idx = 0;
  tile::search_rows<T, kVec>(z, cb, sqnorm, n, row0, k, d, smem_raw, best, idx, zsq);
  if (tid < kBM) {
    const int64_t row = row0 + tid;
    if (row < n) tile::write_code_dist(codes, dist, row, best, idx, zsq);
  }
}

__global__ void __launch_bounds__(kThreads, 2)
    lookup_f32_kernel(const float* __restrict__ z, const float* __restrict__ cb,
                      const float* __restrict__ sqnorm, int32_t* __restrict__ codes,
                      float* __restrict__ dist, int64_t n, int k, int64_t d) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  float best = 0.f, zsq = 0.f;
  int idx = 0;
  tile::search_rows<float, false>(z, cb, sqnorm, n, row0, k, d, smem_raw, best, idx, zsq);
  if (tid < kBM) {
    const int64_t row = row0 + tid;
    if (row < n) tile::write_code_dist(codes, dist, row, best, idx, zsq);
  }
}

// Per-head codebooks: block (x, c) searches rows [128 x, 128 x + 128) of head c = blockIdx.y, i.e. of
// z + c * d with row stride heads * d, in codebook c (cb + c * k * d, sqnorm + c * k), and writes row
// i's outputs at codes / dist [i * heads + c]. S: the storage type (uint16_t or float).
template <typename T, bool kVec, typename S>
__device__ __forceinline__ void lookup_head_block(const S* __restrict__ z, const S* __restrict__ cb,
                                                  const float* __restrict__ sqnorm, int32_t* __restrict__ codes,
                                                  float* __restrict__ dist, int64_t n, int k, int64_t d,
                                                  int heads) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t head = blockIdx.y;
  const int ld = heads * static_cast<int>(d);
  const int rows = static_cast<int>(n - row0 < kBM ? n - row0 : kBM);
  float best = 0.f, zsq = 0.f;
  int idx = 0;
  tile::search_head_rows<T, kVec>(z + head * d + row0 * ld, cb + head * k * d, sqnorm + head * k, rows, ld, k, d,
                                  smem_raw, best, idx, zsq);
  if (tid < rows) {
    const int64_t row = row0 + tid;
    tile::write_code_dist(codes + head, dist + head, row * heads, best, idx, zsq);
  }
}

// The strided row loads of the per-head kernels cost registers that the scalar-load (kVec = false) and
// float32 searches do not have to spare at 2 blocks per SM (ptxas spilled 4-104 B): those run at 1
// (up to 255 registers per thread); the 16-byte-load kernel keeps 2.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, kVec ? 2 : 1)
    lookup_heads_mma_kernel(const uint16_t* __restrict__ z, const uint16_t* __restrict__ cb,
                            const float* __restrict__ sqnorm, int32_t* __restrict__ codes,
                            float* __restrict__ dist, int64_t n, int k, int64_t d, int heads) {
  lookup_head_block<T, kVec>(z, cb, sqnorm, codes, dist, n, k, d, heads);
}

__global__ void __launch_bounds__(kThreads, 1)
    lookup_heads_f32_kernel(const float* __restrict__ z, const float* __restrict__ cb,
                            const float* __restrict__ sqnorm, int32_t* __restrict__ codes,
                            float* __restrict__ dist, int64_t n, int k, int64_t d, int heads) {
  lookup_head_block<float, false>(z, cb, sqnorm, codes, dist, n, k, d, heads);
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

template <typename T>
cudaError_t launch_mma(const void* z, const void* cb, const float* sqnorm, int32_t* codes,
                       float* dist, int64_t n, int k, int64_t d, int heads, DType dtype, dim3 grid,
                       cudaStream_t stream) {
  const auto* zz = static_cast<const uint16_t*>(z);
  const auto* cc = static_cast<const uint16_t*>(cb);
  const bool vec = mma_vec_loads(dtype, d, tile::aligned16(z) && tile::aligned16(cb));
  constexpr size_t smem = tile::mma_cfg::kSmemBytes;
  if (heads > 1) {
    return vec ? launch_with_smem(lookup_heads_mma_kernel<T, true>, smem, grid, stream, zz, cc, sqnorm, codes, dist,
                                  n, k, d, heads)
               : launch_with_smem(lookup_heads_mma_kernel<T, false>, smem, grid, stream, zz, cc, sqnorm, codes, dist,
                                  n, k, d, heads);
  }
  if (vec) {
    return launch_with_smem(lookup_mma_kernel<T, true>, smem, grid, stream, zz, cc, sqnorm, codes, dist, n, k, d);
  }
  return launch_with_smem(lookup_mma_kernel<T, false>, smem, grid, stream, zz, cc, sqnorm, codes, dist, n, k, d);
}

}  // namespace

cudaError_t launch_lookup(const void* z, const void* codebook, const float* codebook_sqnorm,
                          int32_t* codes, float* dist, int64_t n, int64_t k, int64_t d, int64_t heads,
                          DType dtype, cudaStream_t stream) {
  if (n < 0 || k < 1 || k > tile::kMaxK || d < 0 || heads < 1 || heads > 65535) return cudaErrorInvalidValue;
  if (heads > 1 && heads * d > 0x7fffffff) return cudaErrorInvalidValue;  // the 32-bit row stride
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + kBM - 1) / kBM;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(heads));
  const int kk = static_cast<int>(k);
  const int hh = static_cast<int>(heads);
  switch (dtype) {
    case DType::kFloat32: {
      const auto* zz = static_cast<const float*>(z);
      const auto* cc = static_cast<const float*>(codebook);
      constexpr size_t smem = tile::f32_cfg::kSmemBytes;
      return hh > 1 ? launch_with_smem(lookup_heads_f32_kernel, smem, grid, stream, zz, cc, codebook_sqnorm, codes,
                                       dist, n, kk, d, hh)
                    : launch_with_smem(lookup_f32_kernel, smem, grid, stream, zz, cc, codebook_sqnorm, codes, dist, n,
                                       kk, d);
    }
    case DType::kBFloat16:
      return launch_mma<__nv_bfloat16>(z, codebook, codebook_sqnorm, codes, dist, n, kk, d, hh, dtype,
                                       grid, stream);
    case DType::kFloat16:
      return launch_mma<__half>(z, codebook, codebook_sqnorm, codes, dist, n, kk, d, hh, dtype, grid,
                                stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vqdna::cuda
