// A step team with small steps (forward or backward) checks, inside the call, whether its threads
// pay: with a barrier every step, a team is only as fast as its cores meet. Here that costs 25 ns
// when this VM keeps its two vCPUs close, 150-600 ns when it moves them apart (a phase that comes
// and goes over minutes), and a time slice when another process holds a core; on one thread there
// is no barrier at all. Long-seq LSTM, 2 threads: 0.63 ms in a quiet phase, 1.27 ms in a slow one,
// 0.95 ms on one thread. So before committing, the team measures: a few empty barriers first
// (nearly free), and only if they are slow, some steps each way. Every way gives the same bits.
#pragma once
#include <chrono>
#include <cstdint>
#include <type_traits>
#include "kernel_api.h"
#include "sequence/layout.h"
#include "sequence/step_barrier.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// Steps member 0 runs alone to time them (the team then times as many), or 0 when the team just
// runs. Small steps only: under ~4 us of work a row on one thread (200 KFLOP at the ~50 GFLOP/s
// of such steps), where the meeting's cost decides: a team split by hidden units hands each row's
// state across every step, so a row's work beside its exchange does not grow with the batch. Up
// to 1 MFLOP a step (from there large teams share their blocks out, block_queue.h, which needs
// the steps in one run). A single row's alone steps take ~16 us, within the 20 us the teammate
// spins before it sleeps (StepBarrier::wait; waking it costs more than the probe); bigger steps
// probe 4, the teammate's wake-up then among the team's untimed steps. Sequences under 4 probes
// just run: the probe would be most of the call. Until the rule took a row's work, 2-13
// rows never probed; in-process A/B, 2 threads, the cores far apart, medians: 100x3x100x100 LSTM
// inference 0.664 -> 0.516 ms, training 2.057 -> 1.579; 100x13x64x100 GRU training 6.04 -> 5.29,
// inference 1.809 -> 1.756 (with the cores close, within 1%: the probe's four empty meetings).
constexpr double kProbedRowStepFlops = 2e5, kProbedStepFlops = 1e6;
inline int64_t probe_steps(const LayerShape& s) {
  const double flops = recurrent_step_flops(s);
  if (flops >= kProbedRowStepFlops * double(s.B > 1 ? s.B : 1) || flops >= kProbedStepFlops)
    return 0;
  const int64_t probe = imin<int64_t>(16, imax<int64_t>(4, static_cast<int64_t>(16e3 * 50 / flops)));
  return s.T >= 4 * probe ? probe : 0;
}

// Team steps untimed after the alone ones: the teammate may have gone to sleep meanwhile, and
// both cores fetch back their shares of the weights. One was too few (online-small LSTM
// training, 2 threads: the team judged slower in most calls, 0.84 ms a call against 0.76 with
// three).
constexpr int64_t kTeamWarmSteps = 3;

// Empty barriers over this many ns each mean the cores sit far apart (quiet phases: 25 ns).
constexpr double kFarBarrierNs = 100;

// Runs steps [0, T) on a team of up to nt threads: team_run(member, team, barrier, k0, k1) runs a
// member's share of steps [k0, k1), solo_run(k0, k1) all of them on the calling member. With
// probe > 0 (probe_steps), a verdict recalled in `note` (run_threads_or_alone) is taken at once:
// the team without probing, or all steps on the calling thread, no team started. Else, with the
// cores found far apart, member 0 runs `probe` steps alone, the first untimed (it brings the
// teammate's share of the weights to this core: timed, that fetch counted against running
// alone, and long-seq LSTM on 2 threads chose the team in most calls, 0.83 ms a call against
// 0.69 alone), then the team kTeamWarmSteps untimed and as many timed as alone, and the faster
// way per step runs the rest. Verdicts are counted and noted in `note`
// (if not null), and tests may impose one (kernel_api.h, probe_override).
// prologue(member, team), where given, runs first in each member, and a meeting after it
// publishes its work to the team: or prologue(0, 1) first where the calling thread runs alone.
struct NoPrologue {
  void operator()(int, int) const {}
};
template <typename TeamRun, typename SoloRun, typename Prologue = NoPrologue>
void run_probed_team(int nt, int64_t T, int64_t probe, ProbeNote* note, TeamRun team_run,
                     SoloRun solo_run, Prologue prologue = Prologue()) {
  using Clock = std::chrono::steady_clock;
  auto ns_since = [](Clock::time_point t) {
    return std::chrono::duration<double, std::nano>(Clock::now() - t).count();
  };
  const int recalled = probe > 0 && note ? note->recalled : kProbeNone;
  if (recalled == kProbeFarAlone) {
    probe_count(kProbeRecalledAlone);
    prologue(0, 1);
    return solo_run(0, T);
  }
  if (recalled == kProbeFarTeam) {
    probe_count(kProbeRecalledTeam);
    probe = 0;
  }
  constexpr bool kHasPrologue = !std::is_same_v<Prologue, NoPrologue>;
  bool cores_far = false, alone = false;  // member 0's verdicts, published by barriers
  run_step_team(nt, [&](int member, int team, StepBarrier* barrier) {
    prologue(member, team);
    if (kHasPrologue && barrier && probe == 0) barrier->wait();  // (the probe's meetings follow)
    if (probe == 0 || !barrier) return team_run(member, team, barrier, 0, T);
    const int imposed = probe_override();
    barrier->wait();
    const auto empty = Clock::now();
    for (int i = 0; i < 4; ++i) barrier->wait();
    if (member == 0) {
      cores_far = imposed > 0 || ns_since(empty) > 4 * kFarBarrierNs;
      if (!cores_far) probe_count(kProbeClose);
      if (!cores_far && note) note->verdict = kProbeClose;
    }
    barrier->wait();
    if (!cores_far) return team_run(member, team, barrier, 0, T);
    // Alone: step 0 untimed, 1 .. probe - 1 timed; the team: kTeamWarmSteps untimed, then as
    // many timed as alone.
    const int64_t team_from = probe + kTeamWarmSteps, rest = team_from + probe - 1;
    double alone_ns = 0;
    if (member == 0) {
      solo_run(0, 1);
      const auto start = Clock::now();
      solo_run(1, probe);
      alone_ns = ns_since(start);
    }
    barrier->wait();
    team_run(member, team, barrier, probe, team_from);
    const auto start = Clock::now();
    team_run(member, team, barrier, team_from, rest);
    if (member == 0) {
      alone = imposed > 0 ? imposed == kProbeFarAlone : alone_ns <= ns_since(start);
      probe_count(alone ? kProbeFarAlone : kProbeFarTeam);
      if (note) note->verdict = alone ? kProbeFarAlone : kProbeFarTeam;
    }
    barrier->wait();
    if (!alone) return team_run(member, team, barrier, rest, T);
    if (member == 0) solo_run(rest, T);
  });
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
