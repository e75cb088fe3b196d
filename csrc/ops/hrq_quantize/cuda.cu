// Fused CUDA HRQ residual doubling (docs/design.md §2.2): one thread block owns 128 rows for ALL levels.
//
// Per level l the block runs the shared tile search of common/cuda_codebook_search.cuh (the same pipeline, tie and
// NaN rules as lookup) against C_l, with the A operand
//   l == 0: rows of Z_0 (PlainTile*: cp.async, exactly as lookup);
//   l >= 1: rows of H_l = T(T(2 Z_l) - C_{l-1}[M_{l-1}]) (ResidualTile*): every time a D chunk of
//           the A tile is staged, the block loads the Z_l chunk and the chunk of each row's
//           previous-level code row (the codebook row index is kept per tile row in shared memory,
//           s_prev), forms H in float32 registers with __fmul_rn / __fsub_rn, rounds it to T and
//           stores it into the shared-memory ring. H_l never reaches global memory. For bf16/fp16
//           with 16-byte aligned inputs and D % 8 == 0, and for float32, the global loads are issued
//           one pipeline stage ahead and the shared-memory stores happen after that iteration's
//           math (see the "deferred" A source in common/cuda_codebook_search.cuh), so the gather latency is hidden
//           as cp.async hides it for lookup.
// Because H_l depends on every D chunk being re-formed for every K tile, Z_l and the gathered rows
// are read once per K tile (from L2: the 128-row tile and the previous codebook are hot), as lookup
// re-reads z once per K tile.
//
// After the search of level l the block writes codes[l] for its rows and zhat_levels[l]:
// one warp per row (8 warps, 16 rows each), lanes along D (16-byte vectors when D, the codebook and
// the output allow it), acc = float(C_0[M_0]); acc = acc + float(C_m[M_m]) for m = 1..l in order;
// out = T(acc / (l + 1)). The codes of earlier levels are read back from `codes` in global memory
// (written by this block before a __syncthreads, hence visible to it); the current level's code
// row comes from s_prev.
//
// Level bookkeeping (pointers of Z_l, codebook row offsets) is a __grid_constant__ kernel parameter,
// so it is read straight from parameter space without a per-thread copy.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "ops/hrq_quantize/cuda.cuh"
#include "common/cuda_codebook_search.cuh"

