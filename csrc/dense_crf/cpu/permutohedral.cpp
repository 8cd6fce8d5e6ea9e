#include "permutohedral.h"

#include "common/parallel.h"
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>

#include "../dense_crf.h"
#include "../lattice_math.h"
#include "simd.h"
#include "stage_timer.h"

namespace deeplab_fast {
namespace dense_crf {
namespace cpu {

namespace {

constexpr int64_t kPixelGrain = 2048;
constexpr int64_t kPointGrain = 1024;
constexpr int64_t kSplatGrain = 256;
constexpr int64_t kChainGrain = 64;
constexpr int kBlock = PermutohedralLattice::kPixelBlock;

// The first capacity of a key table for `pixels` pixels: most lattices have far fewer points than pixels (the
// default kernels about one per ten pixels), and a table sized for the worst case would spread its few keys over
// megabytes (a cache miss per lookup). It grows by doubling when it fills.
int64_t initial_points(int64_t pixels) { return std::max<int64_t>(4096, pixels / 8); }

// Open-addressing hash set of d-dimensional integer keys; ids are given in insertion order, so the
// lattice point numbering (and everything after it) does not depend on the thread count.
class KeyTable {
 public:
  using Key = int32_t;  // a key is d of them
  KeyTable(int d, int64_t expected) : d_(d) {
    int64_t cap = 64;
    while (cap < 2 * expected) cap <<= 1;
    table_.assign(cap, -1);
    keys_.reserve(static_cast<size_t>(expected) * d);
  }

  int64_t size() const { return size_; }
  const int32_t* key(int64_t id) const { return keys_.data() + id * d_; }
  int key_width() const { return d_; }

  int32_t insert(const int32_t* k) {
    if (2 * (size_ + 1) > static_cast<int64_t>(table_.size())) grow();
    const int64_t mask = static_cast<int64_t>(table_.size()) - 1;
    for (int64_t h = hash(k) & mask;; h = (h + 1) & mask) {
      const int32_t e = table_[h];
      if (e < 0) {
        if (static_cast<int64_t>(keys_.size()) < (size_ + 1) * d_) keys_.resize(static_cast<size_t>(size_ + 1) * d_);
        std::copy(k, k + d_, keys_.begin() + size_ * d_);
        table_[h] = static_cast<int32_t>(size_);
        return static_cast<int32_t>(size_++);
      }
      if (same(key(e), k)) return e;
    }
  }

  int32_t find(const int32_t* k) const {
    const int64_t mask = static_cast<int64_t>(table_.size()) - 1;
    for (int64_t h = hash(k) & mask;; h = (h + 1) & mask) {
      const int32_t e = table_[h];
      if (e < 0) return -1;
      if (same(key(e), k)) return e;
    }
  }

  int32_t find_from(const KeyTable& other, int64_t id) const { return find(other.key(id)); }

  // The ids of `count` keys (d int32 each), inserted in order.
  void insert_block(const int32_t* keys, int64_t count, int32_t* ids) {
    for (int64_t e = 0; e < count; ++e) ids[e] = insert(keys + e * d_);
  }
  void find_many(const KeyTable& other, int64_t v0, int64_t v1, int32_t* out) const {
    for (int64_t v = v0; v < v1; ++v) out[v - v0] = find_from(other, v);
  }
  void successors(int64_t p0, int64_t p1, int axis, int32_t* out) const {
    for (int64_t p = p0; p < p1; ++p) out[p - p0] = successor(p, axis);
  }

  // Makes room for `total` keys, so that insert_new needs no growth.
  void reserve(int64_t total) {
    while (2 * total > static_cast<int64_t>(table_.size())) grow();
    keys_.resize(static_cast<size_t>(total) * d_);
  }

  // Inserts other's key `id` under the given new id; the key must be absent and distinct from every other
  // key inserted concurrently. Thread-safe after reserve(): free slots are claimed atomically.
  void insert_new(const KeyTable& other, int64_t id, int32_t new_id) {
    const int32_t* k = other.key(id);
    std::copy(k, k + d_, keys_.begin() + static_cast<int64_t>(new_id) * d_);
    const int64_t mask = static_cast<int64_t>(table_.size()) - 1;
    for (int64_t h = hash(k) & mask;; h = (h + 1) & mask) {
      int32_t expected = -1;
      if (__atomic_compare_exchange_n(&table_[h], &expected, new_id, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) break;
    }
    __atomic_fetch_add(&size_, 1, __ATOMIC_RELAXED);
  }

  // The id of point `id`'s blur neighbour n1 along `axis` (key + (d+1) e_axis - 1), or -1.
  int32_t successor(int64_t id, int axis) const {
    int32_t n1[lattice::kMaxDim];
    int32_t n2[lattice::kMaxDim];
    lattice::blur_neighbour_keys(key(id), d_, axis, n1, n2);
    return find(n1);
  }

 private:
  bool same(const int32_t* a, const int32_t* b) const {
    for (int i = 0; i < d_; ++i)
      if (a[i] != b[i]) return false;
    return true;
  }

  uint64_t hash(const int32_t* k) const {
    uint64_t h = 0;
    for (int i = 0; i < d_; ++i) h = (h + static_cast<uint32_t>(k[i])) * 0x9E3779B97F4A7C15ull;
    return h ^ (h >> 29);
  }

  void grow() {
    std::vector<int32_t> bigger(table_.size() * 2, -1);
    const int64_t mask = static_cast<int64_t>(bigger.size()) - 1;
    for (int64_t id = 0; id < size_; ++id) {
      int64_t h = hash(key(id)) & mask;
      while (bigger[h] >= 0) h = (h + 1) & mask;
      bigger[h] = static_cast<int32_t>(id);
    }
    table_.swap(bigger);
  }

  int d_;
  int64_t size_ = 0;
  std::vector<int32_t> table_;
  std::vector<int32_t> keys_;
};

// A key with every coordinate in `bits` bits (coordinate + 2^(bits-1) per field) as one 64-bit word.
inline uint64_t pack_key(const int32_t* k, int d, int bits) {
  const int64_t bias = int64_t{1} << (bits - 1);
  uint64_t u = 0;
  for (int i = 0; i < d; ++i) u |= static_cast<uint64_t>(k[i] + bias) << (bits * i);
  return u;
}

// The same set for keys whose coordinates all fit in `bits` bits (with room for the blur neighbours): each key
// is packed into one 64-bit word (pack_key) stored inline in its slot, so a lookup touches one cache line and
// compares one integer, and a blur neighbour is the packed key plus a constant.
class PackedKeyTable {
 public:
  using Key = uint64_t;  // a key is one of them
  PackedKeyTable(int d, int64_t expected, int bits) : d_(d), bits_(bits) {
    int64_t cap = 64;
    while (cap < 2 * expected) cap <<= 1;
    allocate(static_cast<size_t>(cap));
    keys_.reserve(static_cast<size_t>(expected));
    for (int j = 0; j <= d; ++j) {
      uint64_t delta = 0;  // n1 = key - 1 in every coordinate, key + d in coordinate j (when j < d)
      for (int k = 0; k < d; ++k) delta += static_cast<uint64_t>(static_cast<int64_t>(k == j ? d : -1)) << (bits * k);
      successor_delta_[j] = delta;
    }
  }

  int64_t size() const { return static_cast<int64_t>(keys_.size()); }
  int key_width() const { return 1; }
  int32_t insert(const int32_t* k) { return insert_packed(pack_key(k, d_, bits_)); }
  int32_t find_from(const PackedKeyTable& other, int64_t id) const { return find_packed(other.keys_[id]); }

  // The ids of `count` packed keys, inserted in order; the keys come in groups of `group` (a pixel's d+1 vertices).
  // A key equal to the previous group's key in the same place takes its id without a lookup (neighbouring pixels in
  // the same simplex have the same vertices in the same order). The other keys are hashed a batch at a time and
  // their slots prefetched before the probes, so that the cache misses of a batch overlap.
  void insert_block(const uint64_t* keys, int64_t count, int32_t* ids, int group) {
    int32_t pending[kBatch];  // the entries of a batch that need a lookup
    for (int64_t b0 = 0; b0 < count; b0 += kBatch) {
      const int64_t n = std::min<int64_t>(kBatch, count - b0);
      if (2 * (size() + n) > static_cast<int64_t>(slots_.size())) grow();
      const uint64_t mask = slots_.size() - 1;
      int np = 0;
      for (int64_t e = b0; e < b0 + n; ++e) {
        if (e >= group && keys[e] == keys[e - group]) continue;
        pending[np++] = static_cast<int32_t>(e);
        __builtin_prefetch(&slots_[hash(keys[e]) & mask]);
      }
      // In entry order, so that new keys are numbered in order of first appearance.
      int k = 0;
      for (int64_t e = b0; e < b0 + n; ++e) {
        if (k < np && pending[k] == e) {
          ids[e] = insert_packed(keys[e]);
          ++k;
        } else {
          ids[e] = ids[e - group];
        }
      }
    }
  }
  void find_many(const PackedKeyTable& other, int64_t v0, int64_t v1, int32_t* out) const {
    lookup_batched(v1 - v0, [&](int64_t k) { return other.keys_[v0 + k]; }, out);
  }
  void successors(int64_t p0, int64_t p1, int axis, int32_t* out) const {
    const uint64_t delta = successor_delta_[axis];
    lookup_batched(p1 - p0, [&](int64_t k) { return keys_[p0 + k] + delta; }, out);
  }

