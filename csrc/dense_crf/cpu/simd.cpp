// The CPU dense CRF's instruction-set level (see simd.h), and deeplab_fast::_cpu_simd() -> str, which reports it
// as JSON for tests and benchmarks: {"active": ..., "supported": [...], "libm_exp": "vector" | "scalar"}.
#include "simd.h"

#include <torch/library.h>

#include <atomic>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__GLIBC__)
#include <gnu/libc-version.h>
#endif

#include "common/env.h"

namespace deeplab_fast {
namespace dense_crf {
namespace cpu {
namespace simd {

namespace {

Level detect() {
#if DLF_X86_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  return avx512 ? kAvx512 : avx2 ? kAvx2 : kBaseline;
#else
  return kBaseline;
#endif
}

std::atomic<int>& active_level() {
  static std::atomic<int> level{static_cast<int>(supported())};
  return level;
}

#if DLF_X86_DISPATCH
// The inputs the check runs: the two floats on which glibc's FMA and non-FMA expf differ, the range ends and
// special values, and 4096 more spread over [-104, 89].
std::vector<float> check_inputs() {
  std::vector<float> x;
  for (uint32_t bits : {0xc27c65d9u, 0x4202422fu}) {
    float f;
    std::memcpy(&f, &bits, 4);
    x.push_back(f);
  }
  const float specials[] = {0.0f, -0.0f, 1.0f, -1.0f, 88.0f, -88.0f, 88.72283f, 88.72284f, -103.27f, -103.28f,
                            -103.97f, -104.0f, -150.0f, 1e-8f, -1e-8f, -__builtin_inff(), __builtin_inff(),
                            __builtin_nanf("")};
  x.insert(x.end(), std::begin(specials), std::end(specials));
  std::mt19937 rng(19);
  std::uniform_real_distribution<float> wide(-104.0f, 89.0f), near(-1.0f, 0.0f);
  for (int k = 0; k < 3072; ++k) x.push_back(wide(rng));
  for (int k = 0; k < 1024; ++k) x.push_back(near(rng));
  while (x.size() % 8 != 0) x.push_back(0.5f);
  return x;
}

template <Level kLevel>
DLF_INLINE bool matches_libm() {
  float (*volatile libm)(float) = static_cast<float (*)(float)>(std::exp);  // the process's expf, not a builtin
  const std::vector<float> x = check_inputs();
  for (size_t i = 0; i < x.size(); i += 8) {
    const vec8 y = exp8_libm<kLevel>(load8(x.data() + i), true);
    for (int k = 0; k < 8; ++k) {
      const float want = libm(x[i + k]);
      if (want != want && y[k] != y[k]) continue;
      if (std::memcmp(&want, &y[k], 4) != 0) return false;
    }
  }
  return true;
}

DLF_TARGET_AVX2 __attribute__((noinline)) bool check_avx2() { return matches_libm<kAvx2>(); }
DLF_TARGET_AVX512 __attribute__((noinline)) bool check_avx512() { return matches_libm<kAvx512>(); }
#endif

bool glibc_2_27_or_later() {
#if defined(__GLIBC__)
  int major = 0, minor = 0;
  if (std::sscanf(gnu_get_libc_version(), "%d.%d", &major, &minor) != 2) return false;
  return major > 2 || (major == 2 && minor >= 27);
#else
  return false;
#endif
}

}  // namespace

const char* level_name(Level level) {
  switch (level) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "baseline";
  }
}

Level supported() {
  static const Level level = detect();
  return level;
}

Level select() {
  const env::CpuSimd want = env::cpu_simd();  // throws std::invalid_argument on a bad value
  Level level = supported();
  if (want != env::CpuSimd::kAuto) {
    level = static_cast<Level>(static_cast<int>(want));
    if (level > supported())
      throw std::runtime_error(std::string("DEEPLAB_FAST_CPU_SIMD=") + level_name(level) +
                               ": this CPU does not support it (it supports up to " + level_name(supported()) +
                               "; avx512 needs AVX-512 F, BW and VL, avx2 needs AVX2 and FMA)");
  }
  active_level().store(static_cast<int>(level), std::memory_order_relaxed);
  return level;
}

Level active() { return static_cast<Level>(active_level().load(std::memory_order_relaxed)); }

bool libm_exp_vectorised() {
  static const bool ok = [] {
#if DLF_X86_DISPATCH
    if (!glibc_2_27_or_later()) return false;
    if (supported() >= kAvx512 && !check_avx512()) return false;
    return supported() >= kAvx2 && check_avx2();
#else
    return false;
#endif
  }();
  return ok;
}

}  // namespace simd
}  // namespace cpu
}  // namespace dense_crf
}  // namespace deeplab_fast

namespace {

std::string cpu_simd_json() {
  using namespace deeplab_fast::dense_crf::cpu::simd;
  Level active_now;
  try {
    active_now = select();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
  std::string s = std::string("{\"active\": \"") + level_name(active_now) + "\", \"supported\": [";
  for (int l = supported(); l >= 0; --l)
    s += std::string("\"") + level_name(static_cast<Level>(l)) + "\"" + (l > 0 ? ", " : "");
  s += std::string("], \"libm_exp\": \"") +
       (libm_exp_vectorised() && active_now >= kAvx2 ? "vector" : "scalar") + "\"}";
  return s;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deeplab_fast, m) { m.def("_cpu_simd() -> str", &cpu_simd_json); }
