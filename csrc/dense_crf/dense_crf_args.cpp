// Argument checks and outputs shared by the CPU and CUDA registrations of the dense CRF ops (see dense_crf_args.h).
#include "dense_crf_args.h"

#include <ATen/EmptyTensor.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <c10/core/Allocator.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "common/block_pool.h"
#include "common/env.h"

namespace deeplab_fast {
namespace dense_crf {

using lattice::CompatKind;

namespace {

// torch's view of the host block pool: output storage that repeated calls recycle (so they do not
// fault in fresh pages), yet an ordinary resizable torch storage (resize_ allocates from here and copies).
class PoolAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    auto* block = new Block{nullptr, 0};
    block->data = BlockPool::instance().acquire(bytes, &block->capacity);
    return {block->data, block, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count > 0) std::memcpy(dest, src, count);
  }

 private:
  struct Block {
    void* data;
    size_t capacity;
  };
  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    BlockPool::instance().release(block->data, block->capacity);
    delete block;
  }
};

PoolAllocator& pool_allocator() {
  static PoolAllocator* allocator = new PoolAllocator();  // never destroyed: outlives every tensor
  return *allocator;
}

const char* dtype_rule(const at::Tensor& ref) {
  return ref.is_cuda() ? "float32" : "float32 or float64";
}

// Whether `t` holds values the checks may read: not a meta tensor, nor a fake or functional one (tracing).
bool has_values(const at::Tensor& t) {
  return !t.is_meta() && !t.key_set().has(c10::DispatchKey::Python) &&
         !at::functionalization::impl::isFunctionalTensor(t);
}

// The unary's value type: float32 (any device) or float64 (the CPU's float64 path).
void check_value_tensor(const at::Tensor& t, const char* name) {
  // meta: shapes only (the composite dense_crf runs this on meta tensors before the fake kernels).
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda() || t.device().is_meta(), "dense_crf: ", name,
                    " must be a CPU or CUDA tensor, got ", t.device());
  const bool ok = t.scalar_type() == at::kFloat || (t.scalar_type() == at::kDouble && !t.device().is_cuda());
  TORCH_CHECK_VALUE(ok, "dense_crf: ", name, " must be ", dtype_rule(t), ", got ", t.scalar_type());
}

// `t` must be on the unary's device.
void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "dense_crf: ", name, " is on ", t.device(),
                    " but the unary is on ", ref.device());
}

// A validated compat argument, densified: kPotts [1], kDiagonal [L] or kMatrix [L, L] symmetrised as
// 0.5 (W + W^T), a contiguous CPU tensor of the unary's dtype.
std::pair<CompatKind, at::Tensor> prepare_compat(const at::Tensor& compat, int64_t L, const std::string& name,
                                                 const at::Tensor& ref) {
  const at::Tensor c = check_compat(compat, L, name, ref);
  if (c.dim() == 0) return {lattice::kPotts, c.reshape({1})};
  if (c.dim() == 1) return {lattice::kDiagonal, c};
  // 0.5 M + 0.5 M^T: the same value as pydensecrf's 0.5 (M + M^T) (halving is exact), without overflowing.
  return {lattice::kMatrix, (c * 0.5 + c.t() * 0.5).contiguous()};
}

TermInputs check_terms(const at::Tensor& ref, int64_t B, int64_t L, int64_t N, at::TensorList features,
                       at::TensorList compat, at::IntArrayRef normalization) {
  TORCH_CHECK_VALUE(features.size() == compat.size() && features.size() == normalization.size(),
                    "dense_crf: features, compat and normalization must have one entry per pairwise term, got ",
                    features.size(), ", ", compat.size(), " and ", normalization.size());
  TermInputs in;
  for (size_t k = 0; k < features.size(); ++k) {
    const std::string fname = "features[" + std::to_string(k) + "]";
    const at::Tensor& f = features[k];
    check_same_device(f, ref, fname.c_str());
    TORCH_CHECK_VALUE(f.scalar_type() == at::kFloat || f.scalar_type() == at::kDouble, "dense_crf: ", fname,
                      " must be float32 or float64, got ", f.scalar_type());
    TORCH_CHECK_VALUE(f.dim() == 3 && f.size(0) == B && f.size(2) == N, "dense_crf: ", fname,
                      " must have shape [B, D, N] = [", B, ", D, ", N, "], got ", f.sizes());
    TORCH_CHECK_VALUE(f.size(1) >= 1 && f.size(1) <= lattice::kMaxDim, "dense_crf: ", fname,
                      " must have between 1 and ", lattice::kMaxDim, " feature dimensions, got ", f.size(1));
    at::Tensor f32 = f.to(at::kFloat).contiguous();  // the lattice is built in float32
    TORCH_CHECK_VALUE(at::isfinite(f32).all().item<bool>(), "dense_crf: ", fname,
                      " contains NaN or inf (in float32: |value| <= 3.4e38)");
    in.features.push_back(std::move(f32));
    in.compat.push_back(prepare_compat(compat[k], L, "compat[" + std::to_string(k) + "]", ref));
    TORCH_CHECK_VALUE(
        normalization[k] >= lattice::kNoNormalization && normalization[k] <= lattice::kNormalizeSymmetric,
        "dense_crf: normalization[", k, "] must be 0 (none), 1 (before), 2 (after) or 3 (symmetric), got ",
        normalization[k]);
    in.normalization.push_back(normalization[k]);
  }
  return in;
}

