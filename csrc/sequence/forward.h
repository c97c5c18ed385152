// The forward time loop. Per step, one packed GEMM h_{t-1} W_hh^T per (row tile, unit block)
// lands in a small on-stack tile holding every gate of those units, and the cell's epilogue turns
// it into h_t (and c_t) at once: gates never travel to memory except to be saved for training.
// The input projection x_t W_ih^T is either one GEMM over the whole sequence before the loop, or,
// for batches that fill the tiles, a second on-stack tile computed right before the recurrent one
// (in_step_projection), or, for a single LSTM or GRU row on one thread, tiles of later steps
// computed in the same loop as the row's product (projection_rides); projection_mode.h chooses.
//
// Threads: either each thread owns a slice of batch rows and runs the whole loop with no
// barrier, or each owns a slice of hidden-unit blocks and the team meets once per step (twice
// for the LSTM projection and the two-phase GRU); a team of small steps first checks that its
// threads pay (team_probe.h). Every output element is the same FMA chain either way, so results
// are bitwise identical for any thread count.
#pragma once
#include <atomic>
#include <cstdint>
#include <cstring>
#include "cells/cells.h"
#include "cells/onnx_cells.h"
#include "sequence/amx_step.h"
#include "sequence/block_queue.h"
#include "sequence/forward_split.h"
#include "sequence/layout.h"
#include "sequence/projection_mode.h"
#include "sequence/step_barrier.h"
#include "sequence/step_weights.h"
#include "sequence/team_probe.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// Each cell's forward epilogues: torch.nn's (cells.h), or under ONNX's options (onnx_cells.h;
// the RNN's function is then among the options, whichever RNN cell).
template <typename T>
struct TorchRows {
  static constexpr auto rnn_tanh = rnn_forward_row<T, false>;
  static constexpr auto rnn_relu = rnn_forward_row<T, true>;
  static constexpr auto lstm = lstm_forward_row<T>;
  static constexpr auto gru = gru_forward_row<T>;
  static constexpr auto gru_reset = gru_reset_forward_row<T>;
  static constexpr auto gru_reset_new = gru_reset_new_row<T>;
};
template <typename T>
struct OnnxRows {
  static constexpr auto rnn_tanh = rnn_onnx_forward_row<T>;
  static constexpr auto rnn_relu = rnn_onnx_forward_row<T>;
  static constexpr auto lstm = lstm_onnx_forward_row<T>;
  static constexpr auto gru = gru_onnx_forward_row<T>;
  static constexpr auto gru_reset = gru_onnx_reset_forward_row<T>;
  static constexpr auto gru_reset_new = gru_onnx_reset_new_row<T>;
};

template <typename T>
struct ForwardLoop {
  const ForwardArgs<T>& a;
  const LayerShape& s;
  Steps steps;
  int G;
  T* gx;
  int64_t ld_gx;  // gx's row stride (see gx_row_stride)
  PackedGates<T> w;
  const T* w_proj;  // packed W_hr^T panels, or null
  const T* b_hn;
  bool training;
  // Inference without lengths or projection: the state h_k is y's block of step k - 1, written
  // there by the epilogue, instead of a ping-pong buffer whose rows were then copied to y.
  bool h_in_y;
  // Inference ping-pong buffers (training writes into the saved ones instead).
  T *hbuf, *cbuf, *hfull_buf, *gates_buf, *extra_buf;
  // Two buffers of next_a_size() for the step's A packed (AForm::Blocked) by the previous step's
  // epilogue (pack_next_a), or for step 0 before the loop, shared by the team, or null.
  T* a_shared;
  StepBarrier* barrier;  // the team's when the step is split by hidden units, else null
  // Gx's rows may lie in another core's cache: the step loop runs on a team (or probes one,
  // team_probe.h), or the threads computed the whole-sequence projection before the walk.
  bool gx_on_other_cores;
  // The input projection step by step (in_step_projection) or riding along (projection_rides):
  // W_ih packed per gate like W_hh, and the folded bias per gate, gate g's units at bias_in + g *
  // padded_units(); else data is null and gx holds the whole sequence's projection.
  PackedGates<T> w_in{0, 0, nullptr};
  const T* bias_in = nullptr;
  // Whether the in-step projection splits k in tiles of 1-3 rows (KSplit): not where the layer
  // takes it in the step only for a pipelined stack, whose bits are the whole GEMM's
  // (in_step_when_pipelined).
  bool split_in_step_k = true;
  // Whether the step's products keep k whole in tiles of 1-3 rows too: a member's tiles of 2-3
  // rows where one thread's are 4 rows or more (members_keep_k_whole).
  bool k_whole = false;
  // With the projection riding along (projection_rides): x's rows in step order, padded with
  // zero rows to whole windows of kRideRows; gx then holds rows by step, gate g of a row at
  // g * padded_units(), and each step of a window computes a slice of the next window's rows.
  const T* x_steps = nullptr;
  // The steps' products on AMX tiles (amx_step): the split panels of W_hh and, with the
  // projection in the step, of W_ih; else amx is false.
  bool amx = false;
  AmxGates amx_w, amx_w_in;
  // The single row's first phase takes its gates in one pass (row_gates_pass): where the
  // projection rides along on one thread (projection_rides), whether or not it rides here.
  bool row_in_one_pass = false;
  // In a pipelined stack (layer_pipeline.h): the layer below, whose step k must be done before
  // this layer's step k reads x_k (its output), and this layer's own count of steps done.
  const StepProgress* below = nullptr;
  StepProgress* done = nullptr;
  // The call's weights, where a team's members pack their own unit blocks' panels of them
  // (StepWeights::members_pack) before their steps; else null.
  const StepWeights<T>* members_pack = nullptr;
  // Set where a step's rows of x do not split for the tiles, which amx_step did not scan
  // (x_later): the stack then runs this layer again (layer_pipeline.h). Else null.
  bool* x_unsplit = nullptr;
  // Set where a phase's state rows (its A) do not split for the tiles: amx_step scans h0, not
  // the states the steps make, which an unbounded cell (a relu RNN; ONNX's Relu, Affine, ...)
  // can take to an infinity or past kAmxSplitMax. Split, such a value has a NaN part (or part
  // products that overflow to opposite infinities), and the next products were NaN where the
  // FMA kernels' are infinite or finite: the call then runs again on those
  // (forward_on_threads). Null off the tiles.
  std::atomic<bool>* state_unsplit = nullptr;
  // A team's large one-phase steps share their unit blocks out (shares_blocks): the queue, this
  // member's index in it, and how many blocks it ran and took over from the others (mutable:
  // cell_phase is const; the counts are the member's own copy's).
  BlockQueue* queue = nullptr;
  int member = 0;
  mutable int64_t blocks_run = 0, taken_over = 0;

  // The chains of a single row's compact tail (row_gates_pass): 4 for one vector, the FMA
  // latency's cycles at one vector FMA a cycle.
  static constexpr int kTailChains = 4;
  static_assert(Tile<T>::NV == 2, "the compact tail takes one or two vectors");

