// Torch glue for the dense CRF: op schemas, argument checks, and the CPU registration.
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

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "dense_crf.h"
#include "cpu/buffer.h"
#include "cpu/stage_timer.h"

namespace deeplab_fast {
namespace dense_crf {

namespace {

using lattice::CompatKind;

bool poison_outputs() {
  static const bool poison = [] {
    const char* v = std::getenv("DEEPLAB_FAST_POISON");
    return v != nullptr && v[0] == '1';
  }();
  return poison;
}

// A contiguous float32 output. On the CPU its storage comes from the dense CRF's block pool and goes back to
// it when the tensor is freed, so repeated calls do not fault in fresh pages for their outputs either.
at::Tensor new_output(const at::Tensor& like, at::IntArrayRef sizes) {
  const at::TensorOptions options = like.options().dtype(at::kFloat);
  at::Tensor out;
  if (like.device().is_cpu()) {
    int64_t numel = 1;
    for (const int64_t s : sizes) numel *= s;
    size_t capacity = 0;
    void* data = cpu::BlockPool::instance().acquire(static_cast<size_t>(numel) * sizeof(float), &capacity);
    out = at::from_blob(data, sizes, [capacity](void* p) { cpu::BlockPool::instance().release(p, capacity); },
                        options);
  } else {
    out = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  }
  if (poison_outputs()) out.fill_(std::numeric_limits<float>::quiet_NaN());
  return out;
}

void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "dense_crf: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), "dense_crf: ", name,
              " must be a CPU or CUDA tensor, got ", t.device());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "dense_crf: ", name, " is on ", t.device(),
              " but the unary is on ", ref.device());
}

// Validates and densifies one compat argument for L labels. Returns a contiguous float32 CPU tensor; a
// matrix is symmetrised as 0.5 (W + W^T).
std::pair<CompatKind, at::Tensor> prepare_compat(const at::Tensor& compat, int64_t L, const std::string& name) {
  TORCH_CHECK(compat.is_floating_point(), "dense_crf: ", name, " must be a floating-point tensor, got ",
              compat.scalar_type());
  at::Tensor c = compat.to(at::kCPU, at::kFloat).contiguous();
  TORCH_CHECK(at::isfinite(c).all().item<bool>(), "dense_crf: ", name, " must be finite");
  if (c.dim() == 0) return {lattice::kPotts, c.reshape({1})};
  if (c.dim() == 1) {
    TORCH_CHECK(c.size(0) == L, "dense_crf: ", name, " as a vector must have one weight per label (", L,
                "), got ", c.size(0));
    return {lattice::kDiagonal, c};
  }
  TORCH_CHECK(c.dim() == 2 && c.size(0) == L && c.size(1) == L, "dense_crf: ", name,
              " must be a scalar (Potts weight), a vector [L] or a matrix [L, L] with L = ", L, ", got shape ",
              c.sizes());
  return {lattice::kMatrix, ((c + c.t()) * 0.5).contiguous()};
}

int64_t check_iterations(int64_t iterations) {
  TORCH_CHECK(iterations >= 0, "dense_crf: iterations must be >= 0, got ", iterations);
  return iterations;
}

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

struct TermInputs {
  std::vector<at::Tensor> features;  // [B, D, N] contiguous float32 CPU
  std::vector<std::pair<CompatKind, at::Tensor>> compat;
  std::vector<int64_t> normalization;
};

