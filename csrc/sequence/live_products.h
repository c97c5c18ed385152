// The backward's whole-sequence products over the rows that ran only. With lengths, a row's
// steps past its length carry no gradient: their rows of dG are zeros, and the products over
// all T*B rows (SequenceProducts) spent a quarter of their FMAs on them where lengths run from
// T/2 to T. Here the rows that ran (step or time i < lengths[b], the same rows either way) are
// gathered, a chunk at a time, into compact copies of every operand, and the same products run
// on those; dX's rows come back to their places (its rows past the lengths are left to the
// caller, which zeros them: bindings/backward.cpp, zero_padding).
// The chunks are whole GEMM K blocks (KC) of the gathered rows, fixed by the lengths alone, so
// the weight gradients are the same bits whatever the threads (not those of all T*B rows: their
// sums meet other blocks).
#pragma once
#include <cstdint>
#include <vector>
#include "common.h"
#include "gemm/gemm.h"
#include "kernel_api.h"
#include "sequence/backward_products.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// The flat rows i*B + b (step or time i) that ran, in order: i < lengths[b].
inline std::vector<int64_t> rows_that_ran(int64_t T, int64_t B, const int64_t* lengths) {
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < T; ++i)
    for (int64_t b = 0; b < B; ++b)
      if (i < lengths[b]) rows.push_back(i * B + b);
  return rows;
}

// Whether the products gather the rows that ran: products of G*H*(I + Hout) FMAs a row and up
// (2^16: an LSTM of I = H = 128), where lengths leave a 64th of the T*B rows idle or more.
// Gathering copies each row's operands once, and the products then read ~8 MB chunks from L3
// rather than all of dG from memory three times: in-process A/B, 1 thread, training, 100 x 64 x
// 256 x 256, lengths 94..100 (3% idle), medians: LSTM 102.8 -> 98.0 ms, GRU 78.6 -> 72.9; I = H
// = 128 31.4 -> 29.2 and 24.3 -> 23.7. Smaller products lost to the copies: I = H = 64 LSTM
// 8.30 -> 8.87, GRU 6.58 -> 7.53 at 3% idle, the GRU 6.35 -> 7.04 still at 12%.
inline bool products_gather_rows(const LayerShape& s, const int64_t* lengths) {
  constexpr int64_t kMinRowFmas = int64_t(1) << 16;
  const int64_t rows = s.T * s.B, row_fmas = int64_t(gates_of(s.cell)) * s.H * (s.I + s.Hout);
  if (!lengths || rows == 0 || row_fmas < kMinRowFmas) return false;
  int64_t ran = 0;  // (lengths lie in 0..T)
  for (int64_t b = 0; b < s.B; ++b) ran += lengths[b];
  return (rows - ran) * 64 >= rows;
}

// Values from which a gather splits its rows among the threads (as pack_b's kParallelPackValues).
constexpr int64_t kParallelGatherValues = int64_t(1) << 16;

// dst row k = src row rows[k] (cols values each; rows ld apart in src, cols apart in dst).
template <typename T>
void gather_rows(const T* src, int64_t ld, int64_t cols, const int64_t* rows, int64_t n, T* dst,
                 int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && n * cols > kParallelGatherValues)
  for (int64_t k = 0; k < n; ++k)
    copy_bytes(dst + k * cols, src + rows[k] * ld, sizeof(T) * size_t(cols));
}

// The same from B packed by pack_b_gemm (K rows of N values: the forward's x_packed, kept in
// place of x).
template <typename T>
void gather_packed_rows(const T* Bp, int64_t K, int64_t N, const int64_t* rows, int64_t n, T* dst,
                        int nthreads) {
  constexpr int64_t NR = Tile<T>::NR, KC = GemmBlocking<T>::KC;
  const int64_t panels = ceil_div<int64_t>(N, NR);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && n * N > kParallelGatherValues)
  for (int64_t k = 0; k < n; ++k) {
    const int64_t r = rows[k], k0 = r / KC * KC;
    for (int64_t p = 0; p < panels; ++p)
      copy_bytes(dst + k * N + p * NR, gemm_b_slice<T>(Bp, panels, K, k0, p) + (r - k0) * NR,
                 sizeof(T) * size_t(imin(NR, N - p * NR)));
  }
}

