// The unit blocks of a team's steps, handed out as they are done instead of fixed per member.
// This VM's two vCPUs often run at different speeds for seconds at a time (another tenant on one
// core): two single-thread fastrnns LSTM runs side by side took 366 and 540 ms. With a fixed split
// a step lasts as long as the slower member's half; here each member first takes its own blocks
// (the fixed split's, so a balanced team keeps its weights where they were), then the blocks the
// others have not reached, from the far end of their ranges. Which member computes a block never
// changes its bits.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include "kernel_api.h"
#include "sequence/step_barrier.h"
#include "sequence/team_probe.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// Steps from which a team shares its blocks: at ~40 GFLOP/s a member's half of such a step takes
// tens of microseconds, against a few hundred ns per block handed over between cores.
constexpr double kSharedBlockStepFlops = 1e6;

// Whether a team's steps of this shape are large enough to share their blocks (the forward's
// shares_blocks and the backward's shares_panels say which steps have blocks to share): never
// probed (team_probe.h), and kSharedBlockStepFlops and up.
inline bool large_team_step(const LayerShape& s) {
  return probe_steps(s) == 0 && recurrent_step_flops(s) >= kSharedBlockStepFlops;
}

class BlockQueue {
 public:
  explicit BlockQueue(int members)
      : members_(members), lag_us_(team_lag_us()), ranges_(new Range[2 * members]) {}

  // Member m's own blocks [b0, b1) of step k. Step 0's are set before the team starts; step
  // k + 1's by their owner during step k: nobody touches that step's parity then (step k - 1
  // ended at a barrier), and the barrier that ends step k publishes them.
  void set(int64_t k, int m, int64_t b0, int64_t b1) {
    at(k, m).bits.store((uint64_t(b0) << 32) | uint64_t(b1), std::memory_order_relaxed);
  }

  // The next block of step k for member m, -1 when none is left: its own from the front (from
  // the back when `descending`, as odd steps walk them, see ForwardLoop::cell_phase), then the
  // others' from the other end. Only indices pass here; the data of step k - 1 was published by
  // the barrier before it, and step k's by the one after, so relaxed order is enough.
  int64_t next(int64_t k, int m, bool descending, int64_t* taken_over) {
    int64_t b = take(at(k, m), descending);
    for (int i = 1; b < 0 && i < members_; ++i) {
      b = take(at(k, (m + i) % members_), !descending);
      if (b >= 0) ++*taken_over;
    }
    return b;
  }

  // Tests (set_team_lag_us): every member but the first waits this long at the start of a step,
  // so that the first takes its blocks over.
  void lag(int m) const {
    if (lag_us_ > 0 && m > 0) std::this_thread::sleep_for(std::chrono::microseconds(lag_us_));
  }

 private:
  struct alignas(64) Range {  // (first << 32) | end; a line each, so owners do not collide
    std::atomic<uint64_t> bits{0};
  };
  Range& at(int64_t k, int m) { return ranges_[(k & 1) * members_ + m]; }

  static int64_t take(Range& r, bool from_back) {
    uint64_t v = r.bits.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t first = v >> 32, end = v & 0xffffffffu;
      if (first >= end) return -1;
      const uint64_t w = from_back ? v - 1 : v + (uint64_t(1) << 32);
      if (r.bits.compare_exchange_weak(v, w, std::memory_order_relaxed))
        return static_cast<int64_t>(from_back ? end - 1 : first);
    }
  }

  const int members_;
  const int lag_us_;
  std::unique_ptr<Range[]> ranges_;
};

// The queue of one layer call's team, made by the first member to join. Each member joins with
// its own blocks of the first step and returns once every member has (the call's steps are one
// run from step 0: large steps are never probed, team_probe.h).
class SharedBlocks {
 public:
  BlockQueue* join(int team, int member, int64_t b0, int64_t b1, StepBarrier* barrier) {
    std::call_once(made_, [&] { queue_ = std::make_unique<BlockQueue>(team); });
    queue_->set(0, member, b0, b1);
    barrier->wait();
    return queue_.get();
  }

 private:
  std::unique_ptr<BlockQueue> queue_;
  std::once_flag made_;
};

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
