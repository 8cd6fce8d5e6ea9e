// Mean-field inference for the fully connected CRF on the CPU.
//
// Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials",
// NIPS 2011, algorithm 1: Q <- softmax(-unary - sum_k compat_k(K_k Q)), with each K_k Q evaluated on a
// permutohedral lattice. Arithmetic follows pydensecrf's DenseCRF::inference step for step.
//
// Data layout: per image, marginals and unaries are [N, S] with the labels contiguous per pixel and the
// label stride S rounded up to a multiple of 8 (padding lanes: 0 in Q, +inf in the unary), so every inner
// loop over labels is a whole number of vectors. Work is split with at::parallel_for over lattice points
// (splat, blur) and pixels (slice + compat + unary + softmax, fused in one pass); every output element is
// computed by one thread in a fixed order, so results are bitwise identical for any thread count.
//
// Per-stage timings go to stderr with DEEPLAB_FAST_PROFILE=1.
#include "common/parallel.h"
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../dense_crf.h"
#include "permutohedral.h"
#include "simd.h"
#include "stage_timer.h"

namespace deeplab_fast {
namespace dense_crf {
namespace cpu {

namespace {

constexpr int64_t kPixelGrain = 1024;
// Pixels per block of the compat-gradient reduction: a fixed size, so that the sums (per block in pixel order,
// then over blocks in block order) do not depend on the thread count.
constexpr int64_t kGradBlock = 1024;
constexpr float kInfF = std::numeric_limits<float>::infinity();

template <typename T>
constexpr T inf() {
  return std::numeric_limits<T>::infinity();
}

// One pairwise term, prepared for iteration: its lattice and per-pixel normalisation factors.
template <typename T>
struct Term {
  const PairwiseTerm<T>* spec;
  std::unique_ptr<PermutohedralLattice> lattice;
  std::vector<T> pre;     // per-pixel factor applied before filtering (empty: none)
  std::vector<T> post;    // per-pixel factor applied after filtering (empty: none)
  std::vector<T> compat_padded;  // diagonal: [S]; matrix: [L, S] (rows padded with zeros); else empty
  Buffer<T> lattice_values;  // [M, S]; every row is written by the splat before it is read
  const T* blurred = nullptr;
};

// out[0..S) = pixel i's slice of the term's blurred lattice values, in pydensecrf's order for this label count.
template <typename T>
DLF_INLINE void slice_term(const Term<T>& term, bool sequential, int64_t S, int64_t i, T* __restrict out) {
  if (sequential) {
    term.lattice->template slice_pixel<true>(term.blurred, S, i, out);
  } else {
    term.lattice->template slice_pixel<false>(term.blurred, S, i, out);
  }
}

// The same slice for a label stride of exactly 8 C, into C vectors (slice_pixel<false>'s order, lane by lane),
// times scale[i] when a per-pixel normalisation factor is given (post in the forward, pre in the backward).
template <int C>
DLF_INLINE void slice_term8(const Term<float>& term, int64_t i, const std::vector<float>& scale, vec8* __restrict s) {
  const PermutohedralLattice& lat = *term.lattice;
  constexpr int B = PermutohedralLattice::kPixelBlock;
  const int32_t* vert = lat.vertex_block(i) + i % B;
  const float* w = lat.weight_block(i) + i % B;
  for (int c = 0; c < C; ++c) s[c] = splat8(0.0f);
  for (int r = 0; r <= lat.dim(); ++r) {
    const float wa = w[r * B] * lat.alpha();
    const float* __restrict v = term.blurred + static_cast<int64_t>(vert[r * B]) * 8 * C;
    for (int c = 0; c < C; ++c) s[c] += wa * load8(v + 8 * c);
  }
  if (!scale.empty()) {
    const float f = scale[i];
    for (int c = 0; c < C; ++c) s[c] = f * s[c];
  }
}

// mixed = W x for a symmetric matrix W given as padded rows [L, S]: one vector accumulator per 8 labels, the rows
// added in order m = 0..L-1, so each lane rounds exactly as the scalar loop in apply_compat; padding lanes 0.
template <int C>
DLF_INLINE void matrix_compat8(const float* __restrict rows, int64_t L, const float* __restrict x,
                               float* __restrict mixed) {
  vec8 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = splat8(0.0f);
  for (int64_t m = 0; m < L; ++m) {
    const float xm = x[m];
    const float* __restrict row = rows + m * 8 * C;
    for (int c = 0; c < C; ++c) acc[c] += load8(row + 8 * c) * xm;
  }
  for (int c = 0; c < C; ++c) store8(mixed + 8 * c, acc[c]);
}

// mixed = compat(filtered), pydensecrf's LabelCompatibility::apply: -w x (Potts), diag(w) x, or W x (W
// symmetric); padding lanes 0.
template <typename T>
DLF_INLINE void apply_compat(const Term<T>& term, int64_t L, int64_t S, const T* __restrict filtered,
                             T* __restrict mixed) {
  const PairwiseTerm<T>& spec = *term.spec;
  const T* c = spec.compat;
  if (spec.compat_kind == lattice::kPotts) {
    if constexpr (std::is_same<T, float>::value) {
      scale_to(mixed, -c[0], filtered, S);
    } else {
      for (int64_t k = 0; k < S; ++k) mixed[k] = -c[0] * filtered[k];
    }
  } else if (spec.compat_kind == lattice::kDiagonal) {
    for (int64_t k = 0; k < L; ++k) mixed[k] = c[k] * filtered[k];
    for (int64_t k = L; k < S; ++k) mixed[k] = T(0);
  } else {
    if constexpr (std::is_same<T, float>::value) {
      const float* rows = term.compat_padded.data();
      bool done = true;
      switch (S % 8 == 0 ? S / 8 : 0) {
        case 1: matrix_compat8<1>(rows, L, filtered, mixed); break;
        case 2: matrix_compat8<2>(rows, L, filtered, mixed); break;
        case 3: matrix_compat8<3>(rows, L, filtered, mixed); break;
        case 4: matrix_compat8<4>(rows, L, filtered, mixed); break;
        case 5: matrix_compat8<5>(rows, L, filtered, mixed); break;
        case 6: matrix_compat8<6>(rows, L, filtered, mixed); break;
        case 7: matrix_compat8<7>(rows, L, filtered, mixed); break;
        case 8: matrix_compat8<8>(rows, L, filtered, mixed); break;
        default: done = false; break;
      }
      if (done) {
        for (int64_t k = L; k < S; ++k) mixed[k] = 0.0f;  // 0 * x is NaN where x is not finite
        return;
      }
    }
    for (int64_t k = 0; k < S; ++k) mixed[k] = T(0);
    for (int64_t m = 0; m < L; ++m) {
      const T x = filtered[m];
      const T* __restrict row = c + m * L;  // symmetric: row m == column m
      for (int64_t k = 0; k < L; ++k) mixed[k] += row[k] * x;
    }
  }
}

// msg -= compat(filtered) (mean-field update) or msg += compat(filtered) (energy). Each product is rounded
// before it is added, as pydensecrf's separate `tmp2 = compat(out); tmp1 -= tmp2` does.
template <typename T>
DLF_INLINE void accumulate_compat(const Term<T>& term, int64_t L, int64_t S, const T* __restrict filtered,
                                  T* __restrict mixed, T* __restrict msg, bool add) {
  apply_compat(term, L, S, filtered, mixed);
  if constexpr (std::is_same<T, float>::value) {
    if (S % 8 == 0) {
      for (int64_t k = 0; k < S; k += 8)
        store8(msg + k, add ? load8(msg + k) + load8(mixed + k) : load8(msg + k) - load8(mixed + k));
      return;
    }
  }
  for (int64_t k = 0; k < S; ++k) msg[k] = add ? msg[k] + mixed[k] : msg[k] - mixed[k];
}

// Q = softmax(msg) over the first L lanes; padding lanes 0. float: as pydensecrf's expAndNormalize evaluates
// it (Eigen: subtract the max, exp with pexp on whole packets of 4 and std::exp on the rest, redux sum,
// divide). Returns the sum of the exponentials, which is >= 1 unless msg held NaN or +-inf everywhere
// (overflowed messages).
template <typename T>
DLF_INLINE T softmax(const T* __restrict msg, int64_t L, int64_t S, T* __restrict q) {
  T mx = msg[0];
  for (int64_t k = 1; k < L; ++k) mx = msg[k] > mx ? msg[k] : mx;
  T sum;
  if constexpr (std::is_same<T, float>::value) {
    const int64_t packets = (L / 4) * 4;
    for (int64_t k = 0; k < packets; ++k) q[k] = exp_eigen(msg[k] - mx);
    for (int64_t k = packets; k < L; ++k) q[k] = std::exp(msg[k] - mx);
    sum = eigen_sum(q, L);
  } else {
    sum = 0;
    for (int64_t k = 0; k < L; ++k) sum += (q[k] = std::exp(msg[k] - mx));
  }
  for (int64_t k = 0; k < L; ++k) q[k] = q[k] / sum;
  for (int64_t k = L; k < S; ++k) q[k] = T(0);
  return sum;
}

template <typename T>
struct PixelPass {
  const Term<T>* terms;
  size_t num_terms;
  const T* unary;      // [N, S]
  T* q;                // [N, S] output marginals
  T* energy_out;       // [N, S] or nullptr
  int64_t L, S;
  bool sequential_slice;
  bool with_pairwise;
  bool libm_vectorised;  // simd::libm_exp_vectorised()
  int64_t N;
};

// One pixel's messages, recomputed in double from the same lattice values: the float path's fallback when its
// messages overflowed (|compat| x filtered beyond float's range gives inf, inf - inf NaN). The softmax of the
// double messages is finite, so huge compatibilities saturate instead of turning the marginals into NaN.
void pixel_in_double(const PixelPass<float>& a, int64_t i) {
  const int64_t S = a.S, L = a.L;
  std::vector<double> buffer(static_cast<size_t>(3 * S));
  double* msg = buffer.data();
  double* sliced = msg + S;
  double* mixed = sliced + S;
  for (int64_t k = 0; k < S; ++k) msg[k] = -static_cast<double>(a.unary[i * S + k]);
  for (size_t t = 0; t < a.num_terms; ++t) {
    const Term<float>& term = a.terms[t];
    const PermutohedralLattice& lat = *term.lattice;
    for (int64_t k = 0; k < S; ++k) sliced[k] = 0.0;
    for (int r = 0; r <= lat.dim(); ++r) {
      const double wa = static_cast<double>(lat.weight(i, r)) * lat.alpha();
      const float* v = term.blurred + static_cast<int64_t>(lat.vertex(i, r)) * S;
      for (int64_t k = 0; k < S; ++k) sliced[k] += wa * v[k];
    }
    const double post = term.post.empty() ? 1.0 : term.post[i];
    const float* c = term.spec->compat;
    for (int64_t k = 0; k < L; ++k) {
      double m = 0.0;
      if (term.spec->compat_kind == lattice::kPotts) {
        m = -static_cast<double>(c[0]) * post * sliced[k];
      } else if (term.spec->compat_kind == lattice::kDiagonal) {
        m = static_cast<double>(c[k]) * post * sliced[k];
      } else {
        for (int64_t j = 0; j < L; ++j) m += static_cast<double>(c[k * L + j]) * post * sliced[j];
      }
      mixed[k] = m;
    }
    for (int64_t k = 0; k < L; ++k) msg[k] -= mixed[k];
  }
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t k = 0; k < L; ++k) mx = std::max(mx, msg[k]);
  double sum = 0.0;
  for (int64_t k = 0; k < L; ++k) sum += (msg[k] = std::exp(msg[k] - mx));
  for (int64_t k = 0; k < L; ++k) a.q[i * S + k] = static_cast<float>(msg[k] / sum);
  for (int64_t k = L; k < S; ++k) a.q[i * S + k] = 0.0f;
}

// The fused per-pixel step over pixels [begin, end): msg = -unary - sum_k compat_k(post_k * slice_k);
// Q = softmax(msg). With energy_out: writes sum_k compat_k(...) instead. Any label stride.
template <typename T>
DLF_INLINE void pixel_range_any(const PixelPass<T>& a, T* scratch, int64_t begin, int64_t end) {
  const int64_t S = a.S, L = a.L;
  T* __restrict msg = scratch;
  T* __restrict filtered = msg + S;
  T* __restrict mixed = filtered + S;
  T* __restrict sliced = mixed + S;
  for (int64_t i = begin; i < end; ++i) {
    if (a.energy_out != nullptr) {
      for (int64_t k = 0; k < S; ++k) msg[k] = T(0);
    } else {
      for (int64_t k = 0; k < S; ++k) msg[k] = -a.unary[i * S + k];
    }
    if (a.with_pairwise) {
      for (size_t t = 0; t < a.num_terms; ++t) {
        const Term<T>& term = a.terms[t];
        slice_term(term, a.sequential_slice, S, i, sliced);
        const T* __restrict f = sliced;
        if (!term.post.empty()) {
          for (int64_t k = 0; k < S; ++k) filtered[k] = term.post[i] * sliced[k];
          f = filtered;
        }
        accumulate_compat(term, L, S, f, mixed, msg, a.energy_out != nullptr);
      }
    }
    if (a.energy_out != nullptr) {
      std::copy(msg, msg + S, a.energy_out + i * S);
      continue;
    }
    const T sum = softmax(msg, L, S, a.q + i * S);
    if constexpr (std::is_same<T, float>::value) {
      if (!(sum >= 1.0f)) pixel_in_double(a, i);
    }
  }
}

// ---- the vectorised per-pixel steps ----
//
// All of them evaluate pydensecrf's arithmetic lane by lane: the slice as sum_r (w_r alpha) v_r (or, for L <= 2,
// sum_r (w_r v_r) alpha) from 0 in vertex order, the post-normalisation, the compatibility (Potts -w x, diagonal,
// matrix rows added in order), msg = -unary - sum_k compat_k, then expAndNormalize: the max, exp(msg - max) with
// Eigen's pexp on whole packets of 4 labels and std::exp (glibc's expf, exp8_libm) on the rest, Eigen's redux sum,
// and the division. Padding lanes of the unary are +inf, so their messages are -inf and drop out.

// What the per-pixel steps read of a term, in locals (the compiler cannot keep fields reached through pointers in
// registers across the stores of a pixel loop).
struct TermView {
  const int32_t* vertex;       // the lattice's blocked arrays
  const float* weight;
  const float* weight_alpha;
  int dp1;
  float alpha;
  const float* blurred;        // [M, S]
  const float* post;           // [N] or nullptr
  lattice::CompatKind kind;
  float nw;                    // Potts: -w
  const float* compat_padded;  // diagonal [S], matrix [L, S]
  const Term<float>* term;
  bool prefetch;               // the lattice's values do not fit in the cache: prefetch the rows of pixels ahead

