// Device code shared by the CUDA codebook searches (csrc/ops/{lookup,quantize,hrq_quantize}/cuda.cu; ema_stats/cuda.cu uses its element helpers): the 128-row x
// whole-codebook tile search of docs/design.md §2.1 with a running (min, index) per row, for bf16/fp16
// (tensor-core mma.sync, fp32 accumulation) and float32 (exact FMA, no TF32).
//
// Work decomposition (both searches): one thread block owns BM = 128 rows and sweeps the whole
// codebook in K tiles of BN = 128 codes, in increasing k order; each K tile sweeps D in chunks of BK
// through a STAGES-deep shared-memory ring. The (kt, dc) iteration space is flattened into one
// pipelined loop, so prefetching runs across K-tile boundaries without a bubble. After the last D
// chunk of a K tile the fp32 accumulators are turned into distances (sqnorm[k] - 2 acc) and folded
// into per-thread running (min, index) pairs for the rows the thread owns, visiting that thread's
// codes in increasing k with a strict `<`: so NaN never wins, and among equal values the first
// (smallest) k is kept. At the end the per-thread pairs of a row are combined with a lexicographic
// (value, index) min (shuffles within a warp, then shared memory across warps), which again yields
// the smallest k among equal minima: the result is exactly argmin over k with NaN treated as +inf
// and ties to the smallest index. Initial pairs are (+inf, 0), so a row whose distances are all
// NaN/+inf gets code 0.
//
// The A operand (the 128 rows being searched) comes from an "A source" object, so the same
// pipeline serves lookup (rows of z, copied with cp.async) and HRQ (rows of
// H_l = 2 Z_l - C_{l-1}[M_{l-1}], formed on chip from Z_l and the gathered previous codes, never
// written to global memory). An A source provides
//   static constexpr bool kDeferred;
//   void issue(tile, col0, tid);    // start filling the A tile of D chunk col0 (all 128 rows)
//   void complete(tile, tid);       // kDeferred only: finish it (registers -> shared memory)
// A deferred source loads global memory into registers in issue() and stores to the ring slot in
// complete(), which the pipeline calls at the END of the iteration that issued it (after that
// iteration's MMAs), so the global latency is hidden behind the math exactly like cp.async. The
// slot written is the one consumed two iterations later and last read one iteration earlier (all
// threads have passed the __syncthreads at the top of the issuing iteration), so it is free.
//
// Tails: rows >= N, codes >= K and columns >= D are zero-filled in shared memory; rows >= N are
// never written by the callers, codes >= K are masked out of the running min, and zero columns add 0
// to every dot product. All global offsets are 64-bit (N * D exceeds 2^31).
//
// bf16 / fp16 search: 8 warps as 2 (M) x 4 (N), warp tile 64 x 32, mma.sync.m16n8k16 with fp32
//   accumulators (4 x 4 fragments = 64 floats per thread), operands fed by ldmatrix.x4 from row-major
//   [rows][BK + 8] tiles (the +8 element pad makes the 8 row addresses of every ldmatrix phase hit
//   distinct banks). Codebook tiles are loaded with 16-byte cp.async when the codebook is 16-byte
//   aligned and D % 8 == 0 ("kVec"); otherwise with bounds-checked 2-byte loads (any D).
// float32 search: 16 x 16 threads, each an 8 x 8 register micro-tile of exact fp32 FMAs (no TF32),
//   tiles stored k-major ([BK][BM + 4]) so a thread reads its 8 rows / 8 codes with 4 float4 loads;
//   codebook tiles loaded with 4-byte cp.async (legal for any float-aligned pointer and any D).
//
// Everything here is inline (templates / __forceinline__), so several translation units may include
// this header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace vqdna::cuda::tile {

constexpr int kThreads = 256;
constexpr int kBM = 128;       // rows per block
constexpr int kBN = 128;       // codes per K tile
constexpr int kStages = 3;     // shared-memory ring depth
constexpr int kMaxK = 1 << 30; // keeps every code index (and kt * kBN + 127) in int32

static_assert(kBM == 128 && kBN == 128 && kThreads == 256, "index math below assumes these");

// ------------------------------------------------------------------------------------------------
// Small PTX / math helpers
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared (L2 only). Both addresses must be 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src)
               : "memory");
}

// 4-byte async copy global -> shared. Both addresses must be 4-byte aligned.
__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row_ptr))
               : "memory");
}

