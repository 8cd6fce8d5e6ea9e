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
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
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

int64_t label_stride(int64_t L) { return L <= 2 ? L : (L + 7) / 8 * 8; }

// One pairwise term, prepared for iteration: its lattice and per-pixel normalisation factors.
struct Term {
  const PairwiseTerm* spec;
  std::unique_ptr<PermutohedralLattice> lattice;
  std::vector<float> pre;     // per-pixel factor applied before filtering (empty: none)
  std::vector<float> post;    // per-pixel factor applied after filtering (empty: none)
  std::vector<float> compat_padded;  // diagonal compatibility padded to the label stride with zeros
  Buffer<float> lattice_values;  // [M, S]; every row is written by the splat before it is read
  const float* blurred = nullptr;
};

// msg -= compat(filtered) (mean-field update) or msg += compat(filtered) (energy), where compat(x) is
// pydensecrf's LabelCompatibility::apply: -w x (Potts), diag(w) x, or W x (W symmetric). Each product is
// rounded before it is added, as pydensecrf's separate `tmp2 = compat(out); tmp1 -= tmp2` does.
DLF_INLINE void accumulate_compat(const PairwiseTerm& spec, int64_t L, int64_t S, const float* __restrict filtered,
                                  float* __restrict mixed, float* __restrict msg, bool add) {
  const float* c = spec.compat;
  if (spec.compat_kind == lattice::kPotts) {
    scale_to(mixed, -c[0], filtered, S);
  } else if (spec.compat_kind == lattice::kDiagonal) {
    for (int64_t k = 0; k < L; ++k) mixed[k] = c[k] * filtered[k];
    for (int64_t k = L; k < S; ++k) mixed[k] = 0.0f;
  } else {
    zero(mixed, S);
    for (int64_t m = 0; m < L; ++m) {
      const float x = filtered[m];
      const float* __restrict row = c + m * L;  // symmetric: row m == column m
      for (int64_t k = 0; k < L; ++k) mixed[k] += row[k] * x;
    }
  }
  if (S % 8 == 0) {
    for (int64_t k = 0; k < S; k += 8)
      store8(msg + k, add ? load8(msg + k) + load8(mixed + k) : load8(msg + k) - load8(mixed + k));
  } else {
    for (int64_t k = 0; k < S; ++k) msg[k] = add ? msg[k] + mixed[k] : msg[k] - mixed[k];
  }
}

// Q = softmax(msg) over the first L lanes, as pydensecrf's expAndNormalize evaluates it (Eigen: subtract the
// max, exp with pexp on whole packets of 4 and std::exp on the rest, redux sum, divide); padding lanes 0.
DLF_INLINE void softmax(const float* __restrict msg, int64_t L, int64_t S, float* __restrict q) {
  float mx = msg[0];
  for (int64_t k = 1; k < L; ++k) mx = msg[k] > mx ? msg[k] : mx;
  const int64_t packets = (L / 4) * 4;
  for (int64_t k = 0; k < packets; ++k) q[k] = exp_eigen(msg[k] - mx);
  for (int64_t k = packets; k < L; ++k) q[k] = std::exp(msg[k] - mx);
  const float sum = eigen_sum(q, L);
  for (int64_t k = 0; k < L; ++k) q[k] = q[k] / sum;
  for (int64_t k = L; k < S; ++k) q[k] = 0.0f;
}

struct PixelPass;
template <int C>
DLF_INLINE void pixel_range_vec(const PixelPass& a, float* scratch, int64_t begin, int64_t end);

struct PixelPass {
  const Term* terms;
  size_t num_terms;
  const float* unary;  // [N, S]
  float* q;            // [N, S]
  float* energy_out;   // [N, S] or nullptr
  int64_t L, S;
  bool sequential_slice;
  bool with_pairwise;
};

// The fused per-pixel step over pixels [begin, end): msg = -unary - sum_k compat_k(post_k * slice_k);
// Q = softmax(msg). With energy_out: writes sum_k compat_k(...) instead. Any label stride.
DLF_INLINE void pixel_range_any(const PixelPass& a, float* scratch, int64_t begin, int64_t end) {
  const int64_t S = a.S, L = a.L;
  float* __restrict msg = scratch;
  float* __restrict filtered = msg + S;
  float* __restrict mixed = filtered + S;
  float* __restrict sliced = mixed + S;
  for (int64_t i = begin; i < end; ++i) {
    if (a.energy_out != nullptr) {
      zero(msg, S);
    } else {
      scale_to(msg, -1.0f, a.unary + i * S, S);
    }
    if (a.with_pairwise) {
      for (size_t t = 0; t < a.num_terms; ++t) {
        const Term& term = a.terms[t];
        if (a.sequential_slice) {
          term.lattice->slice_pixel<true>(term.blurred, S, i, sliced);
        } else {
          term.lattice->slice_pixel<false>(term.blurred, S, i, sliced);
        }
        const float* __restrict f = sliced;
        if (!term.post.empty()) {
          scale_to(filtered, term.post[i], sliced, S);
          f = filtered;
        }
        accumulate_compat(*term.spec, L, S, f, mixed, msg, a.energy_out != nullptr);
      }
    }
    if (a.energy_out != nullptr) {
      std::copy(msg, msg + S, a.energy_out + i * S);
      continue;
    }
    softmax(msg, L, S, a.q + i * S);
  }
}

