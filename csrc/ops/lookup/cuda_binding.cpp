// CUDA dispatch of torch.ops.vqdna.lookup_cuda (schema in schema.cpp; kernels in cuda.cu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <tuple>

#include "common/cuda_binding.h"
#include "ops/lookup/cuda.cuh"

namespace vqdna {


std::tuple<at::Tensor, at::Tensor> lookup_cuda(const at::Tensor& z, const at::Tensor& codebook,
                                               const at::Tensor& codebook_sqnorm) {
  // Per-head codebooks [C, K, D] with z [N, C, D]: the single-codebook contract on the flattened
  // tensors (all contiguous), plus the head shapes.
  const bool heads = codebook.dim() == 3;
  if (heads) {
    TORCH_CHECK(codebook.size(0) >= 1 && codebook.size(0) <= 65535,
                "vqdna.lookup_cuda: codebook [C, K, D] needs 1 <= C <= 65535, got shape ", codebook.sizes());
    TORCH_CHECK(z.dim() == 3 && z.size(1) == codebook.size(0), "vqdna.lookup_cuda: with codebook ",
                codebook.sizes(), " z must be [N, ", codebook.size(0), ", D], got shape ", z.sizes());
    TORCH_CHECK(codebook_sqnorm.dim() == 2 && codebook_sqnorm.size(0) == codebook.size(0) &&
                    codebook_sqnorm.size(1) == codebook.size(1),
                "vqdna.lookup_cuda: codebook_sqnorm must have shape [", codebook.size(0), ", ",
                codebook.size(1), "], got ", codebook_sqnorm.sizes());
    TORCH_CHECK(z.is_contiguous() && codebook.is_contiguous() && codebook_sqnorm.is_contiguous(),
                "vqdna.lookup_cuda: z, codebook and codebook_sqnorm must be contiguous");
  }
  const int64_t c = heads ? codebook.size(0) : 1;
  const at::Tensor z2 = heads ? z.view({-1, z.size(2)}) : z;
  ::vqdna::cuda::check_search_inputs("lookup_cuda", z2, heads ? codebook.view({-1, codebook.size(2)}) : codebook,
                                     heads ? codebook_sqnorm.view({-1}) : codebook_sqnorm);
  const auto dtype = ::vqdna::cuda::kernel_dtype(z.scalar_type(), "lookup_cuda", "z");
  const int64_t n = z.size(0);
  const int64_t d = z.size(-1);
  const int64_t k = codebook.size(-2);
  TORCH_CHECK(k <= (int64_t{1} << 30), "vqdna.lookup_cuda: K = ", k, " exceeds 2^30");

  const c10::cuda::CUDAGuard device_guard(z.device());
  auto codes = at::empty(z.sizes().slice(0, z.dim() - 1), z.options().dtype(at::kInt));
  auto dist = at::empty(z.sizes().slice(0, z.dim() - 1), z.options().dtype(at::kFloat));
  if (n == 0) return {codes, dist};

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = ::vqdna::cuda::launch_lookup(
      z.data_ptr(), codebook.data_ptr(), codebook_sqnorm.data_ptr<float>(),
      codes.data_ptr<int32_t>(), dist.data_ptr<float>(), n, k, d, c, dtype, stream);
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, dist};
}

}  // namespace vqdna

TORCH_LIBRARY_IMPL(vqdna, CUDA, m) { m.impl("lookup_cuda", &vqdna::lookup_cuda); }
