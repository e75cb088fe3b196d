// CUDA quantize (docs/design.md §2.1): lookup's search of a 128-row tile (common/cuda_codebook_search.cuh:
// search_rows, the same kernel body as csrc/ops/lookup/cuda.cu) with an epilogue for that tile:
//  * codes and dist as lookup (write_code_dist);
//  * quantized rows = codebook[code]: the block copies its rows with all 256 threads, 16 bytes at a
//    time when the codebook is 16-byte aligned and a row is a multiple of 16 bytes (the output always
//    is: the binding allocates it), else element by element (the codebook rows are L2-resident after the search);
//  * the tile's float64 loss sum and non-finite rows (count, max of n - row: the first row) are
//    reduced per warp and added with one atomic per warp into a zeroed scratch; a one-thread kernel
//    turns the scratch into sqdist_sum (float32, rounded once) and the report. Atomics make the
//    float64 sum's order vary between runs; rounding it to float32 hides that except at a rounding
//    boundary.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "ops/quantize/cuda.cuh"
#include "common/cuda_codebook_search.cuh"

namespace vqdna::cuda {
namespace {

using tile::kBM;
using tile::kThreads;
using tile::launch_with_smem;

static_assert(kBM == kQuantizeBlockRows, "cuda.cuh advertises the tile height");

// The epilogue of block blockIdx.x after its search (all threads; threads tid < kBM hold row tid's
// best score, code and ||z||^2). U: the copy unit (the element's storage type, or uint4);
// row_units: units per row of quantized / codebook. Not inlined: inlined, its address arithmetic
// was scheduled into the search and the 16-bit scalar-load kernels spilled on sm_90 (20 bytes);
// as a call it runs once per block and the search keeps lookup's register allocation.
template <typename U>
__device__ __noinline__ void quantize_epilogue(const U* __restrict__ cb, int32_t* __restrict__ codes,
                                                  U* __restrict__ quantized, float* __restrict__ dist,
                                                  int64_t* __restrict__ scratch, int64_t n, int64_t row0,
                                                  int64_t row_units, float best, int idx, float zsq,
                                                  unsigned char* smem) {
  const int tid = static_cast<int>(threadIdx.x);
  // The search's rings are free on return (its contract): the codes of the tile go there.
  int* const s_code = reinterpret_cast<int*>(smem);
  if (tid < kBM) {  // warps 0..3: whole warps
    const int64_t row = row0 + tid;
    double sum = 0.0;
    unsigned long long bad = 0;
    long long last = 0;  // n - row of a non-finite row (0: none), so the max is the first row
    if (row < n) {
      const float v = tile::write_code_dist(codes, dist, row, best, idx, zsq);
      sum = v;
      if (!(v < tile::pos_inf())) {  // v >= 0: +inf or NaN
        bad = 1;
        last = static_cast<long long>(n - row);
      }
    }
    s_code[tid] = idx;
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) {
      sum += __shfl_xor_sync(0xffffffffu, sum, off);
      bad += __shfl_xor_sync(0xffffffffu, bad, off);
      last = max(last, __shfl_xor_sync(0xffffffffu, last, off));
    }
    if ((tid & 31) == 0) {
      atomicAdd(reinterpret_cast<double*>(scratch), sum);
      if (bad != 0) {
        atomicAdd(reinterpret_cast<unsigned long long*>(scratch + 1), bad);
        atomicMax(reinterpret_cast<long long*>(scratch + 2), last);
      }
    }
  }
  __syncthreads();
  const int64_t rows = n - row0 < kBM ? n - row0 : kBM;
  const int64_t total = rows * row_units;
  for (int64_t i = tid; i < total; i += kThreads) {
    const int64_t r = i / row_units;
    const int64_t c = i - r * row_units;
    quantized[(row0 + r) * row_units + c] = __ldg(cb + static_cast<int64_t>(s_code[r]) * row_units + c);
  }
}

template <typename T, bool kVec, typename U>
__global__ void __launch_bounds__(kThreads, 2)
    quantize_kernel(const typename tile::Elem<T>::Storage* __restrict__ z,
                    const typename tile::Elem<T>::Storage* __restrict__ cb,
                    const float* __restrict__ sqnorm, int32_t* __restrict__ codes, U* __restrict__ quantized,
                    float* __restrict__ dist, int64_t* __restrict__ scratch, int64_t n, int k, int64_t d,
                    int64_t row_units) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  float best = 0.f, zsq = 0.f;
  int idx = 0;
  tile::search_rows<T, kVec>(z, cb, sqnorm, n, row0, k, d, smem_raw, best, idx, zsq);
  quantize_epilogue<U>(reinterpret_cast<const U*>(cb), codes, quantized, dist, scratch, n, row0, row_units,
                       best, idx, zsq, smem_raw);
}