// The products of `all` (whose a.lengths is set) over the rows that ran, `rows` (rows_that_ran);
// all.finish() is the caller's, as after all.run.
template <typename T>
void products_over_rows_that_ran(const SequenceProducts<T>& all, const std::vector<int64_t>& rows,
                                 int nthreads) {
  const BackwardArgs<T>& a = all.a;
  const LayerShape& s = a.s;
  const int64_t H = s.H, Hout = s.Hout, GH = int64_t(gates_of(s.cell)) * H;
  const int64_t ran = int64_t(rows.size());
  const bool gru = s.cell == Cell::Gru, gru_two_phase = gru && !s.linear_before_reset;
  const bool dgh_apart = all.dgh != all.dgx;
  const bool dghn_apart = gru && all.dghn != all.dgh + 2 * H;  // (else inside dgh, GH apart)
  const bool weights = a.dw_ih != nullptr;  // (the weight gradients come all or none)
  const bool hfull = a.dw_hr != nullptr;
  const T* h_prev = a.h_prev_products ? a.h_prev_products : a.saved.h;

  // Rows a chunk: whole KC blocks, ~8 MB of gathered operands. Counted from the shape alone,
  // not from the gradients asked for, so that skipping some leaves the others' bits.
  constexpr int64_t KC = GemmBlocking<T>::KC;
  const int64_t row_values = GH * (s.reverse ? 2 : 1) + (gru ? H : 0) + 2 * s.I + Hout +
                             (gru_two_phase ? H : 0) + (s.has_proj ? Hout + H : 0);
  const int64_t budget = (int64_t(8) << 20) / int64_t(sizeof(T)) / row_values;
  const int64_t chunk = imax<int64_t>(1, imin(ran, imax<int64_t>(1, budget / KC) * KC));

  Scratch<T> gx(chunk * GH), gh(dgh_apart ? chunk * GH : 0), ghn(dghn_apart ? chunk * H : 0);
  Scratch<T> x(weights ? chunk * s.I : 0), hp(weights ? chunk * Hout : 0);
  Scratch<T> dx(a.dx ? chunk * s.I : 0);
  Scratch<T> extra(gru_two_phase && weights ? chunk * H : 0);
  Scratch<T> dhs(hfull ? chunk * Hout : 0), hf(hfull ? chunk * H : 0);

  BackwardArgs<T> c = a;  // the chunk's: its operands compact, row k the k-th row that ran
  c.x = x.p;
  c.x_packed = nullptr;
  c.dx = a.dx ? dx.p : nullptr;
  c.h_prev_products = hp.p;
  c.saved.gru_extra = gru_two_phase && weights ? extra.p : a.saved.gru_extra;
  c.saved.hfull = hfull ? hf.p : a.saved.hfull;
  const T* dgh = dgh_apart ? gh.p : gx.p;
  const T* dghn = dghn_apart ? ghn.p : gru ? dgh + 2 * H : nullptr;
  const SequenceProducts<T> chunk_products{c, gx.p, dgh, dghn, dghn_apart ? H : GH, dhs.p};

  for (int64_t k0 = 0; k0 == 0 || k0 < ran; k0 += chunk) {  // (no row ran: the gradients' zeros)
    const int64_t n = imin(chunk, ran - k0);
    const int64_t* r = rows.data() + k0;
    gather_rows(all.dgx, GH, GH, r, n, gx.p, nthreads);
    if (dgh_apart) gather_rows(all.dgh, GH, GH, r, n, gh.p, nthreads);
    if (dghn_apart) gather_rows(all.dghn, all.ld_n, H, r, n, ghn.p, nthreads);
    if (weights) {
      if (a.x_packed) gather_packed_rows(a.x_packed, s.T * s.B, s.I, r, n, x.p, nthreads);
      else gather_rows(a.x, s.I, s.I, r, n, x.p, nthreads);
      gather_rows(h_prev, Hout, Hout, r, n, hp.p, nthreads);
    }
    if (gru_two_phase && weights) gather_rows(a.saved.gru_extra, H, H, r, n, extra.p, nthreads);
    if (hfull) {  // (only with the weight gradients)
      gather_rows(all.dhs, Hout, Hout, r, n, dhs.p, nthreads);
      gather_rows(a.saved.hfull, H, H, r, n, hf.p, nthreads);
    }
    gathered_chunks_count();
    chunk_products.run(0, n, k0 == 0, nthreads,
                       amx_operand_splits<T>(gx.p, n, GH, GH, nthreads));
    if (a.dx)
      for (int64_t k = 0; k < n; ++k)
        copy_bytes(a.dx + r[k] * s.I, dx.p + k * s.I, sizeof(T) * size_t(s.I));
  }
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