  explicit TermView(const Term<float>& t)
      : vertex(t.lattice->vertex_block(0)), weight(t.lattice->weight_block(0)),
        weight_alpha(t.lattice->weight_alpha_block(0)), dp1(t.lattice->dim() + 1), alpha(t.lattice->alpha()),
        blurred(t.blurred), post(t.post.empty() ? nullptr : t.post.data()), kind(t.spec->compat_kind),
        nw(-t.spec->compat[0]), compat_padded(t.compat_padded.empty() ? nullptr : t.compat_padded.data()), term(&t),
        prefetch(static_cast<int64_t>(t.lattice_values.size()) * 4 > (int64_t{4} << 20)) {}

  // Prefetches the lattice rows of pixel i's vertices ([offset, offset + bytes) of each).
  void prefetch_pixel(int64_t i, int64_t S, int64_t bytes) const {
    const int64_t o = block_offset(i);
    constexpr int B = PermutohedralLattice::kPixelBlock;
    for (int r = 0; r < dp1; ++r) {
      const char* row = reinterpret_cast<const char*>(blurred + static_cast<int64_t>(vertex[o + r * B]) * S);
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 3);
    }
  }

  // Pixel i's entries: vertex r at [r * kPixelBlock].
  int64_t block_offset(int64_t i) const {
    constexpr int B = PermutohedralLattice::kPixelBlock;
    return (i / B) * dp1 * B + i % B;
  }
};

std::vector<TermView> term_views(const PixelPass<float>& a) {
  std::vector<TermView> v;
  for (size_t t = 0; t < (a.with_pairwise ? a.num_terms : 0); ++t) v.emplace_back(a.terms[t]);
  return v;
}

// e = exp(x - m) over labels [0, L) of the chunks x[0..C) (8 labels each); lanes >= L are 0.
struct SoftmaxLanes {
  int64_t L;
  int64_t tail_chunk;   // the chunk holding labels [(L / 4) * 4, L) (std::exp); -1 when L % 4 == 0
  ivec8 tail_mask;      // its lanes that are such labels
  int tail_first, tail_end;  // the same lanes as a range
  int64_t last_chunk;   // the chunk holding label L - 1
  vec8 last_valid;      // 1 for its lanes < L, else 0

