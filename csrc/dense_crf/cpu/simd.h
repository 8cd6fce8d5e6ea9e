// CPU vectorisation helpers for the dense CRF kernels.
//
// Hot loops are written as plain loops over a label stride that is a multiple of 8, which GCC and Clang
// vectorise. DLF_CPU_KERNEL compiles such a function twice, for AVX2 and for the baseline ISA, and picks one
// at load time (GCC function multi-versioning), so one build runs everywhere and uses 256-bit vectors where
// the CPU has them. The build uses -ffp-contract=off: no FMA contraction, so both versions round alike.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define DLF_CPU_KERNEL __attribute__((target_clones("avx2", "default"))) __attribute__((noinline))
#else
#define DLF_CPU_KERNEL
#endif

namespace deeplab_fast {
namespace dense_crf {
namespace cpu {

// Eight floats as one value (GCC/Clang vector extension): AVX2 ymm registers in the AVX2 clone, pairs of SSE
// registers otherwise. Element-wise IEEE arithmetic, identical to the scalar loops it replaces.
typedef float vec8 __attribute__((vector_size(32)));
typedef int32_t ivec8 __attribute__((vector_size(32)));
typedef float vec8_unaligned __attribute__((vector_size(32), aligned(4)));
typedef float vec4 __attribute__((vector_size(16)));

#define DLF_INLINE inline __attribute__((always_inline))

DLF_INLINE vec8 load8(const float* p) { return *reinterpret_cast<const vec8_unaligned*>(p); }
DLF_INLINE void store8(float* p, vec8 v) { *reinterpret_cast<vec8_unaligned*>(p) = v; }
DLF_INLINE vec8 splat8(float x) { return vec8{x, x, x, x, x, x, x, x}; }

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

DLF_INLINE vec8 exp8_eigen(vec8 x0) {
  using K = EigenExpConstants;
  const vec8 hi = splat8(K::kHi), lo = splat8(K::kLo), one = splat8(1.0f), zero = splat8(0.0f);
  vec8 x = x0 < hi ? x0 : hi;
  x = x > lo ? x : lo;
  vec8 fx = x * K::kLog2e + 0.5f;
  const vec8 truncated = __builtin_convertvector(__builtin_convertvector(fx, ivec8), vec8);
  fx = truncated - (truncated > fx ? one : zero);  // floor
  const vec8 t = fx * K::kC1;
  vec8 z = fx * K::kC2;
  x = x - t;
  x = x - z;
  z = x * x;
  vec8 y = splat8(K::kP0);
  y = y * x + K::kP1;
  y = y * x + K::kP2;
  y = y * x + K::kP3;
  y = y * x + K::kP4;
  y = y * x + K::kP5;
  y = y * z + x;
  y = y + 1.0f;
  const ivec8 bits = (__builtin_convertvector(fx, ivec8) + 127) << 23;
  const vec8 r = y * reinterpret_cast<const vec8&>(bits);
  return r > x0 ? r : x0;
}

// The same for one value (the arithmetic is element-wise, so lane 0 of the vector form is exact).
inline float exp_eigen(float x) { return exp8_eigen(splat8(x))[0]; }

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

// eigen_sum over e[0..L) held in vec8 registers (e[c] = elements 8c..8c+7): Eigen's 4-float packet 2c is
// the low half of e[c] and packet 2c+1 its high half, so its two packet accumulators are the halves of one
// vec8 accumulator. Lanes at or beyond L are not read.
template <int C>
DLF_INLINE float eigen_sum8(const vec8* e, int64_t L) {
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
    a = __builtin_shufflevector(acc, acc, 0, 1, 2, 3) + __builtin_shufflevector(acc, acc, 4, 5, 6, 7);
    if (size1 > full * 8) a += __builtin_shufflevector(e[full], e[full], 0, 1, 2, 3);
  } else {
    a = __builtin_shufflevector(e[0], e[0], 0, 1, 2, 3);
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

// Label-vector primitives over a stride S: whole vec8 steps when S is a multiple of 8 (every L > 2), scalar
// loops otherwise (L <= 2, where S = L).
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
