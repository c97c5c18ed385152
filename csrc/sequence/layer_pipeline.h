// A stack of layers on as many threads as layers: thread k runs layer k alone, a step behind
// the layer below, whose output it reads as its input. Against each layer in turn on a team
// split by hidden units, no team barrier at every step, no x_t packed by every member, and each
// layer's step runs at the one-thread speed; the cost is the one step the top layer lags. Each
// layer is the same one-thread computation either way, so the bits do not change.
#pragma once
#include <exception>
#include <memory>
#include <vector>
#include "sequence/forward.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// FLOPs of one step of a layer (the recurrent and input products, and the LSTM projection).
inline double layer_step_flops(const LayerShape& s) {
  const double proj = s.has_proj ? double(s.H) * s.Hout : 0;
  return 2.0 * s.B * (gates_of(s.cell) * double(s.H) * (s.I + s.Hout) + proj);
}

// Whether the n layers of `layers` (layer k's x is layer k - 1's y) pipeline: one thread a layer
// (num_threads == n) under the fixed thread policy (the adaptive one decides layer by layer,
// from each layer's own times; team_policy.h), every layer's step k is time k for every row (no
// lengths, forward direction), each layer above the first computes its input projection inside its steps
// (in_step_when_pipelined: the whole-sequence GEMM would need all of x first), and the slowest layer
// is within 2% of the mean, the lag of one step included: a team splits its steps over its
// threads within a few percent of evenly (stacked LSTM, 2 threads, 2.8% over the one-thread
// halves), a pipeline runs as slow as its slowest layer.
template <typename T>
bool stack_pipelines(const ForwardArgs<T>* layers, int n) {
  if (n < 2 || layers[0].num_threads != n || team_mode() != kTeamFixed) return false;
  double sum = 0, most = 0;
  for (int k = 0; k < n; ++k) {
    const ForwardArgs<T>& a = layers[k];
    const LayerShape& s = a.s;
    if (a.lengths || s.reverse || s.B == 0 || s.T != layers[0].s.T) return false;
    if (k > 0 && (a.x != layers[k - 1].y || !in_step_when_pipelined<T>(s))) return false;
    const double flops = layer_step_flops(s);
    sum += flops;
    most = flops > most ? flops : most;
  }
  return most * (layers[0].s.T + 1) / layers[0].s.T <= 1.02 * sum / n;
}

// Runs the layers bottom to top: pipelined on n threads where stack_pipelines says so, else
// each on its own in turn (forward(), with its threads). Counts which (stack_count).
template <typename T>
void forward_stack(const ForwardArgs<T>* layers, int n) {
  if (!stack_pipelines(layers, n)) {
    stack_count(false);
    for (int k = 0; k < n; ++k) forward(layers[k]);
    return;
  }
  std::vector<StepProgress> progress(n);
  std::vector<std::exception_ptr> errors(n);
  std::unique_ptr<bool[]> x_unsplit(new bool[n]());  // see ForwardLoop::x_unsplit, state_unsplit
  bool whole_team = true;
  note_pipeline_team(n);  // its layers above the first keep packed forms on the team's workers
#pragma omp parallel num_threads(n)
  {
    if (team_size() != n) {  // fewer threads than asked (OMP_THREAD_LIMIT, nesting): in turn
      if (thread_id() == 0) {
        whole_team = false;
        for (int k = 0; k < n; ++k) {
          ForwardArgs<T> alone = layers[k];
          alone.num_threads = 1;
          try {
            forward_on_threads(alone);
          } catch (...) {
            errors[k] = std::current_exception();
            break;
          }
        }
      }
    } else {
      const int k = thread_id();
      ForwardArgs<T> mine = layers[k];
      mine.num_threads = 1;
      try {
        forward_on_threads(mine, k > 0 ? &progress[k - 1] : nullptr, &progress[k], &x_unsplit[k]);
        progress[k].publish(mine.s.T);
      } catch (...) {
        errors[k] = std::current_exception();
        progress[k].fail();  // the layers above stop waiting; the call throws below
      }
    }
  }
  stack_count(whole_team);
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
  // A layer whose steps ran on AMX tiles before all of its x was there (amx_step, x_later) and
  // then met rows that do not split: on its own it would have scanned x first and taken the FMA
  // kernels, so it runs again so, and so does every layer above it, whose input changed. So
  // does a layer (the first too) whose state did not split (ForwardLoop::state_unsplit).
  for (int k = 0; k < n; ++k)
    if (x_unsplit[k]) {
      for (int j = k; j < n; ++j) forward(layers[j]);
      break;
    }
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
