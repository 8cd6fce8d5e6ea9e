// Mean-field inference for the fully connected CRF on the GPU.
//
// Krähenbühl & Koltun, NIPS 2011, algorithm 1: Q <- softmax(-unary - sum_k compat_k(K_k Q)), each K_k Q on a
// permutohedral lattice (permutohedral.cuh). The batch runs in one set of launches: every image has its own
// lattice points, numbered after the previous image's.
//
// Layout: unary and Q are [B * N, S] on the device, labels contiguous per pixel, the label stride S rounded up to
// a multiple of 4 (padding lanes: +inf in the unary, 0 in Q) so that every row is read as float4s. One
// iteration is, per term, splat (2 kernels) and d+1 blur kernels, then one fused kernel for slice + compat +
// unary + softmax, where a group of up to 32 threads holds one pixel's labels in registers. The iterations are
// captured in a CUDA graph (reused across calls of the same configuration by updating it in place). The host
// syncs 1 + (number of terms) times per call, all before the iterations.
//
// DEEPLAB_FAST_PROFILE=1 prints a per-stage split (CUDA events; graphs off) to stderr.
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../lattice_math.h"
#include "common/env.h"
#include "dense_crf_cuda.h"
#include "permutohedral.cuh"

namespace deeplab_fast {
namespace dense_crf {
namespace cuda {

namespace {

constexpr int kPixelBlock = 128;
constexpr float kInf = std::numeric_limits<float>::infinity();

// One term as the fused pixel kernel reads it (an array of these lives on the device).
struct TermArgs {
  const int32_t* vertex_point;  // [P, d+1]
  const float* weight;          // [P, d+1]
  const float* blurred;         // [M, S]
  const float* pre;             // [P] or nullptr (the backward multiplies the transposed slice by it)
  const float* post;            // [P] or nullptr
  const float* compat;          // kDiagonal: [S] zero-padded; kMatrix: [L, L]
  float potts;                  // kPotts: w
  float alpha;
  int dp1;
  int kind;
};

enum Mode : int {
  kSoftmax = 0,     // Q = softmax(-unary), checking the unary
  kUpdate = 1,      // Q = softmax(-unary - sum_k compat_k(filtered_k))
  kEnergy = 2,      // out = sum_k compat_k(filtered_k)
  kCheckOnly = 3,   // check the unary, write nothing
};

struct PixelArgs {
  const float* unary;  // [P, S]
  float* out;          // [P, S]
  const TermArgs* terms;
  int num_terms;
  int64_t pixels;
  int L, S, C4, T;  // labels, stride, float4 chunks per pixel, threads per pixel (a power of 2, <= 32)
  int mode;
  int* flags;
  int* overflow_count;     // kUpdate: pixels whose messages overflowed, listed for update_in_double_kernel
  int32_t* overflow_list;  // [pixels]
};

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void st4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ float max4(float4 v) { return fmaxf(fmaxf(v.x, v.y), fmaxf(v.z, v.w)); }

// Label l's message -unary - sum_k compat_k(post_k * slice_k) of pixel g, in double from the float lattice values.
__device__ double message_in_double(const PixelArgs& a, int64_t g, int l) {
  double msg = -static_cast<double>(a.unary[g * a.S + l]);
  for (int t = 0; t < a.num_terms; ++t) {
    const TermArgs& term = a.terms[t];
    const double post = term.post != nullptr ? term.post[g] : 1.0;
    auto sliced = [&](int m) {
      double v = 0.0;
      for (int r = 0; r < term.dp1; ++r) {
        const int64_t e = g * term.dp1 + r;
        v += static_cast<double>(term.weight[e]) * term.alpha *
             term.blurred[static_cast<int64_t>(term.vertex_point[e]) * a.S + m];
      }
      return post * v;
    };
    if (term.kind == lattice::kMatrix) {
      double mixed = 0.0;
      for (int m = 0; m < a.L; ++m) mixed += static_cast<double>(term.compat[static_cast<int64_t>(l) * a.L + m]) * sliced(m);
      msg -= mixed;
    } else if (term.kind == lattice::kDiagonal) {
      msg -= static_cast<double>(term.compat[l]) * sliced(l);
    } else {
      msg += static_cast<double>(term.potts) * sliced(l);
    }
  }
  return msg;
}

// The mean-field update in double of the pixels whose float32 messages overflowed (|compat| near 3.4e38; the
// pixel kernel lists them): the softmax of the double messages is finite, so huge compatibilities saturate
// instead of giving NaN. One thread per listed pixel; the list's order does not matter (pixels are independent).
__global__ void update_in_double_kernel(PixelArgs a) {
  const int count = *a.overflow_count;
  for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < count; k += gridDim.x * blockDim.x) {
    const int64_t g = a.overflow_list[k];
    double mx = -CUDART_INF;
    for (int l = 0; l < a.L; ++l) mx = fmax(mx, message_in_double(a, g, l));
    double sum = 0.0;
    for (int l = 0; l < a.L; ++l) sum += exp(message_in_double(a, g, l) - mx);
    for (int l = 0; l < a.S; ++l)
      a.out[g * a.S + l] = l < a.L ? static_cast<float>(exp(message_in_double(a, g, l) - mx) / sum) : 0.0f;
  }
}

// One pixel group's view of the pixel kernels' layout: thread `lane` of pixel g's group of T threads holds the
// label chunks lane, lane + T, ... (NC of them; 4 labels each) of the [P, S] rows.
struct Group {
  int64_t g;
  int lane, T;
  bool active;
};

// s = factor[g] * sum_r alpha w_r lattice[vertex_r] (the slice of pixel g, scaled by factor when it is not null).
template <int NC>
__device__ __forceinline__ void slice_group(const TermArgs& term, const Group& p, int S, int C4, const float* factor,
                                            float4 (&s)[NC]) {
#pragma unroll
  for (int n = 0; n < NC; ++n) s[n] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (!p.active) return;
  for (int r = 0; r < term.dp1; ++r) {
    const int64_t e = p.g * term.dp1 + r;
    const float w = term.weight[e] * term.alpha;
    const float* v = term.blurred + static_cast<int64_t>(term.vertex_point[e]) * S;
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      const int c = p.lane + n * p.T;
      if (c < C4) {
        const float4 x = ld4(v + 4 * c);
        s[n] = make_float4(s[n].x + w * x.x, s[n].y + w * x.y, s[n].z + w * x.z, s[n].w + w * x.w);
      }
    }
  }
  if (factor != nullptr) {
    const float f = factor[p.g];
#pragma unroll
    for (int n = 0; n < NC; ++n) s[n] = make_float4(f * s[n].x, f * s[n].y, f * s[n].z, f * s[n].w);
  }
}

// acc += sign * compat(s), with compat(s) = -w s (Potts), diag(c) s or W s (W symmetric: its rows are its columns;
// the group's s goes through shared memory, `smem`: one [S] row per group of the block). Every thread of the warp
// must call it (__syncwarp).
template <int NC, bool kMatrix>
__device__ __forceinline__ void add_compat(const TermArgs& term, const Group& p, int L, int S, int C4, float* smem,
                                           const float4 (&s)[NC], float sign, float4 (&acc)[NC]) {
  if (kMatrix && term.kind == lattice::kMatrix) {
    float* sh = smem + static_cast<int64_t>(threadIdx.x / p.T) * S;
    __syncwarp();
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      const int c = p.lane + n * p.T;
      if (c < C4) st4(sh + 4 * c, s[n]);
    }
    __syncwarp();
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      const int c = p.lane + n * p.T;
      if (!(p.active && c < C4)) continue;
      float mixed[4];
      for (int q = 0; q < 4; ++q) {
        const int l = 4 * c + q;
        float m_acc = 0.0f;
        if (l < L) {
          const float* wrow = term.compat + static_cast<int64_t>(l) * L;
          for (int m = 0; m < L; ++m) m_acc += wrow[m] * sh[m];
        }
        mixed[q] = m_acc;
      }
      acc[n] = make_float4(acc[n].x + sign * mixed[0], acc[n].y + sign * mixed[1], acc[n].z + sign * mixed[2],
                           acc[n].w + sign * mixed[3]);
    }
  } else if (term.kind == lattice::kDiagonal) {
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      const int c = p.lane + n * p.T;
      if (!(p.active && c < C4)) continue;
      const float4 w = ld4(term.compat + 4 * c);
      acc[n] = make_float4(acc[n].x + sign * (w.x * s[n].x), acc[n].y + sign * (w.y * s[n].y),
                           acc[n].z + sign * (w.z * s[n].z), acc[n].w + sign * (w.w * s[n].w));
    }
  } else {
    const float nw = -term.potts;
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      acc[n] = make_float4(acc[n].x + sign * (nw * s[n].x), acc[n].y + sign * (nw * s[n].y),
                           acc[n].z + sign * (nw * s[n].z), acc[n].w + sign * (nw * s[n].w));
    }
  }
}

