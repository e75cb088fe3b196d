// CUDA dispatch of torch.ops.vqdna.ema_stats_cuda (schema in csrc/vqdna.cpp; kernels in
// ema_stats.cu). Same contract and checks as the CPU kernel (cpu/ema_stats.cpp).
//
// Code-range checks: like the CPU path, codes (and prev_codes) outside their range are an error.
// On CUDA that needs the min / max on the host, i.e. one device -> host synchronisation per call
// (a single small copy of at most 4 scalars). The kernels additionally ignore out-of-range rows, so
// they never read or write out of bounds even without the check.
//
// deterministic = false: float atomics into zeroed outputs (fast, order of additions unspecified).
// deterministic = true: codes are stably sorted here (at::sort(stable=true)), segment starts come
// from at::searchsorted, and one block per (code, D tile) sums its rows in sorted order.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "ema_stats.cuh"

namespace vqdna {
namespace {

::vqdna::cuda::DType ema_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ::vqdna::cuda::DType::kFloat32;
    case at::kBFloat16:
      return ::vqdna::cuda::DType::kBFloat16;
    case at::kHalf:
      return ::vqdna::cuda::DType::kFloat16;
    default:
      TORCH_CHECK(false, "vqdna.ema_stats_cuda: x must be float32, bfloat16 or float16, got ", t);
  }
}

