// The CPU kernel's chunk loops for each instruction set it can run, and the choice between them.
//
// The loops are clip_math.h's templates, compiled twice: for the build's baseline (SSE2 on x86-64) and, in
// functions marked FC_AVX2 (target attribute + flatten), for AVX2 + F16C. `flatten` inlines everything such a
// function calls (c10's Half/BFloat16 conversions included) into it, so the AVX2 code exists only inside
// those functions: no inline function of torch's headers is ever emitted with AVX2 instructions where a
// baseline caller could pick it up (the ODR hazard of building a translation unit with -mavx2). FMA is not
// enabled, and the build passes -ffp-contract=off, so no variant contracts a multiply-add the other does not:
// every variant computes the same bits (tests/tooling/test_cpu_isa.py checks them against each other).
#pragma once

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common/clip_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FC_HAVE_AVX2_VARIANT 1
#define FC_AVX2 __attribute__((target("avx2,f16c"), flatten))
#else
#define FC_HAVE_AVX2_VARIANT 0
#endif

namespace fusedclip {

// 64-byte groups of independent accumulators (16 fp32 lanes): enough for the
// compiler's vector code to hide the add latency (measured: 56 GB/s from L2
// with SSE, against 35 with 8 lanes).
constexpr int kCpuVecBytes = 64;

// The host's lanes sum runs of kExactRunElems (64 elements a lane for fp32, 32 for fp16/bf16) in acc_t, then
// add into double lanes (clip_math.h: chunk_partial_runs). In fp32 a lane summed a whole chunk (1,024
// elements), an error of the order of an ulp on one chunk alone; summing every element in double instead
// made in-cache fp32 sets 1.7x and bf16 sets 3x slower (measured here); a run costs a few vector adds.
constexpr int64_t kExactRunElems = 1024;

// Threads are used only when each gets at least this much of the work. Waking a parked OpenMP thread costs
// ~10 us on an idle machine, but when other processes keep every core busy (data-loader workers, several ranks
// per node) the region waits for a thread the scheduler has not run yet: a whole time slice, milliseconds
// (measured here: 70 tensors of 0.06 MB in all took 12 us on the calling thread and 8 ms on average with two
// threads on a busy machine). torch's own ops parallelize only above 32K elements per op, so small sets run
// serially there. At 4 MB a thread the work itself takes ~0.2-0.4 ms a thread, so uncontended wake-ups
// cost <5% of it while sets of gradients that size (16M elements and up) still get every core.
constexpr int64_t kMinBytesPerThread = 4 << 20;

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1 };

// The variant in use: the best this processor runs (cpuid, once at load time), or FUSEDCLIP_CPU_ISA=baseline.
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);
// For tests: run `name` ("baseline", "avx2") from now on; false if this processor or build cannot.
bool set_cpu_isa(const std::string& name);
// The variants this processor and build can run, best last.
std::string supported_cpu_isas();

#if FC_HAVE_AVX2_VARIANT
// bf16 -> fp32 * coef -> bf16 for 8 elements, bit for bit as from_acc (round to nearest even, NaN -> 0x7FC0).
// The compiler vectorizes the portable loop but narrows 32 -> 16 bits through a chain of shuffles (SSE2 has
// no unsigned pack); shifting arithmetically leaves values that fit a signed 16-bit pack, which keeps exactly
// the low 16 bits.
inline __m128i round_to_bf16_sse2(__m128 f) {
  const __m128i bits = _mm_castps_si128(f);
  const __m128i lsb = _mm_and_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(1));
  const __m128i rounded = _mm_srai_epi32(_mm_add_epi32(_mm_add_epi32(bits, _mm_set1_epi32(0x7FFF)), lsb), 16);
  const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(f, f));
  return _mm_or_si128(_mm_and_si128(nan, _mm_set1_epi32(0x7FC0)), _mm_andnot_si128(nan, rounded));
}

inline void scale8_bf16_sse2(c10::BFloat16* p, float coef) {
  const __m128i zero = _mm_setzero_si128();
  const __m128 c = _mm_set1_ps(coef);
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128 lo = _mm_mul_ps(_mm_castsi128_ps(_mm_unpacklo_epi16(zero, x)), c);  // bf16 << 16 is its fp32
  const __m128 hi = _mm_mul_ps(_mm_castsi128_ps(_mm_unpackhi_epi16(zero, x)), c);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packs_epi32(round_to_bf16_sse2(lo), round_to_bf16_sse2(hi)));
}

