// Shared bookkeeping of the forward and backward drivers: step <-> time mapping per row, input
// projection, packed recurrent weights.
#pragma once
#include <cstdint>
#include <cstring>
#include "common.h"
#include "gemm/gemm.h"
#include "kernel_api.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// kernel_api.h's gate_count, compiled in this ISA's namespace (kernel_api.h says why).
inline int gates_of(Cell c) { return c == Cell::Lstm ? 4 : c == Cell::Gru ? 3 : 1; }

// Whether nthreads members can take B rows in equal shares (split_range), each tiled from its
// first row (MR rows a tile, the rest last), with every row's FMA chains those of one thread's
// tiles from row 0: those split k in tiles of 1-3 rows (KSplit), so no such tile either way.
// k_whole: where the members' tiles of 2-3 rows keep k whole (ForwardLoop::k_whole), as one
// thread's tiles of 4 rows and more do, so shares of 2 rows and up keep the chains too.
template <typename T>
bool rows_keep_chains(int64_t B, int nthreads, bool k_whole = false) {
  constexpr int64_t MR = Tile<T>::MR;
  const int64_t least = k_whole ? 2 : 4;
  if (nthreads <= 1 || (B % MR != 0 && B % MR < 4)) return false;
  for (int t = 0; t < nthreads; ++t) {
    int64_t r0 = 0, r1 = 0;
    split_range(B, nthreads, t, &r0, &r1);
    if (r1 - r0 < least || ((r1 - r0) % MR != 0 && (r1 - r0) % MR < least)) return false;
  }
  return true;
}

// FLOPs of one step's recurrent product h W_hh^T (every gate), which decide how a step is threaded.
inline double recurrent_step_flops(const LayerShape& s) {
  return 2.0 * s.B * gates_of(s.cell) * s.H * s.Hout;
}

// Whether a rows split (the forward's by_rows, the backward's rows apart) may give its members
// tiles of 2-3 rows where one thread's tiles are 4 rows or more, their tiles keeping k whole
// (rows_keep_chains' k_whole, ForwardLoop::k_whole, BackwardLoop::k_whole) so one thread's bits
// hold: 2 + 2 rows, or 14 + 14 on AVX-512 (tiles of 12 and 2, where whole tiles from row 0 split
// 24 + 4). Only from 90 KFLOP a step. In-process A/B, 2 threads, medians, inference:
// 100x4x100x100 LSTM 0.816 -> 0.609 ms, GRU 0.687 -> 0.511; 100x6x100x100 LSTM 1.190 -> 0.888;
// 100x5x128x128 GRU 0.916 -> 0.768; 100x4x64x64 GRU 0.159 -> 0.145 (units -> rows);
// 100x28x128x128 LSTM 6.533 -> 4.488, GRU 4.842 -> 3.363; 100x29x64x160 LSTM 7.360 -> 5.140;
// 100x30x100x100 LSTM 4.127 -> 3.405 (24 + 4 or 24 + 6 rows -> equal shares); AVX2,
// 100x17x100x100 LSTM 2.552 -> 2.312; training 100x4x100x100 LSTM 2.748 -> 2.453, 100x6x64x128
// GRU 3.458 -> 3.017, 100x4x64x64 LSTM 1.046 -> 0.943, 100x28x128x128 GRU 16.01 -> 12.85,
// 100x30x100x100 LSTM 16.05 -> 12.18. Smaller steps lost in training (100x4x32x48 LSTM 0.577 ->
// 0.696, 100x6x32x32 GRU 0.370 -> 0.481) and the Elman RNN's 80 KFLOP at 100x4x100x100 in
// inference (0.191 -> 0.201).
// The backward's rows apart so, from 200 KFLOP a step (in-process A/B, 2 threads, training,
// medians, its team -> rows apart: 100x4x100x100 GRU 2.284 -> 2.008 ms, 100x6x100x100 LSTM
// 3.335 -> 2.973, GRU 3.091 -> 2.787, 100x5x128x128 GRU 2.865 -> 2.622; under it
// 100x4x64x64 LSTM 0.980 -> 1.041, GRU 0.915 -> 0.990, 100x6x100x100 RNN 1.117 -> 1.173).
constexpr double kFewRowsMinStepFlops = 9e4, kFewRowsMinBackwardStepFlops = 2e5;
inline bool rows_k_whole(const LayerShape& s, double min_flops = kFewRowsMinStepFlops) {
  return recurrent_step_flops(s) >= min_flops;
}

