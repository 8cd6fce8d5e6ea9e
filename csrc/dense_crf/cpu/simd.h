// CPU vectorisation for the dense CRF kernels: vector types, exact float helpers, and run-time dispatch.
//
// Dispatch. Each hot kernel is written once, as a template on the instruction-set level (`Level`), and compiled
// three times on x86-64: for AVX-512 (F, BW, VL, with AVX2 and FMA), for AVX2 (with FMA) and for the baseline ISA,
// each copy in a function with its own `target` attribute (DLF_DISPATCH). The level is picked per call
// (simd::select()): the best this CPU has, or the one DEEPLAB_FAST_CPU_SIMD forces (for tests). The vector code
// uses GCC/Clang vector extensions (element-wise IEEE arithmetic) and the build uses -ffp-contract=off (no FMA
// contraction), so every level rounds alike and gives bitwise the same results; the one place that uses FMA
// instructions on purpose is the exact copy of glibc's expf below, which uses them exactly where glibc does.
// On other architectures there is one level, the baseline (on AArch64 the vector extensions compile to NEON).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define DLF_X86_DISPATCH 1
#include <immintrin.h>
#else
#define DLF_X86_DISPATCH 0
#endif

// Vector values cross calls between functions of one target only (the helpers below are inlined into the
// per-level kernels); GCC's note that the ABI of such values depends on -mavx is moot here.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace deeplab_fast {
namespace dense_crf {
namespace cpu {

namespace simd {

enum Level : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// "baseline", "avx2", "avx512".
const char* level_name(Level level);
// The best level this CPU (and OS) supports.
Level supported();
// The level for this call: DEEPLAB_FAST_CPU_SIMD (auto: supported()), checked against the CPU (a level it lacks
// throws std::runtime_error naming it); also makes it the level active() returns. Called at each op's start.
Level select();
// The level selected last (supported() before any select()).
Level active();
// Whether the vectorised copy of glibc's expf (exp8_libm) equals this process's expf, checked once on a set of
// inputs that tell glibc's variants apart. When it does not (another C library, another glibc), the kernels call
// expf lane by lane: still exact, only slower.
bool libm_exp_vectorised();

}  // namespace simd

#if DLF_X86_DISPATCH
#define DLF_TARGET_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt,f16c")))
#define DLF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,bmi,bmi2,popcnt,f16c")))
// Defines `ret name params` that runs name##_impl<level> args at the active level. The wrappers are noinline so
// that each level's code is one function compiled for its target, and flatten so that everything the template's
// body calls is inlined into it (GCC does not inline ordinary functions into a function of another target on
// its own, and a call per vector would cost more than the work).
#define DLF_DISPATCH(ret, name, params, args)                                                                  \
  DLF_TARGET_AVX512 __attribute__((noinline, flatten)) ret name##_avx512 params {                            \
    return name##_impl<::deeplab_fast::dense_crf::cpu::simd::kAvx512> args;                                   \
  }                                                                                                            \
  DLF_TARGET_AVX2 __attribute__((noinline, flatten)) ret name##_avx2 params {                                \
    return name##_impl<::deeplab_fast::dense_crf::cpu::simd::kAvx2> args;                                     \
  }                                                                                                            \
  __attribute__((noinline, flatten)) ret name##_baseline params {                                            \
    return name##_impl<::deeplab_fast::dense_crf::cpu::simd::kBaseline> args;                                 \
  }                                                                                                            \
  ret name params {                                                                                            \
    switch (::deeplab_fast::dense_crf::cpu::simd::active()) {                                                 \
      case ::deeplab_fast::dense_crf::cpu::simd::kAvx512: return name##_avx512 args;                           \
      case ::deeplab_fast::dense_crf::cpu::simd::kAvx2: return name##_avx2 args;                               \
      default: return name##_baseline args;                                                                    \
    }                                                                                                          \
  }
