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

}  // namespace atrous_conv
}  // namespace deeplab_fast
