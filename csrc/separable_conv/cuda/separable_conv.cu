// The fused depthwise-separable atrous convolution kernel (see separable_conv_cuda.h). Plain CUDA: no torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "separable_conv_cuda.h"

namespace deeplab_fast {
namespace separable_conv {
namespace cuda {

namespace {

// Element loads and stores through the accumulation type (float for the 16-bit types, round to nearest even).
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using Acc = float;
  __device__ static float load(const float* p) { return *p; }
  __device__ static float round(float v) { return v; }
  __device__ static void store(float* p, float v) { *p = v; }
};
template <>
struct Elem<double> {
  using Acc = double;
  __device__ static double load(const double* p) { return *p; }
  __device__ static double round(double v) { return v; }
  __device__ static void store(double* p, double v) { *p = v; }
};
template <>
struct Elem<__half> {
  using Acc = float;
  __device__ static float load(const __half* p) { return __half2float(*p); }
  __device__ static float round(float v) { return __half2float(__float2half_rn(v)); }
  __device__ static void store(__half* p, float v) { *p = __float2half_rn(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  __device__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static float round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
  __device__ static void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

template <typename Acc>
__device__ Acc relu(Acc v) {
  return v > Acc(0) ? v : (v != v ? v : Acc(0));  // NaN propagates, as torch.relu
}

// Block (blockIdx.x, blockIdx.y): output pixels [blockIdx.x * kTilePixels, +kTilePixels) of the flattened
// (n, p, q) range, output channels [blockIdx.y * kTileChannels, +kTileChannels). Thread t: output channel
// k0 + t % kTileChannels and the kTilePixels / 4 pixels (t / kTileChannels) * 8 + i, i < 8.
template <typename T>
__global__ void __launch_bounds__(kThreads) separable_kernel(SeparableParams prm) {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  constexpr int kPixelsPerThread = kTilePixels * kTileChannels / kThreads;  // 8
  static_assert(kTilePixels % kPixelsPerThread == 0 && kThreads % kTileChannels == 0, "tile shape");
  __shared__ Acc y1[kChunk][kTilePixels];
  __shared__ Acc wp[kChunk][kTileChannels];

  const Problem& pb = prm.problem;
  const T* x = static_cast<const T*>(prm.input);
  const Acc* wd = static_cast<const Acc*>(prm.dw_weight);
  const Acc* bd = static_cast<const Acc*>(prm.dw_bias);
  const Acc* wpw = static_cast<const Acc*>(prm.pw_weight);
  const Acc* bp = static_cast<const Acc*>(prm.pw_bias);
  const int64_t PQ = pb.P * pb.Q;
  const int64_t M = pb.N * PQ;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTilePixels;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTileChannels;
  const int t = threadIdx.x;
  const int tk = t % kTileChannels;
  const int tm = (t / kTileChannels) * kPixelsPerThread;

  Acc acc[kPixelsPerThread];
  for (int i = 0; i < kPixelsPerThread; ++i) acc[i] = Acc(0);

  for (int64_t c0 = 0; c0 < pb.C; c0 += kChunk) {
    // The depthwise result of the chunk: kChunk x kTilePixels entries, kThreads at a time (pixel fastest, so
    // neighbouring threads read neighbouring columns of one channel plane).
    for (int e = t; e < kChunk * kTilePixels; e += kThreads) {
      const int cc = e / kTilePixels, mm = e % kTilePixels;
      const int64_t c = c0 + cc, m = m0 + mm;
      Acc v = Acc(0);
      if (c < pb.C && m < M) {
        const int64_t n = m / PQ, pq = m % PQ, p = pq / pb.Q, q = pq % pb.Q;
        const T* xc = x + n * prm.in_stride[0] + c * prm.in_stride[1];
        const Acc* w = wd + c * pb.R * pb.S;
        v = bd != nullptr ? bd[c] : Acc(0);
        for (int64_t r = 0; r < pb.R; ++r) {
          const int64_t h = p * pb.stride_h - pb.pad_h + r * pb.dilation_h;
          if (h < 0 || h >= pb.H) continue;
          for (int64_t s = 0; s < pb.S; ++s) {
            const int64_t wc = q * pb.stride_w - pb.pad_w + s * pb.dilation_w;
            if (wc < 0 || wc >= pb.W) continue;
            v += E::load(xc + h * prm.in_stride[2] + wc * prm.in_stride[3]) * w[r * pb.S + s];
          }
        }
        if (pb.dw_relu) v = relu(v);
        v = E::round(v);
      }
      y1[cc][mm] = v;
    }
    for (int e = t; e < kChunk * kTileChannels; e += kThreads) {
      const int cc = e / kTileChannels, kk = e % kTileChannels;
      const int64_t c = c0 + cc, k = k0 + kk;
      wp[cc][kk] = (c < pb.C && k < pb.K) ? wpw[c * pb.K + k] : Acc(0);
    }
    __syncthreads();
    for (int cc = 0; cc < kChunk; ++cc) {
      const Acc w = wp[cc][tk];
      for (int i = 0; i < kPixelsPerThread; ++i) acc[i] += y1[cc][tm + i] * w;
    }
    __syncthreads();
  }

  const int64_t k = k0 + tk;
  if (k >= pb.K) return;
  T* y = static_cast<T*>(prm.output);
  const Acc b = bp != nullptr ? bp[k] : Acc(0);
  for (int i = 0; i < kPixelsPerThread; ++i) {
    const int64_t m = m0 + tm + i;
    if (m >= M) break;
    const int64_t n = m / PQ, pq = m % PQ, p = pq / pb.Q, q = pq % pb.Q;
    Acc v = acc[i] + b;
    if (pb.pw_relu) v = relu(v);
    E::store(y + n * prm.out_stride[0] + k * prm.out_stride[1] + p * prm.out_stride[2] + q * prm.out_stride[3], v);
  }
}

template <typename T>
std::string launch(const SeparableParams& p) {
  const int64_t M = p.problem.N * p.problem.P * p.problem.Q;
  const int64_t blocks_m = (M + kTilePixels - 1) / kTilePixels;
  const int64_t blocks_k = (p.problem.K + kTileChannels - 1) / kTileChannels;
  if (blocks_m > 0x7FFFFFFF || blocks_k > 65535) {
    return "separable_conv2d: the output is too large for one launch (" + std::to_string(blocks_m) + " x " +
           std::to_string(blocks_k) + " threadblocks)";
  }
  const dim3 grid(static_cast<unsigned>(blocks_m), static_cast<unsigned>(blocks_k));
  separable_kernel<T><<<grid, kThreads, 0, p.stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string("separable_conv2d kernel: ") + cudaGetErrorString(err);
}

}  // namespace

std::string run(const SeparableParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return launch<float>(p);
    case DType::kFloat64: return launch<double>(p);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p);
    case DType::kFloat16: return launch<__half>(p);
  }
  return "separable_conv2d: unknown dtype";
}

}  // namespace cuda
}  // namespace separable_conv
}  // namespace deeplab_fast