// Throws with the first offending index when some entry of `c` (int32, on device) is outside [0, hi).
void check_first_out_of_range(const at::Tensor& c, int64_t hi, const char* name) {
  const at::Tensor bad = at::logical_or(c.lt(0), c.ge(hi)).nonzero();
  if (bad.size(0) == 0) return;
  const int64_t i = bad[0][0].item<int64_t>();
  TORCH_CHECK(false, "vqdna.ema_stats_cuda: ", name, "[", i, "] = ", c[i].item<int32_t>(),
              " is outside [0, ", hi, ")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ema_stats_cuda(const at::Tensor& x, const at::Tensor& codes,
                                                  const std::optional<at::Tensor>& mask,
                                                  const std::optional<at::Tensor>& prev_codes,
                                                  const std::optional<at::Tensor>& prev_codebook,
                                                  int64_t num_codes, bool deterministic) {
  TORCH_CHECK(x.is_cuda(), "vqdna.ema_stats_cuda: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(codes.device() == x.device(), "vqdna.ema_stats_cuda: codes must be on ", x.device(),
              ", got ", codes.device());
  TORCH_CHECK(x.dim() == 2, "vqdna.ema_stats_cuda: x must be [N, D], got shape ", x.sizes());
  const int64_t N = x.size(0), D = x.size(1);
  TORCH_CHECK(codes.dim() == 1 && codes.size(0) == N && codes.scalar_type() == at::kInt,
              "vqdna.ema_stats_cuda: codes must be int32 [", N, "], got ", codes.scalar_type(), " ",
              codes.sizes());
  TORCH_CHECK(num_codes >= 1, "vqdna.ema_stats_cuda: num_codes must be >= 1, got ", num_codes);
  TORCH_CHECK(num_codes <= int64_t{std::numeric_limits<int32_t>::max()} - 1,
              "vqdna.ema_stats_cuda: num_codes = ", num_codes, " is too large");
  const auto dt = x.scalar_type();
  const auto dtype = ema_dtype(dt);
  const c10::cuda::CUDAGuard device_guard(x.device());

  at::Tensor mc;
  if (mask.has_value()) {
    TORCH_CHECK(mask->device() == x.device(), "vqdna.ema_stats_cuda: mask must be on ", x.device(),
                ", got ", mask->device());
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == N && mask->scalar_type() == at::kBool,
                "vqdna.ema_stats_cuda: mask must be bool [", N, "]");
    mc = mask->contiguous();
  }
  TORCH_CHECK(prev_codes.has_value() == prev_codebook.has_value(),
              "vqdna.ema_stats_cuda: pass prev_codes and prev_codebook together");
  at::Tensor pc, pcb;
  if (prev_codes.has_value()) {
    TORCH_CHECK(prev_codes->device() == x.device() && prev_codebook->device() == x.device(),
                "vqdna.ema_stats_cuda: prev_codes and prev_codebook must be on ", x.device());
    TORCH_CHECK(prev_codes->dim() == 1 && prev_codes->size(0) == N && prev_codes->scalar_type() == at::kInt,
                "vqdna.ema_stats_cuda: prev_codes must be int32 [", N, "]");
    TORCH_CHECK(prev_codebook->dim() == 2 && prev_codebook->size(1) == D && prev_codebook->scalar_type() == dt,
                "vqdna.ema_stats_cuda: prev_codebook must be [K', ", D, "] of dtype ", dt);
    pc = prev_codes->contiguous();
    pcb = prev_codebook->contiguous();
  }

  const at::Tensor xc = x.contiguous(), cc = codes.contiguous();
  at::Tensor counts = at::zeros({num_codes}, xc.options().dtype(at::kFloat));
  at::Tensor sums = at::zeros({num_codes, D}, xc.options().dtype(at::kFloat));
  if (N == 0) return {counts, sums};

  // Range checks: min / max of codes (and prev_codes) in one device -> host copy.
  {
    std::vector<at::Tensor> ext;
    const auto cm = at::aminmax(cc);
    ext.push_back(std::get<0>(cm).to(at::kLong).reshape({1}));
    ext.push_back(std::get<1>(cm).to(at::kLong).reshape({1}));
    if (pc.defined()) {
      const auto pm = at::aminmax(pc);
      ext.push_back(std::get<0>(pm).to(at::kLong).reshape({1}));
      ext.push_back(std::get<1>(pm).to(at::kLong).reshape({1}));
    }
    const at::Tensor host = at::cat(ext).cpu();
    const int64_t* h = host.const_data_ptr<int64_t>();
    if (h[0] < 0 || h[1] >= num_codes) check_first_out_of_range(cc, num_codes, "codes");
    if (pc.defined() && (h[2] < 0 || h[3] >= pcb.size(0))) check_first_out_of_range(pc, pcb.size(0), "prev_codes");
  }

  const auto elem = static_cast<uintptr_t>(xc.element_size());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(xc.data_ptr()) % elem == 0 &&
                  (!pcb.defined() || reinterpret_cast<uintptr_t>(pcb.data_ptr()) % elem == 0),
              "vqdna.ema_stats_cuda: inputs must be aligned to their element size");

  const uint8_t* mp = mc.defined() ? reinterpret_cast<const uint8_t*>(mc.const_data_ptr<bool>()) : nullptr;
  const int32_t* pp = pc.defined() ? pc.const_data_ptr<int32_t>() : nullptr;
  const void* pcbp = pcb.defined() ? pcb.const_data_ptr() : nullptr;
  const int64_t prev_k = pcb.defined() ? pcb.size(0) : 0;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  cudaError_t err;
  if (!deterministic) {
    err = ::vqdna::cuda::launch_ema_stats_atomic(xc.const_data_ptr(), cc.const_data_ptr<int32_t>(), mp, pp, pcbp,
                                                 prev_k, counts.mutable_data_ptr<float>(),
                                                 sums.mutable_data_ptr<float>(), N, D, num_codes, dtype, stream);
  } else {
    // Stable sort keeps the rows of one code in ascending row order (the CPU kernel's order).
    const auto sorted = at::sort(cc, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor sorted_codes = std::get<0>(sorted).contiguous();
    const at::Tensor order = std::get<1>(sorted).to(at::kLong).contiguous();
    const at::Tensor bounds = at::arange(num_codes + 1, cc.options());  // int32, like sorted_codes
    const at::Tensor starts =
        at::searchsorted(sorted_codes, bounds, /*out_int32=*/false, /*right=*/false).to(at::kLong).contiguous();
    err = ::vqdna::cuda::launch_ema_stats_segment(xc.const_data_ptr(), order.const_data_ptr<int64_t>(),
                                                  starts.const_data_ptr<int64_t>(), mp, pp, pcbp, prev_k,
                                                  counts.mutable_data_ptr<float>(),
                                                  sums.mutable_data_ptr<float>(), D, num_codes, dtype, stream);
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {counts, sums};
}

}  // namespace vqdna

TORCH_LIBRARY_IMPL(vqdna, CUDA, m) { m.impl("ema_stats_cuda", &vqdna::ema_stats_cuda); }
