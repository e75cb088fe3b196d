// Native CPU HRQ residual doubling (docs/design.md §2.2), all levels of a block of rows in one task:
// level 0 searches C_0 with Z_0; level l >= 1 forms H_l = T(T(2 Z_l) - C_{l-1}[M_{l-1}]) in float32,
// rounded to the input dtype T (as the reference does), and packs it straight into the search
// panels, so H_l only ever exists in a thread's L2-sized block buffer. The running mean of the
// chosen code embeddings is kept in float32 and rounded once per level on output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common/cpu_codebook_search.h"

namespace {

using namespace vqdna::cpu;

// h = T(2 z - e): the residual doubling, rounded to the input dtype as the reference computes it.
template <typename T>
inline void double_residual(const float* z, const float* e, float* h, int64_t D) {
  int64_t d = 0;
#ifdef VQDNA_AVX2
  if constexpr (std::is_same_v<T, float>) {
    const __m256 two = _mm256_set1_ps(2.f);
    for (; d + 8 <= D; d += 8)
      _mm256_storeu_ps(h + d, _mm256_fmsub_ps(two, _mm256_loadu_ps(z + d), _mm256_loadu_ps(e + d)));
  }
#endif
  // 2z is exact in float32 but is rounded to T first, as the reference's `2.0 * z` is: in float16
  // it overflows to inf above 65504 (then H is inf), where 2z - e alone could still be finite.
  for (; d < D; ++d) h[d] = static_cast<float>(static_cast<T>(static_cast<float>(static_cast<T>(2.f * z[d])) - e[d]));
}

// out = T(acc / count). Division by a power of two is multiplication by its exact reciprocal;
// other counts divide, as the spec does. Rows are written with streaming stores where aligned:
// the [L, N, D] output is written once and not read back here, so it should not evict the
// codebooks and packed rows from cache, nor be read for ownership.
// acc / count as the spec divides (one correctly rounded division): by a power of two it is the
// multiplication by its exact reciprocal.
struct LevelMean {
  explicit LevelMean(int64_t count)
      : c(static_cast<float>(count)), inv(1.f / static_cast<float>(count)), pow2((count & (count - 1)) == 0) {}
  float operator()(float acc) const { return pow2 ? acc * inv : acc / c; }
  float c, inv;
  bool pow2;
};

template <typename T>
inline void store_mean(const float* acc, int64_t count, T* out, int64_t D) {
  const LevelMean mean(count);
  const bool pow2 = mean.pow2;
  int64_t d = 0;
#ifdef VQDNA_AVX2
  const __m256 vc = _mm256_set1_ps(pow2 ? mean.inv : mean.c);
  auto mean8 = [&](int64_t i) {
    const __m256 a = _mm256_loadu_ps(acc + i);
    return pow2 ? _mm256_mul_ps(a, vc) : _mm256_div_ps(a, vc);
  };
  if constexpr (std::is_same_v<T, float>) {
    if ((reinterpret_cast<uintptr_t>(out) & 31) == 0) {
      for (; d + 8 <= D; d += 8) _mm256_stream_ps(out + d, mean8(d));
    }
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if ((reinterpret_cast<uintptr_t>(out) & 15) == 0) {
      // Round to nearest even like c10::BFloat16 (NaN -> 0x7fc0), eight lanes at a time.
      const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff), qnan = _mm256_set1_epi32(0x7fc0);
      for (; d + 8 <= D; d += 8) {
        const __m256 m = mean8(d);
        const __m256i bits = _mm256_castps_si256(m);
        __m256i r = _mm256_srli_epi32(
            _mm256_add_epi32(bits, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(bits, 16), one))), 16);
        r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(_mm256_cmp_ps(m, m, _CMP_UNORD_Q)));
        // Pack 8 x 32-bit (values < 2^16) to 8 x 16-bit in lane order.
        const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_stream_si128(reinterpret_cast<__m128i*>(out + d), packed);
      }
    }
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    if ((reinterpret_cast<uintptr_t>(out) & 15) == 0) {
      for (; d + 8 <= D; d += 8)
        _mm_stream_si128(reinterpret_cast<__m128i*>(out + d), _mm256_cvtps_ph(mean8(d), _MM_FROUND_TO_NEAREST_INT));
    }
  }
#endif
  for (; d < D; ++d) out[d] = static_cast<T>(mean(acc[d]));
}

