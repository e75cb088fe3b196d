// CUDA dispatch of torch.ops.vqdna.stem_cuda (schema in schema.cpp; kernels in cuda.cu).
// Narrow includes (not ATen/ATen.h): the host-compiler check in tests/build parses this file.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "ops/stem/cuda.cuh"

namespace vqdna {

at::Tensor stem_cuda(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& bias,
                     const at::Tensor& ln_weight, const at::Tensor& ln_bias, double ln_eps,
                     at::ScalarType out_dtype) {
  for (const at::Tensor* t : {&weight, &bias, &ln_weight, &ln_bias}) {
    TORCH_CHECK(t->is_cuda() && t->device() == ids.device(),
                "vqdna.stem_cuda: all inputs must be CUDA tensors on one device, got ids on ", ids.device(),
                " and a parameter on ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat, "vqdna.stem_cuda: parameters must be float32, got ",
                t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), "vqdna.stem_cuda: parameters must be contiguous");
  }
  TORCH_CHECK(ids.is_cuda(), "vqdna.stem_cuda: ids must be a CUDA tensor, got ", ids.device());
  TORCH_CHECK(ids.dim() == 2, "stem: ids must be [B, L], got shape ", ids.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.size(1) == 5 && weight.size(2) % 2 == 1,
              "stem: weight must be [D, 5, odd width], got ", weight.sizes());
  const int64_t d = weight.size(0), width = weight.size(2);
  for (const at::Tensor* t : {&bias, &ln_weight, &ln_bias}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == d, "stem: bias, ln_weight and ln_bias must be [D] = [", d,
                "], got ", t->sizes());
  }
  TORCH_CHECK(d >= 1 && d <= ::vqdna::cuda::kStemMaxDim, "vqdna.stem_cuda: D = ", d, " is outside [1, ",
              ::vqdna::cuda::kStemMaxDim, "] (the triton backend has no such limit)");
  TORCH_CHECK(width <= ::vqdna::cuda::kStemMaxWidth, "vqdna.stem_cuda: kernel width W = ", width,
              " is over ", ::vqdna::cuda::kStemMaxWidth, " (the triton backend has no such limit)");
  ::vqdna::cuda::StemIds id_type;
  switch (ids.scalar_type()) {
    case at::kByte:
      id_type = ::vqdna::cuda::StemIds::kUInt8;
      break;
    case at::kInt:
      id_type = ::vqdna::cuda::StemIds::kInt32;
      break;
    case at::kLong:
      id_type = ::vqdna::cuda::StemIds::kInt64;
      break;
    default:
      TORCH_CHECK(false, "vqdna.stem_cuda: ids must be uint8, int32 or int64, got ", ids.scalar_type());
  }
  ::vqdna::cuda::StemOut out_type;
  switch (out_dtype) {
    case at::kFloat:
      out_type = ::vqdna::cuda::StemOut::kFloat32;
      break;
    case at::kBFloat16:
      out_type = ::vqdna::cuda::StemOut::kBFloat16;
      break;
    case at::kHalf:
      out_type = ::vqdna::cuda::StemOut::kFloat16;
      break;
    default:
      TORCH_CHECK(false, "vqdna.stem_cuda: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
  }

  const c10::cuda::CUDAGuard device_guard(ids.device());
  const at::Tensor idc = ids.contiguous();
  const int64_t batch = idc.size(0), length = idc.size(1);
  at::Tensor out = at::empty({batch, length, d}, weight.options().dtype(out_dtype));
  if (batch * length == 0) return out;
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(::vqdna::cuda::stem_table_bytes(d, width) <= optin, "vqdna.stem_cuda: the [W, 5, D] weight table (",
              ::vqdna::cuda::stem_table_bytes(d, width), " bytes) exceeds this GPU's shared memory per block (",
              optin, " bytes); use backend='triton'");

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(::vqdna::cuda::launch_stem(idc.data_ptr(), id_type, weight.data_ptr<float>(), bias.data_ptr<float>(),
                                            ln_weight.data_ptr<float>(), ln_bias.data_ptr<float>(), out.data_ptr(),
                                            out_type, batch * length, length, d, width,
                                            static_cast<float>(ln_eps), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace vqdna

TORCH_LIBRARY_IMPL(vqdna, CUDA, m) { m.impl("stem_cuda", &vqdna::stem_cuda); }