  // Makes room for `total` keys, so that insert_new needs no growth.
  void reserve(int64_t total) {
    while (2 * total > static_cast<int64_t>(slots_.size())) grow();
    keys_.resize(static_cast<size_t>(total));
  }

  // Inserts other's key `id` under the given new id; the key must be absent and distinct from every other
  // key inserted concurrently. Thread-safe after reserve(): free slots are claimed atomically.
  void insert_new(const PackedKeyTable& other, int64_t id, int32_t new_id) {
    const uint64_t u = other.keys_[id];
    keys_[new_id] = u;
    const uint64_t mask = slots_.size() - 1;
    for (uint64_t h = hash(u) & mask;; h = (h + 1) & mask) {
      int32_t expected = -1;
      if (__atomic_compare_exchange_n(&slots_[h].id, &expected, new_id, false, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED)) {
        slots_[h].key = u;
        return;
      }
    }
  }
  int32_t successor(int64_t id, int axis) const { return find_packed(keys_[id] + successor_delta_[axis]); }

 private:
  struct Slot {
    uint64_t key;
    int32_t id;
  };

  static uint64_t hash(uint64_t u) {
    u *= 0x9E3779B97F4A7C15ull;
    return u ^ (u >> 31);
  }

  static constexpr int64_t kBatch = 16;

  template <typename KeyAt>
  void lookup_batched(int64_t count, KeyAt key_at, int32_t* out) const {
    const uint64_t mask = slots_.size() - 1;
    uint64_t packed[kBatch];
    for (int64_t b0 = 0; b0 < count; b0 += kBatch) {
      const int64_t n = std::min<int64_t>(kBatch, count - b0);
      for (int64_t k = 0; k < n; ++k) {
        packed[k] = key_at(b0 + k);
        __builtin_prefetch(&slots_[hash(packed[k]) & mask]);
      }
      for (int64_t k = 0; k < n; ++k) out[b0 + k] = find_packed(packed[k]);
    }
  }

  int32_t insert_packed(uint64_t u) {
    if (2 * (size() + 1) > static_cast<int64_t>(slots_.size())) grow();
    const uint64_t mask = slots_.size() - 1;
    for (uint64_t h = hash(u) & mask;; h = (h + 1) & mask) {
      Slot& slot = slots_[h];
      if (slot.id < 0) {
        slot = Slot{u, static_cast<int32_t>(keys_.size())};
        keys_.push_back(u);
        return slot.id;
      }
      if (slot.key == u) return slot.id;
    }
  }

  int32_t find_packed(uint64_t u) const {
    const uint64_t mask = slots_.size() - 1;
    for (uint64_t h = hash(u) & mask;; h = (h + 1) & mask) {
      const Slot& slot = slots_[h];
      if (slot.id < 0) return -1;
      if (slot.key == u) return slot.id;
    }
  }

  void allocate(size_t capacity) {
    slots_.reset(capacity);
    std::fill(slots_.data(), slots_.data() + capacity, Slot{0, -1});
  }

  void grow() {
    allocate(slots_.size() * 2);
    const uint64_t mask = slots_.size() - 1;
    for (size_t id = 0; id < keys_.size(); ++id) {
      uint64_t h = hash(keys_[id]) & mask;
      while (slots_[h].id >= 0) h = (h + 1) & mask;
      slots_[h] = Slot{keys_[id], static_cast<int32_t>(id)};
    }
  }