TermInputs check_terms(const at::Tensor& ref, int64_t B, int64_t L, int64_t N, at::TensorList features,
                       at::TensorList compat, at::IntArrayRef normalization) {
  TORCH_CHECK(features.size() == compat.size() && features.size() == normalization.size(),
              "dense_crf: features, compat and normalization must have one entry per pairwise term, got ",
              features.size(), ", ", compat.size(), " and ", normalization.size());
  TermInputs in;
  for (size_t k = 0; k < features.size(); ++k) {
    const std::string fname = "features[" + std::to_string(k) + "]";
    const at::Tensor& f = features[k];
    check_float_tensor(f, fname.c_str());
    check_same_device(f, ref, fname.c_str());
    TORCH_CHECK(f.dim() == 3 && f.size(0) == B && f.size(2) == N, "dense_crf: ", fname,
                " must have shape [B, D, N] = [", B, ", D, ", N, "], got ", f.sizes());
    TORCH_CHECK(f.size(1) >= 1 && f.size(1) <= lattice::kMaxDim, "dense_crf: ", fname,
                " must have between 1 and ", lattice::kMaxDim, " feature dimensions, got ", f.size(1));
    TORCH_CHECK(at::isfinite(f).all().item<bool>(), "dense_crf: ", fname, " contains NaN or inf");
    in.features.push_back(f.contiguous());
    in.compat.push_back(prepare_compat(compat[k], L, "compat[" + std::to_string(k) + "]"));
    TORCH_CHECK(normalization[k] >= lattice::kNoNormalization && normalization[k] <= lattice::kNormalizeSymmetric,
                "dense_crf: normalization[", k, "] must be 0 (none), 1 (before), 2 (after) or 3 (symmetric), got ",
                normalization[k]);
    in.normalization.push_back(normalization[k]);
  }
  return in;
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

void check_unary_shape(const at::Tensor& unary, int64_t dims, const char* layout) {
  check_float_tensor(unary, "unary");
  TORCH_CHECK(unary.dim() == dims, "dense_crf: unary must be ", dims, "-D ", layout, ", got ", unary.dim(),
              "-D with shape ", unary.sizes());
  TORCH_CHECK(unary.size(0) >= 1, "dense_crf: unary has an empty batch (B = 0)");
  TORCH_CHECK(unary.size(1) >= 1, "dense_crf: unary must have at least one label (L >= 1), got L = 0");
  for (int64_t d = 2; d < dims; ++d)
    TORCH_CHECK(unary.size(d) >= 1, "dense_crf: unary must have at least one pixel, got shape ", unary.sizes());
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
  at::Tensor q_init;
  if (q_init_in.has_value()) {
    q_init = *q_init_in;
    check_float_tensor(q_init, "q_init");
    check_same_device(q_init, unary, "q_init");
    TORCH_CHECK(q_init.sizes() == unary.sizes(), "dense_crf: q_init must have the unary's shape ", unary.sizes(),
                ", got ", q_init.sizes());
    TORCH_CHECK(at::isfinite(q_init).all().item<bool>(), "dense_crf: q_init contains NaN or inf");
    q_init = q_init.contiguous();
  }
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
  check_float_tensor(q_in, "q");
  TORCH_CHECK(q_in.dim() == 3 && q_in.numel() > 0, "dense_crf: q must be a non-empty [B, L, N] tensor, got shape ",
              q_in.sizes());
  TORCH_CHECK(at::isfinite(q_in).all().item<bool>(), "dense_crf: q contains NaN or inf");
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

void check_image_args(const at::Tensor& unary, const at::Tensor& image, double gaussian_sxy, double bilateral_sxy,
                      double bilateral_srgb) {
  check_unary_shape(unary, 4, "[B, L, H, W]");
  TORCH_CHECK(image.scalar_type() == at::kByte, "dense_crf: image must be uint8 RGB, got ", image.scalar_type());
  check_same_device(image, unary, "image");
  TORCH_CHECK(image.dim() == 4, "dense_crf: image must be 4-D [B, 3, H, W], got shape ", image.sizes());
  TORCH_CHECK(image.size(1) == 3, "dense_crf: image must have 3 channels (RGB) in dim 1, got ", image.size(1),
              " (shape ", image.sizes(), ")");
  TORCH_CHECK(image.size(0) == unary.size(0), "dense_crf: image batch size ", image.size(0),
              " does not match the unary batch size ", unary.size(0));
  TORCH_CHECK(image.size(2) == unary.size(2) && image.size(3) == unary.size(3), "dense_crf: image size (H, W) = (",
              image.size(2), ", ", image.size(3), ") does not match the unary size (", unary.size(2), ", ",
              unary.size(3), ")");
  auto positive = [](double v) { return std::isfinite(v) && v > 0.0; };
  TORCH_CHECK(positive(gaussian_sxy), "dense_crf: gaussian_sxy must be a finite value > 0, got ", gaussian_sxy);
  TORCH_CHECK(positive(bilateral_sxy), "dense_crf: bilateral_sxy must be a finite value > 0, got ", bilateral_sxy);
  TORCH_CHECK(positive(bilateral_srgb), "dense_crf: bilateral_srgb must be a finite value > 0, got ",
              bilateral_srgb);
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

TORCH_LIBRARY_FRAGMENT(deeplab_fast, m) {
  m.def(
      "dense_crf(Tensor unary, Tensor image, int iterations, float gaussian_sxy, Tensor gaussian_compat, "
      "float bilateral_sxy, float bilateral_srgb, Tensor bilateral_compat) -> Tensor");
  m.def(
      "dense_crf_features(Tensor unary, Tensor[] features, Tensor[] compat, int[] normalization, int iterations, "
      "Tensor? q_init) -> Tensor");
  m.def("dense_crf_pairwise_energy(Tensor q, Tensor[] features, Tensor[] compat, int[] normalization) -> Tensor");
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
