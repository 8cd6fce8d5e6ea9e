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
// a label compatibility and a normalisation. T is the value type of the computation (float: the bit-exact
// path; double: the CPU's float64 path); the lattice is always built from float features.
template <typename T>
struct PairwiseTerm {
  const float* features = nullptr;  // [dim, N]
  int dim = 0;
  lattice::CompatKind compat_kind = lattice::kPotts;
  // kPotts: 1 weight; kDiagonal: L weights; kMatrix: L x L row-major, already symmetrised.
  const T* compat = nullptr;
  int64_t normalization = lattice::kNormalizeSymmetric;
};

// One image's problem.
template <typename T>
struct Problem {
  const T* unary = nullptr;   // [L, N] unary energies (negative log probabilities)
  const T* q_init = nullptr;  // optional [L, N] starting marginals; nullptr: softmax(-unary)
  int64_t num_labels = 0;     // L
  int64_t num_pixels = 0;     // N
  std::vector<PairwiseTerm<T>> terms;
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

// The label stride of the CPU kernels' pixel-major layout [N, S]: L for L <= 2, 4 for L = 3 and 4 (two or four
// pixels per 8-float vector), else L rounded up to 8.
inline int64_t label_stride(int64_t L) { return L <= 2 ? L : L <= 4 ? 4 : (L + 7) / 8 * 8; }

// Mean-field inference (Krähenbühl & Koltun 2011, algorithm 1) for `iterations` steps; writes Q [L, N].
// history (optional, [iterations, N, S] with S = label_stride(L)): receives Q_0 .. Q_{iterations-1}, the
// marginals each iteration starts from, in the kernels' pixel-major layout (the backward reads them).
template <typename T>
void mean_field(const Problem<T>& problem, int64_t iterations, T* q_out, T* history = nullptr);

// The summed pairwise messages sum_k compat_k(K_k Q) for the marginals problem.q_init, [L, N], as
// pydensecrf's PairwisePotential::apply computes them (used for the KL divergence).
template <typename T>
void pairwise_energy(const Problem<T>& problem, T* out);

// The gradients of one image's mean-field inference (the vector-Jacobian product with grad_q).
template <typename T>
struct Gradients {
  T* unary = nullptr;                 // [L, N] dL/d unary (always written)
  T* q_init = nullptr;                // [L, N] dL/d q_init, when problem.q_init is set (else unused)
  std::vector<double*> compat;        // per term: nullptr (not wanted) or its accumulator, to which this image's
                                      // dL/d compat is ADDED: 1 (Potts), L (diagonal) or L x L (matrix, the
                                      // gradient w.r.t. the symmetrised matrix, not yet symmetrised)
};

// Backward of mean_field: given dL/dQ (grad_q [L, N]) and the forward's output q [L, N], writes the gradients.
// history: the forward's history, or nullptr to recompute it here (checkpointing). The lattice is rebuilt.
template <typename T>
void mean_field_backward(const Problem<T>& problem, int64_t iterations, const T* grad_q, const T* q,
                         const T* history, const Gradients<T>& grads);

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
