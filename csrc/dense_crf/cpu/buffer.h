// Uninitialised arrays for the CPU dense CRF's large per-call buffers, recycled between calls through the host
// block pool (common/block_pool.h). Every element is written before it is read, so no zero-fill is wasted on them.
#pragma once

#include <cstddef>
#include <memory>
#include <utility>

#include "common/block_pool.h"

namespace deeplab_fast {
namespace dense_crf {
namespace cpu {

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

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
