// Permutohedral-lattice maths shared by the CPU and CUDA paths of the dense CRF.
//
// Plain C++ with no torch headers, so that .cu files can include it. Every function here is per pixel
// (or per constant) and branch-light, so it runs unchanged on the host and on the device.
//
// Source: Adams, Baek & Davis, "Fast High-Dimensional Filtering Using the Permutohedral Lattice",
// Eurographics 2010 (sections 3 and 4: elevation E, the enclosing simplex, barycentric weights, the
// [1/2, 1, 1/2] blur and the slice scaling). The float evaluation order below is the one of
// Krähenbühl's densecrf code (permutohedral.cpp, SSE branch) as shipped by pydensecrf, so that our
// lattice has exactly the same vertices and weights, bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DLF_HD __host__ __device__ __forceinline__
#else
#define DLF_HD inline
#endif

namespace deeplab_fast {
namespace lattice {

// Largest feature dimension d we accept. Per-pixel scratch lives on the stack, sized by this.
constexpr int kMaxDim = 16;

// Potts-compatible normalisation types, numbered as pydensecrf's NormalizationType enum.
enum Normalization : int64_t {
  kNoNormalization = 0,
  kNormalizeBefore = 1,
  kNormalizeAfter = 2,
  kNormalizeSymmetric = 3,
};

// Label-compatibility kinds. Potts: message = w * filtered. Diagonal / matrix: message = -(W filtered),
// with the matrix symmetrised as 0.5 (W + W^T), as pydensecrf's MatrixCompatibility does.
enum CompatKind : int {
  kPotts = 0,
  kDiagonal = 1,
  kMatrix = 2,
};

// 1 / (standard deviation) of the lattice's blur, times the scale of E (paper p.5-6).
DLF_HD float inv_std_dev(int d) { return static_cast<float>(std::sqrt(2.0 / 3.0) * (d + 1)); }

// Diagonal scale of the elevation matrix E for feature coordinate i (0-based).
DLF_HD float elevation_scale(int i, int d) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>((i + 2) * (i + 1))) *
                            static_cast<double>(inv_std_dev(d)));
}

// Largest |elevated coordinate / (d+1)| we accept: keeps rounding exact and integer keys in range.
constexpr float kMaxCoordinate = 4194304.0f;  // 2^22

// Round to nearest, ties to even, for |v| < 2^22, as SSE's cvtps2dq does in its default rounding mode.
// Adding and subtracting 1.5 * 2^23 pushes the fraction bits out of the mantissa (needs strict IEEE
// evaluation: no -ffast-math, no reassociation).
DLF_HD float round_half_even(float v) {
  const float shifted = v + 12582912.0f;
  return shifted - 12582912.0f;
}

// The slice scaling constant: the blur's response at zero offset is 1 + 2^-d, undone here.
DLF_HD float slice_alpha(int d) { return 1.0f / (1.0f + std::pow(2.0f, static_cast<float>(-d))); }

// Coordinate i of the canonical simplex vertex `remainder` for a point whose coordinate i has rank `rank`.
DLF_HD int canonical_offset(int remainder, int rank, int d) {
  return rank <= d - remainder ? remainder : remainder - (d + 1);
}

// Embeds one feature vector f[0..d) in the lattice. Writes, for each of the d+1 vertices r of the
// enclosing simplex, its integer key (d coordinates; the last is implied) to keys[r*d .. r*d+d) and its
// barycentric weight to weights[r]. `scale` holds elevation_scale(i, d) for i < d.
// Returns false when the feature is too large for integer lattice keys (|coordinate| >= 2^22).
// D > 0 fixes the dimension at compile time (so the loops unroll); D == 0 uses the run-time `d_runtime`.
template <int D = 0>
DLF_HD bool embed_point(const float* f, int d_runtime, const float* scale, int32_t* keys, float* weights) {
  const int d = D > 0 ? D : d_runtime;
  float elevated[kMaxDim + 1];
  float rem0[kMaxDim + 1];
  float rank[kMaxDim + 1];
  float bary[kMaxDim + 2];
  const float dp1 = static_cast<float>(d + 1);
  const float inv_dp1 = 1.0f / dp1;

  // Elevate: y = E f, accumulated from the last coordinate down.
  float sm = 0.0f;
  for (int j = d; j > 0; --j) {
    const float cf = f[j - 1] * scale[j - 1];
    elevated[j] = sm - static_cast<float>(j) * cf;
    sm += cf;
  }
  elevated[0] = sm;

  // Nearest 0-coloured lattice point, by rounding each coordinate to a multiple of d+1 (ties to even).
  float sum = 0.0f;
  for (int i = 0; i <= d; ++i) {
    const float v = inv_dp1 * elevated[i];
    if (!(v < kMaxCoordinate && v > -kMaxCoordinate)) return false;
    const float rv = round_half_even(v);
    rem0[i] = rv * dp1;
    sum += rv;
    rank[i] = 0.0f;
  }

  // Rank of each coordinate's remainder: the simplex the point lies in.
  for (int i = 0; i < d; ++i) {
    const float di = elevated[i] - rem0[i];
    for (int j = i + 1; j <= d; ++j) {
      const float c = (di < elevated[j] - rem0[j]) ? 1.0f : 0.0f;
      rank[i] += c;
      rank[j] += 1.0f - c;
    }
  }

  // Bring the point back onto the hyperplane when the rounded coordinates do not sum to zero.
  for (int i = 0; i <= d; ++i) {
    rank[i] += sum;
    const float add = rank[i] < 0.0f ? dp1 : 0.0f;
    const float sub = rank[i] >= dp1 ? dp1 : 0.0f;
    rank[i] += add - sub;
    rem0[i] += add - sub;
  }

  // Barycentric coordinates (paper p.10).
  for (int i = 0; i <= d + 1; ++i) bary[i] = 0.0f;
  for (int i = 0; i <= d; ++i) {
    const float v = (elevated[i] - rem0[i]) * inv_dp1;
    const int p = d - static_cast<int>(rank[i]);
    bary[p] += v;
    bary[p + 1] -= v;
  }
  bary[0] += 1.0f + bary[d + 1];

  for (int r = 0; r <= d; ++r) {
    for (int i = 0; i < d; ++i) {
      keys[r * d + i] = static_cast<int32_t>(rem0[i]) + canonical_offset(r, static_cast<int>(rank[i]), d);
    }
    weights[r] = bary[r];
  }
  return true;
}

// Blur neighbours of a lattice point along axis j (0..d): n1 = key + (d+1) e_j - 1, n2 = key - (d+1) e_j + 1,
// written over the d stored coordinates.
DLF_HD void blur_neighbour_keys(const int32_t* key, int d, int j, int32_t* n1, int32_t* n2) {
  for (int k = 0; k < d; ++k) {
    n1[k] = key[k] - 1;
    n2[k] = key[k] + 1;
  }
  if (j < d) {
    n1[j] = key[j] + d;
    n2[j] = key[j] - d;
  }
}

// Normalisation factor from the filtered all-ones response `k1` of one pixel.
DLF_HD float normalisation_factor(float k1, int64_t type) {
  if (type == kNormalizeSymmetric) return static_cast<float>(1.0 / std::sqrt(static_cast<double>(k1) + 1e-20));
  return static_cast<float>(1.0 / (static_cast<double>(k1) + 1e-20));
}

}  // namespace lattice
}  // namespace deeplab_fast
