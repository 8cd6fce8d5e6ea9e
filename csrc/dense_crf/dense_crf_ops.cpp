// Torch glue for the dense CRF: op schemas and the CPU registration (argument checks: dense_crf_args.h; the CUDA
// registration: cuda/dense_crf_cuda_ops.cpp).
//
//   deeplab_fast::dense_crf(unary[B,L,H,W] f32, image[B,3,H,W] u8, iterations, gaussian_sxy,
//                           gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat) -> Q[B,L,H,W]
//   deeplab_fast::dense_crf_features(unary[B,L,N], features[], compat[], normalization[], iterations,
//                                    q_init?) -> Q[B,L,N]
//   deeplab_fast::dense_crf_pairwise_energy(q[B,L,N], features[], compat[], normalization[]) -> [B,L,N]
//
// A compat tensor is 0-d (Potts weight w), [L] (diagonal) or [L, L] (matrix, symmetrised), as pydensecrf's
// `compat` argument. Features are [B, D, N] float32, already divided by the kernel standard deviations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "dense_crf.h"
#include "dense_crf_args.h"
#include "cpu/buffer.h"
#include "cpu/stage_timer.h"

namespace deeplab_fast {
namespace dense_crf {

namespace {

// Runs fn(b) for every image: across images when there are enough of them to keep every thread busy,
// otherwise one image at a time with the parallelism inside. Either way each image's result is the same.
template <typename Fn>
void for_each_image(int64_t batch, Fn fn) {
  if (batch >= at::get_num_threads() && batch > 1) {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) fn(b);
    });
  } else {
    for (int64_t b = 0; b < batch; ++b) fn(b);
  }
}

