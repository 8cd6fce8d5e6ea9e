// The permutohedral lattice on the CPU: built once per image and feature set, then used for every
// mean-field iteration as splat -> blur along d+1 axes (in place, chain by chain) -> slice.
//
// Layouts. Per pixel, its d+1 simplex vertices (lattice point ids) and barycentric weights are stored in blocks
// of kPixelBlock pixels, vertex-major inside a block: entry (i, r) is at (i / 16) (d+1) 16 + r 16 + i % 16, so that
// the r-th vertices of consecutive pixels are contiguous (the packed small-label slice loads them as vectors).
// Per lattice point, the pixels that splat onto it and their weights, in pixel order (a CSR list): the splat is a
// gather, each point summing its own contributions in registers in the reference's order (pixel order), with
// no read-modify-write through memory and nothing shared between threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#include "buffer.h"
#include "simd.h"

namespace deeplab_fast {
namespace dense_crf {
namespace cpu {

class PermutohedralLattice {
 public:
  static constexpr int kPixelBlock = 16;

  // One run of a point's contributions, all from one band of pixels: [begin, end) of its contribution list.
  struct Segment {
    int32_t point, begin, end;
  };

  // features: [d, N] row-major float32. stride: the number of values per pixel the splats will mostly carry (it
  // sizes the bands of pixels the splat works through). Throws (TORCH_CHECK) on oversize coordinates.
  PermutohedralLattice(const float* features, int d, int64_t num_pixels, int64_t stride = 1);

  int dim() const { return d_; }
  float alpha() const { return alpha_; }
  int64_t num_pixels() const { return n_; }
  int64_t num_points() const { return m_; }

  // Pixel i's r-th simplex vertex (a lattice point) and barycentric weight.
  int32_t vertex(int64_t i, int r) const { return vertex_[entry(i, r)]; }
  float weight(int64_t i, int r) const { return weight_[entry(i, r)]; }
  // The block holding pixel i: its vertices / weights for vertex r are at [r * kPixelBlock + i % kPixelBlock].
  const int32_t* vertex_block(int64_t i) const { return vertex_.data() + (i / kPixelBlock) * (d_ + 1) * kPixelBlock; }
  const float* weight_block(int64_t i) const { return weight_.data() + (i / kPixelBlock) * (d_ + 1) * kPixelBlock; }
  // The same for the weights times alpha (rounded, as pydensecrf's slice computes them): w_r * alpha.
  const float* weight_alpha_block(int64_t i) const {
    return weight_alpha_.data() + (i / kPixelBlock) * (d_ + 1) * kPixelBlock;
  }

  // Splats values [N, stride], each pixel's row first multiplied by scale[i] (when scale is not null), onto
  // the lattice and blurs them, into `out` (num_points() * stride values), which it returns. With transpose,
  // the blur runs its d+1 axes in reverse order: each axis blur is a symmetric [1/2, 1, 1/2] operator, so this
  // makes splat -> blur -> slice the transpose of the forward filter (Krähenbühl's
  // Permutohedral::compute(..., reverse=true)). T is float (the bit-exact path) or double.
  template <typename T>
  T* splat_blur(const T* values, const T* scale, int64_t stride, T* out, bool transpose = false) const;
  // The same for several lattices of the same pixels at once (lattice k with scales[k] into outs[k]): one pass
  // over the values for all of them.
  template <typename T>
  static void splat_blur_many(const PermutohedralLattice* const* lattices, size_t count, const T* values,
                              const T* const* scales, int64_t stride, T* const* outs, bool transpose = false);

