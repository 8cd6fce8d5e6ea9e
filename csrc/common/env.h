// Process-wide debug switches read from the environment, shared by every op (torch-free).
#pragma once

#include <cstdlib>

namespace deeplab_fast {

// DEEPLAB_FAST_POISON=1 (read once, at the first call): ops fill their outputs with NaN before their kernels
// write them, so that an element a kernel forgets to write cannot pass a test by holding a stale value.
// The test session sets it (tests/conftest.py).
inline bool poison_outputs() {
  static const bool poison = [] {
    const char* v = std::getenv("DEEPLAB_FAST_POISON");
    return v != nullptr && v[0] == '1';
  }();
  return poison;
}

}  // namespace deeplab_fast
