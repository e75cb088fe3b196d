// The bf16-screened nearest-code search (see cpu_bf16_screen.h and docs/design.md §2.1).
//
// Why: the exact float32 search runs at the two cores' float32 FMA peak; VDPBF16PS does twice the
// multiply-adds per cycle on this CPU (measured: see docs/design.md §2.1), so the search itself can
// only get faster by doing most of its work in bfloat16, without changing a single result.
//
// How, per block of rows (the block loop of search_rows_blocked is unchanged):
//  1. the block's float32 row panels are rounded to bf16 pairs; the codebook was rounded once per call
//     (panels of kNB codes, [D2][kNB][2] bf16, D2 = ceil(D / 2), odd D zero-padded);
//  2. a kMR x kNB tile of VDPBF16PS (float32 accumulation) gives every code a screened score
//     t_k = fl(||e_k||^2 - 2 s_k), s_k the bf16 dot product; per row we keep the screened minimum m and
//     the codes with t_k <= m + thr_r (thr_r below), in increasing code order;
//  3. each kept code is re-scored with the exact arithmetic of tile_6x16 (one float32 FMA chain over
//     d = 0..D-1 from 0, then fl(||e_k||^2 - 2 acc)): the same bits as the exact kernel; the minimum
//     over them, lowest code on ties, is the exact search's answer (proof below).
// Rows the bound does not cover (non-finite, or huge) and rows whose candidate list overflows (many
// near-ties, e.g. duplicated codes) are searched by the exact kernel itself.
//
// The bound. Let v_k be the exact kernel's score and k* its answer (min v, lowest index). If
// |t_k - v_k| <= E for every code k of the row, then for all j: t_k* <= v_k* + E <= v_j + E <= t_j + 2E,
// so t_k* <= m + 2E: k* is a candidate, and every candidate with v = v_k* has a higher index, so the
// exact minimum over the candidates (lowest index on ties) is k*. thr_r = 2E (rounded up).
// E for row r: u = 2^-24 (float32), u' = 2^-23 (allows any rounding of VDPBF16PS's additions, whose
// exact order and rounding the ISA leaves to the implementation), b = 2^-8 (bf16's unit roundoff, RNE),
// eta = 2^-126 (the instruction flushes denormal inputs, products and sums: at most eta each),
// Z >= ||z_r||, M >= max_k ||e_k|| (float32 values), P = Z M >= sum_d |z_d e_d| (Cauchy-Schwarz),
// Q = sqrt(D) (Z + M) >= sum_d |z_d| + |e_d|, g_n = n u / (1 - n u), g'_n the same with u'.
//  * rounding to bf16: |z~_d - z_d| <= b |z_d| + eta, same for e, so
//    |sum z~ e~ - z.e| <= b (2 + b) P + 2 eta Q + D eta^2;
//  * bf16 products are exact in float32 (8 x 8 significant bits) up to the flush: D eta in all;
//  * float32 accumulation over D terms (D / 2 instructions, at most two roundings each):
//    g'_(D+2) sum |z~ e~| <= g'_(D+2) ((1 + b)^2 P + 2 eta Q + D eta), plus at most 3 eta per term flushed;
//  => |s_k - z.e_k| <= (b (2 + b) + g'_(D+2) (1 + b)^2) P + A,  A = 8 (D + 2) eta + 4 eta Q;
//  * the exact chain: |acc_k - z.e_k| <= g_D P + D 2^-149 (gradual underflow);
//  * the two final roundings: |t_k - (sq_k - 2 s_k)| + |v_k - (sq_k - 2 acc_k)| <= u (2 S + 2 |s_k| + 2 |acc_k|),
//    S = max_k |sq_k|, and |s_k|, |acc_k| <= 2 P + 2 A;
//  => E = 2 (|s - x| + |acc - x|) + u (2 S + 8 P + 8 A), evaluated in float64 and rounded up (factor
//     1 + 2^-20). It is ~2^-6 ||z|| max||e||: with N(0,1) data at D = 384 a row keeps ~2 of 512 codes.
// A row is screened only when ||z_r||^2 is finite and 4 P + S + thr_r < 2^120 (no float32 overflow
// anywhere), the codebook only when every value and sqnorm is finite.
#include "common/cpu_bf16_screen.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common/cpu_codebook_search.h"

