// The CUTLASS implicit-GEMM convolution behind atrous_conv_cuda.h, as a template over the element type and the
// tile. Included by one .cu file per dtype (conv_bf16.cu, conv_fp16.cu, conv_tf32.cu), so that they compile in
// parallel.
//
// Per region (tap_regions.h), the kernel is CUTLASS 2.x's Conv2dFprop (multistage cp.async mainloop, sm80
// tensor-core MMA, also run on sm90) with:
//   - the analytic activation and filter iterators, which address through the layouts' strides, so an input
//     window and a sub-filter are views (offset pointer, the full tensors' strides): nothing is copied;
//   - the strided ("conv") output iterator, which maps each GEMM row to (n, p, q) and writes through the
//     output's strides, so a region writes its rectangle of the output in place;
//   - BiasRelu as the epilogue: y = relu?(acc + bias[k]), in float, with the bias read as a stride-0
//     broadcast "source" tensor.
// All regions of a call run in one launch: blockIdx.z picks the region's parameters from a __grid_constant__
// array, and RegionSwizzle maps blockIdx.x / y to the region's GEMM M / N tiles (tiles past a region's extent
// exit at once).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/kernel/default_conv2d_fprop.h"
#include "cutlass/conv/kernel/implicit_gemm_convolution.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/threadblock/default_epilogue_tensor_op.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cutlass/numeric_conversion.h"

#include "atrous_conv_cuda.h"

namespace deeplab_fast {
namespace atrous_conv {
namespace cuda {
namespace detail {

// y = relu?(acc + bias) per element, computed in float. The bias comes in as the epilogue's source fragment
// (a stride-0 tensor: the same [K] vector for every output pixel). Serial split-K protocol (set_k_partition)
// kept for completeness: later partitions add the partial output, only the last applies the ReLU.
template <typename ElementOutput_, int Count>
class BiasRelu {
 public:
  using ElementOutput = ElementOutput_;
  using ElementC = ElementOutput_;
  using ElementD = ElementOutput_;
  using ElementAccumulator = float;
  using ElementCompute = float;
  static int const kCount = Count;
  using FragmentOutput = cutlass::Array<ElementOutput, kCount>;
  using FragmentSource = cutlass::Array<ElementOutput, kCount>;
  using FragmentAccumulator = cutlass::Array<ElementAccumulator, kCount>;
  using FragmentCompute = cutlass::Array<ElementCompute, kCount>;
  static cutlass::FloatRoundStyle const kRound = cutlass::FloatRoundStyle::round_to_nearest;

  struct Params {
    bool add_bias = false;
    bool relu = false;
  };

  CUTLASS_HOST_DEVICE explicit BiasRelu(Params const& params) : add_source_(params.add_bias), relu_(params.relu) {}

  CUTLASS_HOST_DEVICE bool is_source_needed() const { return add_source_; }

  CUTLASS_HOST_DEVICE void set_k_partition(int k_partition, int k_partition_count) {
    if (k_partition) add_source_ = true;
    if (k_partition != k_partition_count - 1) relu_ = false;
  }

  CUTLASS_HOST_DEVICE FragmentOutput operator()(FragmentAccumulator const& acc, FragmentSource const& source) const {
    cutlass::NumericArrayConverter<ElementCompute, ElementOutput, kCount, kRound> to_compute;
    return finish(acc, to_compute(source));
  }

  CUTLASS_HOST_DEVICE FragmentOutput operator()(FragmentAccumulator const& acc) const {
    FragmentCompute zero;
    zero.fill(ElementCompute(0));
    return finish(acc, zero);
  }

 private:
  CUTLASS_HOST_DEVICE FragmentOutput finish(FragmentAccumulator const& acc, FragmentCompute const& add) const {
    FragmentCompute y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) {
      float v = acc[i] + add[i];
      // ReLU that lets NaN through, as torch.relu does.
      y[i] = (relu_ && v < 0.0f) ? 0.0f : v;
    }
    cutlass::NumericArrayConverter<ElementOutput, ElementCompute, kCount, kRound> to_output;
    return to_output(y);
  }

