// The CPU kernel of deeplab_fast::separable_conv2d and its plan query, and their registration (schemas:
// ../separable_conv_ops.cpp). The call's plan (../separable_conv_args.h) carries the checks and the output.
//
// The depthwise pass is ours (depthwise.cpp: in-bounds taps only, dw_scale folded into the filter, dw_bias and
// ReLU applied as it writes); the pointwise conv is a GEMM (ATen's addmm: MKL for float32 / float64, oneDNN for
// bfloat16) with pw_scale folded into its weight, pw_bias as the GEMM's addend and ReLU in place. The output
// pixels go in tiles (parallel over images x tiles); each tile's depthwise rows go to a per-thread buffer that the
// tile's GEMM reads at once, so the intermediate [N, C, P, Q] tensor never exists. (The other design, the
// depthwise pass over the whole batch into one intermediate tensor and then one GEMM, measured as fast on the
// ASPP layers at 33x33 and 10-30% slower on the decoder layers at 129x129: DEVELOPERS.md.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../../atrous_conv/tap_regions.h"
#include "../separable_conv_args.h"
#include "depthwise.h"

namespace deeplab_fast {
namespace separable_conv {
namespace cpu {

namespace {

// Bytes of the per-thread tile buffer (the depthwise result of tile_pixels pixels x C channels): it stays in L2
// between the depthwise pass that writes it and the GEMM that reads it. Measured on the 2-core EPYC (float32, one
// thread, channels_last; DEVELOPERS.md): 512 KiB was within 5% of the best of 64 KiB .. 2 MiB on the v3+ layers
// (ASPP 2048 -> 256 at 33x33: 22.8 ms at 64 KiB, 17.4 at 512 KiB, 17.3 at 2 MiB; decoder 304 -> 256 at
// 129x129: 37.9, 35.1, 43.2).
constexpr int64_t kTileBytes = int64_t{512} << 10;

constexpr int64_t kMinParallelMacs = int64_t{1} << 22;

// Output pixels per tile: a multiple of 16, at least 16.
int64_t tile_pixels(const Problem& p, int64_t element_size) {
  return std::max<int64_t>(16, kTileBytes / (p.C * element_size) / 16 * 16);
}

// The in-bounds tap interval of every output index along one axis, as [begin, end) pairs.
std::vector<int64_t> tap_table(int64_t in, int64_t out, int64_t taps, int64_t stride, int64_t pad, int64_t dilation) {
  std::vector<int64_t> t(2 * out);
  for (int64_t o = 0; o < out; ++o) {
    atrous_conv::detail::valid_taps(o, in, taps, stride, pad, dilation, &t[2 * o], &t[2 * o + 1]);
  }
  return t;
}

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
void run(const SeparablePlan& plan, const at::Tensor& out) {
  using Acc = acc_t<T>;
  const Problem& p = plan.problem;
  const at::ScalarType acc_type = std::is_same_v<Acc, double> ? at::kDouble : at::kFloat;
  // Channels contiguous (the depthwise pass's layout).
  at::Tensor x = plan.input;
  if (x.stride(1) != 1 && p.C > 1) x = x.contiguous(at::MemoryFormat::ChannelsLast);
  // The depthwise filter as [R*S, C] with dw_scale folded in, in the accumulation type.
  at::Tensor wd = plan.dw_weight.to(acc_type).reshape({p.C, p.R * p.S});
  if (plan.dw_scale.defined()) wd = wd * plan.dw_scale.to(acc_type).view({p.C, 1});
  wd = wd.t().contiguous();
  const at::Tensor bd = plan.dw_bias.defined() ? plan.dw_bias.to(acc_type).contiguous() : at::Tensor();
  // The pointwise filter [K, C] with pw_scale folded in (in the accumulation type, then rounded once).
  // Detached: the GEMMs write into views of the output (out= calls, which refuse tensors that require grad; the
  // op's autograd formula is its own, deeplab_fast/ops/separable_conv.py).
  at::Tensor wp = plan.pw_weight.detach().reshape({p.K, p.C});
  if (plan.pw_scale.defined()) {
    wp = (wp.to(acc_type) * plan.pw_scale.to(acc_type).view({p.K, 1})).to(plan.input.scalar_type());
  }
  const at::Tensor bp = plan.pw_bias.defined() ? plan.pw_bias.detach() : at::Tensor();  // [K] or undefined
  const std::vector<int64_t> rows = tap_table(p.H, p.P, p.R, p.stride_h, p.pad_h, p.dilation_h);
  const std::vector<int64_t> cols = tap_table(p.W, p.Q, p.S, p.stride_w, p.pad_w, p.dilation_w);

  Depthwise<T, Acc> dw;
  dw.problem = &p;
  dw.input = x.data_ptr<T>();
  dw.in_stride_n = x.stride(0);
  dw.in_stride_h = x.stride(2);
  dw.in_stride_w = x.stride(3);
  dw.weight = wd.data_ptr<Acc>();
  dw.bias = bd.defined() ? bd.data_ptr<Acc>() : nullptr;
  dw.row_taps = rows.data();
  dw.col_taps = cols.data();

  const bool channels_last = plan.memory_format == at::MemoryFormat::ChannelsLast;
  const int64_t PQ = p.P * p.Q;
  // out_rows(n, m0, len): the output pixels [m0, m0 + len) of image n as a matrix: [len, K] (channels_last) or
  // [K, len] (contiguous), a view of out.
  const auto out_rows = [&](int64_t n, int64_t m0, int64_t len) {
    return channels_last ? out[n].permute({1, 2, 0}).reshape({PQ, p.K}).narrow(0, m0, len)
                         : out[n].view({p.K, PQ}).narrow(1, m0, len);
  };
  // out_view = relu?(y1 @ wp^T + bp) with y1 [len, C] (rows: pixels).
  const auto pointwise = [&](const at::Tensor& y1, at::Tensor out_view) {
    if (channels_last) {
      if (bp.defined()) {
        at::addmm_out(out_view, bp, y1, wp.t());
      } else {
        at::mm_out(out_view, y1, wp.t());
      }
    } else {
      if (bp.defined()) {
        at::addmm_out(out_view, bp.view({p.K, 1}), wp, y1.t());
      } else {
        at::mm_out(out_view, wp, y1.t());
      }
    }
    if (p.pw_relu) out_view.relu_();
  };

  const int64_t T_ = tile_pixels(p, plan.input.element_size());
  const int64_t tiles_per_image = (PQ + T_ - 1) / T_;
  // At least kMinParallelMacs multiply-accumulates per parallel chunk, so that a small call does not open an OpenMP
  // region (fork, spinning barrier) for microseconds of work; it then runs inline, its GEMM threaded by ATen.
  const int64_t tile_macs = T_ * p.C * (p.K + p.R * p.S);
  const int64_t grain = std::max<int64_t>(1, kMinParallelMacs / std::max<int64_t>(1, tile_macs));
  at::parallel_for(0, p.N * tiles_per_image, grain, [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({T_, p.C}, plan.input.options().memory_format(at::MemoryFormat::Contiguous));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / tiles_per_image, m0 = (i % tiles_per_image) * T_;
      const int64_t len = std::min(T_, PQ - m0);
      depthwise_pixels(dw, n, m0, m0 + len, buffer.data_ptr<T>(), p.C);
      pointwise(buffer.narrow(0, 0, len), out_rows(n, m0, len));
    }
  });
}

at::Tensor separable_conv2d(const at::Tensor& input, const at::Tensor& dw_weight,
                            const c10::optional<at::Tensor>& dw_bias, const c10::optional<at::Tensor>& dw_scale,
                            const at::Tensor& pw_weight, const c10::optional<at::Tensor>& pw_bias,
                            const c10::optional<at::Tensor>& pw_scale, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, bool dw_relu, bool pw_relu) {
  const SeparablePlan plan = check_args(input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias, pw_scale, stride,
                                        padding, dilation, dw_relu, pw_relu);
  at::Tensor out = plan.new_output();
  switch (input.scalar_type()) {
    case at::kFloat: run<float>(plan, out); break;
    case at::kDouble: run<double>(plan, out); break;
    case at::kBFloat16: run<c10::BFloat16>(plan, out); break;
    case at::kHalf: run<c10::Half>(plan, out); break;
    default: TORCH_CHECK(false, "separable_conv2d: unreachable dtype ", input.scalar_type());
  }
  return out;
}

std::string separable_conv2d_plan(const at::Tensor& input, const at::Tensor& dw_weight,
                                  const c10::optional<at::Tensor>& dw_bias, const c10::optional<at::Tensor>& dw_scale,
                                  const at::Tensor& pw_weight, const c10::optional<at::Tensor>& pw_bias,
                                  const c10::optional<at::Tensor>& pw_scale, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, bool dw_relu, bool pw_relu) {
  const SeparablePlan plan = check_args(input, dw_weight, dw_bias, dw_scale, pw_weight, pw_bias, pw_scale, stride,
                                        padding, dilation, dw_relu, pw_relu);
  return plan.json("cpu", "tiles", "the depthwise result of each tile of pixels stays in cache for its GEMM",
                   ", \"tile_pixels\": " + std::to_string(tile_pixels(plan.problem, input.element_size())));
}

}  // namespace

TORCH_LIBRARY_IMPL(deeplab_fast, CPU, m) {
  m.impl("separable_conv2d", &separable_conv2d);
  m.impl("separable_conv2d_plan", &separable_conv2d_plan);
}

}  // namespace cpu
}  // namespace separable_conv
}  // namespace deeplab_fast
