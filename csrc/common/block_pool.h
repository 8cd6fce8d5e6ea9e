// A process-wide pool of large host memory blocks, recycled between calls (torch-free).
//
// Blocks of 1 MiB or more are kept when freed: a call on an image of the size seen before reuses the previous
// call's memory instead of faulting in (and having the kernel zero) fresh pages, which costs about as much as a
// mean-field iteration at 512x512. The pool keeps at most DEEPLAB_FAST_CPU_CACHE_MB MiB (default 1024) of free
// blocks; empty() (the op deeplab_fast::empty_cache, Python: deeplab_fast.ops.empty_cache()) frees them. Users:
// the CPU dense CRF's working arrays (dense_crf/cpu/buffer.h) and its CPU outputs (a torch Allocator over the
// pool, dense_crf/dense_crf_args.cpp).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

#include "common/env.h"

namespace deeplab_fast {

// Thread-safe. Blocks under 1 MiB are plain malloc / free.
class BlockPool {
 public:
  static BlockPool& instance() {
    static BlockPool* pool = new BlockPool();  // never destroyed: outlives every block handed out
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

}  // namespace deeplab_fast
