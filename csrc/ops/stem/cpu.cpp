// Native CPU fused stem (docs/design.md §2.5): y[t] = bias + sum_j W[:, x[t + j - W/2], j] as a gather-sum over
// base ids (the one-hot tensor is never built), then LayerNorm and exact (erf) GELU, all in float32.
//
// Design: the weight is repacked once per call into a table of [W][6][D] float32 rows (channel 5, the
// pad id, is a zero row; the bias is folded into the centre tap's rows, whose base is always inside
// the record). One task handles a run of positions; per position the W table rows are summed into a
// D-float buffer that stays in L1 (pass 1, also the mean), the centred sum of squares is pass 2, and
// pass 3 normalises, applies GELU and writes the row once in the output dtype. So the [B, L, D]
// pre-activation never leaves the core and the output is the only large memory stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "common/cpu_buffers.h"

namespace {

using namespace vqdna::cpu;

constexpr int64_t kChannels = 6;  // A C G T N + the all-zero pad row
constexpr uint32_t kPad = 5;

// erf with a maximum error of about 1 ulp (N. Juffa's minimax erff), the same polynomial in the scalar
// and AVX2 paths so both round alike.
inline float erf_scalar(float a) {
  const float t = std::fabs(a), s = a * a;
  float r;
  if (t > 0.927734375f) {
    r = std::fma(-1.72853470e-5f, t, 3.83197126e-4f);
    const float u = std::fma(-3.88396438e-3f, t, 2.42546219e-2f);
    r = std::fma(r, s, u);
    r = std::fma(r, t, -1.06777877e-1f);
    r = std::fma(r, t, -6.34846687e-1f);
    r = std::fma(r, t, -1.28717512e-1f);
    r = std::fma(r, t, -t);
    r = 1.0f - std::exp(r);
    r = std::copysign(r, a);
  } else {
    r = -5.96761703e-4f;
    r = std::fma(r, s, 4.99119423e-3f);
    r = std::fma(r, s, -2.67681349e-2f);
    r = std::fma(r, s, 1.12819925e-1f);
    r = std::fma(r, s, -3.76125336e-1f);
    r = std::fma(r, s, 1.28379166e-1f);
    r = std::fma(r, a, a);
  }
  return r;
}

inline float gelu_scalar(float x) { return 0.5f * x * (1.0f + erf_scalar(x * 0.70710678118654752f)); }

template <typename Out>
inline Out from_float(float v) {
  return static_cast<Out>(v);  // c10::BFloat16 / c10::Half round to nearest even
}

#ifdef VQDNA_AVX2
// exp for x <= 0 (Cephes' expf polynomial): inputs below -88.37 give 0 or a denormal, NaN gives a
// finite value (the caller multiplies by x, so NaN still propagates to the output).
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  // 2^fx; fx = -127 (x clamped at the bottom) gives the bit pattern 0, i.e. a result of 0.
  e = _mm256_max_epi32(e, _mm256_setzero_si256());
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
}

inline __m256 erf256(__m256 a) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 t = _mm256_andnot_ps(sign, a);
  const __m256 s = _mm256_mul_ps(a, a);
  // |a| > 0.927734375
  __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(-1.72853470e-5f), t, _mm256_set1_ps(3.83197126e-4f));
  const __m256 u = _mm256_fmadd_ps(_mm256_set1_ps(-3.88396438e-3f), t, _mm256_set1_ps(2.42546219e-2f));
  r = _mm256_fmadd_ps(r, s, u);
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-1.06777877e-1f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-6.34846687e-1f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-1.28717512e-1f));
  r = _mm256_fmadd_ps(r, t, _mm256_xor_ps(t, sign));
  r = _mm256_sub_ps(_mm256_set1_ps(1.0f), exp256(r));
  const __m256 big = _mm256_or_ps(r, _mm256_and_ps(a, sign));  // copysign (r >= 0 here)
  // |a| <= 0.927734375
  __m256 q = _mm256_set1_ps(-5.96761703e-4f);
  q = _mm256_fmadd_ps(q, s, _mm256_set1_ps(4.99119423e-3f));
  q = _mm256_fmadd_ps(q, s, _mm256_set1_ps(-2.67681349e-2f));
  q = _mm256_fmadd_ps(q, s, _mm256_set1_ps(1.12819925e-1f));
  q = _mm256_fmadd_ps(q, s, _mm256_set1_ps(-3.76125336e-1f));
  q = _mm256_fmadd_ps(q, s, _mm256_set1_ps(1.28379166e-1f));
  q = _mm256_fmadd_ps(q, a, a);
  return _mm256_blendv_ps(q, big, _mm256_cmp_ps(t, _mm256_set1_ps(0.927734375f), _CMP_GT_OQ));
}

inline __m256 gelu256(__m256 x) {
  const __m256 e = erf256(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

// Lanes [0, n) set, for the tail chunk of a row.
inline __m256i tail_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx);
}

