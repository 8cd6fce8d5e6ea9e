// The fused atrous convolution for fp16 tensors (see cutlass_conv.cuh).
#include "cutlass_conv.cuh"

namespace deeplab_fast {
namespace atrous_conv {
namespace cuda {

std::string run_fp16(const ConvParams& p) { return detail::run_dtype<cutlass::half_t>(p); }

}  // namespace cuda
}  // namespace atrous_conv
}  // namespace deeplab_fast