#else
#define DLF_DISPATCH(ret, name, params, args) \
  ret name params { return name##_impl<::deeplab_fast::dense_crf::cpu::simd::kBaseline> args; }
#endif

// Eight floats as one value (GCC/Clang vector extension): a ymm register at the AVX2 and AVX-512 levels, a pair of
// SSE registers at the baseline. Element-wise IEEE arithmetic, identical to the scalar loops it replaces.
typedef float vec8 __attribute__((vector_size(32)));
typedef int32_t ivec8 __attribute__((vector_size(32)));
typedef float vec8_unaligned __attribute__((vector_size(32), aligned(4)));
typedef float vec4 __attribute__((vector_size(16)));
typedef int32_t ivec4 __attribute__((vector_size(16)));
typedef float vec4_unaligned __attribute__((vector_size(16), aligned(4)));

#define DLF_INLINE inline __attribute__((always_inline))

DLF_INLINE vec8 load8(const float* p) { return *reinterpret_cast<const vec8_unaligned*>(p); }
DLF_INLINE void store8(float* p, vec8 v) { *reinterpret_cast<vec8_unaligned*>(p) = v; }
DLF_INLINE vec8 splat8(float x) { return vec8{x, x, x, x, x, x, x, x}; }
DLF_INLINE vec4 load4(const float* p) { return *reinterpret_cast<const vec4_unaligned*>(p); }
DLF_INLINE void store4(float* p, vec4 v) { *reinterpret_cast<vec4_unaligned*>(p) = v; }
DLF_INLINE vec4 splat4(float x) { return vec4{x, x, x, x}; }
// Two floats into the low half of a vec4 (the high half zero), and back.
typedef double vec2d __attribute__((vector_size(16)));
DLF_INLINE vec4 load2(const float* p) {
  double d;
  std::memcpy(&d, p, 8);
  return (vec4)(vec2d{d, 0.0});
}
DLF_INLINE void store2(float* p, vec4 v) {
  const double d = ((vec2d)v)[0];
  std::memcpy(p, &d, 8);
}
DLF_INLINE vec8 concat(vec4 lo, vec4 hi) { return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7); }
DLF_INLINE vec4 low_half(vec8 v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3); }
DLF_INLINE vec4 high_half(vec8 v) { return __builtin_shufflevector(v, v, 4, 5, 6, 7); }

// exp(x) exactly as Eigen 3.3's SSE pexp<Packet4f> computes it (without FMA), which is what pydensecrf's
// expAndNormalize runs on every whole packet of 4 labels: Cephes' expf with n = floor(x log2(e) + 1/2),
// Cody-Waite reduction, a degree-5 polynomial evaluated as y x^2 + x + 1, and 2^n from the exponent bits.
// Matching it bit for bit keeps our marginals identical to pydensecrf's even where mean-field amplifies
// rounding differences.
struct EigenExpConstants {
  static constexpr float kHi = 88.3762626647950f, kLo = -88.3762626647949f, kLog2e = 1.44269504088896341f;
  static constexpr float kC1 = 0.693359375f, kC2 = -2.12194440e-4f;
  static constexpr float kP0 = 1.9875691500E-4f, kP1 = 1.3981999507E-3f, kP2 = 8.3334519073E-3f;
  static constexpr float kP3 = 4.1665795894E-2f, kP4 = 1.6666665459E-1f, kP5 = 5.0000001201E-1f;
};

// Any float vector type V (vec4, vec8) with its integer twin IV.
template <typename V, typename IV>
DLF_INLINE V exp_eigen_v(V x0) {
  using K = EigenExpConstants;
  const V hi = V{} + K::kHi, lo = V{} + K::kLo, one = V{} + 1.0f, zero = V{};
  V x = x0 < hi ? x0 : hi;
  x = x > lo ? x : lo;
  V fx = x * K::kLog2e + 0.5f;
  const V truncated = __builtin_convertvector(__builtin_convertvector(fx, IV), V);
  fx = truncated - (truncated > fx ? one : zero);  // floor
  const V t = fx * K::kC1;
  V z = fx * K::kC2;
  x = x - t;
  x = x - z;
  z = x * x;
  V y = V{} + K::kP0;
  y = y * x + K::kP1;
  y = y * x + K::kP2;
  y = y * x + K::kP3;
  y = y * x + K::kP4;
  y = y * x + K::kP5;
  y = y * z + x;
  y = y + 1.0f;
  const IV bits = (__builtin_convertvector(fx, IV) + 127) << 23;
  const V r = y * (V)bits;
  return r > x0 ? r : x0;
}

DLF_INLINE vec8 exp8_eigen(vec8 x0) { return exp_eigen_v<vec8, ivec8>(x0); }
DLF_INLINE vec4 exp4_eigen(vec4 x0) { return exp_eigen_v<vec4, ivec4>(x0); }