// ------------------------------------------------------------------------------------------------
// Element types. Storage of bf16 / fp16 is uint16_t bits; conversions round to nearest even.
// ------------------------------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Storage = float;
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <>
struct Elem<__nv_bfloat16> {
  using Storage = uint16_t;
  static __device__ __forceinline__ float to_float(uint16_t v) {
    return __uint_as_float(static_cast<uint32_t>(v) << 16);  // exact
  }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

template <>
struct Elem<__half> {
  using Storage = uint16_t;
  static __device__ __forceinline__ float to_float(uint16_t v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};

// A 16-byte vector of V elements of T <-> V floats (element j at the lower address first).
template <typename T>
struct Vec16 {
  using E = Elem<T>;
  using S = typename E::Storage;
  static constexpr int V = 16 / static_cast<int>(sizeof(S));
  static __device__ __forceinline__ void unpack(const uint4& q, float (&v)[V]) {
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
    if constexpr (std::is_same_v<T, float>) {
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = __uint_as_float(w[j]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        v[2 * j] = E::to_float(static_cast<uint16_t>(w[j] & 0xffffu));
        v[2 * j + 1] = E::to_float(static_cast<uint16_t>(w[j] >> 16));
      }
    }
  }
  static __device__ __forceinline__ uint4 pack(const float (&v)[V]) {
    uint32_t w[4];
    if constexpr (std::is_same_v<T, float>) {
#pragma unroll
      for (int j = 0; j < 4; ++j) w[j] = __float_as_uint(v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        w[j] = static_cast<uint32_t>(E::from_float(v[2 * j])) |
               (static_cast<uint32_t>(E::from_float(v[2 * j + 1])) << 16);
      }
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

// HRQ's residual element, exactly as the reference's `2.0 * z - prev_embedding` evaluated in the
// dtype of z: torch rounds `2.0 * z` to the dtype (this only matters when it overflows, e.g. fp16
// |z| >= 32768 -> inf), then subtracts in float32 and rounds once more. No FMA contraction.
template <typename T>
__device__ __forceinline__ typename Elem<T>::Storage residual(typename Elem<T>::Storage z,
                                                              typename Elem<T>::Storage e) {
  using E = Elem<T>;
  const float two_z = E::to_float(E::from_float(__fmul_rn(2.f, E::to_float(z))));
  return E::from_float(__fsub_rn(two_z, E::to_float(e)));
}

// Per-element-type pieces of the tensor-core search.
template <typename T>
struct MmaTraits;

template <>
struct MmaTraits<__nv_bfloat16> {
  // D = A(16x16, row) * B(16x8, col) + D, fp32 accumulate.
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // Sum of squares (fp32) of the two bf16 packed in w (low half = lower address).
  static __device__ __forceinline__ float sumsq2(uint32_t w) {
    const float lo = __uint_as_float(w << 16);           // exact bf16 -> fp32
    const float hi = __uint_as_float(w & 0xffff0000u);
    return fmaf(hi, hi, lo * lo);
  }
};

template <>
struct MmaTraits<__half> {
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float sumsq2(uint32_t w) {
    const float lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    const float hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
    return fmaf(hi, hi, lo * lo);
  }
};

// Lexicographic (value, index) min: (v, i) <- (ov, oi) when ov < v, or ov == v and oi < i.
// Values reaching this are never NaN (running minima start at +inf and only take non-NaN values).
__device__ __forceinline__ void lex_min(float& v, int& i, float ov, int oi) {
  if (ov < v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The end of a row's search in every single-codebook kernel (lookup, quantize): code and distance
// ||z||^2 + min_k (||e_k||^2 - 2 z.e_k), clamped with `x < 0 ? 0 : x` (NaN stays NaN). Returns the
// distance written.
__device__ __forceinline__ float write_code_dist(int32_t* codes, float* dist, int64_t row, float best,
                                                 int idx, float zsq) {
  const float x = best + zsq;
  const float v = x < 0.f ? 0.f : x;
  dist[row] = v;
  codes[row] = idx;
  return v;
}

// Host: launches `kernel` on `grid` blocks of kThreads with `smem_bytes` of dynamic shared memory.
// > 48 KiB needs the opt-in (per kernel, cheap to repeat). Returns the attribute call's error (and
// clears it), else cudaSuccess; launch errors are left for the caller's cudaGetLastError.
template <typename Kernel, typename... Args>
cudaError_t launch_with_smem(Kernel kernel, size_t smem_bytes, dim3 grid, cudaStream_t stream,
                             Args... args) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem_bytes));
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // do not leave it for an unrelated later check
    return err;
  }
  kernel<<<grid, kThreads, smem_bytes, stream>>>(args...);
  return cudaSuccess;
}

// ================================================================================================
// bf16 / fp16: tensor-core search
// ================================================================================================

namespace mma_cfg {
constexpr int BK = 32;            // D chunk (elements) per stage = 2 mma k-steps
constexpr int LDS = BK + 8;       // smem row stride (elements): 80 bytes, 16-byte multiple
constexpr int kTileElems = kBM * LDS;  // one operand tile (kBM == kBN)
constexpr int kWarpsN = 4;        // warp grid 2 (M) x 4 (N)
constexpr int WM = 64, WN = 32;   // warp tile
constexpr int MF = WM / 16;       // m16 fragments per warp (4)
constexpr int NF = WN / 8;        // n8 fragments per warp (4)
// Shared memory of one search: [A ring | B ring | best | idx | zsq], 16-byte aligned pieces.
constexpr size_t kRingBytes = size_t(kStages) * kTileElems * 2;
constexpr size_t kOffA = 0;
constexpr size_t kOffB = kOffA + kRingBytes;
constexpr size_t kOffBest = kOffB + kRingBytes;                 // float [kWarpsN][kBM]
constexpr size_t kOffIdx = kOffBest + size_t(kWarpsN) * kBM * 4; // int   [kWarpsN][kBM]
constexpr size_t kOffZsq = kOffIdx + size_t(kWarpsN) * kBM * 4;  // float [kBM]
constexpr size_t kSmemBytes = kOffZsq + size_t(kBM) * 4;
static_assert(kBM == kBN, "A and B tiles share kTileElems");
static_assert(2 * WM == kBM && kWarpsN * WN == kBN, "warp grid must cover the block tile");
static_assert((LDS * 2) % 16 == 0, "cp.async / ldmatrix rows must stay 16-byte aligned");
static_assert(kRingBytes % 16 == 0 && kSmemBytes % 16 == 0, "pieces stay 16-byte aligned");
}  // namespace mma_cfg

// Loads rows [row0, row0 + 128) x cols [col0, col0 + BK) of a row-major [nrows, d] matrix of
// 2-byte elements with row stride ld (elements) into a [128][LDS] smem tile, zero-filling
// out-of-range rows/cols.
// kVec: 16-byte cp.async (requires a 16-byte aligned base and d % 8 == 0 and ld % 8 == 0, so every
// 8-element chunk is either fully inside or fully outside [0, d) and 16-byte aligned); otherwise
// synchronous bounds-checked 2-byte loads.
template <bool kVec>
__device__ __forceinline__ void load_tile_b16(uint16_t* __restrict__ tile,
                                              const uint16_t* __restrict__ src, int64_t nrows,
                                              int64_t row0, int64_t d, int64_t ld, int64_t col0, int tid) {
  using namespace mma_cfg;
  if constexpr (kVec) {
    // 128 rows x 4 chunks of 8 elements = 512 chunks, 2 per thread; 4 consecutive threads read
    // one row's 64 contiguous bytes.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kThreads;
      const int r = c >> 2;
      const int cc = (c & 3) * 8;
      const int64_t grow = row0 + r;
      const int64_t gcol = col0 + cc;
      uint16_t* dst = tile + r * LDS + cc;
      if (grow < nrows && gcol < d) {
        cp_async_16(dst, src + grow * ld + gcol);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  } else {
    // 128 rows x 32 cols, 16 elements per thread: thread owns column tid % 32 of rows
    // tid / 32 + 8 i, so a warp reads 32 contiguous elements of one row.
    const int cc = tid & 31;
    const int rb = tid >> 5;
    const int64_t gcol = col0 + cc;
    const bool col_ok = gcol < d;
    uint16_t v[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int64_t grow = row0 + rb + 8 * i;
      v[i] = (col_ok && grow < nrows) ? src[grow * ld + gcol] : static_cast<uint16_t>(0);
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) tile[(rb + 8 * i) * LDS + cc] = v[i];
  }
}

// A source: rows [row0, row0 + 128) of z (lookup; HRQ level 0). Same loads as the codebook tiles.
template <bool kVec>
struct PlainTileB16 {
  static constexpr bool kDeferred = false;
  const uint16_t* z;
  int64_t n, row0, d;
  __device__ __forceinline__ void issue(uint16_t* tile, int64_t col0, int tid) {
    load_tile_b16<kVec>(tile, z, n, row0, d, d, col0, tid);
  }
  __device__ __forceinline__ void complete(uint16_t*, int) {}
};

// A source: the tile's `rows` (<= 128) rows of one head of z [n, C, d] (per-head lookup), from `z` (its
// first row's head vector) with row stride ld = C * d (< 2^31). The tile's own base pointer and 32-bit
// counts keep it to fewer live registers than PlainTileB16 (the non-vector loads spilled with a 64-bit
// stride beside n, row0 and d).
template <bool kVec>
struct StridedTileB16 {
  static constexpr bool kDeferred = false;
  const uint16_t* z;
  int rows, ld, d;
  __device__ __forceinline__ void issue(uint16_t* tile, int64_t col0, int tid) {
    load_tile_b16<kVec>(tile, z, rows, 0, d, ld, col0, tid);
  }
  __device__ __forceinline__ void complete(uint16_t*, int) {}
};

// A source: rows of H = T(2 z - e[prev[r]]) (HRQ level >= 1). `prev` (shared memory, 128 entries)
// holds the codebook row of each tile row's previous-level code; those are always valid rows (also
// for tile rows >= n, which are never loaded anyway).
// kVec (z and e 16-byte aligned, d % 8 == 0): deferred; each thread owns the same two 8-element
// chunks as load_tile_b16<true> and keeps them (z and e: 4 x uint4) in registers until complete().
// Otherwise: immediate bounds-checked 2-byte loads (same layout as load_tile_b16<false>).
template <typename T, bool kVec>
struct ResidualTileB16;

template <typename T>
struct ResidualTileB16<T, true> {
  static constexpr bool kDeferred = true;
  const uint16_t* z;
  const uint16_t* e;
  const int64_t* prev;  // shared memory [kBM]
  int64_t n, row0, d;
  uint4 zq[2], eq[2];

  __device__ __forceinline__ void issue(uint16_t*, int64_t col0, int tid) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kThreads;
      const int r = c >> 2;
      const int64_t grow = row0 + r;
      const int64_t gcol = col0 + (c & 3) * 8;
      if (grow < n && gcol < d) {
        zq[i] = __ldg(reinterpret_cast<const uint4*>(z + grow * d + gcol));
        eq[i] = __ldg(reinterpret_cast<const uint4*>(e + prev[r] * d + gcol));
      } else {
        zq[i] = make_uint4(0u, 0u, 0u, 0u);  // residual(0, 0) = +0: the zero fill
        eq[i] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  }

  static __device__ __forceinline__ uint32_t residual2(uint32_t zw, uint32_t ew) {
    const uint32_t lo = residual<T>(static_cast<uint16_t>(zw & 0xffffu), static_cast<uint16_t>(ew & 0xffffu));
    const uint32_t hi = residual<T>(static_cast<uint16_t>(zw >> 16), static_cast<uint16_t>(ew >> 16));
    return lo | (hi << 16);
  }

  __device__ __forceinline__ void complete(uint16_t* tile, int tid) {
    using namespace mma_cfg;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kThreads;
      const int r = c >> 2;
      const int cc = (c & 3) * 8;
      uint4 h;
      h.x = residual2(zq[i].x, eq[i].x);
      h.y = residual2(zq[i].y, eq[i].y);
      h.z = residual2(zq[i].z, eq[i].z);
      h.w = residual2(zq[i].w, eq[i].w);
      *reinterpret_cast<uint4*>(tile + r * LDS + cc) = h;
    }
  }
};

template <typename T>
struct ResidualTileB16<T, false> {
  static constexpr bool kDeferred = false;
  const uint16_t* z;
  const uint16_t* e;
  const int64_t* prev;  // shared memory [kBM]
  int64_t n, row0, d;

