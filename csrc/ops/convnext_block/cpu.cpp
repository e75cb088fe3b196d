// Native CPU ConvNeXt block, channels-last, inference only (docs/design.md §3):
//   out = keep * (x + gamma * Linear2(GELU(Linear1(LayerNorm(DWConv(x))))))     x, out [B, L, D] float32
// Spec: vqdna.kernels.reference.convnext_block (the nn.Module's ops, which transpose to [B, D, L]
// for the depthwise convolution and make a [B, L, 4D] hidden tensor in memory, several passes each).
//
// Design: one task handles a tile of T consecutive positions of one record. The depthwise convolution
// (zero padding at the record's ends) and the LayerNorm are one pass over the tile's input rows into an
// L2-resident [T, D] buffer; the two pointwise convolutions are plain GEMMs on that buffer (at::addmm_out
// on views of thread-local buffers: inside at::parallel_for they run single-threaded, in the BLAS torch
// ships), GELU is torch's own kernel applied in place to the [T, 4D] hidden tile while it is still in
// cache (T = 512 by default, see kTileRows), and the layer scale, residual and mask are fused into the
// one write of the output rows. So the
// only large memory streams are the input (read once, plus the kernel's halo) and the output.
// Masked rows (keep false) are left out of the convolution, LayerNorm, GEMMs and GELU: the kept rows of
// a tile are packed into the buffers, and a masked row's output is x * 0 (0 for finite x; the spec's
// keep * block(x), except where block(x) itself would overflow). Packed short records leave a few pad
// positions between records (vqdna.streaming.packing), a quarter of the rows for 8-bp records.
// Rounding: the GEMMs and GELU are torch's; the convolution sums taps in order and the LayerNorm uses
// two-pass float32 moments (eight partial sums), so results differ from the module's within float32 rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Rows per task when the caller does not say: 512. Measured (one thread, vqdna-small D = 64 and
// vqdna-base D = 384): the block's pointwise FLOP rate rises with the tile, from about half of a
// whole-tensor GEMM of the same shapes at 32-64 rows to par with it at 512 (1024 gains nothing); the
// per-call packing and overhead of the tile GEMMs stop mattering there, and the hidden tile (512 x 4D
// floats: 0.5 MB at D = 64, 3 MB at D = 384) is still cache resident.
constexpr int64_t kTileRows = 512;

// sum_c v[c] (kSquares false) or sum_c (v[c] - mean)^2 (true). Eight independent partial sums (one
// vector register), so the compiler vectorises the loop; a single running float sum would be a serial
// chain of dependent adds, slower than the row's whole convolution.
template <bool kSquares>
inline float lane_sum(const float* v, int64_t n, float mean) {
  constexpr int kLanes = 8;
  float part[kLanes] = {0.f};
  auto term = [&](float x) { return kSquares ? (x - mean) * (x - mean) : x; };
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int k = 0; k < kLanes; ++k) part[k] += term(v[c + k]);
  for (; c < n; ++c) part[0] += term(v[c]);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

