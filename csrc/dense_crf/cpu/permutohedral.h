// The permutohedral lattice on the CPU: built once per image and feature set, then used for every
// mean-field iteration as splat (each thread owns a range of points and adds their pixels in pixel order, so
// the sums are deterministic) -> blur along d+1 axes (in place, chain by chain) -> slice.
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
  // features: [d, N] row-major float32. Throws (TORCH_CHECK) on oversize coordinates.
  PermutohedralLattice(const float* features, int d, int64_t num_pixels);

  int dim() const { return d_; }
  float alpha() const { return alpha_; }
  // The d+1 lattice points and barycentric weights of pixel i's enclosing simplex.
  const int32_t* vertices(int64_t i) const { return vertex_.data() + i * (d_ + 1); }
  const float* weights(int64_t i) const { return weight_.data() + i * (d_ + 1); }
  int64_t num_pixels() const { return n_; }
  int64_t num_points() const { return m_; }

  // Splats values [N, stride], each pixel's row first multiplied by scale[i] (when scale is not null), onto
  // the lattice and blurs them, into `out` (num_points() * stride values), which it returns. With transpose,
  // the blur runs its d+1 axes in reverse order: each axis blur is a symmetric [1/2, 1, 1/2] operator, so this
  // makes splat -> blur -> slice the transpose of the forward filter (Krähenbühl's
  // Permutohedral::compute(..., reverse=true)). T is float (the bit-exact path) or double.
  template <typename T>
  T* splat_blur(const T* values, const T* scale, int64_t stride, T* out, bool transpose = false) const;

  // Slices pixel i from blurred lattice values: out[0..stride) = sum_r alpha w_r lattice[vertex_r].
  // kSequentialOrder evaluates each term as (w * v) * alpha, as pydensecrf does for at most two values per
  // pixel; otherwise as (w * alpha) * v, as its SSE path does.
  template <bool kSequentialOrder, typename T>
  inline void slice_pixel(const T* __restrict lattice_values, int64_t stride, int64_t i, T* __restrict out) const {
    const int dp1 = d_ + 1;
    const int32_t* vert = vertex_.data() + i * dp1;
    const float* w = weight_.data() + i * dp1;
    for (int64_t k = 0; k < stride; ++k) out[k] = T(0);
    for (int r = 0; r < dp1; ++r) {
      const T* __restrict v = lattice_values + static_cast<int64_t>(vert[r]) * stride;
      if (kSequentialOrder) {
        const T wr = w[r], alpha = alpha_;
        for (int64_t k = 0; k < stride; ++k) out[k] += wr * v[k] * alpha;
      } else if constexpr (std::is_same<T, float>::value) {
        axpy(out, w[r] * alpha_, v, stride);
      } else {
        const T wa = static_cast<T>(w[r]) * static_cast<T>(alpha_);
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

  // Embeds the pixels, numbers the lattice points and links the blur chains, with key tables from make_table.
  template <typename MakeTable>
  void build(MakeTable make_table, const float* features, const float* scale);

  int d_;
  int64_t n_;
  int64_t m_ = 0;
  float alpha_;
  Buffer<int32_t> vertex_;               // [N, d+1] lattice point of each simplex vertex
  Buffer<float> weight_;                 // [N, d+1] barycentric weights
  std::vector<int32_t> first_pixel_;     // [M] the first pixel with the point as a vertex (N: none)
  std::vector<int32_t> last_pixel_;      // [M] the last such pixel (-1: none)
  std::vector<int32_t> entries_;         // [M] how many pixels have the point as a vertex
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
