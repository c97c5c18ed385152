// Backpropagation through time. Walks the steps in reverse: per step the cell's backward
// pointwise maths gives the pre-activation gradients dG (kept for the whole sequence), and one
// packed GEMM dG W_hh gives d h_{t-1}. After the loop the weight gradients are whole-sequence
// GEMMs (dW_hh = dGh^T H_prev, dW_ih = dGx^T X, dX = dGx W_ih) and bias gradients column sums,
// or for a single row chunk by chunk of steps (backward_products.h), or with lengths on the rows
// that ran, gathered (live_products.h). dGx is indexed by time (it pairs with x), dGh by step (it
// pairs with the saved states).
//
// Threads: one team runs the whole time loop. Its members split the batch rows of the pointwise
// maths and the column panels of each step's GEMMs, and meet twice a step (three times where
// they share dG W_hh's panels, shares_panels; more for the LSTM projection and the two-phase
// GRU) at a short-spin barrier; where the weights fit half of L2 each member walks its own rows
// and never meets (backward_rows_apart); a single row with small steps is split in two halves of
// its units instead, which meet once (k_split_backward). A team of small steps first checks that
// its threads pay (team_probe.h). A single row's long sequence instead walks on one thread while
// another takes the products of the steps walked (products_beside_walk).
// Every element is the same arithmetic either way, so results are bitwise identical for any
// thread count.
#pragma once
#include <cstdint>
#include <cstring>
#include "cells/cells.h"
#include "sequence/backward_buffers.h"
#include "sequence/backward_products.h"
#include "sequence/block_queue.h"
#include "sequence/layout.h"
#include "sequence/live_products.h"
#include "sequence/step_barrier.h"
#include "sequence/team_probe.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// The per-step walk back through time, for one member of the team (or the only thread).
template <typename T>
struct BackwardLoop {
  const BackwardArgs<T>& a;
  const LayerShape& s;
  Steps steps;
  int G;
  T *dgx, *dgh, *dghn;  // see PreactivationGradients
  int64_t ld_n;
  const T *whh, *whn, *whr;  // packed: W_hh (GRU: its r, z rows), W_hn, W_hr
  T *dh_a, *dh_b, *dc, *dhf, *dhs, *drh;
  // With k_split_backward: W_hh's halves (pack_halves), and the two halves' partial d h_prev of
  // a step, by the step's parity: half h's of step i at partials + ((i % 2) * 2 + h) * Hout.
  const T* whh_halves = nullptr;
  T* partials = nullptr;
  // A team's large RNN and LSTM steps share the column panels of dG W_hh out as they are done
  // (shares_panels, block_queue.h): the queue, and the step's dG packed once for all members
  // (AForm::Blocked, K block after K block: pack_shared_dg), or null.
  BlockQueue* queue = nullptr;
  T* dg_packed = nullptr;
  // Whether the step's products keep k whole in tiles of 1-3 rows too: a member's rows apart in
  // tiles of 2-3 rows where one thread's are 4 rows or more (rows_k_whole).
  bool k_whole = false;

  // One member's share: batch rows of the pointwise maths, column panels of the GEMMs (of
  // width Hout for d h_prev, H for the projection and the two-phase GRU's d(r*h)), for every
  // row; or, rows_only, its rows of everything (backward_rows_apart: no meeting at all).
  struct Share {
    int64_t row0, row1, out0, out1, hid0, hid1;
    bool rows_only;
  };
  static Share share_of(const LayerShape& s, int team, int member) {
    constexpr int NR = Tile<T>::NR;
    Share p{0, s.B, 0, ceil_div<int64_t>(s.Hout, NR), 0, ceil_div<int64_t>(s.H, NR), false};
    split_range(s.B, team, member, &p.row0, &p.row1);
    split_range(ceil_div<int64_t>(s.Hout, NR), team, member, &p.out0, &p.out1);
    split_range(ceil_div<int64_t>(s.H, NR), team, member, &p.hid0, &p.hid1);
    return p;
  }
  static Share rows_of(const LayerShape& s, int team, int member) {
    Share p = share_of(s, 1, 0);  // every column panel
    p.rows_only = true;
    split_range(s.B, team, member, &p.row0, &p.row1);
    return p;
  }

  // Row b of step k's pointwise maths over units [u0, u1), dh being the gradient reaching
  // them (dh_prev is left to the caller).
  RowBackward<T> row_at(int64_t k, int64_t b, int64_t u0, int64_t u1, const T* dh) const {
    const int64_t B = s.B, H = s.H, Hout = s.Hout, GH = int64_t(G) * H;
    const bool lstm = s.cell == Cell::Lstm, gru = s.cell == Cell::Gru;
    RowBackward<T> r;
    r.dh = dh;
    r.gates = a.saved.gates ? a.saved.gates + (k * B + b) * GH + u0 : nullptr;
    r.h_prev = a.saved.h + (k * B + b) * Hout + u0;
    r.h_next = a.saved.h + ((k + 1) * B + b) * Hout + u0;
    r.c_prev = lstm ? a.saved.c + (k * B + b) * H + u0 : nullptr;
    r.c_next = lstm ? a.saved.c + ((k + 1) * B + b) * H + u0 : nullptr;
    r.extra = gru ? a.saved.gru_extra + (k * B + b) * H + u0 : nullptr;
    r.dc = lstm ? dc + b * H + u0 : nullptr;
    r.dgx = dgx + (steps.time(k, b) * B + b) * GH + u0;
    r.dgh = dgh + (k * B + b) * GH + u0;
    r.dgh_n = dghn + (k * B + b) * ld_n + u0;
    r.dh_prev = nullptr;
    r.H = H;
    r.nu = static_cast<int>(u1 - u0);
    return r;
  }

  // The cell's backward pointwise maths over one row (the first pass of the two-phase GRU's).
  void cell_backward_row(const RowBackward<T>& r) const {
    switch (s.cell) {
      case Cell::RnnTanh: rnn_backward_row<T, false>(r); break;
      case Cell::RnnRelu: rnn_backward_row<T, true>(r); break;
      case Cell::Lstm: lstm_backward_row<T>(r); break;
      case Cell::Gru:
        if (s.linear_before_reset) gru_backward_row<T>(r); else gru_reset_backward_row1<T>(r);
        break;
    }
  }

  // dh_prev's rows for the pointwise maths of step k (all cells: rows of this member only).
  void pointwise(int64_t k, const Share& p, const T* dh, const T* dcell, T* dh_prev) const {
    const int64_t B = s.B, H = s.H, Hout = s.Hout, GH = int64_t(G) * H;
    const bool gru = s.cell == Cell::Gru;
    T* dgh_k = dgh + k * B * GH;
    for (int64_t b = p.row0; b < p.row1; ++b) {
      if (!steps.active(k, b)) {  // a finished row passes its gradient straight through
        set_bytes(dgh_k + b * GH, 0, sizeof(T) * GH);
        if (ld_n != GH) set_bytes(dghn + (k * B + b) * ld_n, 0, sizeof(T) * H);  // (GRU's n apart)
        copy_bytes(dh_prev + b * Hout, dh + b * Hout, sizeof(T) * Hout);
        continue;
      }
      if (!gru) set_bytes(dh_prev + b * Hout, 0, sizeof(T) * Hout);  // filled by the GEMM
      RowBackward<T> r = row_at(k, b, 0, H, dcell + b * H);
      r.dh_prev = dh_prev + b * Hout;
      cell_backward_row(r);
    }
  }

