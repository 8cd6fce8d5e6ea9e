// Argument checks and outputs shared by the CPU and CUDA registrations of the dense CRF ops. Each op's check
// returns its call's plan (the inputs validated, made contiguous and sized), so both devices reject bad input with
// the same messages and run from the same description. Argument mistakes (dtype, shape, device, value) throw
// c10::ValueError (TORCH_CHECK_VALUE; Python: ValueError) naming the argument and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "lattice_math.h"

namespace deeplab_fast {
namespace dense_crf {

// Most mean-field iterations a call takes (also the Python wrappers' bound).
constexpr int64_t kMaxIterations = (int64_t{1} << 31) - 1;

// A contiguous output of `like`'s dtype (or `dtype`) on `like`'s device, NaN-poisoned when poison_outputs(). CPU
// storage comes from the host block pool (common/block_pool.h) through a torch Allocator, so outputs are
// ordinary, resizable tensors; CUDA storage from torch's caching allocator.
at::Tensor new_output(const at::Tensor& like, at::IntArrayRef sizes);
at::Tensor new_output(const at::Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype);

// The pairwise terms of a call, validated.
struct TermInputs {
  std::vector<at::Tensor> features;  // [B, D, N] contiguous float32 (the lattice's type), on the unary's device
  std::vector<std::pair<lattice::CompatKind, at::Tensor>> compat;  // on the CPU, of the unary's dtype
  std::vector<int64_t> normalization;
};

// A checked call of dense_crf_features(_with_history) or dense_crf_pairwise_energy.
struct Call {
  at::Tensor unary;   // [B, L, N] contiguous; undefined for the pairwise energy
  at::Tensor q_init;  // [B, L, N] contiguous, or undefined; for the pairwise energy: the marginals q
  TermInputs terms;
  int64_t B = 0, L = 0, N = 0;
};

// A checked call of dense_crf_features_backward: the forward's call, and the gradient's own inputs.
struct BackwardCall {
  Call forward;
  at::Tensor grad_q, q;  // [B, L, N] contiguous
  at::Tensor history;    // [B, iterations, N, S] contiguous, or undefined (the forward is recomputed)
  // Per term, how many values of dL/dcompat the kernels accumulate: 1 (Potts), L (diagonal), L * L (matrix),
  // or 0 when its gradient is not wanted.
  std::vector<int64_t> compat_grad_width;
};

// dense_crf_features(_with_history): unary float32 or float64 [B, L, N] (non-empty), iterations in
// [0, kMaxIterations], one feature set, compat and normalization per term, q_init (optional) like the unary.
Call check_call(const at::Tensor& unary, at::TensorList features, at::TensorList compat,
                at::IntArrayRef normalization, int64_t iterations, const c10::optional<at::Tensor>& q_init);

// dense_crf_pairwise_energy: q float32 or float64 non-empty [B, L, N], finite; the terms as above.
Call check_pairwise_energy_call(const at::Tensor& q, at::TensorList features, at::TensorList compat,
                                at::IntArrayRef normalization);

// dense_crf_features_backward: the forward's arguments as check_call, grad_q and q like the unary, history
// (optional) [B, iterations, N, label_stride(L)] (the device's label stride), one compat_grad flag per term.
BackwardCall check_backward_call(const at::Tensor& grad_q, const at::Tensor& q,
                                 const c10::optional<at::Tensor>& history, const at::Tensor& unary,
                                 at::TensorList features, at::TensorList compat, at::IntArrayRef normalization,
                                 int64_t iterations, const c10::optional<at::Tensor>& q_init,
                                 const c10::List<bool>& compat_grad, int64_t (*label_stride)(int64_t));

// The backward's dL/dcompat, one tensor per term with its compat argument's shape, dtype and device: from
// totals[k] (compat_grad_width[k] values, the accumulated dL/dW of the symmetrised W = 0.5 (M + M^T) for a
// matrix), or zeros where the gradient was not wanted.
std::vector<at::Tensor> compat_gradients(const BackwardCall& call, const std::vector<std::vector<double>>& totals,
                                         at::TensorList compat);

// A compat argument for L labels, checked under its public name (`name`): on the CPU or the unary's (`ref`'s)
// device, floating point, a 0-d Potts weight, an [L] diagonal or an [L, L] matrix, finite in the unary's dtype.
// Returns it as a contiguous CPU tensor of the unary's dtype; for a tensor without values (meta, fake) only the
// shape, dtype and device are checked and the result is undefined. L may be symbolic.
at::Tensor check_compat(const at::Tensor& compat, const c10::SymInt& L, const std::string& name,
                        const at::Tensor& ref);
int64_t check_iterations(int64_t iterations);

// The image op's arguments: unary [B, L, H, W] float, image [B, 3, H, W] uint8 on the same device, positive
// standard deviations whose reciprocals are finite in float32. Sizes are compared symbolically, so the
// composite dense_crf traces with dynamic shapes.
void check_image_args(const at::Tensor& unary, const at::Tensor& image, double gaussian_sxy, double bilateral_sxy,
                      double bilateral_srgb);
// The image features op's arguments.
void check_image(const at::Tensor& image, double gaussian_sxy, double bilateral_sxy, double bilateral_srgb);

}  // namespace dense_crf
}  // namespace deeplab_fast
