// The fused depthwise-separable atrous convolution's op schemas (the checked call: separable_conv_args.h; the
// kernels register per device: cpu/separable_conv_cpu_ops.cpp, cuda/separable_conv_cuda_ops.cpp).
//
//   deeplab_fast::separable_conv2d(input[N,C,H,W], dw_weight[C,1,R,S], dw_bias[C]?, dw_scale[C]?,
//                                  pw_weight[K,C,1,1], pw_bias[K]?, pw_scale[K]?, stride, padding, dilation,
//                                  dw_relu, pw_relu) -> [N,K,P,Q]
//       y1 = dw_relu?(depthwise_conv(input, dw_weight) * dw_scale + dw_bias)     (groups = C, atrous)
//       y  = pw_relu?(conv1x1(y1, pw_weight) * pw_scale + pw_bias)
//   deeplab_fast::separable_conv2d_plan(<the same arguments>) -> str: JSON naming the path that would run
//       (device, path, reason, tile_pixels)
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(deeplab_fast, m) {
  m.def(
      "separable_conv2d(Tensor input, Tensor dw_weight, Tensor? dw_bias, Tensor? dw_scale, Tensor pw_weight, "
      "Tensor? pw_bias, Tensor? pw_scale, int[2] stride, int[2] padding, int[2] dilation, bool dw_relu, "
      "bool pw_relu) -> Tensor");
  m.def(
      "separable_conv2d_plan(Tensor input, Tensor dw_weight, Tensor? dw_bias, Tensor? dw_scale, "
      "Tensor pw_weight, Tensor? pw_bias, Tensor? pw_scale, int[2] stride, int[2] padding, int[2] dilation, "
      "bool dw_relu, bool pw_relu) -> str");
}
