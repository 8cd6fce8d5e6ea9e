// The fused atrous convolution for bf16 tensors (see cutlass_conv.cuh).
#include "cutlass_conv.cuh"

namespace deeplab_fast {
namespace atrous_conv {
namespace cuda {

std::string run_bf16(const ConvParams& p) { return detail::run_dtype<cutlass::bfloat16_t>(p); }

}  // namespace cuda
}  // namespace atrous_conv
}  // namespace deeplab_fast