  __device__ __forceinline__ void issue(uint16_t* tile, int64_t col0, int tid) {
    using namespace mma_cfg;
    const int cc = tid & 31;
    const int rb = tid >> 5;
    const int64_t gcol = col0 + cc;
    const bool col_ok = gcol < d;
    uint16_t zv[16], ev[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int r = rb + 8 * i;
      const int64_t grow = row0 + r;
      const bool ok = col_ok && grow < n;
      zv[i] = ok ? z[grow * d + gcol] : static_cast<uint16_t>(0);
      ev[i] = ok ? e[prev[r] * d + gcol] : static_cast<uint16_t>(0);
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) tile[(rb + 8 * i) * LDS + cc] = residual<T>(zv[i], ev[i]);
  }
  __device__ __forceinline__ void complete(uint16_t*, int) {}
};

// The tensor-core search of one 128-row tile against a codebook cb [k, d] (2-byte elements) with
// sqnorm [k]. `smem` is the block's mma_cfg::kSmemBytes scratch (16-byte aligned). On return, for
// threads tid < 128: out_best / out_idx = the (min, argmin) of tile row tid and, when kZsq,
// out_zsq = ||row||^2 (fp32, from the staged A tiles). All threads must call it (it synchronises the
// block); on entry no thread may still be reading `smem` from an earlier search, and the A source's
// inputs in shared memory (if any) must be visible (a __syncthreads after writing them).
// On return every thread has finished reading the rings (only the best / idx / zsq arrays are read
// after the last __syncthreads inside), so a following search may start at once; the best / idx /
// zsq arrays are next written after at least one more __syncthreads of that search.
template <typename T, bool kVec, bool kZsq, typename ASource>
__device__ __forceinline__ void mma_tile_search(ASource& asrc, const uint16_t* __restrict__ cb,
                                                const float* __restrict__ sqnorm, int k, int64_t d,
                                                unsigned char* smem, float& out_best, int& out_idx,
                                                float& out_zsq) {
  using namespace mma_cfg;
  uint16_t* const sA = reinterpret_cast<uint16_t*>(smem + kOffA);  // [kStages][kBM][LDS]
  uint16_t* const sB = reinterpret_cast<uint16_t*>(smem + kOffB);  // [kStages][kBN][LDS]
  float* const s_best = reinterpret_cast<float*>(smem + kOffBest); // [kWarpsN][kBM]
  int* const s_idx = reinterpret_cast<int*>(smem + kOffIdx);       // [kWarpsN][kBM]
  float* const s_zsq = reinterpret_cast<float*>(smem + kOffZsq);   // [kBM]

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp / kWarpsN;  // 0..1: rows wm*64 .. +64
  const int wn = warp % kWarpsN;  // 0..3: codes wn*32 .. +32 of each K tile

  const int num_kt = (k + kBN - 1) / kBN;
  const int64_t num_dc = d > 0 ? (d + BK - 1) / BK : 1;  // d == 0: one all-zero chunk
  const int64_t total = static_cast<int64_t>(num_kt) * num_dc;

  float acc[MF][NF][4];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int nf = 0; nf < NF; ++nf)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mf][nf][e] = 0.f;

