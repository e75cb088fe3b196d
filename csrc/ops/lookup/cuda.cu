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

// The block's head c = blockIdx.y: its rows start at z + c * d (row stride heads * d), its codebook at
// cb + c * k * d, its sqnorms at sqnorm + c * k, and row i's outputs at codes / dist [i * heads + c].
template <typename T, bool kVec, typename S>
__device__ __forceinline__ void lookup_block(const S* __restrict__ z, const S* __restrict__ cb,
                                             const float* __restrict__ sqnorm, int32_t* __restrict__ codes,
                                             float* __restrict__ dist, int64_t n, int k, int64_t d, int heads) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t head = blockIdx.y;
  float best = 0.f, zsq = 0.f;
  int idx = 0;
  tile::search_rows<T, kVec>(z + head * d, cb + head * k * d, sqnorm + head * k, n, row0, k, d, heads * d,
                             smem_raw, best, idx, zsq);
  if (tid < kBM) {
    const int64_t row = row0 + tid;
    if (row < n) tile::write_code_dist(codes + head, dist + head, row * heads, best, idx, zsq);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, 2)
    lookup_mma_kernel(const uint16_t* __restrict__ z, const uint16_t* __restrict__ cb,
                      const float* __restrict__ sqnorm, int32_t* __restrict__ codes,
                      float* __restrict__ dist, int64_t n, int k, int64_t d, int heads) {
  lookup_block<T, kVec>(z, cb, sqnorm, codes, dist, n, k, d, heads);
}

__global__ void __launch_bounds__(kThreads, 2)
    lookup_f32_kernel(const float* __restrict__ z, const float* __restrict__ cb,
                      const float* __restrict__ sqnorm, int32_t* __restrict__ codes,
                      float* __restrict__ dist, int64_t n, int k, int64_t d, int heads) {
  lookup_block<float, false>(z, cb, sqnorm, codes, dist, n, k, d, heads);
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
  if (vec) {
    return launch_with_smem(lookup_mma_kernel<T, true>, tile::mma_cfg::kSmemBytes, grid, stream, zz,
                            cc, sqnorm, codes, dist, n, k, d, heads);
  }
  return launch_with_smem(lookup_mma_kernel<T, false>, tile::mma_cfg::kSmemBytes, grid, stream, zz,
                          cc, sqnorm, codes, dist, n, k, d, heads);
}

}  // namespace

cudaError_t launch_lookup(const void* z, const void* codebook, const float* codebook_sqnorm,
                          int32_t* codes, float* dist, int64_t n, int64_t k, int64_t d, int64_t heads,
                          DType dtype, cudaStream_t stream) {
  if (n < 0 || k < 1 || k > tile::kMaxK || d < 0 || heads < 1 || heads > 65535) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + kBM - 1) / kBM;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(heads));
  const int kk = static_cast<int>(k);
  const int hh = static_cast<int>(heads);
  switch (dtype) {
    case DType::kFloat32:
      return launch_with_smem(lookup_f32_kernel, tile::f32_cfg::kSmemBytes, grid, stream,
                              static_cast<const float*>(z), static_cast<const float*>(codebook),
                              codebook_sqnorm, codes, dist, n, kk, d, hh);
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