// The same for one value (the arithmetic is element-wise, so lane 0 of the vector form is exact).
inline float exp_eigen(float x) { return exp8_eigen(splat8(x))[0]; }

// ---- std::exp(float), i.e. glibc's expf, vectorised bit for bit ----
//
// pydensecrf's softmax calls std::exp on the labels outside Eigen's whole packets of 4 (all of them when L < 4).
// glibc (2.27 and later) computes expf in double: k = round(x 32/ln2) by adding 1.5 * 2^52, r = x 32/ln2 - k,
// 2^(k/32) from a 32-entry table, a degree-3 polynomial in r, one rounding to float at the end. On x86-64 its
// resolver picks a copy compiled with FMA when the CPU has FMA and AVX2 (the ones our AVX2 and AVX-512 levels
// require), where the compiler fused: k + 1.5 * 2^52 = fma(x, 32/ln2, 1.5 * 2^52), r = fma(x, 32/ln2, -k), and the
// three polynomial steps. exp8_libm repeats exactly those operations, four or eight doubles at a time; it equals
// this machine's expf on every one of the 2^32 floats (checked exhaustively). The copy without FMA differs from the
// FMA one on two floats only; simd::libm_exp_vectorised() checks this process's expf on those and others at first
// use, and the kernels fall back to calling expf lane by lane when it does not match.
struct LibmExpConstants {
  static constexpr double kInvLn2N = 0x1.71547652b82fep+5, kShift = 0x1.8p+52;
  static constexpr double kC0 = 0x1.c6af84b912394p-20, kC1 = 0x1.ebfce50fac4f3p-13, kC2 = 0x1.62e42ff0c52d6p-6;
  static constexpr float kUnderflow = -0x1.9fe368p6f, kOverflow = 0x1.62e42ep6f;
  alignas(64) static constexpr uint64_t kTable[32] = {
      0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51, 0x3fef72b83c7d517b,
      0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1, 0x3fef06fe0a31b715, 0x3feef1a7373aa9cb,
      0x3feedea64c123422, 0x3feece086061892d, 0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429,
      0x3feea47eb03a5585, 0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
      0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d, 0x3feee89f995ad3ad,
      0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069, 0x3fef5818dcfba487, 0x3fef7c97337b9b5f,
      0x3fefa4afa2a490da, 0x3fefd0765b6e4540};
};

// expf lane by lane (the reference itself; the baseline level, and the fallback).
DLF_INLINE vec8 exp8_libm_scalar(vec8 x) {
  vec8 r;
  for (int k = 0; k < 8; ++k) r[k] = std::exp(x[k]);
  return r;
}

#if DLF_X86_DISPATCH
// glibc's expf for the out-of-range lanes: 0 below the underflow bound (and for -inf), +inf above the overflow
// bound, x + x for NaN (glibc's special paths); y elsewhere.
template <typename V>
DLF_INLINE V libm_exp_special(V x, V y) {
  using K = LibmExpConstants;
  y = x < K::kUnderflow ? V{} : y;
  y = x > K::kOverflow ? V{} + __builtin_inff() : y;
  return x != x ? x + x : y;
}

DLF_TARGET_AVX2 inline __m256d exp4d_libm_avx2(__m256d xd) {
  using K = LibmExpConstants;
  const __m256d inv = _mm256_set1_pd(K::kInvLn2N), shift = _mm256_set1_pd(K::kShift);
  __m256d kd = _mm256_fmadd_pd(inv, xd, shift);
  const __m256i ki = _mm256_castpd_si256(kd);
  kd = _mm256_sub_pd(kd, shift);
  const __m256d r = _mm256_fmsub_pd(inv, xd, kd);
  const __m256i idx = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
  __m256i t = _mm256_i64gather_epi64(reinterpret_cast<const long long*>(K::kTable), idx, 8);
  t = _mm256_add_epi64(t, _mm256_slli_epi64(ki, 47));
  const __m256d z = _mm256_fmadd_pd(r, _mm256_set1_pd(K::kC0), _mm256_set1_pd(K::kC1));
  const __m256d r2 = _mm256_mul_pd(r, r);
  __m256d y = _mm256_fmadd_pd(r, _mm256_set1_pd(K::kC2), _mm256_set1_pd(1.0));
  y = _mm256_fmadd_pd(z, r2, y);
  return _mm256_mul_pd(y, _mm256_castsi256_pd(t));
}

