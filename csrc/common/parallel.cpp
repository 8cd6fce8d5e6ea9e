// The dense CRF's worker pool (see parallel.h).
//
// A loop ("job") is published as a generation number and a chunk counter packed in one 64-bit word
// (generation << 32 | next chunk); a thread claims chunk i by a compare-and-swap of that word, so a thread that
// wakes late, after its job is over, fails the swap and cannot touch the next job's chunks. The job's function
// and sizes live in one of two slots (generation & 1): the caller publishes job g + 1 only after job g is done,
// so a slot is never rewritten while a claimed chunk of its job runs. Waiting threads spin briefly (pause), then
// sleep on a condition variable.
#include "parallel.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "env.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DLF_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define DLF_PAUSE() asm volatile("yield")
#else
#define DLF_PAUSE() ((void)0)
#endif

namespace deeplab_fast {
namespace parallel {

namespace {

thread_local bool in_chunk = false;         // nested loops run inline
std::atomic<bool> forked_child{false};      // set in a child forked after the pool started

// Pause iterations a waiting thread spins before it sleeps: about 20-50 microseconds when passive (enough to
// catch the next loop of a mean-field iteration), a few milliseconds when DEEPLAB_FAST_THREADS_WAIT=spin.
int spin_iterations() {
  static const int n = env::passive_wait() ? 1000 : 200000;
  return n;
}

class Pool {
 public:
  static Pool& instance() {
    static Pool* pool = new Pool();  // never destroyed: its threads outlive static destruction
    return *pool;
  }

  // Runs the job on the caller and up to `threads` - 1 workers; false if another job is running (the caller
  // then runs it inline).
  bool run(int64_t chunks, void (*fn)(void*, int64_t), void* ctx, int threads) {
    bool expected = false;
    if (!busy_.compare_exchange_strong(expected, true, std::memory_order_acquire)) return false;
    ensure_workers(threads - 1);
    const uint32_t g = static_cast<uint32_t>(state_.load(std::memory_order_relaxed) >> 32) + 1;
    Slot& s = slots_[g & 1];
    s.fn.store(fn, std::memory_order_relaxed);
    s.ctx.store(ctx, std::memory_order_relaxed);
    s.chunks.store(chunks, std::memory_order_relaxed);
    s.done.store(0, std::memory_order_relaxed);
    s.workers.store(threads - 1, std::memory_order_relaxed);
    state_.store(static_cast<uint64_t>(g) << 32, std::memory_order_seq_cst);  // publish
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      work_cv_.notify_all();
    }
    work(g, /*is_caller=*/true);
    // Wait for the chunks other threads claimed.
    struct Release {
      Pool* pool;
      ~Release() {
        pool->error_ = nullptr;
        pool->busy_.store(false, std::memory_order_release);
      }
    } release{this};
    for (int spin = 0; s.done.load(std::memory_order_acquire) < chunks; ++spin) {
      if (spin < spin_iterations()) {
        DLF_PAUSE();
        continue;
      }
      std::unique_lock<std::mutex> lock(mutex_);
      caller_waiting_.store(true, std::memory_order_seq_cst);
      done_cv_.wait(lock, [&] { return s.done.load(std::memory_order_acquire) >= chunks; });
      caller_waiting_.store(false, std::memory_order_relaxed);
      break;
    }
    if (error_) std::rethrow_exception(error_);  // the first chunk that threw
    return true;
  }

 private:
  struct Slot {
    std::atomic<void (*)(void*, int64_t)> fn{nullptr};
    std::atomic<void*> ctx{nullptr};
    std::atomic<int64_t> chunks{0};
    std::atomic<int64_t> done{0};
    std::atomic<int> workers{0};
  };

  void ensure_workers(int count) {
    if (static_cast<int>(threads_.size()) >= count) return;
    std::lock_guard<std::mutex> lock(spawn_mutex_);
    while (static_cast<int>(threads_.size()) < count) {
      const int id = static_cast<int>(threads_.size());
      threads_.emplace_back([this, id] { worker(id); });
    }
  }

