// The CPU path of deeplab_fast::atrous_conv2d (see atrous_conv_cpu.h).
#include "atrous_conv_cpu.h"


#include <iomanip>
#include <sstream>

namespace deeplab_fast {
namespace atrous_conv {
namespace cpu {

namespace {

// On the CPU, tap skipping is off by default: oneDNN's direct convolutions already leave out the filter taps
// that fall in the zero padding, and the region-by-region calls measured slower on every DeepLab layer (2-core
// EPYC, float32: rate 18 at 33x33, 2048->256, channels_last: 23 ms whole vs 32 ms by regions). It stays
// available (DEEPLAB_FAST_TAP_SKIPPING=1) as the executable reference of the plan that the CUDA path runs.

at::Tensor channel_view(const at::Tensor& v) { return v.view({1, -1, 1, 1}); }

}  // namespace

void apply_epilogue(const at::Tensor& conv, const at::Tensor& out, const at::Tensor& scale, const at::Tensor& bias,
                    bool relu) {
  // ATen's vectorised kernels compute 16-bit types in float and round once, as the CUDA epilogue does.
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

bool use_tap_skipping(const ConvArgs& a, double kept_fraction) {
  switch (tap_skipping_mode()) {
    case TapSkipping::kOff: return false;
    case TapSkipping::kOn: return kept_fraction < 1.0;
    case TapSkipping::kAuto: break;
  }
  (void)a;
  return false;
}

at::Tensor atrous_conv2d(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& scale, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, bool relu) {
  const ConvArgs a = check_args(input, weight, bias, scale, stride, padding, dilation, relu);
  const at::Tensor b = a.has_bias ? *bias : at::Tensor();
  const at::Tensor s = a.has_scale ? *scale : at::Tensor();
  double kept = 1.0;
  const std::vector<TapRegion> regions = plan_regions(a, &kept);

  if (!use_tap_skipping(a, kept)) {
    // Without a scale, oneDNN adds the bias itself and the ReLU runs in place on its output.
    at::Tensor conv = at::convolution(input, weight, s.defined() ? c10::optional<at::Tensor>() : bias, stride,
                                      padding, dilation, /*transposed=*/false, /*output_padding=*/{0, 0},
                                      /*groups=*/1);
    if (!s.defined() && conv.is_contiguous(a.memory_format)) {
      if (relu) conv.relu_();
      return conv;
    }
    at::Tensor out = new_output(input, a);
    apply_epilogue(conv, out, s, s.defined() ? b : at::Tensor(), relu);
    return out;
  }
  at::Tensor out = new_output(input, a);
  // Tap skipping: each region is an unpadded convolution of its input window with its sub-filter.
  for (const TapRegion& g : regions) {
    at::Tensor out_region = out.narrow(2, g.p_begin, g.rows()).narrow(3, g.q_begin, g.cols());
    if (g.empty_taps()) {  // every tap reads padding: the epilogue of zero
      apply_epilogue(at::zeros({1, 1, 1, 1}, input.options()).expand_as(out_region), out_region, s, b, relu);
      continue;
    }
    const int64_t taps_h = g.r_end - g.r_begin, taps_w = g.s_end - g.s_begin;
    const at::Tensor window =
        input.narrow(2, g.in_h, region_input_extent(g.rows(), taps_h, a.stride_h, a.dilation_h))
            .narrow(3, g.in_w, region_input_extent(g.cols(), taps_w, a.stride_w, a.dilation_w));
    const at::Tensor sub_filter = weight.narrow(2, g.r_begin, taps_h).narrow(3, g.s_begin, taps_w);
    const at::Tensor conv = at::convolution(window, sub_filter.contiguous(weight.suggest_memory_format()),
                                            c10::nullopt, stride, /*padding=*/{0, 0}, dilation, false, {0, 0}, 1);
    apply_epilogue(conv, out_region, s, b, relu);
  }
  return out;
}

std::string plan(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                 const c10::optional<at::Tensor>& scale, at::IntArrayRef stride, at::IntArrayRef padding,
                 at::IntArrayRef dilation, bool relu) {
  const ConvArgs a = check_args(input, weight, bias, scale, stride, padding, dilation, relu);
  double kept = 1.0;
  const std::vector<TapRegion> regions = plan_regions(a, &kept);
  const bool skip = use_tap_skipping(a, kept);
  std::ostringstream js;
  js << "{\"device\": \"cpu\", \"path\": \"" << (skip ? "aten-tap-skipping" : "aten")
     << "\", \"reason\": \"ATen convolution (oneDNN)"
     << (skip ? " per tap region, then the epilogue" : ", with the bias unless there is a scale; ReLU in place") << "\", \"tap_skipping\": " << (skip ? "true" : "false")
     << ", \"kept_fraction\": " << std::setprecision(17) << kept << ", \"regions\": " << regions_json(regions)
     << "}";
  return js.str();
}

}  // namespace cpu
}  // namespace atrous_conv
}  // namespace deeplab_fast
