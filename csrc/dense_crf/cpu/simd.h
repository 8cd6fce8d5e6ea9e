// CPU vectorisation helpers for the dense CRF kernels.
//
// Hot loops are written as plain loops over a label stride that is a multiple of 8, which GCC and Clang
// vectorise. DLF_CPU_KERNEL compiles such a function twice, for AVX2 and for the baseline ISA, and picks one
// at load time (GCC function multi-versioning), so one build runs everywhere and uses 256-bit vectors where
// the CPU has them. The build uses -ffp-contract=off: no FMA contraction, so both versions round alike.
#pragma once

#include <cstdint>
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

#define DLF_INLINE inline __attribute__((always_inline))

DLF_INLINE vec8 load8(const float* p) { return *reinterpret_cast<const vec8_unaligned*>(p); }
DLF_INLINE void store8(float* p, vec8 v) { *reinterpret_cast<vec8_unaligned*>(p) = v; }
DLF_INLINE vec8 splat8(float x) { return vec8{x, x, x, x, x, x, x, x}; }

// exp(x) for x <= 0 (softmax arguments), eight at a time: Cody-Waite range reduction x = n ln2 + r,
// |r| <= ln2/2, a degree-6 polynomial for e^r (the classic Cephes expf coefficients, about 1 ulp) and 2^n
// assembled in the exponent bits. Arguments below -87 give exp(-87) ~ 1.6e-38.
DLF_INLINE vec8 exp8_nonpositive(vec8 x) {
  const vec8 lo = splat8(-87.0f);
  x = x < lo ? lo : x;
  const vec8 magic = splat8(12582912.0f);
  const vec8 n = (x * 1.44269504088896341f + magic) - magic;  // round(x / ln2), ties to even
  vec8 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vec8 p = splat8(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const ivec8 bits = (__builtin_convertvector(n, ivec8) + 127) << 23;
  return p * reinterpret_cast<const vec8&>(bits);
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