  // The two-phase GRU's second pointwise pass: dr and the r-path of d h_prev, from d(r*h).
  void gru_reset_pointwise(int64_t k, const Share& p, T* dh_prev) const {
    const int64_t B = s.B, H = s.H, GH = int64_t(G) * H;
    for (int64_t b = p.row0; b < p.row1; ++b) {
      if (!steps.active(k, b)) continue;
      RowBackward<T> r;
      r.dh = drh + b * H;
      r.gates = a.saved.gates + (k * B + b) * GH;
      r.h_prev = a.saved.h + (k * B + b) * s.Hout;
      r.dgx = dgx + (steps.time(k, b) * B + b) * GH;
      r.dgh = dgh + (k * B + b) * GH;
      r.dh_prev = dh_prev + b * s.Hout;
      r.H = H;
      r.nu = static_cast<int>(H);
      gru_reset_backward_row2<T>(r);
    }
  }

  // Rows [m0, m0 + n) of a step's products that hold every row of [m0, m0 + rows) still
  // running at step k, in whole row tiles.
  int64_t live_product_rows(int64_t k, int64_t m0, int64_t rows) const {
    constexpr int64_t MR = Tile<T>::MR;
    return imin(rows, ceil_div(steps.live_rows(k, m0, rows), MR) * MR);
  }

  // The gradient reaching the state before the i-th step walked back (i = 0: d h_T, from dhn),
  // and the other buffer, which that step fills with the next.
  T* dh_at(int64_t i) const { return i % 2 == 0 ? dh_a : dh_b; }

