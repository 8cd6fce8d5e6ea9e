// Tap skipping for atrous (dilated) convolutions: the output split into rectangles whose set of in-bounds
// filter taps is constant. Torch-free and host/device neutral; used by the CPU path (cpu/) and the CUDA
// launcher (cuda/), and exposed to Python for tests (deeplab_fast.ops.atrous_conv2d_plan).
//
// Output row p reads input row  ih = p * stride_h - pad_h + r * dilation_h  for filter row r in [0, R). A tap
// row r is in bounds for p iff 0 <= ih < H, which holds on an interval of p; so the in-bounds rows of a given
// output row form an interval [r_begin, r_end) of taps, and the output rows fall into at most 2R + 1 bands
// with a constant interval (the band edges are where some tap enters or leaves the image). Columns likewise.
// A region is a (row band) x (column band) rectangle. Inside it every tap of [r_begin, r_end) x
// [s_begin, s_end) is in bounds for every output pixel and every other tap reads only zero padding, so the
// region is an unpadded convolution of the input window starting at (in_h, in_w) with the sub-filter
// weight[:, :, r_begin:r_end, s_begin:s_end] (dilation and stride unchanged): GEMM K shrinks to
// C x (valid taps). A region with no valid tap is the epilogue of zero (relu(bias), bias or 0).
//
// Example (DeepLab v3 ASPP, 3x3, rate 18 = padding, 33x33): rows [0,15) use taps {1,2}, [15,18) {1},
// [18,33) {0,1}; 9 regions, 3.6 of 9 taps per output pixel on average.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace deeplab_fast {
namespace atrous_conv {

// One output rectangle [p_begin, p_end) x [q_begin, q_end) and its in-bounds taps.
struct TapRegion {
  int64_t p_begin, p_end, q_begin, q_end;  // output rows / columns, half-open
  int64_t r_begin, r_end, s_begin, s_end;  // in-bounds filter rows / columns, half-open (may be empty)
  int64_t in_h, in_w;                      // input row / column read by tap (r_begin, s_begin) at (p_begin, q_begin)