DLF_TARGET_AVX2 inline vec8 exp8_libm_avx2(vec8 x) {
  const __m256 xv = (__m256)x;
  const __m256d lo = exp4d_libm_avx2(_mm256_cvtps_pd(_mm256_castps256_ps128(xv)));
  const __m256d hi = exp4d_libm_avx2(_mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1)));
  const __m256 y = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
  return libm_exp_special(x, (vec8)y);
}

DLF_TARGET_AVX512 inline vec8 exp8_libm_avx512(vec8 x) {
  using K = LibmExpConstants;
  const __m512d xd = _mm512_cvtps_pd((__m256)x);
  const __m512d inv = _mm512_set1_pd(K::kInvLn2N), shift = _mm512_set1_pd(K::kShift);
  __m512d kd = _mm512_fmadd_pd(inv, xd, shift);
  const __m512i ki = _mm512_castpd_si512(kd);
  kd = _mm512_sub_pd(kd, shift);
  const __m512d r = _mm512_fmsub_pd(inv, xd, kd);
  // 2^(k/32): the table's 32 entries in four registers, picked by two two-register permutes and bit 4.
  const __m512i* tab = reinterpret_cast<const __m512i*>(K::kTable);
  const __m512i lo = _mm512_permutex2var_epi64(_mm512_load_si512(tab), ki, _mm512_load_si512(tab + 1));
  const __m512i hi = _mm512_permutex2var_epi64(_mm512_load_si512(tab + 2), ki, _mm512_load_si512(tab + 3));
  __m512i t = _mm512_mask_blend_epi64(_mm512_test_epi64_mask(ki, _mm512_set1_epi64(16)), lo, hi);
  t = _mm512_add_epi64(t, _mm512_slli_epi64(ki, 47));
  const __m512d z = _mm512_fmadd_pd(r, _mm512_set1_pd(K::kC0), _mm512_set1_pd(K::kC1));
  const __m512d r2 = _mm512_mul_pd(r, r);
  __m512d y = _mm512_fmadd_pd(r, _mm512_set1_pd(K::kC2), _mm512_set1_pd(1.0));
  y = _mm512_fmadd_pd(z, r2, y);
  const __m256 f = _mm512_cvtpd_ps(_mm512_mul_pd(y, _mm512_castsi512_pd(t)));
  return libm_exp_special(x, (vec8)f);
}
#endif

// std::exp of each lane, bit for bit: vectorised when `vectorised` (simd::libm_exp_vectorised(), read once per
// kernel call) and the level has FMA, else lane by lane.
template <simd::Level kLevel>
DLF_INLINE vec8 exp8_libm(vec8 x, bool vectorised) {
#if DLF_X86_DISPATCH
  if constexpr (kLevel == simd::kAvx512) {
    if (vectorised) return exp8_libm_avx512(x);
  } else if constexpr (kLevel == simd::kAvx2) {
    if (vectorised) return exp8_libm_avx2(x);
  }
#endif
  (void)vectorised;
  return exp8_libm_scalar(x);
}

// The sum of e[0..L) in the order Eigen 3.3's vectorised redux uses for an aligned VectorXf with 4-float
// packets: two packet accumulators, merged, then (a0 + a2) + (a1 + a3), then the scalar tail.
inline float eigen_sum(const float* e, int64_t L) {
  if (L < 4) {
    float s = e[0];
    for (int64_t k = 1; k < L; ++k) s = s + e[k];
    return s;
  }
  const int64_t size2 = (L / 8) * 8, size1 = (L / 4) * 4;
  float a[4] = {e[0], e[1], e[2], e[3]};
  if (size1 > 4) {
    float b[4] = {e[4], e[5], e[6], e[7]};
    for (int64_t i = 8; i < size2; i += 8) {
      for (int j = 0; j < 4; ++j) a[j] = a[j] + e[i + j];
      for (int j = 0; j < 4; ++j) b[j] = b[j] + e[i + 4 + j];
    }
    for (int j = 0; j < 4; ++j) a[j] = a[j] + b[j];
    if (size1 > size2)
      for (int j = 0; j < 4; ++j) a[j] = a[j] + e[size2 + j];
  }
  float s = (a[0] + a[2]) + (a[1] + a[3]);
  for (int64_t k = size1; k < L; ++k) s = s + e[k];
  return s;
}

