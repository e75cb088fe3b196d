// CUDA fused stem (docs/design.md §2.5): gather-sum over base ids, LayerNorm and exact GELU in one kernel.
//
// A block stages the [W][5][D] float32 weight table in shared memory once, then each warp takes one
// position at a time (grid-stride): lanes read the W base ids of the window, 32 taps per round, and
// broadcast them with __shfl_sync; every lane accumulates its VPT features (d = lane + 32 i,
// conflict-free shared loads) starting from the bias; the LayerNorm mean and centred variance are warp reductions of the
// registers (two passes, no E[y^2] - mean^2 cancellation); GELU uses erff and the row is written
// once, coalesced, in the output dtype. The one-hot input and the pre-activation never reach global
// memory: the kernel reads 1 id byte (uint8 ids) and writes D outputs per base.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/stem/cuda.cuh"

namespace vqdna::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPadId = 5;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ int64_t load_id(const void* ids, StemIds type, int64_t i) {
  switch (type) {
    case StemIds::kUInt8:
      return static_cast<const uint8_t*>(ids)[i];
    case StemIds::kInt32:
      return static_cast<const int32_t*>(ids)[i];
    default:
      return static_cast<const int64_t*>(ids)[i];
  }
}

__device__ __forceinline__ void store_out(void* out, StemOut type, int64_t i, float v) {
  switch (type) {
    case StemOut::kFloat32:
      static_cast<float*>(out)[i] = v;
      break;
    case StemOut::kBFloat16:
      static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<__half*>(out)[i] = __float2half_rn(v);
      break;
  }
}

template <int VPT>
__global__ void __launch_bounds__(kThreads, 1) stem_kernel(const void* __restrict__ ids, StemIds id_type,
                                                        const float* __restrict__ weight,
                                                        const float* __restrict__ bias,
                                                        const float* __restrict__ ln_weight,
                                                        const float* __restrict__ ln_bias, void* __restrict__ out,
                                                        StemOut out_type, int64_t n, int64_t length, int d,
                                                        int width, float eps) {
  extern __shared__ float table[];  // [width][5][d]
  const int half = width / 2;
  const int table_size = width * 5 * d;
  for (int i = threadIdx.x; i < table_size; i += kThreads) {
    const int j = i / (5 * d), c = (i / d) % 5, k = i % d;
    table[i] = weight[(static_cast<int64_t>(k) * 5 + c) * width + j];
  }
  __syncthreads();

  const int lane = threadIdx.x & 31;
  // bias / ln_weight / ln_bias stay in registers when they fit beside the VPT accumulators; at
  // VPT = 64 the 3 x 64 of them would not (255-register cap: the kernel spilled), so that
  // instantiation reads them per position from global memory (L1-resident, coalesced 128-byte rows).
  constexpr bool kRegParams = VPT <= 32;
  constexpr int kR = kRegParams ? VPT : 1;
  float b[kR], g[kR], beta[kR];
  if constexpr (kRegParams) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int k = lane + 32 * i;
      const bool ok = k < d;
      b[i] = ok ? bias[k] : 0.f;
      g[i] = ok ? ln_weight[k] : 0.f;
      beta[i] = ok ? ln_bias[k] : 0.f;
    }
  }
  const float inv_d = 1.0f / static_cast<float>(d);

  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); p < n;
       p += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t t = p % length;
    float acc[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if constexpr (kRegParams) {
        acc[i] = b[i];
      } else {
        const int k = lane + 32 * i;
        acc[i] = k < d ? __ldg(bias + k) : 0.f;
      }
    }
    // The window's ids, 32 taps per round: lane j of round j0 loads tap j0 + j and the warp reads
    // it back with __shfl_sync (a shuffle reaches only 32 lanes, hence the rounds for W > 32).
    bool bad = false;
    for (int j0 = 0; j0 < width; j0 += 32) {
      const int tap = j0 + lane;
      int my_id = kPadId;
      bool my_bad = false;
      if (tap < width) {
        const int64_t s = t + tap - half;
        if (s >= 0 && s < length) {
          const int64_t v = load_id(ids, id_type, p + tap - half);
          my_bad = v < 0 || v > kPadId;
          my_id = my_bad ? kPadId : static_cast<int>(v);
        }
      }
      bad |= __any_sync(0xffffffffu, my_bad);
      const int taps = width - j0 < 32 ? width - j0 : 32;  // warp-uniform
      for (int j = 0; j < taps; ++j) {
        const int c = __shfl_sync(0xffffffffu, my_id, j);
        if (c == kPadId) continue;  // warp-uniform
        const float* row = table + ((j0 + j) * 5 + c) * d;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          const int k = lane + 32 * i;
          if (k < d) acc[i] += row[k];
        }
      }
    }
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) s += acc[i];  // padded lanes hold 0
    const float mean = warp_sum(s) * inv_d;
    float v = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const float c = lane + 32 * i < d ? acc[i] - mean : 0.f;
      v += c * c;
    }
    const float rstd = rsqrtf(warp_sum(v) * inv_d + eps);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int k = lane + 32 * i;
      if (k < d) {
        float gi, bi;
        if constexpr (kRegParams) {
          gi = g[i];
          bi = beta[i];
        } else {
          gi = __ldg(ln_weight + k);
          bi = __ldg(ln_bias + k);
        }
        const float y = (acc[i] - mean) * rstd * gi + bi;
        const float o = 0.5f * y * (1.0f + erff(y * 0.70710678118654752f));
        store_out(out, out_type, p * d + k, bad ? __int_as_float(0x7fc00000) : o);
      }
    }
  }
}

