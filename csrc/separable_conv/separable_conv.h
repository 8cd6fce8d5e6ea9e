// The depthwise-separable atrous convolution as a torch-free problem, shared by the CPU kernels (cpu/) and the
// CUDA kernel (cuda/):
//
//   y1[n, c, p, q] = dw_relu?( dw_scale[c] * sum_{r, s} x[n, c, p*sh - ph + r*dh, q*sw - pw + s*dw] w_d[c, r, s]
//                              + dw_bias[c] )                       (taps outside the image read zero)
//   y[n, k, p, q]  = pw_relu?( pw_scale[k] * sum_c y1[n, c, p, q] w_p[k, c] + pw_bias[k] )
//
// The kernels fold the scales into the filters (w_d[c] * dw_scale[c], w_p[k] * pw_scale[k], in float or
// double) and round y1 to the input's dtype before the pointwise conv, as the unfused layers round their
// intermediate tensor. The in-bounds taps of an output index are atrous_conv's tap interval
// (../atrous_conv/tap_regions.h).
#pragma once

#include <cstdint>

namespace deeplab_fast {
namespace separable_conv {

struct Problem {
  int64_t N = 0, C = 0, H = 0, W = 0;  // input [N, C, H, W]
  int64_t K = 0;                       // output channels
  int64_t R = 0, S = 0;                // depthwise filter size
  int64_t P = 0, Q = 0;                // output [N, K, P, Q]
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dilation_h = 1, dilation_w = 1;
  bool dw_relu = false, pw_relu = false;
};

}  // namespace separable_conv
}  // namespace deeplab_fast
