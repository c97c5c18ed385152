// The adaptive choice between a layer call's threads and one thread, for one shape of call (see
// team_policy.cpp for why). Portable code: included by the portable units only (team_policy.cpp
// and bindings/module.cpp, which exposes it to the tests); the ISA builds reach it through
// kernel_api.h.
#pragma once

namespace fusedrnn {

// Times are nanoseconds per step. The threads are judged on their last kWindow calls: they look
// slow when the median is over kMargin times one thread's time (a slow spell: this VM's phases,
// where every call on two threads is slower), or the mean over kBusy times (a busy core: most
// calls fast, some a time slice or ten late), or, before one thread has been measured, the
// median over kSuspect times their own best. A short burst of slow calls (another library's
// threads still spinning for a few milliseconds) moves neither. Then calls run alone until the
// time spent alone reaches `patience` times what the last failure cost over running alone, and
// the threads get a try: kTryCalls calls, judged by their median (the first call after a spell
// alone wakes idle threads, on this VM a halted vCPU, which can take milliseconds). A good try
// brings the threads back. Patience starts at 1, doubles with every failure up to kMaxPatience,
// and goes back to 1 after kTrusted good calls in a row. One call of each shape, the
// kExplore-th, runs alone to measure it; apart from that, on a quiet machine, nothing runs
// alone.
class TeamPolicyState {
 public:
  static constexpr int kWindow = 8;
  static constexpr double kMargin = 1.1;
  static constexpr double kBusy = 3.0;
  static constexpr double kSuspect = 1.5;
  static constexpr double kMaxPatience = 32;
  static constexpr int kTrusted = 16;
  static constexpr int kExplore = 8;
  static constexpr int kTryCalls = 3;

  bool choose_team() const { return !alone_ || (alone_ns_ > 0 && credit_ >= retry_after_); }

  void report(bool team, double ns) {
    if (!team) {
      alone_ns_ = alone_ns_ > 0 ? (alone_ns_ + ns) / 2 : ns;
      credit_ += ns;
      return;
    }
    team_best_ = team_best_ > 0 && team_best_ < ns ? team_best_ : ns;
    if (alone_) {  // part of a try
      tries_[n_tries_++] = ns;
      if (n_tries_ < kTryCalls) return;
      n_tries_ = 0;
      const double verdict = median(tries_, kTryCalls);
      if (verdict < alone_ns_) {
        alone_ = false;
        n_window_ = 0;  // a fresh window: the old one is from the slow spell
        good_calls_ = 0;
      } else {
        failed(verdict);
      }
      return;
    }
    window_[next_] = ns;
    next_ = (next_ + 1) % kWindow;
    if (n_window_ < kWindow) ++n_window_;
    const bool explore = alone_ns_ <= 0 && ++team_calls_ == kExplore;
    if (explore) {
      alone_ = true;
      retry_after_ = credit_ = 0;  // one call alone, then a try
    } else if (looks_slow()) {
      alone_ = true;
      failed(median(window_, n_window_));
    } else if (++good_calls_ >= kTrusted) {
      patience_ = 1;
    }
  }

  bool alone() const { return alone_; }

 private:
  bool looks_slow() const {
    if (n_window_ < kWindow / 2) return false;
    const double med = median(window_, n_window_);
    if (alone_ns_ <= 0) return med > kSuspect * team_best_;
    double sum = 0;
    for (int i = 0; i < n_window_; ++i) sum += window_[i];
    return med > kMargin * alone_ns_ || sum / n_window_ > kBusy * alone_ns_;
  }

  void failed(double ns) {
    const double excess = alone_ns_ > 0 && ns > alone_ns_ ? ns - alone_ns_ : 0;
    retry_after_ = patience_ * kTryCalls * excess;
    credit_ = 0;
    patience_ = patience_ * 2 < kMaxPatience ? patience_ * 2 : kMaxPatience;
    good_calls_ = 0;
  }

  static double median(const double* v, int n) {
    double s[kWindow];
    for (int i = 0; i < n; ++i) s[i] = v[i];
    for (int i = 1; i < n; ++i)  // insertion sort: n <= 8
      for (int j = i; j > 0 && s[j - 1] > s[j]; --j) {
        const double t = s[j];
        s[j] = s[j - 1];
        s[j - 1] = t;
      }
    return n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
  }

  double window_[kWindow] = {}, tries_[kTryCalls] = {};
  double team_best_ = 0, alone_ns_ = 0;   // 0: not measured yet
  double credit_ = 0, retry_after_ = 0;   // time alone since the last failure
  double patience_ = 1;
  bool alone_ = false;
  int next_ = 0, n_window_ = 0, n_tries_ = 0, team_calls_ = 0, good_calls_ = 0;
};

}  // namespace fusedrnn
