// Optional per-stage timing of the CPU dense CRF, printed to stderr when DEEPLAB_FAST_PROFILE=1.
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "common/env.h"

namespace deeplab_fast {
namespace dense_crf {
namespace cpu {

inline bool profiling_enabled() { return env::profiling(); }

class StageTimer {
 public:
  explicit StageTimer(const char* name) : name_(name), start_(std::chrono::steady_clock::now()) {}
  ~StageTimer() {
    if (!profiling_enabled()) return;
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_).count();
    std::fprintf(stderr, "[deeplab_fast] %-28s %9.3f ms\n", name_, ms);
  }

 private:
  const char* name_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
