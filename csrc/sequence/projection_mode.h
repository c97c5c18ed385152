// How the forward computes the input projection x_t W_ih^T for a shape: one GEMM over the whole
// sequence before the time loop, inside each step's tiles, or riding along a single row's steps.
// Where the bits differ (in the step or not), the choice depends on the shape only, so results
// stay bitwise the same for any thread count; forward.h carries it out. Riding and one GEMM give
// the same bits, and the shape's first calls, alone or on a team, measure which is faster
// (RideChoice, ride_policy.cpp).
#pragma once
#include <chrono>
#include <cstdint>
#include "common.h"
#include "kernel_api.h"
#include "gemm/gemm.h"  // amx_build_for
#include "gemm/microkernel.h"
#include "sequence/amx_step.h"  // kAmxSmallStepRows
#include "sequence/layout.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// Batch rows from which the input projection runs inside the steps (in_step_projection).
constexpr int64_t kInStepRows = 8;

// Whether the input projection runs inside each step's tiles (x_t W_ih^T into an L1-resident
// tile right before the recurrent product) instead of as one whole-sequence GEMM before the loop:
// where a step has rows enough for the micro-kernel's tiles, and every row's step is the same
// time (no lengths), so x_t's rows lie together. Then Gx never goes through memory, and on a team
// split by hidden units each member computes its own columns of it, instead of reading the rows
// the other core computed. Each element is the same FMA chains whichever way is chosen (k in
// order in blocks of kSumBlock, then the bias), except that a tile of 1-3 rows splits k (KSplit),
// so the choice depends on the shape only, never on the threads.
// In-process A/B, a layer (two builds each, medians): stacked LSTM 8.21 -> 8.06 ms on 1 thread,
// 4.78 -> 4.59 on 2; stacked GRU on 2 threads 4.08 -> 3.71; wide LSTM on 1 thread 547 -> 535.
// Every step then streams W_ih beside W_hh, so both must stay in L3 (deepbench LSTM, 32 MB of
// weights, 2 threads: 2% slower in the step); and from 8 rows (B = 4, I = H = 256: 4% slower).
// And what a unit block's tiles meet at every row tile must fit half of L2 (in_step_block_bytes):
// on a 512 KB L2 (Zen 3), fastrnns' 512 KB went to L3 and back at each block. In-process A/B
// there, medians, in the step -> one GEMM, 1 thread: fastrnns LSTM 473 -> 457 ms (training 1419
// -> 1357), GRU 386 -> 337 (1063 -> 984); 2 threads: LSTM 233 -> 229, GRU 195 -> 180. Wide (417
// and 348 KB) within noise either way; stacked (160 KB) stays in the step.
template <typename T>
int64_t in_step_block_bytes(const LayerShape& s) {
  // W_ih's and W_hh's gate panels of the block, and the step's packed rows of x_t and h
  return (gates_of(s.cell) * int64_t(Tile<T>::NR) + s.B) * (s.I + s.Hout) * int64_t(sizeof(T));
}
//
// In the amx build a float32 GEMM before the loop runs on AMX tiles (gemm_amx.h), and the step's
// weights are split for them, 6 bytes a weight (amx_step.h). Where W_ih's and W_hh's split no
// longer fit L2 together and W_ih is a quarter of the stream or more (4 I >= Hout), both came
// from L3 every step, and one GEMM before the loop wins: for an Elman RNN (whose Gx goes into
// y) at any batch, for LSTM and GRU under 48 rows (from 48 a step's row groups share each
// streamed panel, and their Gx, G times wider, goes through memory). In-process A/B (runs
// alternating, best of three medians), 1 thread, inference, T x B x I x H: LSTM 50x16x256x256
// (the stacked config) x1.29, GRU x1.21, 50x16x128x320 x1.15, 50x16x256x768 x1.07, 50x8x256x256
// x1.13, 100x12x512x512 x1.22, 100x16x512x512 x1.26, 50x32x256x256 x1.08, 100x32x512x512 x1.07,
// GRU x1.10; RNN 100x64x512x512 x1.17, 25x64x1024x1024 x1.14, 100x32x512x512 x1.20,
// 100x128x512x512 x1.06; training 50x16x256x256 LSTM x1.09, GRU x1.06, RNN 100x64x512x512
// x0.98-1.06, 25x64x1024x1024 x0.99-1.04 (two A/B runs). Kept in the step (the GEMM's factor):
// both fitting L2, LSTM 50x16x160x160 x0.95, 50x8x128x128 x0.96, RNN 50x16x256x256 x0.91,
// 100x64x256x256 x0.91;
// W_ih small beside W_hh, LSTM 200x32x64x1024 x0.93, 50x32x128x1024 x0.94; LSTM and GRU from 48
// rows: 100x48x512x512 x1.01, fastrnns (64 rows) LSTM x0.90-0.95, GRU x0.92-0.95.
// On 2 threads the stacked LSTM and GRU then no longer pipeline their layers (layer_pipeline.h
// needs the upper layers' projection in the step): inference x0.92 and x0.83 against the
// pipeline, training x0.97 (before gemm_amx.h's smaller row blocks won back x1.04-1.08); the
// layers API, 1 thread, x1.24-1.27 and x1.18-1.19.
// The FMA kernels' counterpart, measured on a 1 MB L2 (Zen 5): where W_ih and W_hh no longer fit
// L2 together but W_hh alone fits twice the L2 or less, and W_ih is a quarter of the stream or
// more, streaming both from L3 every step lost to one GEMM before the loop and W_hh alone in the
// step: for the RNN at any batch, for LSTM and GRU under 40 rows (at 48 rows on 2 threads the
// LSTM lost x0.91). In-process A/B (bench/ab_builds.py), medians, 1 thread, inference,
// T x B x I x H: 50x16x256x256 (the stacked config) LSTM x1.06, GRU x1.07 (2 threads x1.05,
// x1.00; training x1.02, x1.05), 50x8x256x256 LSTM x1.07, GRU x1.10, 50x32x256x256 x1.03 and
// x1.03, 100x16x128x320 x1.02 and x1.03, RNN 50x16x512x512 x1.09 (2 threads x1.07). Kept in the
// step: W_hh over twice the L2, 50x16x512x512 LSTM x0.98; 48 rows, LSTM x1.00 (2 threads x0.91).
// A pipelined stack of such layers takes the projection in the steps all the same
// (in_step_when_pipelined).
// One rule for both, with the build's figures: the amx build's float32 steps stream the
// weights split for the tiles (6 bytes a weight) and took the GEMM under 48 rows with no bound
// on W_hh; the FMA kernels stream them as they lie and take it under 40 rows while W_hh is
// within twice the L2.
template <typename T>
bool projection_apart(const LayerShape& s) {
  const bool amx = amx_build_for<T>();
  const int64_t G = gates_of(s.cell), l2 = l2_cache_bytes();
  const int64_t bytes = amx ? 6 : int64_t(sizeof(T));
  const bool rows = G == 1 || s.B < (amx ? 48 : 40);
  const bool both_past_l2 = G * s.H * (s.I + s.Hout) * bytes > l2;
  const bool w_hh_near_l2 = amx || G * s.H * s.Hout * bytes <= 2 * l2;
  return rows && both_past_l2 && w_hh_near_l2 && 4 * s.I >= s.Hout;
}
// in_step_projection's conditions but pads_little and projection_apart.
template <typename T>
bool in_step_fits(const LayerShape& s, bool has_lengths) {
  const int64_t weight_bytes = gates_of(s.cell) * s.H * (s.I + s.Hout) * int64_t(sizeof(T));
  return !has_lengths && s.I > 0 && s.B >= kInStepRows && 3 * weight_bytes <= 2 * l3_cache_bytes() &&
         2 * in_step_block_bytes<T>(s) <= l2_cache_bytes();
}
// The step's tiles take whole unit blocks (NR units a gate), so a small or ragged H pads the
// in-step projection's columns, which the GEMM before the loop (G*H wide) does not: past a
// quarter of padding the GEMM wins. In-process A/B (bench/ab_builds.py), medians, 1 thread,
// inference, in the step -> the GEMM, T x B x I x H: LSTM 20x128x100x8 0.359 -> 0.184 ms (torch.nn
// 0.28), GRU 0.286 -> 0.182; LSTM 50x16x256x40 0.517 -> 0.378, 50x64x256x100 5.03 -> 4.53,
// 20x128x100x17 0.409 -> 0.359; training and 2 threads alike (LSTM 20x128x100x8 training 0.734
// -> 0.584 ms). A padding of an eighth or less (H = 200, 240, 250, 500) was within noise.
template <typename T>
bool pads_little(const LayerShape& s) {
  return 4 * ceil_div<int64_t>(s.H, Tile<T>::NR) * Tile<T>::NR <= 5 * s.H;
}
template <typename T>
bool in_step_projection(const LayerShape& s, bool has_lengths) {
  return in_step_fits<T>(s, has_lengths) && pads_little<T>(s) && !projection_apart<T>(s);
}

// Whether a layer of a pipelined stack (layer_pipeline.h: one thread a layer, no lengths) takes
// its projection in the step: where the rule above does, and on the FMA kernels also where it
// fits but projection_apart chose the GEMM. A layer above the first cannot have its whole x
// before its steps, and the first one's GEMM would hold every layer above back for its length
// (a projection is about half a layer's work). These steps then keep k whole in tiles of 1-3
// rows too (ForwardLoop::split_in_step_k), so each element is the GEMM's chain and the layer
// gives the bits it gives on its own, on any threads. In-process A/B (bench/ab_builds.py
// --stack), stacked config, 2 threads, medians, against the GEMM and the layers in turn on the
// team: while the cores met slowly, LSTM inference 4.64 -> 3.99 ms, GRU 3.72 -> 3.20, training
// 17.00 -> 15.63 and 12.80 -> 12.16; with them close, within 1% (4.21 -> 4.16, 3.20 -> 3.16,
// 13.71 -> 13.70, 10.41 -> 10.36). Only the layers above the first in the step (the first one's
// GEMM before its loop): LSTM 6.02, GRU 4.54 ms against 4.19 and 3.30.
// The amx build's float32 steps keep the rule where tiles may run the layer: their tiles'
// in-step bits were never made the GEMM's (and with AMX the pipeline lost there anyway, see
// above). Where neither its steps (a batch under kAmxSmallStepRows) nor its GEMM before the loop
// (amx_gemm_shape_takes) can take tiles, the layer is the FMA kernels' and pipelines as theirs
// do: fusedrnn.LSTM(16, 16, num_layers=2) pipelined on AVX-512 but not on AMX hosts once
// pads_little sent H = 16 to the GEMM.
template <typename T>
bool tiles_may_take_layer(const LayerShape& s) {
#if defined(FUSEDRNN_AMX)
  return amx_build_for<T>() &&
         (s.B >= kAmxSmallStepRows ||
          amx_gemm_shape_takes(s.T * s.B, gates_of(s.cell) * s.H, s.I, false));
#else
  (void)s;
  return false;
#endif
}
template <typename T>
bool in_step_when_pipelined(const LayerShape& s) {
  return in_step_projection<T>(s, false) ||
         (!tiles_may_take_layer<T>(s) && in_step_fits<T>(s, false));
}