  bool add_source_;
  bool relu_;
};

// Identity tile mapping, except that blockIdx.z is the region (not a split-K slice): the k tile is always 0.
struct RegionSwizzle : cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1> {
  CUTLASS_DEVICE static cutlass::gemm::GemmCoord get_tile_offset(int /*log_tile*/) {
    return cutlass::gemm::GemmCoord{int(blockIdx.x), int(blockIdx.y), 0};
  }
  CUTLASS_DEVICE static cutlass::gemm::GemmCoord get_tile_offset(cutlass::gemm::GemmCoord /*tiled_shape*/) {
    return cutlass::gemm::GemmCoord{int(blockIdx.x), int(blockIdx.y), 0};
  }
};

// Tile configurations (threadblock MxNxK, warps, cp.async stages; how they were chosen: DEVELOPERS.md).
// Large: 128x128x32, 4 warps of 64x64, 4 stages (64 KiB of shared memory for 16-bit types; 240 registers
// and no spills for sm_80). Small, for small maps and batch 1 (more CTAs): 64x64x64, 4 warps of 32x32.
// TF32 (4-byte elements): 128x128x16 and 64x64x32, the same 64 KiB of shared memory (128x128x32 took 96 KiB, one
// CTA per A100 SM, and spilled).
template <typename Element, Tile kTile>
struct TileConfig;

template <typename Element>
struct TileConfig<Element, Tile::kLarge> {
  using Threadblock = cutlass::gemm::GemmShape<128, 128, 32>;
  using Warp = cutlass::gemm::GemmShape<64, 64, 32>;
  using Instruction = cutlass::gemm::GemmShape<16, 8, 16>;
  static int const kStages = 4;
};
template <typename Element>
struct TileConfig<Element, Tile::kSmall> {
  using Threadblock = cutlass::gemm::GemmShape<64, 64, 64>;
  using Warp = cutlass::gemm::GemmShape<32, 32, 64>;
  using Instruction = cutlass::gemm::GemmShape<16, 8, 16>;
  static int const kStages = 4;
};
template <>
struct TileConfig<float, Tile::kLarge> {
  using Threadblock = cutlass::gemm::GemmShape<128, 128, 16>;
  using Warp = cutlass::gemm::GemmShape<64, 64, 16>;
  using Instruction = cutlass::gemm::GemmShape<16, 8, 8>;
  static int const kStages = 4;
};
template <>
struct TileConfig<float, Tile::kSmall> {
  using Threadblock = cutlass::gemm::GemmShape<64, 64, 32>;
  using Warp = cutlass::gemm::GemmShape<32, 32, 32>;
  using Instruction = cutlass::gemm::GemmShape<16, 8, 8>;
  static int const kStages = 4;
};

// float inputs run on TF32 tensor cores (rounded operands, float accumulation); 16-bit types as they are.
template <typename Element>
struct MathFor {
  using Op = cutlass::arch::OpMultiplyAdd;
};
template <>
struct MathFor<float> {
  using Op = cutlass::arch::OpMultiplyAdd;  // float operands on OpClassTensorOp sm80 = TF32 MMA
};

template <typename Element, Tile kTile>
struct ConvKernel {
  using Config = TileConfig<Element, kTile>;
  using Layout = cutlass::layout::TensorNHWC;
  static int const kAccess = 128 / cutlass::sizeof_bits<Element>::value;
  using Output = BiasRelu<Element, kAccess>;
  using Base = typename cutlass::conv::kernel::DefaultConv2dFprop<
      Element, Layout, Element, Layout, Element, Layout, float, cutlass::arch::OpClassTensorOp,
      cutlass::arch::Sm80, typename Config::Threadblock, typename Config::Warp, typename Config::Instruction,
      Output, RegionSwizzle, Config::kStages, typename MathFor<Element>::Op,
      cutlass::conv::IteratorAlgorithm::kAnalytic, cutlass::conv::StrideSupport::kStrided>::Kernel;
  // The base kernel's mainloop with an epilogue that writes through the output's strides (its default assumes
  // a packed [N*P*Q, K] matrix).
  using Epilogue = typename cutlass::epilogue::threadblock::DefaultEpilogueTensorOp<
      typename Config::Threadblock, typename Base::Epilogue::WarpMmaOperator, Base::Epilogue::kPartitionsK,
      Output, kAccess, false, cutlass::layout::NoPermute, cutlass::conv::StrideSupport::kStrided, 4>::Epilogue;
  using Kernel = cutlass::conv::kernel::ImplicitGemmConvolution<typename Base::Mma, Epilogue, RegionSwizzle,
                                                                cutlass::conv::Operator::kFprop>;
  using Params = typename Kernel::Params;
  static_assert(Config::Threadblock::kM == tile_m(kTile) && Config::Threadblock::kN == tile_n(kTile),
                "tile_m / tile_n in atrous_conv_cuda.h must match the tile configurations");

