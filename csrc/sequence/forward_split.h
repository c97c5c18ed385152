// How a forward step is spread over a team: which rows or hidden-unit blocks each member
// takes (StepSplit, make_split), whether the rows split evenly, how many threads a step of this
// size is worth (step_threads), and whether a team shares its unit blocks out as they are done.
#pragma once
#include <cstdint>
#include "common.h"
#include "sequence/block_queue.h"
#include "sequence/layout.h"
#include "sequence/projection_mode.h"
#include "sequence/step_barrier.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// Who does which part of a step.
struct StepSplit {
  int64_t row0, row1;    // batch rows
  int64_t unit0, unit1;  // hidden-unit blocks of NR
  int64_t out0, out1;    // output (projection) blocks of NR
  // One more unit block, for rows [part_row0, part_row1) only (share_boundary_block), or none;
  // of it, only vector part_vector of each gate's panel where that is not -1
  // (share_boundary_vector).
  int64_t part_ub = -1, part_row0 = 0, part_row1 = 0, part_vector = -1;
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

// The MR-row panels of the step's shared packed A: B's whole tiles and one more, so that the
// tiles of a balanced share starting inside a panel keep a panel each (8 rows on two threads:
// tiles at rows 0 and 4, panels 0 and 1).
template <typename T>
inline int64_t shared_a_panels(int64_t B) { return ceil_div<int64_t>(B, Tile<T>::MR) + 1; }

// Whether nthreads members can take B rows in equal shares (split_range), each tiled from its
// first row: 64 rows on 2 threads are 32 + 32, tiles of 12, 12 and 8, where whole tiles from row
// 0 split them 36 + 28; 8 rows are 4 + 4, where whole tiles gave member 0 all 8. Only where
// every row keeps its chains (rows_keep_chains), and the tiles' panels (panel_of_row) are
// distinct and within the shared A (shared_a_panels).
template <typename T>
bool rows_in_equal_shares(int64_t B, int nthreads, bool k_whole = false) {
  constexpr int64_t MR = Tile<T>::MR;
  if (!rows_keep_chains<T>(B, nthreads, k_whole)) return false;
  int64_t last_panel = -1;
  for (int t = 0; t < nthreads; ++t) {
    int64_t r0 = 0, r1 = 0;
    split_range(B, nthreads, t, &r0, &r1);
    for (int64_t m = r0; m < r1; m += MR) {
      if (panel_of_row<T>(m) <= last_panel) return false;
      last_panel = panel_of_row<T>(m);
    }
  }
  return last_panel < shared_a_panels<T>(B);
}

// Whether H's last unit block holds no more units than one vector, of which the steps compute
// only that vector (ForwardLoop::first_half): H = 200 is six blocks of 32 and one of 8.
template <typename T>
bool last_block_one_vector(int64_t H) {
  return Tile<T>::NV > 1 && last_block_units<T>(H) <= Vec<T>::W;
}

// The vectors a row's product computes of unit block ub of a G-gate layer (the FMA kernels):
// NV a gate, one a gate for a last block of no more units than one vector, or the compact
// tail's one or two for all its gates (layout.h).
template <typename T>
int64_t block_vectors(int G, int64_t H, int64_t ub) {
  if (ub < last_unit_block<T>(H)) return G * Tile<T>::NV;
  const int units = compact_tail_units<T>(G, H);
  if (units > 0) return ceil_div<int64_t>(G * units, Vec<T>::W);
  return G * (last_block_one_vector<T>(H) ? 1 : Tile<T>::NV);
}
// The vectors of a row's product in unit blocks [0, end) and in [end, ceil(H / NR)).
template <typename T>
void vectors_split_at(int G, int64_t H, int64_t end, int64_t* before, int64_t* after) {
  *before = *after = 0;
  for (int64_t ub = 0; ub <= last_unit_block<T>(H); ++ub)
    (ub < end ? *before : *after) += block_vectors<T>(G, H, ub);
}

// Where a team of two split by hidden units holds unequal shares (an odd number of unit blocks,
// or a ragged last one: 3 blocks are 2 + 1, so the team's steps took 2 blocks' time), member 0
// hands rows [r, B) of its last block to member 1: boundary_rows gives r, or 0 where no r
// evens the shares. r keeps every row's chains: whole row tiles (a multiple of MR, the tiles of
// one thread), or, within one panel (8 <= B <= MR), half the rows, tiles of 4 rows and up (k
// never split). The same tiles' chains, so the same bits. The panel rows a part tile reads and
// packs lie at row_panel_offset. Not riding along or on AMX tiles (their tiles keep whole
// blocks); such a team keeps its blocks instead of sharing them out (shares_blocks).
// In-process A/B (bench/ab_builds.py), 2 threads, inference, medians, T x B x I x H: 100x8x96x96
// LSTM 0.925 -> 0.781 ms, GRU 0.757 -> 0.620, RNN 0.314 -> 0.281; 50x10x128x200 GRU 2.039 ->
// 1.737, RNN 0.616 -> 0.536; 100x10x64x160 GRU 1.583 -> 1.443; training 100x8x96x96 GRU 2.32
// -> 1.89. The LSTMs that shared their blocks out then: 100x10x64x160 2.005 -> 1.762,
// 50x10x128x200 1.887 -> 1.789, 50x12x256x288 4.868 -> 4.779 (GRU there within noise).
// Counted with the compact tail's vectors (block_vectors), B = 8-12 rows also share where H's
// last block is one (H = 40, 100, 104, 164 on AVX-512): 100x10x64x164 LSTM 2.442 -> 2.399 ms,
// GRU 1.931 -> 1.871, 50x12x128x104 LSTM 1.047 -> 1.005 (the cores far apart; 100x8x100x100
// and 100x8x64x40 within 1%). Since then such batches split by rows where W_ih and W_hh fit L2
// (step_threads), faster still (100x8x100x100 LSTM 0.832 -> 0.733 ms): the rows lent here serve
// bigger weights, and batches of 13-15 rows (12 + 1-3, which split by rows would cut chains).
template <typename T>
int64_t boundary_rows(const LayerShape& s, int nthreads) {
  constexpr int64_t NR = Tile<T>::NR, MR = Tile<T>::MR;
  const int64_t blocks = ceil_div<int64_t>(s.H, NR);
  if (nthreads != 2 || blocks < 2) return 0;
  // member 0: blocks [0, end0), the bigger share; member 1 holds the last one
  const int64_t end0 = ceil_div<int64_t>(blocks, 2);
  // Work in vectors computed (block_vectors): a last block of one vector's units or fewer
  // computes one a gate (micro_kernel's first_half), the compact tail one or two in all.
  // H = 100 (LSTM, AVX-512) is 16 + 9 vectors a row: half of block 1's rows make it 12 + 13.
  const int G = gates_of(s.cell);
  int64_t vectors0 = 0, vectors1 = 0;
  vectors_split_at<T>(G, s.H, end0, &vectors0, &vectors1);
  const int64_t lent = block_vectors<T>(G, s.H, end0 - 1);  // a whole block's
  int64_t best_r = 0, best_load = vectors0 * s.B;  // vector-rows of the busier member
  auto consider = [&](int64_t r) {
    const int64_t moved = lent * (s.B - r);
    const int64_t load = imax(vectors0 * s.B - moved, vectors1 * s.B + moved);
    if (load < best_load) best_load = load, best_r = r;
  };
  if (s.B >= 8 && s.B <= MR) consider(s.B / 2);
  for (int64_t r = MR; r < s.B; r += MR) consider(r);
  return best_r;
}
// Member 0's last unit block (of make_split's, by units, on a team of two) out of its own and
// made both members' part block.
inline void lend_last_block(int tid, StepSplit* p) {
  const int64_t lent = (tid == 0 ? p->unit1 : p->unit0) - 1;  // member 1 starts past it
  if (tid == 0) p->unit1 = lent;
  p->part_ub = lent;
}
// Member tid's split with rows [r, B) of member 0's last block handed to member 1 (r from
// boundary_rows, > 0).
inline void share_boundary_block(int64_t r, int64_t B, int tid, StepSplit* p) {
  lend_last_block(tid, p);
  p->part_row0 = tid == 0 ? 0 : r;
  p->part_row1 = tid == 0 ? r : B;
}

// Member tid's unit blocks [*ub0, *ub1) of H, contiguous, in split_range's shares. Where the
// last block computes one vector and no block's rows are lent (boundary_rows, whose shares are
// split_range's), the bigger shares go to the last members instead of the first, so the lighter
// block lies in a bigger share: a single row with H = 200 on two threads takes 3 + 4 blocks, 6
// and 7 vectors, where 4 + 3 was 8 and 5. Whichever member computes a unit, its chains are the
// same: the same bits. In-process A/B (bench/ab_builds.py), 2 threads, inference, medians,
// T x B x I x H: 64x1x8x200 LSTM 0.308 -> 0.277 ms, GRU 0.249 -> 0.239; 100x1x64x80 LSTM 0.143
// -> 0.129, GRU 0.124 -> 0.113; 50x4x64x200 GRU 0.460 -> 0.423 (LSTM within noise); H = 100
// (4 blocks, no bigger share) unchanged.
template <typename T>
void split_unit_blocks(const LayerShape& s, int nthreads, int tid, int64_t* ub0, int64_t* ub1) {
  const int64_t blocks = ceil_div<int64_t>(s.H, Tile<T>::NR);
  if (!last_block_one_vector<T>(s.H) || boundary_rows<T>(s, nthreads) > 0)
    return split_range(blocks, nthreads, tid, ub0, ub1);
  int64_t r0 = 0, r1 = 0;
  split_range(blocks, nthreads, nthreads - 1 - tid, &r0, &r1);
  *ub0 = blocks - r1;
  *ub1 = blocks - r0;
}

// Whether a team split by hidden units shares its unit blocks out as they are done (BlockQueue)
// instead of each member keeping its own: steps of one phase (the LSTM projection and the
// two-phase GRU meet mid-step), not riding (whose rows each member computes for its own units a
// window ahead), and large (large_team_step).
inline bool shares_blocks(const LayerShape& s, bool rides) {
  const bool one_phase = !s.has_proj && !(s.cell == Cell::Gru && !s.linear_before_reset);
  return one_phase && !rides && large_team_step(s);
}

// A single LSTM row (or GRU row, below) on a team of two with an odd number of unit blocks, the
// last one whole: no rows to lend, so member 0 hands the second vector of its last block to
// member 1 (H = 96 is 2 + 1 blocks: 4 and 2 vectors, now 3 and 3). The row's pass over that
// block's gate panels then covers one vector a member (micro_kernel_row_gates: each lane's
// chains are its own, so the same bits), and so do the riding projection's slices of it (riding,
// only where a slice is one vector: RideTile's kVectors, AVX-512). The LSTM's step is one row
// pass (every gate at once); the GRU's only where its gates meet in one pass (below). In-process
// A/B (bench/ab_builds.py), 2 threads, inference, best / median of 16 blocks, T x B x I x H:
// 100x1x64x160 LSTM 0.342 / 0.346 -> 0.300 / 0.306 ms, 100x1x128x96 0.200 / 0.208 -> 0.183 /
// 0.194, 64x1x8x224 0.451 / 0.469 -> 0.407 / 0.424 (12 blocks); training 100x1x64x96 0.450 ->
// 0.410 (medians).
// Also where H's last block is the compact tail (layout.h), whose gates take one or two vectors
// where each whole block takes 8: H = 100 is 2 + 2 blocks, 16 and 9 vectors, now 12 and 13.
// In-process A/B, 2 threads, inference, medians, T x B x I x H: 100x1x32x100 LSTM 0.164 -> 0.151
// ms, 100x1x64x104 0.185 -> 0.178, 100x1x64x164 0.473 -> 0.459 (training within noise).
// And a GRU's row where its step is one row pass too: one phase (linear_before_reset) whose
// gates meet in one pass (ForwardLoop::row_in_one_pass, projection_rides). In-process A/B, 2
// threads, inference, medians: 100x1x64x96 GRU 0.125 -> 0.116 ms, 100x1x64x160 0.259 -> 0.235,
// 100x1x32x100 0.126 -> 0.119 (100x1x64x104 and training within noise).
// Rows of 2 and up (no rows lent: boundary_rows) hand the vector across too, the LSTM's and the
// GRU's: their tiles then take that block's gate panels one vector at a time
// (ForwardLoop::gate_products), each lane's chains its own, so the same bits. In-process A/B
// (bench/ab_builds.py), 2 threads, inference, medians, T x B x I x H: 100x2x64x96 LSTM 0.235 ->
// 0.212 ms, GRU 0.178 -> 0.168; 100x3x128x160 LSTM 0.712 -> 0.666, GRU 0.548 -> 0.518;
// 100x2x64x224 LSTM 0.727 -> 0.692, GRU 0.538 -> 0.514; 100x2x32x164 LSTM 0.423 -> 0.406. Not
// the Elman RNN's (one gate: a block's extra pass over A for one vector ate the gain, 100x3x128x224
// 0.575 -> 0.607), nor where the team shares its blocks out (shares_blocks), which evens large
// steps out as they run.
template <typename T>
bool shares_boundary_vector(const LayerShape& s, int nthreads, bool rides, bool has_lengths) {
  const bool one_pass = s.cell == Cell::Lstm ||
                        (s.cell == Cell::Gru && s.linear_before_reset &&
                         projection_rides<T>(s, has_lengths));
  const bool tiles = s.B > 1 && gates_of(s.cell) > 1 && !shares_blocks(s, rides);
  if (nthreads != 2 || !(tiles || (s.B == 1 && one_pass)) || Tile<T>::NV != 2 ||
      (rides && RideTile<T>::kVectors != 1))
    return false;
  const int G = gates_of(s.cell);
  const int64_t blocks = ceil_div<int64_t>(s.H, Tile<T>::NR);
  int64_t ub0 = 0, ub1 = 0;
  split_unit_blocks<T>(s, nthreads, 0, &ub0, &ub1);
  if (ub1 <= ub0 || ub1 >= blocks) return false;  // member 0's last block must be a whole one
  int64_t load0 = 0, load1 = 0;  // each member's vectors of the row's pass
  vectors_split_at<T>(G, s.H, ub1, &load0, &load1);
  return imax(load0 - G, load1 + G) < imax(load0, load1);
}
// Member tid's split (make_split's, by units, of a team of two) with the second vector of member
// 0's last block handed to member 1 (shares_boundary_vector).
inline void share_boundary_vector(int tid, StepSplit* p) {
  lend_last_block(tid, p);
  p->part_row0 = p->row0;
  p->part_row1 = p->row1;
  p->part_vector = tid;
}

// Whether the members of a rows split keep k whole in their tiles (ForwardLoop::k_whole): equal
// shares with tiles of 2-3 rows where one thread's are 4 rows or more (rows_k_whole).
template <typename T>
bool members_keep_k_whole(const LayerShape& s, int nthreads) {
  return rows_k_whole(s) && rows_in_equal_shares<T>(s.B, nthreads, true);
}

template <typename T>
StepSplit make_split(const LayerShape& s, int nthreads, int tid, bool by_rows) {
  constexpr int NR = Tile<T>::NR, MR = Tile<T>::MR;
  StepSplit p{0, s.B, 0, ceil_div<int64_t>(s.H, NR), 0, ceil_div<int64_t>(s.Hout, NR)};
  if (nthreads <= 1) return p;
  if (by_rows && rows_in_equal_shares<T>(s.B, nthreads, rows_k_whole(s))) {
    split_range(s.B, nthreads, tid, &p.row0, &p.row1);
  } else if (by_rows) {  // whole row tiles from row 0
    split_range(ceil_div<int64_t>(s.B, MR), nthreads, tid, &p.row0, &p.row1);
    p.row0 = imin<int64_t>(s.B, p.row0 * MR);
    p.row1 = imin<int64_t>(s.B, p.row1 * MR);
  } else {
    split_unit_blocks<T>(s, nthreads, tid, &p.unit0, &p.unit1);
    split_range(ceil_div<int64_t>(s.Hout, NR), nthreads, tid, &p.out0, &p.out1);
  }
  return p;
}
// Where row m of a state packed as MR-row panels from row 0 (AForm::Blocked) lies: its panel,
// then m's place in it (a tile may start inside a panel: share_boundary_block's rows).
template <typename T>
inline int64_t row_panel_offset(int64_t m, int64_t K) {
  constexpr int64_t MR = Tile<T>::MR;
  return (m / MR) * MR * blocked_length<T>(K) + (m % MR) * Vec<T>::W;
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
bool rows_split_evenly(int64_t B, int nthreads, bool k_whole = false) {
  if (rows_in_equal_shares<T>(B, nthreads, k_whole)) return true;
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
// whose row tiles split unevenly (rows_split_evenly).
// Threads with 4 rows or more each split rows too where W_hh and W_ih together fit one core's
// L2 (the step may stream W_ih too: in_step_projection), under 8 rows each only in equal shares
// (rows_in_equal_shares): a team split by units meets every step, and this VM may put its cores
// far apart. In-process A/B (bench/ab_builds.py), 2 threads, medians, T x B x I x H, units ->
// rows, inference: 100x8x100x100 LSTM 0.832 -> 0.733 ms, GRU 0.643 -> 0.565; 100x12x100x100
// LSTM 1.199 -> 1.078, GRU 0.935 -> 0.842; 100x8x32x32 LSTM 0.183 -> 0.102; 100x8x64x64 RNN
// 0.135 -> 0.097; 100x8x100x200 LSTM (960 KB of weights) 2.250 -> 2.029; 100x20x100x200 LSTM
// 6.267 -> 5.343, GRU 4.620 -> 4.150; 100x16x128x160 LSTM 3.459 -> 3.121; training 100x8x100x100
// LSTM 4.638 -> 3.901, GRU 3.965 -> 3.453, 200x8x32x48 GRU 2.718 -> 2.321. Past L2 rows and
// units ran within 2% (100x8x256x256, 50x8x512x512, 50x10x1024x1024 LSTM and GRU; earlier
// 50x16x256x256 LSTM 2.88 -> 2.96). Earlier, 8 rows a thread or more within half of L2:
// 100x16x128x128 RNN 0.610 -> 0.428 ms, LSTM 1.77 -> 1.56, GRU 1.43 -> 1.15, training 1.98 ->
// 1.71, 5.93 -> 5.42, 4.86 -> 4.46; 50x16x256x256 RNN 0.962 -> 0.727; 50x24x256x256 RNN 1.36 ->
// 1.06. Until rows_in_equal_shares took 8-12 rows on two threads (AVX-512), whole tiles from
// row 0 gave member 0 them all, so 4-6 rows a thread measured slower (64x8x256x256 LSTM 2.06 ->
// 3.72 ms, 100x8x128x128 LSTM 1.120 -> 2.092). Shares with tiles of 2-3 rows (2 + 2 rows, or
// 14 + 14 on AVX-512) split rows too where their tiles keep k whole (rows_k_whole).
template <typename T>
int step_threads(const LayerShape& s, int nthreads, bool* by_rows) {
  const int64_t G = gates_of(s.cell);
  const double flops = recurrent_step_flops(s);
  const int64_t half_l2 = l2_cache_bytes() / 2, bytes = sizeof(T);
  const bool weights_fit_l2 = G * s.H * s.Hout * bytes <= half_l2;
  const bool units_split = ceil_div<int64_t>(s.H, Tile<T>::NR) >= nthreads;
  const bool tiles = s.B >= int64_t(nthreads) * 2 * Tile<T>::MR && weights_fit_l2;
  const bool both_fit_l2 = G * s.H * (s.Hout + s.I) * bytes <= l2_cache_bytes();
  const bool k_whole = rows_k_whole(s);
  const bool rows = s.B >= int64_t(nthreads) * 2 && both_fit_l2 &&
                    (s.B >= int64_t(nthreads) * 8 ||
                     rows_in_equal_shares<T>(s.B, nthreads, k_whole));
  *by_rows = (tiles || rows) &&
             (rows_split_evenly<T>(s.B, nthreads, k_whole) || flops < kUnevenRowsMaxStepFlops ||
              !units_split);
  if (nthreads <= 1 || flops < kMinTeamStepFlops) return 1;
  if (!*by_rows && !units_split) return 1;
  return nthreads;
}

// How a forward step of this shape is spread over nthreads: 0 one thread, 1 batch rows, 2 hidden
// units (for tests and the curious: python's _C.step_split).
template <typename T>
int step_split_kind(int cell, int64_t B, int64_t I, int64_t H, int64_t Hout, int nthreads) {
  LayerShape s = diagnostic_shape(cell, B, I, H, Hout);
  bool by_rows = false;
  if (step_threads<T>(s, nthreads, &by_rows) <= 1) return 0;
  return by_rows ? 1 : 2;
}

// Where a team of nthreads split by hidden units at this shape shares a unit block's rows
// (share_boundary_block): the row from which member 1 takes them, or 0 (for tests: python's
// _C.shared_block_rows). The forward leaves out teams that ride along or run on AMX tiles.
template <typename T>
int64_t shared_block_rows(int cell, int64_t B, int64_t I, int64_t H, int64_t Hout, int nthreads) {
  LayerShape s = diagnostic_shape(cell, B, I, H, Hout);
  if (step_split_kind<T>(cell, B, I, H, Hout, nthreads) != 2) return 0;
  return boundary_rows<T>(s, nthreads);
}

// Whether a team of nthreads split by hidden units at this shape hands the second vector of a
// unit block across (share_boundary_vector), where it does not ride along (for tests: python's
// _C.shared_block_vector).
template <typename T>
bool shared_block_vector(int cell, int64_t B, int64_t I, int64_t H, int64_t Hout, int nthreads) {
  LayerShape s = diagnostic_shape(cell, B, I, H, Hout);
  return step_split_kind<T>(cell, B, I, H, Hout, nthreads) == 2 &&
         boundary_rows<T>(s, nthreads) == 0 &&
         shares_boundary_vector<T>(s, nthreads, false, false);
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
