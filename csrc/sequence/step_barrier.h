// The barrier of a step team (forward.h's hidden-unit split, backward.h's time loop): a short
// spin, then sleep. Also how a team is started, and run_threads_or_alone, where a layer call meets
// the adaptive thread policy.
//
// Why not `#pragma omp barrier`: libgomp spins up to ~300k iterations (milliseconds) before it
// sleeps. When another library's thread pool is still spinning on the other core (torch after
// an op, as in a model using fusedrnn.torch), the waiting thread spins away the time slice its
// teammate needs: stacked LSTM, 2 threads, ran 15 ms alone and up to 24-31 ms right after a torch
// call. Sleeping after ~20 us lets the scheduler hand the core to the teammate at once; a step's
// own imbalance (a few microseconds) stays within the spin.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include "common.h"
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

inline void relax_cpu() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// What a team member's wait throws once another member has failed (StepBarrier::abort): the
// members leave their steps, and the call throws the failed member's error (run_step_team).
struct TeamAborted {};

class StepBarrier {
 public:
  explicit StepBarrier(int members) : members_(members) {}
  StepBarrier(const StepBarrier&) = delete;
  StepBarrier& operator=(const StepBarrier&) = delete;

  // Returns once every member has called wait() for this phase; what a member wrote before its
  // call is visible to every member after it (release/acquire on the generation).
  // The last to arrive takes the mutex and signals only when someone sleeps: with both cores ours
  // the others are still spinning. C++ loop, 2 threads, interleaved runs: 163-172 ns a barrier
  // either way when the cores talk fast, 280-330 instead of 480-600 ns when they do not.
  void wait() {
    const unsigned gen = generation_.load(std::memory_order_acquire);
    if (aborted_.load(std::memory_order_acquire)) throw TeamAborted();
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == members_) {
      arrived_.store(0, std::memory_order_relaxed);
      // seq_cst with the sleepers' count: a member either sees the new generation before it
      // sleeps, or is counted before we look (Dekker), so no wake-up is lost.
      generation_.store(gen + 1, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) {
        std::lock_guard<std::mutex> lock(mutex_);
        wake_.notify_all();
      }
      return;
    }
    const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(20);
    for (int i = 0;; ++i) {
      if (generation_.load(std::memory_order_acquire) != gen) return check_aborted();
      relax_cpu();
      if ((i & 63) == 63 && std::chrono::steady_clock::now() > spin_until) break;
    }
    std::unique_lock<std::mutex> lock(mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    wake_.wait(lock, [&] { return generation_.load(std::memory_order_seq_cst) != gen; });
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    check_aborted();
  }

  // A member failed and will not come: every wait, now and later, throws TeamAborted.
  void abort() {
    aborted_.store(true, std::memory_order_seq_cst);
    generation_.fetch_add(1, std::memory_order_seq_cst);  // (the spinners look at it)
    std::lock_guard<std::mutex> lock(mutex_);
    wake_.notify_all();
  }

 private:
  void check_aborted() const {
    if (aborted_.load(std::memory_order_acquire)) throw TeamAborted();
  }

  // One cache line for the three counters and the abort flag: a barrier then moves one line to
  // the last member and back. On their own lines (alignas(64)) a 2-member barrier took 300 instead of 165 ns.
  const int members_;
  std::atomic<int> arrived_{0};
  std::atomic<unsigned> generation_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> aborted_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
};

// How far one layer of a pipelined stack (layer_pipeline.h) has come: the steps it has finished,
// published with release so that the layer above, which reads those steps' outputs as its input,
// sees them once wait_for returns. A layer that failed publishes kFailed, which releases every
// waiter (the call then throws). On its own cache line: the layer above polls it every step.
struct alignas(64) StepProgress {
  static constexpr int64_t kFailed = INT64_MAX;
  std::atomic<int64_t> steps{0};

  void publish(int64_t n) { steps.store(n, std::memory_order_release); }
  void fail() { publish(kFailed); }
  // Fails the progress where the scope it guards is left by an exception: its waiters go on
  // (on garbage), and the call throws.
  struct FailOnThrow {
    StepProgress& progress;
    const int uncaught = std::uncaught_exceptions();
    ~FailOnThrow() {
      if (std::uncaught_exceptions() > uncaught) progress.fail();
    }
  };
  // Spins while the layer below is about to finish (a step is tens of microseconds at most where
  // stacks pipeline), then yields the core, in case the layer below waits for it.
  void wait_for(int64_t n) const {
    for (int i = 0; steps.load(std::memory_order_acquire) < n; ++i) {
      if (i < 4096) relax_cpu();
      else std::this_thread::yield();
    }
  }
};

// Steps with less work than this stay on one thread, forward and backward: the reasons and the
// measurements are at forward_split.h's step_threads.
constexpr double kMinTeamStepFlops = 3e4;

// Runs fn(member, team, barrier) on a team of up to nt threads that meet at `barrier` (null for
// a team of one). The team may come out smaller than asked (OMP_THREAD_LIMIT, nesting), so the
// barrier is sized by the first member to see the team.
// A member that throws (a MemoryError) aborts the barrier, so the others stop waiting for it,
// and the call throws its error after the team.
template <typename Fn>
void run_step_team(int nt, Fn fn) {
  std::unique_ptr<StepBarrier> barrier;
  std::once_flag made;
  RegionError error;
#pragma omp parallel num_threads(nt)
  {
    DenormalsFlushed ftz_worker;
    const int team = team_size();
    error.run([&] { std::call_once(made, [&] { barrier = std::make_unique<StepBarrier>(team); }); });
#pragma omp barrier
    if (!error.failed() &&
        !error.run([&] { fn(thread_id(), team, team == 1 ? nullptr : barrier.get()); }))
      barrier->abort();
  }
  error.rethrow();
}

// Runs a layer call, run(args) (ForwardArgs or BackwardArgs), on args.num_threads threads or on
// one, as the adaptive policy chooses for this shape (team_policy.cpp; with the default fixed
// policy, always the threads), and reports its time per step back to it. On the threads, the
// step team's probe takes the verdict remembered for this shape, or remembers what it finds
// (team_probe.h, ProbeNote).
template <typename Args, typename Run>
void run_threads_or_alone(const Args& a, bool backward, Run run) {
  if (a.num_threads <= 1) return run(a);
  const LayerShape& s = a.s;
  const TeamKey key{kIsaName, int(sizeof(*a.x)), int(s.cell), backward, s.T, s.B, s.I, s.H, s.Hout,
                    a.num_threads};
  const bool use_threads = team_policy_choose(key);
  const auto start = std::chrono::steady_clock::now();
  if (use_threads) {
    ProbeNote note;
    note.recalled = probe_recall(key);
    Args noted = a;
    noted.probe_note = &note;
    run(noted);
    if (note.verdict != kProbeNone) probe_remember(key, note.verdict);
  } else {
    Args alone = a;
    alone.num_threads = 1;
    run(alone);
  }
  const double ns =
      std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
  team_policy_report(key, use_threads, ns / double(s.T > 0 ? s.T : 1));
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