  explicit SoftmaxLanes(int64_t num_labels) : L(num_labels) {
    const int64_t packets = (L / 4) * 4;
    tail_chunk = L % 4 == 0 ? -1 : packets / 8;
    tail_first = static_cast<int>(packets % 8);
    tail_end = tail_first + static_cast<int>(L % 4);
    last_chunk = (L - 1) / 8;
    for (int k = 0; k < 8; ++k) {
      const int64_t label_t = tail_chunk * 8 + k, label_l = last_chunk * 8 + k;
      tail_mask[k] = (label_t >= packets && label_t < L) ? -1 : 0;
      last_valid[k] = label_l < L ? 1.0f : 0.0f;
    }
  }
};

template <simd::Level kLevel, typename X, typename E>
DLF_INLINE void exp_labels(const SoftmaxLanes& sl, int64_t chunks, const X& x, float m, E& e, bool libm_vec) {
  for (int64_t c = 0; c < chunks; ++c) e[c] = exp8_eigen(x[c] - m);
  e[sl.last_chunk] = e[sl.last_chunk] * sl.last_valid;
  if (sl.tail_chunk >= 0) {
    if (kLevel != simd::kBaseline && libm_vec) {
      const vec8 t = exp8_libm<kLevel>(x[sl.tail_chunk] - m, true);
      e[sl.tail_chunk] = sl.tail_mask ? t : e[sl.tail_chunk];
    } else {  // expf on the tail lanes only
      vec8 t = e[sl.tail_chunk];
      const vec8 xt = x[sl.tail_chunk] - m;
      for (int k = sl.tail_first; k < sl.tail_end; ++k) t[k] = std::exp(xt[k]);
      e[sl.tail_chunk] = t;
    }
  }
}

// The largest of x[0..C) over all lanes (padding lanes are -inf).
template <typename X>
DLF_INLINE float max_labels(const X& x, int64_t chunks) {
  vec8 mx = x[0];
  for (int64_t c = 1; c < chunks; ++c) mx = mx > x[c] ? mx : x[c];
  const vec4 h = low_half(mx) > high_half(mx) ? low_half(mx) : high_half(mx);
  float m = h[0];
  for (int k = 1; k < 4; ++k) m = h[k] > m ? h[k] : m;
  return m;
}

// Pixel i's contribution of one term to its messages, for chunks [c0, c0 + C) of 8 labels: msg -= compat(post *
// slice). `post` is the term's post-normalisation (empty: none). Potts and diagonal only (matrix: the caller).
// DP1: the term's d + 1 when it is one of the unrolled dimensions (d = 2 to 5), 0 for any other.
template <int C, int DP1>
DLF_INLINE void term_message_dp1(const TermView& t, int64_t S, int64_t i, int64_t c0, vec8* __restrict msg) {
  constexpr int B = PermutohedralLattice::kPixelBlock;
  const int dp1 = DP1 > 0 ? DP1 : t.dp1;
  const int64_t o = (i / B) * dp1 * B + i % B;
  const int32_t* __restrict vert = t.vertex + o;
  const float* __restrict wa = t.weight_alpha + o;
  vec8 s[C];
  for (int c = 0; c < C; ++c) s[c] = splat8(0.0f);
  for (int r = 0; r < dp1; ++r) {
    const float* __restrict v = t.blurred + static_cast<int64_t>(vert[r * B]) * S + 8 * c0;
    const float w = wa[r * B];
    for (int c = 0; c < C; ++c) s[c] += w * load8(v + 8 * c);
  }
  if (t.post != nullptr) {
    const float f = t.post[i];
    for (int c = 0; c < C; ++c) s[c] = f * s[c];
  }
  if (t.kind == lattice::kPotts) {
    for (int c = 0; c < C; ++c) msg[c] = msg[c] - t.nw * s[c];
  } else {  // diagonal, padded with zeros
    for (int c = 0; c < C; ++c) msg[c] = msg[c] - load8(t.compat_padded + 8 * (c0 + c)) * s[c];
  }
}

// The slice's vertex loop unrolled for the common feature dimensions: DenseCRF2D's Gaussian (d = 2) and bilateral
// (5), and the volumes' Gaussian (3) and bilateral (3-D position + intensity, 4).
template <int C>
DLF_INLINE void term_message(const TermView& t, int64_t S, int64_t i, int64_t c0, vec8* __restrict msg) {
  switch (t.dp1) {
    case 3: return term_message_dp1<C, 3>(t, S, i, c0, msg);
    case 4: return term_message_dp1<C, 4>(t, S, i, c0, msg);
    case 5: return term_message_dp1<C, 5>(t, S, i, c0, msg);
    case 6: return term_message_dp1<C, 6>(t, S, i, c0, msg);
    default: return term_message_dp1<C, 0>(t, S, i, c0, msg);
  }
}

// Labels in C vec8 registers (S = 8 C <= 64).
// P pixels at a time (their steps interleaved: one pixel's chain of dependent steps - slice, max, exp, sum, division -
// is longer than the processor can look ahead, and two independent chains fill each other's gaps).
template <simd::Level kLevel, int C, int P>
DLF_INLINE void pixels_vec(const PixelPass<float>& a, const SoftmaxLanes& sl, const std::vector<TermView>& terms,
                           int64_t i) {
  constexpr int64_t S = 8 * C;
  const int64_t L = a.L;
  vec8 msg[P][C];
  for (int j = 0; j < P; ++j)
    for (int c = 0; c < C; ++c) msg[j][c] = -load8(a.unary + (i + j) * S + 8 * c);
  for (const TermView& t : terms) {
    if (t.prefetch && i + P + 4 < a.N) t.prefetch_pixel(i + P + 4, S, 4 * S);
    if (t.kind != lattice::kMatrix) {
      for (int j = 0; j < P; ++j) term_message<C>(t, S, i + j, 0, msg[j]);
    } else {  // padded rows; the padding lanes stay -inf (0 * finite)
      for (int j = 0; j < P; ++j) {
        vec8 s[C];
        slice_term8<C>(*t.term, i + j, t.term->post, s);
        alignas(32) float x[8 * C], mixed[8 * C];
        for (int c = 0; c < C; ++c) store8(x + 8 * c, s[c]);
        matrix_compat8<C>(t.compat_padded, L, x, mixed);
        for (int c = 0; c < C; ++c) msg[j][c] = msg[j][c] - load8(mixed + 8 * c);
      }
    }
  }
  float m[P], sum[P];
  vec8 e[P][C];
  for (int j = 0; j < P; ++j) m[j] = max_labels(msg[j], C);
  for (int j = 0; j < P; ++j) exp_labels<kLevel>(sl, C, msg[j], m[j], e[j], a.libm_vectorised);
  for (int j = 0; j < P; ++j) sum[j] = eigen_sum8(e[j], L);
  for (int j = 0; j < P; ++j)
    for (int c = 0; c < C; ++c) store8(a.q + (i + j) * S + 8 * c, e[j][c] / sum[j]);
  for (int j = 0; j < P; ++j)
    if (!(sum[j] >= 1.0f)) pixel_in_double(a, i + j);
}

template <simd::Level kLevel, int C>
DLF_INLINE void pixel_range_vec(const PixelPass<float>& a, int64_t begin, int64_t end) {
  const SoftmaxLanes sl(a.L);
  const std::vector<TermView> terms = term_views(a);
  int64_t i = begin;
  if constexpr (C <= 4) {
    for (; i + 2 <= end; i += 2) pixels_vec<kLevel, C, 2>(a, sl, terms, i);
  }
  for (; i < end; ++i) pixels_vec<kLevel, C, 1>(a, sl, terms, i);
}

// Any multiple of 8 labels (used above 64): the messages in a buffer on the stack, each term sliced 64 labels at a
// time (the slice of a chunk is its own sum over the vertices, so the order per label is the same).
template <simd::Level kLevel>
DLF_INLINE void pixel_range_chunks(const PixelPass<float>& a, float* scratch, int64_t begin, int64_t end) {
  const int64_t S = a.S, L = a.L, chunks = S / 8;
  const SoftmaxLanes sl(L);
  // scratch (4 S + 16 floats): msg [chunks vec8], e [chunks vec8], then 2 S floats, 64-byte aligned.
  vec8* msg = reinterpret_cast<vec8*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t{63});
  vec8* e = msg + chunks;
  float* filtered = reinterpret_cast<float*>(e + chunks);
  float* mixed = filtered + S;
  const std::vector<TermView> terms = term_views(a);
  for (int64_t i = begin; i < end; ++i) {
    for (int64_t c = 0; c < chunks; ++c) msg[c] = -load8(a.unary + i * S + 8 * c);
    for (const TermView& t : terms) {
      const Term<float>& term = *t.term;
      if (t.kind != lattice::kMatrix) {
        int64_t c = 0;
        for (; c + 8 <= chunks; c += 8) term_message<8>(t, S, i, c, msg + c);
        switch (chunks - c) {
          case 1: term_message<1>(t, S, i, c, msg + c); break;
          case 2: term_message<2>(t, S, i, c, msg + c); break;
          case 3: term_message<3>(t, S, i, c, msg + c); break;
          case 4: term_message<4>(t, S, i, c, msg + c); break;
          case 5: term_message<5>(t, S, i, c, msg + c); break;
          case 6: term_message<6>(t, S, i, c, msg + c); break;
          case 7: term_message<7>(t, S, i, c, msg + c); break;
          default: break;
        }
      } else {
        term.lattice->template slice_pixel<false>(term.blurred, S, i, filtered);
        if (!term.post.empty())
          for (int64_t k = 0; k < S; ++k) filtered[k] = term.post[i] * filtered[k];
        apply_compat(term, L, S, filtered, mixed);
        for (int64_t c = 0; c < chunks; ++c) msg[c] = msg[c] - load8(mixed + 8 * c);
      }
    }
    const float m = max_labels(msg, chunks);
    exp_labels<kLevel>(sl, chunks, msg, m, e, a.libm_vectorised);
    const float sum = eigen_sum8(e, L);
    for (int64_t c = 0; c < chunks; ++c) store8(a.q + i * S + 8 * c, e[c] / sum);
    if (!(sum >= 1.0f)) pixel_in_double(a, i);
  }
}

// 2, 3 or 4 labels, packed: S = 2 (L = 2) or 4 (L = 3, 4), G = 8 / S pixels per vec8, each in its own group of S
// lanes. The max and the sum run within each group by swaps of lanes, in pydensecrf's order: L = 2, e0 + e1; L = 3,
// (e0 + e1) + e2 (e3 = 0 adds nothing); L = 4, Eigen's packet sum (e0 + e2) + (e1 + e3). Potts and diagonal.
DLF_INLINE vec8 swap_pairs(vec8 x) { return __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6); }
DLF_INLINE vec8 swap_pairs_of_pairs(vec8 x) { return __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5); }

