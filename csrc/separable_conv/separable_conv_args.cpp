// The checked call of deeplab_fast::separable_conv2d, shared by the CPU and CUDA registrations (see
// separable_conv_args.h). The checks common to the convolution ops (stride / padding / dilation, per-channel
// vectors, the output's extent) are atrous_conv's, under this op's name.
#include "separable_conv_args.h"

#include <sstream>

#include "../atrous_conv/atrous_conv_args.h"

namespace deeplab_fast {
namespace separable_conv {

namespace checks = atrous_conv::checks;

namespace {

constexpr const char* kOp = "separable_conv2d";

bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace

SeparablePlan check_args(const at::Tensor& input, const at::Tensor& dw_weight,
                         const c10::optional<at::Tensor>& dw_bias, const c10::optional<at::Tensor>& dw_scale,
                         const at::Tensor& pw_weight, const c10::optional<at::Tensor>& pw_bias,
                         const c10::optional<at::Tensor>& pw_scale, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, bool dw_relu, bool pw_relu) {
  TORCH_CHECK_VALUE(input.defined() && dw_weight.defined() && pw_weight.defined(),
                    "separable_conv2d: input, dw_weight and pw_weight must be defined tensors");
  // Devices first, so that a meta (or misplaced) tensor in any position is refused before anything reads it.
  TORCH_CHECK_VALUE(input.device().is_cpu() || input.device().is_cuda(),
                    "separable_conv2d: input must be a CPU or CUDA tensor, got ", input.device());
  checks::same_device(kOp, dw_weight, input, "dw_weight");
  checks::same_device(kOp, dw_bias, input, "dw_bias");
  checks::same_device(kOp, dw_scale, input, "dw_scale");
  checks::same_device(kOp, pw_weight, input, "pw_weight");
  checks::same_device(kOp, pw_bias, input, "pw_bias");
  checks::same_device(kOp, pw_scale, input, "pw_scale");
  TORCH_CHECK_VALUE(input.dim() == 4, "separable_conv2d: input must be 4-D [N, C, H, W], got ", input.dim(),
                    "-D with shape ", input.sizes());
  TORCH_CHECK_VALUE(dw_weight.dim() == 4, "separable_conv2d: dw_weight must be 4-D [C, 1, R, S], got ",
                    dw_weight.dim(), "-D with shape ", dw_weight.sizes());
  TORCH_CHECK_VALUE(pw_weight.dim() == 4, "separable_conv2d: pw_weight must be 4-D [K, C, 1, 1], got ",
                    pw_weight.dim(), "-D with shape ", pw_weight.sizes());
  checks::input_dtype(kOp, input);
  const auto dtype = input.scalar_type();
  TORCH_CHECK_VALUE(dw_weight.scalar_type() == dtype, "separable_conv2d: dw_weight must have the input's dtype (",
                    dtype, "), got ", dw_weight.scalar_type());
  TORCH_CHECK_VALUE(pw_weight.scalar_type() == dtype, "separable_conv2d: pw_weight must have the input's dtype (",
                    dtype, "), got ", pw_weight.scalar_type());
  TORCH_CHECK_VALUE(input.size(0) > 0, "separable_conv2d: input has an empty batch (N = 0)");
  TORCH_CHECK_VALUE(input.size(1) > 0 && input.size(2) > 0 && input.size(3) > 0,
                    "separable_conv2d: input must have C, H, W > 0, got shape ", input.sizes());
  const int64_t C = input.size(1);
  TORCH_CHECK_VALUE(dw_weight.size(0) == C && dw_weight.size(1) == 1 && dw_weight.size(2) > 0 &&
                        dw_weight.size(3) > 0,
                    "separable_conv2d: dw_weight must be [C, 1, R, S] with C = ", C,
                    " (one filter per input channel) and R, S > 0, got shape ", dw_weight.sizes());
  TORCH_CHECK_VALUE(pw_weight.size(0) > 0 && pw_weight.size(1) == C && pw_weight.size(2) == 1 &&
                        pw_weight.size(3) == 1,
                    "separable_conv2d: pw_weight must be [K, C, 1, 1] with C = ", C, " and K > 0, got shape ",
                    pw_weight.sizes());
  checks::conv_params(kOp, stride, padding, dilation);
  const int64_t K = pw_weight.size(0);
  checks::per_channel(kOp, dw_bias, input, C, "dw_bias", "input");
  checks::per_channel(kOp, dw_scale, input, C, "dw_scale", "input");
  checks::per_channel(kOp, pw_bias, input, K, "pw_bias", "output");
  checks::per_channel(kOp, pw_scale, input, K, "pw_scale", "output");

  SeparablePlan a;
  a.input = input;
  a.dw_weight = dw_weight;
  a.pw_weight = pw_weight;
  a.dw_bias = given(dw_bias) ? *dw_bias : at::Tensor();
  a.dw_scale = given(dw_scale) ? *dw_scale : at::Tensor();
  a.pw_bias = given(pw_bias) ? *pw_bias : at::Tensor();
  a.pw_scale = given(pw_scale) ? *pw_scale : at::Tensor();
  Problem& p = a.problem;
  p.N = input.size(0);
  p.C = C;
  p.H = input.size(2);
  p.W = input.size(3);
  p.K = K;
  p.R = dw_weight.size(2);
  p.S = dw_weight.size(3);
  // The output extent is the depthwise conv's (the pointwise conv keeps it); its bytes count K channels.
  const std::array<int64_t, 2> PQ = checks::output_extent(kOp, input, K, p.R, p.S, stride, padding, dilation);
  p.P = PQ[0];
  p.Q = PQ[1];
  p.stride_h = stride[0];
  p.stride_w = stride[1];
  p.pad_h = padding[0];
  p.pad_w = padding[1];
  p.dilation_h = dilation[0];
  p.dilation_w = dilation[1];
  p.dw_relu = dw_relu;
  p.pw_relu = pw_relu;
  a.memory_format = checks::output_format(input);
  return a;
}

at::Tensor SeparablePlan::new_output() const {
  return checks::new_output(input, {problem.N, problem.K, problem.P, problem.Q}, memory_format);
}

std::string SeparablePlan::json(const char* device, const std::string& path, const std::string& reason,
                                const std::string& extra) const {
  std::ostringstream s;
  s << "{\"device\": \"" << device << "\", \"path\": \"" << path << "\", \"reason\": \"" << reason << "\""
    << extra << "}";
  return s.str();
}

}  // namespace separable_conv
}  // namespace deeplab_fast
