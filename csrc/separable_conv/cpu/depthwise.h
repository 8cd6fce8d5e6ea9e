// The CPU depthwise pass of the separable convolution (depthwise.cpp): for a range of output pixels of one image,
// y1 = dw_relu?(sum over in-bounds taps of x * w + bias) per channel, written as rows of channels (one row per
// pixel) into a buffer that the pointwise GEMM reads (separable_conv_cpu_ops.cpp).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../separable_conv.h"

namespace deeplab_fast {
namespace separable_conv {
namespace cpu {

// One call's depthwise inputs. T is the tensors' dtype (float, double, c10::BFloat16, c10::Half), Acc the
// accumulation type (double for double, float otherwise).
template <typename T, typename Acc>
struct Depthwise {
  const Problem* problem = nullptr;
  const T* input = nullptr;  // x[n, h, w, c] at input + n*in_stride_n + h*in_stride_h + w*in_stride_w + c
  int64_t in_stride_n = 0, in_stride_h = 0, in_stride_w = 0;
  const Acc* weight = nullptr;       // [R*S, C]: tap (r, s) of channel c at (r*S + s)*C + c, dw_scale folded in
  const Acc* bias = nullptr;         // [C], or nullptr
  const int64_t* row_taps = nullptr; // [P][2]: the in-bounds filter rows [begin, end) of each output row
  const int64_t* col_taps = nullptr; // [Q][2]: the in-bounds filter columns of each output column
};

// Output pixels m in [m_begin, m_end) of image n (m = p*Q + q, row-major over the output) into out[(m - m_begin)
// * ldo + c], rounded to T.
void depthwise_pixels(const Depthwise<float, float>& a, int64_t n, int64_t m_begin, int64_t m_end, float* out,
                      int64_t ldo);
void depthwise_pixels(const Depthwise<double, double>& a, int64_t n, int64_t m_begin, int64_t m_end, double* out,
                      int64_t ldo);
void depthwise_pixels(const Depthwise<c10::BFloat16, float>& a, int64_t n, int64_t m_begin, int64_t m_end,
                      c10::BFloat16* out, int64_t ldo);
void depthwise_pixels(const Depthwise<c10::Half, float>& a, int64_t n, int64_t m_begin, int64_t m_end,
                      c10::Half* out, int64_t ldo);

}  // namespace cpu
}  // namespace separable_conv
}  // namespace deeplab_fast
