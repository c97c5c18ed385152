// The backward's whole-sequence products, after (or beside) its walk back through time: the
// weight gradients dW_ih = dGx^T X, dW_hh = dGh^T H_prev (dW_hr = dHs^T Hfull), the input
// gradient dX = dGx W_ih, and the bias gradients as column sums. They run over all T*B rows at
// once, or, for a single row (chunked_products), chunk by chunk of steps, so that on two threads
// one walks while the other takes each chunk's products as soon as its steps are walked
// (backward.h). The chunks are the shape's, never the threads': each weight gradient is the sum
// over the chunks from the last in time to the first, each chunk's sum in order, whatever runs it.
#pragma once
#include <cstdint>
#include <cstring>
#include "gemm/gemm.h"
#include "kernel_api.h"
#include "sequence/layout.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// out[n] (+)= sum over rows m of A[m*lda + n], a cascade of in-order sums, each from zero:
// runs of RUN rows, BLOCK runs, GROUP blocks, and the groups added to out in order
// (deterministic; the error grows with each level's count, not with M: one chain over T = 1000,
// B = 64 rows was 40x torch.nn's error, and those 500 blocks added to out in turn 2-7x). The
// runs of 8: with blocks of 128 rows summed in one chain, a bias gradient over 64-128 rows
// measured 2-3x torch.nn's error (its sums cascade too). The extra level adds a pass over an
// L1-resident row every 8 rows: 6400 x 2048 (fastrnns LSTM, from memory) 3.10 ms either way;
// from L2, 1000 x 256 (long-seq LSTM) 17.6 -> 24.4 us, 100 x 512 4.6 -> 5.8 (C++ loop, 1 thread).
template <typename T>
void column_sums(int64_t M, int64_t N, const T* A, int64_t lda, T* out, int nthreads,
                 bool accumulate = false) {
  constexpr int64_t CHUNK = 256, RUN = 8, BLOCK = 16, GROUP = 32;
  const int64_t chunks = ceil_div<int64_t>(N, CHUNK);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && M * N > (int64_t(1) << 18))
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = c * CHUNK, n1 = imin(N, n0 + CHUNK), n = n1 - n0;
    if (!accumulate)
      for (int64_t j = 0; j < n; ++j) out[n0 + j] = T(0);
    T run[CHUNK], block[CHUNK], group[CHUNK];
    for (int64_t g0 = 0; g0 < M; g0 += RUN * BLOCK * GROUP) {
      for (int64_t j = 0; j < n; ++j) group[j] = T(0);
      for (int64_t b0 = g0; b0 < imin(M, g0 + RUN * BLOCK * GROUP); b0 += RUN * BLOCK) {
        for (int64_t j = 0; j < n; ++j) block[j] = T(0);
        for (int64_t r0 = b0; r0 < imin(M, b0 + RUN * BLOCK); r0 += RUN) {
          for (int64_t j = 0; j < n; ++j) run[j] = T(0);
          for (int64_t m = r0; m < imin(M, r0 + RUN); ++m) {
            const T* row = A + m * lda + n0;
            for (int64_t j = 0; j < n; ++j) run[j] += row[j];
          }
          for (int64_t j = 0; j < n; ++j) block[j] += run[j];
        }
        for (int64_t j = 0; j < n; ++j) group[j] += block[j];
      }
      for (int64_t j = 0; j < n; ++j) out[n0 + j] += group[j];
    }
  }
}

// Steps in a chunk of chunked_products: the last chunk in time is walked first and the first
// (times [0, T % kProductChunkSteps), or a whole chunk) last, its products the only ones left
// after the walk on two threads. In-process A/B, training, against the products at once after
// the walk (medians; long-seq LSTM, GRU, LSTM 300x1x64x64): chunks of 64 steps x0.975, x0.960,
// x0.979 on one thread, x1.234, x1.141, x1.052 on two; 128 x0.991, x0.996, x0.991 / x1.247,
// x1.187, x1.011; 256 x1.014, x1.001, x1.006 / x1.233, x1.184, x0.895 (two chunks: the
// products of the first wait for half the walk).
constexpr int64_t kProductChunkSteps = 128;

// Whether the products go chunk by chunk of steps: a single row (their rows are its steps),
// steps of one time each (no lengths, forward direction: dGx and dGh are one buffer, indexed
// alike), no projection, more than one chunk, and products the FMA kernels take in every chunk
// (no AMX tiles: whether those take a product depends on every value of dG, known only after
// the walk). The shape alone decides, so the bits do not depend on the threads.
template <typename T>
bool chunked_products(const LayerShape& s, bool has_lengths) {
  const int64_t GH = int64_t(gates_of(s.cell)) * s.H, C = kProductChunkSteps;
  const bool no_tiles = !amx_gemm_shape<T>(C, s.I, GH) && !amx_gemm_shape<T>(GH, s.I, C, true) &&
                        !amx_gemm_shape<T>(GH, s.Hout, C, true);
  return s.B == 1 && !has_lengths && !s.reverse && !s.has_proj && s.T > C && no_tiles;
}

