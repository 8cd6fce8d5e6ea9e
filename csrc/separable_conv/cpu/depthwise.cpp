// The CPU depthwise pass of the separable convolution (see depthwise.h).
//
// Loop order: pixels outermost, then channel blocks of 64 floats (32 doubles), then the in-bounds taps only (the
// row and column tap intervals come precomputed), then the channels of the block, innermost and contiguous in
// the channels-last input: the accumulators of a block stay in vector registers, and each tap reads a contiguous
// run of channels. (Channel blocks outermost read the input at a stride of C elements from pixel to pixel; with
// C = 2048 floats every access fell in the same L1 sets: 2x slower, measured.) The block loop is a fixed-length loop the compiler vectorises;
// DLF_SEP_KERNEL compiles it for AVX-512, AVX2 and the baseline ISA and picks one at load time.
//
// No FMA (the build's -ffp-contract=off): products and sums round separately, as ATen's vectorised kernels
// without FMA would.
#include "depthwise.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define DLF_SEP_KERNEL __attribute__((target_clones("avx512f", "avx2", "default"))) __attribute__((noinline))
#else
#define DLF_SEP_KERNEL
#endif
#define DLF_SEP_INLINE inline __attribute__((always_inline))

namespace deeplab_fast {
namespace separable_conv {
namespace cpu {

namespace {

// Loads as the accumulation type and stores rounded to nearest even, written with integer operations for the
// 16-bit types so that the block loops vectorise (bfloat16: the upper half of a float; NaN stays a quiet NaN).
DLF_SEP_INLINE float load(const float* p, int64_t j) { return p[j]; }
DLF_SEP_INLINE double load(const double* p, int64_t j) { return p[j]; }
DLF_SEP_INLINE float load(const c10::BFloat16* p, int64_t j) {
  const uint32_t bits = static_cast<uint32_t>(p[j].x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
DLF_SEP_INLINE float load(const c10::Half* p, int64_t j) { return static_cast<float>(p[j]); }

DLF_SEP_INLINE void store(float* p, int64_t j, float v) { p[j] = v; }
DLF_SEP_INLINE void store(double* p, int64_t j, double v) { p[j] = v; }
DLF_SEP_INLINE void store(c10::BFloat16* p, int64_t j, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  p[j].x = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}
DLF_SEP_INLINE void store(c10::Half* p, int64_t j, float v) { p[j] = c10::Half(v); }

template <typename Acc>
constexpr int64_t kBlock = 256 / sizeof(Acc);  // channels per block: 64 floats, 32 doubles (4 zmm registers)

// One block of `len` channels (len == kBlock<Acc> in the vectorised instantiation) at channel c0 of pixel (p, q).
template <typename T, typename Acc, int64_t kLen>
DLF_SEP_INLINE void block(const Depthwise<T, Acc>& a, const T* x_n, int64_t p, int64_t q, int64_t c0, int64_t len,
                          T* out) {
  const Problem& pb = *a.problem;
  const int64_t n_len = kLen > 0 ? kLen : len;
  Acc acc[kBlock<Acc>];
  for (int64_t j = 0; j < n_len; ++j) acc[j] = a.bias != nullptr ? a.bias[c0 + j] : Acc(0);
  const int64_t r_begin = a.row_taps[2 * p], r_end = a.row_taps[2 * p + 1];
  const int64_t s_begin = a.col_taps[2 * q], s_end = a.col_taps[2 * q + 1];
  for (int64_t r = r_begin; r < r_end; ++r) {
    const T* x_row = x_n + (p * pb.stride_h - pb.pad_h + r * pb.dilation_h) * a.in_stride_h + c0;
    const Acc* w_row = a.weight + r * pb.S * pb.C + c0;
    for (int64_t s = s_begin; s < s_end; ++s) {
      const T* xp = x_row + (q * pb.stride_w - pb.pad_w + s * pb.dilation_w) * a.in_stride_w;
      const Acc* wp = w_row + s * pb.C;
      for (int64_t j = 0; j < n_len; ++j) acc[j] += load(xp, j) * wp[j];
    }
  }
  if (pb.dw_relu) {
    for (int64_t j = 0; j < n_len; ++j) acc[j] = acc[j] > Acc(0) ? acc[j] : (acc[j] != acc[j] ? acc[j] : Acc(0));
  }
  for (int64_t j = 0; j < n_len; ++j) store(out, j, acc[j]);
}

template <typename T, typename Acc>
DLF_SEP_INLINE void pixels(const Depthwise<T, Acc>& a, int64_t n, int64_t m_begin, int64_t m_end, T* out,
                           int64_t ldo) {
  const Problem& pb = *a.problem;
  const T* x_n = a.input + n * a.in_stride_n;
  constexpr int64_t B = kBlock<Acc>;
  int64_t p = m_begin / pb.Q, q = m_begin % pb.Q;
  for (int64_t m = m_begin; m < m_end; ++m) {
    T* o = out + (m - m_begin) * ldo;
    int64_t c0 = 0;
    for (; c0 + B <= pb.C; c0 += B) block<T, Acc, B>(a, x_n, p, q, c0, B, o + c0);
    if (c0 < pb.C) block<T, Acc, 0>(a, x_n, p, q, c0, pb.C - c0, o + c0);
    if (++q == pb.Q) {
      q = 0;
      ++p;
    }
  }
}

DLF_SEP_KERNEL void pixels_f32(const Depthwise<float, float>& a, int64_t n, int64_t b, int64_t e, float* out,
                               int64_t ldo) {
  pixels(a, n, b, e, out, ldo);
}
DLF_SEP_KERNEL void pixels_f64(const Depthwise<double, double>& a, int64_t n, int64_t b, int64_t e, double* out,
                               int64_t ldo) {
  pixels(a, n, b, e, out, ldo);
}
DLF_SEP_KERNEL void pixels_bf16(const Depthwise<c10::BFloat16, float>& a, int64_t n, int64_t b, int64_t e,
                                c10::BFloat16* out, int64_t ldo) {
  pixels(a, n, b, e, out, ldo);
}
DLF_SEP_KERNEL void pixels_f16(const Depthwise<c10::Half, float>& a, int64_t n, int64_t b, int64_t e,
                               c10::Half* out, int64_t ldo) {
  pixels(a, n, b, e, out, ldo);
}

}  // namespace

void depthwise_pixels(const Depthwise<float, float>& a, int64_t n, int64_t m_begin, int64_t m_end, float* out,
                      int64_t ldo) {
  pixels_f32(a, n, m_begin, m_end, out, ldo);
}
void depthwise_pixels(const Depthwise<double, double>& a, int64_t n, int64_t m_begin, int64_t m_end, double* out,
                      int64_t ldo) {
  pixels_f64(a, n, m_begin, m_end, out, ldo);
}
void depthwise_pixels(const Depthwise<c10::BFloat16, float>& a, int64_t n, int64_t m_begin, int64_t m_end,
                      c10::BFloat16* out, int64_t ldo) {
  pixels_bf16(a, n, m_begin, m_end, out, ldo);
}
void depthwise_pixels(const Depthwise<c10::Half, float>& a, int64_t n, int64_t m_begin, int64_t m_end,
                      c10::Half* out, int64_t ldo) {
  pixels_f16(a, n, m_begin, m_end, out, ldo);
}

}  // namespace cpu
}  // namespace separable_conv
}  // namespace deeplab_fast