// The fused per-pixel step. Thread `lane` of pixel g's group of T threads holds the label chunks
// lane, lane + T, ... (NC of them; 4 labels each). Every thread of a warp runs every shuffle and __syncwarp:
// threads past the last pixel or chunk just carry -inf / 0.
template <int NC, bool kMatrix>
__global__ void __launch_bounds__(kPixelBlock) pixel_kernel(PixelArgs a) {
  extern __shared__ float smem[];  // kMatrix: one [S] row per pixel group of the block
  const int T = a.T;
  const int lane = threadIdx.x & (T - 1);
  const int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / T;
  const bool active = g < a.pixels;
  const int64_t row = (active ? g : 0) * a.S;

  float4 msg[NC];
#pragma unroll
  for (int n = 0; n < NC; ++n) {
    const int c = lane + n * T;
    if (a.mode == kEnergy) {
      msg[n] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    } else if (active && c < a.C4) {
      const float4 u = ld4(a.unary + row + 4 * c);
      msg[n] = make_float4(-u.x, -u.y, -u.z, -u.w);
    } else {
      msg[n] = make_float4(-kInf, -kInf, -kInf, -kInf);
    }
  }

  if (a.mode == kUpdate || a.mode == kEnergy) {
    const float sign = a.mode == kEnergy ? 1.0f : -1.0f;  // energy adds compat(filtered), the update subtracts it
    const Group p{g, lane, T, active};
    for (int t = 0; t < a.num_terms; ++t) {
      const TermArgs& term = a.terms[t];
      float4 s[NC];
      slice_group<NC>(term, p, a.S, a.C4, term.post, s);
      add_compat<NC, kMatrix>(term, p, a.L, a.S, a.C4, smem, s, sign, msg);
    }
  }

  if (a.mode == kEnergy) {
    if (!active) return;
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      const int c = lane + n * T;
      if (c < a.C4) st4(a.out + row + 4 * c, msg[n]);
    }
    return;
  }

  // Softmax over the group (the shuffles stay inside aligned groups of T lanes).
  float m = -kInf;
#pragma unroll
  for (int n = 0; n < NC; ++n) m = fmaxf(m, max4(msg[n]));
  for (int off = T / 2; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));

  if (a.mode == kSoftmax || a.mode == kCheckOnly) {
    int bad = 0;
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      const int c = lane + n * T;
      if (!(active && c < a.C4)) continue;
      const float4 v = msg[n];
      if (isnan(v.x) || isnan(v.y) || isnan(v.z) || isnan(v.w)) bad |= kUnaryNaN;
      if (v.x == kInf || v.y == kInf || v.z == kInf || v.w == kInf) bad |= kUnaryNegInf;  // msg = -unary
    }
    if (active && lane == 0 && !(m > -kInf)) bad |= kUnaryNoFiniteLabel;
    if (bad != 0) atomicOr(a.flags, bad);
    if (a.mode == kCheckOnly) return;
  }

  float sum = 0.0f;
