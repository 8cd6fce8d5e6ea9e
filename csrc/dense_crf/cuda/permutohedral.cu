// The permutohedral lattice on the GPU: build (embed, pack, sort, number, chunk, link), splat and blur.
// See permutohedral.cuh for the design. No torch headers: memory comes from the caller's Allocator.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <climits>
#include <cstdio>
#include <string>

#include "../lattice_math.h"
#include "permutohedral.cuh"

namespace deeplab_fast {
namespace dense_crf {
namespace cuda {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw Error(std::string("dense_crf (CUDA): ") + what + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
}

void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

namespace {

constexpr int kFields = lattice::kMaxDim + 1;  // the image id, then d coordinates
constexpr int kMaxWords = kFields;             // every field is at most 32 bits: a generous bound

// Elevation scales, passed by value to the kernels.
struct Scales {
  float s[lattice::kMaxDim];
};

Scales make_scales(int d) {
  Scales sc{};
  for (int i = 0; i < d; ++i) sc.s[i] = lattice::elevation_scale(i, d);
  return sc;
}

// How a key (image b, coordinates c_0..c_{d-1}) is packed into `words` 64-bit words: field f (0: the image,
// 1 + i: coordinate i) holds value - lo[f] in bits [shift[f], shift[f] + bits[f]) of word[f]. Words compare in
// order (word 0 most significant), so the sorted order is (image, c_0, c_1, ...) lexicographic.
struct KeyLayout {
  int d = 0;
  int words = 0;
  int word[kFields];
  int shift[kFields];
  int bits[kFields];
  int32_t lo[kFields];
  int32_t hi[kFields];
  int word_bits[kMaxWords];  // bits used in each word (the radix sort's end_bit)
};

int bit_width(uint32_t range) {
  int b = 0;
  while (b < 32 && (static_cast<uint64_t>(range) >> b) != 0) ++b;
  return b;
}

KeyLayout make_layout(int d, int64_t batch, const int32_t* ranges) {
  KeyLayout k{};
  k.d = d;
  k.lo[0] = 0;
  k.hi[0] = static_cast<int32_t>(batch - 1);
  for (int i = 0; i < d; ++i) {
    k.lo[1 + i] = ranges[2 * i];
    k.hi[1 + i] = ranges[2 * i + 1];
  }
  // Fields fill a word from the top; a field that does not fit starts the next word.
  int w = 0, used = 0;
  for (int f = 0; f <= d; ++f) {
    const int b = bit_width(static_cast<uint32_t>(static_cast<int64_t>(k.hi[f]) - k.lo[f]));
    if (used + b > 64) {
      k.word_bits[w] = used;
      ++w;
      used = 0;
    }
    k.word[f] = w;
    k.bits[f] = b;
    k.shift[f] = used;  // provisional: offset from the top of the word's used bits
    used += b;
  }
  k.word_bits[w] = used;
  k.words = w + 1;
  for (int f = 0; f <= d; ++f) k.shift[f] = k.word_bits[k.word[f]] - k.shift[f] - k.bits[f];
  return k;
}

// Packs key (image, coords[0..d)) into out[0..words). False when a coordinate is outside the layout's ranges
// (then no lattice point has that key).
__device__ __forceinline__ bool pack_key(const KeyLayout& k, int64_t image, const int32_t* coords, uint64_t* out) {
  for (int w = 0; w < k.words; ++w) out[w] = 0;
  for (int f = 0; f <= k.d; ++f) {
    const int64_t v = f == 0 ? image : coords[f - 1];
    if (v < k.lo[f] || v > k.hi[f]) return false;
    if (k.bits[f] > 0) out[k.word[f]] |= static_cast<uint64_t>(v - k.lo[f]) << k.shift[f];
  }
  return true;
}

__device__ __forceinline__ void unpack_key(const KeyLayout& k, const uint64_t* words, int64_t* image, int32_t* coords) {
  for (int f = 0; f <= k.d; ++f) {
    const uint64_t field = k.bits[f] == 0 ? 0 : (words[k.word[f]] >> k.shift[f]) & (~0ull >> (64 - k.bits[f]));
    const int64_t v = static_cast<int64_t>(field) + k.lo[f];
    if (f == 0) {
      *image = v;
    } else {
      coords[f - 1] = static_cast<int32_t>(v);
    }
  }
}

// Pixel g of the batch (g < pixels: image g / N, pixel g % N) or phantom g - pixels (the zero feature vector of
// image g - pixels; see below). Writes its features to f.
__device__ __forceinline__ int64_t load_features(const float* features, int d, int64_t pixels, int64_t N, int64_t g,
                                                 float* f) {
  if (g >= pixels) {
    for (int j = 0; j < d; ++j) f[j] = 0.0f;
    return g - pixels;
  }
  const int64_t b = g / N, i = g - b * N;
  for (int j = 0; j < d; ++j) f[j] = features[(b * d + j) * N + i];
  return b;
}

__global__ void init_ranges_kernel(int32_t* ranges, int d) {
  const int i = threadIdx.x;
  if (i < d) {
    ranges[2 * i] = INT_MAX;
    ranges[2 * i + 1] = INT_MIN;
  }
}

// Pass 1 of the embedding: key ranges (warp-reduced, then atomicMin/Max: integer, so order-free) and oversize
// features.
template <int D>
__global__ void embed_ranges_kernel(const float* __restrict__ features, int d_rt, int64_t pixels, int64_t N,
                                    int64_t total, Scales sc, int32_t* ranges, int* flags) {
  constexpr int KD = D > 0 ? D : lattice::kMaxDim;
  const int d = D > 0 ? D : d_rt;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int32_t lo[KD], hi[KD];
  for (int i = 0; i < d; ++i) {
    lo[i] = INT_MAX;
    hi[i] = INT_MIN;
  }
  if (g < total) {
    float f[KD];
    int32_t keys[(KD + 1) * KD];
    float w[KD + 2];
    load_features(features, d, pixels, N, g, f);
    if (lattice::embed_point<D>(f, d, sc.s, keys, w)) {
      for (int r = 0; r <= d; ++r) {
        for (int i = 0; i < d; ++i) {
          lo[i] = min(lo[i], keys[r * d + i]);
          hi[i] = max(hi[i], keys[r * d + i]);
        }
      }
    } else {
      atomicOr(flags, kFeaturesOversize);
    }
  }
  for (int i = 0; i < d; ++i) {
    const int32_t l = __reduce_min_sync(0xffffffffu, lo[i]);
    const int32_t h = __reduce_max_sync(0xffffffffu, hi[i]);
    if ((threadIdx.x & 31) == 0 && l <= h) {
      atomicMin(ranges + 2 * i, l);
      atomicMax(ranges + 2 * i + 1, h);
    }
  }
}

// Pass 2: every entry e = g * (d+1) + r gets its weight and packed key (words[w * E + e]).
template <int D>
__global__ void embed_pack_kernel(const float* __restrict__ features, int d_rt, int64_t pixels, int64_t N,
                                  int64_t total, Scales sc, KeyLayout layout, float* __restrict__ weight,
                                  uint64_t* __restrict__ words, int64_t E) {
  constexpr int KD = D > 0 ? D : lattice::kMaxDim;
  const int d = D > 0 ? D : d_rt;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= total) return;
  float f[KD];
  int32_t keys[(KD + 1) * KD];
  float w[KD + 2];
  const int64_t image = load_features(features, d, pixels, N, g, f);
  lattice::embed_point<D>(f, d, sc.s, keys, w);  // in range: checked by pass 1
  uint64_t packed[kMaxWords];
  for (int r = 0; r <= d; ++r) {
    const int64_t e = g * (d + 1) + r;
    weight[e] = w[r];
    pack_key(layout, image, keys + r * d, packed);
    for (int k = 0; k < layout.words; ++k) words[k * E + e] = packed[k];
  }
}

__global__ void iota_kernel(int32_t* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = static_cast<int32_t>(i);
}

__global__ void gather_word_kernel(const uint64_t* __restrict__ word, const int32_t* __restrict__ perm,
                                   uint64_t* __restrict__ out, int64_t n) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < n) out[k] = word[perm[k]];
}

// head[k] = 1 where sorted entry k starts a new key; seg[k] = k there, else 0 (max-scanned into run starts).
__global__ void heads_kernel(const uint64_t* __restrict__ words, int nwords, const int32_t* __restrict__ perm,
                             int64_t E, int32_t* __restrict__ head, int32_t* __restrict__ seg) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= E) return;
  bool h = k == 0;
  if (!h) {
    const int32_t e = perm[k], e_prev = perm[k - 1];
    for (int w = 0; w < nwords && !h; ++w) h = words[w * E + e] != words[w * E + e_prev];
  }
  head[k] = h ? 1 : 0;
  seg[k] = h ? static_cast<int32_t>(k) : 0;
}

