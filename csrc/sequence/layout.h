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

inline int gates_of(Cell c) { return c == Cell::Lstm ? 4 : c == Cell::Gru ? 3 : 1; }

// Row b's length (T when no lengths are given), and the time its step s consumes.
struct Steps {
  const int64_t* lengths;
  int64_t T;
  bool reverse;
  int64_t len(int64_t b) const { return lengths ? lengths[b] : T; }
  bool active(int64_t s, int64_t b) const { return s < len(b); }
  int64_t time(int64_t s, int64_t b) const { return reverse ? len(b) - 1 - s : s; }
};

// Gx (T*B, G*H) = X W_ih^T + b_ih + b_hh, except that the GRU's b_hn stays out: it sits inside
// r*(W_hn h + b_hn) and is added in the step.
template <typename T>
void input_projection(const LayerShape& s, const T* x, const T* w_ih, const T* b_ih,
                      const T* b_hh, T* gx, int nthreads) {
  const int64_t G = gates_of(s.cell), GH = G * s.H, M = s.T * s.B;
  gemm<T>(M, GH, s.I, x, s.I, 1, w_ih, 1, s.I, gx, GH, false, nthreads);
  if (!s.has_bias || M == 0) return;
  Scratch<T> bias(GH);
  for (int64_t n = 0; n < GH; ++n) {
    const bool gru_n = s.cell == Cell::Gru && n >= 2 * s.H;
    bias.p[n] = b_ih[n] + (gru_n ? T(0) : b_hh[n]);
  }
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && M * GH > 65536)
  for (int64_t m = 0; m < M; ++m) {
    T* row = gx + m * GH;
    for (int64_t n = 0; n < GH; ++n) row[n] += bias.p[n];
  }
}

// Recurrent weights packed per gate: gate g is W_hh[g*H:(g+1)*H, :]^T as NR-wide panels over
// hidden units, so unit block u of gate g is panel u of gates[g], and one tile holds every gate
// of the same units.
template <typename T>
struct PackedGates {
  int G;
  int64_t K, H, stride;  // stride: elements per gate
  T* data;
  const T* panel(int g, int64_t unit_block) const {
    return data + g * stride + unit_block * K * Tile<T>::NR;
  }
};

template <typename T>
inline int64_t packed_gates_size(int G, int64_t K, int64_t H) {
  return G * packed_b_size<T>(K, H);
}

template <typename T>
PackedGates<T> pack_gates(int G, int64_t K, int64_t H, const T* w /*(G*H, K)*/, T* buf, int nthreads) {
  PackedGates<T> p{G, K, H, packed_b_size<T>(K, H), buf};
  for (int g = 0; g < G; ++g) pack_b<T>(K, H, w + g * H * K, 1, K, buf + g * p.stride, nthreads);
  return p;
}

// Splits [0, n) into nparts contiguous ranges; part i gets [begin, end).
inline void split_range(int64_t n, int nparts, int part, int64_t* begin, int64_t* end) {
  const int64_t base = n / nparts, extra = n % nparts;
  *begin = part * base + imin<int64_t>(part, extra);
  *end = *begin + base + (part < extra ? 1 : 0);
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
