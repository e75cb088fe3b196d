// CUDA dispatch of torch.ops.vqdna.ema_stats_cuda (schema in schema.cpp; kernels in cuda.cu).
//
// Code ranges: codes must lie in [0, num_codes) and prev_codes in [0, K'); anything else is the
// CALLER'S ERROR. It is not validated here, because that would cost a device -> host
// synchronisation per call; the kernels ignore such rows (they never read or write out of bounds),
// so an out-of-range code silently drops its row from counts and sums.
//
// deterministic = false: float atomics into zeroed outputs (fast; order of additions unspecified).
// deterministic = true: codes are stably sorted here (at::sort(stable=true), deterministic on
// CUDA), then cuda.cu's sorted-segment kernels sum every code's rows in a fixed order with no
// float atomics: bitwise repeatable run to run.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "common/cuda_binding.h"
#include "ops/ema_stats/cuda.cuh"

namespace vqdna {

using ::vqdna::cuda::aligned_to;

std::tuple<at::Tensor, at::Tensor> ema_stats_cuda(const at::Tensor& x, const at::Tensor& codes,
                                                  const std::optional<at::Tensor>& mask,
                                                  const std::optional<at::Tensor>& prev_codes,
                                                  const std::optional<at::Tensor>& prev_codebook,
                                                  int64_t num_codes, bool deterministic) {
  TORCH_CHECK(x.is_cuda(), "vqdna.ema_stats_cuda: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(codes.is_cuda() && codes.device() == x.device(), "vqdna.ema_stats_cuda: codes must be on ",
              x.device(), ", got ", codes.device());
  TORCH_CHECK(x.dim() == 2, "vqdna.ema_stats_cuda: x must be 2-D [N, D], got shape ", x.sizes());
  const int64_t n = x.size(0);
  const int64_t d = x.size(1);
  const auto dt = x.scalar_type();
  const auto dtype = ::vqdna::cuda::kernel_dtype(dt, "ema_stats_cuda", "x");
  TORCH_CHECK(x.is_contiguous(), "vqdna.ema_stats_cuda: x must be contiguous");
  TORCH_CHECK(codes.dim() == 1 && codes.size(0) == n, "vqdna.ema_stats_cuda: codes must be 1-D [", n,
              "], got shape ", codes.sizes());
  TORCH_CHECK(codes.scalar_type() == at::kInt, "vqdna.ema_stats_cuda: codes must be int32, got ",
              codes.scalar_type());
  TORCH_CHECK(codes.is_contiguous(), "vqdna.ema_stats_cuda: codes must be contiguous");
  TORCH_CHECK(num_codes >= 1, "vqdna.ema_stats_cuda: num_codes must be >= 1, got ", num_codes);
  TORCH_CHECK(num_codes <= int64_t{std::numeric_limits<int32_t>::max()} - 1,
              "vqdna.ema_stats_cuda: num_codes = ", num_codes, " is too large (codes are int32)");

  const uint8_t* mask_ptr = nullptr;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.is_cuda() && m.device() == x.device(), "vqdna.ema_stats_cuda: mask must be on ",
                x.device(), ", got ", m.device());
    TORCH_CHECK(m.dim() == 1 && m.size(0) == n, "vqdna.ema_stats_cuda: mask must be 1-D [", n,
                "], got shape ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool, "vqdna.ema_stats_cuda: mask must be bool, got ",
                m.scalar_type());
    TORCH_CHECK(m.is_contiguous(), "vqdna.ema_stats_cuda: mask must be contiguous");
    mask_ptr = reinterpret_cast<const uint8_t*>(m.data_ptr());
  }
  TORCH_CHECK(prev_codes.has_value() == prev_codebook.has_value(),
              "vqdna.ema_stats_cuda: pass prev_codes and prev_codebook together");
  const int32_t* prev_ptr = nullptr;
  const void* prev_cb_ptr = nullptr;
  int64_t prev_k = 0;
  if (prev_codes.has_value()) {
    const at::Tensor& pc = *prev_codes;
    const at::Tensor& pcb = *prev_codebook;
    TORCH_CHECK(pc.is_cuda() && pc.device() == x.device() && pcb.is_cuda() && pcb.device() == x.device(),
                "vqdna.ema_stats_cuda: prev_codes and prev_codebook must be on ", x.device(), ", got ",
                pc.device(), " and ", pcb.device());
    TORCH_CHECK(pc.dim() == 1 && pc.size(0) == n, "vqdna.ema_stats_cuda: prev_codes must be 1-D [", n,
                "], got shape ", pc.sizes());
    TORCH_CHECK(pc.scalar_type() == at::kInt, "vqdna.ema_stats_cuda: prev_codes must be int32, got ",
                pc.scalar_type());
    TORCH_CHECK(pc.is_contiguous(), "vqdna.ema_stats_cuda: prev_codes must be contiguous");
    TORCH_CHECK(pcb.dim() == 2 && pcb.size(1) == d, "vqdna.ema_stats_cuda: prev_codebook must be 2-D [K', ",
                d, "], got shape ", pcb.sizes());
    TORCH_CHECK(pcb.scalar_type() == dt, "vqdna.ema_stats_cuda: prev_codebook must have the dtype of x (",
                dt, "), got ", pcb.scalar_type());
    TORCH_CHECK(pcb.is_contiguous(), "vqdna.ema_stats_cuda: prev_codebook must be contiguous");
    TORCH_CHECK(aligned_to(pcb, pcb.element_size()),
                "vqdna.ema_stats_cuda: prev_codebook must be aligned to its element size");
    prev_ptr = pc.data_ptr<int32_t>();
    prev_cb_ptr = pcb.data_ptr();
    prev_k = pcb.size(0);
  }
  TORCH_CHECK(aligned_to(x, x.element_size()), "vqdna.ema_stats_cuda: x must be aligned to its element size");

  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto fopts = x.options().dtype(at::kFloat);
  if (n == 0) return {at::zeros({num_codes}, fopts), at::zeros({num_codes, d}, fopts)};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor counts, sums;
  cudaError_t err;
  if (!deterministic) {
    counts = at::zeros({num_codes}, fopts);
    sums = at::zeros({num_codes, d}, fopts);
    err = ::vqdna::cuda::launch_ema_stats_atomic(x.data_ptr(), codes.data_ptr<int32_t>(), mask_ptr, prev_ptr,
                                                 prev_cb_ptr, prev_k, counts.data_ptr<float>(),
                                                 sums.data_ptr<float>(), n, d, num_codes, dtype, stream);
  } else {
    // Every element of counts / sums is written by the kernels: no zero fill needed.
    counts = at::empty({num_codes}, fopts);
    sums = at::empty({num_codes, d}, fopts);
    const auto sorted = at::sort(codes, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor sorted_codes = std::get<0>(sorted).contiguous();  // int32
    const at::Tensor order = std::get<1>(sorted).to(at::kLong).contiguous();
    const int64_t chunks = ::vqdna::cuda::ema_stats_chunk_capacity(n, num_codes);
    const int64_t slots = ::vqdna::cuda::ema_stats_partial_capacity(n);
    TORCH_CHECK(chunks <= int64_t{std::numeric_limits<int32_t>::max()},
                "vqdna.ema_stats_cuda: N = ", n, " with num_codes = ", num_codes, " is too large");
    const auto lopts = x.options().dtype(at::kLong);
    at::Tensor starts = at::empty({num_codes + 1}, lopts);
    at::Tensor chunk_code = at::empty({chunks}, x.options().dtype(at::kInt));
    at::Tensor partial = at::empty({slots, d}, fopts);
    at::Tensor partial_count = at::empty({slots}, fopts);
    err = ::vqdna::cuda::launch_ema_stats_sorted(
        x.data_ptr(), sorted_codes.data_ptr<int32_t>(), order.data_ptr<int64_t>(), mask_ptr, prev_ptr,
        prev_cb_ptr, prev_k, starts.data_ptr<int64_t>(), chunk_code.data_ptr<int32_t>(),
        partial.data_ptr<float>(), partial_count.data_ptr<float>(), counts.data_ptr<float>(),
        sums.data_ptr<float>(), n, d, num_codes, dtype, stream);
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {counts, sums};
}

}  // namespace vqdna

TORCH_LIBRARY_IMPL(vqdna, CUDA, m) { m.impl("ema_stats_cuda", &vqdna::ema_stats_cuda); }
