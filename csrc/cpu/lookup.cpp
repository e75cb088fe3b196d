// Native CPU nearest-code lookup: codes[i] = argmin_k (||e_k||^2 - 2 z_i.e_k),
// dist[i] = that minimum + ||z_i||^2 (clamped at 0), all arithmetic in float32.
//
// Design (never materialises the N x K distance matrix):
//  * The codebook is packed once per call into float32 panels of kNR = 16 codes, laid out
//    [D][16] so the micro-kernel reads one 16-code slice per d with two aligned vector loads.
//    The tail panel is zero-padded and its padded codes get sqnorm = +inf, so they never win.
//  * Rows of z are processed in blocks of MB rows (parallel over blocks). A block is converted to
//    float32 and packed into panels of kMR = 6 rows, laid out [D][6], sized to stay in L2.
//  * For each code panel (kept in L1 across the block) and each row panel, a 6 x 16 register-tile
//    GEMM runs over the whole of D, and its argmin epilogue is fused in registers: the tile's
//    distances are compared against each row's running minimum and only when some lane beats it
//    (rare after the first few panels) is the tile scanned in increasing code order. Strict `<`
//    everywhere keeps the lowest index on ties, and an ordered compare means NaN never wins.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define VQDNA_AVX2 1
#endif

namespace {

constexpr int64_t kMR = 6;   // rows of z per register tile (broadcast operand)
constexpr int64_t kNR = 16;  // codes per register tile (two 8-lane vectors)
// Bytes of packed z we aim to keep in L2 per thread; the block height MB derives from it.
constexpr int64_t kBlockBytes = 160 * 1024;
constexpr int64_t kMaxBlockRows = 192;

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using AlignedBuf = std::unique_ptr<float[], AlignedFree>;

AlignedBuf aligned_floats(int64_t n) {
  const size_t bytes = ((static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float) + 63) / 64) * 64;
  auto* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  TORCH_CHECK(p != nullptr, "vqdna.lookup_native: out of memory allocating ", bytes, " bytes");
  return AlignedBuf(p);
}

// ---- conversion of one row of the input dtype to float32 ----------------------------------------

template <typename T>
inline void row_to_float(const T* src, float* dst, int64_t n) {
  int64_t d = 0;
#ifdef VQDNA_AVX2
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; d + 8 <= n; d += 8) {  // bf16 is the high half of a float32
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d));
      _mm256_storeu_ps(dst + d, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    for (; d + 8 <= n; d += 8) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d));
      _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(h));
    }
  }
#endif
  for (; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}

// Multi-lane accumulation: a single scalar accumulator would be a serial FP-add chain.
inline float sum_squares(const float* x, int64_t n) {
  int64_t d = 0;
  float s = 0.f;
#ifdef VQDNA_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; d + 16 <= n; d += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + d), x1 = _mm256_loadu_ps(x + d + 8);
    a0 = _mm256_fmadd_ps(x0, x0, a0);
    a1 = _mm256_fmadd_ps(x1, x1, a1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(a0, a1));
  for (int i = 0; i < 8; ++i) s += lanes[i];
#endif
  for (; d < n; ++d) s += x[d] * x[d];
  return s;
}

// ---- packing -------------------------------------------------------------------------------------

// Packs `rows` rows of src (row stride D) into a [D][P] panel (P = kMR or kNR), zero-padding the
// missing rows, and optionally writes each row's float32 ||x||^2. `tmp` holds one float32 row.
template <typename T, int64_t P>
void pack_panel(const T* src, int64_t rows, int64_t D, float* panel, float* tmp, float* sqnorm_out) {
  for (int64_t r = 0; r < P; ++r) {
    if (r >= rows) {
      for (int64_t d = 0; d < D; ++d) panel[d * P + r] = 0.f;
      continue;
    }
    const float* x;
    if constexpr (std::is_same_v<T, float>) {
      x = src + r * D;
    } else {
      row_to_float(src + r * D, tmp, D);
      x = tmp;
    }
    for (int64_t d = 0; d < D; ++d) panel[d * P + r] = x[d];
    if (sqnorm_out) sqnorm_out[r] = sum_squares(x, D);
  }
}