// The same step for a label stride of exactly 8 C, with Potts or diagonal compatibilities, keeping each
// pixel's labels in C vector registers throughout. Padding lanes of the unary are +inf, so the message is
// -inf there and the max and the sum can run over whole vectors.
template <int C>
DLF_INLINE void pixel_range_vec(const PixelPass& a, float* scratch, int64_t begin, int64_t end) {
  constexpr int64_t S = 8 * C;
  const int64_t L = a.L;
  vec8 valid[C];
  for (int c = 0; c < C; ++c)
    for (int k = 0; k < 8; ++k) valid[c][k] = (8 * c + k < L) ? 1.0f : 0.0f;
  for (int64_t i = begin; i < end; ++i) {
    vec8 msg[C];
    for (int c = 0; c < C; ++c) msg[c] = -load8(a.unary + i * S + 8 * c);
    for (size_t t = 0; t < (a.with_pairwise ? a.num_terms : 0); ++t) {
      const Term& term = a.terms[t];
      const PermutohedralLattice& lat = *term.lattice;
      const int32_t* vert = lat.vertices(i);
      const float* w = lat.weights(i);
      vec8 s[C];
      for (int c = 0; c < C; ++c) s[c] = splat8(0.0f);
      for (int r = 0; r <= lat.dim(); ++r) {
        const float wa = w[r] * lat.alpha();
        const float* __restrict v = term.blurred + static_cast<int64_t>(vert[r]) * S;
        for (int c = 0; c < C; ++c) s[c] += wa * load8(v + 8 * c);
      }
      if (!term.post.empty()) {
        const float post = term.post[i];
        for (int c = 0; c < C; ++c) s[c] = post * s[c];
      }
      if (term.spec->compat_kind == lattice::kPotts) {
        const float nw = -term.spec->compat[0];
        for (int c = 0; c < C; ++c) msg[c] = msg[c] - nw * s[c];
      } else {  // diagonal, padded with zeros
        for (int c = 0; c < C; ++c) msg[c] = msg[c] - load8(term.compat_padded.data() + 8 * c) * s[c];
      }
    }
    // Softmax as pydensecrf's expAndNormalize evaluates it (see softmax()); padding lanes are -inf.
    vec8 mx = msg[0];
    for (int c = 1; c < C; ++c) mx = mx > msg[c] ? mx : msg[c];
    float m = mx[0];
    for (int k = 1; k < 8; ++k) m = mx[k] > m ? mx[k] : m;
    vec8 e[C];
    for (int c = 0; c < C; ++c) e[c] = exp8_eigen(msg[c] - m) * valid[c];
    for (int64_t k = (L / 4) * 4; k < L; ++k) e[k / 8][k % 8] = std::exp(msg[k / 8][k % 8] - m);
    const float sum = eigen_sum8<C>(e, L);
    for (int c = 0; c < C; ++c) store8(a.q + i * S + 8 * c, e[c] / sum);
  }
}

DLF_CPU_KERNEL void pixel_range(const PixelPass& a, float* scratch, int64_t begin, int64_t end) {
  bool vectorisable = a.S % 8 == 0 && a.S <= 64 && a.energy_out == nullptr;
  for (size_t t = 0; t < a.num_terms; ++t) vectorisable &= a.terms[t].spec->compat_kind != lattice::kMatrix;
  switch (vectorisable ? a.S / 8 : 0) {
    case 1: pixel_range_vec<1>(a, scratch, begin, end); break;
    case 2: pixel_range_vec<2>(a, scratch, begin, end); break;
    case 3: pixel_range_vec<3>(a, scratch, begin, end); break;
    case 4: pixel_range_vec<4>(a, scratch, begin, end); break;
    case 5: pixel_range_vec<5>(a, scratch, begin, end); break;
    case 6: pixel_range_vec<6>(a, scratch, begin, end); break;
    case 7: pixel_range_vec<7>(a, scratch, begin, end); break;
    case 8: pixel_range_vec<8>(a, scratch, begin, end); break;
    default: pixel_range_any(a, scratch, begin, end); break;
  }
}

