// Native CPU EMA statistics (docs/design.md §2.3): counts[k] = sum_i w_i [codes_i = k] and
// sums[k] = sum_i w_i [codes_i = k] v_i in float32, v_i = x_i or 2 x_i - prev_codebook[prev_i].
// Work is split by ranges of codes: every task scans the (small) code array and accumulates only
// its own codes' rows, in row order. No two tasks write the same output, so there are no races
// and no atomics, and the result is bitwise the same for any thread count: the CPU path is always
// deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "common/cpu_buffers.h"

namespace {

using namespace vqdna::cpu;

template <typename T>
void ema_stats_kernel(const at::Tensor& x, const int32_t* codes, const bool* mask, const int32_t* prev_codes,
                      const T* prev_codebook, int64_t K, at::Tensor& counts, at::Tensor& sums) {
  const int64_t N = x.size(0), D = x.size(1);
  const T* xp = x.const_data_ptr<T>();
  float* counts_p = counts.mutable_data_ptr<float>();
  float* sums_p = sums.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, K / (4 * std::max<int64_t>(1, at::get_num_threads())));
  at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
    AlignedBuf v = aligned_floats(D), e = aligned_floats(D);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t k = codes[i];
      if (k < k0 || k >= k1 || (mask && !mask[i])) continue;
      row_to_float(xp + i * D, v.get(), D);
      if (prev_codes) {
        row_to_float(prev_codebook + int64_t(prev_codes[i]) * D, e.get(), D);
        for (int64_t d = 0; d < D; ++d) v[d] = 2.f * v[d] - e[d];
      }
      float* s = sums_p + k * D;
      for (int64_t d = 0; d < D; ++d) s[d] += v[d];
      counts_p[k] += 1.f;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> ema_stats_native_cpu(const at::Tensor& x, const at::Tensor& codes,
                                                        const std::optional<at::Tensor>& mask,
                                                        const std::optional<at::Tensor>& prev_codes,
                                                        const std::optional<at::Tensor>& prev_codebook,
                                                        int64_t num_codes, bool deterministic) {
  (void)deterministic;  // always deterministic here
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu(), "vqdna.ema_stats_native: inputs must be CPU tensors");
  TORCH_CHECK(x.dim() == 2, "vqdna.ema_stats_native: x must be [N, D], got shape ", x.sizes());
  const int64_t N = x.size(0), D = x.size(1);
  TORCH_CHECK(codes.dim() == 1 && codes.size(0) == N && codes.scalar_type() == at::kInt,
              "vqdna.ema_stats_native: codes must be int32 [", N, "], got ", codes.scalar_type(), " ", codes.sizes());
  TORCH_CHECK(num_codes >= 1, "vqdna.ema_stats_native: num_codes must be >= 1, got ", num_codes);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "vqdna.ema_stats_native: x must be float32, bfloat16 or float16, got ", dt);
  const at::Tensor xc = x.contiguous(), cc = codes.contiguous();
  const int32_t* cp = cc.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(cp[i] >= 0 && cp[i] < num_codes, "vqdna.ema_stats_native: codes[", i, "] = ", cp[i],
                " is outside [0, ", num_codes, ")");
  }
  at::Tensor mc;
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == N && mask->scalar_type() == at::kBool,
                "vqdna.ema_stats_native: mask must be bool [", N, "]");
    mc = mask->contiguous();
  }
  TORCH_CHECK(prev_codes.has_value() == prev_codebook.has_value(),
              "vqdna.ema_stats_native: pass prev_codes and prev_codebook together");
  at::Tensor pc, pcb;
  if (prev_codes.has_value()) {
    TORCH_CHECK(prev_codes->dim() == 1 && prev_codes->size(0) == N && prev_codes->scalar_type() == at::kInt,
                "vqdna.ema_stats_native: prev_codes must be int32 [", N, "]");
    TORCH_CHECK(prev_codebook->dim() == 2 && prev_codebook->size(1) == D && prev_codebook->scalar_type() == dt,
                "vqdna.ema_stats_native: prev_codebook must be [K', ", D, "] of dtype ", dt);
    pc = prev_codes->contiguous();
    pcb = prev_codebook->contiguous();
    const int32_t* pp = pc.const_data_ptr<int32_t>();
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK(pp[i] >= 0 && pp[i] < pcb.size(0), "vqdna.ema_stats_native: prev_codes[", i, "] = ", pp[i],
                  " is outside [0, ", pcb.size(0), ")");
    }
  }
  at::Tensor counts = at::zeros({num_codes}, xc.options().dtype(at::kFloat));
  at::Tensor sums = at::zeros({num_codes, D}, xc.options().dtype(at::kFloat));
  if (N == 0) return {counts, sums};
  const bool* mp = mc.defined() ? mc.const_data_ptr<bool>() : nullptr;
  const int32_t* pp = pc.defined() ? pc.const_data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_SWITCH(dt, "vqdna_ema_stats_native",
                     AT_DISPATCH_CASE(at::kFloat, [&] {
                       ema_stats_kernel<float>(xc, cp, mp, pp, pcb.defined() ? pcb.const_data_ptr<float>() : nullptr,
                                               num_codes, counts, sums);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       ema_stats_kernel<c10::BFloat16>(
                           xc, cp, mp, pp, pcb.defined() ? pcb.const_data_ptr<c10::BFloat16>() : nullptr, num_codes,
                           counts, sums);
                     }) AT_DISPATCH_CASE(at::kHalf, [&] {
                       ema_stats_kernel<c10::Half>(xc, cp, mp, pp,
                                                   pcb.defined() ? pcb.const_data_ptr<c10::Half>() : nullptr,
                                                   num_codes, counts, sums);
                     }));
  return {counts, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(vqdna, CPU, m) { m.impl("ema_stats_native", &ema_stats_native_cpu); }
