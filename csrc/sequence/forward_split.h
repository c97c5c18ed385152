// How a forward step is spread over a team: which rows or hidden-unit blocks each member
// takes (StepSplit, make_split), whether the rows split evenly, how many threads a step of this
// size is worth (step_threads), and whether a team shares its unit blocks out as they are done.
#pragma once
#include <cstdint>
#include "common.h"
#include "sequence/block_queue.h"
#include "sequence/layout.h"
#include "sequence/step_barrier.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// Who does which part of a step.
struct StepSplit {
  int64_t row0, row1;    // batch rows
  int64_t unit0, unit1;  // hidden-unit blocks of NR
  int64_t out0, out1;    // output (projection) blocks of NR
};

// Where a row tile starting at row m keeps its MR-row panel in the step's shared packed A
// (AForm::Blocked, ForwardLoop::a_shared): panel ceil(m / MR), which is m / MR for whole tiles
// from row 0 and stays one panel per tile for the balanced shares below.
template <typename T>
inline int64_t panel_of_row(int64_t m) { return ceil_div<int64_t>(m, Tile<T>::MR); }
// That panel's offset in a packed A of rows K long.
template <typename T>
inline int64_t shared_panel_offset(int64_t m, int64_t K) {
  return panel_of_row<T>(m) * Tile<T>::MR * blocked_length<T>(K);
}

// Whether nthreads members can take B rows in equal shares (split_range), each tiled from its
// first row: 64 rows on 2 threads are 32 + 32, tiles of 12, 12 and 8, where whole tiles from row
// 0 split them 36 + 28. Only where every row keeps its chains (rows_keep_chains), and the tiles'
// panels (panel_of_row) are distinct and within the shared A.
template <typename T>
bool rows_in_equal_shares(int64_t B, int nthreads) {
  constexpr int64_t MR = Tile<T>::MR;
  if (!rows_keep_chains<T>(B, nthreads)) return false;
  int64_t last_panel = -1;
  for (int t = 0; t < nthreads; ++t) {
    int64_t r0 = 0, r1 = 0;
    split_range(B, nthreads, t, &r0, &r1);
    for (int64_t m = r0; m < r1; m += MR) {
      if (panel_of_row<T>(m) <= last_panel) return false;
      last_panel = panel_of_row<T>(m);
    }
  }
  return last_panel < ceil_div<int64_t>(B, MR);
}

template <typename T>
StepSplit make_split(const LayerShape& s, int nthreads, int tid, bool by_rows) {
  constexpr int NR = Tile<T>::NR, MR = Tile<T>::MR;
  StepSplit p{0, s.B, 0, ceil_div<int64_t>(s.H, NR), 0, ceil_div<int64_t>(s.Hout, NR)};
  if (nthreads <= 1) return p;
  if (by_rows && rows_in_equal_shares<T>(s.B, nthreads)) {
    split_range(s.B, nthreads, tid, &p.row0, &p.row1);
  } else if (by_rows) {  // whole row tiles from row 0
    split_range(ceil_div<int64_t>(s.B, MR), nthreads, tid, &p.row0, &p.row1);
    p.row0 = imin<int64_t>(s.B, p.row0 * MR);
    p.row1 = imin<int64_t>(s.B, p.row1 * MR);
  } else {
    split_range(ceil_div<int64_t>(s.H, NR), nthreads, tid, &p.unit0, &p.unit1);
    split_range(ceil_div<int64_t>(s.Hout, NR), nthreads, tid, &p.out0, &p.out1);
  }
  return p;
}

// Rows go to members in equal shares where rows_in_equal_shares allows, else in whole row tiles,
// and then some batches split unevenly: 100 rows are eight 12-row tiles and a 4-row one, 60 +
// 40, and the bigger share paces every step. Where the biggest share is over 5% above an even
// one and a step is big enough (kUnevenRowsMaxStepFlops) that a barrier per step is noise,
// hidden units split instead. In-process A/B, 2 threads, medians, rows 36 + 28 -> units,
// B = 64: RNN H = 512 23.1 -> 22.4 ms, LSTM H = 256 22.0 -> 20.6, GRU H = 256 17.0 -> 16.3
// (training 1-2% faster); smaller steps lost with units (GRU B = 128, H = 64: 2.81 -> 3.21),
// and even splits (B = 48, 96, 256) kept rows. Units -> rows in equal shares (32 + 32), T = 100,
// inference: fastrnns RNN 22.3 -> 21.7 ms, B = 64 H = 256 RNN 6.02 -> 5.69, GRU 17.0 -> 15.8,
// LSTM 21.0 -> 20.8 (training within 2%).
template <typename T>
bool rows_split_evenly(int64_t B, int nthreads) {
  if (rows_in_equal_shares<T>(B, nthreads)) return true;
  const int64_t tiles = ceil_div<int64_t>(B, Tile<T>::MR);
  const int64_t largest = imin<int64_t>(B, ceil_div<int64_t>(tiles, nthreads) * Tile<T>::MR);
  return largest * nthreads * 20 <= B * 21;
}
constexpr double kUnevenRowsMaxStepFlops = 1e7;

// Threads worth using for one step of this size. Splitting costs a barrier per step (a few
// hundred ns when both cores are ours, a scheduler time slice when another process holds one), so
// steps under ~30 KFLOP run on one thread. Above that even tiny steps gain: at B=1 the step is
// bound by streaming W_hh from L2, and two cores each stream half (2 threads, medians:
// online-small LSTM 0.41 -> 0.30 ms, long-seq LSTM 1.07 -> 0.84 ms, online-small RNN 0.113 ->
// 0.094 ms; long-seq GRU, 25 KFLOP a step, 0.80 -> 0.84 ms, so it stays on one thread).
// Rows are split (no barrier) when each thread gets at least two row tiles and the recurrent
// weights fit half of one core's L2, since each thread then reads all of them every step;
// bigger weights are split by hidden units, so each core streams only its share of them
// (fastrnns LSTM, 2 threads: median 227-247 ms by rows, 211-222 ms by units), and so are batches
// whose row tiles split unevenly (rows_split_evenly). Threads with 8 to 2 tiles' rows each split
// rows too where W_ih also fits (the step may stream it too: in_step_projection): a team split
// by units meets every step, and this VM may put its cores far apart (2 threads, in-process A/B,
// one layer, TxBxIxH: 100x16x128x128 RNN 0.610 -> 0.428 ms, LSTM 1.77 -> 1.56, GRU 1.43 ->
// 1.15, training 1.98 -> 1.71, 5.93 -> 5.42, 4.86 -> 4.46; 50x16x256x256 RNN 0.962 -> 0.727;
// 50x24x256x256 RNN 1.36 -> 1.06. Not with 4 rows each, 64x8x256x256 LSTM 2.06 -> 3.72, nor
// with W_hh and W_ih past half of L2, 50x16x256x256 LSTM 2.88 -> 2.96).
template <typename T>
int step_threads(const LayerShape& s, int nthreads, bool* by_rows) {
  const int64_t G = gates_of(s.cell);
  const double flops = recurrent_step_flops(s);
  const int64_t half_l2 = l2_cache_bytes() / 2, bytes = sizeof(T);
  const bool weights_fit_l2 = G * s.H * s.Hout * bytes <= half_l2;
  const bool both_fit_l2 = G * s.H * (s.Hout + s.I) * bytes <= half_l2;
  const bool units_split = ceil_div<int64_t>(s.H, Tile<T>::NR) >= nthreads;
  const bool tiles = s.B >= int64_t(nthreads) * 2 * Tile<T>::MR && weights_fit_l2;
  const bool rows = s.B >= int64_t(nthreads) * 8 && both_fit_l2;
  *by_rows = (tiles || rows) &&
             (rows_split_evenly<T>(s.B, nthreads) || flops < kUnevenRowsMaxStepFlops ||
              !units_split);
  if (nthreads <= 1 || flops < kMinTeamStepFlops) return 1;
  if (!*by_rows && !units_split) return 1;
  return nthreads;
}

// How a forward step of this shape is spread over nthreads: 0 one thread, 1 batch rows, 2 hidden
// units (for tests and the curious: python's _C.step_split).
template <typename T>
int step_split_kind(int cell, int64_t B, int64_t I, int64_t H, int64_t Hout, int nthreads) {
  LayerShape s{1, B, I, H, Hout, static_cast<Cell>(cell), true, false, true, Hout != H};
  bool by_rows = false;
  if (step_threads<T>(s, nthreads, &by_rows) <= 1) return 0;
  return by_rows ? 1 : 2;
}

// Whether a team split by hidden units shares its unit blocks out as they are done (BlockQueue)
// instead of each member keeping its own: steps of one phase (the LSTM projection and the
// two-phase GRU meet mid-step), not riding (whose rows each member computes for its own units a
// window ahead), and large (large_team_step).
inline bool shares_blocks(const LayerShape& s, bool rides) {
  const bool one_phase = !s.has_proj && !(s.cell == Cell::Gru && !s.linear_before_reset);
  return one_phase && !rides && large_team_step(s);
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