// Row b's length (T when no lengths are given), and the time its step s consumes.
struct Steps {
  const int64_t* lengths;
  int64_t T;
  bool reverse;
  int64_t len(int64_t b) const { return lengths ? lengths[b] : T; }
  bool active(int64_t s, int64_t b) const { return s < len(b); }
  int64_t time(int64_t s, int64_t b) const { return reverse ? len(b) - 1 - s : s; }
  // How many of rows [m, m + rows) a step's products need at step s: up to the last row still
  // running (rows past their length only carry their state).
  int64_t live_rows(int64_t s, int64_t m, int64_t rows) const {
    if (!lengths) return rows;
    while (rows > 0 && !active(s, m + rows - 1)) --rows;
    return rows;
  }
};

// Whether a call keeps its weights' packed forms for later calls (CachedPanels). A frozen call's
// weights keep their bytes (ForwardArgs::frozen) and an inference call's usually do. A training
// call's are about to change: an optimiser step edits them between calls, so a kept form would
// only cost a copy of the weights' bytes and a comparison, and be packed again next call. Such
// calls pack into buffers of their own, freed when the form goes out of scope (forward before
// backward). In-process A/B, one layer, 1 thread, medians, weights edited in place before every
// call as an optimiser does: online-small LSTM 0.910 -> 0.861 ms, GRU 0.702 -> 0.664, stacked
// LSTM 17.1 -> 16.4, others within noise; with the same weights every call (which the cache
// served) online-small RNN 0.203 -> 0.215, GRU 0.647 -> 0.661, others within noise. Training
// peak memory: deepbench LSTM 195 -> 132 MiB, GRU 164 -> 114, stacked LSTM 29 -> 21.
// Nor does a call whose weights are copies of its own (ForwardArgs::keep_packed false).
struct PanelReuse {
  bool keep;        // look up and keep the forms in the calling thread's cache
  uint64_t frozen;  // ForwardArgs::frozen
  static PanelReuse of_call(bool training, uint64_t frozen, bool keep_packed = true) {
    return PanelReuse{keep_packed && (frozen != 0 || !training), frozen};
  }
};

// Packed panels of one weight matrix, reused from the calling thread's cache while the weight's
// bytes are unchanged (workspace.cpp), else packed now by `pack_into(buffer, from)`, `from` being
// src or the cache's copy of its bytes; packed every call into a buffer of its own where the
// call does not keep its forms (PanelReuse).
enum class PanelKind : int { InputProj = 1, Gates, Proj, BackHH, BackHN, BackHR, InputGates, BackHHHalves,
                             AmxGates, AmxInputGates, AmxSplits };

template <typename T>
class CachedPanels {
 public:
  // src is a rows x cols matrix; nothing is packed when rows * cols == 0.
  template <typename PackInto>
  CachedPanels(PanelKind kind, const T* src, int64_t rows, int64_t cols, int64_t packed_elems,
               int nthreads, PanelReuse reuse, PackInto pack_into) {
    if (rows * cols == 0 || packed_elems == 0) return;
    const int64_t tag = static_cast<int64_t>(kind) * 1000 + Tile<T>::NR * 10 + int64_t(sizeof(T));
    bool valid = false;
    const void* from = src;
    if (reuse.keep)
      p_ = static_cast<T*>(cached_packed(src, sizeof(T) * rows * cols, sizeof(T) * packed_elems,
                                         tag, rows, cols, &valid, &from, nthreads, reuse.frozen));
    if (!p_) p_ = own_ = static_cast<T*>(aligned_alloc_bytes(sizeof(T) * packed_elems));
    if (!valid) pack_into(p_, static_cast<const T*>(from));
  }
  ~CachedPanels() { aligned_free_bytes(own_); }
  CachedPanels(const CachedPanels&) = delete;
  CachedPanels& operator=(const CachedPanels&) = delete;
  T* get() const { return p_; }

 private:
  T* p_ = nullptr;
  T* own_ = nullptr;
};