  // Slices pixel i from blurred lattice values: out[0..stride) = sum_r alpha w_r lattice[vertex_r].
  // kSequentialOrder evaluates each term as (w * v) * alpha, as pydensecrf does for at most two values per
  // pixel; otherwise as (w * alpha) * v, as its SSE path does.
  template <bool kSequentialOrder, typename T>
  inline void slice_pixel(const T* __restrict lattice_values, int64_t stride, int64_t i, T* __restrict out) const {
    const int dp1 = d_ + 1;
    const int32_t* vert = vertex_block(i) + i % kPixelBlock;
    const float* w = weight_block(i) + i % kPixelBlock;
    for (int64_t k = 0; k < stride; ++k) out[k] = T(0);
    for (int r = 0; r < dp1; ++r) {
      const T* __restrict v = lattice_values + static_cast<int64_t>(vert[r * kPixelBlock]) * stride;
      const float wr_f = w[r * kPixelBlock];
      if (kSequentialOrder) {
        const T wr = wr_f, alpha = alpha_;
        for (int64_t k = 0; k < stride; ++k) out[k] += wr * v[k] * alpha;
      } else if constexpr (std::is_same<T, float>::value) {
        axpy(out, wr_f * alpha_, v, stride);
      } else {
        const T wa = static_cast<T>(wr_f) * static_cast<T>(alpha_);
        for (int64_t k = 0; k < stride; ++k) out[k] += wa * v[k];
      }
    }
  }

 private:
  struct SplatPart {
    int64_t p0, p1;  // the points a thread splats
    int64_t i0, i1;  // the pixels that touch them
  };
  const std::vector<SplatPart>& splat_parts(int64_t threads) const;
  template <typename T>
  void splat_gather(const T* values, const T* scale, int64_t stride, T* out) const;
  template <typename T>
  void prefetch_band(const T* values, const T* scale, int64_t stride, int64_t band) const;
  int64_t num_bands() const { return (n_ + band_pixels_ - 1) / band_pixels_; }
  int64_t entry(int64_t i, int r) const {
    return (i / kPixelBlock) * (d_ + 1) * kPixelBlock + r * kPixelBlock + i % kPixelBlock;
  }

  // Embeds the pixels, numbers the lattice points, lists each point's pixels and links the blur chains, with key
  // tables from make_table.
  template <typename MakeTable>
  void build(MakeTable make_table, const float* features, const float* scale, int key_bits);

  int d_;
  int64_t n_;
  int64_t m_ = 0;
  float alpha_;
  Buffer<int32_t> vertex_;  // [ceil(N / 16), d+1, 16] lattice point of each simplex vertex (padding pixels: 0)
  Buffer<float> weight_;    // [ceil(N / 16), d+1, 16] barycentric weights (padding pixels: 0)
  Buffer<float> weight_alpha_;  // the same times alpha
  // Per point p, its contributions [point_begin_[p], point_begin_[p+1]): pixel and weight, in pixel order.
  std::vector<int32_t> point_begin_;
  Buffer<int32_t> contrib_pixel_;
  Buffer<float> contrib_weight_;
  // The splat's work: groups_ groups of points (one per thread), each a list of segments in band order; group g's
  // segments of band b are segments_[group_band_begin_[g (bands + 1) + b] ...  + b + 1]).
  bool gather_ = false;  // the splat is a gather (else a scatter, over the blocked per-pixel arrays)
  int64_t band_pixels_ = 1;
  int64_t groups_ = 1;
  std::vector<Segment> segments_;
  std::vector<int64_t> group_band_begin_;
  std::vector<int32_t> empty_points_;  // points no pixel splats onto (their splatted value is 0)
  std::vector<int32_t> entries_, first_pixel_, last_pixel_;  // per point: contributions, first and last pixel
  mutable std::vector<SplatPart> splat_parts_;  // cached by splat_parts()
  mutable std::mutex splat_parts_mutex_;
  // Blur chains per axis j: chain c is chain_points_[j][chain_begin_[j][c] .. chain_begin_[j][c+1]), ordered
  // along +axis j; only chains of two or more points are kept.
  std::vector<std::vector<int64_t>> chain_begin_;
  std::vector<std::vector<int32_t>> chain_points_;
};

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
