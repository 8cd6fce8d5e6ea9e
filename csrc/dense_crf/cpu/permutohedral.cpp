#include "permutohedral.h"

#include "common/parallel.h"
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
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
constexpr int64_t kChainGrain = 64;


// Open-addressing hash set of d-dimensional integer keys; ids are given in insertion order, so the
// lattice point numbering (and everything after it) does not depend on the thread count.
class KeyTable {
 public:
  KeyTable(int d, int64_t expected) : d_(d) {
    int64_t cap = 64;
    while (cap < 2 * expected) cap <<= 1;
    table_.assign(cap, -1);
    keys_.reserve(static_cast<size_t>(expected) * d);
  }

  int64_t size() const { return size_; }
  const int32_t* key(int64_t id) const { return keys_.data() + id * d_; }

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

  // Batched forms (the packed table overlaps their memory accesses; here they are plain loops).
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

// The same set for keys whose coordinates all fit in `bits` bits (with room for the blur neighbours): each key
// is packed into one 64-bit word (coordinate + 2^(bits-1) per field) stored inline in its slot, so a lookup
// touches one cache line and compares one integer, and a blur neighbour is the packed key plus a constant.
class PackedKeyTable {
 public:
  PackedKeyTable(int d, int64_t expected, int bits) : d_(d), bits_(bits), bias_(int64_t{1} << (bits - 1)) {
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
  int32_t insert(const int32_t* k) { return insert_packed(pack(k)); }
  int32_t find_from(const PackedKeyTable& other, int64_t id) const { return find_packed(other.keys_[id]); }

  // Batched forms: hash a batch of keys and prefetch their slots before probing, so that the cache misses
  // of a batch overlap (lookups in a large table are bound by memory latency).
  void insert_block(const int32_t* keys, int64_t count, int32_t* ids) {
    uint64_t packed[kBatch];
    for (int64_t b0 = 0; b0 < count; b0 += kBatch) {
      const int64_t n = std::min<int64_t>(kBatch, count - b0);
      if (2 * (size() + n) > static_cast<int64_t>(slots_.size())) grow();
      const uint64_t mask = slots_.size() - 1;
      for (int64_t k = 0; k < n; ++k) {
        packed[k] = pack(keys + (b0 + k) * d_);
        __builtin_prefetch(&slots_[hash(packed[k]) & mask]);
      }
      for (int64_t k = 0; k < n; ++k) ids[b0 + k] = insert_packed(packed[k]);
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

  uint64_t pack(const int32_t* k) const {
    uint64_t u = 0;
    for (int i = 0; i < d_; ++i) u |= static_cast<uint64_t>(k[i] + bias_) << (bits_ * i);
    return u;
  }

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
  int64_t bias_;
  uint64_t successor_delta_[lattice::kMaxDim + 1];
  Buffer<Slot> slots_;
  std::vector<uint64_t> keys_;
};

// Bits per coordinate for packed keys, or 0 when some key (or blur neighbour) of these features might not fit.
// Bound: |elevated_j| <= sum_k |f_k s_k| + d max_k |f_k s_k|; rounding and the simplex offsets add at most
// 3 (d + 1), and a neighbour another d + 1.
int packed_key_bits(const float* features, int d, int64_t n, const float* scale) {
  const int bits = std::min(32, 64 / d);
  std::vector<double> chunk_max(static_cast<size_t>((n + kPixelGrain - 1) / kPixelGrain), 0.0);
  parallel::for_range(0, n, kPixelGrain, [&](int64_t begin, int64_t end) {
    double worst = 0.0;
    for (int64_t i = begin; i < end; ++i) {
      double sum = 0.0, largest = 0.0;
      for (int k = 0; k < d; ++k) {
        const double c = std::fabs(static_cast<double>(features[k * n + i]) * scale[k]);
        sum += c;
        largest = std::max(largest, c);
      }
      worst = std::max(worst, sum + d * largest);
    }
    chunk_max[begin / kPixelGrain] = std::max(chunk_max[begin / kPixelGrain], worst);
  });
  const double bound = *std::max_element(chunk_max.begin(), chunk_max.end()) + 4.0 * (d + 1) + 1.0;
  return bound < std::ldexp(1.0, bits - 1) ? bits : 0;
}

// Embeds pixels [begin, end): the d+1 vertex keys of pixel i go to keys[(i - key_base) * (d+1) * d ...] and its
// weights to weights[i * (d+1) ...]. Returns false on oversize features.
// lattice::embed_point for eight consecutive pixels i..i+7 at once, D fixed: the same IEEE operations in the
// same order, lane by lane, with selects where the scalar form branches or indexes by rank. (pydensecrf's own
// builder does this four lanes wide with SSE.)
template <int D>
DLF_INLINE bool embed8(const float* features, int64_t n, int64_t i, const float* scale, int32_t* keys,
                       float* weights) {
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
  bool ok = true;
  for (int k = 0; k <= D; ++k) {
    const vec8 v = inv_dp1 * elevated[k];
    const auto inside = (v < lattice::kMaxCoordinate) & (v > -lattice::kMaxCoordinate);
    for (int lane = 0; lane < 8; ++lane) ok &= inside[lane] != 0;
    const vec8 rv = (v + 12582912.0f) - 12582912.0f;  // lattice::round_half_even
    rem0[k] = rv * fdp1;
    sum = sum + rv;
    rank[k] = zero;
  }
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
  for (int r = 0; r <= D; ++r) {
    for (int k = 0; k < D; ++k) {
      const ivec8 base = __builtin_convertvector(rem0[k], ivec8);
      const ivec8 key = base + ((rank[k] <= static_cast<float>(D - r)) ? ivec8{} + r : ivec8{} + (r - dp1));
      for (int lane = 0; lane < 8; ++lane) keys[(lane * dp1 + r) * D + k] = key[lane];
    }
    for (int lane = 0; lane < 8; ++lane) weights[(i + lane) * dp1 + r] = bary[r][lane];
  }
  return ok;
}

template <int D>
DLF_INLINE bool embed_range(const float* features, int d, int64_t n, const float* scale, int32_t* keys, int64_t key_base,
                 float* weights, int64_t begin, int64_t end) {
  float f[lattice::kMaxDim];
  const int64_t dp1 = d + 1;
  bool ok = true;
  int64_t i = begin;
  if constexpr (D > 0) {
    for (; i + 8 <= end; i += 8) ok &= embed8<D>(features, n, i, scale, keys + (i - key_base) * dp1 * d, weights);
  }
  for (; i < end; ++i) {
    for (int j = 0; j < d; ++j) f[j] = features[j * n + i];
    ok &= lattice::embed_point<D>(f, d, scale, keys + (i - key_base) * dp1 * d, weights + i * dp1);
  }
  return ok;
}

DLF_CPU_KERNEL bool embed_pixels(const float* features, int d, int64_t n, const float* scale, int32_t* keys,
                                 int64_t key_base, float* weights, int64_t begin, int64_t end) {
#define DLF_EMBED(D) embed_range<D>(features, d, n, scale, keys, key_base, weights, begin, end)
  switch (d) {  // the feature dimensions of DenseCRF2D (Gaussian: 2, bilateral: 5) and RGB-only (3)
    case 2: return DLF_EMBED(2);
    case 3: return DLF_EMBED(3);
    case 5: return DLF_EMBED(5);
    default: return DLF_EMBED(0);
  }
#undef DLF_EMBED
}

// Splat of pixels [i0, i1) onto the lattice points [p0, p1) that this thread owns: each owned point adds
// w * (scale[i] * values[i]) for its pixels i in increasing order, so its sum is the same, bit for bit, as a
// sequential splat's (pydensecrf's), whatever the partition. The scaled value is rounded before the weight
// multiplies it, as in pydensecrf, where the normalisation is applied to the whole input first. C > 0 (float
// only): the stride is exactly 8 C; C == 0: any stride.
template <typename T, int C>
DLF_INLINE void splat_owned(const int32_t* vertex, const float* weight, int dp1, const T* values, const T* scale,
                            int64_t stride, T* out, int64_t p0, int64_t p1, int64_t i0, int64_t i1) {
  static_assert(C == 0 || std::is_same<T, float>::value, "vectorised splat is float only");
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t k = 0; k < stride; ++k) out[p * stride + k] = T(0);
  for (int64_t i = i0; i < i1; ++i) {
    const T* __restrict v = values + i * stride;
    const T sc = scale == nullptr ? T(1) : scale[i];
    vec8 x[C > 0 ? C : 1];  // the pixel's (scaled) values, rounded once as in pydensecrf
    if constexpr (C > 0)
      for (int c = 0; c < C; ++c) x[c] = scale == nullptr ? load8(v + 8 * c) : load8(v + 8 * c) * sc;
    for (int r = 0; r < dp1; ++r) {
      const int64_t p = vertex[i * dp1 + r];
      if (p < p0 || p >= p1) continue;
      const T w = weight[i * dp1 + r];
      T* __restrict acc = out + p * stride;
      if constexpr (C > 0) {
        for (int c = 0; c < C; ++c) store8(acc + 8 * c, load8(acc + 8 * c) + w * x[c]);
      } else if (scale == nullptr) {
        for (int64_t k = 0; k < stride; ++k) acc[k] += w * v[k];
      } else {
        for (int64_t k = 0; k < stride; ++k) acc[k] += w * (v[k] * sc);
      }
    }
  }
}

DLF_CPU_KERNEL void splat_range(const int32_t* vertex, const float* weight, int dp1, const float* values,
                                const float* scale, int64_t stride, float* out, int64_t p0, int64_t p1, int64_t i0,
                                int64_t i1) {
#define DLF_SPLAT(C) splat_owned<float, C>(vertex, weight, dp1, values, scale, stride, out, p0, p1, i0, i1)
  switch (stride % 8 == 0 ? stride / 8 : 0) {
    case 1: DLF_SPLAT(1); break;
    case 2: DLF_SPLAT(2); break;
    case 3: DLF_SPLAT(3); break;
    case 4: DLF_SPLAT(4); break;
    case 5: DLF_SPLAT(5); break;
    case 6: DLF_SPLAT(6); break;
    case 7: DLF_SPLAT(7); break;
    case 8: DLF_SPLAT(8); break;
    default: DLF_SPLAT(0); break;
  }
#undef DLF_SPLAT
}

DLF_CPU_KERNEL void splat_range(const int32_t* vertex, const float* weight, int dp1, const double* values,
                                const double* scale, int64_t stride, double* out, int64_t p0, int64_t p1, int64_t i0,
                                int64_t i1) {
  splat_owned<double, 0>(vertex, weight, dp1, values, scale, stride, out, p0, p1, i0, i1);
}

// Blurs chains [c0, c1) in place: v[p_t] = v[p_t] + (v[p_t+1] + v[p_t-1]) / 2 with the old values of the
// neighbours (missing ends count as zero), keeping the previous point's old value in registers. C > 0 (float
// only): the stride is exactly 8 C.
template <typename T, int C>
DLF_INLINE void blur_chain(const int32_t* points, int64_t length, T* v, int64_t stride, T* scratch) {
  if constexpr (C > 0) {
    static_assert(std::is_same<T, float>::value, "vectorised blur is float only");
    vec8 prev[C];
    for (int c = 0; c < C; ++c) prev[c] = splat8(0.0f);
    for (int64_t t = 0; t < length; ++t) {
      float* __restrict self = v + static_cast<int64_t>(points[t]) * (8 * C);
      const float* __restrict succ = t + 1 < length ? v + static_cast<int64_t>(points[t + 1]) * (8 * C) : nullptr;
      for (int c = 0; c < C; ++c) {
        const vec8 old = load8(self + 8 * c);
        const vec8 n1 = succ ? load8(succ + 8 * c) : splat8(0.0f);
        store8(self + 8 * c, old + 0.5f * (n1 + prev[c]));
        prev[c] = old;
      }
    }
    return;
  }
  T* prev = scratch;
  T* old = scratch + stride;
  for (int64_t k = 0; k < stride; ++k) prev[k] = T(0);
  for (int64_t t = 0; t < length; ++t) {
    T* self = v + static_cast<int64_t>(points[t]) * stride;
    const T* succ = t + 1 < length ? v + static_cast<int64_t>(points[t + 1]) * stride : nullptr;
    for (int64_t k = 0; k < stride; ++k) {
      old[k] = self[k];
      self[k] = old[k] + T(0.5) * ((succ ? succ[k] : T(0)) + prev[k]);
    }
    std::swap(prev, old);
  }
}

DLF_CPU_KERNEL void blur_chains(const int64_t* chain_begin, const int32_t* points, float* v, int64_t stride,
                                float* scratch, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    const int32_t* chain = points + chain_begin[c];
    const int64_t length = chain_begin[c + 1] - chain_begin[c];
    switch (stride % 8 == 0 ? stride / 8 : 0) {
      case 1: blur_chain<float, 1>(chain, length, v, stride, scratch); break;
      case 2: blur_chain<float, 2>(chain, length, v, stride, scratch); break;
      case 3: blur_chain<float, 3>(chain, length, v, stride, scratch); break;
      case 4: blur_chain<float, 4>(chain, length, v, stride, scratch); break;
      case 5: blur_chain<float, 5>(chain, length, v, stride, scratch); break;
      case 6: blur_chain<float, 6>(chain, length, v, stride, scratch); break;
      case 7: blur_chain<float, 7>(chain, length, v, stride, scratch); break;
      case 8: blur_chain<float, 8>(chain, length, v, stride, scratch); break;
      default: blur_chain<float, 0>(chain, length, v, stride, scratch); break;
    }
  }
}

DLF_CPU_KERNEL void blur_chains(const int64_t* chain_begin, const int32_t* points, double* v, int64_t stride,
                                double* scratch, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c)
    blur_chain<double, 0>(points + chain_begin[c], chain_begin[c + 1] - chain_begin[c], v, stride, scratch);
}

}  // namespace