#pragma unroll
  for (int n = 0; n < NC; ++n) {
    msg[n] = make_float4(expf(msg[n].x - m), expf(msg[n].y - m), expf(msg[n].z - m), expf(msg[n].w - m));
    sum += (msg[n].x + msg[n].y) + (msg[n].z + msg[n].w);
  }
  for (int off = T / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  // The sum is >= 1 (the largest label gives exp(0)) unless the messages overflowed float32 (inf, inf - inf):
  // then the pixel is recomputed in double (update_in_double_kernel). The group's sum is uniform.
  if (a.mode == kUpdate && active && !(sum >= 1.0f)) {  // listed for update_in_double_kernel
    if (lane == 0) a.overflow_list[atomicAdd(a.overflow_count, 1)] = static_cast<int32_t>(g);
    return;
  }
  if (!active) return;
#pragma unroll
  for (int n = 0; n < NC; ++n) {
    const int c = lane + n * T;
    if (c < a.C4)
      st4(a.out + row + 4 * c, make_float4(msg[n].x / sum, msg[n].y / sum, msg[n].z / sum, msg[n].w / sum));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward (see MeanField::backward). Per pixel group, as the forward's pixel kernel:
//   kBwdInit: g = dL/dQ_T (from g_in);
//   kBwdStep: h_k = pre_k * slice_k(transposed filter of gx_t) (= K_k^T gx_t), stored for the compat gradient when
//             wanted, and g = dL/dQ_{t-1} = -sum_k compat_k(h_k);
// then either g_q_init = g (Q is q_init), or gx = Q (g - <g, Q>) (the softmax's VJP) and gu = -gx (init) or
// gu -= gx (step).
enum BackwardMode : int { kBwdInit = 0, kBwdStep = 1 };

struct BackwardArgs {
  const float* g_in;  // kBwdInit: [P, S]
  const float* q;     // [P, S]: Q_T (init) or Q_{t-1} (step)
  float* gx;          // [P, S]
  float* gu;          // [P, S]
  float* g_q_init;    // [P, S] or nullptr
  float* const* h_out;  // [num_terms] device array of [P, S] buffers (nullptr: not wanted), or nullptr
  const TermArgs* terms;
  int num_terms;
  int64_t pixels;
  int L, S, C4, T;
  int mode;
};

__device__ __forceinline__ float dot4(float4 a, float4 b) { return (a.x * b.x + a.y * b.y) + (a.z * b.z + a.w * b.w); }

template <int NC, bool kMatrix>
__global__ void __launch_bounds__(kPixelBlock) backward_kernel(BackwardArgs a) {
  extern __shared__ float smem[];  // kMatrix: one [S] row per pixel group of the block
  const int T = a.T;
  const int lane = threadIdx.x & (T - 1);
  const int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / T;
  const bool active = g < a.pixels;
  const int64_t row = (active ? g : 0) * a.S;
  const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

  float4 grad[NC];
#pragma unroll
  for (int n = 0; n < NC; ++n) {
    const int c = lane + n * T;
    grad[n] = (a.mode == kBwdInit && active && c < a.C4) ? ld4(a.g_in + row + 4 * c) : zero;
  }
  if (a.mode == kBwdStep) {
    const Group p{g, lane, T, active};
    for (int t = 0; t < a.num_terms; ++t) {
      const TermArgs& term = a.terms[t];
      float4 h[NC];
      slice_group<NC>(term, p, a.S, a.C4, term.pre, h);  // the transposed filter: pre after the slice
      float* h_out = a.h_out != nullptr ? a.h_out[t] : nullptr;
      if (h_out != nullptr && active) {
#pragma unroll
        for (int n = 0; n < NC; ++n) {
          const int c = lane + n * T;
          if (c < a.C4) st4(h_out + row + 4 * c, h[n]);
        }
      }
      add_compat<NC, kMatrix>(term, p, a.L, a.S, a.C4, smem, h, -1.0f, grad);  // g -= compat(h)
    }
  }
  if (a.g_q_init != nullptr) {
    if (!active) return;
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      const int c = lane + n * T;
      if (c < a.C4) {
        st4(a.g_q_init + row + 4 * c, grad[n]);
        if (a.mode == kBwdInit) st4(a.gu + row + 4 * c, zero);
      }
    }
    return;
  }
  float4 q[NC];
  float dot = 0.0f;
#pragma unroll
  for (int n = 0; n < NC; ++n) {
    const int c = lane + n * T;
    q[n] = (active && c < a.C4) ? ld4(a.q + row + 4 * c) : zero;
    dot += dot4(grad[n], q[n]);
  }
  for (int off = T / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
  if (!active) return;
#pragma unroll
  for (int n = 0; n < NC; ++n) {
    const int c = lane + n * T;
    if (c >= a.C4) continue;
    const float4 gx = make_float4(q[n].x * (grad[n].x - dot), q[n].y * (grad[n].y - dot), q[n].z * (grad[n].z - dot),
                                  q[n].w * (grad[n].w - dot));
    st4(a.gx + row + 4 * c, gx);
    const float4 old = a.mode == kBwdInit ? zero : ld4(a.gu + row + 4 * c);
    st4(a.gu + row + 4 * c, make_float4(old.x - gx.x, old.y - gx.y, old.z - gx.z, old.w - gx.w));
  }
}

// The compatibility gradients' contraction of h (= K^T gx_t) with Q_{t-1}, in two fixed-order passes (no
// atomics): partial[chunk, j] sums a chunk of pixels in pixel order, then acc[j] += sign * sum over chunks in
// chunk order, in double. j: Potts 0 (sum over labels of h Q); diagonal l (h_l Q_l); matrix l * L + m (h_l Q_m).
__global__ void contract_kernel(const float* __restrict__ h, const float* __restrict__ q, int64_t pixels,
                                int64_t chunk_size, int S, int L, int kind, int width, float* __restrict__ partial) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (j >= width) return;
  const int64_t i0 = chunk * chunk_size, i1 = min(pixels, i0 + chunk_size);
  float acc = 0.0f;
  if (kind == lattice::kPotts) {
    for (int64_t i = i0; i < i1; ++i)
      for (int l = 0; l < L; ++l) acc += h[i * S + l] * q[i * S + l];
  } else {
    const int l = kind == lattice::kDiagonal ? j : j / L, m = kind == lattice::kDiagonal ? j : j % L;
    for (int64_t i = i0; i < i1; ++i) acc += h[i * S + l] * q[i * S + m];
  }
  partial[chunk * width + j] = acc;
}

__global__ void contract_sum_kernel(const float* __restrict__ partial, int64_t chunks, int width, double sign,
                                    double* __restrict__ acc) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= width) return;
  double s = 0.0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * width + j];
  acc[j] += sign * s;
}