// Group g's value of a per-pixel array (p[0..G)), in each of its S lanes.
template <int S>
DLF_INLINE vec8 spread(const float* p) {
  if constexpr (S == 2) {
    const vec4 v = load4(p);
    return __builtin_shufflevector(v, v, 0, 0, 1, 1, 2, 2, 3, 3);
  } else {
    const vec4 v = load2(p);
    return __builtin_shufflevector(v, v, 0, 0, 0, 0, 1, 1, 1, 1);
  }
}

// The lattice rows of the G pixels' r-th vertices, side by side.
template <int S>
DLF_INLINE vec8 gather_rows(const float* values, const int32_t* vert) {
  if constexpr (S == 2) {
    const vec4 a = load2(values + static_cast<int64_t>(vert[0]) * 2), b = load2(values + static_cast<int64_t>(vert[1]) * 2);
    const vec4 c = load2(values + static_cast<int64_t>(vert[2]) * 2), d = load2(values + static_cast<int64_t>(vert[3]) * 2);
    return concat(__builtin_shufflevector(a, b, 0, 1, 4, 5), __builtin_shufflevector(c, d, 0, 1, 4, 5));
  } else {
    return concat(load4(values + static_cast<int64_t>(vert[0]) * 4), load4(values + static_cast<int64_t>(vert[1]) * 4));
  }
}

// The slice of pixels i .. i + 8 / S - 1 (S labels each) of one term; DP1 as term_message_dp1.
template <int S, int DP1>
DLF_INLINE vec8 slice_packed(const TermView& t, int64_t i, bool sequential) {
  constexpr int B = PermutohedralLattice::kPixelBlock;
  const int dp1 = DP1 > 0 ? DP1 : t.dp1;
  const int64_t o = (i / B) * dp1 * B + i % B;
  const int32_t* __restrict vert = t.vertex + o;
  vec8 s = splat8(0.0f);
  if (sequential) {
    const float* __restrict w = t.weight + o;
    for (int r = 0; r < dp1; ++r) s += (spread<S>(w + r * B) * gather_rows<S>(t.blurred, vert + r * B)) * t.alpha;
  } else {
    const float* __restrict wa = t.weight_alpha + o;
    for (int r = 0; r < dp1; ++r) s += spread<S>(wa + r * B) * gather_rows<S>(t.blurred, vert + r * B);
  }
  return s;
}

template <simd::Level kLevel, int S>
DLF_INLINE void pixel_range_packed(const PixelPass<float>& a, float* scratch, int64_t begin, int64_t end) {
  constexpr int G = 8 / S;
  const int64_t L = a.L;
  const bool sequential = a.sequential_slice;
  const std::vector<TermView> terms = term_views(a);
  std::vector<float> diagonal(8 * terms.size(), 0.0f);  // a diagonal compatibility's weights, in each group
  for (size_t t = 0; t < terms.size(); ++t)
    if (terms[t].kind == lattice::kDiagonal)
      for (int k = 0; k < 8; ++k) diagonal[8 * t + k] = terms[t].compat_padded[k % S];
  int64_t i = begin;
  for (; i < end && i % G != 0; ++i) pixel_range_any(a, scratch, i, i + 1);
  for (; i + G <= end; i += G) {
    vec8 msg = -load8(a.unary + i * S);
    for (size_t k = 0; k < terms.size(); ++k) {
      const TermView& t = terms[k];
      if (t.prefetch && i + 2 * G < end) t.prefetch_pixel(i + 2 * G, S, 4 * S);
      vec8 s;
      switch (t.dp1) {  // as term_message
        case 3: s = slice_packed<S, 3>(t, i, sequential); break;
        case 4: s = slice_packed<S, 4>(t, i, sequential); break;
        case 5: s = slice_packed<S, 5>(t, i, sequential); break;
        case 6: s = slice_packed<S, 6>(t, i, sequential); break;
        default: s = slice_packed<S, 0>(t, i, sequential); break;
      }
      if (t.post != nullptr) s = spread<S>(t.post + i) * s;
      if (t.kind == lattice::kPotts) {
        msg = msg - t.nw * s;
      } else {
        msg = msg - load8(diagonal.data() + 8 * k) * s;
      }
    }
    vec8 m = msg > swap_pairs(msg) ? msg : swap_pairs(msg);
    if constexpr (S == 4) m = m > swap_pairs_of_pairs(m) ? m : swap_pairs_of_pairs(m);
    const vec8 x = msg - m;
    vec8 e, sum;
    if (L == 4) {
      e = exp8_eigen(x);
      const vec8 t = e + swap_pairs_of_pairs(e);
      sum = t + swap_pairs(t);
    } else {
      e = exp8_libm<kLevel>(x, a.libm_vectorised);
      sum = e + swap_pairs(e);
      if constexpr (S == 4) sum = sum + swap_pairs_of_pairs(sum);
    }
    store8(a.q + i * S, e / sum);
    const auto low = !(sum >= 1.0f);
    for (int g = 0; g < G; ++g)
      if (low[g * S]) pixel_in_double(a, i + g);
  }
  for (; i < end; ++i) pixel_range_any(a, scratch, i, i + 1);
}