template <int VPT>
cudaError_t launch_vpt(const void* ids, StemIds id_type, const float* weight, const float* bias,
                       const float* ln_weight, const float* ln_bias, void* out, StemOut out_type, int64_t n,
                       int64_t length, int d, int width, float eps, cudaStream_t stream) {
  int dev = 0, sms = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  const int64_t smem = stem_table_bytes(d, width);
  if (smem > optin) return cudaErrorInvalidValue;
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(stem_kernel<VPT>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  // About a few waves of blocks: each block amortises its table load over many positions.
  const int64_t needed = (n + kWarps - 1) / kWarps;
  const int64_t cap = static_cast<int64_t>(sms) * 8;
  const unsigned grid = static_cast<unsigned>(needed < cap ? needed : cap);
  stem_kernel<VPT><<<grid, kThreads, static_cast<size_t>(smem), stream>>>(
      ids, id_type, weight, bias, ln_weight, ln_bias, out, out_type, n, length, d, width, eps);
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_stem(const void* ids, StemIds id_type, const float* weight, const float* bias,
                        const float* ln_weight, const float* ln_bias, void* out, StemOut out_type,
                        int64_t n, int64_t length, int64_t d, int64_t width, float ln_eps,
                        cudaStream_t stream) {
  if (d < 1 || d > kStemMaxDim || width < 1 || width % 2 == 0 || width > kStemMaxWidth || n < 0 ||
      length < 1 || static_cast<int>(id_type) < 0 || static_cast<int>(id_type) > 2 ||
      static_cast<int>(out_type) < 0 || static_cast<int>(out_type) > 2) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  const int vpt = static_cast<int>((d + 31) / 32);
  const int di = static_cast<int>(d), wi = static_cast<int>(width);
#define VQDNA_STEM_CASE(V)                                                                                 \
  if (vpt <= V)                                                                                            \
    return launch_vpt<V>(ids, id_type, weight, bias, ln_weight, ln_bias, out, out_type, n, length, di, wi, \
                         ln_eps, stream);
  // Few instantiations (compile time): a lane's unused slots are predicated off, and the kernel is
  // bound by the output writes, not by those instructions. 12 fits D = 384 exactly.
  VQDNA_STEM_CASE(4)
  VQDNA_STEM_CASE(12)
  VQDNA_STEM_CASE(32)
  VQDNA_STEM_CASE(64)
#undef VQDNA_STEM_CASE
  return cudaErrorInvalidValue;
}

}  // namespace vqdna::cuda
