// Native CPU sample_codes (the spec: vqdna/kernels/reference.py:sample_codes). The torch path spends
// its time in passes over [rows, K] blocks: uniform_ (its serial loop calls the generator once per
// element through an exported function), clamp, log, neg, log, sqrt, div, add, argmin, each a full
// read and write. Here, per block of block_rows rows:
//  * the distances come from the same ATen calls as the spec (|z|^2 + |e|^2, then addmm with alpha -2;
//    cosine: mm), so their bits are the spec's;
//  * the block's uniforms are drawn from a copy of the default CPU generator's mt19937 engine, taken
//    and written back under the generator's mutex, with the transformation of at::uniform_real_distribution
//    <float> (the low 24 bits of each 32-bit output times 2^-24), in row-major order: the numbers torch's
//    uniform_ draws, and the generator ends in the state it would;
//  * one parallel pass over the rows computes the noise log(-log(max(u, 1e-20))) with the SLEEF logf
//    torch's log uses (exported by libtorch_cpu), the logits, and the argmin in registers, and writes
//    the chosen codebook row and its squared distance while the row of z is in cache; one thread first
//    draws the next block's numbers (double-buffered), so the serial draws overlap the rows.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <limits>
#include <atomic>
#include <mutex>

#include "common/cpu_buffers.h"

#ifdef VQDNA_AVX2
extern "C" __m256 Sleef_logf8_u10(__m256);  // libtorch_cpu's: at::vec::Vectorized<float>::log's
#endif

namespace {

using namespace vqdna::cpu;

constexpr float kTwoToMinus24 = 1.0f / 16777216.0f;

// The outputs of at::mt19937 (the CPU generator's engine) as torch's uniform_ turns them into float32
// (at::uniform_real_distribution<float>: the low 24 bits times 2^-24), in bulk: the state is
// regenerated 624 words at a time and tempered 8 at a time (AVX2) instead of one call per number.
// Same numbers, same final state (data_pod: left_ - 1 words of the current state remain, the next at
// next_) as that many engine() calls.
class UniformStream {
 public:
  explicit UniformStream(const at::mt19937& engine) : d_(engine.data()) {}
  at::mt19937 engine() const {
    at::mt19937 e;
    e.set_data(d_);
    return e;
  }
  void fill(float* out, int64_t count) {
    int64_t i = 0;
    while (i < count) {
      if (d_.left_ == 1) {  // the engine's next call would regenerate the state
        twist(d_.state_.data());
        d_.left_ = kN + 1;
        d_.next_ = 0;
      }
      const int64_t take = std::min<int64_t>(d_.left_ - 1, count - i);
      temper(d_.state_.data() + d_.next_, out + i, take);
      d_.next_ += static_cast<uint32_t>(take);
      d_.left_ -= static_cast<int>(take);
      i += take;
    }
  }

 private:
  static constexpr int kN = 624, kM = 397;
  static constexpr uint32_t kMatrixA = 0x9908b0dfu, kUpper = 0x80000000u, kLower = 0x7fffffffu;
  at::mt19937_data_pod d_;

  static uint32_t twist1(uint32_t u, uint32_t v) {
    return (((u & kUpper) | (v & kLower)) >> 1) ^ ((v & 1u) ? kMatrixA : 0u);
  }
  // at::mt19937's next_state: s[i] = s[i + M] ^ twist(s[i], s[i + 1]) for i < N - M (old words
  // ahead), then s[i] = s[i + M - N] ^ twist(s[i], s[i + 1]) (new words 227 behind: 8 at a time is safe).
  static void twist(uint32_t* s) {
    int i = 0;
#ifdef VQDNA_AVX2
    const __m256i upper = _mm256_set1_epi32(static_cast<int>(kUpper)), lower = _mm256_set1_epi32(kLower);
    const __m256i one = _mm256_set1_epi32(1), matrix = _mm256_set1_epi32(static_cast<int>(kMatrixA));
    auto step8 = [&](int at, int from) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + at));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + at + 1));
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + from));
      const __m256i y = _mm256_or_si256(_mm256_and_si256(a, upper), _mm256_and_si256(b, lower));
      const __m256i mag = _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_and_si256(b, one), one), matrix);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(s + at),
                          _mm256_xor_si256(c, _mm256_xor_si256(_mm256_srli_epi32(y, 1), mag)));
    };
    for (; i + 8 <= kN - kM; i += 8) step8(i, i + kM);
