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
//  * Where the CPU has AVX512_BF16, a bf16 screen with an exact float32 re-check of the few codes it
//    cannot rule out replaces the float32 tiles (common/cpu_bf16_screen.h): the same codes and bits.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "common/cpu_codebook_search.h"

namespace {

using namespace vqdna::cpu;

// z [N, D] row-major contiguous, or (transposed) column-major: z.stride(0) == 1, column stride z.stride(1).
template <typename T>
void lookup_kernel(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& sqnorm, at::Tensor& codes,
                   at::Tensor& dist, bool transposed) {
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  const T* zp = z.const_data_ptr<T>();
  int32_t* codes_p = codes.mutable_data_ptr<int32_t>();
  float* dist_p = dist.mutable_data_ptr<float>();
  // Packed once per call (K*D work), shared read-only by all threads.
  const PackedCodebook cb = pack_codebook(codebook.const_data_ptr<T>(), sqnorm.const_data_ptr<float>(), K, D);
  const ScreenedCodebookPtr screen = make_screen("vqdna.lookup_native", cb, N);
  search_rows_blocked(zp, N, D, cb, block_rows(N, D),
                      [&](int64_t, int64_t r0, int64_t rows, const float* best, const int32_t* best_idx, const float* znorm) {
    for (int64_t r = 0; r < rows; ++r) {
      // NaN/Inf rows: znorm is non-finite, so is the sum; `x < 0` leaves NaN untouched.
      const float x = best[r] + znorm[r];
      dist_p[r0 + r] = x < 0.f ? 0.f : x;
      codes_p[r0 + r] = best_idx[r];
    }
  }, transposed ? z.stride(1) : 0, screen.get());
}

// Per-head codebooks: z [N, C, D] contiguous, codebook [C, K, D], sqnorm [C, K]; codes/dist [N, C].
// Head c's rows are the strided view z[:, c] (row stride C * D), read in place: each codebook is
// packed (and screened) once and its head's rows searched in parallel blocks, head after head.
template <typename T>
void lookup_heads_kernel(const at::Tensor& z, const at::Tensor& codebook, const at::Tensor& sqnorm, at::Tensor& codes,
                         at::Tensor& dist) {
  const int64_t N = z.size(0), C = z.size(1), D = z.size(2), K = codebook.size(1);
  const T* zp = z.const_data_ptr<T>();
  const T* cbp = codebook.const_data_ptr<T>();
  const float* sqp = sqnorm.const_data_ptr<float>();
  int32_t* codes_p = codes.mutable_data_ptr<int32_t>();
  float* dist_p = dist.mutable_data_ptr<float>();
  const int64_t mb = block_rows(N, D);
  for (int64_t c = 0; c < C; ++c) {
    const PackedCodebook cb = pack_codebook(cbp + c * K * D, sqp + c * K, K, D);
    const ScreenedCodebookPtr screen = make_screen("vqdna.lookup_native", cb, N);
    search_rows_blocked(zp + c * D, N, D, cb, mb,
                        [&](int64_t, int64_t r0, int64_t rows, const float* best, const int32_t* best_idx,
                            const float* znorm) {
      for (int64_t r = 0; r < rows; ++r) {
        const float x = best[r] + znorm[r];
        dist_p[(r0 + r) * C + c] = x < 0.f ? 0.f : x;
        codes_p[(r0 + r) * C + c] = best_idx[r];
      }
    }, 0, screen.get(), false, C * D);
  }
}

std::tuple<at::Tensor, at::Tensor> lookup_heads_native_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                           const at::Tensor& codebook_sqnorm) {
  constexpr const char* op = "vqdna.lookup_native";
  TORCH_CHECK(z.dim() == 3, op, ": with a codebook [C, K, D] z must be 3-D [N, C, D], got shape ", z.sizes());
  TORCH_CHECK(codebook.size(0) >= 1, op, ": codebook [C, K, D] has no codebooks (C = 0)");
  TORCH_CHECK(z.size(1) == codebook.size(0), op, ": z has C=", z.size(1), " heads, codebook has C=", codebook.size(0));
  TORCH_CHECK(codebook_sqnorm.dim() == 2 && codebook_sqnorm.size(0) == codebook.size(0) &&
                  codebook_sqnorm.size(1) == codebook.size(1),
              op, ": codebook_sqnorm must have shape [", codebook.size(0), ", ", codebook.size(1), "], got ",
              codebook_sqnorm.sizes());
  const at::Tensor zc = z.contiguous(), cbc = codebook.contiguous(), sqc = codebook_sqnorm.contiguous();
  const int64_t N = zc.size(0), C = zc.size(1);
  // The rest of the contract is the single codebook's, on one head's shapes.
  check_search_inputs(op, zc.select(1, 0), cbc.select(0, 0), sqc.select(0, 0));
  at::Tensor codes = at::empty({N, C}, zc.options().dtype(at::kInt));
  at::Tensor dist = at::empty({N, C}, zc.options().dtype(at::kFloat));
  if (N == 0) return {codes, dist};
  AT_DISPATCH_SWITCH(zc.scalar_type(), "vqdna_lookup_heads_native",
                     AT_DISPATCH_CASE(at::kFloat, [&] { lookup_heads_kernel<float>(zc, cbc, sqc, codes, dist); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { lookup_heads_kernel<c10::BFloat16>(zc, cbc, sqc, codes, dist); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { lookup_heads_kernel<c10::Half>(zc, cbc, sqc, codes, dist); }));
  return {codes, dist};
}

std::tuple<at::Tensor, at::Tensor> lookup_native_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                     const at::Tensor& codebook_sqnorm) {
  if (codebook.dim() == 3) return lookup_heads_native_cpu(z, codebook, codebook_sqnorm);
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
