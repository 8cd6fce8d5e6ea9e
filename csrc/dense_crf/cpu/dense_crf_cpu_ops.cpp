// The CPU kernels of the dense CRF ops (schemas: ../dense_crf_ops.cpp) and their registration: the arguments are
// checked as on CUDA (../dense_crf_args.h), then each image runs through the kernels of mean_field.cpp. float32 is
// bit-exact with pydensecrf; float64 runs the same algorithm in double on the same (float32-built) lattice, for
// gradcheck.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../dense_crf.h"
#include "../dense_crf_args.h"
#include "common/parallel.h"
#include "stage_timer.h"

namespace deeplab_fast {
namespace dense_crf {
namespace cpu {

namespace {

// Runs fn(b) for every image: across images when there are enough of them to keep every thread busy,
// otherwise one image at a time with the parallelism inside. Either way each image's result is the same.
// Interrupts (Ctrl-C) are checked between images and between iterations (parallel::check_interrupt).
template <typename Fn>
void for_each_image(int64_t batch, Fn fn) {
  if (batch >= parallel::num_threads() && batch > 1) {
    parallel::for_each(batch, [&](int64_t b) { fn(b); });
    parallel::check_interrupt();
  } else {
    for (int64_t b = 0; b < batch; ++b) {
      parallel::check_interrupt();
      fn(b);
    }
  }
}

// Image b's problem: pointers into the call's unary, q_init (or marginals) and features.
template <typename T>
Problem<T> make_problem(const Call& c, int64_t b) {
  const int64_t L = c.L, N = c.N;
  const TermInputs& in = c.terms;
  Problem<T> p;
  p.unary = c.unary.defined() ? c.unary.data_ptr<T>() + b * L * N : nullptr;
  p.q_init = c.q_init.defined() ? c.q_init.data_ptr<T>() + b * L * N : nullptr;
  p.num_labels = L;
  p.num_pixels = N;
  for (size_t k = 0; k < in.features.size(); ++k) {
    PairwiseTerm<T> t;
    t.dim = static_cast<int>(in.features[k].size(1));
    t.features = in.features[k].data_ptr<float>() + b * t.dim * N;
    t.compat_kind = in.compat[k].first;
    t.compat = in.compat[k].second.data_ptr<T>();
    t.normalization = in.normalization[k];
    p.terms.push_back(t);
  }
  return p;
}

// Shared by the plain and the history-keeping forward.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& unary, at::TensorList features, at::TensorList compat,
                                           at::IntArrayRef normalization, int64_t iterations,
                                           const c10::optional<at::Tensor>& q_init, bool keep_history) {
  const Call c = check_call(unary, features, compat, normalization, iterations, q_init);
  const int64_t B = c.B, L = c.L, N = c.N, S = label_stride(L);
  at::Tensor out = new_output(c.unary, {B, L, N});
  at::Tensor history = keep_history ? new_output(c.unary, {B, iterations, N, S}) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(c.unary.scalar_type(), "dense_crf_features", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* h = keep_history ? history.data_ptr<scalar_t>() : nullptr;
    for_each_image(B, [&](int64_t b) {
      const Problem<scalar_t> p = make_problem<scalar_t>(c, b);
      StageTimer timer("mean_field (whole)");
      mean_field(p, iterations, o + b * L * N, h ? h + b * iterations * N * S : nullptr);
    });
  });
  return {out, history};
}

at::Tensor dense_crf_features(const at::Tensor& unary, at::TensorList features, at::TensorList compat,
                              at::IntArrayRef normalization, int64_t iterations,
                              const c10::optional<at::Tensor>& q_init) {
  return std::get<0>(forward(unary, features, compat, normalization, iterations, q_init, false));
}

std::tuple<at::Tensor, at::Tensor> dense_crf_features_with_history(const at::Tensor& unary, at::TensorList features,
                                                                   at::TensorList compat,
                                                                   at::IntArrayRef normalization, int64_t iterations,
                                                                   const c10::optional<at::Tensor>& q_init) {
  return forward(unary, features, compat, normalization, iterations, q_init, true);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> dense_crf_features_backward(
    const at::Tensor& grad_q, const at::Tensor& q, const c10::optional<at::Tensor>& history,
    const at::Tensor& unary, at::TensorList features, at::TensorList compat, at::IntArrayRef normalization,
    int64_t iterations, const c10::optional<at::Tensor>& q_init, const c10::List<bool>& compat_grad) {
  const BackwardCall bc = check_backward_call(grad_q, q, history, unary, features, compat, normalization, iterations,
                                              q_init, compat_grad, &label_stride);
  const Call& c = bc.forward;
  const int64_t B = c.B, L = c.L, N = c.N, S = label_stride(L);
  at::Tensor grad_unary = new_output(c.unary, {B, L, N});
  at::Tensor grad_q_init = c.q_init.defined() ? new_output(c.unary, {B, L, N}) : at::empty({0}, c.unary.options());
  // Per image and term, dL/dcompat in double; summed over the images in order afterwards.
  std::vector<std::vector<std::vector<double>>> per_image(static_cast<size_t>(B));
  AT_DISPATCH_FLOATING_TYPES(c.unary.scalar_type(), "dense_crf_features_backward", [&] {
    const scalar_t* h = bc.history.defined() ? bc.history.data_ptr<scalar_t>() : nullptr;
    for_each_image(B, [&](int64_t b) {
      const Problem<scalar_t> p = make_problem<scalar_t>(c, b);
      std::vector<std::vector<double>>& acc = per_image[b];
      acc.resize(compat.size());
      Gradients<scalar_t> grads;
      grads.unary = grad_unary.data_ptr<scalar_t>() + b * L * N;
      grads.q_init = p.q_init ? grad_q_init.data_ptr<scalar_t>() + b * L * N : nullptr;
      for (size_t k = 0; k < compat.size(); ++k) {
        acc[k].assign(static_cast<size_t>(bc.compat_grad_width[k]), 0.0);
        grads.compat.push_back(bc.compat_grad_width[k] > 0 ? acc[k].data() : nullptr);
      }
      StageTimer timer("mean_field backward (whole)");
      mean_field_backward(p, iterations, bc.grad_q.data_ptr<scalar_t>() + b * L * N,
                          bc.q.data_ptr<scalar_t>() + b * L * N, h ? h + b * iterations * N * S : nullptr, grads);
    });
  });
  std::vector<std::vector<double>> totals(compat.size());
  for (size_t k = 0; k < compat.size(); ++k) {
    totals[k].assign(static_cast<size_t>(bc.compat_grad_width[k]), 0.0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < bc.compat_grad_width[k]; ++j) totals[k][j] += per_image[b][k][j];
  }
  return {grad_unary, compat_gradients(bc, totals, compat), grad_q_init};
}

at::Tensor dense_crf_pairwise_energy(const at::Tensor& q, at::TensorList features, at::TensorList compat,
                                     at::IntArrayRef normalization) {
  const Call c = check_pairwise_energy_call(q, features, compat, normalization);
  const int64_t B = c.B, L = c.L, N = c.N;
  at::Tensor out = new_output(c.q_init, {B, L, N});
  AT_DISPATCH_FLOATING_TYPES(c.q_init.scalar_type(), "dense_crf_pairwise_energy", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_image(B, [&](int64_t b) { pairwise_energy(make_problem<scalar_t>(c, b), o + b * L * N); });
  });
  return out;
}

// Gaussian (x/sxy, y/sxy) and bilateral (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) features of an image, [B, D, N],
// evaluated as pydensecrf's DenseCRF2D does: float division of integer coordinates and 8-bit colours.
std::tuple<at::Tensor, at::Tensor> dense_crf_image_features(const at::Tensor& image_in, double gaussian_sxy,
                                                            double bilateral_sxy, double bilateral_srgb) {
  check_image(image_in, gaussian_sxy, bilateral_sxy, bilateral_srgb);
  const at::Tensor image = image_in.contiguous();
  const int64_t B = image.size(0), H = image.size(2), W = image.size(3), N = H * W;
  const float gs = static_cast<float>(gaussian_sxy), bs = static_cast<float>(bilateral_sxy),
              cs = static_cast<float>(bilateral_srgb);
  at::Tensor gaussian = new_output(image, {B, 2, N}, at::kFloat);
  at::Tensor bilateral = new_output(image, {B, 5, N}, at::kFloat);
  const uint8_t* px = image.data_ptr<uint8_t>();
  float* g = gaussian.data_ptr<float>();
  float* f = bilateral.data_ptr<float>();
  parallel::for_range(0, B * H, 64, [&](int64_t begin, int64_t end) {
    for (int64_t by = begin; by < end; ++by) {
      const int64_t b = by / H, y = by % H;
      for (int64_t x = 0; x < W; ++x) {
        const int64_t i = y * W + x;
        g[(b * 2 + 0) * N + i] = static_cast<float>(x) / gs;
        g[(b * 2 + 1) * N + i] = static_cast<float>(y) / gs;
        f[(b * 5 + 0) * N + i] = static_cast<float>(x) / bs;
        f[(b * 5 + 1) * N + i] = static_cast<float>(y) / bs;
        for (int64_t c = 0; c < 3; ++c)
          f[(b * 5 + 2 + c) * N + i] = static_cast<float>(px[(b * 3 + c) * N + i]) / cs;
      }
    }
  });
  return {gaussian, bilateral};
}

}  // namespace

TORCH_LIBRARY_IMPL(deeplab_fast, CPU, m) {
  m.impl("dense_crf_features", &dense_crf_features);
  m.impl("dense_crf_features_with_history", &dense_crf_features_with_history);
  m.impl("dense_crf_features_backward", &dense_crf_features_backward);
  m.impl("dense_crf_image_features", &dense_crf_image_features);
  m.impl("dense_crf_pairwise_energy", &dense_crf_pairwise_energy);
}

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
