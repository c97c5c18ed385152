// A bidirectional layer's two directions side by side: on two threads, each direction runs on
// one thread of its own, start to end, where a team split by hidden units would run them in
// turn and meet at every step of each. Both read the same x and share nothing they write. Each
// direction is the same one-thread computation either way, so the bits do not change.
#pragma once
#include "sequence/backward.h"
#include "sequence/forward.h"
#include "sequence/layer_pipeline.h"  // layer_step_flops

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// Whether the two directions dirs[0] (forward) and dirs[1] (reverse) run side by side: on
// exactly two threads under the fixed thread policy (the adaptive one decides call by call from
// each direction's own times; team_policy.h), unless
// - a direction's work is so small that starting the second thread costs more than it saves
//   (5x1x4x4 LSTM inference, 1.3 KFLOP a direction: 27 us side by side, 25 in turn), or
// - a single row's W_hh fits this core's L2 only halved (more than 3/4 of it, at most twice
//   it): each member of a team streams its half from its own L2, a direction alone all of it
//   from L3 (100x1x256x256 LSTM, 1 MB: x0.91 inference, x0.95 training; 100x1x512x512 Elman
//   x0.96 training), or
// - the two directions' weights would fill most of L3 (more than 3/4 of it), where one
//   direction's fit: each step of each direction then comes from memory (wide's LSTM, 17 MB a
//   direction against 32 MB of L3: x0.84 inference).
// Measured on the Zen 5 host (1 MB L2), in-process A/B of this against in turn, 2 threads,
// medians (bench/HOSTS.md): inference 100x1x128x128 LSTM x1.63, GRU x1.46; 1000x1x32x64 LSTM
// x1.15; training 100x1x128x128 LSTM x1.18, GRU x1.38, 1000x1x32x64 LSTM x1.35, 50x16x256x256
// LSTM x1.15; larger batches within 5% either way.
template <typename Args>
bool directions_side_by_side(const Args* dirs) {
  if (dirs[0].num_threads != 2 || dirs[1].num_threads != 2 || team_mode() != kTeamFixed)
    return false;
  const LayerShape& s = dirs[0].s;
  if (layer_step_flops(s) * double(s.T) < 1e5) return false;
  const double bytes = sizeof(*dirs[0].x), G = gates_of(s.cell);
  const double w_hh_bytes = G * s.H * s.Hout * bytes;
  const double l2 = double(l2_cache_bytes());
  if (s.B == 1 && w_hh_bytes > 0.75 * l2 && w_hh_bytes <= 2 * l2) return false;
  const double weights_bytes = w_hh_bytes + G * s.H * s.I * bytes;
  return 2 * weights_bytes <= 0.75 * double(l3_cache_bytes());
}

// Runs run(dirs[d]) for both directions d, side by side where directions_side_by_side says so
// (each then on one thread), else in turn (each on its threads). Errors of either throw after
// both ran.
template <typename Args, typename RunOne, typename RunOnThreads>
void run_directions(const Args* dirs, bool side_by_side, RunOne run_alone, RunOnThreads run) {
  if (!side_by_side) {
    direction_count(false);
    run(dirs[0]);
    run(dirs[1]);
    return;
  }
  RegionError error;
  bool whole_team = true;
  note_pipeline_team(2);  // the second direction keeps its packed forms on the team's worker
#pragma omp parallel num_threads(2)
  {
    if (team_size() != 2) {  // fewer threads than asked (OMP_THREAD_LIMIT, nesting): in turn
      whole_team = false;
      for (int d = 0; d < 2; ++d) {
        Args alone = dirs[d];
        alone.num_threads = 1;
        error.run([&] { run_alone(alone); });
      }
    } else {
      Args mine = dirs[thread_id()];
      mine.num_threads = 1;
      error.run([&] { run_alone(mine); });
    }
  }
  direction_count(whole_team);
  error.rethrow();
}

template <typename T>
void forward_directions(const ForwardArgs<T>* dirs) {
  run_directions(dirs, directions_side_by_side(dirs),
                 [](const ForwardArgs<T>& a) { forward_on_threads(a); },
                 [](const ForwardArgs<T>& a) { forward(a); });
}

template <typename T>
void backward_directions(const BackwardArgs<T>* dirs) {
  run_directions(dirs, directions_side_by_side(dirs),
                 [](const BackwardArgs<T>& a) { backward_on_threads(a); },
                 [](const BackwardArgs<T>& a) { backward(a); });
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