// Chunk starts: entries whose offset within their point's run is a multiple of kSplatChunk.
__global__ void chunk_heads_kernel(const int32_t* __restrict__ run_start, int64_t E, int32_t* __restrict__ chunk_head) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < E) chunk_head[k] = ((k - run_start[k]) % kSplatChunk) == 0 ? 1 : 0;
}

struct MaxOp {
  __device__ __forceinline__ int32_t operator()(int32_t a, int32_t b) const { return a > b ? a : b; }
};

struct FillArgs {
  const uint64_t* words;
  int nwords;
  const int32_t* perm;
  const int32_t* head;
  const int32_t* point1;  // inclusive scan of head: point id + 1
  const int32_t* chunk_head;
  const int32_t* chunk1;  // inclusive scan of chunk_head: chunk id + 1
  const float* weight;
  int64_t E, M, pixel_entries;
  int dp1;
  int32_t* vertex_point;
  int32_t* entry_pixel;
  float* entry_weight;
  int32_t* point_begin;
  int32_t* point_chunk;
  int32_t* chunk_begin;
  int32_t* chunk_point;
  uint64_t* ukeys;  // [nwords, M]
};

__global__ void fill_kernel(FillArgs a) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= a.E) return;
  const int32_t e = a.perm[k];
  const int32_t p = a.point1[k] - 1;
  if (e < a.pixel_entries) {
    a.vertex_point[e] = p;
    a.entry_pixel[k] = e / a.dp1;
  } else {
    a.entry_pixel[k] = -1;  // a phantom vertex: no pixel splats onto it
  }
  a.entry_weight[k] = a.weight[e];
  if (a.chunk_head[k]) {
    const int32_t c = a.chunk1[k] - 1;
    a.chunk_begin[c] = static_cast<int32_t>(k);
    a.chunk_point[c] = p;
    if (a.head[k]) a.point_chunk[p] = c;
  }
  if (a.head[k]) {
    a.point_begin[p] = static_cast<int32_t>(k);
    for (int w = 0; w < a.nwords; ++w) a.ukeys[w * a.M + p] = a.words[w * a.E + e];
  }
}