  // Running (min, idx) for this thread's 8 rows: wm*64 + mf*16 + h*8 + lane/4.
  float best[MF][2];
  int best_i[MF][2];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      best[mf][h] = pos_inf();
      best_i[mf][h] = 0;
    }
  float zsq = 0.f;  // partial ||z||^2 of row tid/2, columns (tid&1)*16 .. +16 of each chunk

  // Producer state: next (kt, dc) to load and its ring slot.
  int ld_kt = 0;
  int64_t ld_dc = 0;
  auto load_next = [&](int slot) {
    const int64_t col0 = ld_dc * BK;
    asrc.issue(sA + slot * kTileElems, col0, tid);
    load_tile_b16<kVec>(sB + slot * kTileElems, cb, static_cast<int64_t>(k),
                        static_cast<int64_t>(ld_kt) * kBN, d, d, col0, tid);
    if (++ld_dc == num_dc) {
      ld_dc = 0;
      ++ld_kt;
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total) {
      load_next(s);
      if constexpr (ASource::kDeferred) asrc.complete(sA + s * kTileElems, tid);
    }
    cp_async_commit();  // always commit (possibly empty) so group counting stays uniform
  }

  int c_kt = 0;       // consumer K tile
  int64_t c_dc = 0;   // consumer D chunk
  int slot = 0;       // ring slot of iteration t
  int ld_slot = kStages - 1;
  for (int64_t t = 0; t < total; ++t) {
    cp_async_wait<kStages - 2>();  // the group of iteration t has landed (this thread's copies)
    __syncthreads();               // ... everyone's; and slot ld_slot (read at t-1) is free
    const bool issued = t + (kStages - 1) < total;
    const int issued_slot = ld_slot;
    if (issued) load_next(ld_slot);
    cp_async_commit();
    ld_slot = (ld_slot + 1 == kStages) ? 0 : ld_slot + 1;

    const uint16_t* const a_tile = sA + slot * kTileElems;
    const uint16_t* const b_tile = sB + slot * kTileElems;

    if constexpr (kZsq) {
      if (c_kt == 0) {  // first K tile: accumulate ||z||^2 from the staged z chunk
        const uint16_t* p = a_tile + (tid >> 1) * LDS + (tid & 1) * 16;
        const uint4 q0 = *reinterpret_cast<const uint4*>(p);
        const uint4 q1 = *reinterpret_cast<const uint4*>(p + 8);
        zsq += MmaTraits<T>::sumsq2(q0.x) + MmaTraits<T>::sumsq2(q0.y) + MmaTraits<T>::sumsq2(q0.z) +
               MmaTraits<T>::sumsq2(q0.w);
        zsq += MmaTraits<T>::sumsq2(q1.x) + MmaTraits<T>::sumsq2(q1.y) + MmaTraits<T>::sumsq2(q1.z) +
               MmaTraits<T>::sumsq2(q1.w);
      }
    }

#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      // A fragments: matrix j = lane/8 of the x4 covers rows +8*(j&1), cols +8*(j>>1)
      // -> registers a0..a3 = (r0-7,k0-7), (r8-15,k0-7), (r0-7,k8-15), (r8-15,k8-15).
      uint32_t a[MF][4];
#pragma unroll
      for (int mf = 0; mf < MF; ++mf) {
        const int r = wm * WM + mf * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int c = ks * 16 + (lane >> 4) * 8;
        ldmatrix_x4(a[mf], a_tile + r * LDS + c);
      }
      // B fragments (codebook tile is [n][k] row-major == the "col" B operand): matrix j covers
      // codes +8*(j>>1), cols +8*(j&1) -> b[2p][0], b[2p][1], b[2p+1][0], b[2p+1][1].
      uint32_t b[NF][2];
#pragma unroll
      for (int p = 0; p < NF / 2; ++p) {
        const int r = wn * WN + p * 16 + (lane & 7) + (lane >> 4) * 8;
        const int c = ks * 16 + ((lane >> 3) & 1) * 8;
        uint32_t q[4];
        ldmatrix_x4(q, b_tile + r * LDS + c);
        b[2 * p][0] = q[0];
        b[2 * p][1] = q[1];
        b[2 * p + 1][0] = q[2];
        b[2 * p + 1][1] = q[3];
      }
#pragma unroll
      for (int mf = 0; mf < MF; ++mf)
#pragma unroll
        for (int nf = 0; nf < NF; ++nf) MmaTraits<T>::mma(acc[mf][nf], a[mf], b[nf][0], b[nf][1]);
    }

