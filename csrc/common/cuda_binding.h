// Host-side helpers shared by the CUDA op bindings (csrc/ops/<op>/cuda_binding.cpp): dtype mapping and alignment checks.
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

}  // namespace vqdna::cuda