  int d_, bits_;
  uint64_t successor_delta_[lattice::kMaxDim + 1];
  Buffer<Slot> slots_;
  std::vector<uint64_t> keys_;
};

// The generic table's insert_block takes no grouping.
inline void insert_keys(KeyTable& table, const int32_t* keys, int64_t count, int32_t* ids, int /*group*/) {
  table.insert_block(keys, count, ids);
}
inline void insert_keys(PackedKeyTable& table, const uint64_t* keys, int64_t count, int32_t* ids, int group) {
  table.insert_block(keys, count, ids, group);
}

// Bits per coordinate for packed keys, or 0 when some key (or blur neighbour) of these features might not fit.
// Bound: |elevated_j| <= sum_k |f_k s_k| + d max_k |f_k s_k| <= sum_k F_k s_k + d max_k F_k s_k with F_k the largest
// |f_k| over the pixels; rounding and the simplex offsets add at most 3 (d + 1), and a neighbour another d + 1.
// (A NaN feature is skipped here and rejected by the embedding; an infinite one makes the bound infinite.)
int packed_key_bits(const float* features, int d, int64_t n, const float* scale) {
  const int bits = std::min(32, 64 / d);
  const int64_t chunks = (n + kPixelGrain - 1) / kPixelGrain;
  std::vector<float> chunk_max(static_cast<size_t>(chunks * d), 0.0f);
  parallel::for_range(0, n, kPixelGrain, [&](int64_t begin, int64_t end) {
    for (int k = 0; k < d; ++k) {
      const float* f = features + k * n;
      float m = 0.0f;
      for (int64_t i = begin; i < end; ++i) m = std::max(m, std::fabs(f[i]));
      chunk_max[(begin / kPixelGrain) * d + k] = m;
    }
  });
  double sum = 0.0, largest = 0.0;
  for (int k = 0; k < d; ++k) {
    float m = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) m = std::max(m, chunk_max[c * d + k]);
    const double c = static_cast<double>(m) * scale[k];
    sum += c;
    largest = std::max(largest, c);
  }
  const double bound = sum + d * largest + 4.0 * (d + 1) + 1.0;
  return bound < std::ldexp(1.0, bits - 1) ? bits : 0;
}

// ---- embedding ----
//
// Pixels [begin, end) (begin a multiple of 8): the d+1 vertex keys of pixel i go to keys[(i - begin) * (d+1) + r]
// when packed (bits > 0; one uint64 each) or keys[((i - begin) * (d+1) + r) * d ...] (d int32 each) otherwise, its
// weights to the blocked weight array. Returns false on oversize features.

struct KeyOut {
  int bits;          // > 0: packed keys
  uint64_t* packed;  // [pixels, d+1]
  int32_t* plain;    // [pixels, d+1, d]
};

// lattice::embed_point for eight consecutive pixels i..i+7 at once, D fixed: the same IEEE operations in the
// same order, lane by lane, with selects where the scalar form branches or indexes by rank. (pydensecrf's own
// builder does this four lanes wide with SSE.) i is a multiple of 8, so the eight weights of vertex r are
// contiguous in the blocked layout.
template <int D>
DLF_INLINE bool embed8(const float* features, int64_t n, int64_t i, const float* scale, const KeyOut& out,
                       int64_t key_index, float* weight_block) {
  constexpr int dp1 = D + 1;
  const vec8 zero = splat8(0.0f), one = splat8(1.0f), fdp1 = splat8(static_cast<float>(dp1));
  const float inv_dp1 = 1.0f / static_cast<float>(dp1);
  vec8 elevated[dp1], rem0[dp1], rank[dp1], bary[D + 2];
  vec8 sm = zero;
  for (int j = D; j > 0; --j) {
    const vec8 cf = load8(features + (j - 1) * n + i) * scale[j - 1];
    elevated[j] = sm - static_cast<float>(j) * cf;
    sm = sm + cf;
  }
  elevated[0] = sm;
  vec8 sum = zero;
  ivec8 inside = ivec8{} - 1;
  for (int k = 0; k <= D; ++k) {
    const vec8 v = inv_dp1 * elevated[k];
    inside &= (v < lattice::kMaxCoordinate) & (v > -lattice::kMaxCoordinate);
    const vec8 rv = (v + 12582912.0f) - 12582912.0f;  // lattice::round_half_even
    rem0[k] = rv * fdp1;
    sum = sum + rv;
    rank[k] = zero;
  }
  bool ok = true;
  for (int lane = 0; lane < 8; ++lane) ok &= inside[lane] != 0;
  for (int a = 0; a < D; ++a) {
    const vec8 da = elevated[a] - rem0[a];
    for (int b = a + 1; b <= D; ++b) {
      const vec8 c = (da < elevated[b] - rem0[b]) ? one : zero;
      rank[a] = rank[a] + c;
      rank[b] = rank[b] + (one - c);
    }
  }
  for (int k = 0; k <= D; ++k) {
    rank[k] = rank[k] + sum;
    const vec8 add = rank[k] < zero ? fdp1 : zero;
    const vec8 sub = rank[k] >= fdp1 ? fdp1 : zero;
    rank[k] = rank[k] + (add - sub);
    rem0[k] = rem0[k] + (add - sub);
  }
  for (int slot = 0; slot < D + 2; ++slot) bary[slot] = zero;
  for (int k = 0; k <= D; ++k) {
    const vec8 v = (elevated[k] - rem0[k]) * inv_dp1;
    const vec8 p = static_cast<float>(D) - rank[k];  // the slot that gains v; the next one loses it
    for (int slot = 0; slot <= D; ++slot) bary[slot] = (p == static_cast<float>(slot)) ? bary[slot] + v : bary[slot];
    for (int slot = 1; slot <= D + 1; ++slot)
      bary[slot] = (p == static_cast<float>(slot - 1)) ? bary[slot] - v : bary[slot];
  }
  bary[0] = bary[0] + (1.0f + bary[D + 1]);
  ivec8 base[D];
  for (int k = 0; k < D; ++k) base[k] = __builtin_convertvector(rem0[k], ivec8);
  for (int r = 0; r <= D; ++r) {
    ivec8 key[D];
    for (int k = 0; k < D; ++k)
      key[k] = base[k] + ((rank[k] <= static_cast<float>(D - r)) ? ivec8{} + r : ivec8{} + (r - dp1));
    if (out.bits > 0) {
      typedef int64_t i64vec4 __attribute__((vector_size(32)));
      typedef int32_t ivec4_t __attribute__((vector_size(16)));
      const int64_t bias = int64_t{1} << (out.bits - 1);
      i64vec4 lo{}, hi{};
      for (int k = 0; k < D; ++k) {
        const ivec4_t klo = __builtin_shufflevector(key[k], key[k], 0, 1, 2, 3);
        const ivec4_t khi = __builtin_shufflevector(key[k], key[k], 4, 5, 6, 7);
        lo |= (__builtin_convertvector(klo, i64vec4) + bias) << (out.bits * k);
        hi |= (__builtin_convertvector(khi, i64vec4) + bias) << (out.bits * k);
      }
      uint64_t* dst = out.packed + key_index * dp1 + r;
      for (int lane = 0; lane < 4; ++lane) dst[lane * dp1] = static_cast<uint64_t>(lo[lane]);
      for (int lane = 0; lane < 4; ++lane) dst[(lane + 4) * dp1] = static_cast<uint64_t>(hi[lane]);
    } else {
      for (int k = 0; k < D; ++k)
        for (int lane = 0; lane < 8; ++lane) out.plain[((key_index + lane) * dp1 + r) * D + k] = key[k][lane];
    }
    store8(weight_block + r * kBlock + i % kBlock, bary[r]);
  }
  return ok;
}

template <int D>
DLF_INLINE bool embed_range(const float* features, int d, int64_t n, const float* scale, const KeyOut& out,
                            float* weights, int64_t begin, int64_t end) {
  float f[lattice::kMaxDim];
  int32_t keys[(lattice::kMaxDim + 1) * lattice::kMaxDim] = {};
  float w[lattice::kMaxDim + 1] = {};
  const int64_t dp1 = d + 1;
  bool ok = true;
  int64_t i = begin;
  if constexpr (D > 0) {
    for (; i + 8 <= end; i += 8)
      ok &= embed8<D>(features, n, i, scale, out, i - begin, weights + (i / kBlock) * dp1 * kBlock);
  }
  for (; i < end; ++i) {
    for (int j = 0; j < d; ++j) f[j] = features[j * n + i];
    ok &= lattice::embed_point<D>(f, d, scale, keys, w);
    float* wb = weights + (i / kBlock) * dp1 * kBlock + i % kBlock;
    for (int64_t r = 0; r < dp1; ++r) {
      wb[r * kBlock] = w[r];
      if (out.bits > 0) {
        out.packed[(i - begin) * dp1 + r] = pack_key(keys + r * d, d, out.bits);
      } else {
        std::copy(keys + r * d, keys + (r + 1) * d, out.plain + ((i - begin) * dp1 + r) * d);
      }
    }
  }
  return ok;
}

template <simd::Level>
DLF_INLINE bool embed_pixels_impl(const float* features, int d, int64_t n, const float* scale, const KeyOut& out,
                                  float* weights, int64_t begin, int64_t end) {
#define DLF_EMBED(D) embed_range<D>(features, d, n, scale, out, weights, begin, end)
  switch (d) {  // DenseCRF2D's Gaussian (2) and bilateral (5), RGB-only (3), volumes: 3-D position + intensity (4)
    case 2: return DLF_EMBED(2);
    case 3: return DLF_EMBED(3);
    case 4: return DLF_EMBED(4);
    case 5: return DLF_EMBED(5);
    default: return DLF_EMBED(0);
  }
#undef DLF_EMBED
}

DLF_DISPATCH(bool, embed_pixels,
             (const float* features, int d, int64_t n, const float* scale, const KeyOut& out, float* weights,
              int64_t begin, int64_t end),
             (features, d, n, scale, out, weights, begin, end))

// ---- splat: each point gathers its contributions, in pixel order ----
//
// out[p] = sum over p's contributions (i, w), in increasing i, of w * x_i, with x_i = values[i] (times scale[i],
// rounded first, as pydensecrf normalises the whole input before splatting) and the sum starting from 0: the same
// additions, in the same order, as pydensecrf's per-pixel splat loop. The work is a list of segments, each a run of
// one point's contributions from one band of pixels: the first segment of a point starts its sum from 0, a later
// one continues the sum stored by the one before, in memory. Segments of one band are independent (distinct
// points); P of them are summed side by side (their additions interleaved, each in its own order) where one
// point's chain of dependent additions would leave the vector units idle.

struct SplatArgs {
  const int32_t* begin;  // [M + 1] each point's first contribution
  const int32_t* pixel;
  const float* weight;
  int64_t stride;
};

using Segment = PermutohedralLattice::Segment;

// Row types for 1, 2 or 4 values: R::load(x) loads a row, R::store writes one, arithmetic is element-wise.
struct Row1 {
  using V = float;
  static DLF_INLINE V load(const float* x) { return *x; }
  static DLF_INLINE void store(float* y, V v) { *y = v; }
  static DLF_INLINE V zero() { return 0.0f; }
};
struct Row2 {
  using V = vec4;
  static DLF_INLINE V load(const float* x) { return load2(x); }
  static DLF_INLINE void store(float* y, V v) { store2(y, v); }
  static DLF_INLINE V zero() { return splat4(0.0f); }
};
struct Row4 {
  using V = vec4;
  static DLF_INLINE V load(const float* x) { return load4(x); }
  static DLF_INLINE void store(float* y, V v) { store4(y, v); }
  static DLF_INLINE V zero() { return splat4(0.0f); }
};
template <typename R, bool kScaled>
DLF_INLINE void splat_add(typename R::V& acc, const SplatArgs& a, int32_t e, const float* values, const float* scale,
                          int64_t offset) {
  const int64_t i = a.pixel[e];
  const typename R::V x = R::load(values + i * a.stride + offset);
  acc += a.weight[e] * (kScaled ? x * scale[i] : x);
}

template <typename R>
DLF_INLINE typename R::V splat_start(const SplatArgs& a, const Segment& g, const float* out, int64_t offset) {
  return g.begin == a.begin[g.point] ? R::zero() : R::load(out + g.point * a.stride + offset);
}

// Segments [0, count) with rows of 1, 2 or 4 values (R: Row1, Row2, Row4), P side by side.
template <typename R, int P, bool kScaled>
DLF_INLINE void splat_small(const SplatArgs& a, const Segment* seg, int64_t count, const float* values,
                            const float* scale, float* out, int64_t offset) {
  using V = typename R::V;
  const int64_t S = a.stride;
  int64_t s = 0;
  for (; s + P <= count; s += P) {
    V acc[P];
    int32_t common = std::numeric_limits<int32_t>::max();
    for (int j = 0; j < P; ++j) {
      acc[j] = splat_start<R>(a, seg[s + j], out, offset);
      common = std::min(common, seg[s + j].end - seg[s + j].begin);
    }
    for (int32_t k = 0; k < common; ++k)
      for (int j = 0; j < P; ++j) splat_add<R, kScaled>(acc[j], a, seg[s + j].begin + k, values, scale, offset);
    for (int j = 0; j < P; ++j) {
      for (int32_t e = seg[s + j].begin + common; e < seg[s + j].end; ++e)
        splat_add<R, kScaled>(acc[j], a, e, values, scale, offset);
      R::store(out + seg[s + j].point * S + offset, acc[j]);
    }
  }
  for (; s < count; ++s) {
    V acc = splat_start<R>(a, seg[s], out, offset);
    for (int32_t e = seg[s].begin; e < seg[s].end; ++e) splat_add<R, kScaled>(acc, a, e, values, scale, offset);
    R::store(out + seg[s].point * S + offset, acc);
  }
}

// The same with rows of C vec8.
template <int C, bool kScaled>
DLF_INLINE void splat_add_vec(vec8* __restrict acc, const SplatArgs& a, int32_t e, const float* values,
                              const float* scale, int64_t offset) {
  const int64_t i = a.pixel[e];
  const float w = a.weight[e];
  const float* __restrict x = values + i * a.stride + offset;
  if (kScaled) {
    const float sc = scale[i];
    for (int c = 0; c < C; ++c) acc[c] += w * (load8(x + 8 * c) * sc);
  } else {
    for (int c = 0; c < C; ++c) acc[c] += w * load8(x + 8 * c);
  }
}

template <int C>
DLF_INLINE void splat_start_vec(vec8* __restrict acc, const SplatArgs& a, const Segment& g, const float* out,
                                int64_t offset) {
  if (g.begin == a.begin[g.point]) {
    for (int c = 0; c < C; ++c) acc[c] = splat8(0.0f);
  } else {
    for (int c = 0; c < C; ++c) acc[c] = load8(out + g.point * a.stride + offset + 8 * c);
  }
}

template <int C, int P, bool kScaled>
DLF_INLINE void splat_vec(const SplatArgs& a, const Segment* seg, int64_t count, const float* values,
                          const float* scale, float* out, int64_t offset) {
  const int64_t S = a.stride;
  int64_t s = 0;
  for (; s + P <= count; s += P) {
    vec8 acc[P][C];
    int32_t common = std::numeric_limits<int32_t>::max();
    for (int j = 0; j < P; ++j) {
      splat_start_vec<C>(acc[j], a, seg[s + j], out, offset);
      common = std::min(common, seg[s + j].end - seg[s + j].begin);
    }
    for (int32_t k = 0; k < common; ++k)
      for (int j = 0; j < P; ++j) splat_add_vec<C, kScaled>(acc[j], a, seg[s + j].begin + k, values, scale, offset);
    for (int j = 0; j < P; ++j) {
      for (int32_t e = seg[s + j].begin + common; e < seg[s + j].end; ++e)
        splat_add_vec<C, kScaled>(acc[j], a, e, values, scale, offset);
      for (int c = 0; c < C; ++c) store8(out + seg[s + j].point * S + offset + 8 * c, acc[j][c]);
    }
  }
  for (; s < count; ++s) {
    vec8 acc[C];
    splat_start_vec<C>(acc, a, seg[s], out, offset);
    for (int32_t e = seg[s].begin; e < seg[s].end; ++e) splat_add_vec<C, kScaled>(acc, a, e, values, scale, offset);
    for (int c = 0; c < C; ++c) store8(out + seg[s].point * S + offset + 8 * c, acc[c]);
  }
}

template <bool kScaled>
DLF_INLINE void splat_segments_float(const SplatArgs& a, const Segment* seg, int64_t count, const float* values,
                                     const float* scale, float* out) {
  const int64_t S = a.stride;
  switch (S) {
    case 1: return splat_small<Row1, 4, kScaled>(a, seg, count, values, scale, out, 0);
    case 2: return splat_small<Row2, 4, kScaled>(a, seg, count, values, scale, out, 0);
    case 4: return splat_small<Row4, 4, kScaled>(a, seg, count, values, scale, out, 0);
    case 8: return splat_vec<1, 4, kScaled>(a, seg, count, values, scale, out, 0);
    case 16: return splat_vec<2, 2, kScaled>(a, seg, count, values, scale, out, 0);
    case 24: return splat_vec<3, 2, kScaled>(a, seg, count, values, scale, out, 0);
    case 32: return splat_vec<4, 1, kScaled>(a, seg, count, values, scale, out, 0);
    case 40: return splat_vec<5, 1, kScaled>(a, seg, count, values, scale, out, 0);
    case 48: return splat_vec<6, 1, kScaled>(a, seg, count, values, scale, out, 0);
    case 56: return splat_vec<7, 1, kScaled>(a, seg, count, values, scale, out, 0);
    default: break;
  }
  if (S % 8 == 0) {  // 64 labels (8 vectors) at a time, then the rest
    int64_t k = 0;
    for (; k + 64 <= S; k += 64) splat_vec<8, 1, kScaled>(a, seg, count, values, scale, out, k);
    switch ((S - k) / 8) {
      case 1: splat_vec<1, 4, kScaled>(a, seg, count, values, scale, out, k); break;
      case 2: splat_vec<2, 2, kScaled>(a, seg, count, values, scale, out, k); break;
      case 3: splat_vec<3, 2, kScaled>(a, seg, count, values, scale, out, k); break;
      case 4: splat_vec<4, 1, kScaled>(a, seg, count, values, scale, out, k); break;
      case 5: splat_vec<5, 1, kScaled>(a, seg, count, values, scale, out, k); break;
      case 6: splat_vec<6, 1, kScaled>(a, seg, count, values, scale, out, k); break;
      case 7: splat_vec<7, 1, kScaled>(a, seg, count, values, scale, out, k); break;
      default: break;
    }
    return;
  }
  for (int64_t k = 0; k < S; ++k) splat_small<Row1, 4, kScaled>(a, seg, count, values, scale, out, k);
}

template <simd::Level>
DLF_INLINE void splat_segments_impl(const SplatArgs& a, const Segment* seg, int64_t count, const float* values,
                                    const float* scale, float* out) {
  if (scale != nullptr) {
    splat_segments_float<true>(a, seg, count, values, scale, out);
  } else {
    splat_segments_float<false>(a, seg, count, values, scale, out);
  }
}

DLF_DISPATCH(void, splat_segments,
             (const SplatArgs& a, const Segment* seg, int64_t count, const float* values, const float* scale,
              float* out),
             (a, seg, count, values, scale, out))

void splat_segments(const SplatArgs& a, const Segment* seg, int64_t count, const double* values,
                    const double* scale, double* out) {
  const int64_t S = a.stride;
  for (int64_t s = 0; s < count; ++s) {
    double* acc = out + seg[s].point * S;
    if (seg[s].begin == a.begin[seg[s].point])
      for (int64_t k = 0; k < S; ++k) acc[k] = 0.0;
    for (int32_t e = seg[s].begin; e < seg[s].end; ++e) {
      const int64_t i = a.pixel[e];
      const double w = a.weight[e], sc = scale == nullptr ? 1.0 : scale[i];
      const double* v = values + i * S;
      if (scale == nullptr) {
        for (int64_t k = 0; k < S; ++k) acc[k] += w * v[k];
      } else {
        for (int64_t k = 0; k < S; ++k) acc[k] += w * (v[k] * sc);
      }
    }
  }
}


// ---- splat as a scatter: each thread owns a range of points of each lattice and adds its pixels' values in
// ---- pixel order, into every lattice in one pass over the pixels ----

struct ScatterTerm {
  const int32_t* vertex;  // the lattice's blocked arrays
  const float* weight;
  int dp1;
  const float* scale;  // [N] or nullptr
  float* out;          // [M, S]
  int64_t p0, p1;      // the points this thread owns
  bool prefetch;       // the lattice's values do not fit in the cache: prefetch the rows of pixels ahead
};

// Pixels ahead whose lattice rows the scatter and the slice prefetch, for lattices larger than the cache.
constexpr int64_t kPixelsAhead = 4;
constexpr int64_t kPrefetchBytes = int64_t{4} << 20;

DLF_INLINE void prefetch_rows(const int32_t* vertex, int dp1, int64_t i, const float* values, int64_t S,
                              int64_t offset, int64_t bytes) {
  const int64_t o = (i / kBlock) * dp1 * kBlock + i % kBlock;
  for (int r = 0; r < dp1; ++r) {
    const char* row = reinterpret_cast<const char*>(values + static_cast<int64_t>(vertex[o + r * kBlock]) * S + offset);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 1, 3);
  }
}

// Pixel i's value x into its vertices' rows of term t (those in t's range). DP1: t's d + 1 when it is one of the
// unrolled dimensions (d = 2 to 5: DenseCRF2D's Gaussian and bilateral, the volumes' Gaussian and 3-D position +
// intensity), 0 for any other.
template <typename R, int DP1>
DLF_INLINE void scatter_pixel_small(const ScatterTerm& t, int64_t i, typename R::V x, int64_t S, int64_t offset) {
  const int dp1 = DP1 > 0 ? DP1 : t.dp1;
  const typename R::V xs = t.scale != nullptr ? x * t.scale[i] : x;
  const int64_t o = (i / kBlock) * dp1 * kBlock + i % kBlock;
  for (int r = 0; r < dp1; ++r) {
    const int64_t p = t.vertex[o + r * kBlock];
    if (p < t.p0 || p >= t.p1) continue;
    float* acc = t.out + p * S + offset;
    R::store(acc, R::load(acc) + t.weight[o + r * kBlock] * xs);
  }
}

template <typename R>
DLF_INLINE void scatter_small(const ScatterTerm* terms, int count, const float* values, int64_t S, int64_t i0,
                              int64_t i1, int64_t offset) {
  using V = typename R::V;
  for (int64_t i = i0; i < i1; ++i) {
    const V x = R::load(values + i * S + offset);
    for (int k = 0; k < count; ++k) {
      const ScatterTerm& t = terms[k];
      if (t.prefetch && i + kPixelsAhead < i1)
        prefetch_rows(t.vertex, t.dp1, i + kPixelsAhead, t.out, S, offset, 4 * S);
      switch (t.dp1) {
        case 3: scatter_pixel_small<R, 3>(t, i, x, S, offset); break;
        case 4: scatter_pixel_small<R, 4>(t, i, x, S, offset); break;
        case 5: scatter_pixel_small<R, 5>(t, i, x, S, offset); break;
        case 6: scatter_pixel_small<R, 6>(t, i, x, S, offset); break;
        default: scatter_pixel_small<R, 0>(t, i, x, S, offset); break;
      }
    }
  }
}

// As scatter_pixel_small, for C chunks of 8 labels.
template <int C, int DP1>
DLF_INLINE void scatter_pixel_vec(const ScatterTerm& t, int64_t i, const vec8* x, int64_t S, int64_t offset) {
  const int dp1 = DP1 > 0 ? DP1 : t.dp1;
  vec8 xs[C];
  if (t.scale != nullptr) {
    const float sc = t.scale[i];
    for (int c = 0; c < C; ++c) xs[c] = x[c] * sc;
  } else {
    for (int c = 0; c < C; ++c) xs[c] = x[c];
  }
  const int64_t o = (i / kBlock) * dp1 * kBlock + i % kBlock;
  for (int r = 0; r < dp1; ++r) {
    const int64_t p = t.vertex[o + r * kBlock];
    if (p < t.p0 || p >= t.p1) continue;
    const float w = t.weight[o + r * kBlock];
    float* acc = t.out + p * S + offset;
    for (int c = 0; c < C; ++c) store8(acc + 8 * c, load8(acc + 8 * c) + w * xs[c]);
  }
}

template <int C>
DLF_INLINE void scatter_vec(const ScatterTerm* terms, int count, const float* values, int64_t S, int64_t i0,
                            int64_t i1, int64_t offset) {
  for (int64_t i = i0; i < i1; ++i) {
    vec8 x[C];
    for (int c = 0; c < C; ++c) x[c] = load8(values + i * S + offset + 8 * c);
    for (int k = 0; k < count; ++k) {
      const ScatterTerm& t = terms[k];
      if (t.prefetch && i + kPixelsAhead < i1)
        prefetch_rows(t.vertex, t.dp1, i + kPixelsAhead, t.out, S, offset, 32 * C);
      switch (t.dp1) {
        case 3: scatter_pixel_vec<C, 3>(t, i, x, S, offset); break;
        case 4: scatter_pixel_vec<C, 4>(t, i, x, S, offset); break;
        case 5: scatter_pixel_vec<C, 5>(t, i, x, S, offset); break;
        case 6: scatter_pixel_vec<C, 6>(t, i, x, S, offset); break;
        default: scatter_pixel_vec<C, 0>(t, i, x, S, offset); break;
      }
    }
  }
}

template <simd::Level>
DLF_INLINE void scatter_range_impl(const ScatterTerm* terms, int count, const float* values, int64_t S, int64_t i0,
                                   int64_t i1) {
  for (int k = 0; k < count; ++k)
    for (int64_t p = terms[k].p0; p < terms[k].p1; ++p)
      for (int64_t j = 0; j < S; ++j) terms[k].out[p * S + j] = 0.0f;
#define DLF_ARGS terms, count, values, S, i0, i1
  switch (S) {
    case 1: return scatter_small<Row1>(DLF_ARGS, 0);
    case 2: return scatter_small<Row2>(DLF_ARGS, 0);
    case 4: return scatter_small<Row4>(DLF_ARGS, 0);
    default: break;
  }
  if (S % 8 == 0) {
    int64_t k = 0;
    for (; k + 64 <= S; k += 64) scatter_vec<8>(DLF_ARGS, k);
    switch ((S - k) / 8) {
      case 1: scatter_vec<1>(DLF_ARGS, k); break;
      case 2: scatter_vec<2>(DLF_ARGS, k); break;
      case 3: scatter_vec<3>(DLF_ARGS, k); break;
      case 4: scatter_vec<4>(DLF_ARGS, k); break;
      case 5: scatter_vec<5>(DLF_ARGS, k); break;
      case 6: scatter_vec<6>(DLF_ARGS, k); break;
      case 7: scatter_vec<7>(DLF_ARGS, k); break;
      default: break;
    }
    return;
  }
  for (int64_t k = 0; k < S; ++k) scatter_small<Row1>(DLF_ARGS, k);
#undef DLF_ARGS
}

DLF_DISPATCH(void, scatter_range,
             (const ScatterTerm* terms, int count, const float* values, int64_t S, int64_t i0, int64_t i1),
             (terms, count, values, S, i0, i1))

struct ScatterTermDouble {
  const int32_t* vertex;
  const float* weight;
  int dp1;
  const double* scale;
  double* out;
  int64_t p0, p1;
  bool prefetch;  // unused
};

void scatter_range(const ScatterTermDouble* terms, int count, const double* values, int64_t S, int64_t i0,
                   int64_t i1) {
  for (int k = 0; k < count; ++k) {
    const ScatterTermDouble& t = terms[k];
    for (int64_t p = t.p0; p < t.p1; ++p)
      for (int64_t j = 0; j < S; ++j) t.out[p * S + j] = 0.0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t o = (i / kBlock) * t.dp1 * kBlock + i % kBlock;
      const double sc = t.scale == nullptr ? 1.0 : t.scale[i];
      for (int r = 0; r < t.dp1; ++r) {
        const int64_t p = t.vertex[o + r * kBlock];
        if (p < t.p0 || p >= t.p1) continue;
        const double w = t.weight[o + r * kBlock];
        for (int64_t j = 0; j < S; ++j)
          t.out[p * S + j] += t.scale == nullptr ? w * values[i * S + j] : w * (values[i * S + j] * sc);
      }
    }
  }
}

template <typename T>
using ScatterTermOf = typename std::conditional<std::is_same<T, float>::value, ScatterTerm, ScatterTermDouble>::type;

// ---- blur ----
//
// Blurs chains [c0, c1) in place: v[p_t] = v[p_t] + (v[p_t+1] + v[p_t-1]) / 2 with the old values of the
// neighbours (missing ends count as zero), keeping the previous point's old value in registers: pydensecrf's
// new_val = old_val + 0.5 * (n1_val + n2_val), lane by lane.

// Rows further along the chains are prefetched (kBlurAhead points ahead, across chain ends): the walk visits the
// lattice in no memory order, and large lattices do not fit in the cache.
constexpr int64_t kBlurAhead = 8;

DLF_INLINE void prefetch_row(const float* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(row) + b, 1, 3);
}

template <typename R>
DLF_INLINE void blur_small(const int32_t* points, int64_t length, const int32_t* ahead_end, float* v, int64_t S,
                           int64_t offset) {
  using V = typename R::V;
  V prev = R::zero();
  V cur = R::load(v + static_cast<int64_t>(points[0]) * S + offset);
  for (int64_t t = 0; t < length; ++t) {
    if (points + t + kBlurAhead < ahead_end)
      prefetch_row(v + static_cast<int64_t>(points[t + kBlurAhead]) * S + offset, 4 * S);
    const V next = t + 1 < length ? R::load(v + static_cast<int64_t>(points[t + 1]) * S + offset) : R::zero();
    R::store(v + static_cast<int64_t>(points[t]) * S + offset, cur + 0.5f * (next + prev));
    prev = cur;
    cur = next;
  }
}

template <int C>
DLF_INLINE void blur_vec(const int32_t* points, int64_t length, const int32_t* ahead_end, float* v, int64_t S,
                         int64_t offset) {
  vec8 prev[C], cur[C];
  for (int c = 0; c < C; ++c) {
    prev[c] = splat8(0.0f);
    cur[c] = load8(v + static_cast<int64_t>(points[0]) * S + offset + 8 * c);
  }
  for (int64_t t = 0; t < length; ++t) {
    if (points + t + kBlurAhead < ahead_end)
      prefetch_row(v + static_cast<int64_t>(points[t + kBlurAhead]) * S + offset, 32 * C);
    float* __restrict self = v + static_cast<int64_t>(points[t]) * S + offset;
    const float* __restrict succ = t + 1 < length ? v + static_cast<int64_t>(points[t + 1]) * S + offset : nullptr;
    for (int c = 0; c < C; ++c) {
      const vec8 next = succ ? load8(succ + 8 * c) : splat8(0.0f);
      store8(self + 8 * c, cur[c] + 0.5f * (next + prev[c]));
      prev[c] = cur[c];
      cur[c] = next;
    }
  }
}

DLF_INLINE void blur_chain_float(const int32_t* chain, int64_t length, const int32_t* ahead_end, float* v,
                                 int64_t S) {
  switch (S) {
    case 1: return blur_small<Row1>(chain, length, ahead_end, v, S, 0);
    case 2: return blur_small<Row2>(chain, length, ahead_end, v, S, 0);
    case 4: return blur_small<Row4>(chain, length, ahead_end, v, S, 0);
    default: break;
  }
  if (S % 8 == 0) {
    int64_t k = 0;
    for (; k + 64 <= S; k += 64) blur_vec<8>(chain, length, ahead_end, v, S, k);
    switch ((S - k) / 8) {
      case 1: blur_vec<1>(chain, length, ahead_end, v, S, k); break;
      case 2: blur_vec<2>(chain, length, ahead_end, v, S, k); break;
      case 3: blur_vec<3>(chain, length, ahead_end, v, S, k); break;
      case 4: blur_vec<4>(chain, length, ahead_end, v, S, k); break;
      case 5: blur_vec<5>(chain, length, ahead_end, v, S, k); break;
      case 6: blur_vec<6>(chain, length, ahead_end, v, S, k); break;
      case 7: blur_vec<7>(chain, length, ahead_end, v, S, k); break;
      default: break;
    }
    return;
  }
  for (int64_t k = 0; k < S; ++k) blur_small<Row1>(chain, length, ahead_end, v, S, k);
}

template <simd::Level>
DLF_INLINE void blur_chains_impl(const int64_t* chain_begin, const int32_t* points, float* v, int64_t stride,
                                 int64_t c0, int64_t c1) {
  const int32_t* ahead_end = points + chain_begin[c1];
  for (int64_t c = c0; c < c1; ++c)
    blur_chain_float(points + chain_begin[c], chain_begin[c + 1] - chain_begin[c], ahead_end, v, stride);
}

DLF_DISPATCH(void, blur_chains,
             (const int64_t* chain_begin, const int32_t* points, float* v, int64_t stride, int64_t c0, int64_t c1),
             (chain_begin, points, v, stride, c0, c1))

void blur_chains(const int64_t* chain_begin, const int32_t* points, double* v, int64_t stride, int64_t c0,
                 int64_t c1) {
  std::vector<double> scratch(static_cast<size_t>(2 * stride));
  for (int64_t c = c0; c < c1; ++c) {
    const int32_t* chain = points + chain_begin[c];
    const int64_t length = chain_begin[c + 1] - chain_begin[c];
    double* prev = scratch.data();
    double* old = prev + stride;
    for (int64_t k = 0; k < stride; ++k) prev[k] = 0.0;
    for (int64_t t = 0; t < length; ++t) {
      double* self = v + static_cast<int64_t>(chain[t]) * stride;
      const double* succ = t + 1 < length ? v + static_cast<int64_t>(chain[t + 1]) * stride : nullptr;
      for (int64_t k = 0; k < stride; ++k) {
        old[k] = self[k];
        self[k] = old[k] + 0.5 * ((succ ? succ[k] : 0.0) + prev[k]);
      }
      std::swap(prev, old);
    }
  }
}

}  // namespace

