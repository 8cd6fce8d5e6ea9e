// The fused atrous convolution's op schemas (the checked call: atrous_conv_args.h; the kernels register per
// device: cpu/atrous_conv_cpu_ops.cpp, cuda/atrous_conv_cuda_ops.cpp).
//
//   deeplab_fast::atrous_conv2d(input[N,C,H,W], weight[K,C,R,S], bias[K]?, scale[K]?, stride, padding,
//                               dilation, relu) -> relu?(conv(input, weight) * scale + bias)  [N,K,P,Q]
//   deeplab_fast::atrous_conv2d_plan(<the same arguments>) -> str: JSON naming the path that would run
//       (device, path, reason, tap_skipping, kept_fraction, regions; on CUDA also the tile configuration)
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(deeplab_fast, m) {
  m.def(
      "atrous_conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor? scale, int[2] stride, int[2] padding, "
      "int[2] dilation, bool relu) -> Tensor");
  m.def(
      "atrous_conv2d_plan(Tensor input, Tensor weight, Tensor? bias, Tensor? scale, int[2] stride, "
      "int[2] padding, int[2] dilation, bool relu) -> str");
}