// Whether the input projection rides along the steps of a single LSTM or GRU row: the B = 1 step
// streams W_hh from L2 (or L3) with the FMA pipes mostly idle, so each of a window's kRideRows
// steps also computes a slice of the next window's projection, a RideTile in the same loop as
// the row (micro_kernel_row_gates), instead of a whole-sequence GEMM before the loop that
// had the pipes to itself. Every element still has the same chains (k in order in blocks of
// kSumBlock, then the bias; 4-row tiles never split k; the whole-sequence GEMM splits it only in
// a last tile of 1-3 rows).
// In-process A/B, medians, 1 thread: online-small LSTM 0.403 -> 0.352 ms (training 1.128 ->
// 1.038), long-seq 0.847 -> 0.819, 1000x1x32x128 3.04 -> 2.90, 100x1x512x512 7.06 -> 6.81;
// 2 threads: online-small 0.256 -> 0.228, long-seq training 1.78 -> 1.73. The GRU's first
// phase then meets its gates in one pass too: online-small 0.323 -> 0.283, long-seq 0.747 ->
// 0.691 (training 1.868 -> 1.816). (A first version that gave each step a quarter of every
// gate's k, reloading the partial sums, lost 10% on long-seq: too little work per reload.)
// It pays while the tile's FMAs hide behind the row's stream from L2: per unit block a step
// streams G * Hout lines of W_hh (at 32 bytes a cycle here, 4 G Hout cycles) and the tile makes
// 8 I one-vector FMAs (one a cycle), so up to I = G Hout / 2. Past that (100x1x2048x64 LSTM:
// 1.17 -> 1.32 ms), or with W_hh in L3 (200x1x512x1024 LSTM: 59 -> 81 ms), the GEMM is better.
template <typename T>
bool projection_rides(const LayerShape& s, bool has_lengths) {
  const int G = gates_of(s.cell);
  const bool fits =
      s.cell == Cell::Lstm ? ride_fits<T, 4>() : s.cell == Cell::Gru && ride_fits<T, 3>();
  const bool hidden = 2 * s.I <= G * s.Hout;
  const bool from_l2 = G * s.H * s.Hout * int64_t(sizeof(T)) <= l2_cache_bytes();
  return !has_lengths && s.I > 0 && s.B == 1 && fits && hidden && from_l2;
}
constexpr int64_t kRideRows = RideTile<float>::kRows;
// A gate's panel in RideTiles, and a window's steps compute one each: every slice of the LSTM's
// 4 gates (the GRU's 3 leave steps free).
constexpr int64_t kRideSlices = Tile<float>::NV / RideTile<float>::kVectors;
static_assert(kRideRows == 4 * kRideSlices && Tile<double>::NV == Tile<float>::NV,
              "a window is the LSTM's gates' slices");