#endif
    for (; i < kN - kM; ++i) s[i] = s[i + kM] ^ twist1(s[i], s[i + 1]);
#ifdef VQDNA_AVX2
    for (; i + 8 <= kN - 1; i += 8) step8(i, i + kM - kN);
#endif
    for (; i < kN - 1; ++i) s[i] = s[i + kM - kN] ^ twist1(s[i], s[i + 1]);
    s[kN - 1] = s[kM - 1] ^ twist1(s[kN - 1], s[0]);
  }
  static float to_uniform(uint32_t y) {
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= (y >> 18);
    return static_cast<float>(y & 0xFFFFFFu) * kTwoToMinus24;
  }
  static void temper(const uint32_t* s, float* out, int64_t n) {
    int64_t i = 0;
#ifdef VQDNA_AVX2
    const __m256i b = _mm256_set1_epi32(static_cast<int>(0x9d2c5680u)), c = _mm256_set1_epi32(static_cast<int>(0xefc60000u));
    const __m256i low24 = _mm256_set1_epi32(0xFFFFFF);
    const __m256 scale = _mm256_set1_ps(kTwoToMinus24);
    for (; i + 8 <= n; i += 8) {
      __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
      y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 11));
      y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 7), b));
      y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 15), c));
      y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 18));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(y, low24)), scale));
    }
#endif
    for (; i < n; ++i) out[i] = to_uniform(s[i]);
  }
};

inline float noise_scalar(float u) { return std::log(-std::log(u < 1e-20f ? 1e-20f : u)); }