    if (++c_dc == num_dc) {
      // Epilogue of K tile c_kt: acc[mf][nf][h*2 + j] = <z_row, e_col> with
      //   row = wm*64 + mf*16 + h*8 + lane/4,  col = c_kt*128 + wn*32 + nf*8 + (lane%4)*2 + j.
      // For each row the (nf, j) loop visits this thread's codes in increasing k.
      const int col_base = c_kt * kBN + wn * WN + (lane & 3) * 2;
      float sq[NF][2];
      bool ok[NF][2];
#pragma unroll
      for (int nf = 0; nf < NF; ++nf)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int col = col_base + nf * 8 + j;
          ok[nf][j] = col < k;
          sq[nf][j] = ok[nf][j] ? __ldg(sqnorm + col) : 0.f;
        }
#pragma unroll
      for (int nf = 0; nf < NF; ++nf)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int mf = 0; mf < MF; ++mf)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const float v = fmaf(-2.f, acc[mf][nf][h * 2 + j], sq[nf][j]);
              if (ok[nf][j] && v < best[mf][h]) {  // strict: NaN and later ties never win
                best[mf][h] = v;
                best_i[mf][h] = col_base + nf * 8 + j;
              }
              acc[mf][nf][h * 2 + j] = 0.f;
            }
      c_dc = 0;
      ++c_kt;
    }

    // Deferred A source: registers -> ring slot issued_slot (consumed at iteration t + 2).
    if constexpr (ASource::kDeferred) {
      if (issued) asrc.complete(sA + issued_slot * kTileElems, tid);
    }
    slot = (slot + 1 == kStages) ? 0 : slot + 1;
  }
  cp_async_wait<0>();  // only empty groups can remain; drain them anyway

  if constexpr (kZsq) {
    // ||z||^2: lanes 2r and 2r+1 (same warp) hold the two halves of row r.
    zsq += __shfl_xor_sync(0xffffffffu, zsq, 1);
    if ((tid & 1) == 0) s_zsq[tid >> 1] = zsq;
  }

  // Combine the 4 lanes of a quad (same rows, interleaved codes), then the 4 warp columns.
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v = best[mf][h];
      int i = best_i[mf][h];
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, off);
        const int oi = __shfl_xor_sync(0xffffffffu, i, off);
        lex_min(v, i, ov, oi);
      }
      if ((lane & 3) == 0) {
        const int r = wm * WM + mf * 16 + h * 8 + (lane >> 2);
        s_best[wn * kBM + r] = v;
        s_idx[wn * kBM + r] = i;
      }
    }
  __syncthreads();

  if (tid < kBM) {
    float v = s_best[tid];
    int i = s_idx[tid];
#pragma unroll
    for (int w = 1; w < kWarpsN; ++w) lex_min(v, i, s_best[w * kBM + tid], s_idx[w * kBM + tid]);
    out_best = v;
    out_idx = i;
    out_zsq = kZsq ? s_zsq[tid] : 0.f;
  }
}

