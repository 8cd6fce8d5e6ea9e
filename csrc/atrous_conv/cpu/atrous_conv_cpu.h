// The CPU path of deeplab_fast::atrous_conv2d: ATen's convolution (oneDNN; with the bias when there is no
// scale), then the epilogue y = relu?(conv * scale + bias) in place, with ATen's vectorised kernels.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "../atrous_conv_args.h"

namespace deeplab_fast {
namespace atrous_conv {
namespace cpu {

// out = relu?(conv * scale + bias) elementwise, over any layouts (out may be a view); conv and out are
// [N, K, P, Q], scale / bias are [K] or undefined. 16-bit types are computed in float and rounded once.
void apply_epilogue(const at::Tensor& conv, const at::Tensor& out, const at::Tensor& scale, const at::Tensor& bias,
                    bool relu);

// Whether the CPU path skips taps for this call (DEEPLAB_FAST_TAP_SKIPPING, else the CPU's rule).
bool use_tap_skipping(const ConvArgs& a, double kept_fraction);

at::Tensor atrous_conv2d(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& scale, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, bool relu);

std::string plan(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                 const c10::optional<at::Tensor>& scale, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef dilation, bool relu);

}  // namespace cpu
}  // namespace atrous_conv
}  // namespace deeplab_fast