__global__ void quantize_finish_kernel(const int64_t* __restrict__ scratch, float* __restrict__ sqdist_sum,
                                       int64_t* __restrict__ nonfinite, int64_t n) {
  *sqdist_sum = static_cast<float>(__longlong_as_double(scratch[0]));  // round to nearest
  nonfinite[0] = scratch[1];
  nonfinite[1] = scratch[2] > 0 ? n - scratch[2] : -1;
}

template <typename T, bool kVec, typename U>
cudaError_t launch_typed(const void* z, const void* cb, const float* sqnorm, int32_t* codes, void* quantized,
                         float* dist, int64_t* scratch, int64_t n, int k, int64_t d, unsigned grid,
                         cudaStream_t stream) {
  using S = typename tile::Elem<T>::Storage;
  constexpr size_t smem = std::is_same_v<T, float> ? tile::f32_cfg::kSmemBytes : tile::mma_cfg::kSmemBytes;
  const int64_t row_units = d * static_cast<int64_t>(sizeof(S)) / static_cast<int64_t>(sizeof(U));
  return launch_with_smem(quantize_kernel<T, kVec, U>, smem, grid, stream, static_cast<const S*>(z),
                          static_cast<const S*>(cb), sqnorm, codes, static_cast<U*>(quantized), dist, scratch,
                          n, k, d, row_units);
}

template <typename T>
cudaError_t launch_mma(const void* z, const void* cb, const float* sqnorm, int32_t* codes, void* quantized,
                       float* dist, int64_t* scratch, int64_t n, int k, int64_t d, DType dtype, unsigned grid,
                       cudaStream_t stream) {
  using S = typename tile::Elem<T>::Storage;
  if (mma_vec_loads(dtype, d, tile::aligned16(z) && tile::aligned16(cb))) {
    // 16-byte tile loads imply a 16-byte aligned codebook and D % 8 == 0: 16-byte row copies.
    return launch_typed<T, true, uint4>(z, cb, sqnorm, codes, quantized, dist, scratch, n, k, d, grid, stream);
  }
  return launch_typed<T, false, S>(z, cb, sqnorm, codes, quantized, dist, scratch, n, k, d, grid, stream);
}

cudaError_t launch_f32(const void* z, const void* cb, const float* sqnorm, int32_t* codes, void* quantized,
                       float* dist, int64_t* scratch, int64_t n, int k, int64_t d, unsigned grid,
                       cudaStream_t stream) {
  if (tile::aligned16(cb) && d % 4 == 0) {  // 16-byte row copies
    return launch_typed<float, false, uint4>(z, cb, sqnorm, codes, quantized, dist, scratch, n, k, d, grid, stream);
  }
  return launch_typed<float, false, float>(z, cb, sqnorm, codes, quantized, dist, scratch, n, k, d, grid, stream);
}

}  // namespace

cudaError_t launch_quantize(const void* z, const void* codebook, const float* codebook_sqnorm,
                            int32_t* codes, void* quantized, float* dist, int64_t* scratch,
                            float* sqdist_sum, int64_t* nonfinite, int64_t n, int64_t k, int64_t d,
                            DType dtype, cudaStream_t stream) {
  if (n < 0 || k < 1 || k > tile::kMaxK || d < 0) return cudaErrorInvalidValue;
  if (dtype != DType::kFloat32 && dtype != DType::kBFloat16 && dtype != DType::kFloat16) {
    return cudaErrorInvalidValue;
  }
  if (n > 0) {
    const int64_t blocks = (n + kBM - 1) / kBM;
    if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
    const unsigned grid = static_cast<unsigned>(blocks);
    const int kk = static_cast<int>(k);
    cudaError_t err = cudaSuccess;
    switch (dtype) {
      case DType::kFloat32:
        err = launch_f32(z, codebook, codebook_sqnorm, codes, quantized, dist, scratch, n, kk, d, grid, stream);
        break;
      case DType::kBFloat16:
        err = launch_mma<__nv_bfloat16>(z, codebook, codebook_sqnorm, codes, quantized, dist, scratch, n, kk,
                                        d, dtype, grid, stream);
        break;
      case DType::kFloat16:
        err = launch_mma<__half>(z, codebook, codebook_sqnorm, codes, quantized, dist, scratch, n, kk, d,
                                 dtype, grid, stream);
        break;
    }
    if (err != cudaSuccess) return err;
  }
  quantize_finish_kernel<<<1, 1, 0, stream>>>(scratch, sqdist_sum, nonfinite, n);
  return cudaSuccess;
}

}  // namespace vqdna::cuda