#if defined(VQDNA_AVX2) && (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define VQDNA_BF16_SCREEN 1
#define VQDNA_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace vqdna::cpu {

namespace {

constexpr int kNV = 2;            // zmm vectors (16 codes each) per row of the screening tile
constexpr int kNB = 16 * kNV;     // codes per bf16 panel: [D2][kNB] pairs = 24 KiB at D = 384 (L1)
constexpr int kMaxCand = 32;      // candidates kept per row; more (near-ties) -> the exact search
// "auto" screens from here on: below, the exact kernel is as fast (measured, docs/design.md §2.1).
constexpr int64_t kAutoMinD = 64;
constexpr int64_t kAutoMinK = 128;  // K = 64: 1.62-1.70 ms screened vs 1.56 exact (N = 4096, D = 384)
constexpr int64_t kAutoMinN = 64;  // fewer rows do not pay for rounding the codebook
constexpr const char* kEnv = "VQDNA_NATIVE_SEARCH";

// float32 -> bf16 bits, round to nearest even (finite inputs: only bounded rows and codes get here).
inline uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace

struct ScreenedCodebook {
  AlignedBuf panels;  // uint32 bf16 pairs [n_panels][D2][kNB]
  AlignedBuf rows;    // float32 [K][D]: the exact kernel's code values, row-major for the re-check
  AlignedBuf sq;      // [n_panels * kNB]: the given ||e_k||^2, +inf on padding codes
  int64_t K = 0, D = 0, D2 = 0, n_panels = 0;
  double max_norm = 0.0, max_abs_sq = 0.0;  // M and S of the bound
  bool adaptive = true;                     // "auto": stop screening where it does not pay
  const uint32_t* panel(int64_t j) const { return reinterpret_cast<const uint32_t*>(panels.get()) + j * D2 * kNB; }
};

struct ScreenScratch {
  AlignedBuf abf;  // uint32 bf16 pairs of the block's rows: [row_panels][D2][kMR]
  std::unique_ptr<float[]> smin, lim, thr, cand_t, score;
  std::unique_ptr<int32_t[]> ncand, cand_k, pair_row, pair_code;
  std::unique_ptr<uint8_t[]> row_ok, panel_ok, overflow;
  int64_t rows_screened = 0, rows_exact = 0, candidates = 0;
};

void ScreenedCodebookDeleter::operator()(ScreenedCodebook* p) const { delete p; }
void ScreenScratchDeleter::operator()(ScreenScratch* p) const {
  auto& st = search_stats();
  st.rows_screened += p->rows_screened;
  st.rows_exact += p->rows_exact;
  st.candidates += p->candidates;
  delete p;
}

SearchStats& search_stats() {
  static SearchStats stats;
  return stats;
}

bool bf16_screen_supported() {
#ifdef VQDNA_BF16_SCREEN
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

ScreenedCodebookPtr make_screen(const char* op, const PackedCodebook& cb, int64_t n_rows) {
  auto& st = search_stats();
  st.screened = 0;
  st.rows_screened = 0;
  st.rows_exact = 0;
  st.candidates = 0;
  const char* env = std::getenv(kEnv);
  const std::string mode = env && *env ? env : "auto";
  TORCH_CHECK(mode == "auto" || mode == "exact" || mode == "bf16", op, ": ", kEnv, "=", mode,
              " is not one of auto, exact, bf16");
  st.rows_exact = n_rows;  // until the screen is set up
  if (mode == "exact") return nullptr;
  if (mode == "bf16") {
    TORCH_CHECK(bf16_screen_supported(), op, ": ", kEnv,
                "=bf16 asks for the bf16-screened search, but this CPU (or build) has no AVX512_BF16");
  } else if (!bf16_screen_supported() || cb.D < kAutoMinD || cb.K < kAutoMinK || n_rows < kAutoMinN) {
    return nullptr;
  }
  if (cb.D >= (int64_t(1) << 20)) return nullptr;  // keeps D u << 1 in the bound
  const int64_t K = cb.K, D = cb.D;
  ScreenedCodebookPtr sc(new ScreenedCodebook);
  sc->K = K;
  sc->D = D;
  sc->D2 = (D + 1) / 2;
  sc->n_panels = (K + kNB - 1) / kNB;
  const int64_t Kp = sc->n_panels * kNB;
  // The given sqnorm, as the exact kernel uses it; a non-finite one (or value) -> the exact search.
  double smax = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const float s = cb.sq.get()[k];
    if (!std::isfinite(s)) return nullptr;
    smax = std::max(smax, std::fabs(double(s)));
  }
  sc->rows = aligned_floats(K * D);
  float* rows = sc->rows.get();
  const float* panels = cb.panels.get();
  std::unique_ptr<double[]> n2(new double[K]);
  at::parallel_for(0, K, 64, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const float* src = panels + (k / kNR) * kNR * D + (k % kNR);
      double acc = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const float x = src[d * kNR];
        rows[k * D + d] = x;
        acc += double(x) * double(x);  // NaN / Inf propagate: checked below
      }
      n2[k] = acc;
    }
  });
  double nmax = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    if (!std::isfinite(n2[k])) return nullptr;
    nmax = std::max(nmax, n2[k]);
  }
  // float64 sum of squares of float32 values: relative error < D 2^-53, covered by the margin.
  sc->max_norm = std::sqrt(nmax) * (1.0 + 1e-9);
  sc->max_abs_sq = smax;
  sc->sq = aligned_floats(Kp);
  std::copy(cb.sq.get(), cb.sq.get() + K, sc->sq.get());
  std::fill(sc->sq.get() + K, sc->sq.get() + Kp, std::numeric_limits<float>::infinity());
  sc->panels = aligned_floats(sc->n_panels * sc->D2 * kNB);
  uint32_t* bp = reinterpret_cast<uint32_t*>(sc->panels.get());
  const int64_t D2 = sc->D2;
  at::parallel_for(0, Kp, 64, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t j = k / kNB, c = k % kNB;
      for (int64_t d2 = 0; d2 < D2; ++d2) {
        const int64_t d = 2 * d2;
        const uint32_t lo = k < K ? to_bf16(rows[k * D + d]) : 0;
        const uint32_t hi = k < K && d + 1 < D ? to_bf16(rows[k * D + d + 1]) : 0;
        bp[(j * D2 + d2) * kNB + c] = lo | (hi << 16);  // element 2i = dimension d, 2i+1 = d + 1
      }
    }
  });
  sc->adaptive = mode == "auto";
  st.screened = 1;
  st.rows_exact = 0;  // the blocks count their rows
  return sc;
}