// [L, N] -> [N, S] for pixels [begin, end), padding lanes set to `pad`; with check, returns the kUnaryNaN / kUnaryNegInf /
// kUnaryNoFiniteLabel flags of those pixels' values. Eight pixels at a time by 8x8 register transposes when S is a
// multiple of 8.
DLF_CPU_KERNEL int transpose_in(const float* src, float* dst, int64_t L, int64_t N, int64_t S, float pad, bool check,
                                int64_t begin, int64_t end) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  int bad = 0;
  int64_t i = begin;
  if (S % 8 == 0) {
    for (; i + 8 <= end; i += 8) {
      ivec8 nan{}, neg{};
      vec8 lowest = splat8(kInf);  // per pixel, the smallest value over labels
      for (int64_t l0 = 0; l0 < S; l0 += 8) {
        vec8 rows[8];
        for (int k = 0; k < 8; ++k) {
          if (l0 + k >= L) {
            rows[k] = splat8(pad);
            continue;
          }
          rows[k] = load8(src + (l0 + k) * N + i);
          nan |= rows[k] != rows[k];
          neg |= rows[k] == -kInf;
          lowest = rows[k] < lowest ? rows[k] : lowest;
        }
        transpose8x8(rows);
        for (int k = 0; k < 8; ++k) store8(dst + (i + k) * S + l0, rows[k]);
      }
      if (check) {
        for (int k = 0; k < 8; ++k) {
          if (nan[k]) bad |= kUnaryNaN;
          if (neg[k]) bad |= kUnaryNegInf;
          if (!(lowest[k] < kInf) && lowest[k] == lowest[k]) bad |= kUnaryNoFiniteLabel;
        }
      }
    }
  }
  for (; i < end; ++i) {
    bool possible = false;
    for (int64_t l = 0; l < L; ++l) {
      const float u = src[l * N + i];
      dst[i * S + l] = u;
      if (std::isnan(u)) bad |= kUnaryNaN;
      if (u == -kInf) bad |= kUnaryNegInf;
      possible |= u < kInf;
    }
    for (int64_t l = L; l < S; ++l) dst[i * S + l] = pad;
    if (!possible) bad |= kUnaryNoFiniteLabel;
  }
  return check ? bad : 0;
}

// [N, S] -> [L, N] for pixels [begin, end).
DLF_CPU_KERNEL void transpose_out(const float* src, float* dst, int64_t L, int64_t N, int64_t S, int64_t begin,
                                  int64_t end) {
  int64_t i = begin;
  if (S % 8 == 0) {
    for (; i + 8 <= end; i += 8) {
      for (int64_t l0 = 0; l0 < L; l0 += 8) {
        vec8 rows[8];
        for (int k = 0; k < 8; ++k) rows[k] = load8(src + (i + k) * S + l0);
        transpose8x8(rows);
        for (int k = 0; k < 8 && l0 + k < L; ++k) store8(dst + (l0 + k) * N + i, rows[k]);
      }
    }
  }
  for (; i < end; ++i)
    for (int64_t l = 0; l < L; ++l) dst[l * N + i] = src[i * S + l];
}

class MeanField {
 public:
  explicit MeanField(const Problem& p)
      : p_(p), L_(p.num_labels), N_(p.num_pixels), S_(label_stride(p.num_labels)), seq_(p.num_labels <= 2) {
    // Buffers are left uninitialised: every element is written before it is read.
    unary_.reset(static_cast<size_t>(N_ * S_));
    {
      StageTimer timer("load unary");
      if (p.unary != nullptr) load_unary(p.unary);
    }
    terms_.reserve(p.terms.size());
    for (const PairwiseTerm& spec : p.terms) terms_.push_back(prepare(spec));
    q_.reset(static_cast<size_t>(N_ * S_));
  }

  void run(int64_t iterations, float* q_out) {
    if (p_.q_init != nullptr) {
      to_pixel_major(p_.q_init, q_.data(), 0.0f, false);
    } else {
      pixel_pass(/*with_pairwise=*/false, /*energy_out=*/nullptr);
    }
    for (int64_t it = 0; it < iterations; ++it) {
      filter_all();
      pixel_pass(/*with_pairwise=*/true, /*energy_out=*/nullptr);
    }
    to_label_major(q_.data(), q_out);
  }

