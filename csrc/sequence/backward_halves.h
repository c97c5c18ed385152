// The single-row backward's split of each step's product dG W_hh over two halves of its units
// (k_split_backward): which shapes take it, the halves' units, and W_hh's rows packed by half.
#pragma once
#include <cstdint>
#include "gemm/gemm.h"
#include "sequence/backward_products.h"
#include "sequence/layout.h"
#include "sequence/step_barrier.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// Whether the time loop splits each step's product dG W_hh over two halves of its rows (K): a
// single row (B = 1) without lengths or projection, of an Elman RNN or an LSTM, with at least
// two unit blocks. The two halves of the units (split_halves) each take their pointwise maths
// and the product of their rows of dG with their rows of W_hh, a partial d h_prev over every
// column, and the next step adds the two partials: the team of two then meets once a step, not
// twice (after the pointwise maths and after the product, with the second member idle through
// the single row's pointwise maths). One thread computes the same two partials, so the bits do
// not depend on the threads (they depend on the shape, as the chains are not split so
// elsewhere), and pays for the second product and the sums: 4-5% of such a step. So only steps
// where the meeting is much of the step take it: big enough for a team (kMinTeamStepFlops),
// under kHalvesMaxStepFlops. In-process A/B (training, medians, 2 threads / 1 thread): long-seq
// LSTM (33 KFLOP a step) 1.737 -> 1.585 / 2.23 -> 2.34 ms, online-small RNN (33 KFLOP) 0.223 ->
// 0.209 / 0.270 -> 0.285; online-small LSTM (131 KFLOP) 0.635 -> 0.631 / 1.015 -> 1.027.
constexpr double kHalvesMaxStepFlops = 1e5;
// Not where two threads walk on one (products_beside_walk): the halves' second product is then
// paid for nothing on any thread count (in-process A/B, training, medians, 1 / 2 threads:
// long-seq LSTM x1.005 / x1.004, LSTM 400x1x32x64 x1.010 / x1.007, RNN 1000x1x64x128 x1.055 /
// x1.026).
template <typename T>
bool k_split_backward(const LayerShape& s, bool has_lengths) {
  const bool cell = s.cell == Cell::Lstm || s.cell == Cell::RnnTanh || s.cell == Cell::RnnRelu;
  const double flops = recurrent_step_flops(s);
  return cell && s.B == 1 && !has_lengths && !s.has_proj && flops >= kMinTeamStepFlops &&
         flops < kHalvesMaxStepFlops && ceil_div<int64_t>(s.H, Tile<T>::NR) >= 2 &&
         !products_beside_walk<T>(s, has_lengths);
}

// Units [*u0, *u1) of half h (0 or 1): whole unit blocks, the first half the larger by one
// where their count is odd (split_range; H = 65 on 32-unit blocks: 64 and 1).
template <typename T>
void split_halves(int64_t H, int h, int64_t* u0, int64_t* u1) {
  constexpr int NR = Tile<T>::NR;
  int64_t b0 = 0, b1 = 0;
  split_range(ceil_div<int64_t>(H, NR), 2, h, &b0, &b1);
  *u0 = imin(H, b0 * NR);
  *u1 = imin(H, b1 * NR);
}

// W_hh's rows of each half, gate-major (gate g's units of the half, for every gate), as the K x
// Hout operand of the half's product, packed for gemm_packed: half 0 at buf, half 1 after it.
template <typename T>
int64_t halves_packed_size(const LayerShape& s, int h) {
  int64_t u0 = 0, u1 = 0;
  split_halves<T>(s.H, h, &u0, &u1);
  return packed_b_size<T>(gates_of(s.cell) * (u1 - u0), s.Hout);
}
template <typename T>
void pack_halves(const LayerShape& s, const T* w_hh, T* buf, int nthreads) {
  const int64_t G = gates_of(s.cell), Hout = s.Hout;
  for (int h = 0; h < 2; ++h) {
    int64_t u0 = 0, u1 = 0;
    split_halves<T>(s.H, h, &u0, &u1);
    const int64_t nu = u1 - u0;
    Scratch<T> rows(G * nu * Hout);
    for (int64_t g = 0; g < G; ++g)
      copy_bytes(rows.p + g * nu * Hout, w_hh + (g * s.H + u0) * Hout, sizeof(T) * nu * Hout);
    pack_b_gemm<T>(G * nu, Hout, rows.p, Hout, 1, buf, nthreads);
    buf += halves_packed_size<T>(s, h);
  }
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