bool screen_pays(const ScreenedCodebook& sc, const ScreenScratch& s) {
  // Break-even (measured at K = 512, D = 384): the screen costs ~0.55 of the exact search and a re-checked
  // candidate ~1/16 of a row's exact search, so above ~7 candidates a row the exact search is faster;
  // an overflowed row costs the screen and the exact search. Conservative: 4 a row, 1 row in 8.
  const int64_t rows = s.rows_screened + s.rows_exact;
  return !sc.adaptive || (s.candidates <= 4 * rows && 8 * s.rows_exact <= rows);
}

void count_exact_rows(ScreenScratch& s, int64_t rows) { s.rows_exact += rows; }

ScreenScratchPtr make_screen_scratch(const ScreenedCodebook& sc, int64_t mb) {
  ScreenScratchPtr s(new ScreenScratch);
  const int64_t panels = (mb + kMR - 1) / kMR, rows = panels * kMR;
  s->abf = aligned_floats(panels * sc.D2 * kMR);
  s->smin.reset(new float[rows]);
  s->lim.reset(new float[rows]);
  s->thr.reset(new float[rows]);
  s->cand_t.reset(new float[rows * kMaxCand]);
  s->score.reset(new float[rows * kMaxCand]);
  s->ncand.reset(new int32_t[rows]);
  s->cand_k.reset(new int32_t[rows * kMaxCand]);
  s->pair_row.reset(new int32_t[rows * kMaxCand]);
  s->pair_code.reset(new int32_t[rows * kMaxCand]);
  s->row_ok.reset(new uint8_t[rows]);
  s->panel_ok.reset(new uint8_t[panels]);
  s->overflow.reset(new uint8_t[rows]);
  return s;
}

