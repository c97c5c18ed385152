// Riding or one GEMM, measured per shape. Where a single row's steps run, on one thread or on a
// step team, its input projection can ride along the steps (sequence/projection_mode.h,
// projection_rides) or run as one GEMM before them. Both give the same bits (every element the same
// FMA chains, k in order in blocks of kSumBlock, then the bias; tests/test_kernels.py checks it),
// but which is faster depends on the host as much as on the shape: riding fills FMA slots that a
// row streaming W_hh from L2 leaves idle, and how many it leaves depends on the core's L1 and L2.
// On Zen 4 riding won (online-small LSTM 0.40 -> 0.34 ms); on this Xeon (48 KB L1, 2 MB L2) one
// GEMM wins at most shapes (in-process A/B, 1 thread, medians, riding -> GEMM: long-seq LSTM 0.616
// -> 0.581 ms, long-seq GRU 0.436 -> 0.385, 100x1x256x256 LSTM 1.484 -> 1.287) and riding at a few
// (300x1x32x128 LSTM 0.690 against 0.709). Why, in a C++ loop (online-small's 256 KB of W_hh,
// 64-byte aligned, 1 thread): the bare stream takes 1.6-1.7 us a step, and with a ride's 4096 FMAs
// a step in the same loop (tiles of 8x1, 8x2 or 4x2 vectors, operands in L1) 2.5-2.6 us. The ride
// costs 0.9-1.0 us, no less than those FMAs as part of one GEMM (0.7), and even 4096 FMAs on
// registers alone add 0.4: this core leaves few FMA slots idle while L1 fills from L2. So the first
// calls of each shape take turns, kRuns timed calls each way, and from then on the shape runs the
// way whose best call was faster per step. A team's trial is its own (RideKey::team): on the same
// Zen 4 a team of two riding won at online-small and lost at long-seq, as one thread did.
#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <tuple>
#include "kernel_api.h"

namespace fusedrnn {
namespace {

// One shape's trial. The best call of each way, not the mean: the first call of a way packs its
// weights, and this VM's slow spells last seconds.
struct RideTrial {
  static constexpr int kRuns = 4;
  int runs[2] = {0, 0};  // [0] one GEMM, [1] riding
  double best[2] = {0, 0};
  int decided = -1;      // the way chosen (1 riding), or -1 while on trial

  bool ride() const { return decided >= 0 ? decided == 1 : runs[1] <= runs[0]; }
  void report(bool rode, double ns) {
    if (decided >= 0) return;
    const int way = rode ? 1 : 0;
    best[way] = runs[way] ? std::min(best[way], ns) : ns;
    ++runs[way];
    if (runs[0] >= kRuns && runs[1] >= kRuns) decided = best[1] <= best[0] ? 1 : 0;
  }
};

using Key = std::tuple<const char*, int, int, bool, int64_t, int64_t, int64_t, int, bool>;

struct RideTrials {
  std::mutex mu;
  std::map<Key, RideTrial> trials;
  std::atomic<int> override_way{-1};
  std::atomic<int64_t> calls[2] = {{0}, {0}};
};

RideTrials& ride_trials() {
  static RideTrials* r = new RideTrials();  // never destroyed: calls may run during interpreter exit
  return *r;
}

Key key_of(const RideKey& k) {
  return Key{k.isa, k.dtype_bytes, k.cell, k.training, k.I, k.H, k.Hout, step_count_bucket(k.T),
             k.team};
}

}  // namespace

bool ride_policy_choose(const RideKey& key) {
  RideTrials& r = ride_trials();
  const int forced = r.override_way.load(std::memory_order_relaxed);
  bool ride = forced == 1;
  if (forced < 0) {
    std::lock_guard<std::mutex> lock(r.mu);
    if (r.trials.size() > 4096) r.trials.clear();  // bounded: shapes come and go
    ride = r.trials[key_of(key)].ride();
  }
  r.calls[ride ? 1 : 0].fetch_add(1, std::memory_order_relaxed);
  return ride;
}

void ride_policy_report(const RideKey& key, bool rode, double ns_per_step) {
  RideTrials& r = ride_trials();
  if (r.override_way.load(std::memory_order_relaxed) >= 0) return;
  std::lock_guard<std::mutex> lock(r.mu);
  r.trials[key_of(key)].report(rode, ns_per_step);
}

void ride_policy_trials(int64_t* on_trial, int64_t* decided) {
  RideTrials& r = ride_trials();
  std::lock_guard<std::mutex> lock(r.mu);
  on_trial[0] = on_trial[1] = decided[0] = decided[1] = 0;
  for (const auto& [key, trial] : r.trials)
    ++(trial.decided >= 0 ? decided : on_trial)[std::get<8>(key)];
}

int64_t ride_policy_calls(bool rode) {
  return ride_trials().calls[rode ? 1 : 0].load(std::memory_order_relaxed);
}

void set_ride_override(int way) {
  RideTrials& r = ride_trials();
  r.override_way.store(way, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(r.mu);
  r.trials.clear();
}

}  // namespace fusedrnn