  // Hidden units rounded up to whole unit blocks: the stride of bias_in's gates.
  static int64_t padded_units(const LayerShape& s) {
    return ceil_div<int64_t>(s.H, Tile<T>::NR) * Tile<T>::NR;
  }

  T* h_at(int64_t k) const {
    if (training) return a.saved.h + k * s.B * s.Hout;
    if (h_in_y && k > 0) return a.y + steps.time(k - 1, 0) * s.B * s.Hout;
    return hbuf + (k % 2) * s.B * s.Hout;
  }
  T* c_at(int64_t k) const { return training ? a.saved.c + k * s.B * s.H : cbuf + (k % 2) * s.B * s.H; }
  T* hfull_at(int64_t k) const { return training ? a.saved.hfull + k * s.B * s.H : hfull_buf; }
  T* gates_at(int64_t k) const {
    return training ? (a.saved.gates ? a.saved.gates + k * s.B * G * s.H : nullptr) : gates_buf;
  }
  T* extra_at(int64_t k) const { return training ? (a.saved.gru_extra ? a.saved.gru_extra + k * s.B * s.H : nullptr) : extra_buf; }

  // Asks for the input-projection slices the epilogue of tile (rows m.., units u0..) will read,
  // while its micro-kernels run: gx (T*B rows of G*H) lives in L3 or memory, and its rows lie
  // far apart, which the hardware prefetcher does not follow; the epilogue's loads of it were
  // over half its time (stacked LSTM, 1 thread). Into L2, not L1: the micro-kernels' weight
  // panels stream through L1 and evicted them (fastrnns LSTM, 1 thread: 275 ms with L1, 265 with
  // L2).
  void prefetch_gx(int64_t k, int64_t m, int mr, int64_t u0, int g0, int g_count) const {
    for (int ri = 0; ri < mr; ++ri) {
      const int64_t b = m + ri;
      if (!steps.active(k, b)) continue;
      const char* row = reinterpret_cast<const char*>(gx + (steps.time(k, b) * s.B + b) * ld_gx + u0);
      for (int g = g0; g < g0 + g_count; ++g)
        for (int l = 0; l < Tile<T>::LINES; ++l) prefetch_to_l2(row + sizeof(T) * g * s.H + 64 * l);
    }
  }

