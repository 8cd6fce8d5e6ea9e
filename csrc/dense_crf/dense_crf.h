// The dense CRF problem as the kernels see it: raw pointers and sizes, no torch types.
//
// Shared by the CPU implementation (cpu/) and the torch glue (dense_crf_ops.cpp); a CUDA implementation
// takes the same description. Layouts are those of the op: unary and Q are [L, N] per image (label-major,
// N = H * W pixels in row-major order), features are [D, N].
#pragma once

#include <cstdint>
#include <vector>

#include "lattice_math.h"

namespace deeplab_fast {
namespace dense_crf {

// One pairwise term: a Gaussian kernel over `features` (already divided by their standard deviations),
// a label compatibility and a normalisation.
struct PairwiseTerm {
  const float* features = nullptr;  // [dim, N]
  int dim = 0;
  lattice::CompatKind compat_kind = lattice::kPotts;
  // kPotts: 1 weight; kDiagonal: L weights; kMatrix: L x L row-major, already symmetrised.
  const float* compat = nullptr;
  int64_t normalization = lattice::kNormalizeSymmetric;
};

// One image's problem.
struct Problem {
  const float* unary = nullptr;   // [L, N] unary energies (negative log probabilities)
  const float* q_init = nullptr;  // optional [L, N] starting marginals; nullptr: softmax(-unary)
  int64_t num_labels = 0;         // L
  int64_t num_pixels = 0;         // N
  std::vector<PairwiseTerm> terms;
};

// Bad input the kernels find while they work (CPU and CUDA), as bit flags OR-ed together.
enum InputFlag : int {
  kUnaryNaN = 1,
  kUnaryNegInf = 2,
  kUnaryNoFiniteLabel = 4,  // every label of some pixel is +inf
  kFeaturesOversize = 8,    // a scaled feature coordinate is too large for integer lattice keys
};

// The error message for the first flag set in `flags`, in the order above; nullptr when none is set.
inline const char* input_error(int flags) {
  if (flags & kUnaryNaN) return "dense_crf: unary contains NaN";
  if (flags & kUnaryNegInf) return "dense_crf: unary contains -inf";
  if (flags & kUnaryNoFiniteLabel)
    return "dense_crf: unary is +inf for every label of some pixel; at least one label must have finite energy";
  if (flags & kFeaturesOversize)
    return "dense_crf: features too large for the lattice (a scaled coordinate exceeds 2^22); check the kernel "
           "standard deviations (sxy, srgb) and the feature values";
  return nullptr;
}

namespace cpu {

// Mean-field inference (Krähenbühl & Koltun 2011, algorithm 1) for `iterations` steps; writes Q [L, N].
void mean_field(const Problem& problem, int64_t iterations, float* q_out);

// The summed pairwise messages sum_k compat_k(K_k Q) for the marginals problem.q_init, [L, N], as
// pydensecrf's PairwisePotential::apply computes them (used for the KL divergence).
void pairwise_energy(const Problem& problem, float* out);

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
