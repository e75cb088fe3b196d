// CUDA dispatch of torch.ops.vqdna.hrq_quantize_cuda (schema in schema.cpp; kernels in cuda.cu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "common/cuda_binding.h"
#include "ops/hrq_quantize/cuda.cuh"

namespace vqdna {

using ::vqdna::cuda::aligned_to;

namespace {

// sqdist [L, n] float32 -> sqdist_sum [L] float32 (float64 sums) and nonfinite int64 [L, 2] (count of
// non-finite rows, the first one's row or -1): reductions over L n floats (1/d of zhat_levels).
std::tuple<at::Tensor, at::Tensor> level_reports(const at::Tensor& sqdist) {
  const int64_t n = sqdist.size(1);
  const at::Tensor sums = sqdist.to(at::kDouble).sum(1).to(at::kFloat);
  const at::Tensor bad = sqdist.isfinite().logical_not();
  const at::Tensor count = bad.sum(1);  // int64
  if (n == 0) return {sums, at::stack({count, at::full_like(count, -1)}, 1)};
  const at::Tensor index = at::arange(n, count.options()).expand({sqdist.size(0), n});
  const at::Tensor first = at::where(bad, index, at::full_like(index, n)).amin(1);
  return {sums, at::stack({count, at::where(count > 0, first, at::full_like(first, -1))}, 1)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hrq_quantize_cuda(
    at::TensorList zs, const at::Tensor& codebooks, const at::Tensor& codebook_sqnorms, at::IntArrayRef codebook_sizes,
    bool codes_only) {
  const int64_t L = static_cast<int64_t>(zs.size());
  TORCH_CHECK(L >= 1, "vqdna.hrq_quantize_cuda: need at least one level (L >= 1), got none");
  TORCH_CHECK(L <= ::vqdna::cuda::kHrqMaxLevels, "vqdna.hrq_quantize_cuda: at most ",
              ::vqdna::cuda::kHrqMaxLevels, " levels per call, got ", L);
  const at::Tensor& z0 = zs[0];
  TORCH_CHECK(z0.is_cuda(), "vqdna.hrq_quantize_cuda: zs[0] must be a CUDA tensor, got ", z0.device());
  TORCH_CHECK(z0.dim() == 2, "vqdna.hrq_quantize_cuda: zs[0] must be 2-D [N, D], got shape ", z0.sizes());
  const auto dt = z0.scalar_type();
  const auto dtype = ::vqdna::cuda::kernel_dtype(dt, "hrq_quantize_cuda", "zs");
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& z = zs[l];
    TORCH_CHECK(z.is_cuda() && z.device() == z0.device(), "vqdna.hrq_quantize_cuda: zs[", l,
                "] is on ", z.device(), ", zs[0] is on ", z0.device(), " (all must be on one CUDA device)");
    TORCH_CHECK(z.scalar_type() == dt, "vqdna.hrq_quantize_cuda: zs[", l, "] is ", z.scalar_type(),
                ", zs[0] is ", dt);
    TORCH_CHECK(z.sizes() == z0.sizes(), "vqdna.hrq_quantize_cuda: zs[", l, "] has shape ", z.sizes(),
                ", zs[0] has ", z0.sizes());
    TORCH_CHECK(z.is_contiguous(), "vqdna.hrq_quantize_cuda: zs[", l, "] must be contiguous");
    TORCH_CHECK(aligned_to(z, z.element_size()), "vqdna.hrq_quantize_cuda: zs[", l,
                "] must be aligned to its element size");
  }
  const int64_t n = z0.size(0);
  const int64_t d = z0.size(1);

  TORCH_CHECK(codebooks.is_cuda() && codebooks.device() == z0.device(),
              "vqdna.hrq_quantize_cuda: codebooks must be a CUDA tensor on ", z0.device(), ", got ",
              codebooks.device());
  TORCH_CHECK(codebook_sqnorms.is_cuda() && codebook_sqnorms.device() == z0.device(),
              "vqdna.hrq_quantize_cuda: codebook_sqnorms must be a CUDA tensor on ", z0.device(),
              ", got ", codebook_sqnorms.device());
  TORCH_CHECK(codebooks.dim() == 2, "vqdna.hrq_quantize_cuda: codebooks must be 2-D [sum K_l, D], got shape ",
              codebooks.sizes());
  TORCH_CHECK(codebooks.size(1) == d, "vqdna.hrq_quantize_cuda: zs have D = ", d,
              " but codebooks have D = ", codebooks.size(1));
  TORCH_CHECK(codebooks.scalar_type() == dt, "vqdna.hrq_quantize_cuda: dtype mismatch: zs are ", dt,
              ", codebooks are ", codebooks.scalar_type());
  TORCH_CHECK(codebooks.is_contiguous(), "vqdna.hrq_quantize_cuda: codebooks must be contiguous");
  TORCH_CHECK(static_cast<int64_t>(codebook_sizes.size()) == L, "vqdna.hrq_quantize_cuda: got ",
              codebook_sizes.size(), " codebook sizes for L = ", L, " levels");
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(codebook_sizes[l] >= 1, "vqdna.hrq_quantize_cuda: level ", l,
                " has an empty codebook (K_", l, " = ", codebook_sizes[l], ")");
    TORCH_CHECK(codebook_sizes[l] <= (int64_t{1} << 30), "vqdna.hrq_quantize_cuda: level ", l, " has K = ",
                codebook_sizes[l], ", more than 2^30 codes");
    total += codebook_sizes[l];
  }
  TORCH_CHECK(total == codebooks.size(0), "vqdna.hrq_quantize_cuda: codebook sizes sum to ", total,
              " but codebooks has ", codebooks.size(0), " rows");
  TORCH_CHECK(codebook_sqnorms.dim() == 1 && codebook_sqnorms.size(0) == total,
              "vqdna.hrq_quantize_cuda: codebook_sqnorms must be 1-D [", total, "], got shape ",
              codebook_sqnorms.sizes());
  TORCH_CHECK(codebook_sqnorms.scalar_type() == at::kFloat,
              "vqdna.hrq_quantize_cuda: codebook_sqnorms must be float32, got ",
              codebook_sqnorms.scalar_type());
  TORCH_CHECK(codebook_sqnorms.is_contiguous(), "vqdna.hrq_quantize_cuda: codebook_sqnorms must be contiguous");
  TORCH_CHECK(aligned_to(codebooks, codebooks.element_size()) && aligned_to(codebook_sqnorms, 4),
              "vqdna.hrq_quantize_cuda: codebooks must be aligned to their element size");

  const c10::cuda::CUDAGuard device_guard(z0.device());
  auto codes = at::empty({L, n}, z0.options().dtype(at::kInt));
  auto levels = codes_only ? at::empty({0}, z0.options()) : at::empty({L, n, d}, z0.options());
  auto sqdist = codes_only ? at::empty({0}, z0.options().dtype(at::kFloat)) : at::empty({L, n}, z0.options().dtype(at::kFloat));
  auto finish = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> {
    if (codes_only) {
      return {codes, levels, sqdist, at::empty({0}, sqdist.options()), at::empty({0}, codes.options().dtype(at::kLong))};
    }
    auto [sums, nonfinite] = level_reports(sqdist);
    return {codes, levels, sqdist, sums, nonfinite};
  };
  if (n == 0) return finish();

  std::vector<const void*> ptrs(static_cast<size_t>(L));
  std::vector<int64_t> sizes(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    ptrs[static_cast<size_t>(l)] = zs[l].data_ptr();
    sizes[static_cast<size_t>(l)] = codebook_sizes[l];
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = ::vqdna::cuda::launch_hrq_quantize(
      ptrs.data(), L, codebooks.data_ptr(), codebook_sqnorms.data_ptr<float>(), sizes.data(),
      codes.data_ptr<int32_t>(), codes_only ? nullptr : levels.data_ptr(),
      codes_only ? nullptr : sqdist.data_ptr<float>(), n, d, dtype, stream);
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return finish();
}

}  // namespace vqdna

TORCH_LIBRARY_IMPL(vqdna, CUDA, m) { m.impl("hrq_quantize_cuda", &vqdna::hrq_quantize_cuda); }