// ---- register tile + fused argmin epilogue -------------------------------------------------------

// Folds 16 candidate distances of one row into its running (min, index), in increasing code
// order with a strict `<` (lowest index wins ties; NaN compares false and never wins).
inline void scan16(const float* v, int32_t k0, float& best, int32_t& best_idx) {
  for (int32_t c = 0; c < kNR; ++c) {
    if (v[c] < best) {
      best = v[c];
      best_idx = k0 + c;
    }
  }
}

#ifdef VQDNA_AVX2

// A: row panel [D][6], B: code panel [D][16] (64-byte aligned), sq: the panel's 16 sqnorms.
inline void tile_6x16(const float* __restrict A, const float* __restrict B, int64_t D, const float* sq, int32_t k0,
                      float* best, int32_t* best_idx) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(),
         c11 = _mm256_setzero_ps(), c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(),
         c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c40 = _mm256_setzero_ps(),
         c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t d = 0; d < D; ++d) {
    const __m256 b0 = _mm256_load_ps(B + d * kNR);
    const __m256 b1 = _mm256_load_ps(B + d * kNR + 8);
    const float* a = A + d * kMR;
    __m256 av;
    av = _mm256_broadcast_ss(a + 0); c00 = _mm256_fmadd_ps(av, b0, c00); c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(a + 1); c10 = _mm256_fmadd_ps(av, b0, c10); c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(a + 2); c20 = _mm256_fmadd_ps(av, b0, c20); c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(a + 3); c30 = _mm256_fmadd_ps(av, b0, c30); c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(a + 4); c40 = _mm256_fmadd_ps(av, b0, c40); c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(a + 5); c50 = _mm256_fmadd_ps(av, b0, c50); c51 = _mm256_fmadd_ps(av, b1, c51);
  }
  const __m256 sq0 = _mm256_load_ps(sq), sq1 = _mm256_load_ps(sq + 8);
  const __m256 two = _mm256_set1_ps(2.f);
  // dist - ||z||^2 = sq - 2 z.e: one rounding (2 z.e is exact), same as sq + (-2 z.e).
  auto fold = [&](int r, __m256 x0, __m256 x1) {
    const __m256 v0 = _mm256_fnmadd_ps(two, x0, sq0);
    const __m256 v1 = _mm256_fnmadd_ps(two, x1, sq1);
    const __m256 m = _mm256_set1_ps(best[r]);
    const __m256 lt = _mm256_or_ps(_mm256_cmp_ps(v0, m, _CMP_LT_OQ), _mm256_cmp_ps(v1, m, _CMP_LT_OQ));
    if (__builtin_expect(!_mm256_testz_ps(lt, lt), 0)) {
      alignas(32) float v[kNR];
      _mm256_store_ps(v, v0);
      _mm256_store_ps(v + 8, v1);
      scan16(v, k0, best[r], best_idx[r]);
    }
  };
  fold(0, c00, c01);
  fold(1, c10, c11);
  fold(2, c20, c21);
  fold(3, c30, c31);
  fold(4, c40, c41);
  fold(5, c50, c51);
}

#else  // portable fallback (non-x86 builds); the compiler vectorises the inner loops

inline void tile_6x16(const float* __restrict A, const float* __restrict B, int64_t D, const float* sq, int32_t k0,
                      float* best, int32_t* best_idx) {
  float acc[kMR][kNR] = {};
  for (int64_t d = 0; d < D; ++d)
    for (int64_t r = 0; r < kMR; ++r)
      for (int64_t c = 0; c < kNR; ++c) acc[r][c] += A[d * kMR + r] * B[d * kNR + c];
  for (int64_t r = 0; r < kMR; ++r) {
    float v[kNR];
    for (int64_t c = 0; c < kNR; ++c) v[c] = sq[c] - 2.f * acc[r][c];
    scan16(v, k0, best[r], best_idx[r]);
  }
}