__global__ void set_tails_kernel(int32_t* point_begin, int64_t M, int32_t* chunk_begin, int64_t C, int64_t E) {
  point_begin[M] = static_cast<int32_t>(E);
  chunk_begin[C] = static_cast<int32_t>(E);
}

// Index of the point with key `q` (nwords words) among the M sorted unique keys, or -1.
__device__ __forceinline__ int32_t find_point(const uint64_t* __restrict__ ukeys, int nwords, int64_t M,
                                              const uint64_t* q) {
  int64_t lo = 0, hi = M;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    int cmp = 0;
    for (int w = 0; w < nwords && cmp == 0; ++w) {
      const uint64_t v = ukeys[w * M + mid];
      cmp = v < q[w] ? -1 : (v > q[w] ? 1 : 0);
    }
    if (cmp < 0) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  if (lo >= M) return -1;
  for (int w = 0; w < nwords; ++w)
    if (ukeys[w * M + lo] != q[w]) return -1;
  return static_cast<int32_t>(lo);
}

// Blur neighbours of point p along every axis j: n1 = key + (d+1) e_j - 1, n2 = key - (d+1) e_j + 1.
__global__ void neighbours_kernel(const uint64_t* __restrict__ ukeys, KeyLayout layout, int64_t M,
                                  int2* __restrict__ neighbours) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= M) return;
  const int d = layout.d;
  uint64_t words[kMaxWords];
  for (int w = 0; w < layout.words; ++w) words[w] = ukeys[w * M + p];
  int64_t image;
  int32_t key[lattice::kMaxDim], n1[lattice::kMaxDim], n2[lattice::kMaxDim];
  unpack_key(layout, words, &image, key);
  uint64_t q[kMaxWords];
  for (int j = 0; j <= d; ++j) {
    lattice::blur_neighbour_keys(key, d, j, n1, n2);
    int2 n;
    n.x = pack_key(layout, image, n1, q) ? find_point(ukeys, layout.words, M, q) : -1;
    n.y = pack_key(layout, image, n2, q) ? find_point(ukeys, layout.words, M, q) : -1;
    neighbours[j * M + p] = n;
  }
}

