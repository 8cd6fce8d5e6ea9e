// Torch glue of the CUDA atrous convolution: TORCH_LIBRARY_IMPL(deeplab_fast, CUDA) for atrous_conv2d and its
// plan query. The call's plan (../atrous_conv_args.h, as on the CPU) carries the checks, the tap regions, the
// tap-skipping decision and the output; here the path is picked (CUTLASS or the ATen fallback), a scale is folded
// into the filter, and raw pointers go to the torch-free launcher (atrous_conv_cuda.h).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "../atrous_conv_args.h"
#include "atrous_conv_cuda.h"

namespace deeplab_fast {
namespace atrous_conv {
namespace cuda {

namespace {

// Tap skipping is used when it removes at least 5% of the multiply-accumulates: below that the regions' thin
// border bands waste more of their tiles than the skipped taps save (the threshold's status: DEVELOPERS.md).
constexpr double kMaxKeptFraction = 0.95;

constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

// The CUDA path of a call: CUTLASS (its dtype, tile and tap skipping) or the ATen fallback, and why.
struct Decision {
  bool cutlass = false;
  std::string reason;  // why the path (the fallback's cause, or the CUTLASS configuration)
  DType dtype = DType::kBFloat16;
  bool tap_skipping = false;
  Tile tile = Tile::kLarge;
};

// The current device's SM count and compute capability (major), cached per device ordinal.
struct DeviceInfo {
  int sms = 0;
  int major = 0;
  int minor = 0;
};

DeviceInfo device_info() {
  static DeviceInfo cached[64];
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 64 && cached[device].sms > 0) return cached[device];
  DeviceInfo info;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, device));
  if (device < 64) cached[device] = info;
  return info;
}

// Whether float32 convolutions may use TF32 (torch.backends.cudnn.allow_tf32, or, on torch with the per-op
// precision API, torch.backends.cudnn.conv.fp32_precision), as cuDNN's convolutions decide it.
bool allow_tf32_conv() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
#else
  return at::globalContext().allowTF32CuDNN();
#endif
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Channels contiguous, n/h/w strides multiples of kAlignment and within int32 (a dimension of size 1 is never
// stepped over, so its stride does not matter).
bool nhwc_strides_ok(const at::Tensor& t) {
  if (t.stride(1) != 1) return false;
  for (int d : {0, 2, 3}) {
    if (t.size(d) > 1 && (t.stride(d) % kAlignment != 0 || t.stride(d) > kMaxInt32)) return false;
  }
  return true;
}

Decision decide(const ConvPlan& a) {
  const at::Tensor& input = a.input;
  const at::Tensor& weight = a.weight;
  Decision d;
  const auto fallback = [&](std::string why) {
    d.cutlass = false;
    d.reason = "ATen convolution (cuDNN) + epilogue: " + why;
    return d;
  };
  switch (input.scalar_type()) {
    case at::kBFloat16: d.dtype = DType::kBFloat16; break;
    case at::kHalf: d.dtype = DType::kFloat16; break;
    case at::kFloat:
      if (!allow_tf32_conv()) {
        return fallback("float32 with torch.backends.cudnn.allow_tf32 = False takes ATen's float32 path");
      }
      d.dtype = DType::kTFloat32;
      break;
    default: return fallback("float64 has no tensor-core path");
  }
  const DeviceInfo device = device_info();
  if (device.major < 8) {
    return fallback("compute capability " + std::to_string(device.major) + "." + std::to_string(device.minor) +
                    " < 8.0 (the kernels are built for sm_80 and sm_90)");
  }
  if (a.C % kAlignment != 0 || a.K % kAlignment != 0) {
    return fallback("C = " + std::to_string(a.C) + " and K = " + std::to_string(a.K) + " must be multiples of " +
                    std::to_string(kAlignment));
  }
  if (a.memory_format != at::MemoryFormat::ChannelsLast || !nhwc_strides_ok(input) || !aligned16(input.data_ptr())) {
    return fallback("the input is not channels_last (channels contiguous, 16-byte aligned)");
  }
  const int64_t out_numel = a.N * a.K * a.P * a.Q;
  if (input.storage().nbytes() > kMaxInt32 || out_numel * input.element_size() > kMaxInt32 ||
      weight.numel() * weight.element_size() > kMaxInt32) {
    return fallback("a tensor over 2 GiB (CUTLASS's 32-bit indexing)");
  }
  // CUTLASS computes input coordinates p * stride - pad + r * dilation in int: keep them (<= H + 2 pad) in range.
  if (a.padding[0] > kMaxInt32 / 4 || a.padding[1] > kMaxInt32 / 4 || a.H + 2 * a.padding[0] > kMaxInt32 ||
      a.W + 2 * a.padding[1] > kMaxInt32 || a.stride[0] > kMaxInt32 || a.stride[1] > kMaxInt32 ||
      a.dilation[0] > kMaxInt32 || a.dilation[1] > kMaxInt32) {
    return fallback("stride / padding / dilation beyond CUTLASS's 32-bit index arithmetic");
  }
  if (a.K > int64_t(65535) * tile_n(Tile::kSmall)) {
    return fallback("K = " + std::to_string(a.K) + " needs more than 65535 threadblock columns");
  }
  d.cutlass = true;
  d.tap_skipping = a.tap_skipping(a.kept_fraction <= kMaxKeptFraction);
  // Tile: the large one when it alone gives every SM a threadblock, else the small one (more CTAs).
  ConvParams probe;
  probe.N = int(a.N);
  probe.K = int(a.K);
  probe.P = int(a.P);
  probe.Q = int(a.Q);
  probe.tap_skipping = d.tap_skipping;
  for (const TapRegion& g : a.regions) {
    if (!g.empty_taps()) probe.regions.push_back(g);
  }
  d.tile = tile_count(probe, Tile::kLarge) >= device.sms ? Tile::kLarge : Tile::kSmall;
  d.reason = std::string("CUTLASS implicit GEMM, tile ") + tile_shape(d.dtype, d.tile) +
             (d.tap_skipping ? ", one region per set of in-bounds taps" : ", all taps");
  return d;
}

// The epilogue of the ATen paths: relu?(conv * scale + bias) in float (double for float64), rounded once into
// `out`, as the CPU path and the CUTLASS epilogue do.
void aten_epilogue(const at::Tensor& conv, const at::Tensor& out, const at::Tensor& scale, const at::Tensor& bias,
                   bool relu) {
  const at::ScalarType compute = out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = conv.to(compute);
  if (scale.defined()) y = y * scale.to(compute).view({1, -1, 1, 1});
  if (bias.defined()) y = y + bias.to(compute).view({1, -1, 1, 1});
  if (relu) y = at::relu(y);
  out.copy_(y.expand_as(out));
}

at::Tensor atrous_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              bool relu) {
  const ConvPlan a = check_args(input, weight, bias, scale, stride, padding, dilation, relu);
  c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor& b = a.bias;
  const at::Tensor& s = a.scale;
  const Decision d = decide(a);
  at::Tensor out = a.new_output();

  if (!d.cutlass) {
    const at::Tensor conv = at::convolution(input, weight, c10::nullopt, stride, padding, dilation, false, {0, 0}, 1);
    aten_epilogue(conv, out, s, b, relu);
    return out;
  }
  // The filter as KRSC (a channels_last [K, C, R, S]), with the scale folded in: one pass when either applies.
  at::Tensor filter = s.defined() ? weight * s.view({-1, 1, 1, 1}) : weight;
  filter = filter.contiguous(at::MemoryFormat::ChannelsLast);
  if (!aligned16(filter.data_ptr())) filter = filter.clone(at::MemoryFormat::ChannelsLast);
  at::Tensor bias_vec = b.defined() ? b.contiguous() : at::Tensor();
  if (bias_vec.defined() && !aligned16(bias_vec.data_ptr())) bias_vec = bias_vec.clone();

  ConvParams p;
  p.dtype = d.dtype;
  p.tile = d.tile;
  p.input = input.data_ptr();
  p.in_stride_n = input.stride(0);
  p.in_stride_h = input.stride(2);
  p.in_stride_w = input.stride(3);
  p.filter = filter.data_ptr();
  p.bias = bias_vec.defined() ? bias_vec.data_ptr() : nullptr;
  p.output = out.data_ptr();
  p.out_stride_n = out.stride(0);
  p.out_stride_h = out.stride(2);
  p.out_stride_w = out.stride(3);
  p.N = int(a.N);
  p.H = int(a.H);
  p.W = int(a.W);
  p.C = int(a.C);
  p.K = int(a.K);
  p.R = int(a.R);
  p.S = int(a.S);
  p.P = int(a.P);
  p.Q = int(a.Q);
  p.stride_h = int(a.stride[0]);
  p.stride_w = int(a.stride[1]);
  p.pad_h = int(a.padding[0]);
  p.pad_w = int(a.padding[1]);
  p.dilation_h = int(a.dilation[0]);
  p.dilation_w = int(a.dilation[1]);
  p.relu = relu;
  p.tap_skipping = d.tap_skipping;
  p.stream = c10::cuda::getCurrentCUDAStream().stream();
  if (d.tap_skipping) {
    at::Tensor fill;  // relu?(bias) (or 0) per channel: the output where every tap reads padding
    for (const TapRegion& g : a.regions) {
      if (!g.empty_taps()) {
        p.regions.push_back(g);
        continue;
      }
      if (!fill.defined()) {
        fill = at::empty({1, a.K, 1, 1}, out.options());
        aten_epilogue(at::zeros({1, 1, 1, 1}, input.options()), fill, at::Tensor(), b, relu);
      }
      at::Tensor region = a.region_of(out, g);
      region.copy_(fill.expand_as(region));
    }
  }
  const std::string error = run(p);
  TORCH_CHECK(error.empty(), "atrous_conv2d (CUDA): ", error);
  return out;
}

std::string atrous_conv2d_plan_cuda(const at::Tensor& input, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    bool relu) {
  const ConvPlan a = check_args(input, weight, bias, scale, stride, padding, dilation, relu);
  c10::cuda::CUDAGuard device_guard(input.device());
  const Decision d = decide(a);
  const std::string tile = d.cutlass ? std::string("\"") + tile_shape(d.dtype, d.tile) + "\"" : "null";
  return a.json("cuda", d.cutlass ? "cutlass" : "aten", d.reason, d.tap_skipping,
                "\"tile\": " + tile + ", \"split_k\": 1, ");
}

}  // namespace

}  // namespace cuda
}  // namespace atrous_conv
}  // namespace deeplab_fast

TORCH_LIBRARY_IMPL(deeplab_fast, CUDA, m) {
  m.impl("atrous_conv2d", &deeplab_fast::atrous_conv::cuda::atrous_conv2d_cuda);
  m.impl("atrous_conv2d_plan", &deeplab_fast::atrous_conv::cuda::atrous_conv2d_plan_cuda);
}