// ================================================================================================
// float32: exact FMA search
// ================================================================================================

namespace f32_cfg {
constexpr int BK = 16;          // D chunk per stage
constexpr int LDS = kBM + 4;    // k-major tile row stride (floats): 528 bytes, 16-byte multiple
constexpr int kTileElems = BK * LDS;
// Shared memory of one search: [A ring | B ring | best | idx].
constexpr size_t kRingBytes = size_t(kStages) * kTileElems * 4;
constexpr size_t kOffA = 0;
constexpr size_t kOffB = kOffA + kRingBytes;
constexpr size_t kOffBest = kOffB + kRingBytes;        // float [kBM]
constexpr size_t kOffIdx = kOffBest + size_t(kBM) * 4;  // int   [kBM]
constexpr size_t kSmemBytes = kOffIdx + size_t(kBM) * 4;
static_assert(kBM == kBN, "A and B tiles share kTileElems");
static_assert(LDS % 4 == 0, "float4 reads need 16-byte aligned rows");
static_assert(kRingBytes % 16 == 0 && kSmemBytes % 16 == 0, "pieces stay 16-byte aligned");
}  // namespace f32_cfg

// Loads rows [row0, row0 + 128) x cols [col0, col0 + 16) of a row-major [nrows, d] float matrix
// with row stride ld (elements), transposed into a k-major [16][LDS] smem tile, zero-filling out-of-range elements.
// 2048 elements, 8 per thread: col = tid % 8 + 8 (i & 1), row = tid / 8 + 32 (i >> 1). A warp covers
// 4 rows x 8 cols: 32 contiguous bytes per row in global memory, and smem words
// 4 * col + row (mod 32) that are all distinct (conflict-free).
__device__ __forceinline__ void load_tile_f32(float* __restrict__ tile, const float* __restrict__ src,
                                              int64_t nrows, int64_t row0, int64_t d, int64_t ld,
                                              int64_t col0, int tid) {
  using namespace f32_cfg;
  const int cl = tid & 7;
  const int rb = tid >> 3;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int cc = cl + 8 * (i & 1);
    const int r = rb + 32 * (i >> 1);
    const int64_t grow = row0 + r;
    const int64_t gcol = col0 + cc;
    float* dst = tile + cc * LDS + r;
    if (grow < nrows && gcol < d) {
      cp_async_4(dst, src + grow * ld + gcol);
    } else {
      *dst = 0.f;
    }
  }
}