// Normalisation factors: norm[g] = normalisation_factor(alpha * sum_r w_r V[vertex_r]) for V the filtered ones.
__global__ void normalisation_kernel(const int32_t* __restrict__ vertex_point, const float* __restrict__ weight,
                                     const float* __restrict__ filtered, int dp1, float alpha, int64_t pixels,
                                     int64_t type, float* __restrict__ norm) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= pixels) return;
  float k1 = 0.0f;
  for (int r = 0; r < dp1; ++r) k1 += weight[g * dp1 + r] * filtered[vertex_point[g * dp1 + r]] * alpha;
  norm[g] = lattice::normalisation_factor(k1, type);
}

// [B, L, N] -> [B * N, S], padding lanes set to pad. 32x32 tiles through shared memory, both sides coalesced.
__global__ void to_pixel_major_kernel(const float* __restrict__ src, float* __restrict__ dst, int64_t L, int64_t N,
                                      int64_t S, float pad) {
  __shared__ float tile[32][33];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * 32, l0 = static_cast<int64_t>(blockIdx.y) * 32;
  const int64_t b = blockIdx.z;
  for (int y = threadIdx.y; y < 32; y += blockDim.y) {
    const int64_t l = l0 + y, i = i0 + threadIdx.x;
    tile[y][threadIdx.x] = (l < L && i < N) ? src[(b * L + l) * N + i] : pad;
  }
  __syncthreads();
  for (int y = threadIdx.y; y < 32; y += blockDim.y) {
    const int64_t i = i0 + y, l = l0 + threadIdx.x;
    if (i < N && l < S) dst[(b * N + i) * S + l] = tile[threadIdx.x][y];
  }
}

// [B * N, S] -> [B, L, N].
__global__ void to_label_major_kernel(const float* __restrict__ src, float* __restrict__ dst, int64_t L, int64_t N,
                                      int64_t S) {
  __shared__ float tile[32][33];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * 32, l0 = static_cast<int64_t>(blockIdx.y) * 32;
  const int64_t b = blockIdx.z;
  for (int y = threadIdx.y; y < 32; y += blockDim.y) {
    const int64_t i = i0 + y, l = l0 + threadIdx.x;
    tile[y][threadIdx.x] = (i < N && l < L) ? src[(b * N + i) * S + l] : 0.0f;
  }
  __syncthreads();
  for (int y = threadIdx.y; y < 32; y += blockDim.y) {
    const int64_t l = l0 + y, i = i0 + threadIdx.x;
    if (l < L && i < N) dst[(b * L + l) * N + i] = tile[threadIdx.x][y];
  }
}

dim3 transpose_grid(int64_t N, int64_t S, int64_t B) {
  return dim3(static_cast<unsigned>((N + 31) / 32), static_cast<unsigned>((S + 31) / 32), static_cast<unsigned>(B));
}

// Per-stage timing with CUDA events (DEEPLAB_FAST_PROFILE=1).
class Profiler {
 public:
  Profiler(bool enabled, cudaStream_t stream) : enabled_(enabled), stream_(stream) {}
  ~Profiler() {
    for (auto& s : spans_) {
      cudaEventDestroy(s.begin);
      cudaEventDestroy(s.end);
    }
  }
  template <typename Fn>
  void run(const char* stage, Fn fn) {
    if (!enabled_) {
      fn();
      return;
    }
    Span s{stage, nullptr, nullptr};
    check_cuda(cudaEventCreate(&s.begin), "cudaEventCreate");
    check_cuda(cudaEventCreate(&s.end), "cudaEventCreate");
    check_cuda(cudaEventRecord(s.begin, stream_), "cudaEventRecord");
    fn();
    check_cuda(cudaEventRecord(s.end, stream_), "cudaEventRecord");
    spans_.push_back(s);
  }
  void report(const char* what) {
    if (!enabled_) return;
    check_cuda(cudaStreamSynchronize(stream_), "profile sync");
    std::map<std::string, std::pair<float, int>> total;
    std::vector<std::string> order;
    for (const Span& s : spans_) {
      float ms = 0.0f;
      check_cuda(cudaEventElapsedTime(&ms, s.begin, s.end), "cudaEventElapsedTime");
      if (total.find(s.stage) == total.end()) order.push_back(s.stage);
      total[s.stage].first += ms;
      total[s.stage].second += 1;
    }
    for (const std::string& k : order)
      std::fprintf(stderr, "[deeplab_fast] cuda %-34s %9.3f ms (%d calls) [%s]\n", k.c_str(), total[k].first,
                   total[k].second, what);
  }

 private:
  struct Span {
    std::string stage;
    cudaEvent_t begin, end;
  };
  bool enabled_;
  cudaStream_t stream_;
  std::vector<Span> spans_;
};

// A CUDA graph of the iteration loop, kept per thread and device, and updated in place when a later call has the
// same topology (the usual case: same sizes, terms and iteration count), so only the first call instantiates.
struct GraphCache {
  cudaGraphExec_t exec = nullptr;
  cudaStream_t capture_stream = nullptr;  // a private stream to capture on (the legacy default stream cannot be)
};