// Whether every value of a weight (rows x cols, contiguous) splits for AMX tiles
// (amx_operand_splits). A frozen call's verdict is kept as its packed forms are (one value, 1
// or 0; ForwardArgs::frozen promises the same bytes), so its weights are scanned once, not every
// call (stacked LSTM inference: 4 MB of weights a call). Other calls scan: keeping the verdict
// would keep a copy of the weight's bytes to compare, which W_ih split as it lies has no other
// use for. False in builds without tiles and for float64.
template <typename T>
bool weight_splits(const T* w, int64_t rows, int64_t cols, int nthreads, PanelReuse reuse) {
  if constexpr (!amx_build_for<T>()) return false;
  if (!reuse.frozen) return amx_operand_splits<T>(w, rows, cols, cols, nthreads);
  CachedPanels<T> verdict(PanelKind::AmxSplits, w, rows, cols, 1, nthreads, reuse, [&](T* buf, const T* from) {
    buf[0] = amx_operand_splits<T>(from, rows, cols, cols, nthreads) ? T(1) : T(0);
  });
  return !verdict.get() || verdict.get()[0] != T(0);  // (an empty weight splits)
}

// The row stride of Gx: G*H rounded up to whole cache lines, and to an odd number of them. Rows
// a multiple of 4 KB apart (G*H = 1024 floats: stacked and wide LSTM) put all of a tile's rows
// in one L1 set, so the GEMM's 12 row stores evicted each other and the operands it was reading;
// an odd count of lines spreads any 64 consecutive rows over distinct sets. C++ loop, 1 thread,
// 800x1024x256 (the stacked LSTM's input projection): 108.8 -> 111.6 GFLOP/s.
template <typename T>
inline int64_t gx_row_stride(int64_t GH) {
  constexpr int64_t per_line = 64 / int64_t(sizeof(T));
  const int64_t lines = ceil_div<int64_t>(GH, per_line);
  return (lines | 1) * per_line;
}

// The bias the input projection adds to each gate's chain: b_ih + b_hh, except that the GRU's
// b_hn stays out (it sits inside r*(W_hn h + b_hn) and is added in the step). Gate g's H values
// at out + g * gate_stride (gate_stride >= H; the padding is left alone).
template <typename T>
void folded_bias(const LayerShape& s, const T* b_ih, const T* b_hh, T* out, int64_t gate_stride) {
  const int64_t G = gates_of(s.cell);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t u = 0; u < s.H; ++u) {
      const int64_t n = g * s.H + u;
      out[g * gate_stride + u] = b_ih[n] + (s.cell == Cell::Gru && g == 2 ? T(0) : b_hh[n]);
    }
}

// W_ih packed for the input projection on the FMA kernels (kept as the call's reuse allows), or
// nothing where !wanted.
template <typename T>
CachedPanels<T> input_weights_packed(const LayerShape& s, const T* w_ih, int nthreads,
                                     PanelReuse reuse, bool wanted = true) {
  const int64_t GH = gates_of(s.cell) * s.H;
  return CachedPanels<T>(PanelKind::InputProj, w_ih, wanted ? GH : 0, s.I,
                         wanted ? packed_b_size<T>(s.I, GH) : 0, nthreads, reuse,
                         [&](T* buf, const T* from) { pack_b_gemm<T>(s.I, GH, from, 1, s.I, buf, nthreads); });
}

// Rows [r0, r1) of Gx = X W_ih^T + bias on the FMA kernels, from W_ih packed by
// input_weights_packed and the folded bias (or null): each element's chains k in order, in
// blocks of kSumBlock (no k-split), then the bias, so any run of rows on any threads gives the
// whole product's bits.
template <typename T>
void input_projection_rows(const LayerShape& s, const T* x, const T* w_packed, const T* bias,
                           T* gx, int64_t ld_gx, int64_t r0, int64_t r1, int nthreads) {
  const int64_t GH = gates_of(s.cell) * s.H;
  gemm_packed<T>(r1 - r0, GH, s.I, x + r0 * s.I, s.I, 1, w_packed, gx + r0 * ld_gx, ld_gx, false,
                 nthreads, bias, false, false);
}