  void energy(float* out) {
    TORCH_CHECK(p_.q_init != nullptr, "dense_crf: the pairwise energy needs marginals q");
    to_pixel_major(p_.q_init, q_.data(), 0.0f, false);
    filter_all();
    std::vector<float> e(static_cast<size_t>(N_ * S_), 0.0f);
    pixel_pass(/*with_pairwise=*/true, e.data());
    to_label_major(e.data(), out);
  }

 private:
  Term prepare(const PairwiseTerm& spec) {
    StageTimer timer("prepare term");
    Term t;
    t.spec = &spec;
    t.lattice = std::make_unique<PermutohedralLattice>(spec.features, spec.dim, N_);
    const int64_t M = t.lattice->num_points();
    if (spec.normalization != lattice::kNoNormalization) {
      StageTimer norm_timer("normalisation");
      // Filter an all-ones image; pydensecrf does this with one value per pixel (sequential order).
      std::vector<float> ones(static_cast<size_t>(N_), 1.0f), lattice_values(static_cast<size_t>(M));
      const float* blurred = t.lattice->splat_blur(ones.data(), nullptr, 1, lattice_values.data());
      std::vector<float> norm(static_cast<size_t>(N_));
      at::parallel_for(0, N_, kPixelGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          float k1;
          t.lattice->slice_pixel</*kSequentialOrder=*/true>(blurred, 1, i, &k1);
          norm[i] = lattice::normalisation_factor(k1, spec.normalization);
        }
      });
      if (spec.normalization == lattice::kNormalizeSymmetric || spec.normalization == lattice::kNormalizeBefore)
        t.pre = norm;
      if (spec.normalization == lattice::kNormalizeSymmetric || spec.normalization == lattice::kNormalizeAfter)
        t.post = std::move(norm);
    }
    if (spec.compat_kind == lattice::kDiagonal) {
      t.compat_padded.assign(static_cast<size_t>(S_), 0.0f);
      std::copy(spec.compat, spec.compat + L_, t.compat_padded.begin());
    }
    t.lattice_values.reset(static_cast<size_t>(M * S_));
    return t;
  }

  // [L, N] -> [N, S] with the padding lanes set to `pad`. With check, returns kUnaryNaN | kUnaryNegInf | kUnaryNoFiniteLabel
  // flags for what it saw in the values.
  int to_pixel_major(const float* src, float* dst, float pad, bool check) const {
    StageTimer timer("transpose in");
    std::atomic<int> bad{0};
    at::parallel_for(0, N_, kPixelGrain, [&](int64_t begin, int64_t end) {
      bad.fetch_or(transpose_in(src, dst, L_, N_, S_, pad, check, begin, end));
    });
    return bad.load();
  }

  // [N, S] -> [L, N]
  void to_label_major(const float* src, float* dst) const {
    StageTimer timer("transpose out");
    at::parallel_for(0, N_, kPixelGrain,
                     [&](int64_t begin, int64_t end) { transpose_out(src, dst, L_, N_, S_, begin, end); });
  }

  // Loads the unary into [N, S] and checks it: NaN and -inf are errors, +inf is an impossible label, and every
  // pixel needs at least one possible label. Padding lanes are +inf (probability 0), so they drop out of the
  // max and the sum.
  void load_unary(const float* unary) {
    const int bad = to_pixel_major(unary, unary_.data(), std::numeric_limits<float>::infinity(), true);
    const char* error = input_error(bad);
    TORCH_CHECK(error == nullptr, error);
  }

  void filter_all() {
    for (Term& t : terms_) {
      t.blurred = t.lattice->splat_blur(q_.data(), t.pre.empty() ? nullptr : t.pre.data(), S_,
                                        t.lattice_values.data());
    }
  }

  void pixel_pass(bool with_pairwise, float* energy_out) {
    StageTimer timer(with_pairwise ? "slice+compat+softmax" : "softmax");
    const PixelPass pass{terms_.data(), terms_.size(), unary_.data(), q_.data(), energy_out, L_, S_, seq_,
                         with_pairwise};
    at::parallel_for(0, N_, kPixelGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(static_cast<size_t>(4 * S_));
      pixel_range(pass, scratch.data(), begin, end);
    });
  }

  const Problem& p_;
  const int64_t L_, N_, S_;
  const bool seq_;
  std::vector<Term> terms_;
  Buffer<float> unary_;  // [N, S]
  Buffer<float> q_;      // [N, S]
};

}  // namespace

void mean_field(const Problem& problem, int64_t iterations, float* q_out) {
  MeanField(problem).run(iterations, q_out);
}

void pairwise_energy(const Problem& problem, float* out) { MeanField(problem).energy(out); }

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
