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
  ::vqdna::cuda::check_search_inputs("lookup_cuda", z, codebook, codebook_sqnorm);
  const auto dtype = ::vqdna::cuda::kernel_dtype(z.scalar_type(), "lookup_cuda", "z");
  const int64_t n = z.size(0);
  const int64_t d = z.size(1);
  const int64_t k = codebook.size(0);

  const c10::cuda::CUDAGuard device_guard(z.device());
  auto codes = at::empty({n}, z.options().dtype(at::kInt));
  auto dist = at::empty({n}, z.options().dtype(at::kFloat));
  if (n == 0) return {codes, dist};

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = ::vqdna::cuda::launch_lookup(
      z.data_ptr(), codebook.data_ptr(), codebook_sqnorm.data_ptr<float>(),
      codes.data_ptr<int32_t>(), dist.data_ptr<float>(), n, k, d, dtype, stream);
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, dist};
}

}  // namespace vqdna

TORCH_LIBRARY_IMPL(vqdna, CUDA, m) { m.impl("lookup_cuda", &vqdna::lookup_cuda); }
