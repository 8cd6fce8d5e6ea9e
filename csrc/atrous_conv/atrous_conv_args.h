// Argument checks, the output allocation and the tap-skipping switch shared by the CPU and CUDA registrations
// of deeplab_fast::atrous_conv2d, so that both devices reject bad input with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "tap_regions.h"

namespace deeplab_fast {
namespace atrous_conv {

// A validated call: y = relu?(conv(x, w) * scale + bias), the conv with groups = 1.
struct ConvArgs {
  int64_t N, C, H, W;        // input [N, C, H, W]
  int64_t K, R, S;           // weight [K, C, R, S]
  int64_t P, Q;              // output [N, K, P, Q]
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  bool relu;
  bool has_bias, has_scale;
  at::MemoryFormat memory_format;  // of the output: channels_last iff the input is
};

// Checks every argument (devices first: weight, bias and scale on the input's device, which is the CPU or CUDA;
// then dims, dtypes, sizes, stride/padding/dilation) and throws c10::Error (RuntimeError) naming the argument
// and what was expected. Ranges: stride and dilation in [1, 2^31 - 1], padding in [0, 2^31 - 1], the padded
// input (H + 2 pad_h, W + 2 pad_w) at most 2^62, a non-empty output whose size in bytes fits in int64.
ConvArgs check_args(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& scale, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, bool relu);

// The output, uninitialised (NaN-filled when poison_outputs()), in args.memory_format.
at::Tensor new_output(const at::Tensor& input, const ConvArgs& args);

// DEEPLAB_FAST_TAP_SKIPPING (read at every call): "0" off, "1" on whenever it removes any tap, unset or
// "auto" the device's default rule. deeplab_fast.ops.tap_skipping() sets it for a block of code.
enum class TapSkipping { kOff, kOn, kAuto };
TapSkipping tap_skipping_mode();

// The tap regions of a call and the fraction of multiply-accumulates they keep (1: nothing to skip).
std::vector<TapRegion> plan_regions(const ConvArgs& a, double* kept_fraction);

// JSON string fragments for the plan query (deeplab_fast::atrous_conv2d_plan).
std::string regions_json(const std::vector<TapRegion>& regions);

}  // namespace atrous_conv
}  // namespace deeplab_fast