// Gx (T*B, G*H; rows ld_gx apart) = X W_ih^T + the folded bias, as one GEMM, the same chains
// for every element (no k-split in a short last row tile): the riding tiles' bits
// (projection_mode.h).
// amx_ok: as gemm_packed's (a single row's projection must give the riding tiles' bits).
// lengths (or null): on the FMA kernels, only the rows the steps read, time t's up to the last
// row whose length passes t (rows past their length are never read as Gx), runs of whole steps
// as one product. Any run of rows gives the whole product's bits (input_projection_rows).
// In-process A/B, 1 thread, inference, medians, T x B x I x H, lengths drawn from T/2..T and
// sorted (as torch.nn's packed batches are), before -> the steps' tiles skipping ended rows
// (ForwardLoop::cell_phase) -> this too: 100x64x256x256 LSTM 64.3 -> 57.3 -> 50.3 ms, GRU 49.4 ->
// 43.6 -> 39.1, RNN 17.7 -> 16.1 -> 15.1; 50x32x128x512 LSTM 40.1 -> 32.8 -> 30.9; 200x8x64x128
// LSTM 3.49 -> 3.08 -> 2.82. Unsorted, where ended rows lie among running ones: 5-11% faster.
template <typename T>
void input_projection(const LayerShape& s, const T* x, const T* w_ih, const T* b_ih,
                      const T* b_hh, T* gx, int64_t ld_gx, int nthreads, PanelReuse reuse,
                      bool amx_ok, const int64_t* lengths = nullptr) {
  const int64_t G = gates_of(s.cell), GH = G * s.H, M = s.T * s.B;
  Scratch<T> bias(s.has_bias ? GH : 0);
  if (s.has_bias) folded_bias(s, b_ih, b_hh, bias.p, s.H);
  // The bias rides in the GEMM: added to each gate's chain in the registers (with I = 0, Gx is
  // the bias).
  // On tiles W_ih is split as it lies, with no float32 packed copy to keep.
  const bool w_splits = amx_ok && amx_gemm_shape<T>(M, GH, s.I) &&
                        weight_splits<T>(w_ih, GH, s.I, nthreads, reuse);
  if (w_splits && gemm_raw_b_on_tiles<T>(M, GH, s.I, x, s.I, 1, w_ih, 1, s.I, gx, ld_gx, false,
                                         nthreads, bias.p, false, true))
    return;
  // The tiles declined the product (its shape, or x or W_ih does not split), and would again
  // on the packed W_ih: the FMA kernels, without scanning the operands a second time.
  const CachedPanels<T> w = input_weights_packed<T>(s, w_ih, nthreads, reuse);
  if (!lengths) return input_projection_rows<T>(s, x, w.get(), bias.p, gx, ld_gx, 0, M, nthreads);
  const Steps steps{lengths, s.T, false};  // (time t is step t here: Gx is by time)
  for (int64_t t = 0, t1; t < s.T; t = t1) {
    const int64_t rows = steps.live_rows(t, 0, s.B);
    t1 = t + 1;
    if (rows == s.B)
      while (t1 < s.T && steps.live_rows(t1, 0, s.B) == s.B) ++t1;
    const int64_t r1 = rows == s.B ? t1 * s.B : t * s.B + rows;
    if (rows > 0) input_projection_rows<T>(s, x, w.get(), bias.p, gx, ld_gx, t * s.B, r1, nthreads);
  }
}

// Recurrent weights packed per gate: gate g is W_hh[g*H:(g+1)*H, :]^T as NR-wide panels over
// hidden units, and the G panels of one unit block lie back to back, so one tile holds every gate
// of the same units and a step reads all of W_hh as one sequential stream. Gate-major panels
// were G streams restarting every K*NR elements; step-only LSTM (I=8) min, gate-major ->
// unit-major: H=1024 B=32 981-1023 -> 878-890 ms, H=512 B=64 223-245 -> 188-220 ms.
//
// The compact tail: where H's last unit block holds few units, at most NR / G (LSTM: 1-8 of
// AVX-512's float lanes, GRU 1-10), its G gates lie side by side in the block's first panel,
// gate g's units at lanes g * units.. (tail_units), and the other panels of that block are left
// unused. A gate per panel computed G vectors of that block, each with units of its W lanes
// real; side by side they take one vector or two. H = 100 (32-lane blocks, 4 units in the last)
// computed 112 units a gate, 448 a step's row; now 400. Tiles of several rows keep each
// element's FMA chain (the same kernels), so their bits; a single row's pass splits k instead
// (forward.h, kTailChains): its bits are new, the same for every thread count.
// H's last unit block (H > 0) and its units, 1..NR.
template <typename T>
inline int64_t last_unit_block(int64_t H) { return ceil_div<int64_t>(H, Tile<T>::NR) - 1; }
template <typename T>
inline int64_t last_block_units(int64_t H) { return H - last_unit_block<T>(H) * Tile<T>::NR; }

