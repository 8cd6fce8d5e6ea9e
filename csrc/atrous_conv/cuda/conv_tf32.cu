// The fused atrous convolution for float32 tensors on TF32 tensor cores (see cutlass_conv.cuh).
#include "cutlass_conv.cuh"

namespace deeplab_fast {
namespace atrous_conv {
namespace cuda {

std::string run_tf32(const ConvParams& p) { return detail::run_dtype<float>(p); }

}  // namespace cuda
}  // namespace atrous_conv
}  // namespace deeplab_fast