PermutohedralLattice::PermutohedralLattice(const float* features, int d, int64_t num_pixels, int64_t stride)
    : d_(d), n_(num_pixels), alpha_(lattice::slice_alpha(d)) {
  // The splat is a gather for more than 64 values per pixel (see splat_blur), in bands of about 256 KiB of
  // splatted values (a cache-friendly slice of the input), in whole pixel blocks.
  gather_ = stride > 64;
  band_pixels_ = std::max<int64_t>(kBlock, (65536 / std::max<int64_t>(1, stride)) / kBlock * kBlock);
  TORCH_CHECK(d >= 1 && d <= lattice::kMaxDim, "dense_crf: feature dimension must be in [1, ",
              lattice::kMaxDim, "], got ", d);
  const int64_t dp1 = d + 1;
  TORCH_CHECK((num_pixels + kBlock) * dp1 < std::numeric_limits<int32_t>::max(),
              "dense_crf: too many pixels for one lattice: N * (d + 1) = ", num_pixels * dp1,
              " must stay below 2^31");

  float scale[lattice::kMaxDim];
  for (int i = 0; i < d; ++i) scale[i] = lattice::elevation_scale(i, d);

  // The origin is embedded too (see build()), so the bound covers its simplex.
  const int bits = packed_key_bits(features, d, n_, scale);
  if (bits > 0) {
    build([&](int64_t expected) { return PackedKeyTable(d, expected, bits); }, features, scale, bits);
  } else {
    build([&](int64_t expected) { return KeyTable(d, expected); }, features, scale, 0);
  }
  if (profiling_enabled()) {
    std::fprintf(stderr, "[deeplab_fast] lattice d=%d N=%lld M=%lld (%s keys, %s); points in blur chains per axis:",
                 d, static_cast<long long>(n_), static_cast<long long>(m_), bits > 0 ? "packed" : "generic",
                 simd::level_name(simd::active()));
    for (int j = 0; j <= d; ++j)
      std::fprintf(stderr, " %lld/%lld", static_cast<long long>(chain_points_[j].size()),
                   static_cast<long long>(chain_begin_[j].size() - 1));
    std::fprintf(stderr, "\n");
  }
}