// kind: which loop the graph holds (plain, keeping a history, recomputing one), so that alternating between
// them (training: forward, then backward) updates each graph in place instead of re-instantiating.
GraphCache& graph_cache(int device, int kind) {
  thread_local std::map<std::pair<int, int>, GraphCache> caches;
  return caches[{device, kind}];
}

void run_as_graph(cudaStream_t stream, int kind, const std::function<void(cudaStream_t)>& body) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  GraphCache& cache = graph_cache(device, kind);
  if (cache.capture_stream == nullptr)
    check_cuda(cudaStreamCreateWithFlags(&cache.capture_stream, cudaStreamNonBlocking), "cudaStreamCreate");
  cudaGraph_t graph = nullptr;
  check_cuda(cudaStreamBeginCapture(cache.capture_stream, cudaStreamCaptureModeThreadLocal), "begin capture");
  try {
    body(cache.capture_stream);
  } catch (...) {
    cudaStreamEndCapture(cache.capture_stream, &graph);
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
    throw;
  }
  check_cuda(cudaStreamEndCapture(cache.capture_stream, &graph), "end capture");
  if (cache.exec != nullptr) {
    cudaGraphExecUpdateResultInfo info;
    if (cudaGraphExecUpdate(cache.exec, graph, &info) != cudaSuccess) {
      cudaGetLastError();  // not sticky: clear it
      // A different topology: retire the old graph once its launches are done.
      check_cuda(cudaDeviceSynchronize(), "graph retire");
      cudaGraphExecDestroy(cache.exec);
      cache.exec = nullptr;
    }
  }
  if (cache.exec == nullptr) {
    const cudaError_t e = cudaGraphInstantiate(&cache.exec, graph, 0);
    if (e != cudaSuccess) {
      cudaGraphDestroy(graph);
      cache.exec = nullptr;
      check_cuda(e, "cudaGraphInstantiate");
    }
  }
  cudaGraphDestroy(graph);
  check_cuda(cudaGraphLaunch(cache.exec, stream), "cudaGraphLaunch");
}

// The per-pixel kernels by label-chunk count NC (1, 2, 4, 8, 16) and matrix variant.
template <typename Args>
using PixelKernelFn = void (*)(Args);

const PixelKernelFn<PixelArgs> kPixelKernels[5][2] = {
    {pixel_kernel<1, false>, pixel_kernel<1, true>},   {pixel_kernel<2, false>, pixel_kernel<2, true>},
    {pixel_kernel<4, false>, pixel_kernel<4, true>},   {pixel_kernel<8, false>, pixel_kernel<8, true>},
    {pixel_kernel<16, false>, pixel_kernel<16, true>}};
const PixelKernelFn<BackwardArgs> kBackwardKernels[5][2] = {
    {backward_kernel<1, false>, backward_kernel<1, true>},   {backward_kernel<2, false>, backward_kernel<2, true>},
    {backward_kernel<4, false>, backward_kernel<4, true>},   {backward_kernel<8, false>, backward_kernel<8, true>},
    {backward_kernel<16, false>, backward_kernel<16, true>}};

// One launch of a per-pixel kernel: the smallest NC >= nc; the matrix variant gets one [S] shared-memory row
// per pixel group of the block.
template <typename Args>
void launch_per_pixel(const PixelKernelFn<Args> (&kernels)[5][2], const Args& a, int nc, bool matrix,
                      cudaStream_t stream, const char* name) {
  const int which = nc <= 1 ? 0 : nc <= 2 ? 1 : nc <= 4 ? 2 : nc <= 8 ? 3 : 4;
  const int64_t threads = a.pixels * a.T;
  const unsigned blocks = static_cast<unsigned>((threads + kPixelBlock - 1) / kPixelBlock);
  const size_t smem = matrix ? static_cast<size_t>(kPixelBlock / a.T) * a.S * sizeof(float) : 0;
  kernels[which][matrix ? 1 : 0]<<<blocks, kPixelBlock, smem, stream>>>(a);
  check_launch(name);
}

class MeanField {
 public:
  explicit MeanField(const Problem& p)
      : p_(p),
        B_(p.batch),
        L_(p.num_labels),
        N_(p.num_pixels),
        P_(p.batch * p.num_pixels),
        S_(label_stride(p.num_labels)),
        ws_{p.allocator},
        scratch_{p.scratch != nullptr ? p.scratch : p.allocator},
        profile_(env::profiling(), p.stream) {
    if (L_ > kMaxLabels) {
      throw Error("dense_crf: the CUDA kernels take at most " + std::to_string(kMaxLabels) + " labels, got L = " +
                  std::to_string(L_));
    }
    const int64_t C4 = S_ / 4;
    T_ = 1;
    while (T_ < C4 && T_ < 32) T_ *= 2;
    NC_ = static_cast<int>((C4 + T_ - 1) / T_);
  }