// unary: float32 or float64, 3-D [B, L, N], non-empty.
void check_unary_shape(const at::Tensor& unary) {
  check_value_tensor(unary, "unary");
  TORCH_CHECK_VALUE(unary.dim() == 3, "dense_crf: unary must be 3-D [B, L, N], got ", unary.dim(),
                    "-D with shape ", unary.sizes());
  TORCH_CHECK_VALUE(unary.size(0) >= 1, "dense_crf: unary has an empty batch (B = 0)");
  TORCH_CHECK_VALUE(unary.size(1) >= 1, "dense_crf: unary must have at least one label (L >= 1), got L = 0");
  TORCH_CHECK_VALUE(unary.size(2) >= 1, "dense_crf: unary must have at least one pixel, got shape ",
                    unary.sizes());
}

// A call on values [B, L, N]: its sizes.
Call sized_call(const at::Tensor& values) {
  Call c;
  c.B = values.size(0);
  c.L = values.size(1);
  c.N = values.size(2);
  return c;
}

// q_init (optional): the unary's dtype, device and shape, finite. Returns it contiguous (or undefined).
at::Tensor check_q_init(const c10::optional<at::Tensor>& q_init_in, const at::Tensor& unary) {
  if (!q_init_in.has_value()) return at::Tensor();
  const at::Tensor& q_init = *q_init_in;
  check_same_device(q_init, unary, "q_init");
  TORCH_CHECK_VALUE(q_init.scalar_type() == unary.scalar_type(), "dense_crf: q_init must have the unary's dtype (",
                    unary.scalar_type(), "), got ", q_init.scalar_type());
  TORCH_CHECK_VALUE(q_init.sizes() == unary.sizes(), "dense_crf: q_init must have the unary's shape ",
                    unary.sizes(), ", got ", q_init.sizes());
  TORCH_CHECK_VALUE(at::isfinite(q_init).all().item<bool>(), "dense_crf: q_init contains NaN or inf");
  return q_init.contiguous();
}

}  // namespace