// Chunk c of chunked_products (c = 0 the last in time): its steps' times [*t0, *t1).
inline void product_chunk(int64_t T, int64_t c, int64_t* t0, int64_t* t1) {
  *t1 = T - c * kProductChunkSteps;
  *t0 = imax<int64_t>(0, *t1 - kProductChunkSteps);
}
inline int64_t product_chunks(int64_t T) { return ceil_div<int64_t>(T, kProductChunkSteps); }
// Chunks from which a second thread takes the products beside the walk, instead of the two
// walking as a step team: with two, the first chunk's products wait for most of the walk.
constexpr int64_t kOverlapMinChunks = 3;
// Whether two threads take the products beside a walk on one (chunked_products, chunks enough).
template <typename T>
bool products_beside_walk(const LayerShape& s, bool has_lengths) {
  return chunked_products<T>(s, has_lengths) && product_chunks(s.T) >= kOverlapMinChunks;
}

// The products' operands: the backward's pre-activation gradients (dgx by time, dgh by step,
// dghn the GRU's recurrent n rows, ld_n apart; see PreactivationGradients) and the projection's
// saved gradients dhs.
template <typename T>
struct SequenceProducts {
  const BackwardArgs<T>& a;
  const T *dgx, *dgh, *dghn;
  int64_t ld_n;
  const T* dhs;

  // The products over rows [r0, r1) of the T*B (whole steps; time and step alike where r0 > 0
  // or r1 < T*B). first: the first rows done, whose weight and bias gradients are set (or
  // added into a.dw_*, with a.accumulate); later ones add. dgx_splits: dGx splits for AMX tiles
  // (amx_operand_splits), for the products at once. Where db_hh is db_ih's sums
  // (biases_alike), finish() copies it once all rows are done.
  void run(int64_t r0, int64_t r1, bool first, int nthreads, bool dgx_splits) const {
    const LayerShape& s = a.s;
    const int64_t G = gates_of(s.cell), H = s.H, Hout = s.Hout, GH = G * H, M = r1 - r0;
    const bool gru = s.cell == Cell::Gru, gru_two_phase = gru && !s.linear_before_reset;
    const bool acc = a.accumulate || !first;
    // Sums over T*B rows (and dX's over the gates) go in blocks, each added after (the GEMM's
    // kSumBlock and k_blocks_apart; column_sums): one chain over every row grew the error with T*B.
    constexpr bool kApart = true;
    const T* gx = dgx + r0 * GH;
    const T* gh = dgh + r0 * GH;
    const T* h_prev = (a.h_prev_products ? a.h_prev_products : a.saved.h) +
                      r0 * Hout;  // step k's h_{k-1}: saved row k
    // dGx meets two products and, where it is dGh too, a third. A null dx or dw_ih (the
    // caller needs no input gradient, or no weight gradients) skips its product.
    if (a.dw_ih && a.x_packed)  // (all rows: x_packed is kept only where B > 1)
      gemm_packed<T>(GH, s.I, M, gx, 1, GH, a.x_packed, a.dw_ih, s.I, acc, nthreads, nullptr,
                     true, true, dgx_splits, kApart);
    else if (a.dw_ih)
      gemm<T>(GH, s.I, M, gx, 1, GH, a.x + r0 * s.I, s.I, 1, a.dw_ih, s.I, acc, nthreads,
              dgx_splits, kApart);
    if (a.dx)
      gemm<T>(M, s.I, GH, gx, GH, 1, a.w_ih, s.I, 1, a.dx + r0 * s.I, s.I, false, nthreads,
              dgx_splits, kApart);
    const bool dgh_splits = dgh == dgx && dgx_splits;
    if (a.dw_hh && !gru) {
      gemm<T>(GH, Hout, M, gh, 1, GH, h_prev, Hout, 1, a.dw_hh, Hout, acc, nthreads, dgh_splits,
              kApart);
    } else if (a.dw_hh) {  // r, z rows from dgh; n rows from dghn, which met r*h in the two-phase GRU
      gemm<T>(2 * H, Hout, M, gh, 1, GH, h_prev, Hout, 1, a.dw_hh, Hout, acc, nthreads,
              dgh_splits, kApart);
      const T* n_met = gru_two_phase ? a.saved.gru_extra + r0 * H : h_prev;
      gemm<T>(H, Hout, M, dghn + r0 * ld_n, 1, ld_n, n_met, Hout, 1, a.dw_hh + 2 * H * Hout, Hout,
              acc, nthreads, false, kApart);
    }
    if (a.dw_hr)
      gemm<T>(Hout, H, M, dhs + r0 * Hout, 1, Hout, a.saved.hfull + r0 * H, H, 1, a.dw_hr, H, acc,
              nthreads, false, kApart);
    if (a.db_ih) column_sums<T>(M, GH, gx, GH, a.db_ih, nthreads, acc);
    if (a.db_hh && !gru && !biases_alike())
      column_sums<T>(M, GH, gh, GH, a.db_hh, nthreads, acc);
    if (a.db_hh && gru) {
      column_sums<T>(M, 2 * H, gh, GH, a.db_hh, nthreads, acc);
      column_sums<T>(M, H, dghn + r0 * ld_n, ld_n, a.db_hh + 2 * H, nthreads, acc);
    }
  }
  // db_hh is db_ih's sums (one buffer of gradients, not accumulating): copied once at the end.
  bool biases_alike() const {
    return a.db_hh && a.db_ih && a.s.cell != Cell::Gru && dgh == dgx && !a.accumulate;
  }
  void finish() const {
    if (biases_alike()) copy_bytes(a.db_hh, a.db_ih, sizeof(T) * gates_of(a.s.cell) * a.s.H);
  }
};

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