  // Walks back the i-th to the (i1-1)-th steps from the end (step k = T-1-i), so a run may stop
  // and another go on (team_probe.h); the gradient then lies in dh_at(i1) (after all T steps,
  // d h_0).
  void run(const Share& p, StepBarrier* barrier, int64_t i0, int64_t i1, int member = 0,
           int team = 1) const {
    auto meet = [&] { if (barrier) barrier->wait(); };
    const int64_t B = s.B, H = s.H, Hout = s.Hout, GH = int64_t(G) * H;
    // The products' rows: every row (members split columns), or this member's own.
    const int64_t m0 = p.rows_only ? p.row0 : 0, rows = p.rows_only ? p.row1 - p.row0 : B;
    const bool gru = s.cell == Cell::Gru;
    const bool gru_two_phase = gru && !s.linear_before_reset;
    int64_t taken = 0, ran = 0;  // panels of the shared products (queue)
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = s.T - 1 - i;
      T* dh = dh_at(i);
      T* dh_prev = dh_at(i + 1);
      if (a.lengths && i > 0)
        // A row finished at step k + 1 passed its gradient through it, and the step's product
        // added 0 W_hh to it: NaN where W_hh holds an infinity. Its gradient as it was (still in
        // the other buffer); every write of the step before is done (its last meeting).
        for (int64_t b = p.row0; b < p.row1; ++b)
          if (!steps.active(k + 1, b))
            copy_bytes(dh + b * Hout, dh_prev + b * Hout, sizeof(T) * Hout);
      for (int64_t b = p.row0; b < p.row1; ++b) {
        if (!steps.active(k, b)) continue;
        const T* dyr = a.dy + (steps.time(k, b) * B + b) * Hout;
        T* d = dh + b * Hout;
        for (int64_t o = 0; o < Hout; ++o) d[o] += dyr[o];
      }
      const T* dcell = dh;  // gradient reaching the cell's own output (before any projection)
      if (s.has_proj) {
        copy_bytes(dhs + (k * B + p.row0) * Hout, dh + p.row0 * Hout, sizeof(T) * (p.row1 - p.row0) * Hout);
        // A finished row's carried dh meets the zeros saved in hfull in dW_hr = dhs^T hfull:
        // zeros here too, so that an infinite dh (a dhn of inf) does not make it NaN.
        if (a.lengths)
          for (int64_t b = p.row0; b < p.row1; ++b)
            if (!steps.active(k, b)) set_bytes(dhs + (k * B + b) * Hout, 0, sizeof(T) * Hout);
        meet();  // every row of dh is complete
        gemm_packed_panels<T>(rows, H, Hout, dh + m0 * Hout, Hout, 1, whr, dhf + m0 * H, H,
                              false, p.hid0, p.hid1, false, !k_whole);
        meet();
        dcell = dhf;
      }
      pointwise(k, p, dh, dcell, dh_prev);
      meet();  // every row of dG_k is complete
      const T* dgh_k = dgh + (k * B + m0) * GH;
      T* dh_rows = dh_prev + m0 * Hout;
      // With lengths, the products' rows up to the row tile of the last one still running
      // (whole tiles: the GEMM's own, so its chains and bits): a row past its length has dG = 0,
      // and what its product added the next step takes back (above). Rows past their length
      // lie together where the stack runs them longest first (_layer_base.descending_order).
      // In-process A/B, 1 thread, training, lengths from T/2..T sorted, with the forward's
      // skipping already: 100x64x256x256 LSTM 193.6 -> 187.7 ms (210.3 skipping nothing), GRU
      // 149.3 -> 143.8; 50x32x128x512 LSTM 115.3 -> 111.4.
      const int64_t live = live_product_rows(k, m0, rows);
      const bool desc = i & 1;  // alternate directions through W_hh (ForwardLoop::cell_phase)
      // The GRU's d h_prev holds its z path (dh * z) before the products, and the products' k
      // blocks (kSumBlock) are each summed from zero and added to it: a chain from dh * z rounded
      // every FMA at that magnitude (dh0 at T = 1, B = 8, H = 256: 12x torch.nn's error).
      if (gru_two_phase) {  // d(r*h) = dn W_hn, then dr and the r-path of d h_prev
        gemm_packed_panels<T>(live, H, H, dgh_k + 2 * H, GH, 1, whn, drh + m0 * H, H, false,
                              p.hid0, p.hid1, desc, !k_whole);
        meet();
        gru_reset_pointwise(k, p, dh_prev);
        meet();
        gemm_packed_panels<T>(live, Hout, 2 * H, dgh_k, GH, 1, whh, dh_rows, Hout, true, p.out0,
                              p.out1, desc, !k_whole);
      } else if (gru) {  // r, z through W_hr|W_hz, then n through W_hn
        gemm_packed_panels<T>(live, Hout, 2 * H, dgh_k, GH, 1, whh, dh_rows, Hout, true, p.out0,
                              p.out1, desc, !k_whole);
        gemm_packed_panels<T>(live, Hout, H, dghn + (k * B + m0) * ld_n, ld_n, 1, whn, dh_rows,
                              Hout, true, p.out0, p.out1, desc, !k_whole);
      } else if (queue) {
        pack_shared_dg(dgh_k, team, member);
        queue->set(i + 1, member, p.out0, p.out1);
        meet();  // dG_k is packed
        queue->lag(member);  // (tests: after the meeting, which would make the others wait too)
        for (int64_t ob; (ob = queue->next(i, member, desc, &taken)) >= 0; ++ran)
          dg_w_panel(ob, dh_prev, live);
      } else {
        gemm_packed_panels<T>(live, Hout, GH, dgh_k, GH, 1, whh, dh_rows, Hout, true, p.out0,
                              p.out1, desc, !k_whole);
      }
      meet();  // every column of d h_prev is complete
    }
    if (queue) {
      team_blocks_count(true, taken);
      team_blocks_count(false, ran - taken);
    }
  }

  // Elements of dG_k packed for shares_panels: each K block of GemmBlocking::KC as
  // pack_a_blocked lays out B rows, one after another.
  static int64_t dg_packed_size(const LayerShape& s) {
    constexpr int64_t KC = GemmBlocking<T>::KC;
    const int64_t GH = int64_t(gates_of(s.cell)) * s.H;
    return ceil_div<int64_t>(GH, KC) * blocked_size<T>(s.B, KC);
  }
  // This member's MR-row panels of dG_k into dg_packed, for every K block.
  void pack_shared_dg(const T* dgh_k, int team, int member) const {
    constexpr int MR = Tile<T>::MR;
    constexpr int64_t KC = GemmBlocking<T>::KC;
    const int64_t GH = int64_t(G) * s.H;
    int64_t q0 = 0, q1 = 0;
    split_range(ceil_div<int64_t>(s.B, MR), team, member, &q0, &q1);
    for (int64_t k0 = 0; k0 < GH; k0 += KC) {
      const int64_t kc = imin(KC, GH - k0);
      T* block = dg_packed + (k0 / KC) * blocked_size<T>(s.B, KC);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t m = q * MR;
        pack_a_blocked<T>(imin<int64_t>(MR, s.B - m), kc, dgh_k + m * GH + k0, GH,
                          block + m * blocked_length<T>(kc));
      }
    }
  }
  // Column panel ob of d h_prev += dG_k W_hh from the packed dG_k: every row tile, K block after
  // K block, as gemm_packed_block walks them (the same chains, the same bits).
  void dg_w_panel(int64_t ob, T* dh_prev, int64_t rows) const {
    constexpr int NR = Tile<T>::NR, MR = Tile<T>::MR;
    constexpr int64_t KC = GemmBlocking<T>::KC;
    const int64_t GH = int64_t(G) * s.H, panels = ceil_div<int64_t>(s.Hout, NR);
    const int nv = static_cast<int>(imin<int64_t>(NR, s.Hout - ob * NR));
    for (int64_t k0 = 0; k0 < GH; k0 += KC) {
      const int64_t kc = imin(KC, GH - k0);
      const T* block = dg_packed + (k0 / KC) * blocked_size<T>(s.B, KC);
      const T* b = gemm_b_slice<T>(whh, panels, GH, k0, ob);
      for (int64_t m = 0; m < rows; m += MR)
        tile_to_c<T, AForm::Blocked>(static_cast<int>(imin<int64_t>(MR, s.B - m)), nv, kc,
                                     block + m * blocked_length<T>(kc), 0, b,
                                     dh_prev + m * s.Hout + ob * NR, s.Hout, true, nullptr);
    }
  }

  // The i-th to (i1-1)-th steps from the end under k_split_backward: member m < 2 takes half m
  // (a lone thread both halves, members past the second only meet). d h_T is in dh_a; after
  // step i the partials of d h_{T-1-i} are at partial_at(i + 1, 0 and 1).
  void run_halves(int member, int team, StepBarrier* barrier, int64_t i0, int64_t i1) const {
    const int64_t H = s.H, GH = int64_t(G) * H, panels = ceil_div<int64_t>(s.Hout, Tile<T>::NR);
    Scratch<T> a_half(G * H);  // dG's row for a half's units, gate-major (the product's A)
    int64_t u0s[2], u1s[2];
    for (int h = 0; h < 2; ++h) split_halves<T>(H, h, &u0s[h], &u1s[h]);
    const T* w_half[2] = {whh_halves, whh_halves + halves_packed_size<T>(s, 0)};
    T* dh = dh_a;  // d h_T at first, then each step the sum of the last step's partials
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = s.T - 1 - i;
      const T* dyr = a.dy + steps.time(k, 0) * s.Hout;
      for (int h = 0; h < 2; ++h) {
        if (team > 1 && h != member) continue;
        const int64_t u0 = u0s[h], u1 = u1s[h], nu = u1 - u0;
        const T* p0 = i > 0 ? partial_at(i, 0) : nullptr;
        const T* p1 = i > 0 ? partial_at(i, 1) : nullptr;
        for (int64_t u = u0; u < u1; ++u) dh[u] = (p0 ? p0[u] + p1[u] : dh[u]) + dyr[u];
        cell_backward_row(row_at(k, 0, u0, u1, dh + u0));
        const T* dgh_k = dgh + k * GH;
        for (int64_t g = 0; g < G; ++g)
          copy_bytes(a_half.p + g * nu, dgh_k + g * H + u0, sizeof(T) * nu);
        gemm_packed_panels<T>(1, s.Hout, G * nu, a_half.p, G * nu, 1, w_half[h],
                              partial_at(i + 1, h), s.Hout, false, 0, panels, i & 1);
      }
      if (barrier) barrier->wait();
    }
  }
  T* partial_at(int64_t i, int h) const { return partials + ((i % 2) * 2 + h) * s.Hout; }
};

