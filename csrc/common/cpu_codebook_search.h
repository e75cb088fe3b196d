// Shared pieces of the native CPU kernels that search codebooks (lookup, quantize, hrq_quantize):
// float32 packing of rows and codes into register-tile panels, the 6 x 16 AVX2 tile with its fused
// argmin epilogue, a block search over a packed codebook, and the parallel loop over blocks of rows.
// See csrc/ops/lookup/cpu.cpp for the design.
#pragma once

#include <cmath>
#include <limits>

#include "common/cpu_bf16_screen.h"
#include "common/cpu_buffers.h"

namespace vqdna::cpu {

constexpr int64_t kMR = 6;   // rows of z per register tile (broadcast operand)
constexpr int64_t kNR = 16;  // codes per register tile (two 8-lane vectors)
// Bytes of packed z we aim to keep in L2 per thread; the block height MB derives from it.
constexpr int64_t kBlockBytes = 160 * 1024;
constexpr int64_t kMaxBlockRows = 192;

// ---- packing -------------------------------------------------------------------------------------

// Packs `rows` rows of src (row stride ld, 0: D) into a [D][P] panel (P = kMR or kNR), zero-padding the
// missing rows, and optionally writes each row's float32 ||x||^2. `tmp` holds one float32 row.
// normalize: each row x is replaced by l2norm(x) = x / max(|x|, 1e-6) rounded to T, as torch's
// normalize computes it in the dtype of x (the norm, its clamp and the quotient each rounded to T;
// the quotient as x times the reciprocal).
template <typename T, int64_t P>
void pack_panel(const T* src, int64_t rows, int64_t D, float* panel, float* tmp, float* sqnorm_out,
                bool normalize = false, int64_t ld = 0) {
  const int64_t stride = ld ? ld : D;
  for (int64_t r = 0; r < P; ++r) {
    if (r >= rows) {
      for (int64_t d = 0; d < D; ++d) panel[d * P + r] = 0.f;
      continue;
    }
    const float* x;
    if constexpr (std::is_same_v<T, float>) {
      x = src + r * stride;
    } else {
      row_to_float(src + r * stride, tmp, D);
      x = tmp;
    }
    if (normalize) {
      const float norm = static_cast<float>(
          static_cast<T>(std::max(static_cast<float>(static_cast<T>(std::sqrt(sum_squares(x, D)))), 1e-6f)));
      // x * (1 / norm), not x / norm: a division per element would cost ~1/10 of the search; the
      // quotient differs from torch's by an ulp at most (codes differ only at near-ties).
      const float inv = 1.0f / norm;
      for (int64_t d = 0; d < D; ++d) tmp[d] = static_cast<float>(static_cast<T>(x[d] * inv));
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

// ---- a codebook packed once per call ----------------------------------------------------------------

struct PackedCodebook {
  AlignedBuf panels;  // [n_panels][D][kNR] float32
  AlignedBuf sq;      // [n_panels * kNR], +inf on the padding codes so they never win
  int64_t K = 0, D = 0, n_panels = 0;
};

template <typename T>
PackedCodebook pack_codebook(const T* codebook, const float* sqnorm, int64_t K, int64_t D) {
  PackedCodebook pc;
  pc.K = K;
  pc.D = D;
  pc.n_panels = (K + kNR - 1) / kNR;
  const int64_t Kp = pc.n_panels * kNR;
  pc.panels = aligned_floats(Kp * D);
  pc.sq = aligned_floats(Kp);
  std::copy(sqnorm, sqnorm + K, pc.sq.get());
  std::fill(pc.sq.get() + K, pc.sq.get() + Kp, std::numeric_limits<float>::infinity());
  float* panels = pc.panels.get();
  at::parallel_for(0, pc.n_panels, 16, [&](int64_t p0, int64_t p1) {
    AlignedBuf tmp = aligned_floats(D);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t k0 = p * kNR;
      pack_panel<T, kNR>(codebook + k0 * D, std::min(kNR, K - k0), D, panels + k0 * D, tmp.get(), nullptr);
    }
  });
  return pc;
}

// Rows of a block: `row_panels` panels of kMR packed rows. Sets best/best_idx (kMR * row_panels
// entries) to the running (min of ||e||^2 - 2 z.e, code). Code panels go in increasing order:
// required for lowest-index tie breaking. `prefetch`/`prefetch_lines`: memory to pull towards the
// cache meanwhile (the next block of the caller's input), spread over the code panels.
inline void search_block(const float* apack, int64_t row_panels, const PackedCodebook& cb, float* best,
                         int32_t* best_idx, const char* prefetch = nullptr, int64_t prefetch_lines = 0) {
  std::fill(best, best + row_panels * kMR, std::numeric_limits<float>::infinity());
  std::fill(best_idx, best_idx + row_panels * kMR, 0);
  const int64_t lines_per_panel = (prefetch_lines + cb.n_panels - 1) / cb.n_panels;
  for (int64_t j = 0; j < cb.n_panels; ++j) {
#ifdef VQDNA_AVX2
    const int64_t l1 = std::min(prefetch_lines, (j + 1) * lines_per_panel);
    for (int64_t l = j * lines_per_panel; l < l1; ++l) _mm_prefetch(prefetch + l * 64, _MM_HINT_T1);
#endif
    const float* B = cb.panels.get() + j * kNR * cb.D;
    const float* sq = cb.sq.get() + j * kNR;
    const int32_t k0 = static_cast<int32_t>(j * kNR);
    for (int64_t p = 0; p < row_panels; ++p) {
      tile_6x16(apack + p * kMR * cb.D, B, cb.D, sq, k0, best + p * kMR, best_idx + p * kMR);
    }
  }
}

// Block height for rows of width D: the packed block stays in L2, and every thread gets a block.
inline int64_t block_rows(int64_t N, int64_t D) {
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  int64_t mb = std::clamp<int64_t>(kBlockBytes / (D * int64_t(sizeof(float))), kMR, kMaxBlockRows);
  mb = std::min(mb, (N + nthreads - 1) / nthreads);
  return std::max<int64_t>(kMR, (mb + kMR - 1) / kMR * kMR);
}

// Packs `rows` rows of a column-major z (row r, column d at src[r + d * ld]: a transposed view such
// as channel-first activations) into a [D][kMR] panel as pack_panel does, reading kMR consecutive
// values per column. ||z_r||^2 is summed by sum_squares over the same floats in the same order as
// pack_panel: the same bits as for a contiguous copy of z.
template <typename T>
void pack_panel_transposed(const T* src, int64_t rows, int64_t D, int64_t ld, float* panel, float* tmp,
                           float* sqnorm_out) {
  for (int64_t d = 0; d < D; ++d) {
    const T* col = src + d * ld;
    float* out = panel + d * kMR;
    int64_t r = 0;
    for (; r < rows; ++r) out[r] = static_cast<float>(col[r]);
    for (; r < kMR; ++r) out[r] = 0.f;
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < D; ++d) tmp[d] = panel[d * kMR + r];
    sqnorm_out[r] = sum_squares(tmp, D);
  }
}

// The search of every row of z [N, D] (lookup, quantize): blocks of mb = block_rows(N, D) rows (the
// caller's, so it can size per-block results), in parallel over blocks; each block is packed (float32, ||z||^2 per row), searched against `cb` while
// the next block of z is prefetched, and handed to
//   epilogue(blk, r0, rows, best, best_idx, znorm)
// (block index, first row, row count; per row of the block: min of ||e||^2 - 2 z.e, its code,
// ||z||^2) while it is still in cache. col_stride = 0: z is row-major contiguous; else z is a
// column-major view (row r, column d at zp[r + d * col_stride]), read in place. screen: the
// bf16-screened search of cpu_bf16_screen.h (make_screen; the same results), nullptr: search_block.
// normalize (row-major z only): every row is l2-normalised as it is packed (pack_panel), so the search,
// ||z||^2 and the epilogue see the unit rows. row_stride (row-major z only; 0: D): the elements between
// consecutive rows, e.g. C * D for the head view z[:, c] of z [N, C, D] (read in place).
template <typename T, typename Epilogue>
void search_rows_blocked(const T* zp, int64_t N, int64_t D, const PackedCodebook& cb, int64_t mb,
                         Epilogue&& epilogue, int64_t col_stride = 0, const ScreenedCodebook* screen = nullptr,
                         bool normalize = false, int64_t row_stride = 0) {
  TORCH_CHECK(!(normalize && col_stride), "search_rows_blocked: normalize needs a row-major z");
  TORCH_CHECK(!(row_stride && col_stride), "search_rows_blocked: row_stride needs a row-major z");
  const int64_t ld = row_stride ? row_stride : D;
  const int64_t n_blocks = (N + mb - 1) / mb;
  at::parallel_for(0, n_blocks, 1, [&](int64_t blk0, int64_t blk1) {
    AlignedBuf apack = aligned_floats(mb * D);
    AlignedBuf tmp = aligned_floats(D);
    ScreenScratchPtr scratch = screen ? make_screen_scratch(*screen, mb) : nullptr;
    bool screening = screen != nullptr;
    std::unique_ptr<float[]> best(new float[mb]), znorm(new float[mb]);
    std::unique_ptr<int32_t[]> best_idx(new int32_t[mb]);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t r0 = blk * mb;
      const int64_t rows = std::min(mb, N - r0);
      const int64_t row_panels = (rows + kMR - 1) / kMR;
      for (int64_t p = 0; p < row_panels; ++p) {
        const int64_t pr = std::min(kMR, rows - p * kMR);
        if (col_stride) {
          pack_panel_transposed<T>(zp + r0 + p * kMR, pr, D, col_stride, apack.get() + p * kMR * D, tmp.get(),
                                   znorm.get() + p * kMR);
        } else {
          pack_panel<T, kMR>(zp + (r0 + p * kMR) * ld, pr, D, apack.get() + p * kMR * D, tmp.get(),
                             znorm.get() + p * kMR, normalize, ld);
        }
      }
      // Pull the next block of z (streamed from DRAM) in while this block computes (a contiguous z: the
      // block is one range; the hardware prefetcher follows a transposed z's columns and strided rows).
      const char* next = reinterpret_cast<const char*>(zp + (r0 + mb) * ld);
      const int64_t next_lines = blk + 1 < blk1 && !col_stride && ld == D
                                     ? (std::min(mb, N - r0 - mb) * D * int64_t(sizeof(T)) + 63) / 64
                                     : 0;
      if (screening) {
        screened_search_block(apack.get(), rows, znorm.get(), cb, *screen, *scratch, best.get(), best_idx.get(), next,
                              next_lines);
        screening = screen_pays(*screen, *scratch);
      } else {
        search_block(apack.get(), row_panels, cb, best.get(), best_idx.get(), next, next_lines);
        if (scratch) count_exact_rows(*scratch, rows);
      }
      epilogue(blk, r0, rows, static_cast<const float*>(best.get()), static_cast<const int32_t*>(best_idx.get()),
               static_cast<const float*>(znorm.get()));
    }
  });
}

// The input contract of the single-codebook searches (lookup_native, quantize_native): CPU tensors,
// z [N, D] and codebook [K, D] of one float dtype, codebook_sqnorm [K] float32, 1 <= K < 2^31 - kNR.
// `op` names the caller in the messages ("vqdna.lookup_native").
inline void check_search_inputs(const char* op, const at::Tensor& z, const at::Tensor& codebook,
                                const at::Tensor& codebook_sqnorm) {
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu() && codebook_sqnorm.device().is_cpu(),
              op, ": all inputs must be CPU tensors, got z on ", z.device(), ", codebook on ",
              codebook.device(), ", codebook_sqnorm on ", codebook_sqnorm.device());
  TORCH_CHECK(z.dim() == 2, op, ": z must be 2-D [N, D], got shape ", z.sizes());
  TORCH_CHECK(codebook.dim() == 2, op, ": codebook must be 2-D [K, D], got shape ", codebook.sizes());
  TORCH_CHECK(z.size(1) == codebook.size(1), op, ": dimension mismatch: z has D=", z.size(1),
              ", codebook has D=", codebook.size(1));
  TORCH_CHECK(codebook.size(0) >= 1, op, ": the codebook is empty (K = 0)");
  TORCH_CHECK(codebook.size(0) <= std::numeric_limits<int32_t>::max() - kNR, op, ": K = ", codebook.size(0),
              " does not fit int32 codes");
  const auto dt = z.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              op, ": z must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(codebook.scalar_type() == dt, op, ": dtype mismatch: z is ", dt, ", codebook is ",
              codebook.scalar_type());
  TORCH_CHECK(codebook_sqnorm.dim() == 1 && codebook_sqnorm.size(0) == codebook.size(0),
              op, ": codebook_sqnorm must have shape [", codebook.size(0), "], got ", codebook_sqnorm.sizes());
  TORCH_CHECK(codebook_sqnorm.scalar_type() == at::kFloat,
              op, ": codebook_sqnorm must be float32, got ", codebook_sqnorm.scalar_type());
}

}  // namespace vqdna::cpu
