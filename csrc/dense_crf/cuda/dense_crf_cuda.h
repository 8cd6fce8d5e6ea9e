// The dense CRF on the GPU, as the torch glue (dense_crf_cuda_ops.cpp) sees it: raw device pointers, sizes, a
// stream and an allocator. No torch headers here or in the kernels (*.cu).
//
// Layouts are those of the ops: unary / Q [B, L, N] (label-major per image), features [B, D, N], all contiguous
// float32 on one device. Every image has its own lattice, but the whole batch runs in one set of launches.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../lattice_math.h"

namespace deeplab_fast {
namespace dense_crf {
namespace cuda {

// Most labels the CUDA kernels take: each pixel's labels live in the registers of up to 32 threads.
constexpr int64_t kMaxLabels = 2048;

// Device memory for the working buffers. The glue hands out blocks from torch's caching allocator that stay
// valid until the allocator is destroyed, after the last kernel of the call has been queued on `stream`.
class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t bytes) = 0;
  // Gives back every block handed out so far. Kernels queued later on the stream may reuse them; the caller
  // must not touch them again.
  virtual void release() = 0;
};

// Bad input found on the device (NaN in the unary, ...) or a CUDA error; the glue rethrows it as a
// RuntimeError with the same text.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Term {
  const float* features = nullptr;  // [B, dim, N], device
  int dim = 0;
  lattice::CompatKind compat_kind = lattice::kPotts;
  float potts_weight = 0.0f;        // kPotts: the weight w
  const float* compat = nullptr;    // device: kDiagonal: L floats; kMatrix: L x L (symmetrised); kPotts: unused
  int64_t normalization = lattice::kNormalizeSymmetric;
};

struct Problem {
  int64_t batch = 0;        // B
  int64_t num_labels = 0;   // L, at most kMaxLabels
  int64_t num_pixels = 0;   // N per image
  const float* unary = nullptr;   // [B, L, N]: energies; nullptr for pairwise_energy
  const float* q_init = nullptr;  // [B, L, N] starting marginals, or nullptr: softmax(-unary)
  std::vector<Term> terms;
  cudaStream_t stream = nullptr;
  Allocator* allocator = nullptr;  // buffers that live for the whole call
  Allocator* scratch = nullptr;    // the lattice build's temporaries, released after each term's build
};

// The label stride of the CUDA kernels' pixel-major layout [B * N, S]: L rounded up to 4.
inline int64_t label_stride(int64_t L) { return (L + 3) / 4 * 4; }

// Mean-field inference for `iterations` steps; writes Q [B, L, N] to q_out (device). Throws Error.
// history (optional, device, [B, iterations, N, S] with S = label_stride(L)): receives Q_0 .. Q_{iterations-1},
// the marginals each iteration starts from (the backward reads them).
// The host synchronises with the stream 1 + (number of terms) times: after the embedding (input checks, key
// ranges), then once per term when its lattice points are numbered (their count sizes the buffers). So the call
// cannot be captured into a CUDA graph: on a capturing stream it throws. The iterations then run without a
// sync, as a CUDA graph of their own unless DEEPLAB_FAST_CUDA_GRAPH=0.
// Messages that overflow float32 (|compat| near 3.4e38) are recomputed in double for the pixels concerned.
void mean_field(const Problem& problem, int64_t iterations, float* q_out, float* history = nullptr);

// The gradients of mean-field inference (the vector-Jacobian product with grad_q), on the device.
struct Gradients {
  float* unary = nullptr;          // [B, L, N] dL/d unary (written)
  float* q_init = nullptr;         // [B, L, N] dL/d q_init, when problem.q_init is set
  std::vector<double*> compat;     // per term: nullptr (not wanted) or a zeroed device accumulator to which
                                   // dL/d compat is added: 1 (Potts), L (diagonal) or L x L (matrix: the gradient
                                   // w.r.t. the symmetrised matrix, not yet symmetrised)
};

// Backward of mean_field (the algorithm of the CPU's cpu::mean_field_backward: per iteration one transposed
// lattice filter per term, i.e. the forward's splat and slice kernels with the blur axes in reverse order,
// plus element-wise and fixed-order reduction kernels; no float atomics). grad_q, q: [B, L, N] (q: the
// forward's output); history: the forward's, or nullptr to recompute it (checkpointing).
void mean_field_backward(const Problem& problem, int64_t iterations, const float* grad_q, const float* q,
                         const float* history, const Gradients& grads);

// The summed pairwise messages sum_k compat_k(K_k q) for q = problem.q_init, written to out [B, L, N].
void pairwise_energy(const Problem& problem, float* out);

}  // namespace cuda
}  // namespace dense_crf
}  // namespace deeplab_fast