  // One phase of the cell over p's rows and unit blocks: the products of gates [g0, g0 +
  // g_count) per tile, then the row epilogue. `fn` is the cell's row function. a_pack: room
  // for this member's rows of A packed (see a_pack_size), or null to read A's rows in place.
  // a_ready: this step's A packed already (AForm::Blocked), every row, or null;
  // a_next: where the epilogue packs the new state, the next step's A, or null.
  // x_ready: with the projection in the step, this member's rows of x_t packed (AForm::Blocked).
  // mx: the member's rows split for AMX tiles (see AmxRows), or null.
  template <typename RowFn>
  void cell_phase(int64_t k, const StepSplit& p, int g0, int g_count, const T* A, int64_t lda,
                  int64_t K, bool writes_h, RowFn fn, T* a_pack, const T* x_ready,
                  const T* a_ready = nullptr, T* a_next = nullptr,
                  const AmxRows* mx = nullptr) const {
    constexpr int NR = Tile<T>::NR;
    // Row tiles of MR rows, or of an AMX tile's (on AMX, rows are independent of their tile).
    const int MR = mx ? kAmxRows : Tile<T>::MR;
    constexpr int kRows = step_tile_rows<T>();
    alignas(64) T tile[kRows * 4 * NR];
    alignas(64) T gx_tile[kRows * 4 * NR];  // the projection in the step: gate g at column g * NR
    // The state's rows as MR-row micro-panels (AForm::Blocked), packed once a step and met by
    // every unit block: read in place, a tile's MR rows lie H apart, and at H = 1024 floats
    // (4 KB) they all fall in one L1 set (1 thread, bench medians: deepbench LSTM 324-328 ->
    // 282-300 ms).
    if (!a_ready && a_pack) pack_a_blocked<T>(p.row1 - p.row0, K, A + p.row0 * lda, lda, a_pack);
    if (mx) {
      amx_split_rows(p.row1 - p.row0, K, A + p.row0 * lda, lda, mx->a);
      if (state_unsplit && !amx_operand_splits<T>(A + p.row0 * lda, p.row1 - p.row0, K, lda, 1))
        state_unsplit->store(true, std::memory_order_relaxed);
    }
    // A single row on a team: its state's other part was written by the other core this step,
    // and the row's k loop reaches those lines only halfway through a unit block, too far ahead
    // for the core to ask for them early. Asked for here, they cross while the first block's
    // weights stream. In-process A/B (bench/ab_builds.py), 2 threads, medians of three calm
    // runs: long-seq LSTM inference 0.656 -> 0.616, 0.669 -> 0.638, 0.679 -> 0.643 ms; the
    // other single-row shapes within noise, as was training (and the backward's dG_k row asked
    // for so).
    if (barrier && p.row1 - p.row0 == 1 && !mx) prefetch_values_to_l1(A + p.row0 * lda, K);
    // 2-3 rows so (a team split by units reads every row's packed state, a_ready): the tiles'
    // k loops met the other member's lines one at a time. In-process A/B, 2 threads,
    // inference, medians: 100x3x128x128 LSTM 0.742 -> 0.717 ms, GRU 0.659 -> 0.623 (those
    // without share_boundary_vector); 100x3x100x100 LSTM 0.368 -> 0.354 and RNN 0.139 -> 0.135
    // with it; training within noise. 13-14 rows (100x13x64x100, 100x14x100x100): within noise
    // either way, so the prefetch stays where it was measured to gain.
    if (barrier && a_ready && !mx && p.row1 - p.row0 > 1 && p.row1 - p.row0 <= 3)
      prefetch_packed_rows(a_ready, p, K);
    const bool gx_in_tile = x_ready || (mx && mx->x);
    const T* hp = h_at(k);
    T* hn = h_at(k + 1);
    const bool lstm = s.cell == Cell::Lstm;
    T* cp = lstm ? c_at(k) : nullptr;
    T* cn = lstm ? c_at(k + 1) : nullptr;
    T* gates = gates_at(k);
    T* extra = extra_at(k);
    T* hout = s.has_proj ? hfull_at(k) : hn;
    const int64_t GH = int64_t(G) * s.H;
    // Odd steps walk the unit blocks from the last: the weight panels a step used last are still
    // in L1 (or L2) and the next step starts with them, where a cache that keeps the newest lines
    // loses all of a weight set a little bigger than itself when every step starts from the
    // first block. Order of independent tiles only: results do not change. In-process A/B, one
    // thread, medians: long-seq LSTM (64 KB of W_hh) 0.936 -> 0.857 ms, GRU 0.841 -> 0.786;
    // with the backward's products alternating too, long-seq LSTM training 2.64 -> 2.43 ms.
    // With a queue (shares_blocks), the team's blocks go to whoever is free; this member's own
    // come first, in the same order.
    // After its blocks, a member runs its rows of a block shared with the other (part_ub).
    const int64_t blocks = p.unit1 - p.unit0;
    for (int64_t i = 0;; ++i) {
      const bool part = !queue && i == blocks && p.part_ub >= 0;
      const int64_t ub = queue ? queue->next(k, member, k & 1, &taken_over)
                         : part        ? p.part_ub
                         : i >= blocks ? -1
                         : (k & 1)     ? p.unit1 - 1 - i
                                       : p.unit0 + i;
      if (ub < 0) break;
      blocks_run += queue != nullptr;
      // A part block's one vector (share_boundary_vector): its units, and from the row pass's
      // tile's first lanes.
      const int64_t vector = part ? p.part_vector : -1;
      const int64_t u0 = ub * NR + (vector >= 0 ? vector * Vec<T>::W : 0);
      const int nu = static_cast<int>(imin<int64_t>(vector >= 0 ? Vec<T>::W : NR, s.H - u0));
      const int64_t row0 = part ? p.part_row0 : p.row0, row1 = part ? p.part_row1 : p.row1;
      for (int64_t m = row0; m < row1; m += MR) {
        const int mr = static_cast<int>(imin<int64_t>(MR, row1 - m));
        const int64_t tile_index = (m - p.row0) / MR;  // of the member's rows
        // With lengths, only the tile's rows up to its last one still running (packed sequences
        // of several lengths end rows as they go, and torch.nn's packed batches shrink): none,
        // and the products are skipped. A tile of 4 rows or more shrinks to them, each row's
        // chains kept whole (k unsplit: a tile of 4 rows or more never splits k), so the same
        // bits; a smaller tile (split k, or a single row's own pass) stays as it is.
        const int live = static_cast<int>(steps.live_rows(k, m, mr));
        const int mp = mr >= 4 && !mx ? live : mr;
        const bool split = mr < 4 && !k_whole;
        if (live == 0) {
          // every row ended: the epilogue below only carries their state
        } else if (mx && mx->x) {  // as x_ready's below, on AMX tiles
          amx_gate_products(s.I, mx->x + tile_index * amx_rows_size(MR, s.I), amx_w_in, ub, g0,
                            g_count, gx_tile + g0 * NR, G * NR,
                            bias_in ? bias_in + g0 * padded_units(s) + u0 : nullptr,
                            padded_units(s));
        } else if (x_ready) {  // x_t W_ih^T + bias for this tile's gates, into the L1-resident gx_tile
          const T* xa = x_ready + row_panel_offset<T>(m - p.row0, s.I);
          gate_products(mp, s.I, xa, w_in, ub, g0, g_count, gx_tile + g0 * NR, G * NR,
                        bias_in ? bias_in + g0 * padded_units(s) + u0 : nullptr, padded_units(s),
                        split_in_step_k && split, vector);
        } else if (x_steps) {
          // this step's rows were computed by whoever owned these units a window before
        } else if (s.B > 1) {
          prefetch_gx(k, m, mr, u0, g0, g_count);
        } else if (gx_on_other_cores && k + 1 < s.T) {
          // One row: on a team, the next step's slices a step ahead: both cores wrote the input
          // projection, and this VM may put the other core far away (long-seq LSTM, 2 threads,
          // in such a phase, with the probe: 1.24 -> 1.07 ms). Alone they are in this core's
          // cache.
          prefetch_gx(k + 1, m, mr, u0, g0, g_count);
        }
        // A single LSTM row meets every gate in one pass (8 chains; the GRU's 6 were slower than
        // a k-split per gate on AVX2: long-seq 0.92 -> 0.95 ms), and so does a GRU row whose
        // first phase carries the riding projection (its chains then hide the latency), or
        // would on one thread (row_in_one_pass: the same chains, so the same bits, on a team).
        if (live == 0) {  // (as above)
        } else if (mx) {
          amx_gate_products(K, mx->a + tile_index * amx_rows_size(MR, K), amx_w, ub, g0, g_count,
                            tile, g_count * NR, static_cast<const T*>(nullptr), 0);
        } else if (mr == 1 && (g_count == 4 || (row_in_one_pass && g0 == 0))) {
          const int64_t ahead = (k / kRideRows + 1) * kRideRows;  // the next window's first step
          // (of a part block's vector, only that vector's slices: the other member rides the rest)
          const bool rides = x_steps && ahead < s.T && k % kRideRows < kRideSlices * G &&
                             (vector < 0 || (k % kRideRows) % kRideSlices == vector) &&
                             !ride_slice_past_h(k, ub);
          const RideTile<T> ride = rides ? ride_tile(k, ahead, ub) : RideTile<T>{};
          row_gates_pass(g_count, K, A + m * lda, ub, g0, tile, rides ? &ride : nullptr, vector);
        } else {
          // This tile's panel of A packed (by the last step's epilogues or just above), or null.
          const T* a_tile = a_ready ? a_ready + (part ? row_panel_offset<T>(m, K)
                                                      : shared_panel_offset<T>(m, K))
                            : a_pack ? a_pack + row_panel_offset<T>(m - p.row0, K)
                                     : nullptr;
          if (a_tile)
            gate_products(mp, K, a_tile, w, ub, g0, g_count, tile, g_count * NR, nullptr, 0,
                          split, vector);
          else if (ub == w.tail_block)  // every gate in one panel: its own chains, as below
            micro_kernel<T>(mp, K, A + m * lda, lda, w.panel(0, ub), tile, g_count * NR, false,
                            nullptr, split, w.tail_in_one_vector());
          else
            for (int gi = 0; gi < g_count; ++gi)
              micro_kernel<T>(mp, K, A + m * lda, lda, panel_from(w, g0 + gi, ub, vector),
                              tile + gi * NR, g_count * NR, false, nullptr, split,
                              one_vector(ub, vector));
        }
        // The compact tail's tile rows hold every gate, gate g at lane g * tail_units.
        const bool tail = ub == w.tail_block;
        for (int ri = 0; ri < mr; ++ri) {
          const int64_t b = m + ri;
          if (!steps.active(k, b)) {  // finished rows carry their state unchanged
            if (lstm) copy_bytes(cn + b * s.H + u0, cp + b * s.H + u0, sizeof(T) * nu);
            if (writes_h) copy_bytes(hn + b * s.Hout + u0, hp + b * s.Hout + u0, sizeof(T) * nu);
            // Saved buffers that weight gradients multiply must hold numbers, not leftovers.
            if (s.has_proj) set_bytes(hout + b * s.H + u0, 0, sizeof(T) * nu);
            if (extra && g0 == 0) set_bytes(extra + b * s.H + u0, 0, sizeof(T) * nu);
            continue;
          }
          const int64_t t = steps.time(k, b);
          RowForward<T> r;
          r.acc = tile + ri * g_count * NR + (tail ? g0 * w.tail_units : 0);
          r.acc_gate_stride = tail ? w.tail_units : NR;
          r.gx = gx_in_tile ? gx_tile + ri * G * NR
                 : x_steps ? gx + k * ld_gx + u0
                           : gx + (t * s.B + b) * ld_gx + u0;
          r.gx_gate_stride = gx_in_tile ? NR : x_steps ? padded_units(s) : s.H;
          r.b_hn = b_hn ? b_hn + u0 : nullptr;
          r.h_prev = hp + b * s.Hout + u0;
          r.c_prev = lstm ? cp + b * s.H + u0 : nullptr;
          r.c_next = lstm ? cn + b * s.H + u0 : nullptr;
          r.h_next = hout + b * s.H + u0;
          r.h_copy = writes_h && !h_in_y ? a.y + (t * s.B + b) * s.Hout + u0 : nullptr;
          r.gates = gates ? gates + b * GH + u0 : nullptr;
          r.extra = extra ? extra + b * s.H + u0 : nullptr;
          r.H = s.H;
          r.nu = nu;
          r.onnx = a.onnx;
          r.peepholes = a.onnx && a.onnx->peepholes ? a.onnx->peepholes + u0 : nullptr;
          fn(r);
        }
        if (a_next) pack_next_a(a_next, m, mr, u0, nu, hn, part);
      }
    }
  }

