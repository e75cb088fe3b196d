// Host-side helpers shared by the CUDA op bindings (csrc/ops/<op>/cuda_binding.cpp): dtype mapping,
// alignment checks and the input checks of the single-codebook searches.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/dtype.h"

namespace vqdna::cuda {

// The kernels' dtype tag for a float tensor; `op` and `tensor` name the call in the error.
inline DType kernel_dtype(at::ScalarType t, const char* op, const char* tensor) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "vqdna.", op, ": ", tensor, " must be float32, bfloat16 or float16, got ", t);
  }
}

inline bool aligned_to(const at::Tensor& t, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

// The input contract of the single-codebook CUDA searches (lookup_cuda, quantize_cuda): CUDA tensors on
// one device, z [N, D] and codebook [K, D] contiguous of one kernel dtype, codebook_sqnorm [K] float32
// contiguous, 1 <= K <= 2^30, every pointer aligned to its element. `op` names the caller in the
// messages ("lookup_cuda").
inline void check_search_inputs(const char* op, const at::Tensor& z, const at::Tensor& codebook,
                                const at::Tensor& codebook_sqnorm) {
  TORCH_CHECK(z.is_cuda(), "vqdna.", op, ": z must be a CUDA tensor, got ", z.device());
  TORCH_CHECK(codebook.is_cuda(), "vqdna.", op, ": codebook must be a CUDA tensor, got ",
              codebook.device());
  TORCH_CHECK(codebook_sqnorm.is_cuda(),
              "vqdna.", op, ": codebook_sqnorm must be a CUDA tensor, got ",
              codebook_sqnorm.device());
  TORCH_CHECK(codebook.device() == z.device() && codebook_sqnorm.device() == z.device(),
              "vqdna.", op, ": all inputs must be on the same device, got z on ", z.device(),
              ", codebook on ", codebook.device(), ", codebook_sqnorm on ",
              codebook_sqnorm.device());
  TORCH_CHECK(z.dim() == 2, "vqdna.", op, ": z must be 2-D [N, D], got shape ", z.sizes());
  TORCH_CHECK(codebook.dim() == 2, "vqdna.", op, ": codebook must be 2-D [K, D], got shape ",
              codebook.sizes());
  TORCH_CHECK(codebook_sqnorm.dim() == 1,
              "vqdna.", op, ": codebook_sqnorm must be 1-D [K], got shape ",
              codebook_sqnorm.sizes());
  TORCH_CHECK(codebook.scalar_type() == z.scalar_type(),
              "vqdna.", op, ": z and codebook must have the same dtype, got ", z.scalar_type(),
              " and ", codebook.scalar_type());
  (void)kernel_dtype(z.scalar_type(), op, "z");
  TORCH_CHECK(codebook_sqnorm.scalar_type() == at::kFloat,
              "vqdna.", op, ": codebook_sqnorm must be float32, got ",
              codebook_sqnorm.scalar_type());

  const int64_t d = z.size(1);
  const int64_t k = codebook.size(0);
  TORCH_CHECK(codebook.size(1) == d, "vqdna.", op, ": z has D = ", d, " but codebook has D = ",
              codebook.size(1));
  TORCH_CHECK(k >= 1, "vqdna.", op, ": the codebook must have at least one code (K >= 1)");
  TORCH_CHECK(k <= (int64_t{1} << 30), "vqdna.", op, ": K = ", k, " exceeds 2^30");
  TORCH_CHECK(codebook_sqnorm.size(0) == k, "vqdna.", op, ": codebook_sqnorm has ",
              codebook_sqnorm.size(0), " entries but the codebook has K = ", k);
  TORCH_CHECK(z.is_contiguous(), "vqdna.", op, ": z must be contiguous");
  TORCH_CHECK(codebook.is_contiguous(), "vqdna.", op, ": codebook must be contiguous");
  TORCH_CHECK(codebook_sqnorm.is_contiguous(),
              "vqdna.", op, ": codebook_sqnorm must be contiguous");
  // The kernels read elements at their natural alignment (vector loads are chosen in the launchers
  // only when the pointers are 16-byte aligned); torch storages always satisfy this.
  const auto elem = static_cast<uintptr_t>(z.element_size());
  TORCH_CHECK(aligned_to(z, elem) && aligned_to(codebook, elem) && aligned_to(codebook_sqnorm, 4),
              "vqdna.", op, ": inputs must be aligned to their element size");
}

}  // namespace vqdna::cuda
