// The CPU path of deeplab_fast::atrous_conv2d (see atrous_conv_cpu.h).
#include "atrous_conv_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/TensorIterator.h>

#include <sstream>

namespace deeplab_fast {
namespace atrous_conv {
namespace cpu {

namespace {

// On the CPU, tap skipping is off by default: oneDNN's direct convolutions already leave out the filter taps
// that fall in the zero padding, and the region-by-region calls measured slower on every DeepLab layer (2-core
// EPYC, float32: rate 18 at 33x33, 2048->256, channels_last: 23 ms whole vs 32 ms by regions). It stays
// available (DEEPLAB_FAST_TAP_SKIPPING=1) as the executable reference of the plan that the CUDA path runs.

at::Tensor channel_view(const at::Tensor& v, at::ScalarType compute) {
  return v.to(compute).view({1, -1, 1, 1});
}

}  // namespace

void apply_epilogue(const at::Tensor& conv, const at::Tensor& out, const at::Tensor& scale, const at::Tensor& bias,
                    bool relu) {
  const at::ScalarType compute = out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t K = out.size(1);
  const at::Tensor s = scale.defined() ? channel_view(scale, compute)
                                       : at::ones({1, K, 1, 1}, out.options().dtype(compute));
  const at::Tensor b = bias.defined() ? channel_view(bias, compute)
                                      : at::zeros({1, K, 1, 1}, out.options().dtype(compute));
  at::TensorIterator iter = at::TensorIteratorConfig()
                                .add_output(out)
                                .add_const_input(conv)
                                .add_const_input(s)
                                .add_const_input(b)
                                .check_all_same_dtype(false)
                                .resize_outputs(false)
                                .build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "atrous_conv2d_epilogue", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    iter.for_each([relu](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
      for (int64_t j = 0; j < n1; ++j) {
        char* y = data[0] + j * strides[4];
        const char* x = data[1] + j * strides[5];
        const char* sc = data[2] + j * strides[6];
        const char* bi = data[3] + j * strides[7];
        for (int64_t i = 0; i < n0; ++i) {
          acc_t v = static_cast<acc_t>(*reinterpret_cast<const scalar_t*>(x + i * strides[1])) *
                        *reinterpret_cast<const acc_t*>(sc + i * strides[2]) +
                    *reinterpret_cast<const acc_t*>(bi + i * strides[3]);
          if (relu && v < acc_t(0)) v = acc_t(0);  // NaN stays NaN, as in torch.relu
          *reinterpret_cast<scalar_t*>(y + i * strides[0]) = static_cast<scalar_t>(v);
        }
      }
    });
  });
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
  at::Tensor out = new_output(input, a);

  if (!use_tap_skipping(a, kept)) {
    const at::Tensor conv = at::convolution(input, weight, c10::nullopt, stride, padding, dilation,
                                            /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1);
    apply_epilogue(conv, out, s, b, relu);
    return out;
  }
  // Tap skipping: each region is an unpadded convolution of its input window with its sub-filter.
  for (const TapRegion& g : regions) {
    at::Tensor out_region = out.narrow(2, g.p_begin, g.rows()).narrow(3, g.q_begin, g.cols());
    if (g.empty_taps()) {  // every tap reads padding: the epilogue of zero
      apply_epilogue(at::zeros({1, 1, 1, 1}, input.options()), out_region, s, b, relu);
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
     << "\", \"reason\": \"ATen convolution (oneDNN) + fused epilogue"
     << (skip ? ", one convolution per tap region" : "") << "\", \"tap_skipping\": " << (skip ? "true" : "false")
     << ", \"kept_fraction\": " << kept << ", \"regions\": " << regions_json(regions) << "}";
  return js.str();
}

}  // namespace cpu
}  // namespace atrous_conv
}  // namespace deeplab_fast