template <typename MakeTable>
void PermutohedralLattice::build(MakeTable make_table, const float* features, const float* scale, int key_bits) {
  const int d = d_;
  const int64_t dp1 = d + 1;
  const int64_t blocks = (n_ + kBlock - 1) / kBlock;
  // 1-2. Embed the pixels and number the lattice points in order of first appearance. Each thread takes a
  //      contiguous range of pixels (whole blocks), embeds it a cache-sized block at a time and numbers its points
  //      in a table of its own. The tables are then merged in range order: range 0's numbering is kept, and each
  //      later range adds only the points it sees first. The result is the global first-appearance numbering,
  //      whatever the number of ranges.
  vertex_.reset(static_cast<size_t>(blocks * dp1 * kBlock));
  weight_.reset(static_cast<size_t>(blocks * dp1 * kBlock));
  if (n_ % kBlock != 0) {  // the padding pixels of the last block: vertex 0, weight 0 (never splatted)
    const int64_t b = blocks - 1;
    for (int64_t r = 0; r < dp1; ++r)
      for (int64_t lane = n_ % kBlock; lane < kBlock; ++lane) {
        vertex_[(b * dp1 + r) * kBlock + lane] = 0;
        weight_[(b * dp1 + r) * kBlock + lane] = 0.0f;
      }
  }
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(parallel::num_threads(), n_ / 16384));
  using Table = decltype(make_table(int64_t{0}));
  using Key = typename Table::Key;
  struct Local {
    Table table;
    std::vector<int32_t> count;        // per local point: how many of the range's pixels have it as a vertex
    std::vector<int32_t> first, last;  // per local point: the first and last such pixel
    bool ok = true;
  };
  std::vector<Local> locals;
  locals.reserve(static_cast<size_t>(ranges));
  for (int64_t t = 0; t < ranges; ++t) locals.push_back(Local{make_table(initial_points(n_ / ranges)), {}, {}, {}});
  auto range_begin = [&](int64_t t) { return std::min(n_, blocks * t / ranges * kBlock); };
  {
    StageTimer timer("lattice: embed + hash");
    parallel::for_range(0, ranges, 1, [&](int64_t t0, int64_t t1) {
      constexpr int64_t kChunk = 4096;  // pixels, a multiple of kBlock
      const int width = locals[t0].table.key_width();
      std::vector<Key> keys(static_cast<size_t>(kChunk * dp1 * width));
      std::vector<int32_t> ids(static_cast<size_t>(kChunk * dp1));
      KeyOut out{key_bits, nullptr, nullptr};
      if constexpr (std::is_same<Key, uint64_t>::value) {
        out.packed = keys.data();
      } else {
        out.plain = keys.data();
      }
      for (int64_t t = t0; t < t1; ++t) {
        Local& local = locals[t];
        const int64_t r0 = range_begin(t), r1 = range_begin(t + 1);
        for (int64_t b0 = r0; b0 < r1; b0 += kChunk) {
          const int64_t b1 = std::min(r1, b0 + kChunk);
          local.ok &= embed_pixels(features, d, n_, scale, out, weight_.data(), b0, b1);
          insert_keys(local.table, keys.data(), (b1 - b0) * dp1, ids.data(), static_cast<int>(dp1));
          int32_t points = static_cast<int32_t>(local.count.size());
          const int32_t* id = ids.data();
          for (int64_t i = b0; i < b1; ++i) {
            int32_t* vb = vertex_.data() + (i / kBlock) * dp1 * kBlock + i % kBlock;
            for (int64_t r = 0; r < dp1; ++r, ++id) {
              const int32_t v = *id;
              if (v == points) {  // a new point
                local.count.push_back(0);
                local.first.push_back(static_cast<int32_t>(i));
                local.last.push_back(0);
                ++points;
              }
              int32_t* count = local.count.data();
              int32_t* last = local.last.data();
              ++count[v];
              last[v] = static_cast<int32_t>(i);
              vb[r * kBlock] = v;
            }
          }
        }
      }
    });
    for (const Local& local : locals)
      TORCH_CHECK(local.ok, input_error(kFeaturesOversize));
  }
  Table table = std::move(locals[0].table);
  std::vector<int32_t> entries = std::move(locals[0].count);  // per point: its number of contributions
  first_pixel_ = std::move(locals[0].first);
  last_pixel_ = std::move(locals[0].last);
  // Per range, its contributions per (global) point; range 0's are `entries` before the merge adds the others.
  std::vector<std::vector<int32_t>> range_count(static_cast<size_t>(ranges));
  {
    StageTimer timer("lattice: merge");
    if (ranges > 1) range_count[0] = entries;
    std::vector<std::vector<int32_t>> to_global(static_cast<size_t>(ranges));
    for (int64_t t = 1; t < ranges; ++t) {
      // Range t's points that are already numbered keep their id; the others get the next ids in range t's
      // order of first appearance. Lookups, then inserts (of keys known to be new and distinct), run in
      // parallel; the numbering is fixed before any insert.
      const Local& local = locals[t];
      const int64_t count = static_cast<int64_t>(local.count.size());
      std::vector<int32_t>& map = to_global[t];
      map.resize(static_cast<size_t>(count));
      parallel::for_range(0, count, kPointGrain,
                       [&](int64_t v0, int64_t v1) { table.find_many(local.table, v0, v1, map.data() + v0); });
      int64_t next_id = table.size();
      for (int64_t v = 0; v < count; ++v)
        if (map[v] < 0) map[v] = static_cast<int32_t>(-2 - next_id++);  // new: remember its id, negated
      table.reserve(next_id);
      entries.resize(static_cast<size_t>(next_id), 0);
      first_pixel_.resize(static_cast<size_t>(next_id));
      last_pixel_.resize(static_cast<size_t>(next_id));
      parallel::for_range(0, count, kPointGrain, [&](int64_t v0, int64_t v1) {
        for (int64_t v = v0; v < v1; ++v) {
          int32_t g = map[v];
          if (g < -1) {
            g = -2 - g;
            table.insert_new(local.table, v, g);
            first_pixel_[g] = local.first[v];
            map[v] = g;
          }
          last_pixel_[g] = local.last[v];  // later ranges hold later pixels
          entries[g] += local.count[v];
        }
      });
      range_count[t].assign(static_cast<size_t>(next_id), 0);
      for (int64_t v = 0; v < count; ++v) range_count[t][map[v]] = local.count[v];
    }
    // Whole blocks: a range ends at a block boundary, or at N, whose partial last block holds the entries of its
    // pixels (and of its padding lanes, vertex 0 with weight 0) up to the block's end.
    parallel::for_range(1, ranges, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t e1 = (range_begin(t + 1) + kBlock - 1) / kBlock * kBlock * dp1;
        for (int64_t e = range_begin(t) * dp1; e < e1; ++e) vertex_[e] = to_global[t][vertex_[e]];
      }
    });
    locals.clear();

    // Reference compatibility: pydensecrf's SSE lattice builder embeds pixels four at a time, and when N is
    // not a multiple of 4 the zero-feature padding lanes also insert their simplex's vertices. Those points
    // receive no splat but do pass values along during the blur, so we add them too (they change results
    // only for pixels whose features lie near the origin).
    if (n_ % 4 != 0) {
      const std::vector<float> origin(static_cast<size_t>(d), 0.0f);
      std::vector<int32_t> keys(static_cast<size_t>(dp1 * d));
      std::vector<float> unused(static_cast<size_t>(dp1));
      lattice::embed_point<0>(origin.data(), d, scale, keys.data(), unused.data());
      for (int64_t r = 0; r < dp1; ++r)
        if (table.insert(keys.data() + r * d) == static_cast<int32_t>(entries.size())) {
          entries.push_back(0);
          first_pixel_.push_back(static_cast<int32_t>(n_));  // no pixel splats onto it
          last_pixel_.push_back(-1);
        }
    }
    m_ = table.size();
    entries_ = entries;
  }

  // The slice's weights, w * alpha.
  weight_alpha_.reset(weight_.size());
  parallel::for_range(0, static_cast<int64_t>(weight_.size()), 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) weight_alpha_[e] = weight_[e] * alpha_;
  });

  // 3. For the gather splat: each point's contributions in pixel order (a counting sort of the (pixel, vertex)
  //    entries by point). Each range fills its own pixels' entries, after those of the ranges before it.
  if (gather_) {
    StageTimer timer("lattice: splat lists");
    point_begin_.assign(static_cast<size_t>(m_ + 1), 0);
    for (int64_t p = 0; p < m_; ++p) point_begin_[p + 1] = point_begin_[p] + entries[p];
    contrib_pixel_.reset(static_cast<size_t>(n_ * dp1));
    contrib_weight_.reset(static_cast<size_t>(n_ * dp1));
    std::vector<std::vector<int32_t>> cursor(static_cast<size_t>(ranges));
    cursor[0].assign(point_begin_.begin(), point_begin_.end() - 1);
    for (int64_t t = 1; t < ranges; ++t) {
      cursor[t] = cursor[t - 1];
      const std::vector<int32_t>& before = range_count[t - 1];
      for (size_t p = 0; p < before.size(); ++p) cursor[t][p] += before[p];
    }
    parallel::for_range(0, ranges, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int32_t* next = cursor[t].data();
        int32_t* pixel = contrib_pixel_.data();
        float* weight = contrib_weight_.data();
        for (int64_t i = range_begin(t); i < range_begin(t + 1); ++i) {
          const int32_t* vb = vertex_.data() + (i / kBlock) * dp1 * kBlock + i % kBlock;
          const float* wb = weight_.data() + (i / kBlock) * dp1 * kBlock + i % kBlock;
          for (int64_t r = 0; r < dp1; ++r) {
            const int32_t pos = next[vb[r * kBlock]]++;
            pixel[pos] = static_cast<int32_t>(i);
            weight[pos] = wb[r * kBlock];
          }
        }
      }
    });
  }

  // 3b. The gather's work: per group of points (one per thread, about equal numbers of contributions), band by
  //     band of pixels, one segment per point with contributions in the band (see splat_segments).
  if (gather_) {
    StageTimer timer("lattice: splat segments");
    const int64_t bands = num_bands();
    const int64_t total = n_ * dp1;
    groups_ = std::max<int64_t>(1, std::min<int64_t>(parallel::num_threads(), m_ / 64));
    std::vector<int64_t> group_point(static_cast<size_t>(groups_ + 1), m_);
    group_point[0] = 0;
    for (int64_t p = 0, g = 1; p < m_ && g < groups_; ++p)
      if (static_cast<int64_t>(point_begin_[p + 1]) * groups_ >= g * total) group_point[g++] = p + 1;
    empty_points_.clear();
    for (int64_t p = 0; p < m_; ++p)
      if (point_begin_[p] == point_begin_[p + 1]) empty_points_.push_back(static_cast<int32_t>(p));
    group_band_begin_.assign(static_cast<size_t>(groups_ * (bands + 1)), 0);
    const int32_t* pixel = contrib_pixel_.data();
    auto for_segments = [&](int64_t g, auto&& fn) {  // fn(point, begin, end, band) in point order
      for (int64_t p = group_point[g]; p < group_point[g + 1]; ++p) {
        int32_t e = point_begin_[p];
        while (e < point_begin_[p + 1]) {
          const int64_t band = pixel[e] / band_pixels_;
          const int32_t band_end = static_cast<int32_t>(std::min<int64_t>(n_, (band + 1) * band_pixels_));
          int32_t f = e + 1;
          while (f < point_begin_[p + 1] && pixel[f] < band_end) ++f;
          fn(static_cast<int32_t>(p), e, f, band);
          e = f;
        }
      }
    };
    parallel::for_each(groups_, [&](int64_t g) {
      int64_t* count = group_band_begin_.data() + g * (bands + 1);
      for_segments(g, [&](int32_t, int32_t, int32_t, int64_t band) { ++count[band + 1]; });
      for (int64_t b = 0; b < bands; ++b) count[b + 1] += count[b];
    });
    int64_t base = 0;
    for (int64_t g = 0; g < groups_; ++g) {
      int64_t* begin = group_band_begin_.data() + g * (bands + 1);
      const int64_t size = begin[bands];
      for (int64_t b = 0; b <= bands; ++b) begin[b] += base;
      base += size;
    }
    segments_.resize(static_cast<size_t>(base));
    parallel::for_each(groups_, [&](int64_t g) {
      std::vector<int64_t> next(group_band_begin_.begin() + g * (bands + 1),
                                group_band_begin_.begin() + (g + 1) * (bands + 1));
      for_segments(g, [&](int32_t p, int32_t e, int32_t f, int64_t band) { segments_[next[band]++] = Segment{p, e, f}; });
    });
  }

  // 4. Blur chains: along each of the d+1 lattice axes the points form chains (p, n1(p), n1(n1(p)), ...),
  //    with n1 = key + (d+1) e_j - 1 and its inverse n2. The blur is done in place chain by chain; points
  //    alone on their chain are left out (their blurred value is their own).
  {
    StageTimer timer("lattice: blur chains");
    chain_begin_.assign(static_cast<size_t>(dp1), {});
    chain_points_.assign(static_cast<size_t>(dp1), {});
    std::vector<int32_t> next(static_cast<size_t>(m_));
    std::vector<uint8_t> has_prev(static_cast<size_t>(m_));
    for (int j = 0; j <= d; ++j) {
      // One lookup per point: its successor n1. A point with a successor and no predecessor starts a chain.
      parallel::for_range(0, m_, kPointGrain, [&](int64_t begin, int64_t end) {
        table.successors(begin, end, j, next.data() + begin);
      });
      // Mark the points that have a predecessor (concurrent stores of the same byte value, done atomically),
      // then collect the chain starts in increasing order: counted per block, then written per block.
      std::fill(has_prev.begin(), has_prev.end(), 0);
      parallel::for_range(0, m_, kPointGrain, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p)
          if (next[p] >= 0) __atomic_store_n(&has_prev[next[p]], static_cast<uint8_t>(1), __ATOMIC_RELAXED);
      });
      const int64_t point_blocks = (m_ + kPointGrain - 1) / kPointGrain;
      std::vector<int64_t> block_starts(static_cast<size_t>(point_blocks + 1), 0);
      auto is_start = [&](int64_t p) { return next[p] >= 0 && !has_prev[p]; };
      parallel::for_range(0, point_blocks, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          int64_t count = 0;
          for (int64_t p = k * kPointGrain; p < std::min(m_, (k + 1) * kPointGrain); ++p) count += is_start(p);
          block_starts[k + 1] = count;
        }
      });
      for (int64_t k = 0; k < point_blocks; ++k) block_starts[k + 1] += block_starts[k];
      std::vector<int32_t> starts(static_cast<size_t>(block_starts[point_blocks]));
      parallel::for_range(0, point_blocks, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          int64_t slot = block_starts[k];
          for (int64_t p = k * kPointGrain; p < std::min(m_, (k + 1) * kPointGrain); ++p)
            if (is_start(p)) starts[slot++] = static_cast<int32_t>(p);
        }
      });
      std::vector<int64_t>& begin_j = chain_begin_[j];
      begin_j.assign(starts.size() + 1, 0);
      parallel::for_range(0, static_cast<int64_t>(starts.size()), kPointGrain, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          int64_t length = 0;
          for (int32_t p = starts[c]; p >= 0; p = next[p]) ++length;
          begin_j[c + 1] = length;
        }
      });
      for (size_t c = 0; c < starts.size(); ++c) begin_j[c + 1] += begin_j[c];
      std::vector<int32_t>& points_j = chain_points_[j];
      points_j.resize(static_cast<size_t>(begin_j.back()));
      parallel::for_range(0, static_cast<int64_t>(starts.size()), kPointGrain, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          int64_t slot = begin_j[c];
          for (int32_t p = starts[c]; p >= 0; p = next[p]) points_j[slot++] = p;
        }
      });
    }
  }
}