// Vector helpers: V is float or float4.
template <typename V>
struct Vec;
template <>
struct Vec<float> {
  static constexpr int kWidth = 1;
  __device__ static float zero() { return 0.0f; }
  __device__ static float one() { return 1.0f; }
  __device__ static float load(const float* p) { return *p; }
  __device__ static void store(float* p, float v) { *p = v; }
  __device__ static float fma_(float w, float x, float acc) { return acc + w * x; }
  __device__ static float scale(float x, float s) { return x * s; }
  __device__ static float add(float a, float b) { return a + b; }
  __device__ static float blur(float self, float n) { return self + 0.5f * n; }
};
template <>
struct Vec<float4> {
  static constexpr int kWidth = 4;
  __device__ static float4 zero() { return make_float4(0.0f, 0.0f, 0.0f, 0.0f); }
  __device__ static float4 one() { return make_float4(1.0f, 1.0f, 1.0f, 1.0f); }
  __device__ static float4 load(const float* p) { return *reinterpret_cast<const float4*>(p); }
  __device__ static void store(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
  __device__ static float4 fma_(float w, float4 x, float4 acc) {
    return make_float4(acc.x + w * x.x, acc.y + w * x.y, acc.z + w * x.z, acc.w + w * x.w);
  }
  __device__ static float4 scale(float4 x, float s) { return make_float4(x.x * s, x.y * s, x.z * s, x.w * s); }
  __device__ static float4 add(float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }
  __device__ static float4 blur(float4 self, float4 n) {
    return make_float4(self.x + 0.5f * n.x, self.y + 0.5f * n.y, self.z + 0.5f * n.z, self.w + 0.5f * n.w);
  }
};

// Splat, pass 1: thread (chunk c, lane v) sums its chunk's entries in order. A point with one chunk is done
// (written to out); the others leave their chunk sums in partial.
template <typename V>
__global__ void splat_chunks_kernel(Lattice lat, const float* __restrict__ values, const float* __restrict__ scale,
                                    int64_t stride, int lanes, float* __restrict__ partial, float* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t c = t / lanes;
  if (c >= lat.chunks) return;
  const int64_t col = (t - c * lanes) * Vec<V>::kWidth;
  const int32_t k0 = lat.chunk_begin[c], k1 = lat.chunk_begin[c + 1];
  const int32_t p = lat.chunk_point[c];
  V acc = Vec<V>::zero();
  for (int32_t k = k0; k < k1; ++k) {
    const int32_t g = lat.entry_pixel[k];
    if (g < 0) continue;
    V x = values != nullptr ? Vec<V>::load(values + static_cast<int64_t>(g) * stride + col) : Vec<V>::one();
    if (scale != nullptr) x = Vec<V>::scale(x, scale[g]);
    acc = Vec<V>::fma_(lat.entry_weight[k], x, acc);
  }
  const bool single = lat.point_begin[p + 1] - lat.point_begin[p] <= kSplatChunk;
  Vec<V>::store((single ? out + static_cast<int64_t>(p) * stride : partial + c * stride) + col, acc);
}

// Splat, pass 2: points with several chunks add their chunk sums in chunk order.
template <typename V>
__global__ void splat_points_kernel(Lattice lat, int64_t stride, int lanes, const float* __restrict__ partial,
                                    float* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t p = t / lanes;
  if (p >= lat.points) return;
  const int32_t count = lat.point_begin[p + 1] - lat.point_begin[p];
  if (count <= kSplatChunk) return;
  const int64_t col = (t - p * lanes) * Vec<V>::kWidth;
  const int32_t c0 = lat.point_chunk[p], nc = (count + kSplatChunk - 1) / kSplatChunk;
  V acc = Vec<V>::zero();
  for (int32_t c = c0; c < c0 + nc; ++c) acc = Vec<V>::add(acc, Vec<V>::load(partial + c * stride + col));
  Vec<V>::store(out + p * stride + col, acc);
}

template <typename V>
__global__ void blur_kernel(const int2* __restrict__ neighbours, int64_t M, int64_t stride, int lanes,
                            const float* __restrict__ in, float* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t p = t / lanes;
  if (p >= M) return;
  const int64_t col = (t - p * lanes) * Vec<V>::kWidth;
  const int2 n = neighbours[p];
  V s = Vec<V>::zero();
  if (n.x >= 0) s = Vec<V>::load(in + static_cast<int64_t>(n.x) * stride + col);
  if (n.y >= 0) s = Vec<V>::add(s, Vec<V>::load(in + static_cast<int64_t>(n.y) * stride + col));
  Vec<V>::store(out + p * stride + col, Vec<V>::blur(Vec<V>::load(in + p * stride + col), s));
}

// Launches kernel<D> for the compile-time dimensions DeepLab uses (2: position, 5: position + colour, 3) or the
// generic one.
template <template <int> class K, typename... Args>
void launch_by_dim(int d, unsigned blocks, cudaStream_t stream, Args... args) {
  switch (d) {
    case 2: K<2>::launch(blocks, stream, args...); break;
    case 3: K<3>::launch(blocks, stream, args...); break;
    case 5: K<5>::launch(blocks, stream, args...); break;
    default: K<0>::launch(blocks, stream, args...); break;
  }
}

template <int D>
struct EmbedRanges {
  template <typename... Args>
  static void launch(unsigned blocks, cudaStream_t stream, Args... args) {
    embed_ranges_kernel<D><<<blocks, kBlock, 0, stream>>>(args...);
  }
};

template <int D>
struct EmbedPack {
  template <typename... Args>
  static void launch(unsigned blocks, cudaStream_t stream, Args... args) {
    embed_pack_kernel<D><<<blocks, kBlock, 0, stream>>>(args...);
  }
};

// pydensecrf's SSE lattice builder embeds pixels four at a time; when N is not a multiple of 4 its zero-feature
// padding lanes insert their simplex's vertices too. Those points receive no splat but pass values along in the
// blur, so, as the CPU path does (cpu/permutohedral.cpp), every image gets them: one phantom "pixel" per image.
int64_t phantoms(int64_t batch, int64_t N) { return N % 4 != 0 ? batch : 0; }

}  // namespace

