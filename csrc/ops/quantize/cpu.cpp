// Native CPU quantize: the lookup search of csrc/ops/lookup/cpu.cpp (packed codebook, 6 x 16 AVX2 tiles with
// the fused argmin, or its bf16 screen where the CPU has AVX512_BF16: common/cpu_bf16_screen.h; the block
// loop search_rows_blocked of common/cpu_codebook_search.h) with the block's
// epilogue extended: while the block's rows of z are still in cache, each row's chosen codebook row is
// copied to `quantized`, its distance is added to the block's float64 loss sum and a non-finite
// distance is counted. Per-block sums and counts are
// combined in block order after the parallel loop, so the result does not depend on the thread count.
// normalize (cosine similarity): each row is l2-normalised as its block is packed (pack_panel), so the
// search, dist and the loss sum are of the unit rows at no extra pass over z.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "common/cpu_codebook_search.h"

namespace {

using namespace vqdna::cpu;

// Outputs above this size are written with non-temporal stores: they would only evict the codebook
// and the next blocks of z, and a streamed store skips the read-for-ownership of a cached one.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

// Copies `bytes` bytes of one codebook row (src) to its output row (dst), streamed when `stream`.
inline void copy_row(void* dst, const void* src, int64_t bytes, bool stream) {
#ifdef VQDNA_AVX2
  if (stream) {
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    int64_t i = 0;
    for (; i < bytes && (reinterpret_cast<uintptr_t>(d + i) & 31) != 0; ++i) d[i] = s[i];
    for (; i + 32 <= bytes; i += 32) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    }
    for (; i < bytes; ++i) d[i] = s[i];
    return;
  }
#endif
  (void)stream;
  std::memcpy(dst, src, bytes);
}

template <typename T>
void quantize_kernel(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& sqnorm, at::Tensor& codes,
                     at::Tensor& quantized, at::Tensor& dist, at::Tensor& sqdist_sum, at::Tensor& nonfinite,
                     bool normalize) {
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  const T* zp = z.const_data_ptr<T>();
  const T* cbp = codebook.const_data_ptr<T>();
  int32_t* codes_p = codes.mutable_data_ptr<int32_t>();
  T* q_p = quantized.mutable_data_ptr<T>();
  float* dist_p = dist.mutable_data_ptr<float>();
  const PackedCodebook cb = pack_codebook(cbp, sqnorm.const_data_ptr<float>(), K, D);
  const ScreenedCodebookPtr screen = make_screen("vqdna.quantize_native", cb, N);
  const int64_t mb = block_rows(N, D);
  const int64_t n_blocks = (N + mb - 1) / mb;
  std::vector<double> blk_sum(n_blocks, 0.0);
  std::vector<int64_t> blk_bad(n_blocks, 0), blk_first(n_blocks, -1);
  const int64_t q_bytes = N * D * int64_t(sizeof(T));
  const bool stream = q_bytes >= kStreamBytes;
  advise_huge_pages(q_p, static_cast<size_t>(q_bytes));

  search_rows_blocked(zp, N, D, cb, mb, [&](int64_t blk, int64_t r0, int64_t rows, const float* best,
                                        const int32_t* best_idx, const float* znorm) {
    double sum = 0.0;
    int64_t bad = 0, first = -1;
    for (int64_t r = 0; r < rows; ++r) {
      // NaN/Inf rows: znorm is non-finite, so is the sum; `x < 0` leaves NaN untouched.
      const float x = best[r] + znorm[r];
      const float d = x < 0.f ? 0.f : x;
      const int32_t code = best_idx[r];
      dist_p[r0 + r] = d;
      codes_p[r0 + r] = code;
      copy_row(q_p + (r0 + r) * D, cbp + int64_t(code) * D, D * int64_t(sizeof(T)), stream);
      sum += d;
      if (!std::isfinite(d)) {
        if (bad++ == 0) first = r0 + r;
      }
    }
    blk_sum[blk] = sum;
    blk_bad[blk] = bad;
    blk_first[blk] = first;
#ifdef VQDNA_AVX2
    if (stream) _mm_sfence();  // this block's streamed stores are visible before the outputs are read
#endif
  }, 0, screen.get(), normalize);
  double total = 0.0;
  int64_t bad = 0, first = -1;
  for (int64_t b = 0; b < n_blocks; ++b) {
    total += blk_sum[b];
    if (blk_bad[b] > 0 && bad == 0) first = blk_first[b];
    bad += blk_bad[b];
  }
  sqdist_sum.fill_(static_cast<float>(total));
  int64_t* nf = nonfinite.mutable_data_ptr<int64_t>();
  nf[0] = bad;
  nf[1] = first;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_native_cpu(
    const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& codebook_sqnorm, bool normalize) {
  check_search_inputs("vqdna.quantize_native", z, codebook, codebook_sqnorm);
  const auto dt = z.scalar_type();

  const at::Tensor zc = z.contiguous(), cbc = codebook.contiguous(), sqc = codebook_sqnorm.contiguous();
  const int64_t N = zc.size(0);
  at::Tensor codes = at::empty({N}, zc.options().dtype(at::kInt));
  at::Tensor quantized = at::empty_like(zc);
  at::Tensor dist = at::empty({N}, zc.options().dtype(at::kFloat));
  at::Tensor sqdist_sum = at::zeros({}, zc.options().dtype(at::kFloat));
  at::Tensor nonfinite = at::tensor({int64_t(0), int64_t(-1)}, zc.options().dtype(at::kLong));
  if (N == 0) return {codes, quantized, dist, sqdist_sum, nonfinite};

  AT_DISPATCH_SWITCH(
      dt, "vqdna_quantize_native",
      AT_DISPATCH_CASE(at::kFloat, [&] { quantize_kernel<float>(zc, cbc, sqc, codes, quantized, dist, sqdist_sum, nonfinite, normalize); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { quantize_kernel<c10::BFloat16>(zc, cbc, sqc, codes, quantized, dist, sqdist_sum, nonfinite, normalize); })
      AT_DISPATCH_CASE(at::kHalf, [&] { quantize_kernel<c10::Half>(zc, cbc, sqc, codes, quantized, dist, sqdist_sum, nonfinite, normalize); }));
  return {codes, quantized, dist, sqdist_sum, nonfinite};
}

}  // namespace

TORCH_LIBRARY_IMPL(vqdna, CPU, m) { m.impl("quantize_native", &quantize_native_cpu); }