  // mr rows of A (blocked) against gates [g0, g0 + count) of unit block ub of wg: gate g0 + i's
  // tile at out + i * NR (row stride ldo), plus bias + i * bias_stride when bias is given (added
  // after each element's chain, as micro_kernel adds it). A 4-row tile takes the gates two at a
  // time (micro_kernel_panels: the same bits). In-process
  // A/B, a layer, 1 thread, medians (B = 16 or 64: full tiles and a 4-row one): stacked LSTM
  // 6.03 -> 5.96 ms, stacked GRU 4.47 -> 4.33, fastrnns LSTM 175.8 -> 172.3, deepbench LSTM
  // 186.6 -> 182.2; training, whose backward dominates, unchanged. split_k: micro_kernel's.
  // Of a unit block with no more units than one vector (H's last, first_half), only the panels'
  // first vector: H = 200 computed 224 units a gate, now 208.
  // vector >= 0: that vector of the panels only, into the first lanes of each gate's tile (a
  // part block's, share_boundary_vector; bias, where given, is that vector's already).
  void gate_products(int mr, int64_t K, const T* a, const PackedGates<T>& wg, int64_t ub, int g0,
                     int count, T* out, int64_t ldo, const T* bias, int64_t bias_stride,
                     bool split_k = true, int64_t vector = -1) const {
    constexpr int NR = Tile<T>::NR;
    if (ub == wg.tail_block)  // every gate in one panel (W_hh's compact tail; bias is null)
      return micro_kernel<T, AForm::Blocked>(mr, K, a, 0, wg.panel(0, ub), out, ldo, false,
                                             nullptr, split_k, wg.tail_in_one_vector());
    const bool half = one_vector(ub, vector);
    int i = 0;
    if constexpr (panels_fit<T, 4, 2>()) {
      if (mr == 4 && !half)
        for (; i + 2 <= count; i += 2)
          micro_kernel_panels<T, 4, 2>(K, a, wg.panel(g0 + i, ub), K * NR, out + i * NR, ldo, NR,
                                       bias ? bias + i * bias_stride : nullptr, bias_stride);
    }
    if constexpr (panels_fit<T, 4, 2, 1>()) {
      if (mr == 4 && half)
        for (; i + 2 <= count; i += 2)
          micro_kernel_panels<T, 4, 2, 1>(K, a, panel_from(wg, g0 + i, ub, vector), K * NR,
                                          out + i * NR, ldo, NR,
                                          bias ? bias + i * bias_stride : nullptr, bias_stride);
    }
    for (; i < count; ++i)
      micro_kernel<T, AForm::Blocked>(mr, K, a, 0, panel_from(wg, g0 + i, ub, vector),
                                      out + i * NR, ldo, false,
                                      bias ? bias + i * bias_stride : nullptr, split_k, half);
  }
  // Whether unit block ub holds no more of H's units than one vector (micro_kernel's first_half).
  bool first_half(int64_t ub) const {
    return Tile<T>::NV > 1 && s.H - ub * Tile<T>::NR <= Vec<T>::W;
  }
  // Whether a tile computes only one vector of ub's panels: a part block's vector
  // (share_boundary_vector, vector >= 0), or H's last units within one vector (first_half).
  bool one_vector(int64_t ub, int64_t vector) const { return vector >= 0 || first_half(ub); }
  // Gate g's panel of unit block ub, from a part block's vector where vector >= 0.
  static const T* panel_from(const PackedGates<T>& wg, int g, int64_t ub, int64_t vector) {
    return wg.panel(g, ub) + (vector >= 0 ? vector * Vec<T>::W : 0);
  }

  // micro_kernel_row_gates over gates [g0, g0 + g_count) of unit block ub; of a unit block
  // with no more units than one vector (first_half), only the panels' first vector, as
  // gate_products: a single row's step streams its panels from L2 at ~32 bytes a cycle, and
  // H = 200's last block streamed 24 padding units a gate beside 8 real ones.
  // vector >= 0: that vector of the panels only, into the tile's first lanes of each gate
  // (share_boundary_vector).
  void row_gates_pass(int g_count, int64_t K, const T* a, int64_t ub, int g0, T* tile,
                      const RideTile<T>* ride, int64_t vector = -1) const {
    // Every gate in one panel (the compact tail): its vector's, or two vectors', chains alone
    // waited on the FMA latency, so k splits over 4 chains a vector (kTailChains), riding or not.
    if (ub == w.tail_block) {
      if (w.tail_in_one_vector())
        return micro_kernel_row_gates<T, 1, 1, kTailChains>(K, a, w.panel(0, ub), 0, tile, ride);
      return micro_kernel_row_gates<T, 1, 2, kTailChains / 2>(K, a, w.panel(0, ub), 0, tile,
                                                               ride);
    }
    if (vector >= 0)
      return row_gates_pass_vectors<1>(g_count, K, a, ub, g0, tile, ride, vector * Vec<T>::W);
    if (first_half(ub)) return row_gates_pass_vectors<1>(g_count, K, a, ub, g0, tile, ride, 0);
    row_gates_pass_vectors<Tile<T>::NV>(g_count, K, a, ub, g0, tile, ride, 0);
  }
  template <int NV>
  void row_gates_pass_vectors(int g_count, int64_t K, const T* a, int64_t ub, int g0, T* tile,
                              const RideTile<T>* ride, int64_t lane0) const {
    const T* b0 = w.panel(g0, ub) + lane0;
    const int64_t stride = w.panel(g0 + 1, ub) - w.panel(g0, ub);
    switch (g_count) {
      case 4: micro_kernel_row_gates<T, 4, NV>(K, a, b0, stride, tile, ride); break;
      case 3: micro_kernel_row_gates<T, 3, NV>(K, a, b0, stride, tile, ride); break;
      case 2: micro_kernel_row_gates<T, 2, NV>(K, a, b0, stride, tile, ride); break;
      default: break;
    }
  }

  // Step k's share of the next window's projection for unit block ub: of the window's rows (at
  // gx + ahead * ld_gx), gate j / kRideSlices's slice j % kRideSlices, j = k % kRideRows.
  RideTile<T> ride_tile(int64_t k, int64_t ahead, int64_t ub) const {
    const int64_t j = k % kRideRows, g = j / kRideSlices;
    const int64_t v = (j % kRideSlices) * RideTile<T>::kVectors * Vec<T>::W;
    const int64_t at = g * padded_units(s) + ub * Tile<T>::NR + v;
    return RideTile<T>{s.I, x_steps + ahead * s.I, s.I, w_in.panel(int(g), ub) + v,
                       gx + ahead * ld_gx + at, ld_gx, bias_in ? bias_in + at : nullptr};
  }

  // Whether step k's slice of unit block ub (ride_tile) lies wholly past H: the second vector of
  // a last block of no more units than one vector (H = 100: 4 units), whose lanes no epilogue
  // reads. Not computed: the row's chains do not depend on the ride, so the same bits.
  bool ride_slice_past_h(int64_t k, int64_t ub) const {
    const int64_t slice = (k % kRideRows) % kRideSlices;
    return ub * Tile<T>::NR + slice * RideTile<T>::kVectors * Vec<T>::W >= s.H;
  }

  // The first window's rows of the riding projection for unit blocks [ub0, ub1), in tiles of 4
  // rows (the chains the later windows' RideTiles make: 4 rows and up never split k). Run by
  // whoever runs step 0 of those units: on a team each member its own, side by side (before
  // the team started, one thread did all: online-small LSTM, 2 threads, ~9 us of a 217 us call).
  // vector >= 0: of the one block ub0, that vector only (share_boundary_vector).
  void ride_first_window(int64_t ub0, int64_t ub1, int64_t vector = -1) const {
    constexpr int NR = Tile<T>::NR;
    const int64_t lane0 = vector >= 0 ? vector * Vec<T>::W : 0;
    for (int64_t ub = ub0; ub < ub1; ++ub)
      for (int g = 0; g < G; ++g)
        for (int64_t r = 0; r < kRideRows; r += 4) {
          const int64_t at = g * padded_units(s) + ub * NR + lane0;
          micro_kernel<T>(4, s.I, x_steps + r * s.I, s.I, w_in.panel(g, ub) + lane0,
                          gx + r * ld_gx + at, ld_gx, false, bias_in ? bias_in + at : nullptr,
                          true, vector >= 0);
        }
  }

  // The next step's A packed by the epilogues as they write the new state, instead of by a pass
  // at the start of the step: that pass read all of h again, and in a team split by hidden units
  // every member packed every row. Each element is written once, by the member that computes
  // it, and the step barrier publishes it. In process A/B, a layer: deepbench RNN 65.6 -> 63.4 ms
  // on 1 thread, 36.0 -> 34.3 ms on 2; stacked RNN, 2 threads, 1.190 -> 1.151 ms.
  // The layout is AForm::Blocked, not pack_a's panels: there a row's units lie MR apart and the
  // copy went element by element (2-2.5% of a stacked LSTM or GRU step); here each row's W units
  // are one vector.
  static int64_t next_a_size(const LayerShape& s) {
    return shared_a_panels<T>(s.B) * Tile<T>::MR * blocked_length<T>(s.Hout);
  }
  // Rows [m, m + mr) (a row tile) and units [u0, u0 + nu) (u0 a multiple of W) of the state h
  // into a_next, the tile's panel (shared_panel_offset; a shared block's part tile, inside its
  // panel: row_panel_offset): the units' part of one panel is a block of its own, at offset
  // u0 * MR.
  void pack_next_a(T* a_next, int64_t m, int mr, int64_t u0, int nu, const T* h,
                   bool part = false) const {
    const int64_t panel =
        part ? row_panel_offset<T>(m, s.Hout) : shared_panel_offset<T>(m, s.Hout);
    pack_a_blocked<T>(mr, nu, h + m * s.Hout + u0, s.Hout, a_next + panel + u0 * Tile<T>::MR);
  }

  // Into L1, the lines of rows [p.row0, p.row1) of a step's shared packed A (AForm::Blocked,
  // K long), where they are few (kPrefetchedStateBytes): a row's W values of a k block are a line.
  void prefetch_packed_rows(const T* a_shared, const StepSplit& p, int64_t K) const {
    constexpr int64_t MR = Tile<T>::MR, W = Vec<T>::W;
    constexpr int64_t kPrefetchedStateBytes = 8192;
    if ((p.row1 - p.row0) * K * int64_t(sizeof(T)) > kPrefetchedStateBytes) return;
    for (int64_t m = p.row0; m < p.row1; m += MR) {
      const int64_t mr = imin<int64_t>(MR, p.row1 - m);
      const T* panel = a_shared + shared_panel_offset<T>(m, K);
      for (int64_t k = 0; k < K; k += W)
        for (int64_t r = 0; r < mr; ++r) prefetch_to_l1(panel + k * MR + r * W);
    }
  }

  // LSTM projection h = W_hr hfull for rows [r0, r1) and output blocks [o0, o1).
  void projection_phase(int64_t k, const StepSplit& p) const {
    constexpr int NR = Tile<T>::NR, MR = Tile<T>::MR;
    alignas(64) T tile[MR * NR];
    const T* hp = h_at(k);
    T* hn = h_at(k + 1);
    const T* hf = hfull_at(k);
    for (int64_t ob = p.out0; ob < p.out1; ++ob) {
      const int64_t o0 = ob * NR;
      const int no = static_cast<int>(imin<int64_t>(NR, s.Hout - o0));
      for (int64_t m = p.row0; m < p.row1; m += MR) {
        const int mr = static_cast<int>(imin<int64_t>(MR, p.row1 - m));
        const int live = static_cast<int>(steps.live_rows(k, m, mr));  // as cell_phase's tiles
        if (live > 0)
          micro_kernel<T>(mr >= 4 ? live : mr, s.H, hf + m * s.H, s.H, w_proj + ob * s.H * NR,
                          tile, NR, false, nullptr, mr < 4 && !k_whole);
        for (int ri = 0; ri < mr; ++ri) {
          const int64_t b = m + ri;
          T* dst = hn + b * s.Hout + o0;
          if (!steps.active(k, b)) {
            copy_bytes(dst, hp + b * s.Hout + o0, sizeof(T) * no);
            continue;
          }
          copy_bytes(dst, tile + ri * NR, sizeof(T) * no);
          copy_bytes(a.y + (steps.time(k, b) * s.B + b) * s.Hout + o0, dst, sizeof(T) * no);
        }
      }
    }
  }

  // Room for a member's rows of the step's A packed, or 0 to read them in place: one row is
  // contiguous already.
  static int64_t a_pack_size(const LayerShape& s, const StepSplit& p) {
    const int64_t rows = p.row1 - p.row0;
    return rows > 1 ? blocked_size<T>(rows, imax(s.H, s.Hout)) : 0;
  }

  // Step k's phases, each cell's epilogues from Rows (TorchRows or OnnxRows).
  template <typename Rows>
  void step_cells(int64_t k, const StepSplit& p, const T* hp, T* ap, const T* xp,
                  const T* ready, T* next, const AmxRows* mx) const {
    switch (s.cell) {
      case Cell::RnnTanh: cell_phase(k, p, 0, 1, hp, s.Hout, s.Hout, true, Rows::rnn_tanh, ap, xp, ready, next, mx); break;
      case Cell::RnnRelu: cell_phase(k, p, 0, 1, hp, s.Hout, s.Hout, true, Rows::rnn_relu, ap, xp, ready, next, mx); break;
      case Cell::Lstm:
        cell_phase(k, p, 0, 4, hp, s.Hout, s.Hout, !s.has_proj, Rows::lstm, ap, xp, ready, next, mx);
        if (s.has_proj) {
          if (barrier) barrier->wait();
          projection_phase(k, p);
        }
        break;
      case Cell::Gru:
        if (s.linear_before_reset) {
          cell_phase(k, p, 0, 3, hp, s.Hout, s.Hout, true, Rows::gru, ap, xp, ready, next, mx);
        } else {
          cell_phase(k, p, 0, 2, hp, s.Hout, s.Hout, false, Rows::gru_reset, ap, xp, nullptr, nullptr, mx);
          if (barrier) barrier->wait();
          cell_phase(k, p, 2, 1, extra_at(k), s.H, s.H, true, Rows::gru_reset_new, ap, xp, nullptr, nullptr, mx);
        }
        break;
    }
  }

  // Steps [k0, k1) (every buffer is indexed by step, so a run may stop and another go on).
  void run(const StepSplit& p, int64_t k0, int64_t k1) const {
    Scratch<T> a_pack(amx ? 0 : a_pack_size(s, p));
    T* ap = a_pack.p;
    const int64_t a_size = next_a_size(s);
    const int64_t rows = p.row1 - p.row0;
    // (riding along, W_ih is packed so too; on AMX tiles only its split panels are)
    const bool in_step = (w_in.data || amx_w_in.data) && !x_steps;
    Scratch<T> x_pack(in_step && !amx ? blocked_size<T>(rows, s.I) : 0);
    const T* xp = x_pack.p;
    Scratch<bf16_t> amx_a(amx ? amx_rows_size(rows, imax(s.H, s.Hout)) : 0);
    Scratch<bf16_t> amx_x(amx && in_step ? amx_rows_size(rows, s.I) : 0);
    const AmxRows amx_rows{amx_a.p, amx_x.p};
    const AmxRows* mx = amx ? &amx_rows : nullptr;
    if (x_steps && k0 == 0) {
      ride_first_window(p.unit0, p.unit1);
      if (p.part_vector >= 0) ride_first_window(p.part_ub, p.part_ub + 1, p.part_vector);
    }
    // A balanced share of rows (rows_in_equal_shares) tiles off the whole-tile grid that step
    // 0's A was packed on before the team started: the member packs its own panels (no other
    // member reads them).
    if (a_shared && k0 == 0 && p.row0 % Tile<T>::MR != 0)
      for (int64_t m = p.row0; m < p.row1; m += Tile<T>::MR)
        pack_next_a(a_shared, m, static_cast<int>(imin<int64_t>(Tile<T>::MR, p.row1 - m)), 0,
                    static_cast<int>(s.Hout), h_at(0));
    for (int64_t k = k0; k < k1; ++k) {
      if (below) below->wait_for(k + 1);
      if (queue) {
        queue->set(k + 1, member, p.unit0, p.unit1);
        queue->lag(member);
      }
      const T* hp = h_at(k);
      // Every row's step k is time steps.time(k, 0) here (no lengths): x_t's rows lie together.
      if (xp)
        pack_a_blocked<T>(rows, s.I, a.x + (steps.time(k, 0) * s.B + p.row0) * s.I, s.I, x_pack.p);
      if (amx_x.p) {
        const T* x_rows = a.x + (steps.time(k, 0) * s.B + p.row0) * s.I;
        if (x_unsplit && !*x_unsplit && !amx_operand_splits<T>(x_rows, rows, s.I, s.I, 1))
          *x_unsplit = true;
        amx_split_rows(rows, s.I, x_rows, s.I, amx_x.p);
      }
      // Single-phase cells whose epilogue writes the state pack the next step's A (a_shared is
      // null otherwise).
      const T* ready = a_shared ? a_shared + (k % 2) * a_size : nullptr;
      T* next = a_shared ? a_shared + ((k + 1) % 2) * a_size : nullptr;
      if (a.onnx) step_cells<OnnxRows<T>>(k, p, hp, ap, xp, ready, next, mx);
      else step_cells<TorchRows<T>>(k, p, hp, ap, xp, ready, next, mx);
      if (barrier) barrier->wait();
      if (done) done->publish(k + 1);
    }
  }
};

// Steps of input projection a chunk in projection_beside_walk: the walk waits for the first.
constexpr int64_t kProjectionBesideChunk = 32;
// Whether a team of two takes the whole-sequence projection beside a walk on one thread: a
// single row's long sequence without lengths (as products_beside_walk in the backward; steps
// then map to times as they lie, or reversed) whose projection would run before the walk (mode
// 0) and whose step team this shape's recent calls found slower than one thread (the probe's
// recalled verdict, team_probe.h). Member 0 then walks from the start, as the probe's verdict
// would have had it. In-process A/B, 2 threads, cores far apart,
// medians: long-seq LSTM inference 0.487 -> 0.441 ms, training 1.078 -> 1.023; GRU inference
// 0.342 -> 0.336.
inline bool projection_beside_walk(const LayerShape& s, bool has_lengths, int mode, int nt,
                                   bool by_rows, const StepProgress* below,
                                   const ProbeNote* note) {
  return !has_lengths && mode == 0 && nt > 1 && !by_rows && s.B == 1 && s.I > 0 && !below &&
         s.T >= 4 * kProjectionBesideChunk && probe_steps(s) > 0 && note &&
         note->recalled == kProbeFarAlone;
}

// The walk where a second thread projects x beside it (projection_beside_walk): member 1
// projects chunk after chunk of steps; member 0 walks each once it is there (the steps' rows of
// Gx, written by the other core, are prefetched a step ahead). The same chains as the whole
// product, so the same bits. w_ih_packed: input_weights_packed's; bias: the folded bias or null.
template <typename T>
void walk_beside_projection(ForwardLoop<T>& loop, const T* w_ih_packed, const T* bias) {
  const ForwardArgs<T>& a = loop.a;
  const LayerShape& s = a.s;
  probe_count(kProbeRecalledAlone);
  beside_walk_count(BesideWalk::Projection);
  loop.gx_on_other_cores = true;
  StepProgress projected;
  run_step_team(2, [&](int member, int team, StepBarrier*) {
    constexpr int64_t C = kProjectionBesideChunk;
    if (member == 1 || team == 1) {
      const StepProgress::FailOnThrow unblocks_the_walk{projected};
      for (int64_t k0 = 0; k0 < s.T; k0 += C) {
        const int64_t k1 = imin(s.T, k0 + C);
        input_projection_rows<T>(s, a.x, w_ih_packed, bias, loop.gx, loop.ld_gx,
                                 s.reverse ? s.T - k1 : k0, s.reverse ? s.T - k0 : k1, 1);
        projected.publish(k1);
      }
    }
    if (member == 0)
      for (int64_t k0 = 0; k0 < s.T; k0 += C) {
        const int64_t k1 = imin(s.T, k0 + C);
        projected.wait_for(k1);
        loop.run(make_split<T>(s, 1, 0, false), k0, k1);
      }
  });
}

// The walk through every step on nt threads (step_threads; by_rows: members take rows and
// never meet), or on the calling thread alone. mode: the projection's (projection_mode).
template <typename T>
void walk_forward(ForwardLoop<T>& loop, int nt, bool by_rows, int mode) {
  const ForwardArgs<T>& a = loop.a;
  const LayerShape& s = a.s;
  if (nt <= 1) {
    // A single row's next Gx row, a step ahead, where the threads computed Gx: the walk read
    // it from the other core's cache (long-seq RNN inference, 2 threads, cores far apart,
    // in-process A/B: 0.187 -> 0.159 ms, against 0.154 on one thread).
    loop.gx_on_other_cores = mode == 0 && a.num_threads > 1;
    loop.run(make_split<T>(s, 1, 0, by_rows), 0, s.T);
    return;
  }
  loop.gx_on_other_cores = true;
  // Unequal shares of unit blocks even out by a block's rows (share_boundary_block), or else
  // large steps share their blocks out as they are done (shares_blocks).
  const int64_t boundary =
      by_rows || loop.amx || loop.x_steps ? 0 : boundary_rows<T>(s, nt);  // a row, or 0
  // or, for a single row, by a block's vectors (share_boundary_vector)
  const bool vector_part = !by_rows && !loop.amx && !boundary &&
                           shares_boundary_vector<T>(s, nt, loop.x_steps != nullptr,
                                                     a.lengths != nullptr);
  const bool share = !by_rows && !boundary && !vector_part && shares_blocks(s, mode == 2);
  SharedBlocks shared;
  const int64_t probe = by_rows ? 0 : probe_steps(s);  // rows never meet: no probe
  auto team_run = [&](int member, int team, StepBarrier* barrier, int64_t k0, int64_t k1) {
    ForwardLoop<T> mine = loop;
    mine.barrier = by_rows ? nullptr : barrier;
    mine.k_whole = by_rows && members_keep_k_whole<T>(s, team);
    StepSplit split = make_split<T>(s, team, member, by_rows);
    if (boundary && team == 2) share_boundary_block(boundary, s.B, member, &split);
    if (vector_part && team == 2) share_boundary_vector(member, &split);
    if (share && barrier) {
      mine.queue = shared.join(team, member, split.unit0, split.unit1, barrier);
      mine.member = member;
    }
    mine.run(split, k0, k1);
    if (mine.queue) {
      team_blocks_count(true, mine.taken_over);
      team_blocks_count(false, mine.blocks_run - mine.taken_over);
    }
  };
  auto solo_run = [&](int64_t k0, int64_t k1) { loop.run(make_split<T>(s, 1, 0, false), k0, k1); };
  if (!loop.members_pack) return run_probed_team(nt, s.T, probe, a.probe_note, team_run, solo_run);
  // Each member packs its own unit blocks first (a team of one, all of them). In-process A/B,
  // 2 threads, training forwards (the weights packed every call), best of 30 blocks, the caller
  // packing -> each member: online-small LSTM 0.268 -> 0.235 ms, GRU 0.251 -> 0.212 and 0.244
  // -> 0.217; 100x1x256x256 LSTM 0.906 -> 0.829, GRU 0.742 -> 0.636 and 0.750 -> 0.637;
  // 50x8x128x128 LSTM 0.622 -> 0.594, GRU 0.497 -> 0.464; 50x16x256x256 within 2%.
  auto pack_own = [&](int member, int team) {
    const StepSplit split = make_split<T>(s, team, member, false);
    loop.members_pack->pack_unit_blocks(split.unit0, split.unit1);
  };
  run_probed_team(nt, s.T, probe, a.probe_note, team_run, solo_run, pack_own);
}

// below, done, x_unsplit: see ForwardLoop (a layer of a pipelined stack runs on one thread).
// tiles: whether the steps may take AMX tiles (amx_step). Returns whether they took them and a
// state did not split (ForwardLoop::state_unsplit).
template <typename T>
bool forward_steps(const ForwardArgs<T>& a, const StepProgress* below, StepProgress* done,
                   bool* x_unsplit, bool tiles) {
  const LayerShape& s = a.s;
  const int G = gates_of(s.cell);
  const int64_t B = s.B, H = s.H, Hout = s.Hout, GH = G * H;
  if (B == 0) return false;
  DenormalsFlushed ftz;
  packed_cache_begin_call();
  const int nthreads = imax(1, a.num_threads);
  const bool training = a.saved.h != nullptr;
  if (a.x_packed) pack_b_gemm<T>(s.T * B, s.I, a.x, s.I, 1, a.x_packed, nthreads);
  const PanelReuse reuse = PanelReuse::of_call(training, a.frozen, a.keep_packed);
  const bool lstm = s.cell == Cell::Lstm;
  const bool gru_two_phase = s.cell == Cell::Gru && !s.linear_before_reset;

  bool by_rows = false;
  const int nt = step_threads<T>(s, nthreads, &by_rows);
  int mode = projection_mode<T>(s, a.lengths != nullptr);
  // A layer of a pipelined stack (one thread, no lengths) may take the GEMM's projection in its
  // steps instead, with the GEMM's bits (in_step_when_pipelined).
  const bool in_step_for_pipeline =
      (below || done) && mode == 0 && in_step_when_pipelined<T>(s);
  if (in_step_for_pipeline) mode = 1;
  const RideChoice ride_choice(&mode,
                               RideKey{kIsaName, int(sizeof(T)), int(s.cell), training, s.T, s.I,
                                       s.H, s.Hout, nt > 1},
                               nt > 1 ? a.probe_note : nullptr);
  const bool in_step = mode == 1, rides = mode == 2;
  const int64_t padded_units = ForwardLoop<T>::padded_units(s);
  // Riding along, rows by step in whole windows, gates padded_units apart (see x_steps).
  // Training with the whole-sequence projection, step k time k for every row (not reversed):
  // Gx goes where the saved gates will be, row for row, and each epilogue reads its gx before it
  // stores the gates there (cells.h): no T*B*G*H buffer of its own (the rows are then G*H apart,
  // not gx_row_stride's odd count of lines). Rows past a length are never read as gates. Same
  // tiles, same bits.
  const bool gx_in_gates = training && mode == 0 && a.saved.gates && !s.reverse;
  // The Elman RNN's Gx row is as wide as its y row, and the step of time t reads the one and
  // then writes the other: Gx goes into y (the rows past a length, zeroed below, are never read
  // as Gx). Same tiles, same bits.
  const bool gx_in_y = mode == 0 && G == 1 && !s.has_proj;
  const int64_t ld_gx = rides           ? G * padded_units
                        : gx_in_gates   ? GH
                        : gx_in_y       ? Hout
                                        : gx_row_stride<T>(GH);
  const int64_t gx_rows = rides ? ceil_div<int64_t>(s.T, kRideRows) * kRideRows : s.T * B;
  Scratch<T> gx_buf(in_step || gx_in_gates || gx_in_y ? 0 : gx_rows * ld_gx);
  T* const gx = gx_in_gates ? a.saved.gates : gx_in_y ? a.y : gx_buf.p;
  const bool projection_beside = projection_beside_walk(s, a.lengths != nullptr, mode, nt,
                                                        by_rows, below, a.probe_note);
  if (mode == 0 && !projection_beside)
    input_projection<T>(s, a.x, a.w_ih, a.b_ih, a.b_hh, gx, ld_gx, nthreads, reuse,
                        s.B > 1, a.lengths);  // (a single row's must give the riding tiles' bits)
  Scratch<T> beside_bias(projection_beside && s.has_bias ? GH : 0);
  if (beside_bias.p) folded_bias(s, a.b_ih, a.b_hh, beside_bias.p, s.H);
  const CachedPanels<T> beside_w =
      input_weights_packed<T>(s, a.w_ih, nthreads, reuse, projection_beside);
  // On AMX tiles (amx_step) the steps meet only the weights' split panels.
  const bool amx = tiles && amx_step(a, in_step, reuse, nthreads, below != nullptr);
  const bool team_by_units = nt > 1 && !by_rows && !projection_beside && !below && !done;
  const StepWeights<T> weights(a, in_step || rides, amx, in_step, padded_units, nthreads, reuse,
                               team_by_units);
  Scratch<T> hbuf(training ? 0 : 2 * B * Hout), cbuf(!training && lstm ? 2 * B * H : 0);
  Scratch<T> hfull(!training && s.has_proj ? B * H : 0);
  Scratch<T> gates(!training && gru_two_phase ? B * GH : 0);
  Scratch<T> extra(!training && gru_two_phase ? B * H : 0);
  // The epilogue packs the next step's A where a step has several rows (one is read in place)
  // and one phase whose epilogue writes the state (not the projection's nor the two-phase GRU's).
  const bool epilogue_packs = B > 1 && !s.has_proj && !gru_two_phase && !amx;
  Scratch<T> a_shared(epilogue_packs ? 2 * ForwardLoop<T>::next_a_size(s) : 0);
  Steps steps{a.lengths, s.T, s.reverse};
  const T* b_hn = s.cell == Cell::Gru && s.has_bias ? a.b_hh + 2 * H : nullptr;
  ForwardLoop<T> loop{a, s, steps, G, gx, ld_gx, weights.w, weights.wproj.get(), b_hn, training,
                      !training && !a.lengths && !s.has_proj, hbuf.p, cbuf.p, hfull.p,
                      gates.p, extra.p, a_shared.p, nullptr, false};
  loop.below = below;
  loop.done = done;
  loop.members_pack = weights.members_pack ? &weights : nullptr;
  loop.x_unsplit = below && amx && in_step ? x_unsplit : nullptr;
  std::atomic<bool> state_unsplit{false};
  loop.state_unsplit = amx ? &state_unsplit : nullptr;
  if (weights.by_gates) {
    loop.w_in = PackedGates<T>{G, s.I, weights.w_in.get()};
    loop.bias_in = weights.bias_in.p;
    loop.split_in_step_k = !in_step_for_pipeline;
  }
  loop.row_in_one_pass = projection_rides<T>(s, a.lengths != nullptr);
  loop.amx = amx;
  loop.amx_w = weights.amx_w.gates();
  loop.amx_w_in = weights.amx_w_in.gates();
  Scratch<T> x_steps(rides ? gx_rows * s.I : 0);
  if (rides) {
    for (int64_t k = 0; k < gx_rows; ++k) {
      T* row = x_steps.p + k * s.I;
      if (k < s.T) copy_bytes(row, a.x + steps.time(k, 0) * s.I, sizeof(T) * s.I);
      else set_bytes(row, 0, sizeof(T) * s.I);
    }
    loop.x_steps = x_steps.p;
  }

  copy_bytes(loop.h_at(0), a.h0, sizeof(T) * B * Hout);
  if (lstm) copy_bytes(loop.c_at(0), a.c0, sizeof(T) * B * H);
  if (epilogue_packs) pack_a_blocked<T>(B, Hout, a.h0, Hout, a_shared.p);  // step 0's A
  if (a.lengths)  // outputs past a row's length are zeros (PackedSequence padded back)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = steps.len(b); t < s.T; ++t)
        set_bytes(a.y + (t * B + b) * Hout, 0, sizeof(T) * Hout);

  if (projection_beside) walk_beside_projection(loop, beside_w.get(), beside_bias.p);
  else walk_forward(loop, nt, by_rows, mode);
  copy_bytes(a.hn, loop.h_at(s.T), sizeof(T) * B * Hout);
  if (lstm) copy_bytes(a.cn, loop.c_at(s.T), sizeof(T) * B * H);
  return state_unsplit.load();
}

// below, done, x_unsplit: see ForwardLoop (a layer of a pipelined stack runs on one thread).
template <typename T>
void forward_on_threads(const ForwardArgs<T>& a, const StepProgress* below = nullptr,
                        StepProgress* done = nullptr, bool* x_unsplit = nullptr) {
  if (!forward_steps(a, below, done, x_unsplit, true)) return;
  // A state the tiles could not take: every output again from the FMA kernels, as a call whose
  // h0 does not split runs. A layer of a pipelined stack, whose output the layers above have
  // read, is run again by the stack, with them (layer_pipeline.h).
  if (below || done) {
    if (x_unsplit) *x_unsplit = true;
  } else {
    forward_steps(a, nullptr, nullptr, nullptr, false);
  }
}

// The layer on a.num_threads threads, or on one if the adaptive policy says so.
template <typename T>
void forward(const ForwardArgs<T>& a) {
  run_threads_or_alone(a, false, [](const ForwardArgs<T>& args) { forward_on_threads(args); });
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
