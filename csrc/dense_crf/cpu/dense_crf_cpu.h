// The CPU registrations of the dense CRF ops (schemas: ../dense_crf_ops.cpp): argument checks (shared with CUDA,
// ../dense_crf_args.h), then one image at a time through the kernels of mean_field.cpp. float32 is bit-exact with
// pydensecrf; float64 runs the same algorithm in double on the same (float32-built) lattice, for gradcheck.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace deeplab_fast {
namespace dense_crf {
namespace cpu {

at::Tensor dense_crf_features(const at::Tensor& unary, at::TensorList features, at::TensorList compat,
                              at::IntArrayRef normalization, int64_t iterations,
                              const c10::optional<at::Tensor>& q_init);

// The same, also returning every iteration's starting marginals [B, T, N, S] for the backward.
std::tuple<at::Tensor, at::Tensor> dense_crf_features_with_history(const at::Tensor& unary, at::TensorList features,
                                                                   at::TensorList compat,
                                                                   at::IntArrayRef normalization, int64_t iterations,
                                                                   const c10::optional<at::Tensor>& q_init);

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> dense_crf_features_backward(
    const at::Tensor& grad_q, const at::Tensor& q, const c10::optional<at::Tensor>& history, const at::Tensor& unary,
    at::TensorList features, at::TensorList compat, at::IntArrayRef normalization, int64_t iterations,
    const c10::optional<at::Tensor>& q_init, const c10::List<bool>& compat_grad);

at::Tensor dense_crf_pairwise_energy(const at::Tensor& q, at::TensorList features, at::TensorList compat,
                                     at::IntArrayRef normalization);

std::tuple<at::Tensor, at::Tensor> dense_crf_image_features(const at::Tensor& image, double gaussian_sxy,
                                                            double bilateral_sxy, double bilateral_srgb);

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