// The same for 16 elements with AVX2. The 256-bit pack works within 128-bit halves, so the widened halves
// are the low and high 8 elements of each half, and the pack puts them back in order.
__attribute__((target("avx2"))) inline __m256i round_to_bf16_avx2(__m256 f) {
  const __m256i bits = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srai_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

__attribute__((target("avx2"))) inline void scale16_bf16_avx2(c10::BFloat16* p, float coef) {
  const __m256i zero = _mm256_setzero_si256();
  const __m256 c = _mm256_set1_ps(coef);
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256 lo = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, x)), c);
  const __m256 hi = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, x)), c);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm256_packs_epi32(round_to_bf16_avx2(lo), round_to_bf16_avx2(hi)));
}

// fp16 with F16C: the hardware conversions round to nearest even like c10::Half's; only NaN differs (F16C
// keeps the payload, c10 makes it 0x7E00 with the sign), so NaN lanes are set to c10's value.
__attribute__((target("avx2,f16c"))) inline void scale8_fp16_f16c(c10::Half* p, float coef) {
  const __m256 y = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                                 _mm256_set1_ps(coef));
  const __m128i h = _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 nan = _mm256_cmp_ps(y, y, _CMP_UNORD_Q);
  const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(_mm256_castps_si256(nan)),
                                        _mm256_extracti128_si256(_mm256_castps_si256(nan), 1));
  const __m128i sign = _mm_and_si128(h, _mm_set1_epi16(static_cast<short>(0x8000)));
  const __m128i c10_nan = _mm_or_si128(sign, _mm_set1_epi16(0x7E00));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_blendv_epi8(h, c10_nan, nan16));
}

// One fp16 chunk's L2 or inf partial with F16C conversions (the compiler keeps c10's software conversion
// scalar): lane j of chunk_partial_runs<K, 32> is lane j % 8 of accumulator j / 8, updated in the same order
// with the same operations (runs of kExactRunElems, each lane then added into its double lane), and the tail
// and the fold are the portable code's, so the bits are the same.
template <NormKind K>
__attribute__((target("avx2,f16c"))) Partial<double> partial_fp16_f16c(const c10::Half* p, int64_t n) {
  constexpr int W = 32;
  const __m256 sign_bit = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256 zero = _mm256_setzero_ps();
  __m256d wide[8];
  for (auto& w : wide) w = _mm256_setzero_pd();  // the identity of both sum and max
  double wide_lanes[W], wide_nf[W] = {};
  for (int64_t s = 0; s < n; s += kExactRunElems) {
    const int64_t len = std::min(kExactRunElems, n - s);
    const c10::Half* q0 = p + s;
    __m256 acc[4];
    for (auto& a : acc) a = _mm256_setzero_ps();
    const int64_t nvec = len / W;
    for (int64_t v = 0; v < nvec; ++v) {
      for (int q = 0; q < 4; ++q) {
        const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q0 + v * W + 8 * q)));
        if constexpr (K == NormKind::L2) {
          acc[q] = _mm256_add_ps(acc[q], _mm256_mul_ps(x, x));
        } else {  // a = x < 0 ? -x : x (a NaN keeps its sign, as there), then max_nan(acc, a)
          const __m256 a = _mm256_blendv_ps(x, _mm256_xor_ps(x, sign_bit), _mm256_cmp_ps(x, zero, _CMP_LT_OQ));
          const __m256 take =
              _mm256_or_ps(_mm256_cmp_ps(a, acc[q], _CMP_GT_OQ), _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
          acc[q] = _mm256_blendv_ps(acc[q], a, take);
        }
      }
    }
    float lanes[W];
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(lanes + 8 * q, acc[q]);
    for (int64_t i = nvec * W, j = 0; i < len; ++i, ++j)  // the tail over the lanes, as accumulate_chunk's
      lanes[j] = norm_accumulate<K>(lanes[j], static_cast<float>(q0[i]), 0.0f);
    for (int q = 0; q < 8; ++q) {
      const __m256d l = _mm256_cvtps_pd(_mm_loadu_ps(lanes + 4 * q));
      if constexpr (K == NormKind::L2) {
        wide[q] = _mm256_add_pd(wide[q], l);
      } else {  // max_nan(wide, l): l wins when greater or NaN
        const __m256d take = _mm256_or_pd(_mm256_cmp_pd(l, wide[q], _CMP_GT_OQ), _mm256_cmp_pd(l, l, _CMP_UNORD_Q));
        wide[q] = _mm256_blendv_pd(wide[q], l, take);
      }
    }
  }
  for (int q = 0; q < 8; ++q) _mm256_storeu_pd(wide_lanes + 4 * q, wide[q]);
  return fold_lanes<K, W, double>(wide_lanes, wide_nf);
}
#endif

