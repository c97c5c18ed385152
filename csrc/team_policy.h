// The adaptive choice between a layer call's threads and one thread, for one shape of call (see
// team_policy.cpp for why). Portable code: included by the portable units only (team_policy.cpp
// and bindings.cpp, which exposes it to the tests); the ISA builds reach it through kernel_api.h.
#pragma once

namespace fusedrnn {

// Times are nanoseconds per step. Threads are trusted until they look slow: their recent
// average over kMargin times one thread's (so that near-ties do not flap), or, before one thread
// has been measured, kSuspect times their own best. Then calls run alone until the time spent alone reaches `patience` times what the slow
// call cost over running alone, and the threads get a try: kTryCalls calls, judged by the better
// (the first call after a spell alone wakes idle threads, on this VM a halted vCPU, which can
// take milliseconds). A try that beats one thread brings the threads back. Patience starts at 1
// (one spike on a quiet machine costs about as much again alone), doubles with every failure up
// to kMaxPatience, so that beside a busy process, where a team's times are bimodal (most calls
// fast, some a time slice or ten late), the slow calls stay a small share of the time; it goes
// back to 1 after kTrusted good calls in a row. One call of each shape, the kExplore-th, runs
// alone to measure it, so that threads slow from the start are found too; apart from that, on a
// quiet machine, nothing runs alone.
class TeamPolicyState {
 public:
  static constexpr double kSuspect = 1.5;
  static constexpr double kMargin = 1.1;
  static constexpr double kMaxPatience = 32;
  static constexpr int kTrusted = 16;
  static constexpr int kExplore = 8;
  static constexpr int kTryCalls = 2;

  bool choose_team() const { return !alone_ || (alone_ns_ > 0 && credit_ >= retry_after_); }

  void report(bool team, double ns) {
    if (!team) {
      alone_ns_ = alone_ns_ > 0 ? (alone_ns_ + ns) / 2 : ns;
      credit_ += ns;
      return;
    }
    team_best_ = team_best_ > 0 && team_best_ < ns ? team_best_ : ns;
    if (alone_) {  // part of a try
      try_best_ = tries_ > 0 && try_best_ < ns ? try_best_ : ns;
      if (++tries_ < kTryCalls) return;
      tries_ = 0;
      if (try_best_ < alone_ns_) {
        alone_ = false;
        team_ns_ = try_best_;  // a fresh average: the old one is from the slow spell
        good_calls_ = 0;
      } else {
        failed(try_best_);
      }
      return;
    }
    team_ns_ = team_ns_ > 0 ? (team_ns_ + ns) / 2 : ns;
    const bool explore = alone_ns_ <= 0 && ++team_calls_ == kExplore;
    if (explore || (alone_ns_ > 0 ? team_ns_ > kMargin * alone_ns_ : team_ns_ > kSuspect * team_best_)) {
      alone_ = true;
      if (explore) {
        retry_after_ = credit_ = 0;  // one call alone, then a try
      } else {
        failed(ns);
      }
    } else if (++good_calls_ >= kTrusted) {
      patience_ = 1;
    }
  }

  bool alone() const { return alone_; }

 private:
  void failed(double ns) {
    const double excess = alone_ns_ > 0 && ns > alone_ns_ ? ns - alone_ns_ : 0;
    retry_after_ = patience_ * excess;
    credit_ = 0;
    patience_ = patience_ * 2 < kMaxPatience ? patience_ * 2 : kMaxPatience;
  }

  double team_ns_ = 0, team_best_ = 0, alone_ns_ = 0;  // 0: not measured yet
  double credit_ = 0, retry_after_ = 0;                  // time alone since the last failure
  double patience_ = 1, try_best_ = 0;
  bool alone_ = false;
  int team_calls_ = 0, tries_ = 0, good_calls_ = 0;
};

}  // namespace fusedrnn