// Stores 8 floats as Out (the first n lanes only when n < 8).
template <typename Out>
inline void store8(Out* dst, __m256 v, int64_t n) {
  if constexpr (std::is_same_v<Out, float>) {
    if (n == 8) {
      _mm256_storeu_ps(dst, v);
    } else {
      _mm256_maskstore_ps(dst, tail_mask(n), v);
    }
  } else {
    __m128i h;
    if constexpr (std::is_same_v<Out, c10::Half>) {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      // bfloat16, round to nearest even; NaN stays NaN (quiet bit set before the truncation).
      const __m256i bits = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
      const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
      rounded = _mm256_castps_si256(_mm256_blendv_ps(
          _mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_or_si256(bits, _mm256_set1_epi32(0x00400000))),
          nan));
      const __m256i hi = _mm256_srli_epi32(rounded, 16);
      h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(hi, hi), 0xD8));
    }
    if (n == 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), h);
    } else {
      alignas(16) uint16_t tmp[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
      std::memcpy(dst, tmp, n * sizeof(uint16_t));
    }
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// One output row: rows[j] are the W table rows of this position (bias already in the centre one),
// y a D-float scratch buffer. LayerNorm in two passes over the L1-resident buffer (a one-pass
// E[y^2] - mean^2 would cancel catastrophically when |mean| >> std).
template <typename Out>
inline void stem_row(const float* const* rows, int64_t W, int64_t D, const float* g, const float* beta, float eps,
                     float* y, Out* out) {
  int64_t d = 0;
  float mean = 0.f, var = 0.f;
#ifdef VQDNA_AVX2
  __m256 vs = _mm256_setzero_ps();
  for (; d + 8 <= D; d += 8) {
    __m256 acc = _mm256_loadu_ps(rows[0] + d);
    for (int64_t j = 1; j < W; ++j) acc = _mm256_add_ps(acc, _mm256_loadu_ps(rows[j] + d));
    _mm256_storeu_ps(y + d, acc);
    vs = _mm256_add_ps(vs, acc);
  }
  mean = hsum(vs);
#endif
  for (; d < D; ++d) {
    float acc = rows[0][d];
    for (int64_t j = 1; j < W; ++j) acc += rows[j][d];
    y[d] = acc;
    mean += acc;
  }
  mean /= static_cast<float>(D);
  d = 0;
#ifdef VQDNA_AVX2
  const __m256 vmean = _mm256_set1_ps(mean);
  __m256 vv = _mm256_setzero_ps();
  for (; d + 8 <= D; d += 8) {
    const __m256 c = _mm256_sub_ps(_mm256_loadu_ps(y + d), vmean);
    vv = _mm256_fmadd_ps(c, c, vv);
  }
  var = hsum(vv);
#endif
  for (; d < D; ++d) {
    const float c = y[d] - mean;
    var += c * c;
  }
  const float rstd = 1.0f / std::sqrt(var / static_cast<float>(D) + eps);
  d = 0;
#ifdef VQDNA_AVX2
  const __m256 vrstd = _mm256_set1_ps(rstd);
  for (; d < D; d += 8) {
    const int64_t n = std::min<int64_t>(8, D - d);
    __m256 c, gv, bv;
    if (n == 8) {
      c = _mm256_loadu_ps(y + d);
      gv = _mm256_loadu_ps(g + d);
      bv = _mm256_loadu_ps(beta + d);
    } else {
      const __m256i m = tail_mask(n);
      c = _mm256_maskload_ps(y + d, m);
      gv = _mm256_maskload_ps(g + d, m);
      bv = _mm256_maskload_ps(beta + d, m);
    }
    const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(c, vmean), vrstd);
    store8(out + d, gelu256(_mm256_fmadd_ps(xhat, gv, bv)), n);
  }
#else
  for (; d < D; ++d) out[d] = from_float<Out>(gelu_scalar((y[d] - mean) * rstd * g[d] + beta[d]));
#endif
}

template <typename Id>
void check_ids(const Id* ids, int64_t B, int64_t L) {
  // One cheap vectorisable pass (a byte or a word per base against D output floats per base); the
  // slow search for the first offender only runs when there is one.
  bool bad = false;
  const int64_t n = B * L;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint64_t>(ids[i]) > kPad;
  if (!bad) return;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(static_cast<uint64_t>(ids[i]) <= kPad, "stem: ids[", i / L, ", ", i % L, "] = ",
                      static_cast<int64_t>(ids[i]), " is not a base id (0..4) or the pad id 5");
  }
}