// Splits the points into ranges with about equal numbers of entries, one per thread; each thread owns a range
// and scans only the pixels that touch it (points are numbered by first appearance, so a range of points is a
// band of pixels). Computed once per thread count.
const std::vector<PermutohedralLattice::SplatPart>& PermutohedralLattice::splat_parts(int64_t threads) const {
  const int64_t count = std::max<int64_t>(1, std::min<int64_t>(threads, m_ / 64));
  std::lock_guard<std::mutex> lock(splat_parts_mutex_);
  if (static_cast<int64_t>(splat_parts_.size()) == count) return splat_parts_;
  std::vector<int64_t> bounds(static_cast<size_t>(count + 1), m_);
  bounds[0] = 0;
  const int64_t total = n_ * (d_ + 1);
  int64_t seen = 0, part = 1;
  for (int64_t p = 0; p < m_ && part < count; ++p) {
    seen += entries_[p];
    if (seen * count >= part * total) bounds[part++] = p + 1;
  }
  splat_parts_.assign(static_cast<size_t>(count), SplatPart{});
  for (int64_t k = 0; k < count; ++k) {
    SplatPart& sp = splat_parts_[k];
    sp.p0 = bounds[k];
    sp.p1 = bounds[k + 1];
    sp.i0 = n_;
    sp.i1 = 0;
    for (int64_t p = sp.p0; p < sp.p1; ++p) {
      sp.i0 = std::min<int64_t>(sp.i0, first_pixel_[p]);
      sp.i1 = std::max<int64_t>(sp.i1, last_pixel_[p] + 1);
    }
    sp.i1 = std::max(sp.i0, sp.i1);
  }
  return splat_parts_;
}