template <typename T>
inline int compact_tail_units(int G, int64_t H) {
  const int64_t units = last_block_units<T>(H);
  return G >= 2 && G * units <= Tile<T>::NR ? static_cast<int>(units) : 0;
}

template <typename T>
struct PackedGates {
  int G;
  int64_t K;
  T* data;
  // The compact tail's unit block and its units (compact_tail_units), or -1 and 0: W_ih's panels
  // (the projection in the step or riding along) keep a panel per gate.
  int64_t tail_block = -1;
  int tail_units = 0;
  const T* panel(int g, int64_t unit_block) const {
    return data + (unit_block * G + g) * K * Tile<T>::NR;
  }
  // Whether the compact tail's gates fill no more than its panel's first vector.
  bool tail_in_one_vector() const { return G * tail_units <= Vec<T>::W; }
};

// W_hh's panels at data, as pack_gates(..., compact_tail = true) lays them out.
template <typename T>
PackedGates<T> recurrent_gates(int G, int64_t K, int64_t H, T* data) {
  const int units = compact_tail_units<T>(G, H);
  return PackedGates<T>{G, K, data, units > 0 ? last_unit_block<T>(H) : -1, units};
}

template <typename T>
inline int64_t packed_gates_size(int G, int64_t K, int64_t H) {
  return G * packed_b_size<T>(K, H);
}

// The compact tail's panel (compact_tail_units: `units` units from u0) into d: B(k, g * units +
// j) = w[(g * H + u0 + j) * K + k], zero past G * units.
template <typename T>
void pack_compact_tail(int G, int64_t K, int64_t H, const T* w, int64_t u0, int units, T* d) {
  constexpr int NR = Tile<T>::NR;
  set_bytes(d, 0, sizeof(T) * K * NR);
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < units; ++j) {
      const T* row = w + (g * H + u0 + j) * K;
      T* lane = d + g * units + j;
      for (int64_t k = 0; k < K; ++k) lane[k * NR] = row[k];
    }
}

// Unit blocks [ub0, ub1) of pack_gates's panels, on the calling thread; compact_tail: H's last
// block as the compact tail where it qualifies (compact_tail_units), as W_hh's are.
template <typename T>
void pack_gate_blocks(int G, int64_t K, int64_t H, const T* w /*(G*H, K)*/, T* buf, int64_t ub0,
                      int64_t ub1, bool compact_tail = false) {
  constexpr int NR = Tile<T>::NR;
  const PackedGates<T> layout = compact_tail ? recurrent_gates<T>(G, K, H, buf)
                                             : PackedGates<T>{G, K, buf};
  for (int64_t ub = ub0; ub < ub1; ++ub) {
    if (ub == layout.tail_block) {
      pack_compact_tail(G, K, H, w, ub * NR, layout.tail_units, buf + ub * G * K * NR);
      continue;
    }
    for (int g = 0; g < G; ++g)
      pack_b_rows(0, K, ub, H, w + g * H * K, 1, K, buf + (ub * G + g) * K * NR);
  }
}

// buf: packed_gates_size elements, laid out as PackedGates::panel reads them. The threads take
// unit blocks from kParallelPackValues values of all the gates together: one gate's alone were
// under it at online-small's sizes. In-process A/B (bench/ab_builds.py --edit-weights: packed
// every call), 2 threads, inference, medians: online-small LSTM 0.290 -> 0.275 ms and 0.308 ->
// 0.289, GRU within noise, stacked within noise; 1 thread unchanged.
template <typename T>
void pack_gates(int G, int64_t K, int64_t H, const T* w /*(G*H, K)*/, T* buf, int nthreads,
                bool compact_tail = false) {
  const int64_t blocks = ceil_div<int64_t>(H, Tile<T>::NR);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && G * K * H > kParallelPackValues)
  for (int64_t ub = 0; ub < blocks; ++ub)
    pack_gate_blocks<T>(G, K, H, w, buf, ub, ub + 1, compact_tail);
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