template <typename Id, typename Out>
void stem_kernel(const Id* ids, int64_t B, int64_t L, const float* table, int64_t W, int64_t D, const float* g,
                 const float* beta, float eps, Out* out) {
  const int64_t half = W / 2, n = B * L;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1));
  at::parallel_for(0, n, grain, [&](int64_t p0, int64_t p1) {
    AlignedBuf y = aligned_floats(D);
    std::vector<const float*> rows(W);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / L, t = p % L;
      const Id* x = ids + b * L;
      // Centre tap first: its row carries the bias. Off-edge taps read the zero pad row.
      rows[0] = table + (half * kChannels + static_cast<int64_t>(x[t])) * D;
      int64_t r = 1;
      for (int64_t j = 0; j < W; ++j) {
        if (j == half) continue;
        const int64_t s = t + j - half;
        const int64_t c = (s >= 0 && s < L) ? static_cast<int64_t>(x[s]) : kPad;
        rows[r++] = table + (j * kChannels + c) * D;
      }
      stem_row<Out>(rows.data(), W, D, g, beta, eps, y.get(), out + p * D);
    }
  });
}

at::Tensor stem_native_cpu(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& ln_weight, const at::Tensor& ln_bias, double ln_eps,
                           at::ScalarType out_dtype) {
  for (const at::Tensor* t : {&ids, &weight, &bias, &ln_weight, &ln_bias}) {
    TORCH_CHECK(t->device().is_cpu(), "vqdna.stem_native: all inputs must be CPU tensors, got one on ", t->device());
  }
  TORCH_CHECK(ids.dim() == 2, "stem: ids must be [B, L], got shape ", ids.sizes());
  const auto it = ids.scalar_type();
  TORCH_CHECK(it == at::kByte || it == at::kInt || it == at::kLong, "vqdna.stem_native: ids must be uint8, int32 or int64, got ",
              it);
  TORCH_CHECK(weight.dim() == 3 && weight.size(1) == 5 && weight.size(2) % 2 == 1,
              "stem: weight must be [D, 5, odd width], got ", weight.sizes());
  const int64_t D = weight.size(0), W = weight.size(2);
  TORCH_CHECK(D >= 1, "stem: D must be >= 1");
  for (const at::Tensor* t : {&bias, &ln_weight, &ln_bias}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == D, "stem: bias, ln_weight and ln_bias must be [D] = [", D, "], got ",
                t->sizes());
  }
  for (const at::Tensor* t : {&weight, &bias, &ln_weight, &ln_bias}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "vqdna.stem_native: parameters must be float32, got ", t->scalar_type());
  }
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "vqdna.stem_native: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);

  const at::Tensor idc = ids.contiguous();
  const int64_t B = idc.size(0), L = idc.size(1);
  at::Tensor out = at::empty({B, L, D}, weight.options().dtype(out_dtype));
  if (B * L == 0) return out;
  // The output is the only large stream and is freshly allocated: its first-touch page faults cost
  // about as much as the writes, which huge pages (where the system allows them) mostly remove.
  advise_huge_pages(out.data_ptr(), static_cast<size_t>(out.nbytes()));

  // table[(j * 6 + c) * D + d] = W[d, c, j] (c < 5), 0 for the pad channel; + bias on the centre tap.
  const at::Tensor wc = weight.contiguous(), bc = bias.contiguous();
  const at::Tensor gc = ln_weight.contiguous(), betac = ln_bias.contiguous();
  AlignedBuf table = aligned_floats(W * kChannels * D);
  const float* wp = wc.const_data_ptr<float>();
  const float* bp = bc.const_data_ptr<float>();
  const int64_t half = W / 2;
  for (int64_t j = 0; j < W; ++j) {
    for (int64_t c = 0; c < kChannels; ++c) {
      float* row = table.get() + (j * kChannels + c) * D;
      for (int64_t d = 0; d < D; ++d) {
        row[d] = (c < 5 ? wp[(d * 5 + c) * W + j] : 0.f) + (j == half ? bp[d] : 0.f);
      }
    }
  }

  const float eps = static_cast<float>(ln_eps);
  auto run = [&](auto id_tag) {
    using Id = decltype(id_tag);
    const Id* ip = idc.const_data_ptr<Id>();
    check_ids(ip, B, L);
    const float* gp = gc.const_data_ptr<float>();
    const float* betap = betac.const_data_ptr<float>();
    if (out_dtype == at::kFloat) {
      stem_kernel<Id, float>(ip, B, L, table.get(), W, D, gp, betap, eps, out.mutable_data_ptr<float>());
    } else if (out_dtype == at::kBFloat16) {
      stem_kernel<Id, c10::BFloat16>(ip, B, L, table.get(), W, D, gp, betap, eps, out.mutable_data_ptr<c10::BFloat16>());
    } else {
      stem_kernel<Id, c10::Half>(ip, B, L, table.get(), W, D, gp, betap, eps, out.mutable_data_ptr<c10::Half>());
    }
  };
  if (it == at::kByte) {
    run(uint8_t{});
  } else if (it == at::kInt) {
    run(int32_t{});
  } else {
    run(int64_t{});
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vqdna, CPU, m) { m.impl("stem_native", &stem_native_cpu); }