// ||z - T(acc / count)||^2 in float32: the commitment loss's squared distance of one row to the
// zhat value store_mean writes (the same rounding), eight partial sums (vectorisable; the order
// differs from the reference's only by float32 summation order).
template <typename T>
inline float row_sqdist(const float* acc, int64_t count, const T* z, int64_t D) {
  const LevelMean mean(count);
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int j = 0; j < 8; ++j) {
      const float diff = static_cast<float>(z[d + j]) - static_cast<float>(static_cast<T>(mean(acc[d + j])));
      part[j] += diff * diff;
    }
  }
  for (; d < D; ++d) {
    const float diff = static_cast<float>(z[d]) - static_cast<float>(static_cast<T>(mean(acc[d])));
    part[d & 7] += diff * diff;
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Per block of rows and level: the double sum of the rows' squared distances and the non-finite
// rows (count, first row); combined in block order after the parallel loop (deterministic).
struct BlockReport {
  double sum = 0.0;
  int64_t bad = 0;
  int64_t first = -1;
};

inline void store_fence() {
#ifdef VQDNA_AVX2
  _mm_sfence();  // streaming stores are weakly ordered: publish them before returning
#endif
}

// levels: [L, N, D] zhat_levels, or undefined (codes only: no means formed or stored). sqdist: [L, N]
// float32 per-row ||Z_l - zhat_levels[l]||^2, or undefined; with it, reports gets one BlockReport
// per (block, level), block-major.
template <typename T>
void hrq_kernel(const std::vector<at::Tensor>& zs, const at::Tensor& codebooks, const at::Tensor& sqnorms,
                const std::vector<int64_t>& sizes, at::Tensor& codes, at::Tensor& levels, at::Tensor& sqdist,
                std::vector<BlockReport>& reports) {
  const int64_t L = static_cast<int64_t>(zs.size()), N = zs[0].size(0), D = zs[0].size(1);
  std::vector<const T*> zp;
  for (const auto& z : zs) zp.push_back(z.const_data_ptr<T>());
  const T* cbp = codebooks.const_data_ptr<T>();
  const float* sqp = sqnorms.const_data_ptr<float>();
  int32_t* codes_p = codes.mutable_data_ptr<int32_t>();
  T* levels_p = levels.defined() ? levels.mutable_data_ptr<T>() : nullptr;
  float* sqdist_p = sqdist.defined() ? sqdist.mutable_data_ptr<float>() : nullptr;

  std::vector<PackedCodebook> packed;
  std::vector<AlignedBuf> embeddings;  // float32 copies (exact values of T) for the gathers
  int64_t offset = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t K = sizes[l];
    packed.push_back(pack_codebook(cbp + offset * D, sqp + offset, K, D));
    AlignedBuf e = aligned_floats(K * D);
    for (int64_t k = 0; k < K; ++k) row_to_float(cbp + (offset + k) * D, e.get() + k * D, D);
    embeddings.push_back(std::move(e));
    offset += K;
  }

  const int64_t mb = block_rows(N, D);
  const int64_t n_blocks = (N + mb - 1) / mb;
  if (sqdist_p != nullptr) reports.assign(static_cast<size_t>(n_blocks * L), BlockReport{});
  at::parallel_for(0, n_blocks, 1, [&](int64_t blk0, int64_t blk1) {
    AlignedBuf apack = aligned_floats(mb * D);
    AlignedBuf running = aligned_floats(mb * D);
    AlignedBuf h = aligned_floats(D);
    std::unique_ptr<float[]> best(new float[mb]);
    std::unique_ptr<int32_t[]> idx(new int32_t[mb]), prev(new int32_t[mb]);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t r0 = blk * mb;
      const int64_t rows = std::min(mb, N - r0);
      const int64_t row_panels = (rows + kMR - 1) / kMR;
      for (int64_t l = 0; l < L; ++l) {
        const T* z = zp[l] + r0 * D;
        for (int64_t p = 0; p < row_panels; ++p) {
          float* panel = apack.get() + p * kMR * D;
          for (int64_t r = 0; r < kMR; ++r) {
            const int64_t row = p * kMR + r;
            if (row >= rows) {
              for (int64_t d = 0; d < D; ++d) panel[d * kMR + r] = 0.f;
              continue;
            }
            const float* x;
            if constexpr (std::is_same_v<T, float>) {
              x = z + row * D;
            } else {
              row_to_float(z + row * D, h.get(), D);
              x = h.get();
            }
            if (l > 0) {
              // Rounded to T exactly like the reference's `2 * z - prev_embedding` in T.
              double_residual<T>(x, embeddings[l - 1].get() + int64_t(prev[row]) * D, h.get(), D);
              x = h.get();
            }
            for (int64_t d = 0; d < D; ++d) panel[d * kMR + r] = x[d];
          }
        }
        // While this level searches, pull the rows the next step packs (next level, or the next
        // block's level 0) in from DRAM.
        const bool last = l + 1 == L;
        const int64_t next_r0 = last ? r0 + mb : r0;
        const int64_t next_rows = last ? (blk + 1 < blk1 ? std::min(mb, N - next_r0) : 0) : rows;
        const char* next = reinterpret_cast<const char*>(zp[last ? 0 : l + 1] + next_r0 * D);
        search_block(apack.get(), row_panels, packed[l], best.get(), idx.get(), next,
                     (next_rows * D * int64_t(sizeof(T)) + 63) / 64);
        if (levels_p == nullptr) {  // codes only
          for (int64_t r = 0; r < rows; ++r) codes_p[l * N + r0 + r] = prev[r] = idx[r];
          continue;
        }
        T* out = levels_p + (l * N + r0) * D;
        for (int64_t r = 0; r < rows; ++r) {
          codes_p[l * N + r0 + r] = idx[r];
          const float* e = embeddings[l].get() + int64_t(idx[r]) * D;
          float* acc = running.get() + r * D;
          if (l == 0) {
            std::copy(e, e + D, acc);
          } else {
            for (int64_t d = 0; d < D; ++d) acc[d] += e[d];
          }
          store_mean<T>(acc, l + 1, out + r * D, D);
          prev[r] = idx[r];
          if (sqdist_p != nullptr) {  // Z_l's row was packed above: still in cache
            const float sq = row_sqdist<T>(acc, l + 1, z + r * D, D);
            sqdist_p[l * N + r0 + r] = sq;
            BlockReport& rep = reports[static_cast<size_t>(blk * L + l)];
            rep.sum += static_cast<double>(sq);
            if (!std::isfinite(sq) && rep.bad++ == 0) rep.first = r0 + r;
          }
        }
      }
    }
    store_fence();
  });
}

