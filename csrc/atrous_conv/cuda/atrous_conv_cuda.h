// The fused atrous convolution on the GPU, as the torch glue (atrous_conv_cuda_ops.cpp) sees it: raw device
// pointers, strides in elements, the tap regions and a stream. No torch headers here or in the kernels (*.cu).
//
// Layouts: activations NHWC (channels_last: channels contiguous, any n/h/w strides), the filter KRSC
// contiguous (a channels_last [K, C, R, S] weight), the output NHWC. Each region (tap_regions.h) runs as an
// unpadded implicit-GEMM convolution of its input window with its sub-filter (GEMM K = C x valid taps), all
// regions of a call in one launch (blockIdx.z = region). Epilogue: y = relu?(acc + bias), fused; a per-channel
// scale is folded into the filter by the glue.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../tap_regions.h"

namespace deeplab_fast {
namespace atrous_conv {
namespace cuda {

enum class DType { kBFloat16, kFloat16, kTFloat32 };  // kTFloat32: float32 in and out, TF32 tensor cores
enum class Tile { kLarge, kSmall };                   // threadblock tiles, see tile_shape()

// Channel counts C and K must be multiples of this, and every pointer 16-byte aligned.
constexpr int kAlignment = 8;

struct ConvParams {
  DType dtype = DType::kBFloat16;
  Tile tile = Tile::kLarge;
  const void* input = nullptr;  // x[n, h, w, c] at input + n*in_stride_n + h*in_stride_h + w*in_stride_w + c
  int64_t in_stride_n = 0, in_stride_h = 0, in_stride_w = 0;
  const void* filter = nullptr;  // [K, R, S, C] contiguous
  const void* bias = nullptr;    // [K], or nullptr
  void* output = nullptr;        // y[n, p, q, k], strides as the input's
  int64_t out_stride_n = 0, out_stride_h = 0, out_stride_w = 0;
  int N = 0, H = 0, W = 0, C = 0, K = 0, R = 0, S = 0, P = 0, Q = 0;
  int stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dilation_h = 1, dilation_w = 1;
  bool relu = false;
  // Tap skipping: one unpadded convolution per region (those with at least one tap; the glue fills the
  // others). Without it: the whole padded convolution, all R x S taps.
  bool tap_skipping = false;
  std::vector<TapRegion> regions;
  cudaStream_t stream = nullptr;
};

// Threadblock tile M (output pixels) and N (output channels) of each Tile (cutlass_conv.cuh asserts them).
constexpr int tile_m(Tile t) { return t == Tile::kLarge ? 128 : 64; }
constexpr int tile_n(Tile t) { return t == Tile::kLarge ? 128 : 64; }

// "MxNxK" of a tile, e.g. "128x128x64".
const char* tile_shape(DType dtype, Tile tile);
// Threadblock tiles of a launch with this tile (for the tile heuristic of the glue).
int64_t tile_count(const ConvParams& p, Tile tile);

// Queues the convolution on p.stream. Returns an empty string on success, else what went wrong (a CUTLASS
// status or CUDA error), which the glue raises.
std::string run(const ConvParams& p);

// One entry point per dtype (conv_<dtype>.cu), behind run().
std::string run_bf16(const ConvParams& p);
std::string run_fp16(const ConvParams& p);
std::string run_tf32(const ConvParams& p);

}  // namespace cuda
}  // namespace atrous_conv
}  // namespace deeplab_fast