template <simd::Level kLevel>
DLF_INLINE void pixel_range_impl(const PixelPass<float>& a, float* scratch, int64_t begin, int64_t end) {
  if (a.energy_out != nullptr) return pixel_range_any(a, scratch, begin, end);
  bool matrix = false;
  for (size_t t = 0; t < (a.with_pairwise ? a.num_terms : 0); ++t)
    matrix |= a.terms[t].spec->compat_kind == lattice::kMatrix;
  if (a.S == 2 && !matrix) return pixel_range_packed<kLevel, 2>(a, scratch, begin, end);
  if (a.S == 4 && !matrix) return pixel_range_packed<kLevel, 4>(a, scratch, begin, end);
  switch (a.S % 8 == 0 ? a.S / 8 : -1) {
    case 1: return pixel_range_vec<kLevel, 1>(a, begin, end);
    case 2: return pixel_range_vec<kLevel, 2>(a, begin, end);
    case 3: return pixel_range_vec<kLevel, 3>(a, begin, end);
    case 4: return pixel_range_vec<kLevel, 4>(a, begin, end);
    case 5: return pixel_range_vec<kLevel, 5>(a, begin, end);
    case 6: return pixel_range_vec<kLevel, 6>(a, begin, end);
    case 7: return pixel_range_vec<kLevel, 7>(a, begin, end);
    case 8: return pixel_range_vec<kLevel, 8>(a, begin, end);
    case -1: return pixel_range_any(a, scratch, begin, end);
    default: return pixel_range_chunks<kLevel>(a, scratch, begin, end);
  }
}

DLF_DISPATCH(void, pixel_range, (const PixelPass<float>& a, float* scratch, int64_t begin, int64_t end),
             (a, scratch, begin, end))

void pixel_range(const PixelPass<double>& a, double* scratch, int64_t begin, int64_t end) {
  pixel_range_any(a, scratch, begin, end);
}

// [L, N] -> [N, S] for pixels [begin, end), padding lanes set to `pad`; with check, returns the kUnaryNaN /
// kUnaryNegInf / kUnaryNoFiniteLabel flags of those pixels' values. Eight pixels at a time by 8x8 register
// transposes when S is a multiple of 8 (float).
template <typename T>
DLF_INLINE int transpose_in_any(const T* src, T* dst, int64_t L, int64_t N, int64_t S, T pad, int64_t begin,
                                int64_t end) {
  int bad = 0;
  for (int64_t i = begin; i < end; ++i) {
    bool possible = false;
    for (int64_t l = 0; l < L; ++l) {
      const T u = src[l * N + i];
      dst[i * S + l] = u;
      if (std::isnan(u)) bad |= kUnaryNaN;
      if (u == -inf<T>()) bad |= kUnaryNegInf;
      possible |= u < inf<T>();
    }
    for (int64_t l = L; l < S; ++l) dst[i * S + l] = pad;
    if (!possible) bad |= kUnaryNoFiniteLabel;
  }
  return bad;
}

template <simd::Level>
DLF_INLINE int transpose_in_impl(const float* src, float* dst, int64_t L, int64_t N, int64_t S, float pad, bool check,
                                 int64_t begin, int64_t end) {
  int bad = 0;
  int64_t i = begin;
  if (S % 8 == 0 || S == 4 || S == 2) {
    for (; i + 8 <= end; i += 8) {
      ivec8 nan{}, neg{};
      vec8 lowest = splat8(kInfF);  // per pixel, the smallest value over labels
      for (int64_t l0 = 0; l0 < S; l0 += 8) {
        vec8 rows[8];
        for (int k = 0; k < 8; ++k) {
          if (l0 + k >= L) {
            rows[k] = splat8(pad);
            continue;
          }
          rows[k] = load8(src + (l0 + k) * N + i);
          nan |= rows[k] != rows[k];
          neg |= rows[k] == -kInfF;
          lowest = rows[k] < lowest ? rows[k] : lowest;
        }
        if (S == 2) {  // interleave the two rows: pixels i..i+3, then i+4..i+7
          store8(dst + i * 2, __builtin_shufflevector(rows[0], rows[1], 0, 8, 1, 9, 2, 10, 3, 11));
          store8(dst + i * 2 + 8, __builtin_shufflevector(rows[0], rows[1], 4, 12, 5, 13, 6, 14, 7, 15));
          continue;
        }
        transpose8x8(rows);
        if (S == 4) {  // pixel k's four labels are the low half of rows[k]
          for (int k = 0; k < 8; k += 2) store8(dst + (i + k) * 4, concat(low_half(rows[k]), low_half(rows[k + 1])));
          continue;
        }
        for (int k = 0; k < 8; ++k) store8(dst + (i + k) * S + l0, rows[k]);
      }
      if (check) {
        for (int k = 0; k < 8; ++k) {
          if (nan[k]) bad |= kUnaryNaN;
          if (neg[k]) bad |= kUnaryNegInf;
          if (!(lowest[k] < kInfF) && lowest[k] == lowest[k]) bad |= kUnaryNoFiniteLabel;
        }
      }
    }
  }
  bad |= transpose_in_any(src, dst, L, N, S, pad, i, end);
  return check ? bad : 0;
}

DLF_DISPATCH(int, transpose_in,
             (const float* src, float* dst, int64_t L, int64_t N, int64_t S, float pad, bool check, int64_t begin,
              int64_t end),
             (src, dst, L, N, S, pad, check, begin, end))

int transpose_in(const double* src, double* dst, int64_t L, int64_t N, int64_t S, double pad, bool check,
                 int64_t begin, int64_t end) {
  const int bad = transpose_in_any(src, dst, L, N, S, pad, begin, end);
  return check ? bad : 0;
}

// [N, S] -> [L, N] for pixels [begin, end).
template <simd::Level>
DLF_INLINE void transpose_out_impl(const float* src, float* dst, int64_t L, int64_t N, int64_t S, int64_t begin,
                                   int64_t end) {
  int64_t i = begin;
  if (S % 8 == 0 || S == 4 || S == 2) {
    for (; i + 8 <= end; i += 8) {
      if (S == 2) {
        const vec8 a = load8(src + i * 2), b = load8(src + i * 2 + 8);
        store8(dst + i, __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14));
        if (L > 1) store8(dst + N + i, __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15));
        continue;
      }
      for (int64_t l0 = 0; l0 < L; l0 += 8) {
        vec8 rows[8];
        if (S == 4) {
          for (int k = 0; k < 8; ++k) {
            const vec4 v = load4(src + (i + k) * 4);
            rows[k] = concat(v, v);
          }
        } else {
          for (int k = 0; k < 8; ++k) rows[k] = load8(src + (i + k) * S + l0);
        }
        transpose8x8(rows);
        for (int k = 0; k < 8 && l0 + k < L; ++k) store8(dst + (l0 + k) * N + i, rows[k]);
      }
    }
  }
  for (; i < end; ++i)
    for (int64_t l = 0; l < L; ++l) dst[l * N + i] = src[i * S + l];
}

