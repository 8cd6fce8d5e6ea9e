// Optional per-stage timing of the CPU dense CRF, printed to stderr when DEEPLAB_FAST_PROFILE=1: wall-clock time,
// and the calling thread's CPU time (with one thread, the stage's own cost even on a busy machine).
#pragma once

#include <time.h>

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
  explicit StageTimer(const char* name)
      : name_(name), start_(std::chrono::steady_clock::now()), cpu_start_(thread_cpu_ms()) {}
  ~StageTimer() {
    if (!profiling_enabled()) return;
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_).count();
    std::fprintf(stderr, "[deeplab_fast] %-28s %9.3f ms (thread cpu %9.3f ms)\n", name_, ms,
                 thread_cpu_ms() - cpu_start_);
  }

 private:
  static double thread_cpu_ms() {
    timespec t{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return 1e3 * static_cast<double>(t.tv_sec) + 1e-6 * static_cast<double>(t.tv_nsec);
  }

  const char* name_;
  std::chrono::steady_clock::time_point start_;
  double cpu_start_;
};

}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast
