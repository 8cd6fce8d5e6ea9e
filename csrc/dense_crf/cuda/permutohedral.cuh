// The permutohedral lattice on the GPU (internal to cuda/): built once per call for every pairwise term, for the
// whole batch at once, then used by every mean-field iteration as splat -> blur -> slice.
//
// Build (Adams, Baek & Davis 2010, sections 3-4; the maths is lattice_math.h, shared with the CPU):
//   1. embed every pixel: its d+1 simplex vertices and barycentric weights; the key ranges are reduced on the
//      way, so that keys can be packed exactly into 64-bit words (image id first, then the coordinates);
//   2. sort the (key, entry) pairs with CUB's radix sort (stable, so deterministic): one pass per 64-bit word,
//      least significant word first; equal keys become runs, numbered in key order by a scan;
//   3. CSR for the splat: a point's entries are a contiguous run of the sorted order, in pixel order. Runs are
//      cut into chunks of at most kSplatChunk entries, so the few points with thousands of pixels (flat regions
//      under the bilateral kernel) do not serialise the splat;
//   4. blur neighbours of every point along each of the d+1 axes, by binary search in the sorted unique keys.
// Every reduction runs in a fixed order, so results are bitwise identical from run to run: no float atomics.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../dense_crf.h"  // InputFlag: bad input, OR-ed into a device word and read at the first host sync
#include "dense_crf_cuda.h"

namespace deeplab_fast {
namespace dense_crf {
namespace cuda {

// Entries per splat chunk.
constexpr int kSplatChunk = 32;
// Threads per block for the element-wise kernels.
constexpr int kBlock = 256;

// Throws Error("dense_crf (CUDA): <what>: <CUDA error>") unless e is cudaSuccess.
void check_cuda(cudaError_t e, const char* what);
// Checks the last kernel launch.
void check_launch(const char* kernel);

inline unsigned blocks_for(int64_t threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, (threads + kBlock - 1) / kBlock));
}

// Working memory carved from the caller's Allocator; lives until the call returns.
struct Workspace {
  Allocator* allocator;
  template <typename T>
  T* get(int64_t count) {
    return static_cast<T*>(allocator->allocate(sizeof(T) * static_cast<size_t>(std::max<int64_t>(count, 1))));
  }
};

// One term's lattice for the whole batch. Points are numbered by (image, key), so image b's points come before
// image b+1's.
struct Lattice {
  int d = 0;
  float alpha = 0.0f;       // slice scaling (lattice::slice_alpha)
  int64_t pixels = 0;       // B * N
  int64_t entries = 0;      // E = (pixels + phantoms) * (d + 1)
  int64_t points = 0;       // M
  int64_t chunks = 0;       // C
  const int32_t* vertex_point = nullptr;  // [pixels * (d+1)]: lattice point of each pixel's vertex r
  const float* weight = nullptr;          // [pixels * (d+1)]: its barycentric weight
  const int32_t* entry_pixel = nullptr;   // [E] in sorted order: the pixel (b * N + i), or -1 for a phantom
  const float* entry_weight = nullptr;    // [E] in sorted order: the weight
  const int32_t* point_begin = nullptr;   // [M + 1]: point p's entries are [point_begin[p], point_begin[p+1])
  const int32_t* point_chunk = nullptr;   // [M]: the first chunk of point p
  const int32_t* chunk_begin = nullptr;   // [C + 1]: chunk c's entries are [chunk_begin[c], chunk_begin[c+1])
  const int32_t* chunk_point = nullptr;   // [C]: the point of chunk c
  const int2* neighbours = nullptr;       // [(d+1) * M]: (n1, n2) along axis j of point p at j * M + p; -1: none
};

// The first half of a lattice build: embeds every pixel to find the key ranges and bad features. Queues kernels
// only; the host reads `ranges` ([2 * d] ints: lo, hi per coordinate) and `flags` after a sync.
void embed_ranges(const float* features, int d, int64_t batch, int64_t num_pixels, int32_t* ranges, int* flags,
                  cudaStream_t stream);

// The second half: packs, sorts and numbers the lattice points (one host sync, for M and C), then links the
// blur neighbours. `ranges` is the host copy of embed_ranges' result. The lattice's arrays come from `ws`; the
// temporaries (keys, sort and scan buffers: about 64 + 8 W bytes per entry) from `scratch`, which the caller
// may release once this returns.
Lattice build_lattice(const float* features, int d, int64_t batch, int64_t num_pixels, const int32_t* ranges,
                      cudaStream_t stream, Workspace& ws, Workspace& scratch);

// Splat: lattice[p, :] = sum over p's entries (pixel i, weight w) of w * (scale[i] * values[i, :]), into `out`
// ([M, stride]); `partial` ([C, stride]) holds the chunk sums of points with more than one chunk. values == nullptr
// splats ones (stride 1); scale == nullptr means 1. stride is 1 or a multiple of 4.
void splat(const Lattice& lat, const float* values, const float* scale, int64_t stride, float* partial, float* out,
           cudaStream_t stream);

// Blur along the d+1 axes in turn, v <- v + (v[n1] + v[n2]) / 2 (missing neighbours are 0), ping-ponging between
// a ([M, stride], holding the splat) and b. Returns the buffer holding the result. With transpose the axes run in
// reverse order: each axis blur is symmetric, so splat -> blur(transpose) -> slice is the transposed filter.
float* blur(const Lattice& lat, float* a, float* b, int64_t stride, cudaStream_t stream, bool transpose = false);

}  // namespace cuda
}  // namespace dense_crf
}  // namespace deeplab_fast