DLF_DISPATCH(void, transpose_out,
             (const float* src, float* dst, int64_t L, int64_t N, int64_t S, int64_t begin, int64_t end),
             (src, dst, L, N, S, begin, end))

void transpose_out(const double* src, double* dst, int64_t L, int64_t N, int64_t S, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i)
    for (int64_t l = 0; l < L; ++l) dst[l * N + i] = src[i * S + l];
}

// The backward's per-pixel step (see MeanField::backward), for pixels [begin, end) of one iteration t:
//   h_k = pre_k * slice_k(blurred transposed filter of gx_t)              (= K_k^T gx_t, per label)
//   g   = -sum_k compat_k(h_k)                                           (dL/dQ_{t-1})
//   compat gradients += the contraction of h_k with Q_{t-1}
//   then, unless Q_{t-1} is q_init: gx_{t-1} = Q_{t-1} (g - <g, Q_{t-1}>) (the softmax's VJP), gu -= gx_{t-1};
//   else grad_q_init = g.
template <typename T>
struct BackwardPass {
  const Term<T>* terms;
  size_t num_terms;
  const T* q_prev;   // [N, S] Q_{t-1}
  T* gx;             // [N, S] in: gx_t (already splatted); out: gx_{t-1}
  T* gu;             // [N, S] dL/dunary, accumulated
  T* g_q_init;       // [N, S] or nullptr: write g instead of the softmax step
  // Per term: nullptr or [blocks, 1 | S | L * S] float-like accumulators of this iteration's contraction.
  std::vector<T*> compat_partial;
  int64_t L, S;
  bool sequential_slice;
};

template <typename T>
DLF_INLINE void softmax_vjp(const T* __restrict g, const T* __restrict q, int64_t S, T* __restrict gx) {
  T dot = 0;
  for (int64_t k = 0; k < S; ++k) dot += g[k] * q[k];
  for (int64_t k = 0; k < S; ++k) gx[k] = q[k] * (g[k] - dot);
}

template <typename T>
DLF_INLINE void backward_range(const BackwardPass<T>& a, T* scratch, int64_t block, int64_t begin, int64_t end) {
  const int64_t S = a.S, L = a.L;
  T* __restrict h = scratch;
  T* __restrict mixed = h + S;
  T* __restrict g = mixed + S;
  for (int64_t i = begin; i < end; ++i) {
    const T* __restrict q = a.q_prev + i * S;
    for (int64_t k = 0; k < S; ++k) g[k] = T(0);
    for (size_t t = 0; t < a.num_terms; ++t) {
      const Term<T>& term = a.terms[t];
      slice_term(term, a.sequential_slice, S, i, h);
      if (!term.pre.empty())
        for (int64_t k = 0; k < S; ++k) h[k] = term.pre[i] * h[k];
      apply_compat(term, L, S, h, mixed);
      for (int64_t k = 0; k < S; ++k) g[k] -= mixed[k];
      T* acc = a.compat_partial[t];
      if (acc == nullptr) continue;
      switch (term.spec->compat_kind) {
        case lattice::kPotts: {  // x += w K Q: dL/dw = <gx, K Q> = <K^T gx, Q>
          T s = 0;
          for (int64_t k = 0; k < S; ++k) s += h[k] * q[k];
          acc[block] += s;
          break;
        }
        case lattice::kDiagonal: {  // x -= diag(w) K Q: dL/dw_l = -<(K^T gx)_l, Q_l>
          T* row = acc + block * S;
          for (int64_t k = 0; k < S; ++k) row[k] -= h[k] * q[k];
          break;
        }
        default: {  // x -= W K Q: dL/dW_lm = -<(K^T gx)_l, Q_m>
          T* mat = acc + block * L * S;
          for (int64_t l = 0; l < L; ++l) {
            const T hl = h[l];
            T* __restrict row = mat + l * S;
            for (int64_t m = 0; m < S; ++m) row[m] -= hl * q[m];
          }
          break;
        }
      }
    }
    if (a.g_q_init != nullptr) {
      std::copy(g, g + S, a.g_q_init + i * S);
    } else {
      T* __restrict gx = a.gx + i * S;
      softmax_vjp(g, q, S, gx);
      T* __restrict gu = a.gu + i * S;
      for (int64_t k = 0; k < S; ++k) gu[k] -= gx[k];
    }
  }
}

// backward_range for a label stride of exactly 8 C (float): each pixel's vectors in registers. Elementwise steps
// are the scalar loop's, lane by lane, and the sums over labels (the Potts contraction, the softmax VJP's dot)
// run in the same sequential order, so the results are bitwise those of backward_range.
template <int C>
DLF_INLINE void backward_range_vec(const BackwardPass<float>& a, int64_t block, int64_t begin, int64_t end) {
  constexpr int64_t S = 8 * C;
  const int64_t L = a.L;
  alignas(32) float h[S], mixed[S], g[S];
  for (int64_t i = begin; i < end; ++i) {
    const float* __restrict q = a.q_prev + i * S;
    vec8 gv[C];
    for (int c = 0; c < C; ++c) gv[c] = splat8(0.0f);
    for (size_t t = 0; t < a.num_terms; ++t) {
      const Term<float>& term = a.terms[t];
      vec8 hv[C];
      slice_term8<C>(term, i, term.pre, hv);
      for (int c = 0; c < C; ++c) store8(h + 8 * c, hv[c]);
      apply_compat(term, L, S, h, mixed);
      for (int c = 0; c < C; ++c) gv[c] = gv[c] - load8(mixed + 8 * c);
      float* acc = a.compat_partial[t];
      if (acc == nullptr) continue;
      switch (term.spec->compat_kind) {
        case lattice::kPotts: {
          float s = 0;
          for (int64_t k = 0; k < S; ++k) s += h[k] * q[k];
          acc[block] += s;
          break;
        }
        case lattice::kDiagonal: {
          float* row = acc + block * S;
          for (int c = 0; c < C; ++c) store8(row + 8 * c, load8(row + 8 * c) - hv[c] * load8(q + 8 * c));
          break;
        }
        default: {
          vec8 qv[C];
          for (int c = 0; c < C; ++c) qv[c] = load8(q + 8 * c);
          float* mat = acc + block * L * S;
          for (int64_t l = 0; l < L; ++l) {
            const float hl = h[l];
            float* __restrict row = mat + l * S;
            for (int c = 0; c < C; ++c) store8(row + 8 * c, load8(row + 8 * c) - hl * qv[c]);
          }
          break;
        }
      }
    }
    if (a.g_q_init != nullptr) {
      for (int c = 0; c < C; ++c) store8(a.g_q_init + i * S + 8 * c, gv[c]);
      continue;
    }
    for (int c = 0; c < C; ++c) store8(g + 8 * c, gv[c]);
    float dot = 0;
    for (int64_t k = 0; k < S; ++k) dot += g[k] * q[k];
    float* __restrict gx = a.gx + i * S;
    float* __restrict gu = a.gu + i * S;
    for (int c = 0; c < C; ++c) {
      const vec8 x = load8(q + 8 * c) * (gv[c] - dot);
      store8(gx + 8 * c, x);
      store8(gu + 8 * c, load8(gu + 8 * c) - x);
    }
  }
}