at::Tensor convnext_block_native(const at::Tensor& x, const c10::optional<at::Tensor>& keep, const at::Tensor& dw_weight,
                                 const at::Tensor& dw_bias, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                                 double ln_eps, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                 const at::Tensor& b2, const at::Tensor& gamma, int64_t tile) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat, "convnext_block: x must be float32 [B, L, D], got ",
              x.scalar_type(), " ", x.sizes());
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  TORCH_CHECK(dw_weight.dim() == 3 && dw_weight.size(0) == D && dw_weight.size(1) == 1 && dw_weight.size(2) % 2 == 1,
              "convnext_block: dw_weight must be [D, 1, k] with odd k and D = ", D, ", got ", dw_weight.sizes());
  const int64_t K = dw_weight.size(2), R = K / 2;
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == D, "convnext_block: w1 must be [H, ", D, "], got ", w1.sizes());
  const int64_t H = w1.size(0);
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == D && w2.size(1) == H, "convnext_block: w2 must be [", D, ", ", H,
              "], got ", w2.sizes());
  const std::pair<const at::Tensor*, int64_t> vectors[] = {{&dw_bias, D}, {&ln_weight, D}, {&ln_bias, D},
                                                           {&b1, H},       {&b2, D},        {&gamma, D}};
  for (const auto& [t, n] : vectors)
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "convnext_block: a bias/scale vector has shape ", t->sizes(),
                ", expected [", n, "]");
  for (const at::Tensor* t : {&dw_weight, &dw_bias, &ln_weight, &ln_bias, &w1, &b1, &w2, &b2, &gamma})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "convnext_block: parameters must be float32 CPU tensors");
  at::Tensor keep_u8;
  if (keep.has_value()) {
    TORCH_CHECK(keep->dim() == 2 && keep->size(0) == B && keep->size(1) == L, "convnext_block: keep must be [", B,
                ", ", L, "], got ", keep->sizes());
    keep_u8 = keep->to(at::kBool).contiguous();
  }
  const at::Tensor xc = x.contiguous();
  // Taps as [K, D] rows so the inner loop runs over contiguous channels; small vectors contiguous.
  const at::Tensor taps = dw_weight.reshape({D, K}).t().contiguous();
  const at::Tensor dwb = dw_bias.contiguous(), lnw = ln_weight.contiguous(), lnb = ln_bias.contiguous();
  const at::Tensor g = gamma.contiguous(), w1t = w1.detach().t(), w2t = w2.detach().t();
  at::Tensor out = at::empty_like(xc);
  if (xc.numel() == 0) return out;

  TORCH_CHECK(tile >= 0, "convnext_block: tile_rows must be >= 0 (0: automatic), got ", tile);
  const int64_t T = std::min(tile > 0 ? tile : kTileRows, L), tiles_per_record = (L + T - 1) / T;
  const float* xp = xc.data_ptr<float>();
  const float* tp = taps.data_ptr<float>();
  const float *dwbp = dwb.data_ptr<float>(), *lnwp = lnw.data_ptr<float>(), *lnbp = lnb.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const bool* kp = keep_u8.defined() ? keep_u8.data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  const float eps = static_cast<float>(ln_eps);
  const auto opts = at::TensorOptions().dtype(at::kFloat);

  // Inference only: the parameters may require grad, and the worker threads do not inherit the
  // caller's no-grad mode, so the GEMM calls below run beneath autograd on detached views.
  const at::Tensor b1d = b1.detach(), b2d = b2.detach();
  at::parallel_for(0, B * tiles_per_record, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowAutograd below_autograd;
    std::vector<float> a_buf(T * D), h_buf(T * H), y_buf(T * D);
    std::vector<int64_t> kept(T);  // the tile's kept rows, in order: row kept[m] is packed at buffer row m
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles_per_record, t0 = (task % tiles_per_record) * T, rows = std::min(T, L - t0);
      const float* xb = xp + b * L * D;
      // Depthwise convolution + LayerNorm of the kept rows, one row at a time into a_buf.
      int64_t m = 0;
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t t = t0 + i;
        if (kp != nullptr && !kp[b * L + t]) continue;
        kept[m] = i;
        float* a = a_buf.data() + (m++) * D;
        for (int64_t c = 0; c < D; ++c) a[c] = dwbp[c];
        for (int64_t j = std::max<int64_t>(0, R - t); j < K && t + j - R < L; ++j) {
          const float* xr = xb + (t + j - R) * D;
          const float* w = tp + j * D;
          for (int64_t c = 0; c < D; ++c) a[c] += w[c] * xr[c];
        }
        const float mean = lane_sum<false>(a, D, 0.f) / static_cast<float>(D);
        const float rstd = 1.f / std::sqrt(lane_sum<true>(a, D, mean) / static_cast<float>(D) + eps);
        for (int64_t c = 0; c < D; ++c) a[c] = (a[c] - mean) * rstd * lnwp[c] + lnbp[c];
      }
      if (m > 0) {
        at::Tensor a_t = at::from_blob(a_buf.data(), {m, D}, opts);
        at::Tensor h_t = at::from_blob(h_buf.data(), {m, H}, opts);
        at::Tensor y_t = at::from_blob(y_buf.data(), {m, D}, opts);
        at::addmm_out(h_t, b1d, a_t, w1t);
        at::gelu_(h_t);
        at::addmm_out(y_t, b2d, h_t, w2t);
      }
      // out = x + gamma * y at kept rows, x * 0 at masked ones: the layer scale, residual and mask in
      // the one output write.
      for (int64_t i = 0, j = 0; i < rows; ++i) {
        const int64_t t = t0 + i;
        const float* xr = xb + t * D;
        float* o = op + (b * L + t) * D;
        if (j == m || kept[j] != i) {
          for (int64_t c = 0; c < D; ++c) o[c] = xr[c] * 0.f;
          continue;
        }
        float* y = y_buf.data() + (j++) * D;
        // Two loops, so gamma * y is rounded before the add (as the module's x + gamma * y is),
        // not contracted into one fused multiply-add.
        for (int64_t c = 0; c < D; ++c) y[c] *= gp[c];
        for (int64_t c = 0; c < D; ++c) o[c] = xr[c] + y[c];
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vqdna, CPU, m) { m.impl("convnext_block_native", &convnext_block_native); }
