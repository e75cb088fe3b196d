// Host-side decisions of the CUDA codebook search (common/cuda_codebook_search.cuh) that the lookup
// and hrq_quantize launchers share. Plain C++ header: nvcc and the host compiler both read it.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace vqdna::cuda {

// Whether the bf16 / fp16 tensor-core search (lookup, HRQ) stages its tiles with 16-byte cp.async /
// vector loads: D % 8 == 0 and every input (z or each Z_l, the codebook) 16-byte aligned; otherwise
// bounds-checked 2-byte loads. float32 always uses 4-byte cp.async. vqdna/kernels/cuda_launch.py
// mirrors this (tests/build checks they agree).
inline bool mma_vec_loads(DType dtype, int64_t d, bool inputs_aligned16) {
  return dtype != DType::kFloat32 && d > 0 && d % 8 == 0 && inputs_aligned16;
}

}  // namespace vqdna::cuda