template <typename T>
void PermutohedralLattice::prefetch_band(const T* values, const T* scale, int64_t stride, int64_t band) const {
  const int64_t i0 = band * band_pixels_, i1 = std::min(n_, i0 + band_pixels_);
  const char* v0 = reinterpret_cast<const char*>(values + i0 * stride);
  const char* v1 = reinterpret_cast<const char*>(values + i1 * stride);
  for (const char* p = v0; p < v1; p += 64) __builtin_prefetch(p, 0, 2);
  if (scale != nullptr)
    for (const char* p = reinterpret_cast<const char*>(scale + i0); p < reinterpret_cast<const char*>(scale + i1);
         p += 64)
      __builtin_prefetch(p, 0, 2);
}

template <typename T>
T* PermutohedralLattice::splat_blur(const T* values, const T* scale, int64_t stride, T* out, bool transpose) const {
  const PermutohedralLattice* self = this;
  splat_blur_many(&self, 1, values, &scale, stride, &out, transpose);
  return out;
}

template <typename T>
void PermutohedralLattice::splat_blur_many(const PermutohedralLattice* const* lattices, size_t count, const T* values,
                                           const T* const* scales, int64_t stride, T* const* outs, bool transpose) {
  {
    StageTimer timer("splat");
    // Up to 64 values per pixel, a scatter, all the lattices in one pass over the pixels: it reads the input once,
    // in order, and the read-modify-writes of a point's row mostly hit the cache (the lattices' chains of additions
    // to the same point run side by side). Above that, a gather per lattice, band by band: the rows it writes (a
    // whole label vector of each point) would not stay in cache for a scatter.
    const int64_t threads = parallel::num_threads();
    std::vector<const PermutohedralLattice*> scattered;
    std::vector<size_t> which;
    for (size_t k = 0; k < count; ++k) {
      if (lattices[k]->gather_) {
        lattices[k]->splat_gather(values, scales[k], stride, outs[k]);
      } else {
        scattered.push_back(lattices[k]);
        which.push_back(k);
      }
    }
    if (!scattered.empty()) {
      std::vector<const std::vector<SplatPart>*> parts;
      int64_t chunks = 0;
      for (const PermutohedralLattice* lat : scattered) {
        parts.push_back(&lat->splat_parts(threads));
        chunks = std::max<int64_t>(chunks, static_cast<int64_t>(parts.back()->size()));
      }
      const int64_t n = scattered[0]->n_;
      parallel::for_range(0, chunks, 1, [&](int64_t k0, int64_t k1) {
        std::vector<ScatterTermOf<T>> terms;
        for (int64_t c = k0; c < k1; ++c) {
          terms.clear();
          int64_t i0 = n, i1 = 0;
          for (size_t k = 0; k < scattered.size(); ++k) {
            const PermutohedralLattice& lat = *scattered[k];
            if (c >= static_cast<int64_t>(parts[k]->size())) continue;
            const SplatPart& part = (*parts[k])[c];
            terms.push_back(ScatterTermOf<T>{lat.vertex_.data(), lat.weight_.data(), lat.d_ + 1, scales[which[k]],
                                             outs[which[k]], part.p0, part.p1,
                                             lat.m_ * stride * static_cast<int64_t>(sizeof(T)) > kPrefetchBytes});
            i0 = std::min(i0, part.i0);
            i1 = std::max(i1, part.i1);
          }
          scatter_range(terms.data(), static_cast<int>(terms.size()), values, stride, i0, std::max(i0, i1));
        }
      });
    }
  }
  // Blur with [1/2, 1, 1/2] along each axis in turn (in reverse order for the transpose), in place, chain by
  // chain.
  StageTimer timer("blur");
  for (size_t k = 0; k < count; ++k) {
    const PermutohedralLattice& lat = *lattices[k];
    for (int step = 0; step <= lat.d_; ++step) {
      const int j = transpose ? lat.d_ - step : step;
      const std::vector<int64_t>& begin_j = lat.chain_begin_[j];
      const int64_t chains = static_cast<int64_t>(begin_j.size()) - 1;
      parallel::for_range(0, chains, kChainGrain, [&](int64_t c0, int64_t c1) {
        blur_chains(begin_j.data(), lat.chain_points_[j].data(), outs[k], stride, c0, c1);
      });
    }
  }
}

