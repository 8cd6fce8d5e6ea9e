// The fused depthwise-separable atrous convolution on the GPU, as the torch glue (separable_conv_cuda_ops.cpp)
// sees it: raw device pointers, strides in elements, the problem (../separable_conv.h) and a stream. No torch
// headers here or in the kernel (separable_conv.cu).
//
// One kernel (separable_conv.cu): a threadblock owns kTilePixels output pixels x kTileChannels output channels.
// For each chunk of kChunk input channels it computes the depthwise result of its pixels into shared memory
// (in-bounds taps only, dw_bias and ReLU applied, rounded to the tensors' dtype as the CPU kernel and the unfused
// layers round it), loads the chunk of the pointwise filter, and accumulates the pointwise products; the epilogue
// adds pw_bias, applies ReLU and writes through the output's strides. The depthwise result never leaves the chip;
// it is recomputed once per block of output channels (ceil(K / kTileChannels) times: R*S / kTileChannels of the
// pointwise work for a 3x3 filter and K = 256).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../separable_conv.h"

namespace deeplab_fast {
namespace separable_conv {
namespace cuda {

enum class DType { kFloat32, kFloat64, kBFloat16, kFloat16 };

constexpr int kTilePixels = 32;    // output pixels per threadblock
constexpr int kTileChannels = 64;  // output channels per threadblock
constexpr int kChunk = 32;         // input channels per shared-memory stage
constexpr int kThreads = 256;

struct SeparableParams {
  DType dtype = DType::kFloat32;
  Problem problem;
  // x[n, c, h, w] at input + n*in_stride[0] + c*in_stride[1] + h*in_stride[2] + w*in_stride[3] (any strides).
  const void* input = nullptr;
  int64_t in_stride[4] = {0, 0, 0, 0};
  // The filters and biases in the accumulation type (double for float64, float otherwise), scales folded in:
  const void* dw_weight = nullptr;  // [C, R*S] contiguous: dw_weight[c, r, s] * dw_scale[c]
  const void* dw_bias = nullptr;    // [C], or nullptr
  const void* pw_weight = nullptr;  // [C, K] contiguous (transposed): pw_weight[k, c] * pw_scale[k] at c*K + k
  const void* pw_bias = nullptr;    // [K], or nullptr
  // y[n, k, p, q] at output + n*out_stride[0] + k*out_stride[1] + p*out_stride[2] + q*out_stride[3].
  void* output = nullptr;
  int64_t out_stride[4] = {0, 0, 0, 0};
  cudaStream_t stream = nullptr;
};

// Queues the kernel on p.stream. Returns an empty string on success, else the CUDA error, which the glue raises.
std::string run(const SeparableParams& p);

}  // namespace cuda
}  // namespace separable_conv
}  // namespace deeplab_fast
