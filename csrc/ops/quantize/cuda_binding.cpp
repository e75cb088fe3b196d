// CUDA dispatch of torch.ops.vqdna.quantize_cuda (schema in schema.cpp; kernels in cuda.cu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <tuple>

#include "common/cuda_binding.h"
#include "ops/quantize/cuda.cuh"

namespace vqdna {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_cuda(
    const at::Tensor& z_in, const at::Tensor& codebook, const at::Tensor& codebook_sqnorm, bool normalize) {
  ::vqdna::cuda::check_search_inputs("quantize_cuda", z_in, codebook, codebook_sqnorm);
  const auto dtype = ::vqdna::cuda::kernel_dtype(z_in.scalar_type(), "quantize_cuda", "z");
  const int64_t n = z_in.size(0), d = z_in.size(1), k = codebook.size(0);

  const c10::cuda::CUDAGuard device_guard(z_in.device());
  // normalize: the kernel runs on l2norm(z) = z / max(|z|, 1e-6) (torch's normalize, in the dtype of z).
  const at::Tensor z =
      normalize ? (z_in / at::linalg_vector_norm(z_in, 2, {-1}, true).clamp_min(1e-6)).contiguous() : z_in;
  auto codes = at::empty({n}, z.options().dtype(at::kInt));
  auto quantized = at::empty({n, d}, z.options());
  auto dist = at::empty({n}, z.options().dtype(at::kFloat));
  auto sqdist_sum = at::empty({}, z.options().dtype(at::kFloat));
  auto nonfinite = at::empty({2}, z.options().dtype(at::kLong));
  // (float64 loss sum as bits, non-finite count, max of n - row over non-finite rows): all zero.
  auto scratch = at::zeros({3}, z.options().dtype(at::kLong));
  TORCH_CHECK(::vqdna::cuda::aligned_to(quantized, 16), "vqdna.quantize_cuda: the output is not 16-byte aligned");

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = ::vqdna::cuda::launch_quantize(
      z.data_ptr(), codebook.data_ptr(), codebook_sqnorm.data_ptr<float>(), codes.data_ptr<int32_t>(),
      quantized.data_ptr(), dist.data_ptr<float>(), scratch.data_ptr<int64_t>(), sqdist_sum.data_ptr<float>(),
      nonfinite.data_ptr<int64_t>(), n, k, d, dtype, stream);
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, quantized, dist, sqdist_sum, nonfinite};
}

}  // namespace vqdna

TORCH_LIBRARY_IMPL(vqdna, CUDA, m) { m.impl("quantize_cuda", &vqdna::quantize_cuda); }
