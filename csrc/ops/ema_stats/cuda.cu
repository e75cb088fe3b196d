// CUDA EMA statistics (docs/design.md §2.3): per-code counts [K] and vector sums [K, D] in float32.
//
// Common row layout. A block has 256 threads split into lane groups of G = 2^g lanes (G <= 32);
// a group handles one row at a time, each lane V consecutive columns (V = 16 bytes of the input:
// 8 for bf16/fp16, 4 for float32), so a group covers a column tile of G * V columns (<= 256) and a
// block reads 256 / G rows at a time. blockIdx.y selects the column tile. Loads are one 16-byte
// vector per lane when D % V == 0 and the inputs are 16-byte aligned ("kVec"), else bounds-checked
// scalar loads. Each group issues the loads of kUnroll rows before using them (memory-level
// parallelism). G is the power of two that covers D with the fewest padded columns (G <= 32).
// Row vector: x_i, or 2 x_i - prev_codebook[prev_i] in float32 (__fmul_rn / __fsub_rn).
// Rows with mask 0, a code outside [0, K) or a prev code outside [0, K') are skipped.
//
// Fast mode (ema_atomic_kernel): grid = (row ranges) x (column tiles), about one wave of blocks.
//   Each group walks its rows (stride 256 / G) keeping a register accumulator for the current RUN of
//   equal codes (sorted or low-entropy codes aggregate in registers for free); when the code
//   changes the run is flushed
//     kSmem: with shared-memory atomics into a per-block table [K][tile] (+ per-code run counts),
//            chosen when K x tile floats fit (preferring a table small enough for 2 blocks per SM,
//            narrowing the tile down to 64-byte row segments); at the end the block adds the
//            touched codes' entries to global memory (coalesced atomicAdd; codes with no rows in the
//            block are skipped). Global atomics per block <= min(K, rows) x tile, so with rows per
//            block >> K the kernel streams x at memory bandwidth whatever the code distribution
//            (hot codes only contend in shared memory).
//     else:  directly with global atomicAdd (sm_90: 16-byte vector atomics) — the fallback for a
//            K too large for a shared table.
//   counts are added by the column-tile-0 blocks only.
// Deterministic mode (no float atomics; caller sorted the codes): per code, its sorted segment is
//   cut into chunks of kSegRows rows. ema_bounds_kernel: one thread per code finds the segment
//   [starts[k], starts[k+1]) by binary search in the sorted codes and writes chunk_code[] for the
//   code's chunks (chunk ids base(k) + j, base(k) = starts[k] / kSegRows + k: disjoint for distinct
//   codes, no scan needed). ema_partial_kernel: one block per (chunk, column tile) sums its rows in a
//   fixed order (group g takes positions g, g + 256/G, ... in increasing order; then the groups are
//   added in increasing g), and writes the result straight into sums/counts when the code has one
//   chunk, else into partial slot 2 * (starts[k] / kSegRows) + j (disjoint, < 2 n / kSegRows + 2).
//   ema_finalize_kernel: per code with 0 or >= 2 chunks, adds its partial slots in chunk order (0
//   chunks: writes zeros). Every addition happens in an order fixed by the inputs alone, so the
//   result is bitwise repeatable, and skewed codes still spread over many blocks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/ema_stats/cuda.cuh"
#include "common/cuda_codebook_search.cuh"

namespace vqdna::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;              // rows per group loaded ahead
constexpr int64_t kSegRows = 512;       // deterministic mode: rows per chunk
constexpr int64_t kMaxGridY = 65535;

struct EmaArgs {
  const void* x;            // [n, d]
  const int32_t* codes;     // [n] (fast mode only)
  const uint8_t* mask;      // [n] or nullptr
  const int32_t* prev_codes;  // [n] or nullptr
  const void* prev_cb;      // [prev_k, d] or nullptr
  int64_t prev_k;
  float* counts;            // [k]
  float* sums;              // [k, d]
  int64_t n;
  int64_t d;
  int k;
};

template <typename T>
struct Lanes {
  using E = tile::Elem<T>;
  using S = typename E::Storage;
  using VT = tile::Vec16<T>;
  static constexpr int V = VT::V;
  static constexpr int kLogV = V == 8 ? 3 : 2;
  static_assert((1 << kLogV) == V, "V is 4 or 8");
};

