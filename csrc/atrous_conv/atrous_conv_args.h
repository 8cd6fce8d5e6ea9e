// The checked call of deeplab_fast::atrous_conv2d, shared by the CPU and CUDA registrations: check_args validates
// every argument (so both devices reject bad input with the same messages) and returns the call's plan, which
// carries the data path every device follows: the validated tensors and sizes, the tap regions, the tap-skipping
// decision, the output, and the plan query's JSON. The devices differ only in how they convolve and apply the
// epilogue (cpu/, cuda/).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <vector>

#include "tap_regions.h"

namespace deeplab_fast {
namespace atrous_conv {

// A validated call: y = relu?(conv(input, weight) * scale + bias), the conv with groups = 1.
struct ConvPlan {
  at::Tensor input, weight;  // input [N, C, H, W], weight [K, C, R, S], as given
  at::Tensor bias, scale;    // [K], or undefined when absent
  int64_t N, C, H, W;
  int64_t K, R, S;
  int64_t P, Q;  // output [N, K, P, Q]
  std::array<int64_t, 2> stride, padding, dilation;  // (height, width)
  bool relu;
  at::MemoryFormat memory_format;  // of the output: channels_last iff the input is
  // Tap skipping (tap_regions.h): every region of the output, including those without taps, and the fraction of
  // the multiply-accumulates they keep (1: nothing to skip).
  std::vector<TapRegion> regions;
  double kept_fraction;

  // The output, uninitialised (NaN-filled when poison_outputs()), in memory_format.
  at::Tensor new_output() const;
  // Whether to skip taps: DEEPLAB_FAST_TAP_SKIPPING (read at every call; deeplab_fast.ops.tap_skipping() sets it)
  // "0" never, "1" whenever it removes a tap, unset or "auto" the device's rule (`device_default`).
  bool tap_skipping(bool device_default) const;
  // The output rectangle of region g (a view of out).
  at::Tensor region_of(const at::Tensor& out, const TapRegion& g) const;
  // The plan query's answer (deeplab_fast::atrous_conv2d_plan): {"device", "path", "reason", "tap_skipping",
  // "kept_fraction", <extra fields, e.g. "\"tile\": ..., ">"regions"}.
  std::string json(const char* device, const std::string& path, const std::string& reason, bool tap_skipping,
                   const std::string& extra = "") const;
};

// Checks every argument (devices first: weight, bias and scale on the input's device, which is the CPU or CUDA;
// then dims, dtypes, sizes, stride/padding/dilation) and throws c10::ValueError (Python: ValueError) naming the
// argument and what was expected. Ranges: stride and dilation in [1, 2^31 - 1], padding in [0, 2^31 - 1], the
// padded input (H + 2 pad_h, W + 2 pad_w) at most 2^62, a non-empty output whose size in bytes fits in int64.
ConvPlan check_args(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& scale, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, bool relu);

// The argument checks shared by the convolution ops (this one and separable_conv/), each message prefixed with
// `op` ("atrous_conv2d: ..."), throwing c10::ValueError.
namespace checks {

// A [height, width] pair with values in [min, 2^31 - 1]; `note` follows the range in the message.
void pair(const char* op, at::IntArrayRef v, const char* name, int64_t min, const char* note);
// stride and dilation in [1, 2^31 - 1], padding in [0, 2^31 - 1], two values each.
void conv_params(const char* op, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);
// `t` (when given) on the input's device.
void same_device(const char* op, const c10::optional<at::Tensor>& t, const at::Tensor& input, const char* name);
// `t` (when given) a 1-D tensor of n values ("one value per <channels> channel") of the input's dtype.
void per_channel(const char* op, const c10::optional<at::Tensor>& t, const at::Tensor& input, int64_t n,
                 const char* name, const char* channels);
// float32, float64, bfloat16 or float16.
void input_dtype(const char* op, const at::Tensor& input);
// (P, Q) of a 4-D input [N, C, H, W] convolved with an R x S filter into K channels: the padded input at most
// 2^62 per axis, a non-empty output whose size in bytes fits in int64.
std::array<int64_t, 2> output_extent(const char* op, const at::Tensor& input, int64_t K, int64_t R, int64_t S,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);
// channels_last iff the input is (as torch suggests it), else contiguous.
at::MemoryFormat output_format(const at::Tensor& input);
// An uninitialised output (NaN-filled when poison_outputs()) in memory_format.
at::Tensor new_output(const at::Tensor& input, at::IntArrayRef sizes, at::MemoryFormat memory_format);

}  // namespace checks

}  // namespace atrous_conv
}  // namespace deeplab_fast