template <typename T>
void PermutohedralLattice::splat_gather(const T* values, const T* scale, int64_t stride, T* out) const {
  const SplatArgs args{point_begin_.data(), contrib_pixel_.data(), contrib_weight_.data(), stride};
  const int64_t bands = num_bands();
  for (const int32_t p : empty_points_)
    for (int64_t k = 0; k < stride; ++k) out[p * stride + k] = T(0);
  parallel::for_each(groups_, [&](int64_t g) {
    const int64_t* band_begin = group_band_begin_.data() + g * (bands + 1);
    // The segments read a band's values in no particular order: prefetch the next band in order meanwhile (the
    // hardware prefetcher does not follow a gather), so that it comes from memory at full bandwidth.
    prefetch_band(values, scale, stride, 0);
    for (int64_t b = 0; b < bands; ++b) {
      if (b + 1 < bands) prefetch_band(values, scale, stride, b + 1);
      splat_segments(args, segments_.data() + band_begin[b], band_begin[b + 1] - band_begin[b], values, scale, out);
    }
  });
}

template float* PermutohedralLattice::splat_blur<float>(const float*, const float*, int64_t, float*, bool) const;
template double* PermutohedralLattice::splat_blur<double>(const double*, const double*, int64_t, double*,
                                                          bool) const;
template void PermutohedralLattice::splat_blur_many<float>(const PermutohedralLattice* const*, size_t, const float*,
                                                           const float* const*, int64_t, float* const*, bool);
template void PermutohedralLattice::splat_blur_many<double>(const PermutohedralLattice* const*, size_t,
                                                            const double*, const double* const*, int64_t,
                                                            double* const*, bool);

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