  // Loads the inputs, checks them and builds every term's lattice and normalisation.
  void setup() {
    cudaStream_t s = p_.stream;
    const size_t nterms = p_.terms.size();
    status_ = ws_.get<int32_t>(1 + 2 * lattice::kMaxDim * static_cast<int64_t>(nterms));
    overflow_count_ = ws_.get<int>(1);
    overflow_list_ = ws_.get<int32_t>(P_);
    check_cuda(cudaMemsetAsync(status_, 0, sizeof(int32_t), s), "clear flags");
    q_ = ws_.get<float>(P_ * S_);
    profile_.run("load + softmax(-unary) + checks", [&] {
      if (p_.unary != nullptr) {
        unary_ = ws_.get<float>(P_ * S_);
        to_pixel_major_kernel<<<transpose_grid(N_, S_, B_), dim3(32, 8), 0, s>>>(p_.unary, unary_, L_, N_, S_, kInf);
        check_launch("to_pixel_major_kernel");
      }
      if (p_.q_init != nullptr) {
        to_pixel_major_kernel<<<transpose_grid(N_, S_, B_), dim3(32, 8), 0, s>>>(p_.q_init, q_, L_, N_, S_, 0.0f);
        check_launch("to_pixel_major_kernel");
      }
      if (p_.unary != nullptr) pixel_pass(p_.q_init != nullptr ? kCheckOnly : kSoftmax, q_, s);
    });
    profile_.run("lattice: embed (ranges)", [&] {
      for (size_t k = 0; k < nterms; ++k)
        embed_ranges(p_.terms[k].features, p_.terms[k].dim, B_, N_, status_ + 1 + 2 * lattice::kMaxDim * k,
                     status_, s);
    });
    // First host sync: bad input is reported before any further work, and the key ranges size the lattice keys.
    std::vector<int32_t> status(1 + 2 * lattice::kMaxDim * nterms);
    check_cuda(cudaMemcpyAsync(status.data(), status_, status.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, s),
               "copy status");
    check_cuda(cudaStreamSynchronize(s), "input checks");
    if (const char* error = input_error(status[0])) throw Error(error);

    std::vector<TermArgs> args(nterms);
    terms_.resize(nterms);
    for (size_t k = 0; k < nterms; ++k) {
      const Term& spec = p_.terms[k];
      TermState& t = terms_[k];
      profile_.run("lattice: build (sort, number, link)", [&] {
        t.lat = build_lattice(spec.features, spec.dim, B_, N_, status.data() + 1 + 2 * lattice::kMaxDim * k, s, ws_,
                              scratch_);
      });
      if (p_.scratch != nullptr) p_.scratch->release();  // the build's temporaries: reused by later kernels
      const int64_t M = t.lat.points, C = t.lat.chunks;
      if (spec.normalization != lattice::kNoNormalization) {
        profile_.run("normalisation", [&] {
          float* a = ws_.get<float>(M);
          float* b = ws_.get<float>(M);
          float* partial = ws_.get<float>(C);
          splat(t.lat, nullptr, nullptr, 1, partial, a, s);
          const float* filtered = blur(t.lat, a, b, 1, s);
          float* norm = ws_.get<float>(P_);
          normalisation_kernel<<<blocks_for(P_), kBlock, 0, s>>>(t.lat.vertex_point, t.lat.weight, filtered,
                                                                  t.lat.d + 1, t.lat.alpha, P_, spec.normalization,
                                                                  norm);
          check_launch("normalisation_kernel");
          if (spec.normalization == lattice::kNormalizeSymmetric || spec.normalization == lattice::kNormalizeBefore)
            t.pre = norm;
          if (spec.normalization == lattice::kNormalizeSymmetric || spec.normalization == lattice::kNormalizeAfter)
            t.post = norm;
        });
      }
      t.a = ws_.get<float>(M * S_);
      t.b = ws_.get<float>(M * S_);
      t.partial = ws_.get<float>(C * S_);
      t.blurred = (t.lat.d + 1) % 2 == 0 ? t.a : t.b;  // where blur() leaves the result after d+1 passes
      const float* compat = spec.compat;
      if (spec.compat_kind == lattice::kDiagonal) {
        float* padded = ws_.get<float>(S_);
        check_cuda(cudaMemsetAsync(padded, 0, S_ * sizeof(float), s), "compat padding");
        check_cuda(cudaMemcpyAsync(padded, spec.compat, L_ * sizeof(float), cudaMemcpyDeviceToDevice, s), "compat");
        compat = padded;
      }
      matrix_ |= spec.compat_kind == lattice::kMatrix;
      args[k] = TermArgs{t.lat.vertex_point, t.lat.weight, t.blurred, t.pre, t.post, compat, spec.potts_weight,
                         t.lat.alpha, t.lat.d + 1, static_cast<int>(spec.compat_kind)};
    }
    term_args_ = ws_.get<TermArgs>(static_cast<int64_t>(nterms));
    if (nterms > 0)
      check_cuda(cudaMemcpyAsync(term_args_, args.data(), nterms * sizeof(TermArgs), cudaMemcpyHostToDevice, s),
                 "copy term arguments");
  }

  // Q_0 (from setup), then `iterations` updates; with history, Q_t is copied to history[:, t] before
  // iteration t (inside the graph).
  void run(int64_t iterations, float* q_out, float* history) {
    setup();
    iterate(iterations, history != nullptr ? 1 : 0, [&](int64_t it, cudaStream_t st) {
      if (history != nullptr) store_history(history, it, iterations, q_, st);
    });
    profile_.run("store Q", [&] { to_label_major(q_, q_out); });
    profile_.report("mean_field");
  }