PermutohedralLattice::PermutohedralLattice(const float* features, int d, int64_t num_pixels)
    : d_(d), n_(num_pixels), alpha_(lattice::slice_alpha(d)) {
  TORCH_CHECK(d >= 1 && d <= lattice::kMaxDim, "dense_crf: feature dimension must be in [1, ",
              lattice::kMaxDim, "], got ", d);
  const int64_t dp1 = d + 1;
  TORCH_CHECK(num_pixels * dp1 < std::numeric_limits<int32_t>::max(),
              "dense_crf: too many pixels for one lattice: N * (d + 1) = ", num_pixels * dp1,
              " must stay below 2^31");

  float scale[lattice::kMaxDim];
  for (int i = 0; i < d; ++i) scale[i] = lattice::elevation_scale(i, d);

  // The origin is embedded too (see build()), so the bound covers its simplex.
  const int bits = packed_key_bits(features, d, n_, scale);
  if (bits > 0) {
    build([&](int64_t expected) { return PackedKeyTable(d, expected, bits); }, features, scale);
  } else {
    build([&](int64_t expected) { return KeyTable(d, expected); }, features, scale);
  }
  if (profiling_enabled()) {
    std::fprintf(stderr, "[deeplab_fast] lattice d=%d N=%lld M=%lld; points in blur chains per axis:", d,
                 static_cast<long long>(n_), static_cast<long long>(m_));
    for (int j = 0; j <= d; ++j)
      std::fprintf(stderr, " %lld/%lld", static_cast<long long>(chain_points_[j].size()),
                   static_cast<long long>(chain_begin_[j].size() - 1));
    std::fprintf(stderr, "\n");
  }
}

