// Native CPU HRQ residual doubling (DESIGN 2.2), all levels of a block of rows in one task:
// level 0 searches C_0 with Z_0; level l >= 1 forms H_l = 2 Z_l - C_{l-1}[M_{l-1}] in float32,
// rounds it to the input dtype (as the reference does), and packs it straight into the search
// panels, so H_l only ever exists in a thread's L2-sized block buffer. The running mean of the
// chosen code embeddings is kept in float32 and rounded once per level on output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/codebook_search.h"

namespace {

using namespace vqdna::cpu;

template <typename T>
void hrq_kernel(const std::vector<at::Tensor>& zs, const at::Tensor& codebooks, const at::Tensor& sqnorms,
                const std::vector<int64_t>& sizes, at::Tensor& codes, at::Tensor& levels) {
  const int64_t L = static_cast<int64_t>(zs.size()), N = zs[0].size(0), D = zs[0].size(1);
  std::vector<const T*> zp;
  for (const auto& z : zs) zp.push_back(z.const_data_ptr<T>());
  const T* cbp = codebooks.const_data_ptr<T>();
  const float* sqp = sqnorms.const_data_ptr<float>();
  int32_t* codes_p = codes.mutable_data_ptr<int32_t>();
  T* levels_p = levels.mutable_data_ptr<T>();

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
            row_to_float(z + row * D, h.get(), D);
            if (l > 0) {
              const float* e = embeddings[l - 1].get() + int64_t(prev[row]) * D;
              // Rounded to T exactly like the reference's `2 * z - prev_embedding` in T.
              for (int64_t d = 0; d < D; ++d) h[d] = static_cast<float>(static_cast<T>(2.f * h[d] - e[d]));
            }
            for (int64_t d = 0; d < D; ++d) panel[d * kMR + r] = h[d];
          }
        }
        search_block(apack.get(), row_panels, packed[l], best.get(), idx.get());
        const float count = static_cast<float>(l + 1);  // divide, not multiply by 1/count: as the spec
        T* out = levels_p + (l * N + r0) * D;
        for (int64_t r = 0; r < rows; ++r) {
          codes_p[l * N + r0 + r] = idx[r];
          const float* e = embeddings[l].get() + int64_t(idx[r]) * D;
          float* acc = running.get() + r * D;
          if (l == 0) {
            for (int64_t d = 0; d < D; ++d) acc[d] = e[d];
          } else {
            for (int64_t d = 0; d < D; ++d) acc[d] += e[d];
          }
          for (int64_t d = 0; d < D; ++d) out[r * D + d] = static_cast<T>(acc[d] / count);
          prev[r] = idx[r];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> hrq_quantize_native_cpu(at::TensorList zs, const at::Tensor& codebooks,
                                                           const at::Tensor& codebook_sqnorms,
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
  const at::Tensor cbc = codebooks.contiguous(), sqc = codebook_sqnorms.contiguous();
  at::Tensor codes = at::empty({L, N}, zc[0].options().dtype(at::kInt));
  at::Tensor levels = at::empty({L, N, D}, zc[0].options());
  if (N == 0) return {codes, levels};
  advise_huge_pages(levels.data_ptr(), levels.nbytes());
  const std::vector<int64_t> sizes(codebook_sizes.begin(), codebook_sizes.end());
  AT_DISPATCH_SWITCH(dt, "vqdna_hrq_quantize_native",
                     AT_DISPATCH_CASE(at::kFloat, [&] { hrq_kernel<float>(zc, cbc, sqc, sizes, codes, levels); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { hrq_kernel<c10::BFloat16>(zc, cbc, sqc, sizes, codes, levels); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { hrq_kernel<c10::Half>(zc, cbc, sqc, sizes, codes, levels); }));
  return {codes, levels};
}

}  // namespace

TORCH_LIBRARY_IMPL(vqdna, CPU, m) { m.impl("hrq_quantize_native", &hrq_quantize_native_cpu); }