// A source: rows [row0, row0 + 128) of z (lookup; HRQ level 0).
struct PlainTileF32 {
  static constexpr bool kDeferred = false;
  const float* z;
  int64_t n, row0, d;
  __device__ __forceinline__ void issue(float* tile, int64_t col0, int tid) {
    load_tile_f32(tile, z, n, row0, d, d, col0, tid);
  }
  __device__ __forceinline__ void complete(float*, int) {}
};

// A source: one head's rows of z [n, C, d] in float32 (as StridedTileB16).
struct StridedTileF32 {
  static constexpr bool kDeferred = false;
  const float* z;
  int rows, ld, d;
  __device__ __forceinline__ void issue(float* tile, int64_t col0, int tid) {
    load_tile_f32(tile, z, rows, 0, d, ld, col0, tid);
  }
  __device__ __forceinline__ void complete(float*, int) {}
};

// A source: rows of H = 2 z - e[prev[r]] in float32 (HRQ level >= 1), deferred: the 8 elements of
// load_tile_f32's layout (z and e: 16 floats) wait in registers until complete().
struct ResidualTileF32 {
  static constexpr bool kDeferred = true;
  const float* z;
  const float* e;
  const int64_t* prev;  // shared memory [kBM]
  int64_t n, row0, d;
  float zv[8], ev[8];

  __device__ __forceinline__ void issue(float*, int64_t col0, int tid) {
    const int cl = tid & 7;
    const int rb = tid >> 3;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int cc = cl + 8 * (i & 1);
      const int r = rb + 32 * (i >> 1);
      const int64_t grow = row0 + r;
      const int64_t gcol = col0 + cc;
      if (grow < n && gcol < d) {
        zv[i] = __ldg(z + grow * d + gcol);
        ev[i] = __ldg(e + prev[r] * d + gcol);
      } else {
        zv[i] = 0.f;
        ev[i] = 0.f;
      }
    }
  }
  __device__ __forceinline__ void complete(float* tile, int tid) {
    using namespace f32_cfg;
    const int cl = tid & 7;
    const int rb = tid >> 3;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int cc = cl + 8 * (i & 1);
      const int r = rb + 32 * (i >> 1);
      tile[cc * LDS + r] = residual<float>(zv[i], ev[i]);
    }
  }
};

// The float32 search of one 128-row tile against cb [k, d] with sqnorm [k]; same contract as
// mma_tile_search (smem: f32_cfg::kSmemBytes).
template <bool kZsq, typename ASource>
__device__ __forceinline__ void f32_tile_search(ASource& asrc, const float* __restrict__ cb,
                                                const float* __restrict__ sqnorm, int k, int64_t d,
                                                unsigned char* smem, float& out_best, int& out_idx,
                                                float& out_zsq) {
  using namespace f32_cfg;
  float* const sA = reinterpret_cast<float*>(smem + kOffA);        // [kStages][BK][LDS]
  float* const sB = reinterpret_cast<float*>(smem + kOffB);        // [kStages][BK][LDS]
  float* const s_best = reinterpret_cast<float*>(smem + kOffBest); // [kBM]
  int* const s_idx = reinterpret_cast<int*>(smem + kOffIdx);       // [kBM]

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid & 15;  // codes tx*4 + {0..3} and 64 + tx*4 + {0..3}
  const int ty = tid >> 4;  // rows   ty*4 + {0..3} and 64 + ty*4 + {0..3}

  const int num_kt = (k + kBN - 1) / kBN;
  const int64_t num_dc = d > 0 ? (d + BK - 1) / BK : 1;
  const int64_t total = static_cast<int64_t>(num_kt) * num_dc;

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  float best[8];
  int best_i[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    best[i] = pos_inf();
    best_i[i] = 0;
  }
  float zsq = 0.f;  // ||z||^2 of row tid (threads < 128)

  int ld_kt = 0;
  int64_t ld_dc = 0;
  auto load_next = [&](int slot) {
    const int64_t col0 = ld_dc * BK;
    asrc.issue(sA + slot * kTileElems, col0, tid);
    load_tile_f32(sB + slot * kTileElems, cb, static_cast<int64_t>(k),
                  static_cast<int64_t>(ld_kt) * kBN, d, d, col0, tid);
    if (++ld_dc == num_dc) {
      ld_dc = 0;
      ++ld_kt;
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < total) {
      load_next(s);
      if constexpr (ASource::kDeferred) asrc.complete(sA + s * kTileElems, tid);
    }
    cp_async_commit();
  }

  int c_kt = 0;
  int64_t c_dc = 0;
  int slot = 0;
  int ld_slot = kStages - 1;
  for (int64_t t = 0; t < total; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const bool issued = t + (kStages - 1) < total;
    const int issued_slot = ld_slot;
    if (issued) load_next(ld_slot);
    cp_async_commit();
    ld_slot = (ld_slot + 1 == kStages) ? 0 : ld_slot + 1;

    const float* const a_tile = sA + slot * kTileElems;
    const float* const b_tile = sB + slot * kTileElems;

    if constexpr (kZsq) {
      if (c_kt == 0 && tid < kBM) {  // warps 0..3: warp-uniform branch
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
          const float x = a_tile[kk * LDS + tid];
          zsq = fmaf(x, x, zsq);
        }
      }
    }

#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      const float4 a0 = *reinterpret_cast<const float4*>(a_tile + kk * LDS + ty * 4);
      const float4 a1 = *reinterpret_cast<const float4*>(a_tile + kk * LDS + 64 + ty * 4);
      const float4 b0 = *reinterpret_cast<const float4*>(b_tile + kk * LDS + tx * 4);
      const float4 b1 = *reinterpret_cast<const float4*>(b_tile + kk * LDS + 64 + tx * 4);
      const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }

    if (++c_dc == num_dc) {
      // acc[i][j]: row (i < 4 ? ty*4 + i : 64 + ty*4 + i - 4),
      //            col c_kt*128 + (j < 4 ? tx*4 + j : 64 + tx*4 + j - 4)  -- increasing in j.
      float sq[8];
      bool ok[8];
      int col[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        col[j] = c_kt * kBN + (j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4));
        ok[j] = col[j] < k;
        sq[j] = ok[j] ? __ldg(sqnorm + col[j]) : 0.f;
      }
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float v = fmaf(-2.f, acc[i][j], sq[j]);
          if (ok[j] && v < best[i]) {  // strict: NaN and later ties never win
            best[i] = v;
            best_i[i] = col[j];
          }
          acc[i][j] = 0.f;
        }
      c_dc = 0;
      ++c_kt;
    }

    if constexpr (ASource::kDeferred) {
      if (issued) asrc.complete(sA + issued_slot * kTileElems, tid);
    }
    slot = (slot + 1 == kStages) ? 0 : slot + 1;
  }
  cp_async_wait<0>();

  // The 16 lanes with the same ty (lane bits 0..3 = tx) share rows: butterfly over tx.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float v = best[i];
    int bi = best_i[i];
