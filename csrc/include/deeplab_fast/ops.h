// deeplab_fast C++ API for LibTorch users: header-only wrappers that call the deeplab_fast ops through the
// PyTorch dispatcher, exactly as torch.ops.deeplab_fast.* does from Python.
//
// Link (or dlopen) the op library, libdeeplab_fast_ops.so from the CMake build (or deeplab_fast/_C*.so from
// the Python build). The ops register themselves from static initialisers when that library is loaded, and
// a program that uses only this header references none of its symbols: link it with --no-as-needed
// (CMake: target_link_options(<target> PRIVATE "LINKER:--no-as-needed")), otherwise the linker may drop it
// and every call here throws "deeplab_fast::dense_crf is not registered".
//
// Needs only the torch headers (no Python.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace deeplab_fast {

namespace detail {

using DenseCrfSignature = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double, const at::Tensor&,
                                     double, double, const at::Tensor&, bool);

// The typed handle of deeplab_fast::dense_crf, looked up once. Throws c10::Error when the op library is not
// loaded (the lookup is retried on the next call, so loading the library later works).
inline const c10::TypedOperatorHandle<DenseCrfSignature>& dense_crf_op() {
  static const c10::TypedOperatorHandle<DenseCrfSignature> op = [] {
    auto& dispatcher = c10::Dispatcher::singleton();
    TORCH_CHECK(dispatcher.findSchema({"deeplab_fast::dense_crf", ""}).has_value(),
                "deeplab_fast::dense_crf is not registered: load the deeplab_fast op library "
                "(link libdeeplab_fast_ops with --no-as-needed, or dlopen it) before calling deeplab_fast::dense_crf");
    return dispatcher.findSchemaOrThrow("deeplab_fast::dense_crf", "").typed<DenseCrfSignature>();
  }();
  return op;
}

// A Potts weight as the op takes it: a 0-d float32 CPU tensor (as the Python wrapper makes from a float).
inline at::Tensor potts_weight(double w) { return at::scalar_tensor(w, at::TensorOptions().dtype(at::kFloat)); }

}  // namespace detail

// Dense CRF mean-field inference on images (Krähenbühl & Koltun 2011), as pydensecrf's DenseCRF2D with a
// Gaussian (smoothness) and a bilateral (appearance) kernel, DIAG_KERNEL and NORMALIZE_SYMMETRIC.
//
//   unary            [B, L, H, W] float32: unary energies (negative log probabilities); +inf marks an
//                    impossible label, NaN and -inf are errors. Need not be contiguous.
//   image            [B, 3, H, W] uint8: the RGB images, on the unary's device.
//   iterations       mean-field steps, >= 0 (0 returns softmax(-unary)).
//   gaussian_sxy     spatial standard deviation of the smoothness kernel, in pixels (> 0).
//   gaussian_compat  its label compatibility (see below).
//   bilateral_sxy    spatial standard deviation of the appearance kernel, in pixels (> 0).
//   bilateral_srgb   its colour standard deviation, in 8-bit intensity levels (> 0).
//   bilateral_compat its label compatibility.
//
// A compat tensor is floating point and either 0-d (a Potts weight w), [L] (a diagonal) or [L, L] (a
// matrix, symmetrised as 0.5 (W + W^T)), as pydensecrf's `compat`.
//
// Returns Q [B, L, H, W] float32, contiguous, on the unary's device: the marginals after `iterations`
// steps, summing to 1 over L. Results do not depend on the thread count (at::set_num_threads).
// Throws c10::Error on a wrong dtype, shape or device, mismatched sizes, an empty batch, L = 0, NaN or -inf
// in the unary, a non-positive sxy / srgb, or a negative `iterations`.
inline at::Tensor dense_crf(const at::Tensor& unary, const at::Tensor& image, int64_t iterations,
                            double gaussian_sxy, const at::Tensor& gaussian_compat, double bilateral_sxy,
                            double bilateral_srgb, const at::Tensor& bilateral_compat) {
  return detail::dense_crf_op().call(unary, image, iterations, gaussian_sxy, gaussian_compat, bilateral_sxy,
                                     bilateral_srgb, bilateral_compat, /*checkpoint=*/false);
}

// The same with Potts compatibilities (the defaults are those of deeplab_fast.ops.dense_crf in Python and of
// the DeepLab papers' CRF: 10 iterations, Gaussian sxy 3 / weight 3, bilateral sxy 80 / srgb 13 / weight 10).
inline at::Tensor dense_crf(const at::Tensor& unary, const at::Tensor& image, int64_t iterations = 10,
                            double gaussian_sxy = 3.0, double gaussian_compat = 3.0, double bilateral_sxy = 80.0,
                            double bilateral_srgb = 13.0, double bilateral_compat = 10.0) {
  return dense_crf(unary, image, iterations, gaussian_sxy, detail::potts_weight(gaussian_compat), bilateral_sxy,
                   bilateral_srgb, detail::potts_weight(bilateral_compat));
}

}  // namespace deeplab_fast