// v = the float32 vector of `row` at columns [c, c + V) (0 beyond d); requires c < d.
template <typename T, bool kVec, bool kPrev>
__device__ __forceinline__ void load_vec(const EmaArgs& a, int64_t row, int64_t prow, int64_t c,
                                         float (&v)[Lanes<T>::V]) {
  using LT = Lanes<T>;
  using S = typename LT::S;
  constexpr int V = LT::V;
  const int64_t d = a.d;
  const S* const x = static_cast<const S*>(a.x) + row * d + c;
  const S* const e = kPrev ? static_cast<const S*>(a.prev_cb) + prow * d + c : nullptr;
  if constexpr (kVec) {
    LT::VT::unpack(__ldg(reinterpret_cast<const uint4*>(x)), v);
    if constexpr (kPrev) {
      float ev[V];
      LT::VT::unpack(__ldg(reinterpret_cast<const uint4*>(e)), ev);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = __fsub_rn(__fmul_rn(2.f, v[j]), ev[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const bool ok = c + j < d;
      v[j] = ok ? LT::E::to_float(x[j]) : 0.f;
      if constexpr (kPrev) {
        if (ok) v[j] = __fsub_rn(__fmul_rn(2.f, v[j]), LT::E::to_float(e[j]));
      }
    }
  }
}

// Whether row `row` counts (mask, code ranges); sets its prev codebook row.
template <bool kPrev>
__device__ __forceinline__ bool row_kept(const EmaArgs& a, int64_t row, int64_t& prow) {
  if (a.mask != nullptr && a.mask[row] == 0) return false;
  if constexpr (kPrev) {
    const int32_t p = a.prev_codes[row];
    prow = p;
    return p >= 0 && static_cast<int64_t>(p) < a.prev_k;
  } else {
    prow = 0;
    return true;
  }
}

// ------------------------------------------------------------------------------------------------
// Fast mode
// ------------------------------------------------------------------------------------------------

// Adds a finished run (acc over `run` rows of code `code`) to the block table or to global memory.
template <typename T, bool kVec, bool kSmem>
__device__ __forceinline__ void flush_run(const EmaArgs& a, float* s_table, float* s_cnt, int code,
                                          const float (&acc)[Lanes<T>::V], float run, int64_t c,
                                          int gl, int g_log2, int dtile_log2) {
  constexpr int V = Lanes<T>::V;
  const int64_t d = a.d;
  if constexpr (kSmem) {
    // Table layout [code][j][gl]: for a fixed j the lanes of a group hit consecutive words.
    float* const t = s_table + (static_cast<int64_t>(code) << dtile_log2) + gl;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (c + j < d) atomicAdd(t + (j << g_log2), acc[j]);
    }
    if (gl == 0) atomicAdd(s_cnt + code, run);
  } else {
    float* const s = a.sums + static_cast<int64_t>(code) * d + c;
    if (c < d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      if constexpr (kVec) {  // d % V == 0, c % V == 0, sums 16-byte aligned (checked on launch)
#pragma unroll
        for (int j = 0; j < V; j += 4) {
          atomicAdd(reinterpret_cast<float4*>(s + j), make_float4(acc[j], acc[j + 1], acc[j + 2], acc[j + 3]));
        }
      } else
#endif
      {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (c + j < d) atomicAdd(s + j, acc[j]);
        }
      }
    }
    if (gl == 0 && blockIdx.y == 0) atomicAdd(a.counts + code, run);
  }
}