// G consecutive elements times coef.
template <CpuIsa I, int64_t G, typename T, typename acc_t>
inline void scale_group(T* q, acc_t coef) {
#if FC_HAVE_AVX2_VARIANT
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    if constexpr (I == CpuIsa::kAvx2 && G % 16 == 0) {
      for (int64_t i = 0; i < G; i += 16) scale16_bf16_avx2(q + i, coef);
      return;
    } else if constexpr (G % 8 == 0) {
      for (int64_t i = 0; i < G; i += 8) scale8_bf16_sse2(q + i, coef);
      return;
    }
  }
  if constexpr (I == CpuIsa::kAvx2 && std::is_same_v<T, c10::Half> && std::is_same_v<acc_t, float> && G % 8 == 0) {
    for (int64_t i = 0; i < G; i += 8) scale8_fp16_f16c(q + i, coef);
    return;
  }
#endif
  for (int64_t i = 0; i < G; ++i) q[i] = from_acc<T>(static_cast<acc_t>(q[i]) * coef);
}

// A chunk times coef, walked from its end in groups of plain loops the compiler vectorizes: the scaling pass
// takes chunks in reverse, so memory is read as one descending stream, which the prefetcher follows across
// chunk boundaries (ascending chunks taken in reverse restart it per chunk).
template <CpuIsa I, int W, typename T, typename acc_t>
inline void scale_chunk_host(T* p, int64_t n, acc_t coef) {
  constexpr int64_t G = 4 * W;
  int64_t end = n;
  for (; end >= G; end -= G) scale_group<I, G>(p + end - G, coef);
  for (int64_t i = 0; i < end; ++i) p[i] = from_acc<T>(static_cast<acc_t>(p[i]) * coef);
}

// The loops of one chunk in each variant: ChunkLoops<...>::partial<I>, scale<I>, clamp<I>.
template <int W, typename T>
struct ChunkLoops {
  template <NormKind K, bool Amp, typename acc_t>
  static Partial<double> partial_baseline(const T* p, int64_t n, acc_t pw, acc_t mul) {
    return chunk_partial_runs<K, W, Amp>(p, n, kExactRunElems, pw, mul);
  }
  template <typename acc_t>
  static void scale_baseline(T* p, int64_t n, acc_t coef) {
    scale_chunk_host<CpuIsa::kBaseline, W>(p, n, coef);
  }
  static void clamp_baseline(T* p, int64_t n, double c) { clamp_chunk<W>(p, n, 0, 1, c); }
#if FC_HAVE_AVX2_VARIANT
  template <NormKind K, bool Amp, typename acc_t>
  FC_AVX2 static Partial<double> partial_avx2(const T* p, int64_t n, acc_t pw, acc_t mul) {
    if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<acc_t, float> && W == 32 && !Amp &&
                  (K == NormKind::L2 || K == NormKind::Inf))
      return partial_fp16_f16c<K>(p, n);
    else
      return chunk_partial_runs<K, W, Amp>(p, n, kExactRunElems, pw, mul);
  }
  template <typename acc_t>
  FC_AVX2 static void scale_avx2(T* p, int64_t n, acc_t coef) {
    scale_chunk_host<CpuIsa::kAvx2, W>(p, n, coef);
  }
  FC_AVX2 static void clamp_avx2(T* p, int64_t n, double c) { clamp_chunk<W>(p, n, 0, 1, c); }
#endif

  // A chunk's partial in double (chunk_partial_runs; a max or min is exact in any type, but the same code
  // serves).
  template <NormKind K, bool Amp, typename acc_t>
  static Partial<double> partial(CpuIsa isa, const T* p, int64_t n, acc_t pw, acc_t mul) {
#if FC_HAVE_AVX2_VARIANT
    if (isa == CpuIsa::kAvx2) return partial_avx2<K, Amp>(p, n, pw, mul);
#endif
    return partial_baseline<K, Amp>(p, n, pw, mul);
  }
  template <typename acc_t>
  static void scale(CpuIsa isa, T* p, int64_t n, acc_t coef) {
#if FC_HAVE_AVX2_VARIANT
    if (isa == CpuIsa::kAvx2) return scale_avx2(p, n, coef);
#endif
    scale_baseline(p, n, coef);
  }
  static void clamp(CpuIsa isa, T* p, int64_t n, double c) {
#if FC_HAVE_AVX2_VARIANT
    if (isa == CpuIsa::kAvx2) return clamp_avx2(p, n, c);
#endif
    clamp_baseline(p, n, c);
  }
};

}  // namespace fusedclip
