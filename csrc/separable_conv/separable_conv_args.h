// The checked call of deeplab_fast::separable_conv2d, shared by the CPU and CUDA registrations: check_args
// validates every argument (so both devices reject bad input with the same messages) and returns the call's
// plan: the validated tensors, the problem (separable_conv.h) and the output.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "separable_conv.h"

namespace deeplab_fast {
namespace separable_conv {

struct SeparablePlan {
  at::Tensor input;                 // [N, C, H, W], as given
  at::Tensor dw_weight, pw_weight;  // [C, 1, R, S], [K, C, 1, 1], as given
  at::Tensor dw_bias, dw_scale;     // [C], or undefined when absent
  at::Tensor pw_bias, pw_scale;     // [K], or undefined when absent
  Problem problem;
  at::MemoryFormat memory_format;  // of the output: channels_last iff the input is

  // The output [N, K, P, Q], uninitialised (NaN-filled when poison_outputs()), in memory_format.
  at::Tensor new_output() const;
  // The plan query's answer: {"device", "path", "reason", <extra fields>}.
  std::string json(const char* device, const std::string& path, const std::string& reason,
                   const std::string& extra = "") const;
};

// Checks every argument (devices first: every tensor on the input's device, the CPU or CUDA; then dims, dtypes,
// sizes, stride/padding/dilation) and throws c10::ValueError (Python: ValueError) naming the argument and what
// was expected. Ranges as atrous_conv2d's: stride and dilation in [1, 2^31 - 1], padding in [0, 2^31 - 1], the
// padded input at most 2^62 per axis, a non-empty output whose size in bytes fits in int64.
SeparablePlan check_args(const at::Tensor& input, const at::Tensor& dw_weight,
                         const c10::optional<at::Tensor>& dw_bias, const c10::optional<at::Tensor>& dw_scale,
                         const at::Tensor& pw_weight, const c10::optional<at::Tensor>& pw_bias,
                         const c10::optional<at::Tensor>& pw_scale, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, bool dw_relu, bool pw_relu);

}  // namespace separable_conv
}  // namespace deeplab_fast