void embed_ranges(const float* features, int d, int64_t batch, int64_t N, int32_t* ranges, int* flags,
                  cudaStream_t stream) {
  init_ranges_kernel<<<1, 32, 0, stream>>>(ranges, d);
  check_launch("init_ranges_kernel");
  const int64_t pixels = batch * N, total = pixels + phantoms(batch, N);
  launch_by_dim<EmbedRanges>(d, blocks_for(total), stream, features, d, pixels, N, total, make_scales(d), ranges,
                             flags);
  check_launch("embed_ranges_kernel");
}

Lattice build_lattice(const float* features, int d, int64_t batch, int64_t N, const int32_t* ranges,
                      cudaStream_t stream, Workspace& ws, Workspace& scratch) {
  const int dp1 = d + 1;
  const int64_t pixels = batch * N, total = pixels + phantoms(batch, N);
  const int64_t E = total * dp1;
  if (E >= INT_MAX) {
    throw Error("dense_crf: too many pixels for one lattice on CUDA: B * N * (d + 1) = " + std::to_string(E) +
                " must stay below 2^31; split the batch");
  }
  const KeyLayout layout = make_layout(d, batch, ranges);
  const int W = layout.words;

  // 1. Weights and packed keys of every entry.
  float* weight = ws.get<float>(E);
  uint64_t* words = scratch.get<uint64_t>(W * E);
  launch_by_dim<EmbedPack>(d, blocks_for(total), stream, features, d, pixels, N, total, make_scales(d), layout,
                           weight, words, E);
  check_launch("embed_pack_kernel");

  // 2. Stable LSD radix sort of the entries by key, least significant word first.
  const int n = static_cast<int>(E);
  int32_t* perm = scratch.get<int32_t>(E);
  int32_t* perm_tmp = scratch.get<int32_t>(E);
  uint64_t* key_in = scratch.get<uint64_t>(E);
  uint64_t* key_out = scratch.get<uint64_t>(E);
  iota_kernel<<<blocks_for(E), kBlock, 0, stream>>>(perm, E);
  check_launch("iota_kernel");
  size_t sort_bytes = 0;
  check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, key_in, key_out, perm, perm_tmp, n, 0, 64, stream),
             "cub::DeviceRadixSort::SortPairs (size)");
  void* sort_tmp = scratch.get<char>(static_cast<int64_t>(sort_bytes));
  for (int w = W - 1; w >= 0; --w) {
    if (layout.word_bits[w] == 0) continue;  // every key has the same word: nothing to order
    gather_word_kernel<<<blocks_for(E), kBlock, 0, stream>>>(words + w * E, perm, key_in, E);
    check_launch("gather_word_kernel");
    check_cuda(cub::DeviceRadixSort::SortPairs(sort_tmp, sort_bytes, key_in, key_out, perm, perm_tmp, n, 0,
                                               layout.word_bits[w], stream),
               "cub::DeviceRadixSort::SortPairs");
    std::swap(perm, perm_tmp);
  }

  // 3. Number the points (runs of equal keys) and the splat chunks, in sorted order.
  int32_t* head = scratch.get<int32_t>(E);
  int32_t* seg = scratch.get<int32_t>(E);
  int32_t* point1 = scratch.get<int32_t>(E);
  int32_t* run_start = scratch.get<int32_t>(E);
  int32_t* chunk_head = scratch.get<int32_t>(E);
  int32_t* chunk1 = scratch.get<int32_t>(E);
  heads_kernel<<<blocks_for(E), kBlock, 0, stream>>>(words, W, perm, E, head, seg);
  check_launch("heads_kernel");
  size_t scan_bytes = 0, max_bytes = 0;
  check_cuda(cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, head, point1, n, stream), "cub scan (size)");
  check_cuda(cub::DeviceScan::InclusiveScan(nullptr, max_bytes, seg, run_start, MaxOp(), n, stream),
             "cub max scan (size)");
  void* scan_tmp = scratch.get<char>(static_cast<int64_t>(std::max(scan_bytes, max_bytes)));
  check_cuda(cub::DeviceScan::InclusiveSum(scan_tmp, scan_bytes, head, point1, n, stream), "cub scan (points)");
  check_cuda(cub::DeviceScan::InclusiveScan(scan_tmp, max_bytes, seg, run_start, MaxOp(), n, stream),
             "cub max scan (runs)");
  chunk_heads_kernel<<<blocks_for(E), kBlock, 0, stream>>>(run_start, E, chunk_head);
  check_launch("chunk_heads_kernel");
  check_cuda(cub::DeviceScan::InclusiveSum(scan_tmp, scan_bytes, chunk_head, chunk1, n, stream), "cub scan (chunks)");

  // The host needs M and C to size the point buffers: the build's one synchronisation.
  int32_t counts[2] = {0, 0};
  check_cuda(cudaMemcpyAsync(&counts[0], point1 + (E - 1), sizeof(int32_t), cudaMemcpyDeviceToHost, stream),
             "copy M");
  check_cuda(cudaMemcpyAsync(&counts[1], chunk1 + (E - 1), sizeof(int32_t), cudaMemcpyDeviceToHost, stream),
             "copy C");
  check_cuda(cudaStreamSynchronize(stream), "lattice build");
  const int64_t M = counts[0], C = counts[1];

  // 4. CSR splat lists, vertex -> point map, chunk table and the sorted unique keys.
  Lattice lat;
  lat.d = d;
  lat.alpha = lattice::slice_alpha(d);
  lat.pixels = pixels;
  lat.entries = E;
  lat.points = M;
  lat.chunks = C;
  FillArgs fa;
  fa.words = words;
  fa.nwords = W;
  fa.perm = perm;
  fa.head = head;
  fa.point1 = point1;
  fa.chunk_head = chunk_head;
  fa.chunk1 = chunk1;
  fa.weight = weight;
  fa.E = E;
  fa.M = M;
  fa.pixel_entries = pixels * dp1;
  fa.dp1 = dp1;
  fa.vertex_point = ws.get<int32_t>(pixels * dp1);
  fa.entry_pixel = ws.get<int32_t>(E);
  fa.entry_weight = ws.get<float>(E);
  fa.point_begin = ws.get<int32_t>(M + 1);
  fa.point_chunk = ws.get<int32_t>(M);
  fa.chunk_begin = ws.get<int32_t>(C + 1);
  fa.chunk_point = ws.get<int32_t>(C);
  fa.ukeys = scratch.get<uint64_t>(W * M);
  fill_kernel<<<blocks_for(E), kBlock, 0, stream>>>(fa);
  check_launch("fill_kernel");
  set_tails_kernel<<<1, 1, 0, stream>>>(fa.point_begin, M, fa.chunk_begin, C, E);
  check_launch("set_tails_kernel");
  lat.vertex_point = fa.vertex_point;
  lat.weight = weight;
  lat.entry_pixel = fa.entry_pixel;
  lat.entry_weight = fa.entry_weight;
  lat.point_begin = fa.point_begin;
  lat.point_chunk = fa.point_chunk;
  lat.chunk_begin = fa.chunk_begin;
  lat.chunk_point = fa.chunk_point;

  // 5. Blur neighbours.
  int2* neighbours = ws.get<int2>(dp1 * M);
  neighbours_kernel<<<blocks_for(M), kBlock, 0, stream>>>(fa.ukeys, layout, M, neighbours);
  check_launch("neighbours_kernel");
  lat.neighbours = neighbours;
  return lat;
}

