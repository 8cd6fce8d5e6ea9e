// The CPU kernel of deeplab_fast::atrous_conv2d and its plan query, and their registration (schemas:
// ../atrous_conv_ops.cpp): ATen's convolution (oneDNN; with the bias when there is no scale), then the epilogue
// y = relu?(conv * scale + bias) in place, with ATen's vectorised kernels. The call's plan (../atrous_conv_args.h)
// carries the checks, the tap regions, the tap-skipping decision and the output.
//
// Tap skipping is off by default on the CPU: oneDNN's direct convolutions already leave out the filter taps that
// fall in the zero padding, and the region-by-region calls measured slower on every DeepLab layer (DEVELOPERS.md).
// It stays available (DEEPLAB_FAST_TAP_SKIPPING=1) as the executable reference of the plan that the CUDA path runs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "../atrous_conv_args.h"

namespace deeplab_fast {
namespace atrous_conv {
namespace cpu {

namespace {

constexpr bool kTapSkippingByDefault = false;

at::Tensor channel_view(const at::Tensor& v) { return v.view({1, -1, 1, 1}); }

// out = relu?(conv * scale + bias) elementwise, over any layouts (out may be a view); conv and out are
// [N, K, P, Q], scale / bias are [K] or undefined. ATen's vectorised kernels compute 16-bit types in float and
// round once, as the CUDA epilogue does.
void apply_epilogue(const at::Tensor& conv, const at::Tensor& out, const at::Tensor& scale, const at::Tensor& bias,
                    bool relu) {
  if (scale.defined()) {
    const at::Tensor b = bias.defined() ? channel_view(bias) : at::zeros({1, 1, 1, 1}, scale.options());
    at::addcmul_out(const_cast<at::Tensor&>(out), b, conv, channel_view(scale));
  } else if (bias.defined()) {
    at::add_out(const_cast<at::Tensor&>(out), conv, channel_view(bias));
  } else if (!out.is_same(conv)) {
    out.copy_(conv);
  }
  if (relu) out.relu_();
}

at::Tensor atrous_conv2d(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& scale, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, bool relu) {
  const ConvPlan plan = check_args(input, weight, bias, scale, stride, padding, dilation, relu);
  const at::Tensor& b = plan.bias;
  const at::Tensor& s = plan.scale;
  if (!plan.tap_skipping(kTapSkippingByDefault)) {
    // Without a scale, oneDNN adds the bias itself and the ReLU runs in place on its output.
    at::Tensor conv = at::convolution(input, weight, s.defined() ? c10::optional<at::Tensor>() : bias, stride,
                                      padding, dilation, /*transposed=*/false, /*output_padding=*/{0, 0},
                                      /*groups=*/1);
    if (!s.defined() && conv.is_contiguous(plan.memory_format)) {
      if (relu) conv.relu_();
      return conv;
    }
    at::Tensor out = plan.new_output();
    apply_epilogue(conv, out, s, s.defined() ? b : at::Tensor(), relu);
    return out;
  }
  at::Tensor out = plan.new_output();
  // Tap skipping: each region is an unpadded convolution of its input window with its sub-filter.
  for (const TapRegion& g : plan.regions) {
    const at::Tensor out_region = plan.region_of(out, g);
    if (g.empty_taps()) {  // every tap reads padding: the epilogue of zero
      apply_epilogue(at::zeros({1, 1, 1, 1}, input.options()).expand_as(out_region), out_region, s, b, relu);
      continue;
    }
    const int64_t taps_h = g.r_end - g.r_begin, taps_w = g.s_end - g.s_begin;
    const at::Tensor window =
        input.narrow(2, g.in_h, region_input_extent(g.rows(), taps_h, plan.stride[0], plan.dilation[0]))
            .narrow(3, g.in_w, region_input_extent(g.cols(), taps_w, plan.stride[1], plan.dilation[1]));
    const at::Tensor sub_filter = weight.narrow(2, g.r_begin, taps_h).narrow(3, g.s_begin, taps_w);
    const at::Tensor conv = at::convolution(window, sub_filter.contiguous(weight.suggest_memory_format()),
                                            c10::nullopt, stride, /*padding=*/{0, 0}, dilation, false, {0, 0}, 1);
    apply_epilogue(conv, out_region, s, b, relu);
  }
  return out;
}

std::string atrous_conv2d_plan(const at::Tensor& input, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  const ConvPlan plan = check_args(input, weight, bias, scale, stride, padding, dilation, relu);
  const bool skip = plan.tap_skipping(kTapSkippingByDefault);
  return plan.json("cpu", skip ? "aten-tap-skipping" : "aten",
                   std::string("ATen convolution (oneDNN)") +
                       (skip ? " per tap region, then the epilogue"
                             : ", with the bias unless there is a scale; ReLU in place"),
                   skip);
}

}  // namespace

TORCH_LIBRARY_IMPL(deeplab_fast, CPU, m) {
  m.impl("atrous_conv2d", &atrous_conv2d);
  m.impl("atrous_conv2d_plan", &atrous_conv2d_plan);
}

}  // namespace cpu
}  // namespace atrous_conv
}  // namespace deeplab_fast