template <simd::Level>
DLF_INLINE void backward_pixels_impl(const BackwardPass<float>& a, float* scratch, int64_t block, int64_t begin,
                                     int64_t end) {
  switch (a.S % 8 == 0 && !a.sequential_slice ? a.S / 8 : 0) {
    case 1: backward_range_vec<1>(a, block, begin, end); break;
    case 2: backward_range_vec<2>(a, block, begin, end); break;
    case 3: backward_range_vec<3>(a, block, begin, end); break;
    case 4: backward_range_vec<4>(a, block, begin, end); break;
    case 5: backward_range_vec<5>(a, block, begin, end); break;
    case 6: backward_range_vec<6>(a, block, begin, end); break;
    case 7: backward_range_vec<7>(a, block, begin, end); break;
    case 8: backward_range_vec<8>(a, block, begin, end); break;
    default: backward_range(a, scratch, block, begin, end); break;
  }
}

DLF_DISPATCH(void, backward_pixels,
             (const BackwardPass<float>& a, float* scratch, int64_t block, int64_t begin, int64_t end),
             (a, scratch, block, begin, end))

void backward_pixels(const BackwardPass<double>& a, double* scratch, int64_t block, int64_t begin, int64_t end) {
  backward_range(a, scratch, block, begin, end);
}

template <typename T>
class MeanField {
 public:
  // needs_unary: load (and check) the unary; the backward with a history does not read it.
  MeanField(const Problem<T>& p, bool needs_unary = true)
      : p_(p), L_(p.num_labels), N_(p.num_pixels), S_(label_stride(p.num_labels)), seq_(p.num_labels <= 2) {
    // Buffers are left uninitialised: every element is written before it is read.
    if (needs_unary && p.unary != nullptr) {
      StageTimer timer("load unary");
      unary_.reset(static_cast<size_t>(N_ * S_));
      load_unary(p.unary);
    }
    terms_.reserve(p.terms.size());
    for (const PairwiseTerm<T>& spec : p.terms) terms_.push_back(prepare(spec));
    q_.reset(static_cast<size_t>(N_ * S_));
  }

  // Q_0 = q_init or softmax(-unary), then `iterations` updates. With history, Q_t (t < iterations) is
  // computed in place in history[t] and only the last one in q_.
  void run(int64_t iterations, T* q_out, T* history) {
    T* q0 = history != nullptr && iterations > 0 ? history : q_.data();
    if (p_.q_init != nullptr) {
      to_pixel_major(p_.q_init, q0, T(0), false);
    } else {
      pixel_pass(/*with_pairwise=*/false, nullptr, q0);
    }
    const T* q = q0;
    for (int64_t it = 0; it < iterations; ++it) {
      parallel::check_interrupt();
      T* next = history != nullptr && it + 1 < iterations ? history + (it + 1) * N_ * S_ : q_.data();
      filter_all(q, /*transpose=*/false);
      pixel_pass(/*with_pairwise=*/true, nullptr, next);
      q = next;
    }
    if (q_out != nullptr) to_label_major(q, q_out);
  }

  void energy(T* out) {
    TORCH_CHECK(p_.q_init != nullptr, "dense_crf: the pairwise energy needs marginals q");
    to_pixel_major(p_.q_init, q_.data(), T(0), false);
    filter_all(q_.data(), false);
    std::vector<T> e(static_cast<size_t>(N_ * S_), T(0));
    pixel_pass(/*with_pairwise=*/true, e.data(), nullptr);
    to_label_major(e.data(), out);
  }

