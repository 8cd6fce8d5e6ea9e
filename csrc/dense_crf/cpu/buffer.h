// Uninitialised arrays for the CPU dense CRF's large per-call buffers.
//
// Every element is written before it is read, so no zero-fill is wasted on them. (Advising huge pages was
// measured slower here: with THP defrag set to "madvise" the kernel compacts memory at fault time.)
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>


namespace deeplab_fast {
namespace dense_crf {
namespace cpu {

template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n) { reset(n); }

  void reset(size_t n) {
    const size_t bytes = n * sizeof(T);
    void* p = std::malloc(bytes > 0 ? bytes : 1);
    if (p == nullptr) throw std::bad_alloc();
    data_.reset(static_cast<T*>(p));
    size_ = n;
  }

  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  T& operator[](size_t i) { return data_.get()[i]; }
  const T& operator[](size_t i) const { return data_.get()[i]; }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
  size_t size_ = 0;
};

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