  // The vector-Jacobian product of run() (the CPU's MeanField::backward has the derivation): per iteration,
  // one transposed filter per term (the forward's splat and slice kernels, the blur axes reversed) and one fused
  // pixel kernel, plus the compat gradients' fixed-order contraction.
  void backward(int64_t iterations, const float* grad_q, const float* q, const float* history,
                const Gradients& grads) {
    setup();
    cudaStream_t s = p_.stream;
    const int64_t PS = P_ * S_;
    float* recomputed = nullptr;
    if (history == nullptr && iterations > 0) {  // checkpointing: recompute Q_0 .. Q_{T-1} (q_ ends as Q_T)
      recomputed = ws_.get<float>(iterations * PS);
      iterate(iterations, 2, [&](int64_t it, cudaStream_t st) {
        check_cuda(cudaMemcpyAsync(recomputed + it * PS, q_, PS * sizeof(float), cudaMemcpyDeviceToDevice, st),
                   "keep Q_t");
      });
    }
    const float* q_last = q_;
    if (history != nullptr || iterations == 0) {
      float* qt = ws_.get<float>(PS);
      to_pixel_major(q, qt, 0.0f);
      q_last = qt;
    }
    float* g = ws_.get<float>(PS);
    to_pixel_major(grad_q, g, 0.0f);
    float* gx = ws_.get<float>(PS);
    float* gu = ws_.get<float>(PS);
    float* gqi = p_.q_init != nullptr ? ws_.get<float>(PS) : nullptr;
    float* q_prev = history != nullptr ? ws_.get<float>(PS) : nullptr;
    // Per term, h = K^T gx for the compat gradient, and the contraction's partial sums.
    const size_t nterms = terms_.size();
    std::vector<float*> h(nterms, nullptr);
    std::vector<int> width(nterms, 0);
    int64_t max_width = 0;
    for (size_t k = 0; k < nterms; ++k) {
      if (k >= grads.compat.size() || grads.compat[k] == nullptr) continue;
      const int kind = p_.terms[k].compat_kind;
      width[k] = kind == lattice::kPotts ? 1 : kind == lattice::kDiagonal ? static_cast<int>(L_)
                                                                           : static_cast<int>(L_ * L_);
      max_width = std::max<int64_t>(max_width, width[k]);
      h[k] = ws_.get<float>(PS);
    }
    float** h_dev = ws_.get<float*>(static_cast<int64_t>(nterms));
    if (nterms > 0)
      check_cuda(cudaMemcpyAsync(h_dev, h.data(), nterms * sizeof(float*), cudaMemcpyHostToDevice, s), "copy h");
    const int64_t chunk_size = std::max<int64_t>(1024, (P_ + 65534) / 65535);
    const int64_t chunks = (P_ + chunk_size - 1) / chunk_size;
    float* partial = max_width > 0 ? ws_.get<float>(chunks * max_width) : nullptr;

    backward_pass(kBwdInit, g, q_last, gx, gu, iterations == 0 ? gqi : nullptr, nullptr, s);
    for (int64_t t = iterations; t >= 1; --t) {
      const float* qp = recomputed != nullptr ? recomputed + (t - 1) * PS : q_prev;
      if (recomputed == nullptr) load_history(history, t - 1, iterations, q_prev, s);
      for (TermState& term : terms_) {
        splat(term.lat, gx, term.post, S_, term.partial, term.a, s);
        if (blur(term.lat, term.a, term.b, S_, s, /*transpose=*/true) != term.blurred)
          throw Error("dense_crf (CUDA): internal error: transposed blur output buffer");
      }
      backward_pass(kBwdStep, nullptr, qp, gx, gu, t == 1 ? gqi : nullptr, h_dev, s);
      for (size_t k = 0; k < nterms; ++k) {
        if (h[k] == nullptr) continue;
        const int kind = p_.terms[k].compat_kind;
        const dim3 grid(static_cast<unsigned>((width[k] + kBlock - 1) / kBlock), static_cast<unsigned>(chunks));
        contract_kernel<<<grid, kBlock, 0, s>>>(h[k], qp, P_, chunk_size, static_cast<int>(S_),
                                                static_cast<int>(L_), kind, width[k], partial);
        check_launch("contract_kernel");
        // x += w K Q (Potts: dL/dw = +<h, Q>); x -= diag(w) K Q and x -= W K Q (dL/dw = -<h, Q>).
        const double sign = kind == lattice::kPotts ? 1.0 : -1.0;
        contract_sum_kernel<<<blocks_for(width[k]), kBlock, 0, s>>>(partial, chunks, width[k], sign,
                                                                   grads.compat[k]);
        check_launch("contract_sum_kernel");
      }
    }
    to_label_major(gu, grads.unary);
    if (gqi != nullptr && grads.q_init != nullptr) to_label_major(gqi, grads.q_init);
    profile_.report("mean_field_backward");
  }

  void energy(float* out) {
    setup();
    cudaStream_t s = p_.stream;
    filter_all(s);
    float* e = ws_.get<float>(P_ * S_);
    pixel_pass(kEnergy, e, s);
    to_label_major(e, out);
    profile_.report("pairwise_energy");
  }

 private:
  struct TermState {
    Lattice lat;
    const float* pre = nullptr;
    const float* post = nullptr;
    float* a = nullptr;
    float* b = nullptr;
    float* partial = nullptr;
    const float* blurred = nullptr;
  };

  // Runs `iterations` updates of q_ (as a CUDA graph unless disabled), calling before(it, stream) at the start of
  // each.
  template <typename Before>
  void iterate(int64_t iterations, int graph_kind, Before before) {
    cudaStream_t s = p_.stream;
    auto body = [&](cudaStream_t st) {
      for (int64_t it = 0; it < iterations; ++it) {
        before(it, st);
        if (!p_.terms.empty()) filter_all(st);
        profile_.run("slice + compat + softmax", [&] { pixel_pass(kUpdate, q_, st); });
      }
    };
    if (iterations > 0 && !p_.terms.empty()) {
      const bool graph = env::cuda_graph() && !env::profiling();
      if (graph) {
        run_as_graph(s, graph_kind, body);
      } else {
        body(s);
      }
    } else {
      body(s);  // no pairwise terms: every update is softmax(-unary)
    }
  }

  // history [B, T, N, S] <-> one iteration's [B * N, S]: B rows of N * S floats, T * N * S apart.
  void store_history(float* history, int64_t t, int64_t iterations, const float* src, cudaStream_t s) {
    copy_rows(history + t * N_ * S_, iterations * N_ * S_, src, N_ * S_, s);
  }
  void load_history(const float* history, int64_t t, int64_t iterations, float* dst, cudaStream_t s) {
    copy_rows(dst, N_ * S_, history + t * N_ * S_, iterations * N_ * S_, s);
  }
  void copy_rows(float* dst, int64_t dst_pitch, const float* src, int64_t src_pitch, cudaStream_t s) {
    const size_t width = static_cast<size_t>(N_ * S_) * sizeof(float);
    const int64_t max_pitch = std::numeric_limits<int32_t>::max();
    if (dst_pitch * static_cast<int64_t>(sizeof(float)) <= max_pitch &&
        src_pitch * static_cast<int64_t>(sizeof(float)) <= max_pitch) {
      check_cuda(cudaMemcpy2DAsync(dst, dst_pitch * sizeof(float), src, src_pitch * sizeof(float), width,
                                   static_cast<size_t>(B_), cudaMemcpyDeviceToDevice, s),
                 "history copy");
      return;
    }
    for (int64_t b = 0; b < B_; ++b)
      check_cuda(cudaMemcpyAsync(dst + b * dst_pitch, src + b * src_pitch, width, cudaMemcpyDeviceToDevice, s),
                 "history copy");
  }