template <typename MakeTable>
void PermutohedralLattice::build(MakeTable make_table, const float* features, const float* scale) {
  const int d = d_;
  const int64_t dp1 = d + 1;
  // 1-2. Embed the pixels and number the lattice points in order of first appearance. Each thread takes a
  //      contiguous range of pixels, embeds it a cache-sized block at a time and numbers its points in a
  //      table of its own. The tables are then merged in range order: range
  //      0's numbering is kept, and each later range adds only the points it sees first. The result is the
  //      global first-appearance numbering, whatever the number of ranges.
  vertex_.reset(static_cast<size_t>(n_ * dp1));
  weight_.reset(static_cast<size_t>(n_ * dp1));
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(parallel::num_threads(), n_ / 16384));
  using Table = decltype(make_table(int64_t{0}));
  struct Local {
    Table table;
    std::vector<int32_t> first, last, count;  // per local point: first and last pixel, number of entries
    bool ok = true;
  };
  std::vector<Local> locals;
  locals.reserve(static_cast<size_t>(ranges));
  // Range 0's table becomes the global one, so it is sized for the whole lattice (rarely more than 1.25 N
  // points, e.g. a Gaussian kernel finer than the pixel grid).
  for (int64_t t = 0; t < ranges; ++t)
    locals.push_back(Local{make_table(t == 0 ? n_ + n_ / 4 : n_ / ranges), {}, {}, {}});
  auto range_begin = [&](int64_t t) { return n_ * t / ranges; };
  {
    StageTimer timer("lattice: embed + hash");
    parallel::for_range(0, ranges, 1, [&](int64_t t0, int64_t t1) {
      constexpr int64_t kBlock = 4096;
      std::vector<int32_t> keys(static_cast<size_t>(kBlock * dp1 * d));
      for (int64_t t = t0; t < t1; ++t) {
        Local& local = locals[t];
        const int64_t r0 = range_begin(t), r1 = range_begin(t + 1);
        for (int64_t b0 = r0; b0 < r1; b0 += kBlock) {
          const int64_t b1 = std::min(r1, b0 + kBlock);
          local.ok &= embed_pixels(features, d, n_, scale, keys.data(), b0, weight_.data(), b0, b1);
          local.table.insert_block(keys.data(), (b1 - b0) * dp1, vertex_.data() + b0 * dp1);
          for (int64_t i = b0; i < b1; ++i) {
            for (int64_t r = 0; r < dp1; ++r) {
              const int64_t e = i * dp1 + r;
              const int32_t v = vertex_[e];
              if (v == static_cast<int32_t>(local.first.size())) {  // a new point
                local.first.push_back(static_cast<int32_t>(i));
                local.last.push_back(0);
                local.count.push_back(0);
              }
              local.last[v] = static_cast<int32_t>(i);
              ++local.count[v];
            }
          }
        }
      }
    });
    for (const Local& local : locals)
      TORCH_CHECK(local.ok, input_error(kFeaturesOversize));
  }
  Table table = std::move(locals[0].table);
  {
    StageTimer timer("lattice: merge");
    first_pixel_ = std::move(locals[0].first);
    last_pixel_ = std::move(locals[0].last);
    entries_ = std::move(locals[0].count);
    std::vector<std::vector<int32_t>> to_global(static_cast<size_t>(ranges));
    for (int64_t t = 1; t < ranges; ++t) {
      // Range t's points that are already numbered keep their id; the others get the next ids in range t's
      // order of first appearance. Lookups, then inserts (of keys known to be new and distinct), run in
      // parallel; the numbering is fixed before any insert.
      const Local& local = locals[t];
      const int64_t count = static_cast<int64_t>(local.first.size());
      std::vector<int32_t>& map = to_global[t];
      map.resize(static_cast<size_t>(count));
      parallel::for_range(0, count, kPointGrain,
                       [&](int64_t v0, int64_t v1) { table.find_many(local.table, v0, v1, map.data() + v0); });
      const int64_t before = table.size();
      int64_t next_id = before;
      for (int64_t v = 0; v < count; ++v)
        if (map[v] < 0) map[v] = static_cast<int32_t>(-2 - next_id++);  // new: remember its id, negated
      table.reserve(next_id);
      first_pixel_.resize(static_cast<size_t>(next_id));
      last_pixel_.resize(static_cast<size_t>(next_id));
      entries_.resize(static_cast<size_t>(next_id), 0);
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
          entries_[g] += local.count[v];
        }
      });
    }
    parallel::for_range(1, ranges, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t e = range_begin(t) * dp1; e < range_begin(t + 1) * dp1; ++e) vertex_[e] = to_global[t][vertex_[e]];
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
      for (int64_t r = 0; r < dp1; ++r) {
        if (table.insert(keys.data() + r * d) == static_cast<int32_t>(first_pixel_.size())) {
          first_pixel_.push_back(static_cast<int32_t>(n_));  // no pixel splats onto it
          last_pixel_.push_back(-1);
          entries_.push_back(0);
        }
      }
    }
    m_ = table.size();
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
      const int64_t blocks = (m_ + kPointGrain - 1) / kPointGrain;
      std::vector<int64_t> block_starts(static_cast<size_t>(blocks + 1), 0);
      auto is_start = [&](int64_t p) { return next[p] >= 0 && !has_prev[p]; };
      parallel::for_range(0, blocks, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          int64_t count = 0;
          for (int64_t p = k * kPointGrain; p < std::min(m_, (k + 1) * kPointGrain); ++p) count += is_start(p);
          block_starts[k + 1] = count;
        }
      });
      for (int64_t k = 0; k < blocks; ++k) block_starts[k + 1] += block_starts[k];
      std::vector<int32_t> starts(static_cast<size_t>(block_starts[blocks]));
      parallel::for_range(0, blocks, 1, [&](int64_t k0, int64_t k1) {
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
T* PermutohedralLattice::splat_blur(const T* values, const T* scale, int64_t stride, T* out, bool transpose) const {
  {
    StageTimer timer("splat");
    const std::vector<SplatPart>& parts = splat_parts(parallel::num_threads());
    parallel::for_range(0, static_cast<int64_t>(parts.size()), 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const SplatPart& part = parts[k];
        splat_range(vertex_.data(), weight_.data(), d_ + 1, values, scale, stride, out, part.p0, part.p1,
                    part.i0, part.i1);
      }
    });
  }
  // Blur with [1/2, 1, 1/2] along each axis in turn (in reverse order for the transpose), in place, chain by
  // chain.
  StageTimer timer("blur");
  for (int step = 0; step <= d_; ++step) {
    const int j = transpose ? d_ - step : step;
    const std::vector<int64_t>& begin_j = chain_begin_[j];
    const int64_t chains = static_cast<int64_t>(begin_j.size()) - 1;
    parallel::for_range(0, chains, kChainGrain, [&](int64_t c0, int64_t c1) {
      std::vector<T> scratch(static_cast<size_t>(2 * stride));
      blur_chains(begin_j.data(), chain_points_[j].data(), out, stride, scratch.data(), c0, c1);
    });
  }
  return out;
}

template float* PermutohedralLattice::splat_blur<float>(const float*, const float*, int64_t, float*, bool) const;
template double* PermutohedralLattice::splat_blur<double>(const double*, const double*, int64_t, double*,
                                                          bool) const;

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
