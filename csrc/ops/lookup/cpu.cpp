// Native CPU nearest-code lookup: codes[i] = argmin_k (||e_k||^2 - 2 z_i.e_k),
// dist[i] = that minimum + ||z_i||^2 (clamped at 0), all arithmetic in float32.
//
// Design (never materialises the N x K distance matrix):
//  * The codebook is packed once per call into float32 panels of kNR = 16 codes, laid out
//    [D][16] so the micro-kernel reads one 16-code slice per d with two aligned vector loads.
//    The tail panel is zero-padded and its padded codes get sqnorm = +inf, so they never win.
//  * Rows of z are processed in blocks of MB rows (parallel over blocks). A block is converted to
//    float32 and packed into panels of kMR = 6 rows, laid out [D][6], sized to stay in L2. A transposed
//    z (stride(0) == 1: channel-first activations viewed as [N, D]) is packed from its columns in
//    place: no transposing copy of z.
//  * For each code panel (kept in L1 across the block) and each row panel, a 6 x 16 register-tile
//    GEMM runs over the whole of D, and its argmin epilogue is fused in registers: the tile's
//    distances are compared against each row's running minimum and only when some lane beats it
//    (rare after the first few panels) is the tile scanned in increasing code order. Strict `<`
//    everywhere keeps the lowest index on ties, and an ordered compare means NaN never wins.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "common/cpu_codebook_search.h"

namespace {

using namespace vqdna::cpu;

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

// z [N, D] row-major contiguous, or (transposed) column-major: z.stride(0) == 1, column stride ld.
template <typename T>
void lookup_kernel(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& sqnorm, at::Tensor& codes,
                   at::Tensor& dist, bool transposed) {
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  const int64_t ld = z.stride(1);
  const T* zp = z.const_data_ptr<T>();
  int32_t* codes_p = codes.mutable_data_ptr<int32_t>();
  float* dist_p = dist.mutable_data_ptr<float>();
  // Packed once per call (K*D work), shared read-only by all threads.
  const PackedCodebook cb = pack_codebook(codebook.const_data_ptr<T>(), sqnorm.const_data_ptr<float>(), K, D);
  const int64_t mb = block_rows(N, D);
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
        if (transposed) {
          pack_panel_transposed<T>(zp + r0 + p * kMR, pr, D, ld, apack.get() + p * kMR * D, tmp.get(),
                                   znorm.get() + p * kMR);
        } else {
          pack_panel<T, kMR>(zp + (r0 + p * kMR) * D, pr, D, apack.get() + p * kMR * D, tmp.get(),
                             znorm.get() + p * kMR);
        }
      }
      // Pull the next block of z (streamed from DRAM) in while this block computes (a contiguous z:
      // the block is one range; the hardware prefetcher follows a transposed z's columns).
      const char* next = reinterpret_cast<const char*>(zp + (r0 + mb) * D);
      const int64_t next_lines =
          blk + 1 < blk1 && !transposed ? (std::min(mb, N - r0 - mb) * D * int64_t(sizeof(T)) + 63) / 64 : 0;
      search_block(apack.get(), row_panels, cb, best.get(), best_idx.get(), next, next_lines);
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
  check_search_inputs("vqdna.lookup_native", z, codebook, codebook_sqnorm);
  const auto dt = z.scalar_type();

  // The contract asks for a contiguous z or a transposed view of one (z.stride(0) == 1: read in place,
  // no copy); .contiguous() is a no-op for a contiguous tensor and keeps us safe otherwise.
  const bool transposed = !z.is_contiguous() && z.size(1) > 1 && z.stride(0) == 1 && z.stride(1) >= 1;
  const at::Tensor zc = transposed ? z : z.contiguous(), cbc = codebook.contiguous(), sqc = codebook_sqnorm.contiguous();
  const int64_t N = zc.size(0);
  at::Tensor codes = at::empty({N}, zc.options().dtype(at::kInt));
  at::Tensor dist = at::empty({N}, zc.options().dtype(at::kFloat));
  if (N == 0) return {codes, dist};

  AT_DISPATCH_SWITCH(dt, "vqdna_lookup_native",
                     AT_DISPATCH_CASE(at::kFloat, [&] { lookup_kernel<float>(zc, cbc, sqc, codes, dist, transposed); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { lookup_kernel<c10::BFloat16>(zc, cbc, sqc, codes, dist, transposed); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { lookup_kernel<c10::Half>(zc, cbc, sqc, codes, dist, transposed); }));
  return {codes, dist};
}

}  // namespace

TORCH_LIBRARY_IMPL(vqdna, CPU, m) { m.impl("lookup_native", &lookup_native_cpu); }
