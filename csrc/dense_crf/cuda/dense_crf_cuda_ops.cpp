// Torch glue for the dense CRF on CUDA: the CUDA registrations of deeplab_fast::dense_crf, dense_crf_features and
// dense_crf_pairwise_energy. Arguments are checked exactly as on the CPU (dense_crf_args.h); the kernels
// (mean_field.cu, permutohedral.cu) see raw pointers, the current stream and an allocator backed by torch's
// CUDA caching allocator. Compiled only in CUDA builds (setup.py, CMake WITH_CUDA).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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

void check_labels(int64_t L) {
  TORCH_CHECK(L <= cuda::kMaxLabels, "dense_crf: the CUDA kernels take at most ", cuda::kMaxLabels,
              " labels, got L = ", L);
}

// Runs a kernel entry point fn(problem, out) on the inputs' device and current stream: unary [B, L, N] (undefined for
// the pairwise energy) and q [B, L, N] (q_init, or the marginals; may be undefined). Returns the [B, L, N] output.
// Kernel errors become RuntimeErrors with the same text.
template <typename Fn>
at::Tensor run_cuda(const at::Tensor& unary_in, const at::Tensor& q_in, const TermInputs& in, Fn fn) {
  const at::Tensor& ref = unary_in.defined() ? unary_in : q_in;
  c10::cuda::CUDAGuard device_guard(ref.device());
  const int64_t B = ref.size(0), L = ref.size(1), N = ref.size(2);
  check_labels(L);
  const at::Tensor unary = unary_in.defined() ? unary_in.contiguous() : at::Tensor();
  const at::Tensor q = q_in.defined() ? q_in.contiguous() : at::Tensor();
  at::Tensor out = new_output(ref, {B, L, N});
  TorchAllocator allocator(ref), scratch(ref);
  std::vector<at::Tensor> keep;
  const cuda::Problem p = make_problem(unary, q, B, L, N, in, keep, &allocator, &scratch);
  try {
    fn(p, out.data_ptr<float>());
  } catch (const cuda::Error& e) {
    TORCH_CHECK(false, e.what());
  }
  return out;
}

// The compatibilities may live on any device, and a CUDA one sends the call here even when the data is on the
// CPU: such calls go back through the dispatcher with CPU compatibilities.
std::vector<at::Tensor> on_cpu(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : tensors) out.push_back(t.cpu());
  return out;
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor dense_crf_features_cuda(const at::Tensor& unary_in, at::TensorList features, at::TensorList compat,
                                   at::IntArrayRef normalization, int64_t iterations,
                                   const c10::optional<at::Tensor>& q_init_in) {
  check_unary_shape(unary_in, 3, "[B, L, N]");
  check_iterations(iterations);
  const int64_t B = unary_in.size(0), L = unary_in.size(1), N = unary_in.size(2);
  // Device checks first: they name the tensor that is on the wrong device.
  const TermInputs in = check_terms(unary_in, B, L, N, features, compat, normalization);
  const at::Tensor q_init = check_q_init(q_init_in, unary_in);
  if (!unary_in.is_cuda()) {
    return op<at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef, int64_t,
                         const c10::optional<at::Tensor>&)>("deeplab_fast::dense_crf_features")
        .call(unary_in, features, on_cpu(compat), normalization, iterations, q_init_in);
  }
  return run_cuda(unary_in, q_init, in, [&](const cuda::Problem& p, float* out) {
    cuda::mean_field(p, iterations, out);
  });
}

at::Tensor dense_crf_pairwise_energy_cuda(const at::Tensor& q_in, at::TensorList features, at::TensorList compat,
                                          at::IntArrayRef normalization) {
  check_marginals(q_in);
  const int64_t B = q_in.size(0), L = q_in.size(1), N = q_in.size(2);
  const TermInputs in = check_terms(q_in, B, L, N, features, compat, normalization);
  if (!q_in.is_cuda()) {
    return op<at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef)>(
               "deeplab_fast::dense_crf_pairwise_energy")
        .call(q_in, features, on_cpu(compat), normalization);
  }
  return run_cuda(at::Tensor(), q_in, in, [](const cuda::Problem& p, float* out) { cuda::pairwise_energy(p, out); });
}

// Gaussian (x/sxy, y/sxy) and bilateral (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) features, [B, D, N], on the
// device. Divisions are tensor by tensor, so each value is the correctly rounded quotient, as on the CPU.
std::pair<at::Tensor, at::Tensor> image_features(const at::Tensor& image, double gaussian_sxy, double bilateral_sxy,
                                                 double bilateral_srgb) {
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

at::Tensor dense_crf_cuda(const at::Tensor& unary, const at::Tensor& image, int64_t iterations, double gaussian_sxy,
                          const at::Tensor& gaussian_compat, double bilateral_sxy, double bilateral_srgb,
                          const at::Tensor& bilateral_compat) {
  check_image_args(unary, image, gaussian_sxy, bilateral_sxy, bilateral_srgb);
  if (!unary.is_cuda()) {
    return op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double, const at::Tensor&, double, double,
                         const at::Tensor&)>("deeplab_fast::dense_crf")
        .call(unary, image, iterations, gaussian_sxy, gaussian_compat.cpu(), bilateral_sxy, bilateral_srgb,
              bilateral_compat.cpu());
  }
  c10::cuda::CUDAGuard device_guard(unary.device());
  const int64_t B = unary.size(0), L = unary.size(1), H = unary.size(2), W = unary.size(3);
  const std::pair<at::Tensor, at::Tensor> feats =
      image_features(image.contiguous(), gaussian_sxy, bilateral_sxy, bilateral_srgb);
  const std::vector<at::Tensor> features{feats.first, feats.second};
  const std::vector<at::Tensor> compat{gaussian_compat, bilateral_compat};
  const std::vector<int64_t> normalization{lattice::kNormalizeSymmetric, lattice::kNormalizeSymmetric};
  at::Tensor q = dense_crf_features_cuda(unary.reshape({B, L, H * W}), features, compat, normalization, iterations,
                                         c10::nullopt);
  return q.view({B, L, H, W});
}

}  // namespace

TORCH_LIBRARY_IMPL(deeplab_fast, CUDA, m) {
  m.impl("dense_crf", &dense_crf_cuda);
  m.impl("dense_crf_features", &dense_crf_features_cuda);
  m.impl("dense_crf_pairwise_energy", &dense_crf_pairwise_energy_cuda);
}

}  // namespace dense_crf
}  // namespace deeplab_fast
