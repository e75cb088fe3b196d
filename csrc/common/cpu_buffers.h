// Shared pieces of the native CPU kernels: 64-byte aligned float32 buffers, one row of
// float32 / bfloat16 / float16 converted to float32 (AVX2 where built for it), and the huge-page
// advice for large fresh outputs.
#pragma once


#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>

#ifdef __linux__
#include <sys/mman.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define VQDNA_AVX2 1
#endif

namespace vqdna::cpu {

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using AlignedBuf = std::unique_ptr<float[], AlignedFree>;

inline AlignedBuf aligned_floats(int64_t n) {
  const size_t bytes = ((static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float) + 63) / 64) * 64;
  auto* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  TORCH_CHECK(p != nullptr, "vqdna.lookup_native: out of memory allocating ", bytes, " bytes");
  return AlignedBuf(p);
}

// ---- conversion of one row of the input dtype to float32 ----------------------------------------

template <typename T>
inline void row_to_float(const T* src, float* dst, int64_t n) {
  int64_t d = 0;
#ifdef VQDNA_AVX2
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; d + 8 <= n; d += 8) {  // bf16 is the high half of a float32
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d));
      _mm256_storeu_ps(dst + d, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    for (; d + 8 <= n; d += 8) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d));
      _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(h));
    }
  }
#endif
  for (; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}

// Multi-lane accumulation: a single scalar accumulator would be a serial FP-add chain.
inline float sum_squares(const float* x, int64_t n) {
  int64_t d = 0;
  float s = 0.f;
#ifdef VQDNA_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; d + 16 <= n; d += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + d), x1 = _mm256_loadu_ps(x + d + 8);
    a0 = _mm256_fmadd_ps(x0, x0, a0);
    a1 = _mm256_fmadd_ps(x1, x1, a1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(a0, a1));
  for (int i = 0; i < 8; ++i) s += lanes[i];
#endif
  for (; d < n; ++d) s += x[d] * x[d];
  return s;
}

// Large fresh outputs are written once, and first-touch page faults on 4 KiB pages can cost as much
// as the writes; asking for transparent huge pages (where the system allows it) removes most of
// them. Advice only: nothing changes if it is refused.
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace vqdna::cpu
