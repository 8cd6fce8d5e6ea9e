// The CPU parallelism of the dense CRF: a small pool of worker threads that share each parallel loop with the
// calling thread, chunk by chunk, taken dynamically.
//
// Why not at::parallel_for (OpenMP): a mean-field call runs about a hundred short parallel loops, and OpenMP
// splits each statically into one piece per thread and ends it with a barrier where the threads spin. On a
// machine busy with other work (data loaders, another job), a descheduled thread stalls every barrier while
// the others burn their cores spinning, so 2 threads ran 1.5-2.8x slower than 1 (issue 14). Here:
//   - a loop is cut into several chunks per thread, claimed one at a time from a shared counter, so a thread
//     that runs takes the work of one that does not;
//   - a thread with nothing left to claim spins only briefly (DEEPLAB_FAST_THREADS_WAIT=passive, the default),
//     then sleeps, freeing its core for the thread that holds the last chunk;
//   - each element is still computed by one thread, in a fixed order, so results are bitwise identical for any
//     thread count and any schedule.
// The caller always takes part, so a loop finishes even if no worker ever wakes. Loops started inside a chunk,
// or while another thread's loop is running, run inline on their thread. In a process forked after the pool
// started (multiprocessing "fork", DataLoader workers), the workers do not exist: every loop runs inline, as does
// ATen (deeplab_fast sets torch's threads to 1 in forked children), so nothing waits for a thread that is gone.
//
// The thread count is at::get_num_threads() (torch.set_num_threads).
#pragma once

#include <algorithm>
#include <cstdint>

namespace deeplab_fast {
namespace parallel {

// The threads a loop may use now: at::get_num_threads(), or 1 inside a chunk and in a forked child.
int num_threads();

// Runs fn(ctx, chunk) for every chunk in [0, chunks), on the calling thread and the pool's workers.
void run(int64_t chunks, void (*fn)(void*, int64_t), void* ctx);

// f(begin, end) over [begin, end) in chunks of a multiple of `grain` elements (several chunks per thread, so that
// work moves to the threads that run). Chunk boundaries are multiples of `grain` from `begin`.
template <typename F>
void for_range(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (end <= begin) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t n = end - begin, threads = num_threads();
  const int64_t units = (n + grain - 1) / grain;
  if (threads <= 1 || units <= 1) {
    f(begin, end);
    return;
  }
  constexpr int64_t kChunksPerThread = 8;
  const int64_t per_chunk = std::max<int64_t>(1, units / (threads * kChunksPerThread));
  const int64_t step = per_chunk * grain, chunks = (n + step - 1) / step;
  struct Ctx {
    const F* f;
    int64_t begin, end, step;
  } ctx{&f, begin, end, step};
  run(chunks,
      [](void* p, int64_t c) {
        const Ctx& x = *static_cast<const Ctx*>(p);
        const int64_t b = x.begin + c * x.step;
        (*x.f)(b, std::min(x.end, b + x.step));
      },
      &ctx);
}

// f(i) for every i in [0, count), each index a chunk of its own (for a few large, independent pieces of work).
template <typename F>
void for_each(int64_t count, const F& f) {
  run(count, [](void* p, int64_t i) { (*static_cast<const F*>(p))(i); }, const_cast<F*>(&f));
}

// Throws if the user interrupted the process (Ctrl-C) since the last check: called between steps of long work
// (mean-field iterations, images), so that an interrupt stops it promptly. A no-op unless a hook is installed:
// the Python module installs one that, on Python's main thread only, runs Python's signal handlers and rethrows
// their exception (KeyboardInterrupt) through the op. A chunk that throws stops the loop once the chunks already
// claimed are done; the exception reaches the caller.
void check_interrupt();
void set_interrupt_hook(void (*hook)());

}  // namespace parallel
}  // namespace deeplab_fast
