// Torch glue of the CUDA separable convolution: TORCH_LIBRARY_IMPL(deeplab_fast, CUDA) for separable_conv2d and
// its plan query. The call's plan (../separable_conv_args.h, as on the CPU) carries the checks and the output;
// here the scales are folded into the filters (in the accumulation type), the pointwise filter is transposed to
// [C, K], and raw pointers go to the torch-free launcher (separable_conv_cuda.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "../separable_conv_args.h"
#include "separable_conv_cuda.h"

namespace deeplab_fast {
namespace separable_conv {
namespace cuda {

namespace {

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "separable_conv2d: unreachable dtype ", t);
  }
}

at::Tensor separable_conv2d_cuda(const at::Tensor& input, const at::Tensor& dw_weight,
                                 const c10::optional<at::Tensor>& dw_bias, const c10::optional<at::Tensor>& dw_scale,
                                 const at::Tensor& pw_weight, const c10::optional<at::Tensor>& pw_bias,
                                 const c10::optional<at::Tensor>& pw_scale, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool dw_relu, bool pw_relu) {
  const SeparablePlan plan = check_args(input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias, pw_scale, stride,
                                        padding, dilation, dw_relu, pw_relu);
  c10::cuda::CUDAGuard device_guard(input.device());
  const Problem& pb = plan.problem;
  const at::ScalarType acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor wd = plan.dw_weight.to(acc).reshape({pb.C, pb.R * pb.S});
  if (plan.dw_scale.defined()) wd = wd * plan.dw_scale.to(acc).view({pb.C, 1});
  wd = wd.contiguous();
  at::Tensor wp = plan.pw_weight.to(acc).reshape({pb.K, pb.C});
  if (plan.pw_scale.defined()) wp = wp * plan.pw_scale.to(acc).view({pb.K, 1});
  wp = wp.t().contiguous();
  const at::Tensor bd = plan.dw_bias.defined() ? plan.dw_bias.to(acc).contiguous() : at::Tensor();
  const at::Tensor bp = plan.pw_bias.defined() ? plan.pw_bias.to(acc).contiguous() : at::Tensor();
  at::Tensor out = plan.new_output();

  SeparableParams p;
  p.dtype = dtype_of(input.scalar_type());
  p.problem = pb;
  p.input = input.data_ptr();
  p.dw_weight = wd.data_ptr();
  p.dw_bias = bd.defined() ? bd.data_ptr() : nullptr;
  p.pw_weight = wp.data_ptr();
  p.pw_bias = bp.defined() ? bp.data_ptr() : nullptr;
  p.output = out.data_ptr();
  for (int d = 0; d < 4; ++d) {
    p.in_stride[d] = input.stride(d);
    p.out_stride[d] = out.stride(d);
  }
  p.stream = c10::cuda::getCurrentCUDAStream().stream();
  const std::string error = run(p);
  TORCH_CHECK(error.empty(), error);
  return out;
}

std::string separable_conv2d_plan_cuda(const at::Tensor& input, const at::Tensor& dw_weight,
                                       const c10::optional<at::Tensor>& dw_bias,
                                       const c10::optional<at::Tensor>& dw_scale, const at::Tensor& pw_weight,
                                       const c10::optional<at::Tensor>& pw_bias,
                                       const c10::optional<at::Tensor>& pw_scale, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation, bool dw_relu,
                                       bool pw_relu) {
  const SeparablePlan plan = check_args(input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias, pw_scale, stride,
                                        padding, dilation, dw_relu, pw_relu);
  return plan.json("cuda", "fused",
                   "one kernel: the depthwise result of each tile of pixels in shared memory feeds its pointwise "
                   "products",
                   ", \"tile_pixels\": " + std::to_string(kTilePixels));
}

}  // namespace

}  // namespace cuda
}  // namespace separable_conv
}  // namespace deeplab_fast

TORCH_LIBRARY_IMPL(deeplab_fast, CUDA, m) {
  m.impl("separable_conv2d", &deeplab_fast::separable_conv::cuda::separable_conv2d_cuda);
  m.impl("separable_conv2d_plan", &deeplab_fast::separable_conv::cuda::separable_conv2d_plan_cuda);
}
