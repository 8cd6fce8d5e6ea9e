// Torch glue for the dense CRF on CUDA: the CUDA registrations of the deeplab_fast::dense_crf_* ops (the image-level
// dense_crf is a composite of them, registered once in ../dense_crf_ops.cpp). Arguments are checked as on the CPU
// (../dense_crf_args.h), plus the kernels' limits; the kernels (mean_field.cu, permutohedral.cu) see raw pointers,
// the current stream and an allocator backed by torch's CUDA caching allocator. Compiled only in CUDA builds
// (setup.py, CMake WITH_CUDA).
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

// The kernels' problem description for the call, on the current stream (the caller holds a device guard). `keep`
// holds the device copies of the compatibilities.
cuda::Problem make_problem(const Call& c, std::vector<at::Tensor>& keep, cuda::Allocator* allocator,
                           cuda::Allocator* scratch) {
  cuda::Problem p;
  p.batch = c.B;
  p.num_labels = c.L;
  p.num_pixels = c.N;
  p.unary = c.unary.defined() ? c.unary.data_ptr<float>() : nullptr;
  p.q_init = c.q_init.defined() ? c.q_init.data_ptr<float>() : nullptr;
  p.stream = c10::cuda::getCurrentCUDAStream().stream();
  p.allocator = allocator;
  p.scratch = scratch;
  const TermInputs& in = c.terms;
  for (size_t k = 0; k < in.features.size(); ++k) {
    cuda::Term t;
    t.features = in.features[k].data_ptr<float>();
    t.dim = static_cast<int>(in.features[k].size(1));
    t.compat_kind = in.compat[k].first;
    if (t.compat_kind == lattice::kPotts) {
      t.potts_weight = in.compat[k].second.data_ptr<float>()[0];  // a CPU tensor (check_compat)
    } else {
      keep.push_back(in.compat[k].second.to(in.features[k].device()));
      t.compat = keep.back().data_ptr<float>();
    }
    t.normalization = in.normalization[k];
    p.terms.push_back(t);
  }
  return p;
}

// The CUDA kernels' own limits, after the shared checks. A CUDA argument sends a call here even when `ref` (the
// unary, or q) is on the CPU: the device checks name it.
void check_cuda_call(const Call& c, const at::Tensor& ref, const char* name) {
  TORCH_CHECK_VALUE(ref.is_cuda(), "dense_crf: ", name, " is on ", ref.device(),
                    " but another argument is on a CUDA device");
  TORCH_CHECK_VALUE(c.L <= cuda::kMaxLabels, "dense_crf: the CUDA kernels take at most ", cuda::kMaxLabels,
                    " labels, got L = ", c.L);
}

// Runs fn(problem) on the call's device and current stream; kernel errors become RuntimeErrors with their text.
template <typename Fn>
void run_cuda(const Call& c, Fn fn) {
  const at::Tensor& ref = c.unary.defined() ? c.unary : c.q_init;
  c10::cuda::CUDAGuard device_guard(ref.device());
  TorchAllocator allocator(ref), scratch(ref);
  std::vector<at::Tensor> keep;
  const cuda::Problem p = make_problem(c, keep, &allocator, &scratch);
  try {
    fn(p);
  } catch (const cuda::Error& e) {
    TORCH_CHECK(false, e.what());
  }
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& unary, at::TensorList features, at::TensorList compat,
                                           at::IntArrayRef normalization, int64_t iterations,
                                           const c10::optional<at::Tensor>& q_init, bool keep_history) {
  const Call c = check_call(unary, features, compat, normalization, iterations, q_init);
  check_cuda_call(c, unary, "unary");
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
    const at::Tensor& grad_q, const at::Tensor& q, const c10::optional<at::Tensor>& history,
    const at::Tensor& unary, at::TensorList features, at::TensorList compat, at::IntArrayRef normalization,
    int64_t iterations, const c10::optional<at::Tensor>& q_init, const c10::List<bool>& compat_grad) {
  const BackwardCall bc = check_backward_call(grad_q, q, history, unary, features, compat, normalization, iterations,
                                              q_init, compat_grad, &cuda::label_stride);
  const Call& c = bc.forward;
  check_cuda_call(c, unary, "unary");
  c10::cuda::CUDAGuard device_guard(c.unary.device());
  at::Tensor grad_unary = new_output(c.unary, {c.B, c.L, c.N});
  at::Tensor grad_q_init = c.q_init.defined() ? new_output(c.unary, {c.B, c.L, c.N})
                                              : at::empty({0}, c.unary.options());
  std::vector<at::Tensor> acc(compat.size());
  cuda::Gradients grads;
  grads.unary = grad_unary.data_ptr<float>();
  grads.q_init = c.q_init.defined() ? grad_q_init.data_ptr<float>() : nullptr;
  for (size_t k = 0; k < compat.size(); ++k) {
    if (bc.compat_grad_width[k] > 0)
      acc[k] = at::zeros({bc.compat_grad_width[k]}, c.unary.options().dtype(at::kDouble));
    grads.compat.push_back(acc[k].defined() ? acc[k].data_ptr<double>() : nullptr);
  }
  run_cuda(c, [&](const cuda::Problem& p) {
    cuda::mean_field_backward(p, iterations, bc.grad_q.data_ptr<float>(), bc.q.data_ptr<float>(),
                              bc.history.defined() ? bc.history.data_ptr<float>() : nullptr, grads);
  });
  std::vector<std::vector<double>> totals(compat.size());
  for (size_t k = 0; k < compat.size(); ++k) {
    if (!acc[k].defined()) continue;
    const at::Tensor host = acc[k].cpu();  // the one host sync of the backward, at its end
    totals[k].assign(host.data_ptr<double>(), host.data_ptr<double>() + host.numel());
  }
  return {grad_unary, compat_gradients(bc, totals, compat), grad_q_init};
}

at::Tensor dense_crf_pairwise_energy_cuda(const at::Tensor& q, at::TensorList features, at::TensorList compat,
                                          at::IntArrayRef normalization) {
  const Call c = check_pairwise_energy_call(q, features, compat, normalization);
  check_cuda_call(c, q, "q");
  c10::cuda::CUDAGuard device_guard(c.q_init.device());
  at::Tensor out = new_output(c.q_init, {c.B, c.L, c.N});
  run_cuda(c, [&](const cuda::Problem& p) { cuda::pairwise_energy(p, out.data_ptr<float>()); });
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