// The checked inputs, made contiguous.
struct HrqInputs {
  std::vector<at::Tensor> zs;
  at::Tensor codebooks, sqnorms;
  std::vector<int64_t> sizes;
  int64_t L, N, D;
  at::ScalarType dtype;
};

// Checks the op's inputs (errors name the argument) and makes them contiguous.
HrqInputs check_inputs(at::TensorList zs, const at::Tensor& codebooks, const at::Tensor& codebook_sqnorms,
                       at::IntArrayRef codebook_sizes) {
  const int64_t L = static_cast<int64_t>(zs.size());
  TORCH_CHECK(L >= 1, "vqdna.hrq_quantize_native: need at least one level");
  TORCH_CHECK(zs[0].dim() == 2, "vqdna.hrq_quantize_native: zs[0] must be [N, D], got shape ", zs[0].sizes());
  const auto dt = zs[0].scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "vqdna.hrq_quantize_native: zs must be float32, bfloat16 or float16, got ", dt);
  std::vector<at::Tensor> zc;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(zs[l].device().is_cpu(), "vqdna.hrq_quantize_native: zs[", l, "] is not a CPU tensor");
    TORCH_CHECK(zs[l].sizes() == zs[0].sizes() && zs[l].scalar_type() == dt, "vqdna.hrq_quantize_native: zs[", l,
                "] is ", zs[l].scalar_type(), " ", zs[l].sizes(), ", zs[0] is ", dt, " ", zs[0].sizes());
    zc.push_back(zs[l].contiguous());
  }
  const int64_t N = zs[0].size(0), D = zs[0].size(1);
  TORCH_CHECK(codebooks.device().is_cpu() && codebook_sqnorms.device().is_cpu(),
              "vqdna.hrq_quantize_native: codebooks must be CPU tensors");
  TORCH_CHECK(codebooks.dim() == 2 && codebooks.size(1) == D, "vqdna.hrq_quantize_native: codebooks must be [sum K_l, D=",
              D, "], got shape ", codebooks.sizes());
  TORCH_CHECK(static_cast<int64_t>(codebook_sizes.size()) == L, "vqdna.hrq_quantize_native: got ",
              codebook_sizes.size(), " codebook sizes for L=", L, " levels");
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(codebook_sizes[l] >= 1, "vqdna.hrq_quantize_native: level ", l, " has an empty codebook");
    total += codebook_sizes[l];
  }
  TORCH_CHECK(total == codebooks.size(0), "vqdna.hrq_quantize_native: codebook sizes sum to ", total,
              " but codebooks has ", codebooks.size(0), " rows");
  TORCH_CHECK(codebook_sqnorms.dim() == 1 && codebook_sqnorms.size(0) == total &&
                  codebook_sqnorms.scalar_type() == at::kFloat,
              "vqdna.hrq_quantize_native: codebook_sqnorms must be float32 [", total, "]");
  TORCH_CHECK(codebooks.scalar_type() == dt, "vqdna.hrq_quantize_native: dtype mismatch: zs is ", dt,
              ", codebooks is ", codebooks.scalar_type());
  return {std::move(zc), codebooks.contiguous(), codebook_sqnorms.contiguous(),
          std::vector<int64_t>(codebook_sizes.begin(), codebook_sizes.end()), L, N, D, dt};
}