  int64_t rows() const { return p_end - p_begin; }
  int64_t cols() const { return q_end - q_begin; }
  int64_t taps() const { return (r_end - r_begin) * (s_end - s_begin); }
  bool empty_taps() const { return r_end <= r_begin || s_end <= s_begin; }
};

// One output band along one axis and its in-bounds tap interval.
struct TapBand {
  int64_t out_begin, out_end;   // output index range, half-open
  int64_t tap_begin, tap_end;   // in-bounds taps, half-open (tap_begin >= tap_end: none)
};

// Output size of one axis: floor((in + 2 pad - dilation (taps - 1) - 1) / stride) + 1, or 0 when the dilated
// filter does not fit in the padded input. No intermediate overflows int64 for in >= 0, taps >= 1, stride and
// dilation >= 1 and in + 2 pad < 2^63 (check_args bounds in + 2 pad by 2^62): dilation (taps - 1) is only formed
// once it is known to be <= in + 2 pad - 1.
inline int64_t conv_output_size(int64_t in, int64_t taps, int64_t stride, int64_t pad, int64_t dilation) {
  const int64_t reach = in + 2 * pad - 1;  // last padded input index
  if (reach < 0 || taps - 1 > reach / dilation) return 0;
  return (reach - dilation * (taps - 1)) / stride + 1;
}

namespace detail {

// floor(a / b) and ceil(a / b) for b > 0 and any sign of a.
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// The in-bounds taps of output index o: taps t with 0 <= o*stride - pad + t*dilation < in.
inline void valid_taps(int64_t o, int64_t in, int64_t taps, int64_t stride, int64_t pad, int64_t dilation,
                       int64_t* begin, int64_t* end) {
  const int64_t base = o * stride - pad;
  int64_t b = ceil_div(-base, dilation);                  // first t with base + t*d >= 0
  int64_t e = floor_div(in - 1 - base, dilation) + 1;     // one past the last t with base + t*d <= in - 1
  if (b < 0) b = 0;
  if (e > taps) e = taps;
  if (e < b) e = b;
  *begin = b;
  *end = e;
}

}  // namespace detail

// The bands of one axis, in order, covering [0, out). Adjacent output indices with the same tap interval
// share a band. The interval of o changes only where o*stride crosses pad - t*d or in - 1 + pad - t*d (a
// tap enters or leaves), so walking those at most 2*taps candidate edges is O(taps), not O(out).
inline std::vector<TapBand> tap_bands(int64_t in, int64_t out, int64_t taps, int64_t stride, int64_t pad,
                                      int64_t dilation) {
  std::vector<int64_t> edges{0, out};
  for (int64_t t = 0; t < taps; ++t) {
    // First o with o*stride - pad + t*d >= 0, and first o with o*stride - pad + t*d >= in.
    for (const int64_t threshold : {pad - t * dilation, in + pad - t * dilation}) {
      const int64_t o = detail::ceil_div(threshold, stride);
      if (o > 0 && o < out) edges.push_back(o);
    }
  }
  std::sort(edges.begin(), edges.end());
  edges.erase(std::unique(edges.begin(), edges.end()), edges.end());
  std::vector<TapBand> bands;
  for (size_t i = 0; i + 1 < edges.size(); ++i) {
    TapBand band{edges[i], edges[i + 1], 0, 0};
    detail::valid_taps(band.out_begin, in, taps, stride, pad, dilation, &band.tap_begin, &band.tap_end);
    if (band.tap_end <= band.tap_begin) band.tap_begin = band.tap_end = 0;
    if (!bands.empty() && bands.back().tap_begin == band.tap_begin && bands.back().tap_end == band.tap_end) {
      bands.back().out_end = band.out_end;
    } else {
      bands.push_back(band);
    }
  }
  return bands;
}

// The regions of a whole convolution: the product of the row and column bands (row-major order).
inline std::vector<TapRegion> tap_regions(int64_t H, int64_t W, int64_t R, int64_t S, int64_t stride_h,
                                          int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                                          int64_t dilation_w) {
  const int64_t P = conv_output_size(H, R, stride_h, pad_h, dilation_h);
  const int64_t Q = conv_output_size(W, S, stride_w, pad_w, dilation_w);
  std::vector<TapRegion> regions;
  if (P <= 0 || Q <= 0) return regions;
  const std::vector<TapBand> rows = tap_bands(H, P, R, stride_h, pad_h, dilation_h);
  const std::vector<TapBand> cols = tap_bands(W, Q, S, stride_w, pad_w, dilation_w);
  for (const TapBand& r : rows) {
    for (const TapBand& c : cols) {
      TapRegion g;
      g.p_begin = r.out_begin;
      g.p_end = r.out_end;
      g.q_begin = c.out_begin;
      g.q_end = c.out_end;
      g.r_begin = r.tap_begin;
      g.r_end = r.tap_end;
      g.s_begin = c.tap_begin;
      g.s_end = c.tap_end;
      g.in_h = r.out_begin * stride_h - pad_h + r.tap_begin * dilation_h;
      g.in_w = c.out_begin * stride_w - pad_w + c.tap_begin * dilation_w;
      regions.push_back(g);
    }
  }
  return regions;
}

// Input extent that an unpadded convolution needs to produce `out` outputs with `taps` taps.
inline int64_t region_input_extent(int64_t out, int64_t taps, int64_t stride, int64_t dilation) {
  return (out - 1) * stride + (taps - 1) * dilation + 1;
}

// Multiply-accumulates per output channel and input channel with tap skipping, and without it.
inline void tap_work(const std::vector<TapRegion>& regions, int64_t R, int64_t S, int64_t* with_skipping,
                     int64_t* without) {
  int64_t a = 0, b = 0;
  for (const TapRegion& g : regions) {
    a += g.rows() * g.cols() * (g.empty_taps() ? 0 : g.taps());
    b += g.rows() * g.cols() * R * S;
  }
  *with_skipping = a;
  *without = b;
}

}  // namespace atrous_conv
}  // namespace deeplab_fast