template <typename T, bool kVec, bool kPrev, bool kSmem>
__global__ void __launch_bounds__(kThreads)
    ema_atomic_kernel(const EmaArgs a, int g_log2, int64_t rows_per_block) {
  using LT = Lanes<T>;
  constexpr int V = LT::V;
  extern __shared__ __align__(16) float s_table[];  // kSmem: [k][dtile] then s_cnt [k]
  const int dtile_log2 = g_log2 + LT::kLogV;
  const int dtile = 1 << dtile_log2;
  const int tid = static_cast<int>(threadIdx.x);
  const int gl = tid & ((1 << g_log2) - 1);
  const int gi = tid >> g_log2;
  const int ngroups = kThreads >> g_log2;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) << dtile_log2;
  const int64_t c = col0 + static_cast<int64_t>(gl) * V;
  const bool lane_has_cols = c < a.d;
  float* const s_cnt = s_table + (static_cast<int64_t>(a.k) << dtile_log2);

  if constexpr (kSmem) {
    const int total = a.k * (dtile + 1);  // fits: the table fits in shared memory
    for (int i = tid; i < total; i += kThreads) s_table[i] = 0.f;
    __syncthreads();
  }

  const int64_t r_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t r_end = r_begin + rows_per_block < a.n ? r_begin + rows_per_block : a.n;
  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.f;
  int cur = -1;
  float run = 0.f;

  for (int64_t base = r_begin + gi; base < r_end; base += static_cast<int64_t>(kUnroll) * ngroups) {
    int code[kUnroll];
    bool ok[kUnroll];
    float v[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = base + static_cast<int64_t>(u) * ngroups;
      int64_t prow = 0;
      ok[u] = row < r_end;
      code[u] = ok[u] ? a.codes[row] : -1;
      ok[u] = ok[u] && static_cast<unsigned>(code[u]) < static_cast<unsigned>(a.k) &&
              row_kept<kPrev>(a, row, prow);
      if (ok[u] && lane_has_cols) {
        load_vec<T, kVec, kPrev>(a, row, prow, c, v[u]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[u][j] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!ok[u]) continue;
      if (code[u] != cur) {
        if (cur >= 0) {
          flush_run<T, kVec, kSmem>(a, s_table, s_cnt, cur, acc, run, c, gl, g_log2, dtile_log2);
        }
        cur = code[u];
        run = 1.f;
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = v[u][j];
      } else {
        run += 1.f;
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = __fadd_rn(acc[j], v[u][j]);
      }
    }
  }
  if (cur >= 0) flush_run<T, kVec, kSmem>(a, s_table, s_cnt, cur, acc, run, c, gl, g_log2, dtile_log2);

  if constexpr (kSmem) {
    __syncthreads();
    // Global flush, coalesced along columns; codes without rows in this block are skipped.
    const int entries = a.k << dtile_log2;
    for (int i = tid; i < entries; i += kThreads) {
      const int code_i = i >> dtile_log2;
      const int cc = i & (dtile - 1);
      const int64_t col = col0 + cc;
      if (col >= a.d || s_cnt[code_i] == 0.f) continue;
      const int j = cc & (V - 1);
      const int g = cc >> LT::kLogV;
      atomicAdd(a.sums + static_cast<int64_t>(code_i) * a.d + col,
                s_table[(code_i << dtile_log2) + (j << g_log2) + g]);
    }
    if (blockIdx.y == 0) {
      for (int i = tid; i < a.k; i += kThreads) {
        if (s_cnt[i] != 0.f) atomicAdd(a.counts + i, s_cnt[i]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Deterministic mode
// ------------------------------------------------------------------------------------------------

// First position p in sorted[0, n) with sorted[p] >= v.
__device__ __forceinline__ int64_t lower_bound(const int32_t* __restrict__ sorted, int64_t n, int64_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(sorted[mid]) < v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__device__ __forceinline__ int64_t num_chunks(int64_t rows) { return (rows + kSegRows - 1) / kSegRows; }

__global__ void __launch_bounds__(kThreads)
    ema_bounds_kernel(const int32_t* __restrict__ sorted, int64_t n, int k, int64_t* __restrict__ starts,
                      int32_t* __restrict__ chunk_code) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i > k) return;
  const int64_t lb = lower_bound(sorted, n, i);
  starts[i] = lb;
  if (i < k) {
    const int64_t ub = lower_bound(sorted, n, i + 1);
    const int64_t base = lb / kSegRows + i;
    const int64_t nch = num_chunks(ub - lb);
    for (int64_t j = 0; j < nch; ++j) chunk_code[base + j] = static_cast<int32_t>(i);
  }
}

template <typename T, bool kVec, bool kPrev>
__global__ void __launch_bounds__(kThreads)
    ema_partial_kernel(const EmaArgs a, const int64_t* __restrict__ order,
                       const int64_t* __restrict__ starts, const int32_t* __restrict__ chunk_code,
                       float* __restrict__ partial, float* __restrict__ partial_count, int g_log2) {
  using LT = Lanes<T>;
  constexpr int V = LT::V;
  __shared__ float s_red[kThreads * V];  // [group][dtile] == [tid][V]
  __shared__ float s_cnt[kThreads];      // [group]

  const int64_t chunk = blockIdx.x;
  const int code = chunk_code[chunk];
  if (code < 0) return;  // block-uniform
  const int64_t s0 = starts[code];
  const int64_t s1 = starts[code + 1];
  const int64_t nch = num_chunks(s1 - s0);
  const int64_t j_chunk = chunk - (s0 / kSegRows + code);
  const int64_t p0 = s0 + j_chunk * kSegRows;
  const int64_t p1 = p0 + kSegRows < s1 ? p0 + kSegRows : s1;

  const int dtile_log2 = g_log2 + LT::kLogV;
  const int dtile = 1 << dtile_log2;
  const int tid = static_cast<int>(threadIdx.x);
  const int gl = tid & ((1 << g_log2) - 1);
  const int gi = tid >> g_log2;
  const int ngroups = kThreads >> g_log2;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) << dtile_log2;
  const int64_t c = col0 + static_cast<int64_t>(gl) * V;
  const bool lane_has_cols = c < a.d;

  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.f;
  float cnt = 0.f;
  for (int64_t base = p0 + gi; base < p1; base += static_cast<int64_t>(kUnroll) * ngroups) {
    bool ok[kUnroll];
    float v[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = base + static_cast<int64_t>(u) * ngroups;
      int64_t prow = 0;
      ok[u] = p < p1;
      const int64_t row = ok[u] ? order[p] : 0;
      ok[u] = ok[u] && row_kept<kPrev>(a, row, prow);
      if (ok[u] && lane_has_cols) {
        load_vec<T, kVec, kPrev>(a, row, prow, c, v[u]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[u][j] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // in increasing position order
      if (!ok[u]) continue;
      cnt += 1.f;
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = __fadd_rn(acc[j], v[u][j]);
    }
  }

  // Fixed-order combination of the groups: tid == gi * G + gl, so group gi's column
  // cc = gl * V + j sits at s_red[gi * dtile + cc] == s_red[tid * V + j].
#pragma unroll
  for (int j = 0; j < V; ++j) s_red[tid * V + j] = acc[j];
  if (gl == 0) s_cnt[gi] = cnt;
  __syncthreads();

  const bool direct = nch == 1;
  const int64_t slot = 2 * (s0 / kSegRows) + j_chunk;
  if (tid < dtile) {
    const int64_t col = col0 + tid;
    if (col < a.d) {
      float s = 0.f;
      for (int g = 0; g < ngroups; ++g) s = __fadd_rn(s, s_red[g * dtile + tid]);
      if (direct) {
        a.sums[static_cast<int64_t>(code) * a.d + col] = s;
      } else {
        partial[slot * a.d + col] = s;
      }
    }
  }
  if (tid == 0 && blockIdx.y == 0) {
    float s = 0.f;
    for (int g = 0; g < ngroups; ++g) s = __fadd_rn(s, s_cnt[g]);
    if (direct) {
      a.counts[code] = s;
    } else {
      partial_count[slot] = s;
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    ema_finalize_kernel(const int64_t* __restrict__ starts, const float* __restrict__ partial,
                        const float* __restrict__ partial_count, float* __restrict__ counts,
                        float* __restrict__ sums, int64_t d) {
  const int64_t code = blockIdx.x;
  const int64_t s0 = starts[code];
  const int64_t nch = num_chunks(starts[code + 1] - s0);
  if (nch == 1) return;  // written by ema_partial_kernel
  const int64_t slot0 = 2 * (s0 / kSegRows);
  for (int64_t col = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x; col < d;
       col += static_cast<int64_t>(gridDim.y) * kThreads) {
    float s = 0.f;
    for (int64_t j = 0; j < nch; ++j) s = __fadd_rn(s, partial[(slot0 + j) * d + col]);
    sums[code * d + col] = s;
  }
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    float s = 0.f;
    for (int64_t j = 0; j < nch; ++j) s = __fadd_rn(s, partial_count[slot0 + j]);
    counts[code] = s;
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

struct DeviceInfo {
  int sms = 1;
  int smem_per_sm = 0;
  int smem_optin = 0;
};

cudaError_t device_info(DeviceInfo& info) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&info.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  }
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  }
  return err;
}

EmaArgs make_args(const void* x, const int32_t* codes, const uint8_t* mask, const int32_t* prev_codes,
                  const void* prev_codebook, int64_t prev_k, float* counts, float* sums, int64_t n,
                  int64_t d, int64_t k) {
  EmaArgs a{};
  a.x = x;
  a.codes = codes;
  a.mask = mask;
  a.prev_codes = prev_codes;
  a.prev_cb = prev_codebook;
  a.prev_k = prev_k;
  a.counts = counts;
  a.sums = sums;
  a.n = n;
  a.d = d;
  a.k = static_cast<int>(k);
  return a;
}

template <typename T>
bool use_vec(const EmaArgs& a) {
  constexpr int V = Lanes<T>::V;
  return a.d > 0 && a.d % V == 0 && tile::aligned16(a.x) &&
         (a.prev_codes == nullptr || tile::aligned16(a.prev_cb));
}

using AtomicKernel = void (*)(const EmaArgs, int, int64_t);

template <typename T, bool kVec, bool kPrev>
AtomicKernel atomic_kernel(bool smem) {
  return smem ? ema_atomic_kernel<T, kVec, kPrev, true> : ema_atomic_kernel<T, kVec, kPrev, false>;
}

template <typename T>
cudaError_t launch_atomic(const EmaArgs& a, DType dtype, cudaStream_t stream) {
  DeviceInfo info;
  cudaError_t err = device_info(info);
  if (err != cudaSuccess) return err;
  const bool inputs16 = tile::aligned16(a.x) && (a.prev_codes == nullptr || tile::aligned16(a.prev_cb));
  const EmaAtomicPlan plan = ema_atomic_plan(a.d, a.k, dtype, info.smem_per_sm, info.smem_optin, inputs16,
                                             tile::aligned16(a.sums));
  if (plan.col_tiles > kMaxGridY) return cudaErrorInvalidValue;
  const bool smem = plan.smem_table;
  const int g = plan.group_log2;
  const int64_t tiles = plan.col_tiles;
  const size_t smem_bytes = static_cast<size_t>(plan.table_bytes);
  const bool vec = plan.vec;
  const bool prev = a.prev_codes != nullptr;
  AtomicKernel kernel = vec ? (prev ? atomic_kernel<T, true, true>(smem) : atomic_kernel<T, true, false>(smem))
                            : (prev ? atomic_kernel<T, false, true>(smem) : atomic_kernel<T, false, false>(smem));
  if (smem_bytes > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem_bytes));
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      return err;
    }
  }
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem_bytes);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return err;
  }
  if (per_sm < 1) per_sm = 1;
  // About one wave of blocks: each block streams a long row range through its table.
  const int64_t target = static_cast<int64_t>(info.sms) * per_sm;
  int64_t row_blocks = (target + tiles - 1) / tiles;
  if (row_blocks < 1) row_blocks = 1;
  const int64_t rows_per_block = (a.n + row_blocks - 1) / row_blocks;
  row_blocks = (a.n + rows_per_block - 1) / rows_per_block;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(tiles));
  kernel<<<grid, kThreads, smem_bytes, stream>>>(a, g, rows_per_block);
  return cudaSuccess;
}

