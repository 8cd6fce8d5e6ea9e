// The checked call of deeplab_fast::atrous_conv2d, shared by the CPU and CUDA registrations (see atrous_conv_args.h).
#include "atrous_conv_args.h"

#include <iomanip>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

#include <c10/util/safe_numerics.h>

#include "common/env.h"

namespace deeplab_fast {
namespace atrous_conv {

namespace {

// stride, dilation in [1, kMaxParam] and padding in [0, kMaxParam]: 32-bit values, as the CUDA kernels take them.
constexpr int64_t kMaxParam = std::numeric_limits<int32_t>::max();
// The padded input extent (H + 2 pad, W + 2 pad) is at most 2^62, so that the output-size and tap-band
// arithmetic (tap_regions.h), which stays below extent + stride, never overflows int64.
constexpr int64_t kMaxExtent = int64_t{1} << 62;

void check_pair(at::IntArrayRef v, const char* name, int64_t min, const char* note) {
  TORCH_CHECK_VALUE(v.size() == 2, "atrous_conv2d: ", name, " must have 2 values (height, width), got ", v.size());
  TORCH_CHECK_VALUE(v[0] >= min && v[0] <= kMaxParam && v[1] >= min && v[1] <= kMaxParam, "atrous_conv2d: ", name,
                    " must be >= ", min, " and <= ", kMaxParam, note, ", got ", v);
}

void check_same_device(const c10::optional<at::Tensor>& t, const at::Tensor& input, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK_VALUE(t->device() == input.device(), "atrous_conv2d: ", name, " is on ", t->device(),
                    " but the input is on ", input.device());
}

void check_vector(const c10::optional<at::Tensor>& t, const at::Tensor& input, int64_t K, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == K, "atrous_conv2d: ", name,
                    " must be a 1-D tensor of one value per output channel ([", K, "]), got shape ", t->sizes());
  TORCH_CHECK_VALUE(t->scalar_type() == input.scalar_type(), "atrous_conv2d: ", name, " must have the input's dtype (",
                    input.scalar_type(), "), got ", t->scalar_type());
}

// (taps - 1) * dilation + 1, the dilated filter's extent, as text ("> 2^63 - 1" where it overflows int64).
std::string dilated_extent(int64_t taps, int64_t dilation) {
  int64_t span = 0;
  if (c10::mul_overflows(taps - 1, dilation, &span) || c10::add_overflows(span, int64_t{1}, &span)) {
    return "more than 2^63 - 1";
  }
  return std::to_string(span);
}

// One axis's output size; the padded extent in + 2 pad is checked against kMaxExtent first (pad <= 2^31 - 1).
int64_t output_size(int64_t in, int64_t taps, int64_t stride, int64_t pad, int64_t dilation, const char* axis,
                    at::IntArrayRef padding) {
  TORCH_CHECK_VALUE(in <= kMaxExtent - 2 * pad, "atrous_conv2d: the padded input ", axis, " (input ", axis, " ", in,
                    " + 2 x padding ", pad, ") exceeds 2^62; lower the padding ", padding);
  return conv_output_size(in, taps, stride, pad, dilation);
}

}  // namespace

ConvPlan check_args(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& scale, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, bool relu) {
  TORCH_CHECK_VALUE(input.defined() && weight.defined(), "atrous_conv2d: input and weight must be defined tensors");
  // Devices first, so that a meta (or misplaced) tensor in any position is refused before anything reads it.
  TORCH_CHECK_VALUE(input.device().is_cpu() || input.device().is_cuda(),
                    "atrous_conv2d: input must be a CPU or CUDA tensor, got ", input.device());
  TORCH_CHECK_VALUE(weight.device() == input.device(), "atrous_conv2d: weight is on ", weight.device(),
                    " but the input is on ", input.device());
  check_same_device(bias, input, "bias");
  check_same_device(scale, input, "scale");
  TORCH_CHECK_VALUE(input.dim() == 4, "atrous_conv2d: input must be 4-D [N, C, H, W], got ", input.dim(),
                    "-D with shape ", input.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4, "atrous_conv2d: weight must be 4-D [K, C, R, S], got ", weight.dim(),
                    "-D with shape ", weight.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "atrous_conv2d: input must be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(weight.scalar_type() == dtype, "atrous_conv2d: weight must have the input's dtype (", dtype,
                    "), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(input.size(0) > 0, "atrous_conv2d: input has an empty batch (N = 0)");
  TORCH_CHECK_VALUE(input.size(1) > 0 && input.size(2) > 0 && input.size(3) > 0,
                    "atrous_conv2d: input must have C, H, W > 0, got shape ", input.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0 && weight.size(2) > 0 && weight.size(3) > 0,
                    "atrous_conv2d: weight must have K, R, S > 0, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == input.size(1), "atrous_conv2d: weight has ", weight.size(1),
                    " input channels (dim 1) but the input has ", input.size(1), " (only groups = 1 is supported)");
  check_pair(stride, "stride", 1, "");
  check_pair(padding, "padding", 0, "");
  check_pair(dilation, "dilation", 1, " (the atrous rate)");
  const int64_t K = weight.size(0);
  check_vector(bias, input, K, "bias");
  check_vector(scale, input, K, "scale");

  ConvPlan a;
  a.input = input;
  a.weight = weight;
  a.bias = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  a.scale = scale.has_value() && scale->defined() ? *scale : at::Tensor();
  a.N = input.size(0);
  a.C = input.size(1);
  a.H = input.size(2);
  a.W = input.size(3);
  a.K = K;
  a.R = weight.size(2);
  a.S = weight.size(3);
  a.stride = {stride[0], stride[1]};
  a.padding = {padding[0], padding[1]};
  a.dilation = {dilation[0], dilation[1]};
  a.P = output_size(a.H, a.R, stride[0], padding[0], dilation[0], "height", padding);
  a.Q = output_size(a.W, a.S, stride[1], padding[1], dilation[1], "width", padding);
  TORCH_CHECK_VALUE(a.P > 0 && a.Q > 0, "atrous_conv2d: the output would be empty: input ", a.H, "x", a.W,
                    " with a ", a.R, "x", a.S, " filter, padding ", padding, " and dilation ", dilation,
                    " (the dilated filter spans ", dilated_extent(a.R, dilation[0]), "x",
                    dilated_extent(a.S, dilation[1]), "); pad the input or lower the dilation");
  int64_t bytes = a.N;
  const bool too_big = c10::mul_overflows(bytes, a.K, &bytes) || c10::mul_overflows(bytes, a.P, &bytes) ||
                       c10::mul_overflows(bytes, a.Q, &bytes) ||
                       c10::mul_overflows(bytes, static_cast<int64_t>(input.element_size()), &bytes);
  TORCH_CHECK_VALUE(!too_big, "atrous_conv2d: the output [N, K, P, Q] = [", a.N, ", ", a.K, ", ", a.P, ", ", a.Q,
                    "] would take more than 2^63 - 1 bytes; lower the padding ", padding, " or raise the stride ",
                    stride);
  a.relu = relu;
  a.memory_format = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast
                        ? at::MemoryFormat::ChannelsLast
                        : at::MemoryFormat::Contiguous;
  a.regions = tap_regions(a.H, a.W, a.R, a.S, a.stride[0], a.stride[1], a.padding[0], a.padding[1], a.dilation[0],
                          a.dilation[1]);
  // Multiply-accumulates with and without skipping, in double: P Q R S can pass 2^63 (tap_work's int64) when
  // the padding is large, and the fraction needs no more than double's precision.
  double with = 0, without = 0;
  for (const TapRegion& g : a.regions) {
    const double pixels = static_cast<double>(g.rows()) * static_cast<double>(g.cols());
    with += g.empty_taps() ? 0.0
                          : pixels * static_cast<double>(g.r_end - g.r_begin) *
                                static_cast<double>(g.s_end - g.s_begin);
    without += pixels * static_cast<double>(a.R) * static_cast<double>(a.S);
  }
  a.kept_fraction = without > 0 ? with / without : 1.0;
  return a;
}

at::Tensor ConvPlan::new_output() const {
  at::Tensor out = at::empty({N, K, P, Q}, input.options().memory_format(memory_format));
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

bool ConvPlan::tap_skipping(bool device_default) const {
  env::Mode mode = env::Mode::kAuto;
  try {
    mode = env::tap_skipping();
  } catch (const std::invalid_argument& e) {  // a bad value: as deeplab_fast._env.check() at import
    TORCH_CHECK_VALUE(false, e.what());
  }
  switch (mode) {
    case env::Mode::kOff: return false;
    case env::Mode::kOn: return kept_fraction < 1.0;
    default: return device_default;
  }
}

at::Tensor ConvPlan::region_of(const at::Tensor& out, const TapRegion& g) const {
  return out.narrow(2, g.p_begin, g.rows()).narrow(3, g.q_begin, g.cols());
}

std::string ConvPlan::json(const char* device, const std::string& path, const std::string& reason,
                           bool tap_skipping, const std::string& extra) const {
  std::ostringstream s;
  s << "{\"device\": \"" << device << "\", \"path\": \"" << path << "\", \"reason\": \"" << reason
    << "\", \"tap_skipping\": " << (tap_skipping ? "true" : "false") << ", \"kept_fraction\": "
    << std::setprecision(17) << kept_fraction << ", " << extra << "\"regions\": [";
  for (size_t i = 0; i < regions.size(); ++i) {
    const TapRegion& g = regions[i];
    s << (i ? ", " : "") << "{\"rows\": [" << g.p_begin << ", " << g.p_end << "], \"cols\": [" << g.q_begin
      << ", " << g.q_end << "], \"tap_rows\": [" << g.r_begin << ", " << g.r_end << "], \"tap_cols\": ["
      << g.s_begin << ", " << g.s_end << "]}";
  }
  s << "]}";
  return s.str();
}

}  // namespace atrous_conv
}  // namespace deeplab_fast