at::Tensor new_output(const at::Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype) {
  at::Tensor out;
  if (like.device().is_cpu()) {
    out = at::detail::empty_generic(sizes, &pool_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                    c10::nullopt);
  } else {
    out = at::empty(sizes, like.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
  }
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

at::Tensor new_output(const at::Tensor& like, at::IntArrayRef sizes) {
  return new_output(like, sizes, like.scalar_type());
}

at::Tensor check_compat(const at::Tensor& compat, const c10::SymInt& L, const std::string& name,
                        const at::Tensor& ref) {
  TORCH_CHECK_VALUE(compat.device().is_cpu() || compat.device() == ref.device(), "dense_crf: ", name, " is on ",
                    compat.device(), "; it must be on the CPU or on the unary's device (", ref.device(), ")");
  TORCH_CHECK_VALUE(compat.is_floating_point(), "dense_crf: ", name, " must be a floating-point tensor, got ",
                    compat.scalar_type());
  TORCH_CHECK_VALUE(compat.dim() <= 2, "dense_crf: ", name,
                    " must be a scalar (Potts weight), a vector [L] or a matrix [L, L] with L = ", L,
                    ", got shape ", compat.sym_sizes());
  at::Tensor c;
  if (has_values(compat)) {
    at::NoGradGuard no_grad;  // a check: no autograd history for the copy
    c = compat.to(at::kCPU, ref.scalar_type()).contiguous();
    TORCH_CHECK_VALUE(at::isfinite(c).all().item<bool>(), "dense_crf: ", name, " must be finite",
                      ref.scalar_type() == at::kFloat ? " in float32 (|value| <= 3.4e38)" : "");
  }
  if (compat.dim() == 1) {
    TORCH_CHECK_VALUE(compat.sym_size(0) == L, "dense_crf: ", name,
                      " as a vector must have one weight per label (", L, "), got ", compat.sym_size(0));
  } else if (compat.dim() == 2) {
    TORCH_CHECK_VALUE(compat.sym_size(0) == L && compat.sym_size(1) == L, "dense_crf: ", name,
                      " must be a scalar (Potts weight), a vector [L] or a matrix [L, L] with L = ", L,
                      ", got shape ", compat.sym_sizes());
  }
  return c;
}

int64_t check_iterations(int64_t iterations) {
  TORCH_CHECK_VALUE(iterations >= 0 && iterations <= kMaxIterations, "dense_crf: iterations must be in [0, ",
                    kMaxIterations, "], got ", iterations);
  return iterations;
}

Call check_call(const at::Tensor& unary, at::TensorList features, at::TensorList compat,
                at::IntArrayRef normalization, int64_t iterations, const c10::optional<at::Tensor>& q_init) {
  check_unary_shape(unary);
  check_iterations(iterations);
  Call c = sized_call(unary);
  c.unary = unary.contiguous();
  c.terms = check_terms(c.unary, c.B, c.L, c.N, features, compat, normalization);
  c.q_init = check_q_init(q_init, c.unary);
  return c;
}

Call check_pairwise_energy_call(const at::Tensor& q, at::TensorList features, at::TensorList compat,
                                at::IntArrayRef normalization) {
  check_value_tensor(q, "q");
  TORCH_CHECK_VALUE(q.dim() == 3 && q.numel() > 0, "dense_crf: q must be a non-empty [B, L, N] tensor, got shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(at::isfinite(q).all().item<bool>(), "dense_crf: q contains NaN or inf");
  Call c = sized_call(q);
  c.q_init = q.contiguous();
  c.terms = check_terms(c.q_init, c.B, c.L, c.N, features, compat, normalization);
  return c;
}

BackwardCall check_backward_call(const at::Tensor& grad_q, const at::Tensor& q,
                                 const c10::optional<at::Tensor>& history, const at::Tensor& unary,
                                 at::TensorList features, at::TensorList compat, at::IntArrayRef normalization,
                                 int64_t iterations, const c10::optional<at::Tensor>& q_init,
                                 const c10::List<bool>& compat_grad, int64_t (*label_stride)(int64_t)) {
  check_unary_shape(unary);
  check_iterations(iterations);
  auto like_unary = [&](const at::Tensor& t, const char* name) {
    check_same_device(t, unary, name);
    TORCH_CHECK_VALUE(t.scalar_type() == unary.scalar_type() && t.sizes() == unary.sizes(), "dense_crf backward: ",
                      name, " must match the unary (", unary.scalar_type(), ", ", unary.sizes(), "), got ",
                      t.scalar_type(), ", ", t.sizes());
  };
  like_unary(grad_q, "grad_q");
  like_unary(q, "q");
  if (history.has_value()) {
    check_same_device(*history, unary, "history");
    const std::vector<int64_t> want{unary.size(0), iterations, unary.size(2), label_stride(unary.size(1))};
    TORCH_CHECK_VALUE(history->scalar_type() == unary.scalar_type() && history->sizes() == at::IntArrayRef(want),
                      "dense_crf backward: history must be ", unary.scalar_type(), " ", at::IntArrayRef(want),
                      " (the forward's), got ", history->scalar_type(), " ", history->sizes());
  }
  TORCH_CHECK_VALUE(compat_grad.size() == compat.size(), "dense_crf backward: compat_grad needs one flag per term (",
                    compat.size(), "), got ", compat_grad.size());
  BackwardCall b;
  b.forward = check_call(unary, features, compat, normalization, iterations, q_init);
  b.grad_q = grad_q.contiguous();
  b.q = q.contiguous();
  if (history.has_value()) b.history = history->contiguous();
  const int64_t L = b.forward.L;
  for (size_t k = 0; k < compat.size(); ++k) {
    const CompatKind kind = b.forward.terms.compat[k].first;
    b.compat_grad_width.push_back(
        compat_grad.get(k) ? (kind == lattice::kPotts ? 1 : kind == lattice::kDiagonal ? L : L * L) : 0);
  }
  return b;
}

std::vector<at::Tensor> compat_gradients(const BackwardCall& call, const std::vector<std::vector<double>>& totals,
                                         at::TensorList compat) {
  std::vector<at::Tensor> grads;
  const int64_t L = call.forward.L;
  for (size_t k = 0; k < compat.size(); ++k) {
    if (call.compat_grad_width[k] == 0) {
      grads.push_back(at::zeros_like(compat[k]));
      continue;
    }
    const std::vector<double>& g = totals[k];
    at::Tensor out = at::empty({static_cast<int64_t>(g.size())}, at::TensorOptions().dtype(at::kDouble));
    std::copy(g.begin(), g.end(), out.data_ptr<double>());
    if (call.forward.terms.compat[k].first == lattice::kMatrix) {
      out = out.view({L, L});
      out = (out + out.t()) * 0.5;  // W = 0.5 (M + M^T): dL/dM = 0.5 (G + G^T)
    }
    grads.push_back(out.reshape(compat[k].sizes()).to(compat[k].options()));
  }
  return grads;
}

namespace {

// A standard deviation the image features divide by: its float32 value must be positive and finite, and the
// largest feature value (`extent` / sd) must fit the lattice's integer keys (2^19 leaves room for the elevation
// of 5-D features, whose coordinates grow by up to 8.2x before they must stay below 2^22).
void check_sd(double sd, const char* name, double extent, const char* what) {
  constexpr double kMaxFeature = 524288.0;  // 2^19
  const float f = static_cast<float>(sd);
  TORCH_CHECK_VALUE(std::isfinite(sd) && sd > 0.0, "dense_crf: ", name, " must be a finite value > 0, got ", sd);
  TORCH_CHECK_VALUE(std::isfinite(f) && f > 0.0f, "dense_crf: ", name,
                    " must be representable in float32 (between 1.2e-38 and 3.4e38), got ", sd);
  const double smallest = std::max(extent / kMaxFeature, static_cast<double>(std::numeric_limits<float>::min()));
  TORCH_CHECK_VALUE(extent / static_cast<double>(f) <= kMaxFeature, "dense_crf: ", name, " must be at least ",
                    smallest, " for ", what, " (", extent, " / ", name,
                    " must stay below 2^19 to fit the lattice), got ", sd);
}

}  // namespace

void check_image(const at::Tensor& image, double gaussian_sxy, double bilateral_sxy, double bilateral_srgb) {
  TORCH_CHECK_VALUE(image.scalar_type() == at::kByte, "dense_crf: image must be uint8 RGB, got ",
                    image.scalar_type());
  TORCH_CHECK_VALUE(image.dim() == 4, "dense_crf: image must be 4-D [B, 3, H, W], got shape ", image.sym_sizes());
  TORCH_CHECK_VALUE(image.sym_size(1) == 3, "dense_crf: image must have 3 channels (RGB) in dim 1, got ",
                    image.sym_size(1), " (shape ", image.sym_sizes(), ")");
  TORCH_CHECK_VALUE(image.sym_size(0) >= 1, "dense_crf: image has an empty batch (B = 0)");
  TORCH_CHECK_VALUE(image.sym_size(2) >= 1 && image.sym_size(3) >= 1,
                    "dense_crf: image must have at least one pixel, got shape ", image.sym_sizes());
  // The largest coordinate, as a number (a symbolic size gives its hint: the check is about magnitudes).
  const double extent = static_cast<double>(
      std::max(image.sym_size(2).guard_int(__FILE__, __LINE__), image.sym_size(3).guard_int(__FILE__, __LINE__)) - 1);
  check_sd(gaussian_sxy, "gaussian_sxy", std::max(extent, 1.0), "this image size");
  check_sd(bilateral_sxy, "bilateral_sxy", std::max(extent, 1.0), "this image size");
  check_sd(bilateral_srgb, "bilateral_srgb", 255.0, "8-bit colours");
}

void check_image_args(const at::Tensor& unary, const at::Tensor& image, double gaussian_sxy, double bilateral_sxy,
                      double bilateral_srgb) {
  check_value_tensor(unary, "unary");
  TORCH_CHECK_VALUE(unary.dim() == 4, "dense_crf: unary must be 4-D [B, L, H, W], got ", unary.dim(),
                    "-D with shape ", unary.sym_sizes());
  TORCH_CHECK_VALUE(unary.sym_size(0) >= 1, "dense_crf: unary has an empty batch (B = 0)");
  TORCH_CHECK_VALUE(unary.sym_size(1) >= 1, "dense_crf: unary must have at least one label (L >= 1), got L = 0");
  check_same_device(image, unary, "image");
  TORCH_CHECK_VALUE(image.scalar_type() == at::kByte, "dense_crf: image must be uint8 RGB, got ",
                    image.scalar_type());
  TORCH_CHECK_VALUE(image.dim() == 4, "dense_crf: image must be 4-D [B, 3, H, W], got shape ", image.sym_sizes());
  TORCH_CHECK_VALUE(image.sym_size(0) == unary.sym_size(0), "dense_crf: image batch size ", image.sym_size(0),
                    " does not match the unary batch size ", unary.sym_size(0));
  TORCH_CHECK_VALUE(image.sym_size(2) == unary.sym_size(2) && image.sym_size(3) == unary.sym_size(3),
                    "dense_crf: image size (H, W) = (", image.sym_size(2), ", ", image.sym_size(3),
                    ") does not match the unary size (", unary.sym_size(2), ", ", unary.sym_size(3), ")");
  check_image(image, gaussian_sxy, bilateral_sxy, bilateral_srgb);
}

}  // namespace dense_crf
}  // namespace deeplab_fast
