// The CPU ops' threads. The extension is compiled without OpenMP, and at::parallel_for is a
// header template whose body then runs serially (every op ran on one thread whatever
// torch.set_num_threads said). So an op runs on torch's intra-op thread count of threads: the
// calling thread plus helper threads of our own, all taking work from one shared counter. A
// helper that has not started when the caller is done is cancelled rather than waited for,
// so a busy machine (or a forked child, which has no helper threads) cannot hang a call; a
// cancelled task touches only its own shared state flag. Torch glue, not kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

namespace memory3::cpu_launch {

// Work items are taken from a shared counter, so threads that drew cheap items take more.
struct WorkQueue {
  std::atomic<int64_t> next{0};
  int64_t size = 0;
  bool pop(int64_t& i) { return (i = next.fetch_add(1, std::memory_order_relaxed)) < size; }
};

// Plain threads waiting for tasks. Not torch's inter-op pool (at::launch): its tasks carry the
// caller's ThreadLocalState, and a pool thread still releasing one while the interpreter shut
// down ended the process with "terminate called without an active exception" (1 run in 5 at
// exit after backward calls at 2 threads). These threads never touch Python, and the pool is
// never destroyed: threads waiting for work end with the process.
class HelperThreads {
 public:
  static HelperThreads& get() {
    static HelperThreads* pool = new HelperThreads();
    return *pool;
  }

  // Queues f for a helper, first starting threads until there are `threads` of them.
  void post(std::function<void()> f, int64_t threads) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (; started_ < threads; ++started_) std::thread([this] { serve(); }).detach();
    tasks_.push_back(std::move(f));
    ready_.notify_one();
  }

 private:
  void serve() {
    for (;;) {
      std::function<void()> f;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return !tasks_.empty(); });
        f = std::move(tasks_.front());
        tasks_.pop_front();
      }
      f();
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> tasks_;
  int64_t started_ = 0;
};

// Runs worker(queue) on min(torch's intra-op thread count, items) threads sharing one queue of
// `items` work items; returns when every item is done.
template <typename Worker>
void run_on_threads(int64_t items, const Worker& worker) {
  if (items <= 0) return;
  WorkQueue queue;
  queue.size = items;
  const int64_t helpers = std::min<int64_t>(at::get_num_threads(), items) - 1;
  enum : int { kQueued, kRunning, kDone, kCancelled };
  std::shared_ptr<std::atomic<int>[]> state(new std::atomic<int>[std::max<int64_t>(helpers, 1)]);
  for (int64_t h = 0; h < helpers; ++h) state[h].store(kQueued);
  for (int64_t h = 0; h < helpers; ++h)
    HelperThreads::get().post(
        [state, h, &worker, &queue] {
          int expected = kQueued;
          if (!state[h].compare_exchange_strong(expected, kRunning)) return;
          worker(queue);
          state[h].store(kDone, std::memory_order_release);
        },
        helpers);
  worker(queue);
  for (int64_t h = 0; h < helpers; ++h) {
    int expected = kQueued;
    if (state[h].compare_exchange_strong(expected, kCancelled)) continue;
    while (state[h].load(std::memory_order_acquire) != kDone) std::this_thread::yield();
  }
}

// at::parallel_for's contract on these threads: f(r0, r1) over disjoint ranges covering
// [0, n), each at least `grain` long (but the last), in chunks of a few per thread so a
// thread slowed by the machine's other load leaves its share to the others.
template <typename F>
void parallel_ranges(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>({grain, 1, (n + 4 * threads - 1) / (4 * threads)});
  run_on_threads((n + chunk - 1) / chunk, [&](WorkQueue& queue) {
    int64_t i;
    while (queue.pop(i)) f(i * chunk, std::min(n, (i + 1) * chunk));
  });
}

}  // namespace memory3::cpu_launch
