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
  TORCH_CHECK(z.is_cuda(), "vqdna.lookup_cuda: z must be a CUDA tensor, got ", z.device());
  TORCH_CHECK(codebook.is_cuda(), "vqdna.lookup_cuda: codebook must be a CUDA tensor, got ",
              codebook.device());
  TORCH_CHECK(codebook_sqnorm.is_cuda(),
              "vqdna.lookup_cuda: codebook_sqnorm must be a CUDA tensor, got ",
              codebook_sqnorm.device());
  TORCH_CHECK(codebook.device() == z.device() && codebook_sqnorm.device() == z.device(),
              "vqdna.lookup_cuda: all inputs must be on the same device, got z on ", z.device(),
              ", codebook on ", codebook.device(), ", codebook_sqnorm on ",
              codebook_sqnorm.device());
  TORCH_CHECK(z.dim() == 2, "vqdna.lookup_cuda: z must be 2-D [N, D], got shape ", z.sizes());
  TORCH_CHECK(codebook.dim() == 2, "vqdna.lookup_cuda: codebook must be 2-D [K, D], got shape ",
              codebook.sizes());
  TORCH_CHECK(codebook_sqnorm.dim() == 1,
              "vqdna.lookup_cuda: codebook_sqnorm must be 1-D [K], got shape ",
              codebook_sqnorm.sizes());
  TORCH_CHECK(codebook.scalar_type() == z.scalar_type(),
              "vqdna.lookup_cuda: z and codebook must have the same dtype, got ", z.scalar_type(),
              " and ", codebook.scalar_type());
  const auto dtype = ::vqdna::cuda::kernel_dtype(z.scalar_type(), "lookup_cuda", "z");
  TORCH_CHECK(codebook_sqnorm.scalar_type() == at::kFloat,
              "vqdna.lookup_cuda: codebook_sqnorm must be float32, got ",
              codebook_sqnorm.scalar_type());

  const int64_t n = z.size(0);
  const int64_t d = z.size(1);
  const int64_t k = codebook.size(0);
  TORCH_CHECK(codebook.size(1) == d, "vqdna.lookup_cuda: z has D = ", d, " but codebook has D = ",
              codebook.size(1));
  TORCH_CHECK(k >= 1, "vqdna.lookup_cuda: the codebook must have at least one code (K >= 1)");
  TORCH_CHECK(k <= (int64_t{1} << 30), "vqdna.lookup_cuda: K = ", k, " exceeds 2^30");
  TORCH_CHECK(codebook_sqnorm.size(0) == k, "vqdna.lookup_cuda: codebook_sqnorm has ",
              codebook_sqnorm.size(0), " entries but the codebook has K = ", k);
  TORCH_CHECK(z.is_contiguous(), "vqdna.lookup_cuda: z must be contiguous");
  TORCH_CHECK(codebook.is_contiguous(), "vqdna.lookup_cuda: codebook must be contiguous");
  TORCH_CHECK(codebook_sqnorm.is_contiguous(),
              "vqdna.lookup_cuda: codebook_sqnorm must be contiguous");

  const c10::cuda::CUDAGuard device_guard(z.device());
  auto codes = at::empty({n}, z.options().dtype(at::kInt));
  auto dist = at::empty({n}, z.options().dtype(at::kFloat));
  if (n == 0) return {codes, dist};

  // The kernels read elements at their natural alignment (vector loads are chosen in the launcher
  // only when the pointers are 16-byte aligned); torch storages always satisfy this.
  const auto elem = static_cast<uintptr_t>(z.element_size());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(z.data_ptr()) % elem == 0 &&
                  reinterpret_cast<uintptr_t>(codebook.data_ptr()) % elem == 0 &&
                  reinterpret_cast<uintptr_t>(codebook_sqnorm.data_ptr()) % 4 == 0,
              "vqdna.lookup_cuda: inputs must be aligned to their element size");

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