// The code of one row: argmin_k of v_k = sqrt(max(l_k, 1e-8)) / temp + g_k, or with kCosine of
// g_k - l_k / temp (= -(l_k / temp - g_k) exactly: the spec's argmax), g_k the noise of u_k. Ties: the
// first index; a NaN v wins at its first occurrence (torch's argmin / argmax).
// Most codes cannot win: v_k is at least its lower bound v_lb_k (the noise bounded below by
// log(1 - u) >= ln2 floor(log2(1 - u)), since -log u >= 1 - u), and a group of 8 codes whose every
// v_lb exceeds an exact v already known (the group of the smallest v_lb) is skipped without its two
// logs. Skipped codes have v > the minimum, so the argmin, its ties and NaN rule are unchanged.
// qs, lbs: K floats of scratch (the per-code distance term and v_lb).
template <bool kCosine>
int64_t row_code(const float* L, const float* U, int64_t K, float temp, float* qs, float* lbs) {
  auto value = [&](float l, float g) {
    if constexpr (kCosine) {
      return g - l / temp;
    } else {
      const float c = l < 1e-8f ? 1e-8f : l;  // NaN stays NaN, as clamp_min
      return std::sqrt(c) / temp + g;
    }
  };
  int64_t k = 0, best_k = 0;
  float best = std::numeric_limits<float>::infinity();
  bool nan = false;
#ifdef VQDNA_AVX2
  const __m256 tiny = _mm256_set1_ps(1e-20f), floor = _mm256_set1_ps(1e-8f), t = _mm256_set1_ps(temp);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 bv = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256i bi = _mm256_setzero_si256(), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i eight = _mm256_set1_epi32(8);
  __m256 unordered = _mm256_setzero_ps();
  const int64_t full = K / 8 * 8;
  // Pass 1: the distance term q (sqrt(max(l, 1e-8)) / temp, or l / temp) and v_lb of every code, and
  // the group of the smallest v_lb. noise >= ln2 E - 1e-4, E the binary exponent of 1 - u (exact: u is
  // a multiple of 2^-24, or 1e-20 where 1 - u rounds to 1 and the noise is 3.8); the margin covers the
  // SLEEF logs' 1-ulp errors. fl(q + lb) <= fl(q + noise): rounding is monotone.
  float bound = std::numeric_limits<float>::infinity();
  if (full > 0) {
    const __m256 one = _mm256_set1_ps(1.f), ln2 = _mm256_set1_ps(0.693147182f), margin = _mm256_set1_ps(1e-4f);
    const __m256i bias = _mm256_set1_epi32(127);
    __m256 mv = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    __m256i mg = _mm256_setzero_si256();
    for (int64_t j = 0; j < full; j += 8) {
      const __m256 u = _mm256_max_ps(tiny, _mm256_loadu_ps(U + j));
      const __m256 w = _mm256_sub_ps(one, u);
      const __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(w), 23), bias));
      const __m256 lb = _mm256_sub_ps(_mm256_mul_ps(e, ln2), margin);
      const __m256 l = _mm256_loadu_ps(L + j);
      __m256 q, vlb;
      if constexpr (kCosine) {
        q = _mm256_div_ps(l, t);
        vlb = _mm256_sub_ps(lb, q);
      } else {
        q = _mm256_div_ps(_mm256_sqrt_ps(_mm256_max_ps(floor, l)), t);  // max(floor, NaN) = NaN
        vlb = _mm256_add_ps(q, lb);
      }
      _mm256_storeu_ps(qs + j, q);
      _mm256_storeu_ps(lbs + j, vlb);
      const __m256 lt = _mm256_cmp_ps(vlb, mv, _CMP_LT_OQ);
      mv = _mm256_blendv_ps(mv, vlb, lt);
      mg = _mm256_blendv_epi8(mg, _mm256_set1_epi32(static_cast<int>(j)), _mm256_castps_si256(lt));
    }
    alignas(32) float lane_v[8];
    alignas(32) int32_t lane_g[8];
    _mm256_store_ps(lane_v, mv);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lane_g), mg);
    int64_t group = lane_g[0];
    float m = lane_v[0];
    for (int j = 1; j < 8; ++j) {
      if (lane_v[j] < m) {
        m = lane_v[j];
        group = lane_g[j];
      }
    }
    const __m256 u = _mm256_max_ps(tiny, _mm256_loadu_ps(U + group));
    const __m256 g = Sleef_logf8_u10(_mm256_xor_ps(Sleef_logf8_u10(u), sign));
    const __m256 q = _mm256_loadu_ps(qs + group);
    alignas(32) float v8[8];
    _mm256_store_ps(v8, kCosine ? _mm256_sub_ps(g, q) : _mm256_add_ps(q, g));
    for (int j = 0; j < 8; ++j) bound = v8[j] < bound ? v8[j] : bound;  // NaN never lowers it
  }
  const __m256 bnd = _mm256_set1_ps(bound);
  // Pass 2: the exact v of the groups that can win, in order (the argmin and its tie rule as a full scan).
  for (; k < full; k += 8) {
    if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(lbs + k), bnd, _CMP_GT_OQ)) == 0xFF) {
      idx = _mm256_add_epi32(idx, eight);
      continue;
    }
    const __m256 u = _mm256_max_ps(tiny, _mm256_loadu_ps(U + k));
    const __m256 g = Sleef_logf8_u10(_mm256_xor_ps(Sleef_logf8_u10(u), sign));
    const __m256 q = _mm256_loadu_ps(qs + k);
    const __m256 v = kCosine ? _mm256_sub_ps(g, q) : _mm256_add_ps(q, g);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256 lt = _mm256_cmp_ps(v, bv, _CMP_LT_OQ);
    bv = _mm256_blendv_ps(bv, v, lt);
    bi = _mm256_blendv_epi8(bi, idx, _mm256_castps_si256(lt));
    idx = _mm256_add_epi32(idx, eight);
  }
  alignas(32) float lane_v[8];
  alignas(32) int32_t lane_i[8];
  _mm256_store_ps(lane_v, bv);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_i), bi);
  nan = !_mm256_testz_ps(unordered, unordered);
  if (k > 0) {
    best = lane_v[0];
    best_k = lane_i[0];
    for (int j = 1; j < 8; ++j) {
      if (lane_v[j] < best || (lane_v[j] == best && lane_i[j] < best_k)) {
        best = lane_v[j];
        best_k = lane_i[j];
      }
    }
  }
  if (k < K) {  // the tail: one padded vector, so its noise has the same bits as a full one's
    alignas(32) float u8[8], l8[8], v8[8];
    for (int j = 0; j < 8; ++j) {
      u8[j] = k + j < K ? U[k + j] : 0.5f;
      l8[j] = k + j < K ? L[k + j] : 0.f;
    }
    const __m256 u = _mm256_max_ps(tiny, _mm256_load_ps(u8));
    _mm256_store_ps(v8, Sleef_logf8_u10(_mm256_xor_ps(Sleef_logf8_u10(u), sign)));
    for (int64_t j = 0; k + j < K; ++j) {
      const float v = value(l8[j], v8[j]);
      if (std::isnan(v)) nan = true;
      if (v < best) {
        best = v;
        best_k = k + j;
      }
    }
  }
  if (!nan) return best_k;
  // A NaN somewhere (a non-finite row of z): torch returns its first NaN.
  for (int64_t j = 0; j < K; j += 8) {
    alignas(32) float u8[8], v8[8];
    for (int i = 0; i < 8; ++i) u8[i] = j + i < K ? U[j + i] : 0.5f;
    _mm256_store_ps(v8, Sleef_logf8_u10(_mm256_xor_ps(Sleef_logf8_u10(_mm256_max_ps(tiny, _mm256_load_ps(u8))), sign)));
    for (int i = 0; i < 8 && j + i < K; ++i) {
      if (std::isnan(value(L[j + i], v8[i]))) return j + i;
    }
  }
  return best_k;