// eigen_sum over e[0..L) held in vec8 values (e[c] = elements 8c..8c+7): Eigen's 4-float packet 2c is the low
// half of e[c] and packet 2c+1 its high half, so its two packet accumulators are the halves of one vec8
// accumulator. Lanes at or beyond L are not read. E is an array of vec8 or anything indexable like one.
template <typename E>
DLF_INLINE float eigen_sum8(const E& e, int64_t L) {
  const int64_t size1 = (L / 4) * 4, full = L / 8;
  float s;
  if (L < 4) {
    s = e[0][0];
    for (int64_t k = 1; k < L; ++k) s = s + e[0][k];
    return s;
  }
  vec4 a;
  if (size1 > 4) {
    vec8 acc = e[0];
    for (int64_t c = 1; c < full; ++c) acc += e[c];
    a = low_half(acc) + high_half(acc);
    if (size1 > full * 8) a += low_half(e[full]);
  } else {
    a = low_half(e[0]);
  }
  s = (a[0] + a[2]) + (a[1] + a[3]);
  for (int64_t k = size1; k < L; ++k) s = s + e[k / 8][k % 8];
  return s;
}

// Transposes an 8x8 block held as eight vec8 rows, in place (unpack, 64-bit shuffle, 128-bit swap).
DLF_INLINE void transpose8x8(vec8* r) {
  const vec8 t0 = __builtin_shufflevector(r[0], r[1], 0, 8, 1, 9, 4, 12, 5, 13);
  const vec8 t1 = __builtin_shufflevector(r[0], r[1], 2, 10, 3, 11, 6, 14, 7, 15);
  const vec8 t2 = __builtin_shufflevector(r[2], r[3], 0, 8, 1, 9, 4, 12, 5, 13);
  const vec8 t3 = __builtin_shufflevector(r[2], r[3], 2, 10, 3, 11, 6, 14, 7, 15);
  const vec8 t4 = __builtin_shufflevector(r[4], r[5], 0, 8, 1, 9, 4, 12, 5, 13);
  const vec8 t5 = __builtin_shufflevector(r[4], r[5], 2, 10, 3, 11, 6, 14, 7, 15);
  const vec8 t6 = __builtin_shufflevector(r[6], r[7], 0, 8, 1, 9, 4, 12, 5, 13);
  const vec8 t7 = __builtin_shufflevector(r[6], r[7], 2, 10, 3, 11, 6, 14, 7, 15);
  const vec8 u0 = __builtin_shufflevector(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);
  const vec8 u1 = __builtin_shufflevector(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
  const vec8 u2 = __builtin_shufflevector(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);
  const vec8 u3 = __builtin_shufflevector(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
  const vec8 u4 = __builtin_shufflevector(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13);
  const vec8 u5 = __builtin_shufflevector(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
  const vec8 u6 = __builtin_shufflevector(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13);
  const vec8 u7 = __builtin_shufflevector(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
  r[0] = __builtin_shufflevector(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11);
  r[1] = __builtin_shufflevector(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11);
  r[2] = __builtin_shufflevector(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11);
  r[3] = __builtin_shufflevector(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11);
  r[4] = __builtin_shufflevector(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15);
  r[5] = __builtin_shufflevector(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15);
  r[6] = __builtin_shufflevector(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15);
  r[7] = __builtin_shufflevector(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15);
}

// Label-vector primitives over a stride S: whole vec8 steps when S is a multiple of 8, scalar loops otherwise.
DLF_INLINE void zero(float* __restrict y, int64_t S) {
  if (S % 8 == 0) {
    for (int64_t k = 0; k < S; k += 8) store8(y + k, splat8(0.0f));
  } else {
    for (int64_t k = 0; k < S; ++k) y[k] = 0.0f;
  }
}

// y += a * x
DLF_INLINE void axpy(float* __restrict y, float a, const float* __restrict x, int64_t S) {
  if (S % 8 == 0) {
    for (int64_t k = 0; k < S; k += 8) store8(y + k, load8(y + k) + a * load8(x + k));
  } else {
    for (int64_t k = 0; k < S; ++k) y[k] += a * x[k];
  }
}

// y = a * x
DLF_INLINE void scale_to(float* __restrict y, float a, const float* __restrict x, int64_t S) {
  if (S % 8 == 0) {
    for (int64_t k = 0; k < S; k += 8) store8(y + k, a * load8(x + k));
  } else {
    for (int64_t k = 0; k < S; ++k) y[k] = a * x[k];
  }
}

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
