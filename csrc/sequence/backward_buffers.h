// What one backward call holds besides the saved state: where its pre-activation gradients go
// (PreactivationGradients) and its recurrent weights packed for the step products
// (BackwardWeights). Members are made in declaration order, so the blocks are taken in the
// order the call always took them (its peak memory is tested).
#pragma once
#include <cstdint>
#include "gemm/gemm.h"
#include "kernel_api.h"
#include "sequence/backward_halves.h"
#include "sequence/layout.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// The pre-activation gradients dG of the input side (dgx, rows in time order: it pairs with x)
// and of the recurrent side (dgh, in step order: it pairs with the saved states), and the GRU's
// recurrent n-gate gradients (dghn, rows ld_n apart), with the buffers of those that have no
// place of their own.
template <typename T>
struct PreactivationGradients {
  const BackwardArgs<T>& a;
  const LayerShape& s = a.s;
  const int64_t GH = int64_t(gates_of(s.cell)) * s.H, TB = s.T * s.B;
  // One buffer serves both sides' pre-activation gradients when step k is time k for every row
  // (the forward direction, lengths or not: a step's pointwise maths writes zeros past a row's
  // length) and the recurrent side's equal the input side's: all cells but the torch-style GRU,
  // whose n gate meets r * (W_hn h + b_hn), so its recurrent dn carries the extra factor r.
  // The torch-style GRU then keeps only its recurrent dn apart (T*B*H, not another T*B*3H).
  const bool same_steps = !s.reverse;
  const bool n_apart = s.cell == Cell::Gru && s.linear_before_reset && same_steps;
  // Where the caller is done with the saved gates (gates_consumed), that one buffer is theirs:
  // each row's pointwise backward reads a step's gates and then stores its gradients in their
  // place (cells.h: every load of a vector before its stores), and nothing reads gates after.
  // No T*B*G*H buffer of its own: fastrnns LSTM training peak ~50 MiB lower. Likewise the
  // torch-style GRU's recurrent dn over its saved W_hn h + b_hn (gru_backward_row reads it
  // before it stores dn * r there; the products pair dn * r with h_prev): GRU ~12.5 MiB lower.
  // A reversed run's recurrent-side gradients (dGh) lie in step order, as the gates do: they go
  // there, and its input side's (dGx, in time order) apart (bidirectional fastrnns LSTM training
  // ~50 MiB lower). Which slots a row overwrites is the forward direction's, where dGx is dGh.
  const bool in_gates = a.gates_consumed && a.saved.gates;
  const bool n_in_extra = in_gates && n_apart;
  // Positions no step reaches (past a row's length) stay zero.
  Scratch<T> dgx_buf{in_gates && same_steps ? 0 : TB * GH};
  Scratch<T> dgh_buf{same_steps || in_gates ? 0 : TB * GH};
  Scratch<T> dghn_buf{n_apart && !n_in_extra ? TB * s.H : 0};
  T* const dgx = in_gates && same_steps ? a.saved.gates : dgx_buf.p;
  // Rows of G*H; where n_apart only their r and z count.
  T* const dgh = same_steps ? dgx : in_gates ? a.saved.gates : dgh_buf.p;
  // Inside dgh, or apart (rows of H).
  T* const dghn = n_in_extra ? a.saved.gru_extra : n_apart ? dghn_buf.p : dgh + 2 * s.H;
  const int64_t ld_n = n_apart ? s.H : GH;

  explicit PreactivationGradients(const BackwardArgs<T>& args) : a(args) {
    // Where every step writes every row's gradients, all gates and units (the backward rows of
    // cells.h store, never accumulate; the steps past a row's length zeros), nothing needs
    // zeroing. That single-threaded pass was 3.5% of a stacked LSTM training layer on 2
    // threads (17.9 -> 17.3 ms; GRU 14.6 -> 14.1). Reversed with lengths, dGx's rows past a
    // length are no step's.
    if (a.lengths && !same_steps) set_bytes(dgx_buf.p, 0, sizeof(T) * TB * GH);
  }
};

// The recurrent weights as the step products read them. W_hh (GH x Hout) is already the K x N
// operand of dG W_hh, packed whole, or by halves under k_split_backward; the GRU keeps W_hn
// apart (its n gradients may live apart, and the two-phase GRU meets W_hn on its own); the
// LSTM projection's W_hr for d h = d h_out W_hr.
template <typename T>
struct BackwardWeights {
  const BackwardArgs<T>& a;
  const bool k_split;
  const LayerShape& s = a.s;
  const bool gru = s.cell == Cell::Gru;
  const int64_t GH = int64_t(gates_of(s.cell)) * s.H, H = s.H, Hout = s.Hout;
  const int nthreads = imax(1, a.num_threads);
  const PanelReuse reuse = PanelReuse::of_call(true, a.frozen);
  const int64_t hh_rows = k_split ? 0 : gru ? 2 * H : GH;  // (nothing packed when 0)
  CachedPanels<T> whh{PanelKind::BackHH, a.w_hh, hh_rows, Hout, packed_b_size<T>(hh_rows, Hout),
                      nthreads, reuse, [this](T* buf, const T* from) {
                        pack_b_gemm<T>(hh_rows, Hout, from, Hout, 1, buf, nthreads);
                      }};
  CachedPanels<T> whh_halves{
      PanelKind::BackHHHalves, a.w_hh, k_split ? GH : 0, Hout,
      k_split ? halves_packed_size<T>(s, 0) + halves_packed_size<T>(s, 1) : 0, nthreads, reuse,
      [this](T* buf, const T* from) { pack_halves<T>(s, from, buf, nthreads); }};
  CachedPanels<T> whn{PanelKind::BackHN, a.w_hh + 2 * H * Hout, gru ? H : 0, H,
                      gru ? packed_b_size<T>(H, H) : 0, nthreads, reuse,
                      [this](T* buf, const T* from) {
                        if (gru) pack_b_gemm<T>(H, H, from, Hout, 1, buf, nthreads);
                      }};
  CachedPanels<T> whr{PanelKind::BackHR, a.w_hr, s.has_proj ? Hout : 0, H,
                      s.has_proj ? packed_b_size<T>(Hout, H) : 0, nthreads, reuse,
                      [this](T* buf, const T* from) {
                        if (s.has_proj) pack_b_gemm<T>(Hout, H, from, H, 1, buf, nthreads);
                      }};

  BackwardWeights(const BackwardArgs<T>& args, bool split_by_halves)
      : a(args), k_split(split_by_halves) {}
};

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
