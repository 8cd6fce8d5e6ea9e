// Torch glue for the dense CRF on CUDA: the CUDA registrations of the deeplab_fast::dense_crf_* ops (the image-level
// dense_crf is a composite of them, registered once in ../dense_crf_ops.cpp). Arguments are checked exactly as on
// the CPU (dense_crf_args.h); the kernels (mean_field.cu, permutohedral.cu) see raw pointers, the current stream and
// an allocator backed by torch's CUDA caching allocator. Compiled only in CUDA builds (setup.py, CMake WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../dense_crf_args.h"
#include "dense_crf_cuda.h"

namespace deeplab_fast {
namespace dense_crf {

namespace {

// Working memory from torch's caching allocator, on the current stream, held until the call returns (the
// allocator reuses a block only for work queued after its release on the same stream).
class TorchAllocator final : public cuda::Allocator {
 public:
  explicit TorchAllocator(const at::Tensor& like) : options_(like.options().dtype(at::kByte)) {}
  void* allocate(size_t bytes) override {
    blocks_.push_back(at::empty({static_cast<int64_t>(bytes)}, options_));
    return blocks_.back().data_ptr();
  }
  void release() override { blocks_.clear(); }

 private:
  at::TensorOptions options_;
  std::vector<at::Tensor> blocks_;
};

// The kernels' problem description, on the current stream (the caller holds a device guard). `keep` holds the
// device copies of the compatibilities.
cuda::Problem make_problem(const at::Tensor& unary, const at::Tensor& q_init, int64_t B, int64_t L, int64_t N,
                           const TermInputs& in, std::vector<at::Tensor>& keep, cuda::Allocator* allocator,
                           cuda::Allocator* scratch) {
  cuda::Problem p;
  p.batch = B;
  p.num_labels = L;
  p.num_pixels = N;
  p.unary = unary.defined() ? unary.data_ptr<float>() : nullptr;
  p.q_init = q_init.defined() ? q_init.data_ptr<float>() : nullptr;
  p.stream = c10::cuda::getCurrentCUDAStream().stream();
  p.allocator = allocator;
  p.scratch = scratch;
  for (size_t k = 0; k < in.features.size(); ++k) {
    cuda::Term t;
    t.features = in.features[k].data_ptr<float>();
    t.dim = static_cast<int>(in.features[k].size(1));
    t.compat_kind = in.compat[k].first;
    if (t.compat_kind == lattice::kPotts) {
      t.potts_weight = in.compat[k].second.data_ptr<float>()[0];  // a CPU tensor (prepare_compat)
    } else {
      keep.push_back(in.compat[k].second.to(in.features[k].device()));
      t.compat = keep.back().data_ptr<float>();
    }
    t.normalization = in.normalization[k];
    p.terms.push_back(t);
  }
  return p;
}

// The call's inputs, checked as on the CPU, with the kernels' limits on top. A CUDA argument sends a call here
// even when the unary is on the CPU: the device checks name it.
struct Call {
  at::Tensor unary, q_init;
  TermInputs in;
  int64_t B = 0, L = 0, N = 0;
};

Call check_call(const at::Tensor& unary_in, at::TensorList features, at::TensorList compat,
                at::IntArrayRef normalization, int64_t iterations, const c10::optional<at::Tensor>& q_init_in) {
  check_unary_shape(unary_in, 3, "[B, L, N]");
  check_iterations(iterations);
  Call c;
  c.B = unary_in.size(0);
  c.L = unary_in.size(1);
  c.N = unary_in.size(2);
  c.in = check_terms(unary_in, c.B, c.L, c.N, features, compat, normalization);
  c.q_init = check_q_init(q_init_in, unary_in);
  TORCH_CHECK(unary_in.is_cuda(), "dense_crf: unary is on ", unary_in.device(),
              " but another argument is on a CUDA device");
  TORCH_CHECK(c.L <= cuda::kMaxLabels, "dense_crf: the CUDA kernels take at most ", cuda::kMaxLabels,
              " labels, got L = ", c.L);
  c.unary = unary_in.contiguous();
  return c;
}

// Runs fn(problem) on the unary's device and current stream; kernel errors become RuntimeErrors with their text.
template <typename Fn>
void run_cuda(const Call& c, Fn fn) {
  TorchAllocator allocator(c.unary), scratch(c.unary);
  std::vector<at::Tensor> keep;
  const cuda::Problem p = make_problem(c.unary, c.q_init, c.B, c.L, c.N, c.in, keep, &allocator, &scratch);
  try {
    fn(p);
  } catch (const cuda::Error& e) {
    TORCH_CHECK(false, e.what());
  }
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& unary_in, at::TensorList features, at::TensorList compat,
                                           at::IntArrayRef normalization, int64_t iterations,
                                           const c10::optional<at::Tensor>& q_init_in, bool keep_history) {
  const Call c = check_call(unary_in, features, compat, normalization, iterations, q_init_in);
  c10::cuda::CUDAGuard device_guard(c.unary.device());
  at::Tensor out = new_output(c.unary, {c.B, c.L, c.N});
  at::Tensor history =
      keep_history ? new_output(c.unary, {c.B, iterations, c.N, cuda::label_stride(c.L)}) : at::Tensor();
  run_cuda(c, [&](const cuda::Problem& p) {
    cuda::mean_field(p, iterations, out.data_ptr<float>(), keep_history ? history.data_ptr<float>() : nullptr);
  });
  return {out, history};
}

at::Tensor dense_crf_features_cuda(const at::Tensor& unary, at::TensorList features, at::TensorList compat,
                                   at::IntArrayRef normalization, int64_t iterations,
                                   const c10::optional<at::Tensor>& q_init) {
  return std::get<0>(forward(unary, features, compat, normalization, iterations, q_init, false));
}

std::tuple<at::Tensor, at::Tensor> dense_crf_features_with_history_cuda(
    const at::Tensor& unary, at::TensorList features, at::TensorList compat, at::IntArrayRef normalization,
    int64_t iterations, const c10::optional<at::Tensor>& q_init) {
  return forward(unary, features, compat, normalization, iterations, q_init, true);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> dense_crf_features_backward_cuda(
    const at::Tensor& grad_q_in, const at::Tensor& q_in, const c10::optional<at::Tensor>& history_in,
    const at::Tensor& unary_in, at::TensorList features, at::TensorList compat, at::IntArrayRef normalization,
    int64_t iterations, const c10::optional<at::Tensor>& q_init_in, const c10::List<bool>& compat_grad) {
  const Call c = check_call(unary_in, features, compat, normalization, iterations, q_init_in);
  check_backward_args(grad_q_in, q_in, history_in, unary_in, iterations, cuda::label_stride(c.L));
  TORCH_CHECK(compat_grad.size() == compat.size(), "dense_crf backward: compat_grad needs one flag per term (",
              compat.size(), "), got ", compat_grad.size());
  c10::cuda::CUDAGuard device_guard(c.unary.device());
  const at::Tensor grad_q = grad_q_in.contiguous(), q = q_in.contiguous();
  const at::Tensor history = history_in.has_value() ? history_in->contiguous() : at::Tensor();
  at::Tensor grad_unary = new_output(c.unary, {c.B, c.L, c.N});
  at::Tensor grad_q_init = c.q_init.defined() ? new_output(c.unary, {c.B, c.L, c.N})
                                              : at::empty({0}, c.unary.options());
  std::vector<at::Tensor> acc(compat.size());
  cuda::Gradients grads;
  grads.unary = grad_unary.data_ptr<float>();
  grads.q_init = c.q_init.defined() ? grad_q_init.data_ptr<float>() : nullptr;
  for (size_t k = 0; k < compat.size(); ++k) {
    const lattice::CompatKind kind = c.in.compat[k].first;
    const int64_t width = kind == lattice::kPotts ? 1 : kind == lattice::kDiagonal ? c.L : c.L * c.L;
    if (compat_grad.get(k)) acc[k] = at::zeros({width}, c.unary.options().dtype(at::kDouble));
    grads.compat.push_back(acc[k].defined() ? acc[k].data_ptr<double>() : nullptr);
  }
  run_cuda(c, [&](const cuda::Problem& p) {
    cuda::mean_field_backward(p, iterations, grad_q.data_ptr<float>(), q.data_ptr<float>(),
                              history.defined() ? history.data_ptr<float>() : nullptr, grads);
  });
  std::vector<at::Tensor> grad_compat;
  for (size_t k = 0; k < compat.size(); ++k) {
    if (!acc[k].defined()) {
      grad_compat.push_back(at::zeros_like(compat[k]));
      continue;
    }
    const at::Tensor host = acc[k].cpu();  // the one host sync of the backward, at its end
    const std::vector<double> g(host.data_ptr<double>(), host.data_ptr<double>() + host.numel());
    grad_compat.push_back(compat_gradient(g, c.in.compat[k].first, c.L, compat[k]));
  }
  return {grad_unary, grad_compat, grad_q_init};
}

at::Tensor dense_crf_pairwise_energy_cuda(const at::Tensor& q_in, at::TensorList features, at::TensorList compat,
                                          at::IntArrayRef normalization) {
  check_marginals(q_in);
  const int64_t B = q_in.size(0), L = q_in.size(1), N = q_in.size(2);
  const TermInputs in = check_terms(q_in, B, L, N, features, compat, normalization);
  TORCH_CHECK(q_in.is_cuda(), "dense_crf: q is on ", q_in.device(), " but another argument is on a CUDA device");
  TORCH_CHECK(L <= cuda::kMaxLabels, "dense_crf: the CUDA kernels take at most ", cuda::kMaxLabels,
              " labels, got L = ", L);
  c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  at::Tensor out = new_output(q, {B, L, N});
  TorchAllocator allocator(q), scratch(q);
  std::vector<at::Tensor> keep;
  const cuda::Problem p = make_problem(at::Tensor(), q, B, L, N, in, keep, &allocator, &scratch);
  try {
    cuda::pairwise_energy(p, out.data_ptr<float>());
  } catch (const cuda::Error& e) {
    TORCH_CHECK(false, e.what());
  }
  return out;
}

// Gaussian (x/sxy, y/sxy) and bilateral (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) features, [B, D, N], on the
// device. Divisions are tensor by tensor, so each value is the correctly rounded quotient, as on the CPU.
std::tuple<at::Tensor, at::Tensor> dense_crf_image_features_cuda(const at::Tensor& image_in, double gaussian_sxy,
                                                                 double bilateral_sxy, double bilateral_srgb) {
  check_image(image_in, gaussian_sxy, bilateral_sxy, bilateral_srgb);
  c10::cuda::CUDAGuard device_guard(image_in.device());
  const at::Tensor image = image_in.contiguous();
  const int64_t B = image.size(0), H = image.size(2), W = image.size(3), N = H * W;
  const at::TensorOptions f32 = image.options().dtype(at::kFloat);
  const at::Tensor xs = at::arange(W, f32).view({1, W}).expand({H, W});
  const at::Tensor ys = at::arange(H, f32).view({H, 1}).expand({H, W});
  auto over = [&](const at::Tensor& t, double s) { return t / at::full({}, s, f32); };
  const at::Tensor gaussian = at::stack({over(xs, gaussian_sxy), over(ys, gaussian_sxy)})
                                  .reshape({1, 2, N})
                                  .expand({B, 2, N})
                                  .contiguous();
  const at::Tensor position = at::stack({over(xs, bilateral_sxy), over(ys, bilateral_sxy)}).reshape({1, 2, N});
  const at::Tensor colour = over(image.to(at::kFloat), bilateral_srgb).reshape({B, 3, N});
  const at::Tensor bilateral = at::cat({position.expand({B, 2, N}), colour}, 1).contiguous();
  return {gaussian, bilateral};
}

}  // namespace

TORCH_LIBRARY_IMPL(deeplab_fast, CUDA, m) {
  m.impl("dense_crf_features", &dense_crf_features_cuda);
  m.impl("dense_crf_features_with_history", &dense_crf_features_with_history_cuda);
  m.impl("dense_crf_features_backward", &dense_crf_features_backward_cuda);
  m.impl("dense_crf_image_features", &dense_crf_image_features_cuda);
  m.impl("dense_crf_pairwise_energy", &dense_crf_pairwise_energy_cuda);
}

}  // namespace dense_crf
}  // namespace deeplab_fast