  void to_pixel_major(const float* src, float* dst, float pad) {
    to_pixel_major_kernel<<<transpose_grid(N_, S_, B_), dim3(32, 8), 0, p_.stream>>>(src, dst, L_, N_, S_, pad);
    check_launch("to_pixel_major_kernel");
  }

  // The fields PixelArgs and BackwardArgs share: the terms, the pixel and label geometry, the mode.
  template <typename Args>
  Args per_pixel_args(int mode) const {
    Args a;
    a.terms = term_args_;
    a.num_terms = static_cast<int>(terms_.size());
    a.pixels = P_;
    a.L = static_cast<int>(L_);
    a.S = static_cast<int>(S_);
    a.C4 = static_cast<int>(S_ / 4);
    a.T = T_;
    a.mode = mode;
    return a;
  }

  void backward_pass(int mode, const float* g_in, const float* q, float* gx, float* gu, float* g_q_init,
                     float* const* h_out, cudaStream_t s) {
    BackwardArgs a = per_pixel_args<BackwardArgs>(mode);
    a.g_in = g_in;
    a.q = q;
    a.gx = gx;
    a.gu = gu;
    a.g_q_init = g_q_init;
    a.h_out = h_out;
    const bool matrix = matrix_ && mode == kBwdStep;
    launch_per_pixel(kBackwardKernels, a, NC_, matrix, s, "backward_kernel");
  }

  void filter_all(cudaStream_t s) {
    for (TermState& t : terms_) {
      profile_.run("splat", [&] { splat(t.lat, q_, t.pre, S_, t.partial, t.a, s); });
      profile_.run("blur", [&] {
        const float* out = blur(t.lat, t.a, t.b, S_, s);
        if (out != t.blurred) throw Error("dense_crf (CUDA): internal error: blur output buffer");
      });
    }
  }

  void pixel_pass(int mode, float* out, cudaStream_t s) {
    PixelArgs a = per_pixel_args<PixelArgs>(mode);
    a.unary = unary_;
    a.out = out;
    a.flags = status_;
    a.overflow_count = overflow_count_;
    a.overflow_list = overflow_list_;
    if (mode == kUpdate) check_cuda(cudaMemsetAsync(overflow_count_, 0, sizeof(int), s), "clear overflow count");
    const bool matrix = matrix_ && (mode == kUpdate || mode == kEnergy);
    launch_per_pixel(kPixelKernels, a, NC_, matrix, s, "pixel_kernel");
    if (mode == kUpdate) {  // almost always an empty list: the kernel reads the count and exits
      update_in_double_kernel<<<8, 128, 0, s>>>(a);
      check_launch("update_in_double_kernel");
    }
  }

  void to_label_major(const float* src, float* dst) {
    to_label_major_kernel<<<transpose_grid(N_, L_, B_), dim3(32, 8), 0, p_.stream>>>(src, dst, L_, N_, S_);
    check_launch("to_label_major_kernel");
  }

  const Problem& p_;
  const int64_t B_, L_, N_, P_, S_;
  int T_ = 1, NC_ = 1;
  Workspace ws_;
  Workspace scratch_;
  Profiler profile_;
  int* overflow_count_ = nullptr;     // pixels of the last update whose messages overflowed float32 ...
  int32_t* overflow_list_ = nullptr;  // ... and which they are, [P]
  int32_t* status_ = nullptr;  // [0]: flags; then 2 * kMaxDim key bounds per term
  float* unary_ = nullptr;     // [P, S]
  float* q_ = nullptr;         // [P, S]
  std::vector<TermState> terms_;
  TermArgs* term_args_ = nullptr;
  bool matrix_ = false;
};

void check_problem(const Problem& p) {
  if (p.allocator == nullptr) throw Error("dense_crf (CUDA): no allocator");
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(p.stream, &capturing), "cudaStreamIsCapturing");
  if (capturing != cudaStreamCaptureStatusNone) {
    throw Error("dense_crf: the CUDA op synchronises with the host (input checks, lattice sizes) and cannot be "
                "captured into a CUDA graph; call it outside the capture (its iterations already run as a graph)");
  }
  if (p.batch < 1 || p.num_labels < 1 || p.num_pixels < 1) throw Error("dense_crf (CUDA): empty problem");
  if (p.batch > 65535) throw Error("dense_crf: the CUDA kernels take at most 65535 images per call");
}

}  // namespace

void mean_field(const Problem& problem, int64_t iterations, float* q_out, float* history) {
  check_problem(problem);
  MeanField(problem).run(iterations, q_out, history);
}

void mean_field_backward(const Problem& problem, int64_t iterations, const float* grad_q, const float* q,
                         const float* history, const Gradients& grads) {
  check_problem(problem);
  if (problem.unary == nullptr) throw Error("dense_crf (CUDA): the backward needs the unary");
  MeanField(problem).backward(iterations, grad_q, q, history, grads);
}

void pairwise_energy(const Problem& problem, float* out) {
  check_problem(problem);
  if (problem.q_init == nullptr) throw Error("dense_crf: the pairwise energy needs marginals q");
  MeanField(problem).energy(out);
}

}  // namespace cuda
}  // namespace dense_crf
}  // namespace deeplab_fast
