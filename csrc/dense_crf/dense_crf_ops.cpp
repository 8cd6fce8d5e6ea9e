// The dense CRF ops: schemas and the image-level composite (argument checks: dense_crf_args.h; the kernels register
// per device: cpu/dense_crf_cpu_ops.cpp, cuda/dense_crf_cuda_ops.cpp).
//
//   deeplab_fast::dense_crf_features(unary[B,L,N], features[], compat[], normalization[], iterations,
//                                    q_init?) -> Q[B,L,N]
//   deeplab_fast::dense_crf_features_with_history(<the same>) -> (Q[B,L,N], history[B,T,N,S]): also the
//       marginals every iteration starts from, in the kernels' pixel-major layout (S: the device's label stride)
//   deeplab_fast::dense_crf_features_backward(grad_q, q, history?, unary, features[], compat[], normalization[],
//       iterations, q_init?, compat_grad[]) -> (grad_unary, grad_compat[], grad_q_init): the vector-Jacobian
//       product of mean-field inference; without a history the forward is recomputed (checkpointing)
//   deeplab_fast::dense_crf_image_features(image[B,3,H,W] u8, gaussian_sxy, bilateral_sxy, bilateral_srgb)
//       -> (gaussian[B,2,N], bilateral[B,5,N]): pydensecrf DenseCRF2D's features
//   deeplab_fast::dense_crf(unary[B,L,H,W], image[B,3,H,W] u8, iterations, gaussian_sxy, gaussian_compat,
//       bilateral_sxy, bilateral_srgb, bilateral_compat, checkpoint=False) -> Q[B,L,H,W]: a composite of the ops
//       above, with NORMALIZE_SYMMETRIC terms (pydensecrf's DenseCRF2D defaults); when a gradient is wanted, the
//       history-keeping forward unless checkpoint
//   deeplab_fast::dense_crf_pairwise_energy(q[B,L,N], features[], compat[], normalization[]) -> [B,L,N]
//
// A compat tensor is 0-d (Potts weight w), [L] (diagonal) or [L, L] (matrix, symmetrised), as pydensecrf's
// `compat`. Features are [B, D, N], already divided by the kernel standard deviations.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

#include "common/block_pool.h"
#include "dense_crf_args.h"

namespace deeplab_fast {
namespace dense_crf {

namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// dense_crf = dense_crf_image_features + dense_crf_features, for every backend and under autograd (the features op
// carries the gradient): when a gradient is wanted and checkpoint is false, through the history-keeping forward.
// Its own arguments are checked here under their names (the compatibilities before the inner op sees them as
// compat[0] and compat[1]), in the inner op's order. Sizes are symbolic, so it traces with dynamic shapes.
at::Tensor dense_crf_composite(const at::Tensor& unary, const at::Tensor& image, int64_t iterations,
                               double gaussian_sxy, const at::Tensor& gaussian_compat, double bilateral_sxy,
                               double bilateral_srgb, const at::Tensor& bilateral_compat, bool checkpoint) {
  check_image_args(unary, image, gaussian_sxy, bilateral_sxy, bilateral_srgb);
  check_iterations(iterations);
  check_compat(gaussian_compat, unary.sym_size(1), "gaussian_compat", unary);
  check_compat(bilateral_compat, unary.sym_size(1), "bilateral_compat", unary);
  static const auto features_of = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double, double, double)>(
      "deeplab_fast::dense_crf_image_features");
  using Forward = at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef, int64_t,
                             const c10::optional<at::Tensor>&);
  using ForwardWithHistory = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList,
                                                                at::IntArrayRef, int64_t,
                                                                const c10::optional<at::Tensor>&);
  static const auto mean_field = op<Forward>("deeplab_fast::dense_crf_features");
  static const auto mean_field_with_history = op<ForwardWithHistory>("deeplab_fast::dense_crf_features_with_history");
  const auto [gaussian, bilateral] = features_of.call(image, gaussian_sxy, bilateral_sxy, bilateral_srgb);
  const c10::SymInt B = unary.sym_size(0), L = unary.sym_size(1), H = unary.sym_size(2), W = unary.sym_size(3);
  const std::vector<int64_t> normalization{lattice::kNormalizeSymmetric, lattice::kNormalizeSymmetric};
  const bool keep_history = !checkpoint && at::GradMode::is_enabled() &&
                            (unary.requires_grad() || gaussian_compat.requires_grad() ||
                             bilateral_compat.requires_grad());
  const at::Tensor u = unary.reshape_symint({B, L, H * W});
  const at::Tensor q =
      keep_history ? std::get<0>(mean_field_with_history.call(u, {gaussian, bilateral},
                                                             {gaussian_compat, bilateral_compat}, normalization,
                                                             iterations, c10::nullopt))
                   : mean_field.call(u, {gaussian, bilateral}, {gaussian_compat, bilateral_compat}, normalization,
                                     iterations, c10::nullopt);
  return q.view_symint({B, L, H, W});
}

// The CUDA kernels synchronise with the host (input checks, lattice sizes), so the ops cannot be captured in a
// CUDA graph: tag them so that torch.compile(mode="reduce-overhead") splits its graphs around them. The tag is
// recent; with a torch that lacks it the ops are registered without it.
template <typename Tag>
auto cudagraph_unsafe(int) -> decltype(std::vector<Tag>{Tag::cudagraph_unsafe}) {
  return {Tag::cudagraph_unsafe};
}
template <typename Tag>
std::vector<Tag> cudagraph_unsafe(...) {
  return {};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deeplab_fast, m) {
  const std::vector<at::Tag> tags = cudagraph_unsafe<at::Tag>(0);
  m.def(
      "dense_crf(Tensor unary, Tensor image, int iterations, float gaussian_sxy, Tensor gaussian_compat, "
      "float bilateral_sxy, float bilateral_srgb, Tensor bilateral_compat, bool checkpoint=False) -> Tensor",
      tags);
  m.def(
      "dense_crf_features(Tensor unary, Tensor[] features, Tensor[] compat, int[] normalization, int iterations, "
      "Tensor? q_init) -> Tensor",
      tags);
  m.def(
      "dense_crf_features_with_history(Tensor unary, Tensor[] features, Tensor[] compat, int[] normalization, "
      "int iterations, Tensor? q_init) -> (Tensor, Tensor)",
      tags);
  m.def(
      "dense_crf_features_backward(Tensor grad_q, Tensor q, Tensor? history, Tensor unary, Tensor[] features, "
      "Tensor[] compat, int[] normalization, int iterations, Tensor? q_init, bool[] compat_grad) "
      "-> (Tensor, Tensor[], Tensor)",
      tags);
  m.def(
      "dense_crf_image_features(Tensor image, float gaussian_sxy, float bilateral_sxy, float bilateral_srgb) "
      "-> (Tensor, Tensor)");
  m.def("dense_crf_pairwise_energy(Tensor q, Tensor[] features, Tensor[] compat, int[] normalization) -> Tensor",
        tags);
  // Frees the host memory the CPU dense CRF keeps for reuse between calls (common/block_pool.h).
  m.def("empty_cache() -> ()", [] { BlockPool::instance().empty(); });
  m.impl("dense_crf", c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(dense_crf_composite));
}

}  // namespace dense_crf
}  // namespace deeplab_fast
