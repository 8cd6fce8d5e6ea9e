// C++ check of the deeplab_fast dense CRF op, called through the dispatcher via <deeplab_fast/ops.h>.
//
// Builds a structured 2-label problem (a bright square on a dark background, 40 x 50 pixels) whose noisy
// unary favours the wrong label on a few percent of the pixels, and checks that the op is registered, that
// Q is a proper distribution, that the CRF repairs the noisy pixels, that results are reproducible bit for
// bit, and that bad input throws c10::Error with a helpful message.
//
// Usage: check_dense_crf [--dump DIR]
//   --dump DIR  also writes the problem and its result as raw little-endian arrays (unary.f32 [1,2,40,50],
//               image.u8 [1,3,40,50], q.f32 [1,2,40,50]) for a bitwise comparison with the Python build.
// Prints one line per check and a summary `check_dense_crf: N passed, M failed`; exits 1 on any failure.
#include <deeplab_fast/ops.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <link.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <random>
#include <set>
#include <sstream>
#include <string>

namespace {

constexpr int64_t kH = 40, kW = 50, kL = 2;
// The bright square: rows [10, 30), columns [15, 37).
constexpr int64_t kTop = 10, kBottom = 30, kLeft = 15, kRight = 37;

int g_passed = 0, g_failed = 0;

// Runs one check: `fn` returns an empty string on success, otherwise what went wrong. An exception is a failure.
void check(const std::string& name, const std::function<std::string()>& fn) {
  std::string problem;
  try {
    problem = fn();
  } catch (const std::exception& e) {
    problem = std::string("unexpected exception: ") + e.what();
  }
  if (problem.empty()) {
    ++g_passed;
    std::printf("ok   %s\n", name.c_str());
  } else {
    ++g_failed;
    // c10::Error messages carry a backtrace after the first line: keep the first line only.
    const std::string first = problem.substr(0, problem.find('\n'));
    std::printf("FAIL %s: %s\n", name.c_str(), first.c_str());
  }
  std::fflush(stdout);
}

// Expects `fn` to throw c10::Error whose message contains `needle`.
std::string expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    if (msg.find(needle) == std::string::npos) return "the error does not mention \"" + needle + "\": " + msg;
    return "";
  }
  return "no c10::Error was thrown";
}

bool in_square(int64_t y, int64_t x) { return y >= kTop && y < kBottom && x >= kLeft && x < kRight; }

struct Problem {
  at::Tensor unary;  // [1, L, H, W] float32
  at::Tensor image;  // [1, 3, H, W] uint8
  at::Tensor mask;   // [H, W] int64: 1 inside the square
  int64_t noisy = 0; // pixels whose unary favours the wrong label
};

Problem make_problem() {
  std::mt19937 rng(20240611u);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  std::uniform_int_distribution<int> jitter(-12, 12);
  Problem p;
  p.unary = at::empty({1, kL, kH, kW}, at::kFloat);
  p.image = at::empty({1, 3, kH, kW}, at::kByte);
  p.mask = at::zeros({kH, kW}, at::kLong);
  float* u = p.unary.data_ptr<float>();
  uint8_t* img = p.image.data_ptr<uint8_t>();
  int64_t* m = p.mask.data_ptr<int64_t>();
  const int64_t N = kH * kW;
  for (int64_t y = 0; y < kH; ++y) {
    for (int64_t x = 0; x < kW; ++x) {
      const int64_t i = y * kW + x;
      const int64_t truth = in_square(y, x) ? 1 : 0;
      m[i] = truth;
      const int base[3] = {truth ? 220 : 30, truth ? 200 : 40, truth ? 60 : 90};
      for (int c = 0; c < 3; ++c) img[c * N + i] = static_cast<uint8_t>(base[c] + jitter(rng));
      // Confidence in the true label: 0.6 .. 0.9, except on ~6% of the pixels where the unary is wrong.
      float p_true = 0.6f + 0.3f * uni(rng);
      if (uni(rng) < 0.06f) {
        p_true = 0.1f + 0.25f * uni(rng);
        ++p.noisy;
      }
      u[truth * N + i] = -std::log(p_true);
      u[(1 - truth) * N + i] = -std::log(1.0f - p_true);
    }
  }
  return p;
}

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// Names of the OpenMP runtimes mapped into this process (there must be one: torch's).
int collect_omp(struct dl_phdr_info* info, size_t, void* data) {
  const char* name = info->dlpi_name;
  if (name != nullptr && (std::strstr(name, "libgomp") || std::strstr(name, "libiomp") || std::strstr(name, "libomp")))
    static_cast<std::set<std::string>*>(data)->insert(name);
  return 0;
}