#endif

// ---- driver --------------------------------------------------------------------------------------

template <typename T>
void lookup_kernel(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& sqnorm, at::Tensor& codes,
                   at::Tensor& dist) {
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  const int64_t n_panels = (K + kNR - 1) / kNR;
  const int64_t Kp = n_panels * kNR;
  const T* zp = z.const_data_ptr<T>();
  const T* cbp = codebook.const_data_ptr<T>();
  const float* sqp = sqnorm.const_data_ptr<float>();
  int32_t* codes_p = codes.mutable_data_ptr<int32_t>();
  float* dist_p = dist.mutable_data_ptr<float>();

  // Pack the codebook once per call (K*D work, shared read-only by all threads).
  AlignedBuf bpack = aligned_floats(Kp * D);
  AlignedBuf sqpad = aligned_floats(Kp);
  std::copy(sqp, sqp + K, sqpad.get());
  std::fill(sqpad.get() + K, sqpad.get() + Kp, std::numeric_limits<float>::infinity());
  at::parallel_for(0, n_panels, 16, [&](int64_t p0, int64_t p1) {
    AlignedBuf tmp = aligned_floats(D);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t k0 = p * kNR;
      pack_panel<T, kNR>(cbp + k0 * D, std::min(kNR, K - k0), D, bpack.get() + k0 * D, tmp.get(), nullptr);
    }
  });

  // Block height: packed z block fits the L2 budget, and every thread gets at least one block.
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  static const int64_t kBB = getenv("VQ_BB") ? atol(getenv("VQ_BB")) * 1024 : kBlockBytes;
  static const int64_t kMaxR = getenv("VQ_MAXR") ? atol(getenv("VQ_MAXR")) : kMaxBlockRows;
  static const int kPF = getenv("VQ_PF") ? atoi(getenv("VQ_PF")) : 2;
  int64_t mb = std::clamp<int64_t>(kBB / (D * int64_t(sizeof(float))), kMR, kMaxR);
  mb = std::min(mb, (N + nthreads - 1) / nthreads);
  mb = std::max<int64_t>(kMR, (mb + kMR - 1) / kMR * kMR);
  const int64_t n_blocks = (N + mb - 1) / mb;

  at::parallel_for(0, n_blocks, 1, [&](int64_t blk0, int64_t blk1) {
    AlignedBuf apack = aligned_floats(mb * D);
    AlignedBuf tmp = aligned_floats(D);
    std::unique_ptr<float[]> best(new float[mb]), znorm(new float[mb]);
    std::unique_ptr<int32_t[]> best_idx(new int32_t[mb]);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t r0 = blk * mb;
      const int64_t rows = std::min(mb, N - r0);
      const int64_t row_panels = (rows + kMR - 1) / kMR;
      for (int64_t p = 0; p < row_panels; ++p) {
        const int64_t pr = std::min(kMR, rows - p * kMR);
        pack_panel<T, kMR>(zp + (r0 + p * kMR) * D, pr, D, apack.get() + p * kMR * D, tmp.get(),
                           znorm.get() + p * kMR);
      }
      std::fill(best.get(), best.get() + row_panels * kMR, std::numeric_limits<float>::infinity());
      std::fill(best_idx.get(), best_idx.get() + row_panels * kMR, 0);
      // Pull the next block of z (streamed from DRAM) in while this block computes: spread the
      // prefetches over the code panels so they overlap with the FMAs.
      const char* next = reinterpret_cast<const char*>(zp + (r0 + mb) * D);
      const int64_t next_lines = blk + 1 < blk1 ? (std::min(mb, N - r0 - mb) * D * int64_t(sizeof(T)) + 63) / 64 : 0;
      const int64_t lines_per_panel = (next_lines + n_panels - 1) / n_panels;
      // Code panels in increasing order: required for lowest-index tie breaking.
      for (int64_t j = 0; j < n_panels; ++j) {
        if (kPF) {
        const int64_t l1 = std::min(next_lines, (j + 1) * lines_per_panel);
        for (int64_t l = j * lines_per_panel; l < l1; ++l) {
          if (kPF == 1) _mm_prefetch(next + l * 64, _MM_HINT_T0);
          else if (kPF == 2) _mm_prefetch(next + l * 64, _MM_HINT_T1);
          else _mm_prefetch(next + l * 64, _MM_HINT_T2);
        }
        }
        const float* B = bpack.get() + j * kNR * D;
        const float* sq = sqpad.get() + j * kNR;
        const int32_t k0 = static_cast<int32_t>(j * kNR);
        for (int64_t p = 0; p < row_panels; ++p) {
          tile_6x16(apack.get() + p * kMR * D, B, D, sq, k0, best.get() + p * kMR, best_idx.get() + p * kMR);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        // NaN/Inf rows: znorm is non-finite, so is the sum; `x < 0` leaves NaN untouched.
        const float x = best[r] + znorm[r];
        dist_p[r0 + r] = x < 0.f ? 0.f : x;
        codes_p[r0 + r] = best_idx[r];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> lookup_native_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                     const at::Tensor& codebook_sqnorm) {
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu() && codebook_sqnorm.device().is_cpu(),
              "vqdna.lookup_native: all inputs must be CPU tensors, got z on ", z.device(), ", codebook on ",
              codebook.device(), ", codebook_sqnorm on ", codebook_sqnorm.device());
  TORCH_CHECK(z.dim() == 2, "vqdna.lookup_native: z must be 2-D [N, D], got shape ", z.sizes());
  TORCH_CHECK(codebook.dim() == 2, "vqdna.lookup_native: codebook must be 2-D [K, D], got shape ",
              codebook.sizes());
  TORCH_CHECK(z.size(1) == codebook.size(1), "vqdna.lookup_native: dimension mismatch: z has D=", z.size(1),
              ", codebook has D=", codebook.size(1));
  TORCH_CHECK(codebook.size(0) >= 1, "vqdna.lookup_native: the codebook is empty (K = 0)");
  TORCH_CHECK(codebook.size(0) <= std::numeric_limits<int32_t>::max() - kNR,
              "vqdna.lookup_native: K = ", codebook.size(0), " does not fit int32 codes");
  const auto dt = z.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "vqdna.lookup_native: z must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(codebook.scalar_type() == dt, "vqdna.lookup_native: dtype mismatch: z is ", dt, ", codebook is ",
              codebook.scalar_type());
  TORCH_CHECK(codebook_sqnorm.dim() == 1 && codebook_sqnorm.size(0) == codebook.size(0),
              "vqdna.lookup_native: codebook_sqnorm must have shape [", codebook.size(0), "], got ",
              codebook_sqnorm.sizes());
  TORCH_CHECK(codebook_sqnorm.scalar_type() == at::kFloat,
              "vqdna.lookup_native: codebook_sqnorm must be float32, got ", codebook_sqnorm.scalar_type());

  // The contract asks for contiguous inputs; .contiguous() is a no-op then and keeps us safe otherwise.
  const at::Tensor zc = z.contiguous(), cbc = codebook.contiguous(), sqc = codebook_sqnorm.contiguous();
  const int64_t N = zc.size(0);
  at::Tensor codes = at::empty({N}, zc.options().dtype(at::kInt));
  at::Tensor dist = at::empty({N}, zc.options().dtype(at::kFloat));
  if (N == 0) return {codes, dist};

  AT_DISPATCH_SWITCH(dt, "vqdna_lookup_native",
                     AT_DISPATCH_CASE(at::kFloat, [&] { lookup_kernel<float>(zc, cbc, sqc, codes, dist); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { lookup_kernel<c10::BFloat16>(zc, cbc, sqc, codes, dist); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { lookup_kernel<c10::Half>(zc, cbc, sqc, codes, dist); }));
  return {codes, dist};
}

}  // namespace

TORCH_LIBRARY_IMPL(vqdna, CPU, m) { m.impl("lookup_native", &lookup_native_cpu); }
