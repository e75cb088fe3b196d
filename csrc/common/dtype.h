// The element type tag the CUDA launchers take (plain C++: no torch or CUDA includes, so both nvcc
// and the host compiler read it).
#pragma once

namespace vqdna::cuda {

// Element type of a kernel's float inputs (z and codebook, x, the stem's output, ...).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace vqdna::cuda