using PartialKernel = void (*)(const EmaArgs, const int64_t*, const int64_t*, const int32_t*, float*,
                               float*, int);

template <typename T>
cudaError_t launch_sorted(const EmaArgs& a, const int32_t* sorted_codes, const int64_t* order,
                          int64_t* starts, int32_t* chunk_code, float* partial, float* partial_count,
                          cudaStream_t stream) {
  using LT = Lanes<T>;
  const int g = ema_group_log2(a.d, LT::kLogV);
  const int64_t tiles = ema_col_tiles(a.d, g + LT::kLogV);
  const int64_t chunks = ema_stats_chunk_capacity(a.n, a.k);
  if (tiles > kMaxGridY || chunks > 0x7fffffff) return cudaErrorInvalidValue;

  cudaError_t err = cudaMemsetAsync(chunk_code, 0xff, static_cast<size_t>(chunks) * sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  const int64_t bound_blocks = (static_cast<int64_t>(a.k) + 1 + kThreads - 1) / kThreads;
  ema_bounds_kernel<<<static_cast<unsigned>(bound_blocks), kThreads, 0, stream>>>(sorted_codes, a.n, a.k,
                                                                                  starts, chunk_code);
  const bool vec = use_vec<T>(a);
  const bool prev = a.prev_codes != nullptr;
  PartialKernel kernel = vec ? (prev ? ema_partial_kernel<T, true, true> : ema_partial_kernel<T, true, false>)
                             : (prev ? ema_partial_kernel<T, false, true> : ema_partial_kernel<T, false, false>);
  kernel<<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(tiles)), kThreads, 0, stream>>>(
      a, order, starts, chunk_code, partial, partial_count, g);
  int64_t fy = (a.d + kThreads - 1) / kThreads;
  if (fy < 1) fy = 1;
  if (fy > kMaxGridY) fy = kMaxGridY;
  ema_finalize_kernel<<<dim3(static_cast<unsigned>(a.k), static_cast<unsigned>(fy)), kThreads, 0, stream>>>(
      starts, partial, partial_count, a.counts, a.sums, a.d);
  return cudaSuccess;
}