  // Claims and runs chunks of job g until none is left (or the job is over).
  void work(uint32_t g, bool is_caller) {
    Slot& s = slots_[g & 1];
    const int64_t chunks = s.chunks.load(std::memory_order_relaxed);
    void (*fn)(void*, int64_t) = s.fn.load(std::memory_order_relaxed);
    void* ctx = s.ctx.load(std::memory_order_relaxed);
    uint64_t p = state_.load(std::memory_order_acquire);
    while (static_cast<uint32_t>(p >> 32) == g && static_cast<int64_t>(p & 0xffffffffu) < chunks) {
      if (!state_.compare_exchange_weak(p, p + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      in_chunk = true;
      try {
        fn(ctx, static_cast<int64_t>(p & 0xffffffffu));
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      in_chunk = false;
      if (s.done.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks && !is_caller &&
          caller_waiting_.load(std::memory_order_seq_cst)) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_cv_.notify_all();
      }
      p = state_.load(std::memory_order_acquire);
    }
  }

  void worker(int id) {
    uint32_t seen = static_cast<uint32_t>(state_.load(std::memory_order_acquire) >> 32);
    for (;;) {
      uint32_t g = seen;
      for (int spin = 0; spin < spin_iterations() && g == seen; ++spin) {
        DLF_PAUSE();
        g = static_cast<uint32_t>(state_.load(std::memory_order_acquire) >> 32);
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        work_cv_.wait(lock, [&] {
          return static_cast<uint32_t>(state_.load(std::memory_order_seq_cst) >> 32) != seen;
        });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        g = static_cast<uint32_t>(state_.load(std::memory_order_acquire) >> 32);
      }
      seen = g;
      // The job's slot is valid for generation g while the state still says g (work() checks it per claim).
      if (id < slots_[g & 1].workers.load(std::memory_order_relaxed)) work(g, /*is_caller=*/false);
    }
  }

  std::atomic<uint64_t> state_{0};
  Slot slots_[2];
  std::atomic<bool> busy_{false};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> caller_waiting_{false};
  std::mutex mutex_;
  std::condition_variable work_cv_, done_cv_;
  std::mutex spawn_mutex_;
  std::vector<std::thread> threads_;
  std::mutex error_mutex_;
  std::exception_ptr error_;  // the first exception a chunk of the current job threw
};

// In a forked child: no workers, and torch single-threaded, so no parallel region waits for a thread that only
// existed in the parent (GNU OpenMP's pool does not survive fork; torch's own ops hang there otherwise).
void after_fork_in_child() {
  forked_child.store(true);  // the pool (whose threads are gone) is never used again in this process
  at::set_num_threads(1);
}

const bool fork_handler_installed = [] {
  pthread_atfork(nullptr, nullptr, &after_fork_in_child);
  return true;
}();

void (*interrupt_hook)() = nullptr;

}  // namespace

int num_threads() {
  if (in_chunk || forked_child.load(std::memory_order_relaxed)) return 1;
  return std::max(1, at::get_num_threads());
}

void run(int64_t chunks, void (*fn)(void*, int64_t), void* ctx) {
  if (chunks <= 0) return;
  TORCH_CHECK(chunks < (int64_t{1} << 31), "deeplab_fast: too many parallel chunks (", chunks, ")");
  const int threads = num_threads();
  if (chunks == 1 || threads <= 1 || !Pool::instance().run(chunks, fn, ctx, std::min<int64_t>(threads, chunks))) {
    struct Inline {  // what fn starts runs inline too
      bool nested = in_chunk;
      Inline() { in_chunk = true; }
      ~Inline() { in_chunk = nested; }
    } guard;
    for (int64_t c = 0; c < chunks; ++c) fn(ctx, c);
  }
}

void check_interrupt() {
  if (interrupt_hook != nullptr) interrupt_hook();
}

void set_interrupt_hook(void (*hook)()) { interrupt_hook = hook; }

}  // namespace parallel
}  // namespace deeplab_fast
