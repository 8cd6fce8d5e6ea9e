// Argument checks and output allocation shared by the CPU and CUDA registrations of the dense CRF ops, so that
// both devices reject bad input with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "common/env.h"
#include "lattice_math.h"

namespace deeplab_fast {
namespace dense_crf {

// Most mean-field iterations a call takes (also the Python wrappers' bound).
constexpr int64_t kMaxIterations = (int64_t{1} << 31) - 1;

// A contiguous output of `like`'s dtype (or `dtype`) on `like`'s device, NaN-poisoned when poison_outputs(). CPU
// storage comes from the dense CRF's block pool (cpu/buffer.h) through a torch Allocator, so outputs are
// ordinary, resizable tensors; CUDA storage from torch's caching allocator.
at::Tensor new_output(const at::Tensor& like, at::IntArrayRef sizes);
at::Tensor new_output(const at::Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype);

// The unary's value type: float32 (any device) or float64 (the CPU's float64 path).
void check_value_tensor(const at::Tensor& t, const char* name);
// `t` must be on the unary's device.
void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name);
// A validated compat argument for L labels, as a contiguous CPU tensor of `dtype`: 0-d Potts weight, [L]
// diagonal or [L, L] matrix (symmetrised as 0.5 (W + W^T)). It may live on the CPU or on the unary's device.
std::pair<lattice::CompatKind, at::Tensor> prepare_compat(const at::Tensor& compat, int64_t L, const std::string& name,
                                                          const at::Tensor& ref);
int64_t check_iterations(int64_t iterations);

// The pairwise terms of a call, validated.
struct TermInputs {
  std::vector<at::Tensor> features;  // [B, D, N] contiguous float32 (the lattice's type), on the unary's device
  std::vector<std::pair<lattice::CompatKind, at::Tensor>> compat;  // on the CPU, of the unary's dtype
  std::vector<int64_t> normalization;
};
TermInputs check_terms(const at::Tensor& ref, int64_t B, int64_t L, int64_t N, at::TensorList features,
                       at::TensorList compat, at::IntArrayRef normalization);

// unary: float32 or float64, `dims`-D (3: [B, L, N], 4: [B, L, H, W]), non-empty.
void check_unary_shape(const at::Tensor& unary, int64_t dims, const char* layout);
// The marginals q of the pairwise energy: float32 or float64, non-empty [B, L, N], finite.
void check_marginals(const at::Tensor& q);
// q_init (optional): the unary's dtype, device and shape, finite. Returns it contiguous (or undefined).
at::Tensor check_q_init(const c10::optional<at::Tensor>& q_init, const at::Tensor& unary);
// The image op's arguments: unary [B, L, H, W] float, image [B, 3, H, W] uint8 on the same device, positive
// standard deviations whose reciprocals are finite in float32. Sizes are compared symbolically, so the
// composite dense_crf traces with dynamic shapes.
void check_image_args(const at::Tensor& unary, const at::Tensor& image, double gaussian_sxy, double bilateral_sxy,
                      double bilateral_srgb);
// The image features op's arguments.
void check_image(const at::Tensor& image, double gaussian_sxy, double bilateral_sxy, double bilateral_srgb);

// Backward: grad_q and q are the unary's dtype, device and shape; history (optional) is [B, T, N, S].
void check_backward_args(const at::Tensor& grad_q, const at::Tensor& q, const c10::optional<at::Tensor>& history,
                         const at::Tensor& unary, int64_t iterations, int64_t label_stride);

// dL/dM for a compat argument M (its shape, dtype and device), from the accumulated dL/dW of the symmetrised
// W = 0.5 (M + M^T) (kMatrix), or of the weights as given (kPotts: 1 value, kDiagonal: L values).
at::Tensor compat_gradient(const std::vector<double>& g, lattice::CompatKind kind, int64_t L, const at::Tensor& compat);

}  // namespace dense_crf
}  // namespace deeplab_fast