void run(const HrqInputs& in, at::Tensor& codes, at::Tensor& levels, at::Tensor& sqdist,
         std::vector<BlockReport>& reports) {
  if (in.N == 0) return;
  AT_DISPATCH_SWITCH(in.dtype, "vqdna_hrq_quantize_native",
                     AT_DISPATCH_CASE(at::kFloat, [&] { hrq_kernel<float>(in.zs, in.codebooks, in.sqnorms, in.sizes, codes, levels, sqdist, reports); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { hrq_kernel<c10::BFloat16>(in.zs, in.codebooks, in.sqnorms, in.sizes, codes, levels, sqdist, reports); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { hrq_kernel<c10::Half>(in.zs, in.codebooks, in.sqnorms, in.sizes, codes, levels, sqdist, reports); }));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hrq_quantize_native_cpu(
    at::TensorList zs, const at::Tensor& codebooks, const at::Tensor& codebook_sqnorms, at::IntArrayRef codebook_sizes,
    bool codes_only) {
  const HrqInputs in = check_inputs(zs, codebooks, codebook_sqnorms, codebook_sizes);
  const auto opts = in.zs[0].options();
  at::Tensor codes = at::empty({in.L, in.N}, opts.dtype(at::kInt));
  std::vector<BlockReport> reports;
  if (codes_only) {
    at::Tensor none;
    run(in, codes, none, none, reports);
    return {codes, at::empty({0}, opts), at::empty({0}, opts.dtype(at::kFloat)), at::empty({0}, opts.dtype(at::kFloat)),
            at::empty({0}, opts.dtype(at::kLong))};
  }
  at::Tensor levels = at::empty({in.L, in.N, in.D}, opts);
  advise_huge_pages(levels.data_ptr(), levels.nbytes());
  at::Tensor sqdist = at::empty({in.L, in.N}, opts.dtype(at::kFloat));
  run(in, codes, levels, sqdist, reports);
  // Combine the blocks' reports in block order: sqdist_sum [L] (float64 sums, rounded once) and
  // nonfinite [L, 2] (count, first row or -1).
  at::Tensor sums = at::empty({in.L}, opts.dtype(at::kFloat));
  at::Tensor nonfinite = at::empty({in.L, 2}, opts.dtype(at::kLong));
  float* sums_p = sums.data_ptr<float>();
  int64_t* bad_p = nonfinite.data_ptr<int64_t>();
  const int64_t n_blocks = in.L > 0 ? static_cast<int64_t>(reports.size()) / in.L : 0;
  for (int64_t l = 0; l < in.L; ++l) {
    double sum = 0.0;
    int64_t bad = 0, first = -1;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const BlockReport& rep = reports[static_cast<size_t>(b * in.L + l)];
      sum += rep.sum;
      if (rep.bad > 0 && bad == 0) first = rep.first;
      bad += rep.bad;
    }
    sums_p[l] = static_cast<float>(sum);
    bad_p[2 * l] = bad;
    bad_p[2 * l + 1] = first;
  }
  return {codes, levels, sqdist, sums, nonfinite};
}

void hrq_quantize_native_out_cpu(at::TensorList zs, const at::Tensor& codebooks, const at::Tensor& codebook_sqnorms,
                                 at::IntArrayRef codebook_sizes, at::Tensor codes, at::Tensor levels) {
  const HrqInputs in = check_inputs(zs, codebooks, codebook_sqnorms, codebook_sizes);
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kInt && codes.is_contiguous() &&
                  codes.sizes() == at::IntArrayRef({in.L, in.N}),
              "vqdna.hrq_quantize_native_out: codes must be a contiguous int32 CPU tensor [", in.L, ", ", in.N,
              "], got ", codes.scalar_type(), " ", codes.sizes(), codes.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(levels.device().is_cpu() && levels.scalar_type() == in.dtype && levels.is_contiguous() &&
                  levels.sizes() == at::IntArrayRef({in.L, in.N, in.D}),
              "vqdna.hrq_quantize_native_out: zhat_levels must be a contiguous ", in.dtype, " CPU tensor [", in.L, ", ",
              in.N, ", ", in.D, "], got ", levels.scalar_type(), " ", levels.sizes(),
              levels.is_contiguous() ? "" : " (not contiguous)");
  for (const auto& z : in.zs) {
    at::assert_no_overlap(levels, z);
  }
  at::assert_no_overlap(codes, levels);
  at::Tensor no_sqdist;
  std::vector<BlockReport> no_reports;
  run(in, codes, levels, no_sqdist, no_reports);
}

}  // namespace

TORCH_LIBRARY_IMPL(vqdna, CPU, m) {
  m.impl("hrq_quantize_native", &hrq_quantize_native_cpu);
  m.impl("hrq_quantize_native_out", &hrq_quantize_native_out_cpu);
}