// Whether a team shares the column panels of each step's dG W_hh out as they are done (see
// shares_blocks in forward_split.h): one product a step (RNN and LSTM without a projection),
// steps of 1 MFLOP and up.
inline bool shares_panels(const LayerShape& s) {
  const bool one_product = s.cell != Cell::Gru && !s.has_proj;
  return one_product && large_team_step(s);
}

// Threads worth a team for the time loop: as for the forward step (forward_split.h,
// step_threads), a step under ~30 KFLOP stays on one thread, and so does a state too narrow for
// two panels.
template <typename T>
int backward_step_threads(const LayerShape& s, int nthreads) {
  const double flops = recurrent_step_flops(s);
  if (nthreads <= 1 || flops < kMinTeamStepFlops || ceil_div<int64_t>(s.H, Tile<T>::NR) < 2) return 1;
  return nthreads;
}

// Whether the rows apart keep k whole in their tiles of 2-3 rows (BackwardLoop::k_whole).
inline bool rows_apart_keep_k_whole(const LayerShape& s) {
  return rows_k_whole(s, kFewRowsMinBackwardStepFlops);
}

// Whether a team's members walk back their own rows, all of each step's maths and products,
// and never meet (the forward's by_rows): each then streams all of W_hh every step, so only
// where the recurrent weights fit half of one core's L2 or half of the L3 the cores share (the
// two stream the same lines from it), and only where every row keeps its FMA chains
// (rows_keep_chains). A team that meets twice a step exchanges dG and d h_prev between the
// cores every step, which costs most when this VM puts them far apart. Past L2 the rows apart
// ran as fast as the team on a Xeon (2 MB L2: fastrnns LSTM and GRU) and faster on Zen 4 (1 MB
// L2, 32 MB L3; in-process A/B, one layer's backward, 2 threads, team -> rows apart: stacked
// LSTM 10.7 -> 10.2 ms, 100x8x256x512 LSTM 32.7 -> 27.6, fastrnns LSTM 285 -> 272, wide LSTM
// 655 -> 631 and RNN 166 -> 151, deepbench LSTM 294 -> 287, 50x12x256x1024 GRU 54.0 -> 48.7;
// the rest within 1%); past half of L3 they lost (H = 2048, 64 MB of LSTM weights: 51.1 ->
// 60.4 ms, 10 x 8 rows).
template <typename T>
bool backward_rows_apart(const LayerShape& s, int nthreads) {
  const int64_t weights = (gates_of(s.cell) * s.H + (s.has_proj ? s.H : 0)) * s.Hout;
  return backward_step_threads<T>(s, nthreads) > 1 &&
         rows_keep_chains<T>(s.B, nthreads, rows_apart_keep_k_whole(s)) &&
         weights * int64_t(sizeof(T)) <= imax(l2_cache_bytes(), l3_cache_bytes()) / 2;
}

// For tests and the curious (python's _C.step_split(..., backward=True)), without lengths: 0 one
// thread, 1 a team of rows apart (backward_rows_apart), 3 a team (rows and column panels), 4
// the halves of k_split_backward (on a team of two, or one thread taking both).
template <typename T>
int backward_split_kind(int cell, int64_t B, int64_t I, int64_t H, int64_t Hout, int nthreads) {
  LayerShape s = diagnostic_shape(cell, B, I, H, Hout);
  if (k_split_backward<T>(s, false)) return 4;
  if (backward_rows_apart<T>(s, nthreads)) return 1;
  return backward_step_threads<T>(s, nthreads) > 1 ? 3 : 0;
}

// The walk back through every step, on the threads the shape pays for (see the top of this
// file), with the products of each chunk of steps walked beside it on a second thread where it
// takes them (products_beside_walk). Returns the count of chunks whose products ran so.
template <typename T>
int64_t walk_back(const BackwardArgs<T>& a, const BackwardLoop<T>& loop, bool k_split,
                  const SequenceProducts<T>& products, int64_t chunks) {
  const LayerShape& s = a.s;
  const int nthreads = imax(1, a.num_threads);
  const int nt = backward_step_threads<T>(s, nthreads);
  const auto alone = BackwardLoop<T>::share_of(s, 1, 0);
  // Steps [i0, i1) from the end on the calling thread alone.
  auto walk_alone = [&](int64_t i0, int64_t i1) {
    if (k_split) loop.run_halves(0, 1, nullptr, i0, i1);
    else loop.run(alone, nullptr, i0, i1);
  };
  if (chunks > 0 && nthreads > 1 && products_beside_walk<T>(s, a.lengths != nullptr)) {
    // One thread walks alone, chunk by chunk; another takes each chunk's products as soon as
    // its steps are walked, all but the last chunk's, which the threads share after the walk.
    // A step team (k_split_backward's halves, or column panels) instead met every step, for
    // steps of a few hundred ns, and left the products for after. In-process A/B, 2 threads,
    // training, medians: long-seq LSTM 1.370 -> 1.098 ms, GRU 0.967 -> 0.815; GRU 1000x1x64x200
    // 7.86 -> 7.10, RNN 1000x1x64x250 4.51 -> 3.84 (the chunks' sizes: kProductChunkSteps).
    int64_t chunks_done = 0;
    StepProgress walked;
    run_step_team(2, [&](int member, int team, StepBarrier*) {
      if (member == 0) {
        const StepProgress::FailOnThrow unblocks_the_products{walked};
        for (int64_t c = 0; c < chunks; ++c) {
          int64_t t0 = 0, t1 = 0;
          product_chunk(s.T, c, &t0, &t1);
          walk_alone(s.T - t1, s.T - t0);
          walked.publish(s.T - t0);
        }
      } else if (member == 1 && team > 1) {
        for (int64_t c = 0; c + 1 < chunks; ++c) {
          int64_t t0 = 0, t1 = 0;
          product_chunk(s.T, c, &t0, &t1);
          walked.wait_for(s.T - t0);
          products.run(t0, t1, c == 0, 1, false);
          chunks_done = c + 1;
        }
      }
    });
    return chunks_done;
  }
  if (nt <= 1) {
    walk_alone(0, s.T);
  } else if (k_split) {
    auto halves = [&](int member, int team, StepBarrier* barrier, int64_t i0, int64_t i1) {
      loop.run_halves(member, team, barrier, i0, i1);
    };
    run_probed_team(nt, s.T, probe_steps(s), a.probe_note, halves, walk_alone);
  } else if (backward_rows_apart<T>(s, nt)) {
    run_step_team(nt, [&](int member, int team, StepBarrier*) {
      BackwardLoop<T> mine = loop;
      mine.k_whole = rows_apart_keep_k_whole(s);
      mine.run(BackwardLoop<T>::rows_of(s, team, member), nullptr, 0, s.T);
    });
  } else {  // small steps first check that the team pays, as the forward's (team_probe.h)
    const bool share = shares_panels(s);
    Scratch<T> dg_packed(share ? BackwardLoop<T>::dg_packed_size(s) : 0);
    SharedBlocks shared;
    run_probed_team(
        nt, s.T, probe_steps(s), a.probe_note,
        [&](int member, int team, StepBarrier* barrier, int64_t i0, int64_t i1) {
          BackwardLoop<T> mine = loop;
          const auto p = BackwardLoop<T>::share_of(s, team, member);
          if (share && barrier) {
            mine.queue = shared.join(team, member, p.out0, p.out1, barrier);
            mine.dg_packed = dg_packed.p;
          }
          mine.run(p, barrier, i0, i1, member, team);
        },
        walk_alone);
  }
  return 0;
}

template <typename T>
void backward_on_threads(const BackwardArgs<T>& a) {
  const LayerShape& s = a.s;
  const int64_t B = s.B, H = s.H, Hout = s.Hout, TB = s.T * B;
  const int nthreads = imax(1, a.num_threads);
  const bool lstm = s.cell == Cell::Lstm;
  const bool gru_two_phase = s.cell == Cell::Gru && !s.linear_before_reset;
  DenormalsFlushed ftz;
  packed_cache_begin_call();
  Steps steps{a.lengths, s.T, s.reverse};
  const PreactivationGradients<T> dg(a);
  const bool k_split = k_split_backward<T>(s, a.lengths != nullptr);
  const BackwardWeights<T> w(a, k_split);
  Scratch<T> partials(k_split ? 4 * Hout : 0);

  Scratch<T> dh_a(B * Hout), dh_b(B * Hout), dc(lstm ? B * H : 0);
  Scratch<T> dhf(s.has_proj ? B * H : 0), dhs(s.has_proj ? TB * Hout : 0);
  Scratch<T> drh(gru_two_phase ? B * H : 0);
  if (a.dhn) copy_bytes(dh_a.p, a.dhn, sizeof(T) * B * Hout);
  else set_bytes(dh_a.p, 0, sizeof(T) * B * Hout);
  if (lstm && a.dcn) copy_bytes(dc.p, a.dcn, sizeof(T) * B * H);
  else if (lstm) set_bytes(dc.p, 0, sizeof(T) * B * H);

  BackwardLoop<T> loop{a, s, steps, gates_of(s.cell), dg.dgx, dg.dgh, dg.dghn, dg.ld_n,
                       w.whh.get(), w.whn.get(), w.whr.get(), dh_a.p, dh_b.p, dc.p, dhf.p, dhs.p,
                       drh.p};
  loop.whh_halves = w.whh_halves.get();
  loop.partials = partials.p;
  const SequenceProducts<T> products{a, dg.dgx, dg.dgh, dg.dghn, dg.ld_n, dhs.p};
  // (x_packed, kept only where B > 1, cannot be sliced by time)
  const bool chunked = chunked_products<T>(s, a.lengths != nullptr) && !a.x_packed;
  const int64_t chunks = chunked ? product_chunks(s.T) : 0;
  const int64_t chunks_done = walk_back(a, loop, k_split, products, chunks);
  if (k_split) {
    const T* p0 = loop.partial_at(s.T, 0);
    const T* p1 = loop.partial_at(s.T, 1);
    for (int64_t u = 0; u < Hout; ++u) a.dh0[u] = p0[u] + p1[u];
  } else {
    copy_bytes(a.dh0, loop.dh_at(s.T), sizeof(T) * B * Hout);
  }
  if (lstm) copy_bytes(a.dc0, dc.p, sizeof(T) * B * H);

  // Whole-sequence weight and input gradients (the weights' added into a.dw_* with accumulate),
  // at once, the chunks not yet done, or on the rows that ran (live_products.h). At once, dGx
  // meets two products and, where it is dGh too, a third: whether it splits for AMX tiles is
  // found once (fastrnns LSTM training, 1 thread: three scans of its 52 MB were 3% of the call).
  if (chunked) {
    beside_walk_count(chunks_done > 0 ? BesideWalk::ProductsBeside : BesideWalk::ProductsAfter);
    // (on one thread all of them, after the walk)
    for (int64_t c = chunks_done; c < chunks; ++c) {
      int64_t t0 = 0, t1 = 0;
      product_chunk(s.T, c, &t0, &t1);
      products.run(t0, t1, c == 0, nthreads, false);
    }
  } else if (products_gather_rows(s, a.lengths)) {
    products_over_rows_that_ran(products, rows_that_ran(s.T, B, a.lengths), nthreads);
  } else {
    products.run(0, TB, true, nthreads, amx_operand_splits<T>(dg.dgx, TB, dg.GH, dg.GH, nthreads));
  }
  products.finish();
}

// The layer's BPTT on a.num_threads threads, or on one if the adaptive policy says so.
template <typename T>
void backward(const BackwardArgs<T>& a) {
  run_threads_or_alone(a, true, [](const BackwardArgs<T>& args) { backward_on_threads(args); });
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
