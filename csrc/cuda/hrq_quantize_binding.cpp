// CUDA dispatch of torch.ops.vqdna.hrq_quantize_cuda (schema in csrc/vqdna.cpp; kernels in
// hrq_quantize.cu, which reuses the lookup kernel of lookup.cu). Same contract and checks as the
// CPU kernel (cpu/hrq_quantize.cpp).
//
// This first version materialises H_l in a scratch buffer [N, D] (see hrq_quantize.cu); the
// schema comment "H_l is never written" describes the fused kernels and only means H_l is not an
// output. The level offsets are copied to the device once per call (a small blocking H2D copy).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "hrq_quantize.cuh"

namespace vqdna {
namespace {

::vqdna::cuda::DType hrq_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ::vqdna::cuda::DType::kFloat32;
    case at::kBFloat16:
      return ::vqdna::cuda::DType::kBFloat16;
    case at::kHalf:
      return ::vqdna::cuda::DType::kFloat16;
    default:
      TORCH_CHECK(false, "vqdna.hrq_quantize_cuda: zs must be float32, bfloat16 or float16, got ", t);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hrq_quantize_cuda(at::TensorList zs, const at::Tensor& codebooks,
                                                     const at::Tensor& codebook_sqnorms,
                                                     at::IntArrayRef codebook_sizes) {
  const int64_t L = static_cast<int64_t>(zs.size());
  TORCH_CHECK(L >= 1, "vqdna.hrq_quantize_cuda: need at least one level");
  TORCH_CHECK(zs[0].is_cuda(), "vqdna.hrq_quantize_cuda: zs[0] must be a CUDA tensor, got ", zs[0].device());
  TORCH_CHECK(zs[0].dim() == 2, "vqdna.hrq_quantize_cuda: zs[0] must be [N, D], got shape ", zs[0].sizes());
  const auto device = zs[0].device();
  const auto dt = zs[0].scalar_type();
  const auto dtype = hrq_dtype(dt);
  const c10::cuda::CUDAGuard device_guard(device);

  std::vector<at::Tensor> zc;
  zc.reserve(L);
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(zs[l].device() == device, "vqdna.hrq_quantize_cuda: zs[", l, "] is on ", zs[l].device(),
                ", zs[0] is on ", device);
    TORCH_CHECK(zs[l].sizes() == zs[0].sizes() && zs[l].scalar_type() == dt, "vqdna.hrq_quantize_cuda: zs[", l,
                "] is ", zs[l].scalar_type(), " ", zs[l].sizes(), ", zs[0] is ", dt, " ", zs[0].sizes());
    zc.push_back(zs[l].contiguous());
  }
  const int64_t N = zs[0].size(0), D = zs[0].size(1);
  TORCH_CHECK(codebooks.device() == device && codebook_sqnorms.device() == device,
              "vqdna.hrq_quantize_cuda: codebooks and codebook_sqnorms must be on ", device);
  TORCH_CHECK(codebooks.dim() == 2 && codebooks.size(1) == D, "vqdna.hrq_quantize_cuda: codebooks must be [sum K_l, D=",
              D, "], got shape ", codebooks.sizes());
  TORCH_CHECK(static_cast<int64_t>(codebook_sizes.size()) == L, "vqdna.hrq_quantize_cuda: got ",
              codebook_sizes.size(), " codebook sizes for L=", L, " levels");
  std::vector<int64_t> offsets(L + 1, 0);
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(codebook_sizes[l] >= 1, "vqdna.hrq_quantize_cuda: level ", l, " has an empty codebook");
    TORCH_CHECK(codebook_sizes[l] <= (int64_t{1} << 30), "vqdna.hrq_quantize_cuda: level ", l, " has K = ",
                codebook_sizes[l], " > 2^30 codes");
    offsets[l + 1] = offsets[l] + codebook_sizes[l];
  }
  const int64_t total = offsets[L];
  TORCH_CHECK(total == codebooks.size(0), "vqdna.hrq_quantize_cuda: codebook sizes sum to ", total,
              " but codebooks has ", codebooks.size(0), " rows");
  TORCH_CHECK(codebook_sqnorms.dim() == 1 && codebook_sqnorms.size(0) == total &&
                  codebook_sqnorms.scalar_type() == at::kFloat,
              "vqdna.hrq_quantize_cuda: codebook_sqnorms must be float32 [", total, "]");
  TORCH_CHECK(codebooks.scalar_type() == dt, "vqdna.hrq_quantize_cuda: dtype mismatch: zs is ", dt,
              ", codebooks is ", codebooks.scalar_type());

  const at::Tensor cbc = codebooks.contiguous(), sqc = codebook_sqnorms.contiguous();
  at::Tensor codes = at::empty({L, N}, zc[0].options().dtype(at::kInt));
  at::Tensor levels = at::empty({L, N, D}, zc[0].options());
  if (N == 0) return {codes, levels};

  const auto elem = static_cast<uintptr_t>(zc[0].element_size());
  bool aligned = reinterpret_cast<uintptr_t>(cbc.data_ptr()) % elem == 0 &&
                 reinterpret_cast<uintptr_t>(sqc.data_ptr()) % 4 == 0;
  std::vector<const void*> zptrs;
  zptrs.reserve(L);
  for (const auto& z : zc) {
    aligned = aligned && reinterpret_cast<uintptr_t>(z.data_ptr()) % elem == 0;
    zptrs.push_back(z.const_data_ptr());
  }
  TORCH_CHECK(aligned, "vqdna.hrq_quantize_cuda: inputs must be aligned to their element size");

  // Scratch: H_l (levels >= 1 only), the lookup's unused distances, the level offsets on device.
  at::Tensor h_scratch;
  if (L > 1) h_scratch = at::empty({N, D}, zc[0].options());
  at::Tensor dist_scratch = at::empty({N}, zc[0].options().dtype(at::kFloat));
  const at::Tensor offsets_dev =
      at::tensor(at::ArrayRef<int64_t>(offsets.data(), L), at::TensorOptions().dtype(at::kLong)).to(device);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = ::vqdna::cuda::launch_hrq_quantize(
      zptrs.data(), L, cbc.const_data_ptr(), sqc.const_data_ptr<float>(), offsets.data(),
      offsets_dev.const_data_ptr<int64_t>(), h_scratch.defined() ? h_scratch.mutable_data_ptr() : nullptr,
      dist_scratch.mutable_data_ptr<float>(), codes.mutable_data_ptr<int32_t>(), levels.mutable_data_ptr(), N, D,
      dtype, stream);
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, levels};
}

}  // namespace vqdna

TORCH_LIBRARY_IMPL(vqdna, CUDA, m) { m.impl("hrq_quantize_cuda", &vqdna::hrq_quantize_cuda); }
