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


// A contiguous float32 output on `like`'s device, NaN-poisoned when poison_outputs(). CPU storage comes from
// the dense CRF's block pool (cpu/buffer.h); CUDA storage from torch's caching allocator.
at::Tensor new_output(const at::Tensor& like, at::IntArrayRef sizes);

void check_float_tensor(const at::Tensor& t, const char* name);
// `t` must be on the unary's device.
void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name);
// A validated compat argument for L labels as a contiguous float32 CPU tensor: 0-d Potts weight, [L] diagonal
// or [L, L] matrix (symmetrised as 0.5 (W + W^T)).
std::pair<lattice::CompatKind, at::Tensor> prepare_compat(const at::Tensor& compat, int64_t L,
                                                          const std::string& name);
int64_t check_iterations(int64_t iterations);

// The pairwise terms of a call, validated.
struct TermInputs {
  std::vector<at::Tensor> features;  // [B, D, N] contiguous float32, on the unary's device
  std::vector<std::pair<lattice::CompatKind, at::Tensor>> compat;  // on the CPU
  std::vector<int64_t> normalization;
};
TermInputs check_terms(const at::Tensor& ref, int64_t B, int64_t L, int64_t N, at::TensorList features,
                       at::TensorList compat, at::IntArrayRef normalization);

// unary: float32, `dims`-D (3: [B, L, N], 4: [B, L, H, W]), non-empty.
void check_unary_shape(const at::Tensor& unary, int64_t dims, const char* layout);
// The marginals q of the pairwise energy: float32, non-empty [B, L, N], finite.
void check_marginals(const at::Tensor& q);
// q_init (optional): float32, the unary's device and shape, finite. Returns it contiguous (or undefined).
at::Tensor check_q_init(const c10::optional<at::Tensor>& q_init, const at::Tensor& unary);
// The image op's arguments: unary [B, L, H, W] float32, image [B, 3, H, W] uint8 on the same device, positive
// finite standard deviations.
void check_image_args(const at::Tensor& unary, const at::Tensor& image, double gaussian_sxy, double bilateral_sxy,
                      double bilateral_srgb);

}  // namespace dense_crf
}  // namespace deeplab_fast
