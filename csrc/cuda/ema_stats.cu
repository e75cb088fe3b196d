// CUDA EMA statistics (DESIGN 2.3): per-code counts [K] and vector sums [K, D] in float32.
//
// Fast mode (ema_atomic_kernel): grid = (row tiles of kRowsPerBlock) x (D tiles of kDimTile);
//   block = kDimTile threads along D (coalesced row reads) x kRowLanes row lanes. Every kept row
//   adds its float32 vector into sums[code] with atomicAdd; the D-tile-0 blocks also add 1 to
//   counts[code]. Outputs must be zeroed by the caller.
// Deterministic mode (ema_segment_kernel): rows have been stably sorted by code by the caller;
//   grid = (code) x (D tiles of kSegDimTile); one thread per dimension walks its code's segment in
//   sorted (= ascending row) order and accumulates sequentially with round-to-nearest adds, loads
//   issued kUnroll rows ahead for memory-level parallelism, additions strictly in order. No
//   atomics: bitwise repeatable, and the same addition order as the CPU kernel.
//
// The row vector is x_i, or 2 x_i - prev_codebook[prev_i] computed in float32 with explicit
// __fmul_rn / __fsub_rn (no FMA contraction, exactly like the reference / CPU arithmetic). Masked
// rows are skipped (not added as zeros), as in the CPU kernel. All global offsets are 64-bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ema_stats.cuh"

namespace vqdna::cuda {
namespace {

constexpr int kDimTile = 64;       // fast mode: dims per block (blockDim.x)
constexpr int kRowLanes = 4;       // fast mode: blockDim.y
constexpr int kRowsPerBlock = 32;  // fast mode: rows per block
constexpr int kSegDimTile = 64;    // deterministic mode: dims per block (blockDim.x)
constexpr int kUnroll = 4;         // deterministic mode: rows loaded ahead
constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int64_t kMaxGridY = 65535;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

// The float32 vector element (row, dim) of the statistics; the row and dim must be valid and the
// prev code (when kHasPrev) in range.
template <typename T, bool kHasPrev>
__device__ __forceinline__ float row_value(const T* __restrict__ x, const int32_t* __restrict__ prev_codes,
                                           const T* __restrict__ prev_cb, int64_t row, int64_t dim,
                                           int64_t d) {
  float v = to_f(x[row * d + dim]);
  if (kHasPrev) {
    const float e = to_f(prev_cb[static_cast<int64_t>(prev_codes[row]) * d + dim]);
    v = __fsub_rn(__fmul_rn(2.f, v), e);
  }
  return v;
}

// Whether row contributes at all: mask set and prev code in range (the code itself is checked by
// the caller of this helper where needed).
template <bool kHasPrev>
__device__ __forceinline__ bool row_kept(const uint8_t* __restrict__ mask,
                                         const int32_t* __restrict__ prev_codes, int64_t prev_k,
                                         int64_t row) {
  if (mask != nullptr && mask[row] == 0) return false;
  if (kHasPrev) {
    const int32_t p = prev_codes[row];
    if (p < 0 || p >= prev_k) return false;
  }
  return true;
}

template <typename T, bool kHasPrev>
__global__ void __launch_bounds__(kDimTile* kRowLanes)
    ema_atomic_kernel(const T* __restrict__ x, const int32_t* __restrict__ codes,
                      const uint8_t* __restrict__ mask, const int32_t* __restrict__ prev_codes,
                      const T* __restrict__ prev_cb, int64_t prev_k, float* __restrict__ counts,
                      float* __restrict__ sums, int64_t n, int64_t d, int64_t num_codes) {
  const int64_t dim = static_cast<int64_t>(blockIdx.y) * kDimTile + threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const bool counter = blockIdx.y == 0 && threadIdx.x == 0;
  for (int r = threadIdx.y; r < kRowsPerBlock; r += kRowLanes) {
    const int64_t row = row0 + r;
    if (row >= n) break;
    if (!row_kept<kHasPrev>(mask, prev_codes, prev_k, row)) continue;
    const int32_t code = codes[row];
    if (code < 0 || code >= num_codes) continue;
    if (counter) atomicAdd(counts + code, 1.f);
    if (dim < d) {
      atomicAdd(sums + static_cast<int64_t>(code) * d + dim,
                row_value<T, kHasPrev>(x, prev_codes, prev_cb, row, dim, d));
    }
  }
}

template <typename T, bool kHasPrev>
__global__ void __launch_bounds__(kSegDimTile)
    ema_segment_kernel(const T* __restrict__ x, const int64_t* __restrict__ order,
                       const int64_t* __restrict__ starts, const uint8_t* __restrict__ mask,
                       const int32_t* __restrict__ prev_codes, const T* __restrict__ prev_cb,
                       int64_t prev_k, float* __restrict__ counts, float* __restrict__ sums,
                       int64_t d) {
  const int64_t code = blockIdx.x;
  const int64_t dim = static_cast<int64_t>(blockIdx.y) * kSegDimTile + threadIdx.x;
  const bool active = dim < d;
  const int64_t start = starts[code];
  const int64_t end = starts[code + 1];
  float acc = 0.f;
  float count = 0.f;
  int64_t j = start;
  for (; j + kUnroll <= end; j += kUnroll) {
    bool kept[kUnroll];
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = order[j + u];
      kept[u] = row_kept<kHasPrev>(mask, prev_codes, prev_k, row);
      v[u] = (kept[u] && active) ? row_value<T, kHasPrev>(x, prev_codes, prev_cb, row, dim, d) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // strictly in sorted order
      if (kept[u]) {
        acc = __fadd_rn(acc, v[u]);
        count += 1.f;
      }
    }
  }
  for (; j < end; ++j) {
    const int64_t row = order[j];
    if (row_kept<kHasPrev>(mask, prev_codes, prev_k, row)) {
      if (active) acc = __fadd_rn(acc, row_value<T, kHasPrev>(x, prev_codes, prev_cb, row, dim, d));
      count += 1.f;
    }
  }
  if (active) sums[code * d + dim] = acc;
  if (blockIdx.y == 0 && threadIdx.x == 0) counts[code] = count;
}

template <typename T>
void atomic_launch(dim3 grid, cudaStream_t stream, const void* x, const int32_t* codes,
                   const uint8_t* mask, const int32_t* prev_codes, const void* prev_cb,
                   int64_t prev_k, float* counts, float* sums, int64_t n, int64_t d,
                   int64_t num_codes) {
  const dim3 block(kDimTile, kRowLanes);
  const T* xx = static_cast<const T*>(x);
  const T* pp = static_cast<const T*>(prev_cb);
  if (prev_codes != nullptr) {
    ema_atomic_kernel<T, true><<<grid, block, 0, stream>>>(xx, codes, mask, prev_codes, pp, prev_k,
                                                           counts, sums, n, d, num_codes);
  } else {
    ema_atomic_kernel<T, false><<<grid, block, 0, stream>>>(xx, codes, mask, prev_codes, pp, prev_k,
                                                            counts, sums, n, d, num_codes);
  }
}

template <typename T>
void segment_launch(dim3 grid, cudaStream_t stream, const void* x, const int64_t* order,
                    const int64_t* starts, const uint8_t* mask, const int32_t* prev_codes,
                    const void* prev_cb, int64_t prev_k, float* counts, float* sums, int64_t d) {
  const T* xx = static_cast<const T*>(x);
  const T* pp = static_cast<const T*>(prev_cb);
  if (prev_codes != nullptr) {
    ema_segment_kernel<T, true><<<grid, kSegDimTile, 0, stream>>>(xx, order, starts, mask, prev_codes,
                                                                  pp, prev_k, counts, sums, d);
  } else {
    ema_segment_kernel<T, false><<<grid, kSegDimTile, 0, stream>>>(xx, order, starts, mask, prev_codes,
                                                                   pp, prev_k, counts, sums, d);
  }
}

bool valid_dtype(DType t) {
  return t == DType::kFloat32 || t == DType::kBFloat16 || t == DType::kFloat16;
}

}  // namespace

