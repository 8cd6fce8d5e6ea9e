// The CPU registrations of the dense CRF ops (see dense_crf_cpu.h).
#include "dense_crf_cpu.h"

#include "common/parallel.h"

#include <vector>

#include "../dense_crf.h"
#include "../dense_crf_args.h"
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

template <typename T>
Problem<T> make_problem(const T* unary, const T* q_init, int64_t L, int64_t N, const TermInputs& in, int64_t b) {
  Problem<T> p;
  p.unary = unary;
  p.q_init = q_init;
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
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& unary_in, at::TensorList features, at::TensorList compat,
                                           at::IntArrayRef normalization, int64_t iterations,
                                           const c10::optional<at::Tensor>& q_init_in, bool keep_history) {
  check_unary_shape(unary_in, 3, "[B, L, N]");
  check_iterations(iterations);
  const int64_t B = unary_in.size(0), L = unary_in.size(1), N = unary_in.size(2), S = label_stride(L);
  const at::Tensor unary = unary_in.contiguous();
  const TermInputs in = check_terms(unary, B, L, N, features, compat, normalization);
  const at::Tensor q_init = check_q_init(q_init_in, unary);
  at::Tensor out = new_output(unary, {B, L, N});
  at::Tensor history = keep_history ? new_output(unary, {B, iterations, N, S}) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "dense_crf_features", [&] {
    const scalar_t* u = unary.data_ptr<scalar_t>();
    const scalar_t* q0 = q_init.defined() ? q_init.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* h = keep_history ? history.data_ptr<scalar_t>() : nullptr;
    for_each_image(B, [&](int64_t b) {
      const Problem<scalar_t> p = make_problem(u + b * L * N, q0 ? q0 + b * L * N : nullptr, L, N, in, b);
      StageTimer timer("mean_field (whole)");
      mean_field(p, iterations, o + b * L * N, h ? h + b * iterations * N * S : nullptr);
    });
  });
  return {out, history};
}

}  // namespace

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
    const at::Tensor& grad_q_in, const at::Tensor& q_in, const c10::optional<at::Tensor>& history_in,
    const at::Tensor& unary_in, at::TensorList features, at::TensorList compat, at::IntArrayRef normalization,
    int64_t iterations, const c10::optional<at::Tensor>& q_init_in, const c10::List<bool>& compat_grad) {
  check_unary_shape(unary_in, 3, "[B, L, N]");
  check_iterations(iterations);
  const int64_t B = unary_in.size(0), L = unary_in.size(1), N = unary_in.size(2), S = label_stride(L);
  check_backward_args(grad_q_in, q_in, history_in, unary_in, iterations, S);
  TORCH_CHECK(compat_grad.size() == compat.size(), "dense_crf backward: compat_grad needs one flag per term (",
              compat.size(), "), got ", compat_grad.size());
  const at::Tensor unary = unary_in.contiguous(), grad_q = grad_q_in.contiguous(), q = q_in.contiguous();
  const at::Tensor history = history_in.has_value() ? history_in->contiguous() : at::Tensor();
  const TermInputs in = check_terms(unary, B, L, N, features, compat, normalization);
  const at::Tensor q_init = check_q_init(q_init_in, unary);
  at::Tensor grad_unary = new_output(unary, {B, L, N});
  at::Tensor grad_q_init = q_init.defined() ? new_output(unary, {B, L, N}) : at::empty({0}, unary.options());
  // Per image and term, dL/dcompat in double; summed over the images in order afterwards.
  std::vector<int64_t> width(compat.size());
  for (size_t k = 0; k < compat.size(); ++k) {
    const lattice::CompatKind kind = in.compat[k].first;
    width[k] = compat_grad.get(k) ? (kind == lattice::kPotts ? 1 : kind == lattice::kDiagonal ? L : L * L) : 0;
  }
  std::vector<std::vector<std::vector<double>>> per_image(static_cast<size_t>(B));
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "dense_crf_features_backward", [&] {
    const scalar_t* u = unary.data_ptr<scalar_t>();
    const scalar_t* q0 = q_init.defined() ? q_init.data_ptr<scalar_t>() : nullptr;
    const scalar_t* h = history.defined() ? history.data_ptr<scalar_t>() : nullptr;
    for_each_image(B, [&](int64_t b) {
      const Problem<scalar_t> p = make_problem(u + b * L * N, q0 ? q0 + b * L * N : nullptr, L, N, in, b);
      std::vector<std::vector<double>>& acc = per_image[b];
      acc.resize(compat.size());
      Gradients<scalar_t> grads;
      grads.unary = grad_unary.data_ptr<scalar_t>() + b * L * N;
      grads.q_init = q0 ? grad_q_init.data_ptr<scalar_t>() + b * L * N : nullptr;
      for (size_t k = 0; k < compat.size(); ++k) {
        acc[k].assign(static_cast<size_t>(width[k]), 0.0);
        grads.compat.push_back(width[k] > 0 ? acc[k].data() : nullptr);
      }
      StageTimer timer("mean_field backward (whole)");
      mean_field_backward(p, iterations, grad_q.data_ptr<scalar_t>() + b * L * N, q.data_ptr<scalar_t>() + b * L * N,
                          h ? h + b * iterations * N * S : nullptr, grads);
    });
  });
  std::vector<at::Tensor> grad_compat;
  for (size_t k = 0; k < compat.size(); ++k) {
    if (width[k] == 0) {
      grad_compat.push_back(at::zeros_like(compat[k]));
      continue;
    }
    std::vector<double> total(static_cast<size_t>(width[k]), 0.0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < width[k]; ++j) total[j] += per_image[b][k][j];
    grad_compat.push_back(compat_gradient(total, in.compat[k].first, L, compat[k]));
  }
  return {grad_unary, grad_compat, grad_q_init};
}

at::Tensor dense_crf_pairwise_energy(const at::Tensor& q_in, at::TensorList features, at::TensorList compat,
                                     at::IntArrayRef normalization) {
  check_marginals(q_in);
  const int64_t B = q_in.size(0), L = q_in.size(1), N = q_in.size(2);
  const at::Tensor q = q_in.contiguous();
  const TermInputs in = check_terms(q, B, L, N, features, compat, normalization);
  at::Tensor out = new_output(q, {B, L, N});
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dense_crf_pairwise_energy", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_image(B, [&](int64_t b) {
      const Problem<scalar_t> p = make_problem(static_cast<const scalar_t*>(nullptr), qp + b * L * N, L, N, in, b);
      pairwise_energy(p, o + b * L * N);
    });
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

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
