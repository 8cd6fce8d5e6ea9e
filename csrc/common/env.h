// The environment switches of deeplab_fast: the one place that reads DEEPLAB_FAST_* variables (torch-free, so the
// CUDA kernel files include it too). Each reader validates its variable and throws std::invalid_argument naming
// it and the values it accepts, so a typo is an error rather than a silent default.
//
//   DEEPLAB_FAST_POISON        0 | 1 (default 0): ops fill their outputs with NaN before their kernels write them,
//                              so an element a kernel forgets cannot pass a test with a stale value (the test
//                              session sets it). Read once, at the first call.
//   DEEPLAB_FAST_PROFILE       0 | 1 (default 0): the dense CRF prints per-stage times to stderr. Read per call.
//   DEEPLAB_FAST_CUDA_GRAPH    0 | 1 (default 1): the CUDA dense CRF runs its iterations as a CUDA graph. Per call.
//   DEEPLAB_FAST_CPU_CACHE_MB  a whole number >= 0 (default 1024): MiB of CPU working memory the dense CRF keeps
//                              for reuse between calls (0: none). Read once.
//   DEEPLAB_FAST_TAP_SKIPPING  0 | off | 1 | on | auto (default auto): the atrous conv's tap skipping. Per call.
//   DEEPLAB_FAST_THREADS_WAIT  spin | passive (default passive): how the dense CRF's worker threads wait for work
//                              (see common/parallel.h). Read once.
//   DEEPLAB_FAST_CPU_SIMD      auto | avx512 | avx2 | baseline (default auto): the vector instruction set of the CPU
//                              dense CRF's kernels (auto: the best this CPU has). Every level gives bitwise the
//                              same results; forcing one is for tests and comparisons. A level this CPU lacks is
//                              an error at the call. Read per call.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace deeplab_fast {
namespace env {

struct Switch {
  const char* name;
  const char* accepted;  // the values it takes, with its default
};

inline constexpr Switch kPoison{"DEEPLAB_FAST_POISON", "0 or 1 (default 0)"};
inline constexpr Switch kProfile{"DEEPLAB_FAST_PROFILE", "0 or 1 (default 0)"};
inline constexpr Switch kCudaGraph{"DEEPLAB_FAST_CUDA_GRAPH", "0 or 1 (default 1)"};
inline constexpr Switch kCpuCacheMB{"DEEPLAB_FAST_CPU_CACHE_MB", "a whole number of MiB >= 0 (default 1024)"};
inline constexpr Switch kTapSkipping{"DEEPLAB_FAST_TAP_SKIPPING", "0, off, 1, on or auto (default auto)"};
inline constexpr Switch kThreadsWait{"DEEPLAB_FAST_THREADS_WAIT", "spin or passive (default passive)"};
inline constexpr Switch kCpuSimd{"DEEPLAB_FAST_CPU_SIMD", "auto, avx512, avx2 or baseline (default auto)"};
inline constexpr const Switch* kAll[] = {&kPoison,      &kProfile,     &kCudaGraph, &kCpuCacheMB,
                                         &kTapSkipping, &kThreadsWait, &kCpuSimd};

// The variable's value, or nullptr when it is unset or empty.
inline const char* value(const Switch& s) {
  const char* v = std::getenv(s.name);
  return v != nullptr && v[0] != '\0' ? v : nullptr;
}

[[noreturn]] inline void invalid(const Switch& s, const char* v) {
  throw std::invalid_argument(std::string(s.name) + " must be " + s.accepted + ", got '" + v + "'");
}

inline bool flag(const Switch& s, bool fallback) {
  const char* v = value(s);
  if (v == nullptr) return fallback;
  if (std::strcmp(v, "0") == 0) return false;
  if (std::strcmp(v, "1") == 0) return true;
  invalid(s, v);
}

// A whole number in [0, 2^40].
inline int64_t whole_number(const Switch& s, int64_t fallback) {
  const char* v = value(s);
  if (v == nullptr) return fallback;
  for (const char* c = v; *c != '\0'; ++c)
    if (*c < '0' || *c > '9') invalid(s, v);
  errno = 0;
  const unsigned long long n = std::strtoull(v, nullptr, 10);
  if (errno != 0 || n > (1ull << 40)) invalid(s, v);
  return static_cast<int64_t>(n);
}

enum class Mode { kOff, kOn, kAuto };

inline Mode mode(const Switch& s) {
  const char* v = value(s);
  if (v == nullptr || std::strcmp(v, "auto") == 0) return Mode::kAuto;
  if (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0) return Mode::kOff;
  if (std::strcmp(v, "1") == 0 || std::strcmp(v, "on") == 0) return Mode::kOn;
  invalid(s, v);
}

// true: passive (sleep when idle), false: spin.
inline bool passive_wait() {
  static const bool passive = [] {
    const char* v = value(kThreadsWait);
    if (v == nullptr || std::strcmp(v, "passive") == 0) return true;
    if (std::strcmp(v, "spin") == 0) return false;
    invalid(kThreadsWait, v);
  }();
  return passive;
}

inline bool poison_outputs() {
  static const bool poison = flag(kPoison, false);
  return poison;
}

inline bool profiling() { return flag(kProfile, false); }
inline bool cuda_graph() { return flag(kCudaGraph, true); }
inline int64_t cpu_cache_mb() { return whole_number(kCpuCacheMB, 1024); }
inline Mode tap_skipping() { return mode(kTapSkipping); }

// The CPU dense CRF's requested instruction set (DEEPLAB_FAST_CPU_SIMD), in increasing order of width.
enum class CpuSimd { kAuto = -1, kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuSimd cpu_simd() {
  const char* v = value(kCpuSimd);
  if (v == nullptr || std::strcmp(v, "auto") == 0) return CpuSimd::kAuto;
  if (std::strcmp(v, "avx512") == 0) return CpuSimd::kAvx512;
  if (std::strcmp(v, "avx2") == 0) return CpuSimd::kAvx2;
  if (std::strcmp(v, "baseline") == 0) return CpuSimd::kBaseline;
  invalid(kCpuSimd, v);
}

// Validates every switch; throws on the first bad one.
inline void check_all() {
  poison_outputs();
  profiling();
  cuda_graph();
  cpu_cache_mb();
  tap_skipping();
  passive_wait();
  cpu_simd();
}

}  // namespace env

using env::poison_outputs;

}  // namespace deeplab_fast