namespace {

#ifdef VQDNA_BF16_SCREEN

// thr_r of the header comment for a row with float32 ||z_r||^2 = znorm (from sum_squares), or -1 when
// the row cannot be screened.
float row_threshold(float znorm, const ScreenedCodebook& sc) {
  if (!std::isfinite(znorm)) return -1.f;
  const double D = double(sc.D), u = std::ldexp(1.0, -24), u2 = std::ldexp(1.0, -23), b = std::ldexp(1.0, -8);
  const double eta = std::ldexp(1.0, -126);
  const double gD = D * u / (1.0 - D * u), gD2 = (D + 2) * u2 / (1.0 - (D + 2) * u2);
  // sum_squares (any order; FMA or a rounded product per term): |znorm - ||z||^2| <= g_(2D+2) ||z||^2 + D 2^-149.
  const double gz = (2 * D + 2) * u / (1.0 - (2 * D + 2) * u);
  const double Z = std::sqrt((double(znorm) + D * std::ldexp(1.0, -149)) / (1.0 - gz)) * (1.0 + 1e-9);
  const double M = sc.max_norm, S = sc.max_abs_sq;
  const double P = Z * M, Q = std::sqrt(D) * (Z + M);
  const double A = 8.0 * (D + 2) * eta + 4.0 * eta * Q;
  const double ds = (b * (2.0 + b) + gD2 * (1.0 + b) * (1.0 + b)) * P + A;
  const double da = gD * P + D * std::ldexp(1.0, -149);
  const double E = 2.0 * (ds + da) + u * (2.0 * S + 8.0 * P + 8.0 * A);
  const double thr = 2.0 * E * (1.0 + std::ldexp(1.0, -20));
  if (!(4.0 * P + S + thr < std::ldexp(1.0, 120))) return -1.f;
  float t = static_cast<float>(thr);
  if (double(t) < thr) t = std::nextafter(t, std::numeric_limits<float>::infinity());
  return t;
}

inline float add_up(float a, float b) {  // >= a + b (exact): one step up from the rounded sum
  return std::nextafter(a + b, std::numeric_limits<float>::infinity());
}

// Folds one tile row's screened scores t[0..kNB) (codes k0..) into the row's state; `mask`: the lanes
// with t <= the row's limit before this tile. Out of line: after the first panels it runs rarely.
__attribute__((noinline)) void screen_fold(ScreenScratch& s, int64_t row, const float* t, int32_t k0, uint64_t mask) {
  float tmin = std::numeric_limits<float>::infinity();
  for (uint64_t m = mask; m; m &= m - 1) tmin = std::min(tmin, t[__builtin_ctzll(m)]);
  if (!(tmin < std::numeric_limits<float>::infinity())) return;  // padding codes only
  if (tmin < s.smin[row]) {
    s.smin[row] = tmin;
    s.lim[row] = add_up(tmin, s.thr[row]);
  }
  const float lim = s.lim[row];
  int32_t n = s.ncand[row];
  int32_t* ck = s.cand_k.get() + row * kMaxCand;
  float* ct = s.cand_t.get() + row * kMaxCand;
  for (uint64_t m = mask; m; m &= m - 1) {
    const int c = __builtin_ctzll(m);
    if (!(t[c] <= lim)) continue;
    if (n == kMaxCand) {  // drop the ones the lower minimum has excluded (order kept)
      int32_t w = 0;
      for (int32_t i = 0; i < n; ++i) {
        if (ct[i] <= lim) {
          ck[w] = ck[i];
          ct[w] = ct[i];
          ++w;
        }
      }
      n = w;
      if (n == kMaxCand) {  // too many near-ties: the exact search takes this row
        s.overflow[row] = 1;
        s.lim[row] = -std::numeric_limits<float>::infinity();
        break;
      }
    }
    ck[n] = k0 + c;
    ct[n] = t[c];
    ++n;
  }
  s.ncand[row] = n;
}

// Exact scores of n (row, code) pairs, bit-identical to tile_6x16: acc = fma chain over d from 0 with
// the packed float32 row (apack) and code; score = fl(sq - 2 acc). Eight independent chains at a time.
void exact_pair_scores(const float* apack, int64_t D, const float* rows, const float* sq, const int32_t* prow,
                       const int32_t* pcode, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t m = std::min<int64_t>(8, n - i);
    const float* a[8];
    const float* e[8];
    for (int j = 0; j < 8; ++j) {
      const int64_t q = i + std::min<int64_t>(j, m - 1);
      const int64_t r = prow[q];
      a[j] = apack + (r / kMR) * kMR * D + (r % kMR);
      e[j] = rows + int64_t(pcode[q]) * D;
    }
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t d = 0; d < D; ++d) {
      for (int j = 0; j < 8; ++j) acc[j] = std::fma(a[j][d * kMR], e[j][d], acc[j]);
    }
    for (int64_t j = 0; j < m; ++j) out[i + j] = std::fma(-2.f, acc[j], sq[pcode[i + j]]);
  }
}

// The block's float32 row panels [D][kMR] -> bf16 pair panels [D2][kMR] (uint32: dimension 2 d2 in
// the low half, 2 d2 + 1 in the high half; a missing last dimension is 0). VCVTNEPS2BF16 rounds to
// nearest even and flushes denormals (both within the bound).
VQDNA_BF16_TARGET void pack_rows_bf16(const float* apack, int64_t row_panels, int64_t D, int64_t D2, uint32_t* out) {
  // Words of one pair step: (d, r) for r < 6 interleaved with (d + 1, r).
  const __m256i perm = _mm256_setr_epi16(0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11, 12, 13, 14, 15);
  for (int64_t p = 0; p < row_panels; ++p) {
    const float* a = apack + p * kMR * D;
    uint32_t* o = out + p * D2 * kMR;
    for (int64_t d2 = 0; d2 < D2; ++d2) {
      const __mmask16 lm = 2 * d2 + 1 < D ? 0x0FFF : 0x003F;
      const __m512 x = _mm512_maskz_loadu_ps(lm, a + 2 * d2 * kMR);
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(x);
      _mm256_mask_storeu_epi16(o + d2 * kMR, 0x0FFF, _mm256_permutexvar_epi16(perm, h));
    }
  }
}

// For one code panel (codes k0 .. k0 + kNB), every screened row panel of the block: the kMR x kNB tile of
// bf16 dot products over D2 pair steps, then t = fl(sq - 2 s) and the fold of the lanes <= the limit.
VQDNA_BF16_TARGET void screen_code_panel(const uint32_t* abf, int64_t row_panels, const uint32_t* B, int64_t D2,
                                         const float* sq, int32_t k0, ScreenScratch& s) {
  __m512 sqv[kNV];
#pragma GCC unroll 4
  for (int v = 0; v < kNV; ++v) sqv[v] = _mm512_loadu_ps(sq + 16 * v);
  const __m512 two = _mm512_set1_ps(2.f);
  for (int64_t p = 0; p < row_panels; ++p) {
    if (!s.panel_ok[p]) continue;
    const uint32_t* a = abf + p * D2 * kMR;
    __m512 c[kMR][kNV];
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) c[r][v] = _mm512_setzero_ps();
#pragma GCC unroll 2
    for (int64_t d2 = 0; d2 < D2; ++d2) {
      __m512bh b[kNV];
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) b[v] = (__m512bh)_mm512_load_si512(B + d2 * kNB + 16 * v);
      const uint32_t* ad = a + d2 * kMR;
#pragma GCC unroll 8
      for (int r = 0; r < kMR; ++r) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(ad[r]));
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], av, b[v]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const int64_t row = p * kMR + r;
      const __m512 lim = _mm512_set1_ps(s.lim[row]);
      __m512 t[kNV];
      uint64_t mask = 0;
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) {
        t[v] = _mm512_fnmadd_ps(two, c[r][v], sqv[v]);
        mask |= uint64_t(_mm512_cmp_ps_mask(t[v], lim, _CMP_LE_OQ)) << (16 * v);
      }
      if (__builtin_expect(mask != 0, 0)) {
        alignas(64) float tb[kNB];
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) _mm512_store_ps(tb + 16 * v, t[v]);
        screen_fold(s, row, tb, k0, mask);
      }
    }
  }
}

#endif  // VQDNA_BF16_SCREEN

}  // namespace