#else
  // Portable build: libm's logf (its last bit may differ from torch's SLEEF log); no pruning.
  (void)qs;
  (void)lbs;
  for (; k < K; ++k) {
    const float v = value(L[k], noise_scalar(U[k]));
    if (std::isnan(v)) return k;
    if (v < best) {
      best = v;
      best_k = k;
    }
  }
  (void)nan;
  return best_k;
#endif
}

// The chosen row's epilogue: quantized row = e (copied), returns ||z - e||^2 (float32, 8 lanes).
inline float copy_row_and_sqdist(const float* z, const float* e, float* q, int64_t D) {
  std::memcpy(q, e, D * sizeof(float));
  int64_t d = 0;
  float acc = 0.f;
#ifdef VQDNA_AVX2
  __m256 a = _mm256_setzero_ps();
  for (; d + 8 <= D; d += 8) {
    const __m256 t = _mm256_sub_ps(_mm256_loadu_ps(z + d), _mm256_loadu_ps(e + d));
    a = _mm256_fmadd_ps(t, t, a);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, a);
  for (int j = 0; j < 8; ++j) acc += lanes[j];
#endif
  for (; d < D; ++d) {
    const float t = z[d] - e[d];
    acc += t * t;
  }
  return acc;
}

// z [N, D] with codebook [K, D], or per-head codebooks: z [N, C, D] with codebook [C, K, D] (codes,
// dist [N, C], quantized [N, C, D]; head c of every row sampled from codebook c). The heads are
// sampled one after the other, each in blocks of block_rows rows, and draw in that order: codebook
// 0's N K uniforms first (the uniforms of [C, N, K] row-major: C single-codebook calls on z[:, c]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_codes_native_cpu(const at::Tensor& z_in, const at::Tensor& codebook_in,
                                                                       double temp, bool cosine, int64_t block_rows,
                                                                       const std::optional<at::Tensor>& seed) {
  const at::Tensor& z = z_in;
  // A seed selects the counter-based (Philox) noise of the Triton backend; this kernel draws the
  // torch generator's stream (the peer's numbers) only.
  TORCH_CHECK(!seed.has_value(), "vqdna.sample_codes_native: draws the torch generator's stream; a Philox seed is for the "
              "triton and reference backends");
  TORCH_CHECK(z.device().is_cpu() && codebook_in.device().is_cpu(), "vqdna.sample_codes_native: z and codebook must be CPU tensors, got ",
              z.device(), " and ", codebook_in.device());
  const bool heads = codebook_in.dim() == 3;
  if (heads) {
    TORCH_CHECK(z.dim() == 3 && z.size(1) == codebook_in.size(0) && z.size(2) == codebook_in.size(2),
                "vqdna.sample_codes_native: need z [N, C, D] with codebook [C, K, D], got ", z.sizes(), " and ", codebook_in.sizes());
    TORCH_CHECK(codebook_in.size(0) >= 1, "vqdna.sample_codes_native: codebook ", codebook_in.sizes(), " has no codebooks (C = 0)");
  } else {
    TORCH_CHECK(z.dim() == 2 && codebook_in.dim() == 2 && z.size(1) == codebook_in.size(1),
                "vqdna.sample_codes_native: need z [N, D] and codebook [K, D] (or z [N, C, D] and codebook [C, K, D]), got ",
                z.sizes(), " and ", codebook_in.sizes());
  }
  TORCH_CHECK(z.scalar_type() == at::kFloat && codebook_in.scalar_type() == at::kFloat,
              "vqdna.sample_codes_native: z and codebook must be float32, got ", z.scalar_type(), " and ", codebook_in.scalar_type());
  TORCH_CHECK(codebook_in.size(-2) >= 1, "vqdna.sample_codes_native: the codebook is empty (K = 0)");
  TORCH_CHECK(temp > 0, "vqdna.sample_codes_native: temp must be > 0, got ", temp);
  TORCH_CHECK(block_rows >= 1, "vqdna.sample_codes_native: block_rows must be >= 1, got ", block_rows);
  const int64_t N = z.size(0), C = heads ? codebook_in.size(0) : 1, K = codebook_in.size(-2), D = z.size(-1);
  const auto lead = z.sizes().slice(0, z.dim() - 1);  // [N] or [N, C]
  at::Tensor codes = at::empty(lead, z.options().dtype(at::kLong));
  at::Tensor quantized = at::empty(z.sizes(), z.options());
  at::Tensor dist = at::empty(lead, z.options());
  if (N == 0) return {codes, quantized, dist};
  // Rows read in place (VectorQuantizer's heads: a row stride of C D), unit column stride.
  const at::Tensor zr = z.stride(-1) == 1 || D == 1 ? z : z.contiguous();
  const at::Tensor codebook = codebook_in.contiguous();
  float* q_p = quantized.mutable_data_ptr<float>();
  float* dist_p = dist.mutable_data_ptr<float>();
  const int64_t step = std::min(block_rows, N);
  at::Tensor logits_buf = at::empty({step, K}, z.options());
  const float tempf = static_cast<float>(temp);  // as a float32 tensor op converts the Python scalar
  int64_t* codes_p = codes.mutable_data_ptr<int64_t>();
  // Two uniform buffers: while the threads score block b's rows, one of them first draws block b + 1's
  // numbers (serial by nature; the next head's first block after a head's last) into the other buffer,
  // then joins the rows.
  AlignedBuf ubuf[2] = {aligned_floats(step * K), aligned_floats(step * K)};
  constexpr int64_t kRowsPerTake = 8;
  const int64_t blocks_per_head = (N + step - 1) / step, blocks = C * blocks_per_head;
  auto block_size = [&](int64_t b) { return b < blocks ? std::min(step, N - b % blocks_per_head * step) : int64_t{0}; };

  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  UniformStream stream(gen->engine());
  stream.fill(ubuf[0].get(), step * K);
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  at::Tensor zh, cb, et, e_sq;  // head c's rows [N, D] (the caller's strides), codebook [K, D] and its operands
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t c = b / blocks_per_head, start = b % blocks_per_head * step;
    const int64_t m = block_size(b), next_m = block_size(b + 1);
    if (start == 0) {
      zh = heads ? z.select(1, c) : z;
      cb = heads ? codebook.select(0, c) : codebook;
      et = cb.t();
      e_sq = cb.pow(2).sum(-1);
    }
    const at::Tensor r = zh.narrow(0, start, m);
    at::Tensor logits = logits_buf.narrow(0, 0, m);
    if (cosine) {
      at::mm_out(logits, r, et);
    } else {
      at::add_out(logits, r.pow(2).sum(-1, true), e_sq);
      logits.addmm_(r, et, 1.0, -2.0);
    }
    const float* L = logits.const_data_ptr<float>();
    const float* U = ubuf[b & 1].get();
    float* U_next = ubuf[(b + 1) & 1].get();
    const float* cb_p = cb.const_data_ptr<float>();
    const float* z_p = zr.const_data_ptr<float>() + c * (heads ? zr.stride(1) : 0);
    const int64_t z_rs = zr.stride(0);
    std::atomic<int64_t> taken{0};
    at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
      AlignedBuf scratch = aligned_floats(2 * K);
      float* qs = scratch.get();
      float* lbs = qs + K;
      if (t0 == 0 && next_m > 0) stream.fill(U_next, next_m * K);
      for (int64_t i0; (i0 = taken.fetch_add(kRowsPerTake)) < m;) {
        const int64_t i1 = std::min(m, i0 + kRowsPerTake);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t code = cosine ? row_code<true>(L + i * K, U + i * K, K, tempf, qs, lbs)
                                      : row_code<false>(L + i * K, U + i * K, K, tempf, qs, lbs);
          const int64_t row = start + i, out = row * C + c;  // [N, C] outputs (C = 1: [N])
          codes_p[out] = code;
          dist_p[out] = copy_row_and_sqdist(z_p + row * z_rs, cb_p + code * D, q_p + out * D, D);
        }
      }
      (void)t1;
    });
  }
  gen->set_engine(stream.engine());
  return {codes, quantized, dist};
}

}  // namespace

TORCH_LIBRARY_IMPL(vqdna, CPU, m) { m.impl("sample_codes_native", &sample_codes_native_cpu); }