// How the forward computes x_t W_ih^T for a shape: 0 one GEMM before the loop, 1 in the step's
// tiles (in_step_projection), 2 riding along the single row's steps (projection_rides), on one
// thread or on a step team (each member its own units' share of every window). Riding or one
// GEMM is then measured per shape and team (RideChoice): which wins depends on the host. On a
// Xeon (2 MB L2) a team riding lost (in-process A/B, 2 threads, medians, riding -> one GEMM,
// inference / training: online-small LSTM 0.296 -> 0.256 / 0.881 -> 0.714 ms, GRU 0.309 ->
// 0.270 / 0.710 -> 0.639, long-seq LSTM 0.676 -> 0.628 / 1.762 -> 1.610), and so it never rode;
// on Zen 4 (1 MB L2) it won where W_hh streams from L2 (one GEMM -> riding, 2 threads, two
// runs, mins: online-small LSTM 0.247 -> 0.223 and 0.252 -> 0.227 ms, GRU 0.246 -> 0.221 and
// 0.247 -> 0.217, 100x1x256x256 LSTM 0.827 -> 0.772 and 0.850 -> 0.809) and lost on long-seq's
// LSTM (64 KB: 0.610 -> 0.659, 0.612 -> 0.662), as on one thread. The same bits: both make the
// same chains for every element (k in order in blocks of kSumBlock, then the bias;
// input_projection never splits k), and the GRU row's recurrent product keeps its one pass
// (ForwardLoop::row_in_one_pass).
template <typename T>
int projection_mode(const LayerShape& s, bool has_lengths) {
  if (in_step_projection<T>(s, has_lengths)) return 1;
  return projection_rides<T>(s, has_lengths) ? 2 : 0;
}

// Where projection_mode says ride, this call rides or runs one GEMM as the shape's trial says
// (ride_policy.cpp): the same bits either way, and which is faster depends on the host. Times
// the call from the choice to its end and reports it.
// A step team's calls go to the trial they run as: a team whose probe's recalled verdict walks
// alone (team_probe.h) is a one-thread call, and a call whose own probe timed steps both ways is
// neither, not reported. Before, a process's first call of a shape often found the cores far
// apart (the teammate just woken), its verdict walked the next 15 calls alone, and the team's
// trial, taken in those, chose the GEMM for online-small's LSTM on 2 threads in 4 of 12 fresh
// processes (0.255 ms a call against 0.240 riding); now in 1 of 12.
class RideChoice {
 public:
  // key.team: whether the steps run on a team; note: the call's probe note, or null.
  RideChoice(int* mode, RideKey key, const ProbeNote* note)
      : key_(key), note_(note), on_trial_(*mode == 2) {
    if (!on_trial_) return;
    if (note_ && note_->recalled == kProbeFarAlone) key_.team = false;
    if (!ride_policy_choose(key_)) *mode = 0;
    rode_ = *mode == 2;
    start_ = std::chrono::steady_clock::now();
  }
  ~RideChoice() {
    if (!on_trial_) return;
    if (note_ && (note_->verdict == kProbeFarAlone || note_->verdict == kProbeFarTeam)) return;
    const double ns =
        std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start_).count();
    ride_policy_report(key_, rode_, ns / double(key_.T > 0 ? key_.T : 1));
  }
  RideChoice(const RideChoice&) = delete;
  RideChoice& operator=(const RideChoice&) = delete;

 private:
  RideKey key_;
  const ProbeNote* note_;
  bool on_trial_, rode_ = false;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