namespace vqdna::cuda {
namespace {

using tile::kBM;
using tile::kThreads;

struct HrqParams {
  const void* z[kHrqMaxLevels];        // [n, d] per level
  int64_t offset[kHrqMaxLevels + 1];   // codebook row of level l's first code; offset[L] = sum K
  const void* cb;                      // [offset[L], d]
  const float* sqnorm;                 // [offset[L]]
  int32_t* codes;                      // [L, n]
  void* levels;                        // [L, n, d], or null: codes only (no zhat, no sqdist)
  float* sqdist;                       // [L, n]: ||Z_l - zhat_levels[l]||^2 per row (with levels)
  int64_t n;
  int64_t d;
  int num_levels;
  int vec_out;  // zhat epilogue may use 16-byte vectors (d % V == 0, cb, levels and every z_l 16-byte aligned)
};
static_assert(sizeof(HrqParams) <= 4000, "kernel parameters are limited to 4 KiB");

// Codebook row of the code chosen at level m for tile row r (m < l: from global codes; m == l:
// s_prev).
__device__ __forceinline__ int64_t chosen_row(const HrqParams& p, int m, int l, int r, int64_t row,
                                              const int64_t* s_prev) {
  return m == l ? s_prev[r] : p.offset[m] + static_cast<int64_t>(p.codes[m * p.n + row]);
}

// zhat_levels[l] for the block's rows (see the file comment), and sqdist[l] of those rows: each lane
// sums (Z_l - zhat)^2 of its elements (the rounded zhat it stores) in float32, the warp adds the
// lanes' sums (butterfly), lane 0 writes the row's value.
template <typename T>
__device__ __forceinline__ void write_levels(const HrqParams& p, int l, const int64_t* s_prev,
                                             int64_t row0, int tid) {
  using E = tile::Elem<T>;
  using S = typename E::Storage;
  using VT = tile::Vec16<T>;
  constexpr int V = VT::V;
  const S* const cb = static_cast<const S*>(p.cb);
  S* const out = static_cast<S*>(p.levels);
  const S* const z = static_cast<const S*>(p.z[l]);
  const int64_t n = p.n;
  const int64_t d = p.d;
  const float div = static_cast<float>(l + 1);
  const int warp = tid >> 5;
  const int lane = tid & 31;
  for (int r = warp; r < kBM; r += kThreads / 32) {
    const int64_t row = row0 + r;
    if (row >= n) break;  // rows increase with r
    S* const o = out + (static_cast<int64_t>(l) * n + row) * d;
    const S* const zr = z + row * d;
    float sq = 0.f;
    if (p.vec_out) {
      for (int64_t c = static_cast<int64_t>(lane) * V; c < d; c += 32 * V) {
        float acc[V];
        for (int m = 0; m <= l; ++m) {
          const int64_t g = chosen_row(p, m, l, r, row, s_prev);
          float v[V];
          VT::unpack(__ldg(reinterpret_cast<const uint4*>(cb + g * d + c)), v);
#pragma unroll
          for (int j = 0; j < V; ++j) acc[j] = m == 0 ? v[j] : __fadd_rn(acc[j], v[j]);
        }
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = __fdiv_rn(acc[j], div);
        const uint4 packed = VT::pack(acc);
        *reinterpret_cast<uint4*>(o + c) = packed;
        float mean[V], zv[V];
        VT::unpack(packed, mean);
        VT::unpack(__ldg(reinterpret_cast<const uint4*>(zr + c)), zv);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float diff = __fsub_rn(zv[j], mean[j]);
          sq = __fmaf_rn(diff, diff, sq);
        }
      }
    } else {
      for (int64_t c = lane; c < d; c += 32) {
        float acc = 0.f;
        for (int m = 0; m <= l; ++m) {
          const float v = E::to_float(cb[chosen_row(p, m, l, r, row, s_prev) * d + c]);
          acc = m == 0 ? v : __fadd_rn(acc, v);
        }
        const S mean = E::from_float(__fdiv_rn(acc, div));
        o[c] = mean;
        const float diff = __fsub_rn(E::to_float(zr[c]), E::to_float(mean));
        sq = __fmaf_rn(diff, diff, sq);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    if (lane == 0) p.sqdist[static_cast<int64_t>(l) * n + row] = sq;
  }
}

// Shared memory: the search's scratch, then s_prev [kBM] int64.
template <typename T>
constexpr size_t kSearchSmemBytes =
    std::is_same_v<T, float> ? tile::f32_cfg::kSmemBytes : tile::mma_cfg::kSmemBytes;
template <typename T>
constexpr size_t kHrqSmemBytes = kSearchSmemBytes<T> + size_t(kBM) * sizeof(int64_t);

// kVec (bf16/fp16 only): z_l and the codebook 16-byte aligned and d % 8 == 0.
// One block per SM (__launch_bounds__(256, 1)), unlike lookup's two: the search's 64 accumulators
// and 16 running minima plus the residual A source's prefetch registers (and, without kVec, its 32
// staged elements) need ~190-210 registers; under the 128-register cap of two blocks per SM every
// instantiation spilled 48-192 bytes, with local loads inside the tensor-core loop. Latency is hidden
// within the block by the 3-stage ring and the deferred A loads (docs/design.md, "CUDA kernels:
// resources").
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, 1) hrq_kernel(const __grid_constant__ HrqParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* const s_prev = reinterpret_cast<int64_t*>(smem_raw + kSearchSmemBytes<T>);  // [kBM]
  using S = typename tile::Elem<T>::Storage;

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n = p.n;
  const int64_t d = p.d;
  const S* const cb = static_cast<const S*>(p.cb);

  for (int l = 0; l < p.num_levels; ++l) {
    const int64_t off = p.offset[l];
    const int k = static_cast<int>(p.offset[l + 1] - off);
    const S* const cb_l = cb + off * d;
    const float* const sq_l = p.sqnorm + off;
    const S* const z_l = static_cast<const S*>(p.z[l]);
    float best = 0.f, zsq = 0.f;
    int idx = 0;
    if constexpr (std::is_same_v<T, float>) {
      if (l == 0) {
        tile::PlainTileF32 src{z_l, n, row0, d};
        tile::f32_tile_search<false>(src, cb_l, sq_l, k, d, smem_raw, best, idx, zsq);
      } else {
        tile::ResidualTileF32 src{z_l, cb, s_prev, n, row0, d};
        tile::f32_tile_search<false>(src, cb_l, sq_l, k, d, smem_raw, best, idx, zsq);
      }
    } else {
      if (l == 0) {
        tile::PlainTileB16<kVec> src{z_l, n, row0, d};
        tile::mma_tile_search<T, kVec, false>(src, cb_l, sq_l, k, d, smem_raw, best, idx, zsq);
      } else {
        tile::ResidualTileB16<T, kVec> src{z_l, cb, s_prev, n, row0, d};
        tile::mma_tile_search<T, kVec, false>(src, cb_l, sq_l, k, d, smem_raw, best, idx, zsq);
      }
    }
    (void)best;
    (void)zsq;
    // The previous level's s_prev was last read inside this level's search (before its final
    // __syncthreads), so it may be overwritten now.
    if (tid < kBM) {
      s_prev[tid] = off + idx;  // always a valid row of C_l, also for tile rows >= n
      const int64_t row = row0 + tid;
      if (row < n) p.codes[static_cast<int64_t>(l) * n + row] = idx;
    }
    __syncthreads();  // s_prev and codes[l] visible to the block
    if (p.levels != nullptr) write_levels<T>(p, l, s_prev, row0, tid);
    // The next search reads s_prev (written before the barrier above) and overwrites only its
    // rings before its own barriers; s_prev is rewritten only after that search's final barrier,
    // when every thread is done with write_levels. No barrier needed here.
  }
}

template <typename T, bool kVec>
cudaError_t launch_kernel(const HrqParams& p, unsigned grid, cudaStream_t stream) {
  constexpr size_t smem = kHrqSmemBytes<T>;
  cudaError_t err = cudaFuncSetAttribute(hrq_kernel<T, kVec>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // do not leave it for an unrelated later check
    return err;
  }
  hrq_kernel<T, kVec><<<grid, kThreads, smem, stream>>>(p);
  return cudaSuccess;
}

bool all_aligned16(const void* const* ptrs, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    if (!tile::aligned16(ptrs[i])) return false;
  }
  return true;
}

}  // namespace

