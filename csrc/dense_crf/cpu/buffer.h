// Uninitialised arrays for the CPU dense CRF's large per-call buffers, recycled between calls.
//
// Every element is written before it is read, so no zero-fill is wasted on them. Blocks of 1 MiB or more come
// from a small process-wide pool: a call on an image of the size seen before reuses the previous call's
// memory instead of faulting in (and having the kernel zero) fresh pages, which costs about as much as a
// mean-field iteration at 512x512. The pool keeps at most DEEPLAB_FAST_CPU_CACHE_MB MiB (default 1024) of
// free blocks; deeplab_fast::cpu_empty_cache() (Python: deeplab_fast.ops.empty_cache()) frees them.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <new>

#include "common/env.h"

namespace deeplab_fast {
namespace dense_crf {
namespace cpu {

class BlockPool {
 public:
  static BlockPool& instance() {
    static BlockPool* pool = new BlockPool();  // never destroyed: outlives every Buffer
    return *pool;
  }

  // A block of at least `bytes` bytes (uninitialised).
  void* acquire(size_t bytes, size_t* capacity) {
    if (bytes >= kMinPooled) {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= 2 * bytes) {  // reuse a block not much larger than needed
        *capacity = it->first;
        void* p = it->second;
        cached_ -= it->first;
        free_.erase(it);
        return p;
      }
    }
    void* p = std::malloc(bytes > 0 ? bytes : 1);
    if (p == nullptr) {
      empty();
      p = std::malloc(bytes > 0 ? bytes : 1);
      if (p == nullptr) throw std::bad_alloc();
    }
    *capacity = bytes;
    return p;
  }

  void release(void* p, size_t capacity) {
    if (capacity >= kMinPooled) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + capacity <= limit_) {
        free_.emplace(capacity, p);
        cached_ += capacity;
        return;
      }
    }
    std::free(p);
  }

  void empty() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& block : free_) std::free(block.second);
    free_.clear();
    cached_ = 0;
  }

 private:
  static constexpr size_t kMinPooled = size_t{1} << 20;

  BlockPool() : limit_(static_cast<size_t>(env::cpu_cache_mb()) << 20) {}

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // free blocks by capacity
  size_t cached_ = 0;
  size_t limit_ = 0;
};

template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n) { reset(n); }
  Buffer(Buffer&& other) noexcept { swap(other); }
  Buffer& operator=(Buffer&& other) noexcept {
    swap(other);
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { clear(); }

  void reset(size_t n) {
    clear();
    data_ = static_cast<T*>(BlockPool::instance().acquire(n * sizeof(T), &capacity_));
    size_ = n;
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }
  size_t size() const { return size_; }

 private:
  void clear() {
    if (data_ != nullptr) BlockPool::instance().release(data_, capacity_);
    data_ = nullptr;
    size_ = capacity_ = 0;
  }
  void swap(Buffer& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(capacity_, other.capacity_);
  }

  T* data_ = nullptr;
  size_t size_ = 0;
  size_t capacity_ = 0;  // bytes
};

// Frees the pool's cached blocks.
inline void empty_cache() { BlockPool::instance().empty(); }

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