Problem make_problem(const float* unary, const float* q_init, int64_t L, int64_t N, const TermInputs& in,
                     int64_t b) {
  Problem p;
  p.unary = unary;
  p.q_init = q_init;
  p.num_labels = L;
  p.num_pixels = N;
  for (size_t k = 0; k < in.features.size(); ++k) {
    PairwiseTerm t;
    t.dim = static_cast<int>(in.features[k].size(1));
    t.features = in.features[k].data_ptr<float>() + b * t.dim * N;
    t.compat_kind = in.compat[k].first;
    t.compat = in.compat[k].second.data_ptr<float>();
    t.normalization = in.normalization[k];
    p.terms.push_back(t);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------------------
// CPU implementations.

at::Tensor dense_crf_features_cpu(const at::Tensor& unary_in, at::TensorList features, at::TensorList compat,
                                  at::IntArrayRef normalization, int64_t iterations,
                                  const c10::optional<at::Tensor>& q_init_in) {
  check_unary_shape(unary_in, 3, "[B, L, N]");
  check_iterations(iterations);
  const int64_t B = unary_in.size(0), L = unary_in.size(1), N = unary_in.size(2);
  at::Tensor unary = unary_in.contiguous();
  TermInputs in = check_terms(unary, B, L, N, features, compat, normalization);
  const at::Tensor q_init = check_q_init(q_init_in, unary);
  at::Tensor out = new_output(unary, {B, L, N});
  const float* u = unary.data_ptr<float>();
  const float* q0 = q_init.defined() ? q_init.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  for_each_image(B, [&](int64_t b) {
    Problem p = make_problem(u + b * L * N, q0 ? q0 + b * L * N : nullptr, L, N, in, b);
    cpu::StageTimer timer("mean_field (whole)");
    cpu::mean_field(p, iterations, o + b * L * N);
  });
  return out;
}

at::Tensor dense_crf_pairwise_energy_cpu(const at::Tensor& q_in, at::TensorList features, at::TensorList compat,
                                         at::IntArrayRef normalization) {
  check_marginals(q_in);
  const int64_t B = q_in.size(0), L = q_in.size(1), N = q_in.size(2);
  at::Tensor q = q_in.contiguous();
  TermInputs in = check_terms(q, B, L, N, features, compat, normalization);
  at::Tensor out = new_output(q, {B, L, N});
  const float* qp = q.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for_each_image(B, [&](int64_t b) {
    Problem p = make_problem(nullptr, qp + b * L * N, L, N, in, b);
    cpu::pairwise_energy(p, o + b * L * N);
  });
  return out;
}

}  // namespace

namespace {

// Gaussian (x/sxy, y/sxy) and bilateral (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) features of an image, [B, D, N],
// evaluated as pydensecrf's DenseCRF2D does: float division of integer coordinates and 8-bit colours.
std::pair<at::Tensor, at::Tensor> image_features(const at::Tensor& image_in, double gaussian_sxy,
                                                 double bilateral_sxy, double bilateral_srgb) {
  const at::Tensor image = image_in.contiguous();
  const int64_t B = image.size(0), H = image.size(2), W = image.size(3), N = H * W;
  const float gs = static_cast<float>(gaussian_sxy), bs = static_cast<float>(bilateral_sxy),
              cs = static_cast<float>(bilateral_srgb);
  at::Tensor gaussian = at::empty({B, 2, N}, image.options().dtype(at::kFloat));
  at::Tensor bilateral = at::empty({B, 5, N}, image.options().dtype(at::kFloat));
  const uint8_t* px = image.data_ptr<uint8_t>();
  float* g = gaussian.data_ptr<float>();
  float* f = bilateral.data_ptr<float>();
  at::parallel_for(0, B * H, 64, [&](int64_t begin, int64_t end) {
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

at::Tensor dense_crf_cpu(const at::Tensor& unary, const at::Tensor& image, int64_t iterations, double gaussian_sxy,
                         const at::Tensor& gaussian_compat, double bilateral_sxy, double bilateral_srgb,
                         const at::Tensor& bilateral_compat) {
  check_image_args(unary, image, gaussian_sxy, bilateral_sxy, bilateral_srgb);
  const int64_t B = unary.size(0), L = unary.size(1), H = unary.size(2), W = unary.size(3);
  cpu::StageTimer total_timer("dense_crf (C++ total)");
  std::pair<at::Tensor, at::Tensor> feats;
  {
    cpu::StageTimer timer("image features");
    feats = image_features(image, gaussian_sxy, bilateral_sxy, bilateral_srgb);
  }
  const std::vector<at::Tensor> features{feats.first, feats.second};
  const std::vector<at::Tensor> compat{gaussian_compat, bilateral_compat};
  const std::vector<int64_t> normalization{lattice::kNormalizeSymmetric, lattice::kNormalizeSymmetric};
  at::Tensor q = dense_crf_features_cpu(unary.reshape({B, L, H * W}), features, compat, normalization, iterations,
                                        c10::nullopt);
  return q.view({B, L, H, W});
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

TORCH_LIBRARY_FRAGMENT(deeplab_fast, m) {
  const std::vector<at::Tag> tags = cudagraph_unsafe<at::Tag>(0);
  m.def(
      "dense_crf(Tensor unary, Tensor image, int iterations, float gaussian_sxy, Tensor gaussian_compat, "
      "float bilateral_sxy, float bilateral_srgb, Tensor bilateral_compat) -> Tensor",
      tags);
  m.def(
      "dense_crf_features(Tensor unary, Tensor[] features, Tensor[] compat, int[] normalization, int iterations, "
      "Tensor? q_init) -> Tensor",
      tags);
  m.def("dense_crf_pairwise_energy(Tensor q, Tensor[] features, Tensor[] compat, int[] normalization) -> Tensor",
        tags);
  // Frees the CPU working memory the dense CRF keeps for reuse between calls (see cpu/buffer.h).
  m.def("empty_cache() -> ()", [] { cpu::empty_cache(); });
}

TORCH_LIBRARY_IMPL(deeplab_fast, CPU, m) {
  m.impl("dense_crf", &dense_crf_cpu);
  m.impl("dense_crf_features", &dense_crf_features_cpu);
  m.impl("dense_crf_pairwise_energy", &dense_crf_pairwise_energy_cpu);
}

}  // namespace dense_crf
}  // namespace deeplab_fast
