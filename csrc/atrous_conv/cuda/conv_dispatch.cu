// Host-side entry of the CUDA atrous convolution: the dtype dispatch and the tile bookkeeping (no kernels).
#include "atrous_conv_cuda.h"

namespace deeplab_fast {
namespace atrous_conv {
namespace cuda {

const char* tile_shape(DType dtype, Tile tile) {
  if (dtype == DType::kTFloat32) return tile == Tile::kLarge ? "128x128x16" : "64x64x32";
  return tile == Tile::kLarge ? "128x128x32" : "64x64x64";
}

int64_t tile_count(const ConvParams& p, Tile tile) {
  const int64_t n_tiles = (p.K + tile_n(tile) - 1) / tile_n(tile);
  const auto m_tiles = [&](int64_t pixels) { return (int64_t(p.N) * pixels + tile_m(tile) - 1) / tile_m(tile); };
  if (!p.tap_skipping) return m_tiles(int64_t(p.P) * p.Q) * n_tiles;
  int64_t tiles = 0;
  for (const TapRegion& g : p.regions) tiles += m_tiles(g.rows() * g.cols()) * n_tiles;
  return tiles;
}

std::string run(const ConvParams& p) {
  if (p.tap_skipping && p.regions.empty()) return std::string();
  switch (p.dtype) {
    case DType::kBFloat16: return run_bf16(p);
    case DType::kFloat16: return run_fp16(p);
    case DType::kTFloat32: return run_tf32(p);
  }
  return "atrous_conv2d: unknown dtype";
}

}  // namespace cuda
}  // namespace atrous_conv
}  // namespace deeplab_fast