void splat(const Lattice& lat, const float* values, const float* scale, int64_t stride, float* partial, float* out,
           cudaStream_t stream) {
  if (stride % 4 == 0) {
    const int lanes = static_cast<int>(stride / 4);
    splat_chunks_kernel<float4><<<blocks_for(lat.chunks * lanes), kBlock, 0, stream>>>(lat, values, scale, stride,
                                                                                      lanes, partial, out);
    check_launch("splat_chunks_kernel");
    splat_points_kernel<float4><<<blocks_for(lat.points * lanes), kBlock, 0, stream>>>(lat, stride, lanes, partial,
                                                                                      out);
  } else {
    const int lanes = static_cast<int>(stride);
    splat_chunks_kernel<float><<<blocks_for(lat.chunks * lanes), kBlock, 0, stream>>>(lat, values, scale, stride,
                                                                                     lanes, partial, out);
    check_launch("splat_chunks_kernel");
    splat_points_kernel<float><<<blocks_for(lat.points * lanes), kBlock, 0, stream>>>(lat, stride, lanes, partial,
                                                                                     out);
  }
  check_launch("splat_points_kernel");
}

float* blur(const Lattice& lat, float* a, float* b, int64_t stride, cudaStream_t stream, bool transpose) {
  const int lanes = static_cast<int>(stride % 4 == 0 ? stride / 4 : stride);
  const unsigned blocks = blocks_for(lat.points * lanes);
  for (int step = 0; step <= lat.d; ++step) {
    const int j = transpose ? lat.d - step : step;
    const int2* nb = lat.neighbours + j * lat.points;
    if (stride % 4 == 0) {
      blur_kernel<float4><<<blocks, kBlock, 0, stream>>>(nb, lat.points, stride, lanes, a, b);
    } else {
      blur_kernel<float><<<blocks, kBlock, 0, stream>>>(nb, lat.points, stride, lanes, a, b);
    }
    check_launch("blur_kernel");
    std::swap(a, b);
  }
  return a;
}

}  // namespace cuda
}  // namespace dense_crf
}  // namespace deeplab_fast