bool write_raw(const std::string& path, const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return false;
  const size_t bytes = c.numel() * c.element_size();
  const bool ok = std::fwrite(c.data_ptr(), 1, bytes, f) == bytes;
  return std::fclose(f) == 0 && ok;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dump_dir;
  for (int a = 1; a < argc; ++a) {
    if (std::strcmp(argv[a], "--dump") == 0 && a + 1 < argc) {
      dump_dir = argv[++a];
    } else {
      std::fprintf(stderr, "usage: %s [--dump DIR]\n", argv[0]);
      return 2;
    }
  }
  std::printf("check_dense_crf: torch threads = %d\n", at::get_num_threads());

  check("dense_crf registered as a composite over dense_crf_features, which has a CPU kernel", [] {
    auto op = c10::Dispatcher::singleton().findSchema({"deeplab_fast::dense_crf", ""});
    if (!op.has_value()) return std::string("deeplab_fast::dense_crf not in the dispatcher (library not loaded?)");
    if (!op->hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd))
      return std::string("dense_crf: no CompositeImplicitAutograd kernel");
    auto features = c10::Dispatcher::singleton().findSchema({"deeplab_fast::dense_crf_features", ""});
    if (!features.has_value()) return std::string("deeplab_fast::dense_crf_features not in the dispatcher");
    if (!features->hasKernelForDispatchKey(c10::DispatchKey::CPU))
      return std::string("dense_crf_features: no CPU kernel");
    const std::string schema = c10::toString(op->schema());
    const std::string want =
        "deeplab_fast::dense_crf(Tensor unary, Tensor image, int iterations, float gaussian_sxy, Tensor "
        "gaussian_compat, float bilateral_sxy, float bilateral_srgb, Tensor bilateral_compat, bool "
        "checkpoint=False) -> Tensor";
    if (schema != want) return "unexpected schema: " + schema;
    return std::string();
  });

  const Problem p = make_problem();
  const int64_t N = kH * kW;
  at::Tensor q;

  check("dense_crf runs; Q has shape [1, 2, 40, 50], float32, finite, in [0, 1]", [&] {
    q = deeplab_fast::dense_crf(p.unary, p.image);
    if (q.sizes() != at::IntArrayRef({1, kL, kH, kW})) return "shape " + shape_str(q);
    if (q.scalar_type() != at::kFloat) return std::string("dtype is not float32");
    if (!at::isfinite(q).all().item<bool>()) return std::string("non-finite values");
    const double lo = q.min().item<double>(), hi = q.max().item<double>();
    if (lo < 0.0 || hi > 1.0) return "values outside [0, 1]: min " + std::to_string(lo) + ", max " + std::to_string(hi);
    return std::string();
  });
  if (!q.defined()) {
    std::printf("check_dense_crf: %d passed, %d failed\n", g_passed, g_failed + 1);
    return 1;
  }

  check("Q sums to 1 over labels within 1e-5", [&] {
    const double err = (q.sum(1) - 1.0).abs().max().item<double>();
    if (!(err <= 1e-5)) return "max |sum - 1| = " + std::to_string(err);
    return std::string();
  });

  check("the CRF repairs the noisy unary (argmax matches the square on >= 99% of pixels)", [&] {
    const double before = (p.unary[0].argmin(0) == p.mask).sum().item<double>() / N;
    const double after = (q[0].argmax(0) == p.mask).sum().item<double>() / N;
    std::printf("     unary argmax accuracy %.4f (%lld noisy pixels), CRF argmax accuracy %.4f\n", before,
                static_cast<long long>(p.noisy), after);
    if (before >= 0.99) return std::string("the problem is too easy: the unary alone reaches 99%");
    if (!(after >= 0.99)) return "CRF accuracy " + std::to_string(after) + " < 0.99";
    return std::string();
  });

  check("a second call gives bitwise-identical output", [&] {
    const at::Tensor q2 = deeplab_fast::dense_crf(p.unary, p.image);
    if (q2.sizes() != q.sizes() || std::memcmp(q2.data_ptr(), q.data_ptr(), q.numel() * sizeof(float)) != 0)
      return std::string("outputs differ");
    return std::string();
  });

  check("0-d tensor compat overload == double overload, bit for bit", [&] {
    const auto w = [](double v) { return at::scalar_tensor(v, at::kFloat); };
    const at::Tensor q2 = deeplab_fast::dense_crf(p.unary, p.image, 10, 3.0, w(3.0), 80.0, 13.0, w(10.0));
    if (!at::equal(q, q2)) return std::string("outputs differ");
    return std::string();
  });

  check("batch of 2 and non-contiguous inputs give the single-image result", [&] {
    const at::Tensor ub = at::cat({p.unary, p.unary.flip({2, 3})}, 0);
    const at::Tensor ib = at::cat({p.image, p.image.flip({2, 3})}, 0);
    // Non-contiguous views of the same values: channels-last copies.
    const at::Tensor un = ub.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor in = ib.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor qb = deeplab_fast::dense_crf(un, in);
    if (qb.sizes() != at::IntArrayRef({2, kL, kH, kW})) return "shape " + shape_str(qb);
    if (!at::equal(qb[0], q[0])) return std::string("image 0 of the batch differs from the single-image call");
    const double acc = (qb[1].argmax(0) == p.mask.flip({0, 1})).sum().item<double>() / N;
    if (!(acc >= 0.99)) return "flipped image accuracy " + std::to_string(acc);
    return std::string();
  });

  check("diagonal [L] and matrix [L, L] compat run and give distributions", [&] {
    const at::Tensor diag = at::full({kL}, -3.0, at::kFloat);
    const at::Tensor mat = at::tensor({0.0f, 10.0f, 10.0f, 0.0f}, at::kFloat).view({kL, kL});
    const at::Tensor qd = deeplab_fast::dense_crf(p.unary, p.image, 5, 3.0, diag, 80.0, 13.0, mat);
    if (qd.sizes() != q.sizes()) return "shape " + shape_str(qd);
    const double err = (qd.sum(1) - 1.0).abs().max().item<double>();
    if (!(err <= 1e-5)) return "max |sum - 1| = " + std::to_string(err);
    return std::string();
  });

  check("iterations = 0 returns softmax(-unary)", [&] {
    const at::Tensor q0 = deeplab_fast::dense_crf(p.unary, p.image, 0);
    const double err = (q0 - at::softmax(-p.unary, 1)).abs().max().item<double>();
    if (!(err <= 1e-6)) return "max |Q - softmax(-unary)| = " + std::to_string(err);
    return std::string();
  });

  check("image with 4 channels throws c10::Error mentioning \"image\"", [&] {
    const at::Tensor bad = at::zeros({1, 4, kH, kW}, at::kByte);
    return expect_error([&] { deeplab_fast::dense_crf(p.unary, bad); }, "image");
  });
  check("float32 image throws c10::Error mentioning \"uint8\"", [&] {
    return expect_error([&] { deeplab_fast::dense_crf(p.unary, p.image.to(at::kFloat)); }, "uint8");
  });
  check("image of another size throws c10::Error mentioning \"image size\"", [&] {
    const at::Tensor bad = at::zeros({1, 3, kH, kW + 1}, at::kByte);
    return expect_error([&] { deeplab_fast::dense_crf(p.unary, bad); }, "image size");
  });
  check("3-D unary throws c10::Error mentioning \"unary\"", [&] {
    return expect_error([&] { deeplab_fast::dense_crf(p.unary[0], p.image); }, "unary");
  });
  check("NaN in the unary throws c10::Error mentioning \"NaN\"", [&] {
    const at::Tensor bad = p.unary.clone();
    bad.view(-1)[7] = std::nan("");
    return expect_error([&] { deeplab_fast::dense_crf(bad, p.image); }, "NaN");
  });
  check("negative iterations throws c10::Error mentioning \"iterations\"", [&] {
    return expect_error([&] { deeplab_fast::dense_crf(p.unary, p.image, -1); }, "iterations");
  });
  check("bilateral_srgb = 0 throws c10::Error mentioning \"bilateral_srgb\"", [&] {
    return expect_error([&] { deeplab_fast::dense_crf(p.unary, p.image, 10, 3.0, 3.0, 80.0, 0.0); },
                        "bilateral_srgb");
  });
  check("compat of the wrong length throws c10::Error mentioning \"compat\"", [&] {
    const at::Tensor bad = at::ones({kL + 1}, at::kFloat);
    const at::Tensor ok = at::scalar_tensor(10.0, at::kFloat);
    return expect_error([&] { deeplab_fast::dense_crf(p.unary, p.image, 10, 3.0, bad, 80.0, 13.0, ok); },
                        "compat");
  });

  check("one OpenMP runtime in the process", [] {
    std::set<std::string> omp;
    dl_iterate_phdr(collect_omp, &omp);
    std::string names;
    for (const auto& n : omp) names += (names.empty() ? "" : ", ") + n;
    std::printf("     OpenMP runtime: %s\n", names.empty() ? "(none)" : names.c_str());
    if (omp.size() > 1) return "several OpenMP runtimes are loaded: " + names;
    return std::string();
  });

  if (!dump_dir.empty()) {
    check("dump the problem and Q to " + dump_dir, [&] {
      if (!write_raw(dump_dir + "/unary.f32", p.unary) || !write_raw(dump_dir + "/image.u8", p.image) ||
          !write_raw(dump_dir + "/q.f32", q))
        return std::string("cannot write to ") + dump_dir;
      return std::string();
    });
  }

  std::printf("check_dense_crf: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