#pragma unroll
    for (int off = 8; off >= 1; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, off);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
      lex_min(v, bi, ov, oi);
    }
    if (tx == 0) {
      const int r = i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4);
      s_best[r] = v;
      s_idx[r] = bi;
    }
  }
  __syncthreads();

  if (tid < kBM) {
    out_best = s_best[tid];
    out_idx = s_idx[tid];
    out_zsq = zsq;
  }
}

// ================================================================================================
// The rows of z as they are (lookup, quantize)
// ================================================================================================

// The search of rows [row0, row0 + 128) of z [n, d] (the A source of lookup and quantize) against cb
// [k, d]: the float32 FMA search for T = float, else the tensor-core search (kVec: 16-byte loads).
// Same contract as the searches above, with ||z||^2 (out_zsq) computed.
template <typename T, bool kVec>
__device__ __forceinline__ void search_rows(const typename Elem<T>::Storage* __restrict__ z,
                                            const typename Elem<T>::Storage* __restrict__ cb,
                                            const float* __restrict__ sqnorm, int64_t n, int64_t row0,
                                            int k, int64_t d, unsigned char* smem, float& out_best,
                                            int& out_idx, float& out_zsq) {
  if constexpr (std::is_same_v<T, float>) {
    PlainTileF32 src{z, n, row0, d};
    f32_tile_search</*kZsq=*/true>(src, cb, sqnorm, k, d, smem, out_best, out_idx, out_zsq);
  } else {
    PlainTileB16<kVec> src{z, n, row0, d};
    mma_tile_search<T, kVec, /*kZsq=*/true>(src, cb, sqnorm, k, d, smem, out_best, out_idx, out_zsq);
  }
}

// search_rows for one head of z [n, C, d] (the per-head lookup): the tile's rows = min(n - row0, 128)
// rows from z (row row0 of the head) with row stride ld = C * d, against that head's codebook cb [k, d].
template <typename T, bool kVec>
__device__ __forceinline__ void search_head_rows(const typename Elem<T>::Storage* __restrict__ z,
                                                 const typename Elem<T>::Storage* __restrict__ cb,
                                                 const float* __restrict__ sqnorm, int rows, int ld, int k,
                                                 int64_t d, unsigned char* smem, float& out_best, int& out_idx,
                                                 float& out_zsq) {
  if constexpr (std::is_same_v<T, float>) {
    StridedTileF32 src{z, rows, ld, static_cast<int>(d)};
    f32_tile_search</*kZsq=*/true>(src, cb, sqnorm, k, d, smem, out_best, out_idx, out_zsq);
  } else {
    StridedTileB16<kVec> src{z, rows, ld, static_cast<int>(d)};
    mma_tile_search<T, kVec, /*kZsq=*/true>(src, cb, sqnorm, k, d, smem, out_best, out_idx, out_zsq);
  }
}

}  // namespace vqdna::cuda::tile