bool valid_sizes(int64_t n, int64_t d, int64_t k) {
  return n >= 0 && d >= 0 && k >= 1 && k <= 0x7fffffff;
}

}  // namespace

cudaError_t launch_ema_stats_atomic(const void* x, const int32_t* codes, const uint8_t* mask,
                                    const int32_t* prev_codes, const void* prev_codebook,
                                    int64_t prev_k, float* counts, float* sums, int64_t n,
                                    int64_t d, int64_t num_codes, DType dtype,
                                    cudaStream_t stream) {
  if (!valid_sizes(n, d, num_codes)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;  // outputs are the caller's zeros
  const EmaArgs a = make_args(x, codes, mask, prev_codes, prev_codebook, prev_k, counts, sums, n, d, num_codes);
  switch (dtype) {
    case DType::kFloat32:
      return launch_atomic<float>(a, dtype, stream);
    case DType::kBFloat16:
      return launch_atomic<__nv_bfloat16>(a, dtype, stream);
    case DType::kFloat16:
      return launch_atomic<__half>(a, dtype, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t ema_stats_chunk_capacity(int64_t n, int64_t num_codes) { return n / kSegRows + num_codes + 1; }

int64_t ema_stats_partial_capacity(int64_t n) { return 2 * (n / kSegRows) + 2; }

cudaError_t launch_ema_stats_sorted(const void* x, const int32_t* sorted_codes, const int64_t* order,
                                    const uint8_t* mask, const int32_t* prev_codes,
                                    const void* prev_codebook, int64_t prev_k, int64_t* starts,
                                    int32_t* chunk_code, float* partial, float* partial_count,
                                    float* counts, float* sums, int64_t n, int64_t d,
                                    int64_t num_codes, DType dtype, cudaStream_t stream) {
  if (!valid_sizes(n, d, num_codes)) return cudaErrorInvalidValue;
  if (n == 0) {
    cudaError_t err = cudaMemsetAsync(counts, 0, static_cast<size_t>(num_codes) * sizeof(float), stream);
    if (err == cudaSuccess && d > 0) {
      err = cudaMemsetAsync(sums, 0, static_cast<size_t>(num_codes) * static_cast<size_t>(d) * sizeof(float), stream);
    }
    return err;
  }
  const EmaArgs a = make_args(x, nullptr, mask, prev_codes, prev_codebook, prev_k, counts, sums, n, d, num_codes);
  switch (dtype) {
    case DType::kFloat32:
      return launch_sorted<float>(a, sorted_codes, order, starts, chunk_code, partial, partial_count, stream);
    case DType::kBFloat16:
      return launch_sorted<__nv_bfloat16>(a, sorted_codes, order, starts, chunk_code, partial, partial_count,
                                          stream);
    case DType::kFloat16:
      return launch_sorted<__half>(a, sorted_codes, order, starts, chunk_code, partial, partial_count, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vqdna::cuda