void screened_search_block(const float* apack, int64_t rows, const float* znorm, const PackedCodebook& cb,
                           const ScreenedCodebook& sc, ScreenScratch& s, float* best, int32_t* best_idx,
                           const char* prefetch, int64_t prefetch_lines) {
#ifdef VQDNA_BF16_SCREEN
  const int64_t D = sc.D, D2 = sc.D2;
  const int64_t row_panels = (rows + kMR - 1) / kMR;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  int64_t screened_panels = 0;
  for (int64_t p = 0; p < row_panels; ++p) {
    bool ok = true;
    for (int64_t r = p * kMR; r < (p + 1) * kMR; ++r) {
      s.smin[r] = kInf;
      s.ncand[r] = 0;
      s.overflow[r] = 0;
      if (r >= rows) {  // padding row of the last panel: computed, never kept
        s.thr[r] = 0.f;
        s.lim[r] = -kInf;
        s.row_ok[r] = 1;
        continue;
      }
      s.thr[r] = row_threshold(znorm[r], sc);
      s.row_ok[r] = s.thr[r] >= 0.f;
      s.lim[r] = kInf;
      ok &= bool(s.row_ok[r]);
    }
    s.panel_ok[p] = ok;
    screened_panels += ok;
  }
  uint32_t* abf = reinterpret_cast<uint32_t*>(s.abf.get());
  if (screened_panels > 0) {
    pack_rows_bf16(apack, row_panels, D, D2, abf);
    const int64_t lines_per_panel = (prefetch_lines + sc.n_panels - 1) / sc.n_panels;
    for (int64_t j = 0; j < sc.n_panels; ++j) {
      const int64_t l1 = std::min(prefetch_lines, (j + 1) * lines_per_panel);
      for (int64_t l = j * lines_per_panel; l < l1; ++l) _mm_prefetch(prefetch + l * 64, _MM_HINT_T1);
      screen_code_panel(abf, row_panels, sc.panel(j), D2, sc.sq.get() + j * kNB, static_cast<int32_t>(j * kNB), s);
    }
  } else {
    for (int64_t l = 0; l < prefetch_lines; ++l) _mm_prefetch(prefetch + l * 64, _MM_HINT_T1);
  }
  // Re-check: the candidates within the final limit, all rows of the block at once.
  int64_t n = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (!s.panel_ok[r / kMR] || s.overflow[r]) continue;
    const float lim = s.lim[r];
    const int32_t* ck = s.cand_k.get() + r * kMaxCand;
    const float* ct = s.cand_t.get() + r * kMaxCand;
    const int64_t n0 = n;
    for (int32_t i = 0; i < s.ncand[r]; ++i) {
      if (ct[i] <= lim) {
        s.pair_row[n] = static_cast<int32_t>(r);
        s.pair_code[n] = ck[i];
        ++n;
      }
    }
    if (n == n0) s.overflow[r] = 1;  // cannot happen for a bounded row; the exact search if it does
  }
  exact_pair_scores(apack, D, sc.rows.get(), sc.sq.get(), s.pair_row.get(), s.pair_code.get(), n, s.score.get());
  for (int64_t r = 0; r < rows; ++r) {
    best[r] = kInf;
    best_idx[r] = 0;
  }
  for (int64_t i = 0; i < n; ++i) {  // pairs are in row order, then increasing code: strict < keeps the lowest
    const int32_t r = s.pair_row[i];
    if (s.score[i] < best[r]) {
      best[r] = s.score[i];
      best_idx[r] = s.pair_code[i];
    }
  }
  s.candidates += n;
  // The rows the screen did not settle: their whole panel through the exact kernel.
  for (int64_t p = 0; p < row_panels; ++p) {
    bool exact = !s.panel_ok[p];
    for (int64_t r = p * kMR; r < std::min(rows, (p + 1) * kMR); ++r) exact |= bool(s.overflow[r]);
    const int64_t pr = std::min(kMR, rows - p * kMR);
    if (exact) {
      alignas(64) float b6[kMR];
      alignas(64) int32_t i6[kMR];
      search_block(apack + p * kMR * D, 1, cb, b6, i6);
      std::copy(b6, b6 + pr, best + p * kMR);
      std::copy(i6, i6 + pr, best_idx + p * kMR);
      s.rows_exact += pr;
    } else {
      s.rows_screened += pr;
    }
  }
#else
  (void)apack, (void)rows, (void)znorm, (void)cb, (void)sc, (void)s, (void)best, (void)best_idx, (void)prefetch,
      (void)prefetch_lines;
  TORCH_CHECK(false, "vqdna: the bf16-screened search is not compiled into this build");
#endif
}

}  // namespace vqdna::cpu