  // The vector-Jacobian product of run(): Q_{t+1} = softmax(x_{t+1}), x_{t+1} = -u - sum_k C_k F_k Q_t, with
  // F_k = post_k . (alpha S^T B S) . pre_k the lattice filter (S: splat, B: blur, alpha S^T: slice). Its transpose
  // is F_k^T = pre_k . (alpha S^T B^T S) . post_k, and B^T is the blur with its axes in reverse order
  // (Krähenbühl's DenseKernel::filter(..., transpose=true)). Backwards from gQ_T = grad_q:
  //   gx_t = Q_t (gQ_t - <gQ_t, Q_t>)                (softmax VJP, per pixel)
  //   du  -= gx_t
  //   gQ_{t-1} = -sum_k C_k (F_k^T gx_t)              (C_k symmetric, acting on labels, commutes with F_k)
  //   dC_k: <gx_t, C'(F_k Q_{t-1})> = <C'(F_k^T gx_t), Q_{t-1}>, so one transposed filter per term and
  //   iteration serves both.
  void backward(int64_t iterations, const T* grad_q, const T* q, const T* history_in, const Gradients<T>& grads) {
    const int64_t NS = N_ * S_;
    Buffer<T> history_buf;
    const T* history = history_in;
    if (history == nullptr && iterations > 0) {  // checkpointing: recompute the forward's history
      history_buf.reset(static_cast<size_t>(iterations * NS));
      run(iterations, nullptr, history_buf.data());
      history = history_buf.data();
    }
    Buffer<T> g(static_cast<size_t>(NS)), gx(static_cast<size_t>(NS)), gu(static_cast<size_t>(NS));
    to_pixel_major(grad_q, g.data(), T(0), false);
    // Q_T: the forward's output.
    if (history_in != nullptr || iterations == 0) {
      to_pixel_major(q, q_.data(), T(0), false);
    }  // else run() above left Q_T in q_
    const bool from_q_init = p_.q_init != nullptr;
    Buffer<T> gqi;
    if (from_q_init) gqi.reset(static_cast<size_t>(NS));
    // gx_T and du = -gx_T (or, with no iteration and q_init, dL/dq_init = grad_q).
    {
      StageTimer timer("backward: softmax");
      parallel::for_range(0, N_, kPixelGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          if (iterations == 0 && from_q_init) {
            std::copy(g.data() + i * S_, g.data() + (i + 1) * S_, gqi.data() + i * S_);
            std::fill(gu.data() + i * S_, gu.data() + (i + 1) * S_, T(0));
            continue;
          }
          softmax_vjp(g.data() + i * S_, q_.data() + i * S_, S_, gx.data() + i * S_);
          for (int64_t k = 0; k < S_; ++k) gu[i * S_ + k] = -gx[i * S_ + k];
        }
      });
    }
    // Per term, the contraction accumulators of one iteration: [blocks, 1 | S | L * S].
    const int64_t blocks = (N_ + kGradBlock - 1) / kGradBlock;
    std::vector<Buffer<T>> partial(terms_.size());
    std::vector<T*> partial_ptr(terms_.size(), nullptr);
    for (size_t k = 0; k < terms_.size(); ++k) {
      if (k >= grads.compat.size() || grads.compat[k] == nullptr) continue;
      partial[k].reset(static_cast<size_t>(blocks * compat_width(terms_[k].spec->compat_kind)));
      partial_ptr[k] = partial[k].data();
    }
    for (int64_t t = iterations; t >= 1; --t) {
      parallel::check_interrupt();
      const T* q_prev = history + (t - 1) * NS;
      filter_all(gx.data(), /*transpose=*/true);
      for (size_t k = 0; k < terms_.size(); ++k)
        if (partial_ptr[k] != nullptr)
          std::fill(partial_ptr[k], partial_ptr[k] + blocks * compat_width(terms_[k].spec->compat_kind), T(0));
      const BackwardPass<T> pass{terms_.data(), terms_.size(), q_prev, gx.data(), gu.data(),
                                 (t == 1 && from_q_init) ? gqi.data() : nullptr, partial_ptr, L_, S_, seq_};
      {
        StageTimer timer("backward: slice+compat+softmax");
        parallel::for_range(0, blocks, 1, [&](int64_t b0, int64_t b1) {
          std::vector<T> scratch(static_cast<size_t>(3 * S_));
          for (int64_t b = b0; b < b1; ++b)
            backward_pixels(pass, scratch.data(), b, b * kGradBlock, std::min(N_, (b + 1) * kGradBlock));
        });
      }
      // Add this iteration's contraction to the gradients: blocks in order, in double.
      for (size_t k = 0; k < terms_.size(); ++k) {
        if (partial_ptr[k] == nullptr) continue;
        double* out = grads.compat[k];
        const T* part = partial_ptr[k];
        switch (terms_[k].spec->compat_kind) {
          case lattice::kPotts:
            for (int64_t b = 0; b < blocks; ++b) out[0] += static_cast<double>(part[b]);
            break;
          case lattice::kDiagonal:
            for (int64_t b = 0; b < blocks; ++b)
              for (int64_t l = 0; l < L_; ++l) out[l] += static_cast<double>(part[b * S_ + l]);
            break;
          default:
            for (int64_t b = 0; b < blocks; ++b)
              for (int64_t l = 0; l < L_; ++l)
                for (int64_t m = 0; m < L_; ++m) out[l * L_ + m] += static_cast<double>(part[(b * L_ + l) * S_ + m]);
            break;
        }
      }
    }
    to_label_major(gu.data(), grads.unary);
    if (from_q_init && grads.q_init != nullptr) to_label_major(gqi.data(), grads.q_init);
  }

 private:
  int64_t compat_width(lattice::CompatKind kind) const {
    return kind == lattice::kPotts ? 1 : kind == lattice::kDiagonal ? S_ : L_ * S_;
  }

  Term<T> prepare(const PairwiseTerm<T>& spec) {
    StageTimer timer("prepare term");
    Term<T> t;
    t.spec = &spec;
    t.lattice = std::make_unique<PermutohedralLattice>(spec.features, spec.dim, N_, S_);
    const int64_t M = t.lattice->num_points();
    if (spec.normalization != lattice::kNoNormalization) {
      StageTimer norm_timer("normalisation");
      // Filter an all-ones image; pydensecrf does this with one value per pixel (sequential order).
      std::vector<T> ones(static_cast<size_t>(N_), T(1)), lattice_values(static_cast<size_t>(M));
      const T* blurred = t.lattice->splat_blur(ones.data(), static_cast<const T*>(nullptr), 1, lattice_values.data());
      std::vector<T> norm(static_cast<size_t>(N_));
      parallel::for_range(0, N_, kPixelGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          T k1;
          t.lattice->template slice_pixel</*kSequentialOrder=*/true>(blurred, 1, i, &k1);
          if constexpr (std::is_same<T, float>::value) {
            norm[i] = lattice::normalisation_factor(k1, spec.normalization);
          } else {
            norm[i] = spec.normalization == lattice::kNormalizeSymmetric ? 1.0 / std::sqrt(k1 + 1e-20)
                                                                          : 1.0 / (k1 + 1e-20);
          }
        }
      });
      if (spec.normalization == lattice::kNormalizeSymmetric || spec.normalization == lattice::kNormalizeBefore)
        t.pre = norm;
      if (spec.normalization == lattice::kNormalizeSymmetric || spec.normalization == lattice::kNormalizeAfter)
        t.post = std::move(norm);
    }
    if (spec.compat_kind == lattice::kDiagonal) {
      t.compat_padded.assign(static_cast<size_t>(S_), T(0));
      std::copy(spec.compat, spec.compat + L_, t.compat_padded.begin());
    } else if (spec.compat_kind == lattice::kMatrix) {
      t.compat_padded.assign(static_cast<size_t>(L_ * S_), T(0));
      for (int64_t m = 0; m < L_; ++m) std::copy(spec.compat + m * L_, spec.compat + (m + 1) * L_, &t.compat_padded[m * S_]);
    }
    t.lattice_values.reset(static_cast<size_t>(M * S_));
    return t;
  }

  // [L, N] -> [N, S] with the padding lanes set to `pad`. With check, returns kUnaryNaN | kUnaryNegInf |
  // kUnaryNoFiniteLabel flags for what it saw in the values.
  int to_pixel_major(const T* src, T* dst, T pad, bool check) const {
    StageTimer timer("transpose in");
    std::atomic<int> bad{0};
    parallel::for_range(0, N_, kPixelGrain, [&](int64_t begin, int64_t end) {
      bad.fetch_or(transpose_in(src, dst, L_, N_, S_, pad, check, begin, end));
    });
    return bad.load();
  }

  // [N, S] -> [L, N]
  void to_label_major(const T* src, T* dst) const {
    StageTimer timer("transpose out");
    parallel::for_range(0, N_, kPixelGrain,
                     [&](int64_t begin, int64_t end) { transpose_out(src, dst, L_, N_, S_, begin, end); });
  }

  // Loads the unary into [N, S] and checks it: NaN and -inf are errors, +inf is an impossible label, and every
  // pixel needs at least one possible label. Padding lanes are +inf (probability 0), so they drop out of the
  // max and the sum.
  void load_unary(const T* unary) {
    const int bad = to_pixel_major(unary, unary_.data(), inf<T>(), true);
    const char* error = input_error(bad);
    TORCH_CHECK(error == nullptr, error);
  }

  // Splats q (or, transposed, the backward's gx) through every term's lattice.
  void filter_all(const T* values, bool transpose) {
    std::vector<const PermutohedralLattice*> lattices;
    std::vector<const T*> scales;
    std::vector<T*> outs;
    for (Term<T>& t : terms_) {
      const std::vector<T>& in_scale = transpose ? t.post : t.pre;
      lattices.push_back(t.lattice.get());
      scales.push_back(in_scale.empty() ? nullptr : in_scale.data());
      outs.push_back(t.lattice_values.data());
      t.blurred = t.lattice_values.data();
    }
    PermutohedralLattice::splat_blur_many(lattices.data(), lattices.size(), values, scales.data(), S_, outs.data(),
                                          transpose);
  }

  // Writes softmax(-unary [- pairwise]) of every pixel to q_out (or the pairwise energy to energy_out).
  void pixel_pass(bool with_pairwise, T* energy_out, T* q_out) {
    StageTimer timer(with_pairwise ? "slice+compat+softmax" : "softmax");
    const PixelPass<T> pass{terms_.data(), terms_.size(), unary_.data(), q_out, energy_out, L_, S_, seq_,
                            with_pairwise, simd::libm_exp_vectorised(), N_};
    parallel::for_range(0, N_, kPixelGrain, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(static_cast<size_t>(4 * S_ + 16));
      pixel_range(pass, scratch.data(), begin, end);
    });
  }

  const Problem<T>& p_;
  const int64_t L_, N_, S_;
  const bool seq_;
  std::vector<Term<T>> terms_;
  Buffer<T> unary_;  // [N, S]
  Buffer<T> q_;      // [N, S]
};

}  // namespace

// The instruction-set level for this call (DEEPLAB_FAST_CPU_SIMD); a bad value or one the CPU lacks is an error.
void select_simd_level() {
  try {
    simd::select();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
  if (profiling_enabled())
    std::fprintf(stderr, "[deeplab_fast] CPU SIMD level %s, std::exp %s\n", simd::level_name(simd::active()),
                 simd::libm_exp_vectorised() && simd::active() >= simd::kAvx2 ? "vectorised" : "per lane");
}

template <typename T>
void mean_field(const Problem<T>& problem, int64_t iterations, T* q_out, T* history) {
  select_simd_level();
  MeanField<T>(problem).run(iterations, q_out, history);
}

template <typename T>
void pairwise_energy(const Problem<T>& problem, T* out) {
  select_simd_level();
  MeanField<T>(problem).energy(out);
}

template <typename T>
void mean_field_backward(const Problem<T>& problem, int64_t iterations, const T* grad_q, const T* q,
                         const T* history, const Gradients<T>& grads) {
  select_simd_level();
  MeanField<T>(problem, /*needs_unary=*/history == nullptr).backward(iterations, grad_q, q, history, grads);
}

template void mean_field<float>(const Problem<float>&, int64_t, float*, float*);
template void mean_field<double>(const Problem<double>&, int64_t, double*, double*);
template void pairwise_energy<float>(const Problem<float>&, float*);
template void pairwise_energy<double>(const Problem<double>&, double*);
template void mean_field_backward<float>(const Problem<float>&, int64_t, const float*, const float*, const float*,
                                         const Gradients<float>&);
template void mean_field_backward<double>(const Problem<double>&, int64_t, const double*, const double*,
                                          const double*, const Gradients<double>&);

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
