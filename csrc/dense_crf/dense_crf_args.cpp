// Argument checks and outputs shared by the CPU and CUDA registrations of the dense CRF ops.
#include "dense_crf_args.h"

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>

#include "cpu/buffer.h"

namespace deeplab_fast {
namespace dense_crf {

using lattice::CompatKind;


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

void check_unary_shape(const at::Tensor& unary, int64_t dims, const char* layout) {
  check_float_tensor(unary, "unary");
  TORCH_CHECK(unary.dim() == dims, "dense_crf: unary must be ", dims, "-D ", layout, ", got ", unary.dim(),
              "-D with shape ", unary.sizes());
  TORCH_CHECK(unary.size(0) >= 1, "dense_crf: unary has an empty batch (B = 0)");
  TORCH_CHECK(unary.size(1) >= 1, "dense_crf: unary must have at least one label (L >= 1), got L = 0");
  for (int64_t d = 2; d < dims; ++d)
    TORCH_CHECK(unary.size(d) >= 1, "dense_crf: unary must have at least one pixel, got shape ", unary.sizes());
}

void check_marginals(const at::Tensor& q) {
  check_float_tensor(q, "q");
  TORCH_CHECK(q.dim() == 3 && q.numel() > 0, "dense_crf: q must be a non-empty [B, L, N] tensor, got shape ",
              q.sizes());
  TORCH_CHECK(at::isfinite(q).all().item<bool>(), "dense_crf: q contains NaN or inf");
}

at::Tensor check_q_init(const c10::optional<at::Tensor>& q_init_in, const at::Tensor& unary) {
  if (!q_init_in.has_value()) return at::Tensor();
  const at::Tensor& q_init = *q_init_in;
  check_float_tensor(q_init, "q_init");
  check_same_device(q_init, unary, "q_init");
  TORCH_CHECK(q_init.sizes() == unary.sizes(), "dense_crf: q_init must have the unary's shape ", unary.sizes(),
              ", got ", q_init.sizes());
  TORCH_CHECK(at::isfinite(q_init).all().item<bool>(), "dense_crf: q_init contains NaN or inf");
  return q_init.contiguous();
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

}  // namespace dense_crf
}  // namespace deeplab_fast