cudaError_t launch_ema_stats_atomic(const void* x, const int32_t* codes, const uint8_t* mask,
                                    const int32_t* prev_codes, const void* prev_codebook,
                                    int64_t prev_k, float* counts, float* sums, int64_t n,
                                    int64_t d, int64_t num_codes, DType dtype,
                                    cudaStream_t stream) {
  if (n < 0 || d < 0 || num_codes < 1 || prev_k < 0 || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (prev_codes != nullptr && prev_codebook == nullptr) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int64_t row_tiles = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t dim_tiles = d == 0 ? 1 : (d + kDimTile - 1) / kDimTile;  // D tile 0 also counts
  if (row_tiles > kMaxGridX || dim_tiles > kMaxGridY) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(dim_tiles));
  switch (dtype) {
    case DType::kFloat32:
      atomic_launch<float>(grid, stream, x, codes, mask, prev_codes, prev_codebook, prev_k, counts, sums,
                           n, d, num_codes);
      break;
    case DType::kBFloat16:
      atomic_launch<__nv_bfloat16>(grid, stream, x, codes, mask, prev_codes, prev_codebook, prev_k,
                                   counts, sums, n, d, num_codes);
      break;
    case DType::kFloat16:
      atomic_launch<__half>(grid, stream, x, codes, mask, prev_codes, prev_codebook, prev_k, counts,
                            sums, n, d, num_codes);
      break;
  }
  return cudaSuccess;
}

cudaError_t launch_ema_stats_segment(const void* x, const int64_t* order, const int64_t* starts,
                                     const uint8_t* mask, const int32_t* prev_codes,
                                     const void* prev_codebook, int64_t prev_k, float* counts,
                                     float* sums, int64_t d, int64_t num_codes, DType dtype,
                                     cudaStream_t stream) {
  if (d < 0 || num_codes < 1 || prev_k < 0 || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (prev_codes != nullptr && prev_codebook == nullptr) return cudaErrorInvalidValue;
  const int64_t dim_tiles = d == 0 ? 1 : (d + kSegDimTile - 1) / kSegDimTile;  // D tile 0 also counts
  if (num_codes > kMaxGridX || dim_tiles > kMaxGridY) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(num_codes), static_cast<unsigned>(dim_tiles));
  switch (dtype) {
    case DType::kFloat32:
      segment_launch<float>(grid, stream, x, order, starts, mask, prev_codes, prev_codebook, prev_k,
                            counts, sums, d);
      break;
    case DType::kBFloat16:
      segment_launch<__nv_bfloat16>(grid, stream, x, order, starts, mask, prev_codes, prev_codebook,
                                    prev_k, counts, sums, d);
      break;
    case DType::kFloat16:
      segment_launch<__half>(grid, stream, x, order, starts, mask, prev_codes, prev_codebook, prev_k,
                             counts, sums, d);
      break;
  }
  return cudaSuccess;
}

}  // namespace vqdna::cuda