cudaError_t launch_hrq_quantize(const void* const* zs, int64_t num_levels, const void* codebooks,
                                const float* codebook_sqnorms, const int64_t* codebook_sizes,
                                int32_t* codes, void* zhat_levels, float* sqdist, int64_t n,
                                int64_t d, DType dtype, cudaStream_t stream) {
  if (num_levels < 1 || num_levels > kHrqMaxLevels || n < 0 || d < 0) return cudaErrorInvalidValue;
  HrqParams p{};
  p.offset[0] = 0;
  for (int64_t l = 0; l < num_levels; ++l) {
    if (codebook_sizes[l] < 1 || codebook_sizes[l] > tile::kMaxK) return cudaErrorInvalidValue;
    p.z[l] = zs[l];
    p.offset[l + 1] = p.offset[l] + codebook_sizes[l];
  }
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + kBM - 1) / kBM;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>(blocks);
  p.cb = codebooks;
  p.sqnorm = codebook_sqnorms;
  p.codes = codes;
  p.levels = zhat_levels;
  p.sqdist = sqdist;
  p.n = n;
  p.d = d;
  p.num_levels = static_cast<int>(num_levels);
  const int64_t elem = dtype == DType::kFloat32 ? 4 : 2;
  p.vec_out = (d > 0 && (d * elem) % 16 == 0 && tile::aligned16(codebooks) &&
               tile::aligned16(zhat_levels) && all_aligned16(zs, num_levels))
                  ? 1
                  : 0;
  switch (dtype) {
    case DType::kFloat32:
      return launch_kernel<float, false>(p, grid, stream);
    case DType::kBFloat16:
    case DType::kFloat16: {
      const bool vec = mma_vec_loads(dtype, d, tile::aligned16(codebooks) && all_aligned16(zs, num_levels));
      if (dtype == DType::kBFloat16) {
        return vec ? launch_kernel<__nv_bfloat16, true>(p, grid, stream)
                   : launch_kernel<__nv_bfloat16, false>(p, grid, stream);
      }
      return vec ? launch_kernel<__half, true>(p, grid, stream)
                 : launch_kernel<__half, false>(p, grid, stream);
    }
  }
  return cudaErrorInvalidValue;
}

}  // namespace vqdna::cuda