  // As many regions per launch as fit in the 4 KiB of classic kernel parameter space.
  static int const kRegionsPerLaunch = int(std::min<size_t>(16, 4000 / sizeof(Params)));
  struct Launch {
    Params params[kRegionsPerLaunch];
  };
  static_assert(kRegionsPerLaunch >= 9, "a 3x3 conv's 9 regions should fit in one launch");
};

template <typename Conv>
__global__ void __launch_bounds__(Conv::Kernel::kThreadCount)
    region_conv_kernel(const __grid_constant__ typename Conv::Launch launch) {
  extern __shared__ __align__(16) unsigned char shared[];
  typename Conv::Kernel op;
  op(launch.params[blockIdx.z], *reinterpret_cast<typename Conv::Kernel::SharedStorage*>(shared));
}

inline std::string cuda_error(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

template <typename Element, Tile kTile>
std::string run_tile(const ConvParams& p) {
  using Conv = ConvKernel<Element, kTile>;
  using Kernel = typename Conv::Kernel;
  using Layout = cutlass::layout::TensorNHWC;
  using Stride = typename Layout::Stride;

  const int smem = int(sizeof(typename Kernel::SharedStorage));
  cudaError_t e = cudaSuccess;
  if (smem >= (48 << 10)) {  // a cheap host call; set per call so that every device (and thread) has it
    e = cudaFuncSetAttribute(region_conv_kernel<Conv>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return cuda_error("cudaFuncSetAttribute(MaxDynamicSharedMemorySize)", e);
  }

  const Element* input = static_cast<const Element*>(p.input);
  const Element* filter = static_cast<const Element*>(p.filter);
  Element* output = static_cast<Element*>(p.output);
  Element* bias = const_cast<Element*>(static_cast<const Element*>(p.bias));
  const Stride in_stride = cutlass::make_Coord(int(p.in_stride_w), int(p.in_stride_h), int(p.in_stride_n));
  const Stride out_stride = cutlass::make_Coord(int(p.out_stride_w), int(p.out_stride_h), int(p.out_stride_n));
  const Stride filter_stride = cutlass::make_Coord(p.C, p.S * p.C, p.R * p.S * p.C);
  typename Conv::Output::Params epilogue;
  epilogue.add_bias = bias != nullptr;
  epilogue.relu = p.relu;

  // The pieces of the launch: each region's unpadded convolution of its input window with its sub-filter,
  // writing its output rectangle; or the whole padded convolution.
  struct Piece {
    cutlass::conv::Conv2dProblemSize problem;
    int64_t input_offset, filter_offset, output_offset;
  };
  std::vector<Piece> pieces;
  if (p.tap_skipping) {
    for (const TapRegion& g : p.regions) {
      const int taps_h = int(g.r_end - g.r_begin), taps_w = int(g.s_end - g.s_begin);
      const int rows = int(g.rows()), cols = int(g.cols());
      pieces.push_back(Piece{
          cutlass::conv::Conv2dProblemSize(
              p.N, int(region_input_extent(rows, taps_h, p.stride_h, p.dilation_h)),
              int(region_input_extent(cols, taps_w, p.stride_w, p.dilation_w)), p.C, p.K, taps_h, taps_w, rows,
              cols, /*pad_h=*/0, /*pad_w=*/0, p.stride_h, p.stride_w, p.dilation_h, p.dilation_w,
              cutlass::conv::Mode::kCrossCorrelation, /*split_k_slices=*/1, /*groups=*/1),
          g.in_h * p.in_stride_h + g.in_w * p.in_stride_w, (g.r_begin * p.S + g.s_begin) * p.C,
          g.p_begin * p.out_stride_h + g.q_begin * p.out_stride_w});
    }
  } else {
    pieces.push_back(Piece{
        cutlass::conv::Conv2dProblemSize(p.N, p.H, p.W, p.C, p.K, p.R, p.S, p.P, p.Q, p.pad_h, p.pad_w, p.stride_h,
                                         p.stride_w, p.dilation_h, p.dilation_w,
                                         cutlass::conv::Mode::kCrossCorrelation, 1, 1),
        0, 0, 0});
  }

  for (size_t first = 0; first < pieces.size(); first += Conv::kRegionsPerLaunch) {
    const size_t count = std::min(pieces.size() - first, size_t(Conv::kRegionsPerLaunch));
    typename Conv::Launch launch;
    int grid_m = 0, grid_n = 0;
    for (size_t i = 0; i < count; ++i) {
      const Piece& piece = pieces[first + i];
      typename Kernel::Arguments args(
          piece.problem, {const_cast<Element*>(input) + piece.input_offset, in_stride},
          {const_cast<Element*>(filter) + piece.filter_offset, filter_stride}, {bias, cutlass::make_Coord(0, 0, 0)},
          {output + piece.output_offset, out_stride}, epilogue, cutlass::conv::SplitKMode::kSerial);
      cutlass::Status status = Kernel::Mma::IteratorA::can_implement(piece.problem);
      if (status == cutlass::Status::kSuccess) status = Kernel::Mma::IteratorB::can_implement(piece.problem);
      if (status != cutlass::Status::kSuccess) {
        return std::string("CUTLASS cannot run piece ") + std::to_string(first + i) + ": " +
               cutlassGetStatusString(status);
      }
      launch.params[i] = typename Kernel::Params(args, nullptr);
      grid_m = std::max(grid_m, launch.params[i].grid_tiled_shape.m());
      grid_n = std::max(grid_n, launch.params[i].grid_tiled_shape.n());
    }
    if (grid_n > 65535) return "K = " + std::to_string(p.K) + " needs more than 65535 threadblock columns";
    const dim3 grid{unsigned(grid_m), unsigned(grid_n), unsigned(count)};
    const dim3 block{unsigned(Kernel::kThreadCount), 1u, 1u};
    region_conv_kernel<Conv><<<grid, block, smem, p.stream>>>(launch);
    e = cudaGetLastError();
    if (e != cudaSuccess) return cuda_error("atrous_conv2d kernel launch", e);
  }
  return std::string();
}

template <typename Element>
std::string run_dtype(const ConvParams& p) {
  return p.tile == Tile::kLarge ? run_tile<Element, Tile::kLarge>(p) : run_tile<Element, Tile::kSmall>(p);
}

}  // namespace detail
}  // namespace cuda
}  // namespace atrous_conv
}  // namespace deeplab_fast
