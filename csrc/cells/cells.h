// The per-cell pointwise maths, forward (the epilogue of the fused step) and backward, written
// once on Vec<T> for every ISA. Each function walks nu units of one row in vectors, with a
// partial vector for the tail. Formulas: shared/DESIGN.md (torch.nn's, gate orders i,f,g,o and
// r,z,n); python/fusedrnn/reference.py is the same maths in NumPy.
#pragma once
#include <type_traits>
#include "cells/row.h"
#include "simd/math.h"
#include "simd/vec.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// Loads/stores the first min(n, W) lanes (n: the row's units left from there): a whole vector
// when n >= W.
template <typename T> inline Vec<T> ld(const T* p, int n) {
  return n >= Vec<T>::W ? Vec<T>::load(p) : load_partial(p, n);
}
template <typename T> inline void st(T* p, Vec<T> v, int n) {
  if (n >= Vec<T>::W) v.store(p); else store_partial(p, v, n);
}
template <typename T> inline Vec<T> one() { return Vec<T>::set1(T(1)); }
// Stores the new state at unit j: h_next, and its copy in y where the row has one.
template <typename T> inline void st_state(const RowForward<T>& r, int j, Vec<T> h, int n) {
  st(r.h_next + j, h, n);
  if (r.h_copy) st(r.h_copy + j, h, n);
}
// Stores one vector per gate: gate g at p + g*H (a row laid out as the weights' gate blocks).
template <typename T, typename... V>
inline void st_gates(T* p, int64_t H, int n, V... gates) {
  int64_t g = 0;
  (st(p + H * g++, gates, n), ...);
}
// Walks a row's nu units in vectors, two at a time while they last (fn(U = 2, j, W)), then one at
// a time (fn(U = 1, j, n), the last maybe partial). The epilogues take their U vectors stage by
// stage, so the U copies of each function's long dependency chain sit side by side and the
// compiler interleaves them (LSTM, one vector at a time: 143 cycles a vector, two: 124; C++
// loop, AVX-512, float). Callers mark their lambda always_inline: as a plain call it cost the
// gain (long-seq LSTM 0.96 -> 0.99 ms).
template <typename T, typename Fn>
FUSEDRNN_ALWAYS_INLINE inline void by_vector_pairs(int nu, Fn fn) {
  constexpr int W = Vec<T>::W;
  int j = 0;
  for (; j + 2 * W <= nu; j += 2 * W) fn(std::integral_constant<int, 2>{}, j, W);
  for (; j < nu; j += W) fn(std::integral_constant<int, 1>{}, j, nu - j);
}
// relu that keeps NaN (max(x, 0) would turn NaN into 0).
template <typename T> inline Vec<T> vrelu(Vec<T> x) {
  return Vec<T>::select(Vec<T>::lt(x, Vec<T>::zero()), Vec<T>::zero(), x);
}

// ---- Elman RNN: h' = act(W_ih x + b_ih + W_hh h + b_hh) ----
template <typename T, bool Relu>
inline void rnn_forward_row(const RowForward<T>& r) {
  using V = Vec<T>;
  for (int j = 0; j < r.nu; j += V::W) {
    const int n = r.nu - j;
    V pre = ld(r.acc + j, n) + ld(r.gx + j, n);
    st_state(r, j, Relu ? vrelu(pre) : vtanh(pre), n);
  }
}
template <typename T, bool Relu>
inline void rnn_backward_row(const RowBackward<T>& r) {
  using V = Vec<T>;
  for (int j = 0; j < r.nu; j += V::W) {
    const int n = r.nu - j;
    V dh = ld(r.dh + j, n), h = ld(r.h_next + j, n);
    // relu passes dh unless h <= 0, as torch's threshold_backward: NaN passes, so it is not lost.
    V d = Relu ? V::select(V::le(h, V::zero()), V::zero(), dh) : dh * V::fnma(h, h, one<T>());
    st(r.dgx + j, d, n);
    st(r.dgh + j, d, n);
  }
}

// ---- LSTM: i,f,o = sigmoid, g = tanh, c' = f*c + i*g, h' = o*tanh(c') ----
// U vectors of units from j (n lanes each), stage by stage: see by_vector_pairs.
template <typename T, int U>
FUSEDRNN_ALWAYS_INLINE inline void lstm_forward_units(const RowForward<T>& r, int j, int n) {
  using V = Vec<T>;
  const int64_t H = r.H, A = r.acc_gate_stride, X = r.gx_gate_stride;
  auto pre = [&](int g, int u) {
    return ld(r.acc + g * A + j + u * V::W, n) + ld(r.gx + g * X + j + u * V::W, n);
  };
  V i[U], f[U], g[U], o[U], c[U];
  for (int u = 0; u < U; ++u) i[u] = vsigmoid(pre(0, u));
  for (int u = 0; u < U; ++u) f[u] = vsigmoid(pre(1, u));
  for (int u = 0; u < U; ++u) g[u] = vtanh(pre(2, u));
  for (int u = 0; u < U; ++u) o[u] = vsigmoid(pre(3, u));
  for (int u = 0; u < U; ++u) c[u] = V::fma(f[u], ld(r.c_prev + j + u * V::W, n), i[u] * g[u]);
  for (int u = 0; u < U; ++u) {
    const int ju = j + u * V::W;
    st(r.c_next + ju, c[u], n);
    st_state(r, ju, o[u] * vtanh(c[u]), n);
    if (r.gates) st_gates(r.gates + ju, H, n, i[u], f[u], g[u], o[u]);
  }
}
template <typename T>
inline void lstm_forward_row(const RowForward<T>& r) {
  by_vector_pairs<T>(r.nu, [&](auto U, int j, int n) FUSEDRNN_ALWAYS_INLINE {
    lstm_forward_units<T, decltype(U)::value>(r, j, n);
  });
}
template <typename T>
inline void lstm_backward_row(const RowBackward<T>& r) {
  using V = Vec<T>;
  const int64_t H = r.H;
  const V one_ = one<T>();
  for (int j = 0; j < r.nu; j += V::W) {
    const int n = r.nu - j;
    V i = ld(r.gates + j, n), f = ld(r.gates + H + j, n);
    V g = ld(r.gates + 2 * H + j, n), o = ld(r.gates + 3 * H + j, n);
    V dh = ld(r.dh + j, n);
    V tc = vtanh(ld(r.c_next + j, n));
    V dc = V::fma(dh * o, V::fnma(tc, tc, one_), ld(r.dc + j, n));
    V di = dc * g * i * (one_ - i);
    V df = dc * ld(r.c_prev + j, n) * f * (one_ - f);
    V dg = dc * i * V::fnma(g, g, one_);
    V d_o = dh * tc * o * (one_ - o);
    st(r.dc + j, dc * f, n);
    st_gates(r.dgx + j, H, n, di, df, dg, d_o);
    // dGh apart, by step, where steps and times differ (a reversed run; PreactivationGradients)
    if (r.dgh != r.dgx) st_gates(r.dgh + j, H, n, di, df, dg, d_o);
  }
}

// ---- GRU, linear_before_reset (PyTorch): n = tanh(gx_n + r*(W_hn h + b_hn)) ----
template <typename T, int U>
FUSEDRNN_ALWAYS_INLINE inline void gru_forward_units(const RowForward<T>& r, int j, int n) {
  using V = Vec<T>;
  const int64_t H = r.H, A = r.acc_gate_stride, X = r.gx_gate_stride;
  V rg[U], z[U], hn_lin[U], nn[U];
  for (int u = 0; u < U; ++u) {
    const int ju = j + u * V::W;
    rg[u] = vsigmoid(ld(r.acc + ju, n) + ld(r.gx + ju, n));
  }
  for (int u = 0; u < U; ++u) {
    const int ju = j + u * V::W;
    z[u] = vsigmoid(ld(r.acc + A + ju, n) + ld(r.gx + X + ju, n));
  }
  for (int u = 0; u < U; ++u) {
    const int ju = j + u * V::W;
    hn_lin[u] = ld(r.acc + 2 * A + ju, n);
    if (r.b_hn) hn_lin[u] = hn_lin[u] + ld(r.b_hn + ju, n);
    nn[u] = vtanh(V::fma(rg[u], hn_lin[u], ld(r.gx + 2 * X + ju, n)));
  }
  for (int u = 0; u < U; ++u) {
    const int ju = j + u * V::W;
    V hp = ld(r.h_prev + ju, n);
    st_state(r, ju, V::fma(z[u], hp - nn[u], nn[u]), n);  // (1-z)*n + z*h
    if (r.gates) {
      st_gates(r.gates + ju, H, n, rg[u], z[u], nn[u]);
      st(r.extra + ju, hn_lin[u], n);
    }
  }
}
template <typename T>
inline void gru_forward_row(const RowForward<T>& r) {
  by_vector_pairs<T>(r.nu, [&](auto U, int j, int n) FUSEDRNN_ALWAYS_INLINE {
    gru_forward_units<T, decltype(U)::value>(r, j, n);
  });
}
template <typename T>
inline void gru_backward_row(const RowBackward<T>& r) {
  using V = Vec<T>;
  const int64_t H = r.H;
  const V one_ = one<T>();
  for (int j = 0; j < r.nu; j += V::W) {
    const int n = r.nu - j;
    V rg = ld(r.gates + j, n), z = ld(r.gates + H + j, n), nn = ld(r.gates + 2 * H + j, n);
    V dh = ld(r.dh + j, n), hp = ld(r.h_prev + j, n);
    // d n = dh (1 - z) as dh - dh z in one FMA: torch's autograd takes it so from h' = n + z (h -
    // n) (dh + -(dh z)), so an infinite dh gives NaN here as in torch.nn (dh * (1 - z) gave +-inf
    // and dx's rows NaN elsewhere), and it rounds once where dh * (1 - z) rounded 1 - z too.
    V dn = V::fnma(dh, z, dh) * V::fnma(nn, nn, one_);
    V dz = dh * (hp - nn) * z * (one_ - z);
    V dr = dn * ld(r.extra + j, n) * rg * (one_ - rg);
    st_gates(r.dgx + j, H, n, dr, dz, dn);
    if (r.dgh != r.dgx) st_gates(r.dgh + j, H, n, dr, dz);  // by step (a reversed run)
    st(r.dgh_n + j, dn * rg, n);  // d(W_hn h + b_hn): dn carries r
    st(r.dh_prev + j, dh * z, n);
  }
}

// ---- GRU, original formulation (ONNX default): n = tanh(gx_n + W_hn (r*h) + b_hn) ----
// Two phases per step: r, z (and r*h) from the first GEMM, then n and h' from the second.
template <typename T>
inline void gru_reset_forward_row(const RowForward<T>& r) {  // phase 1: gates r, z; extra = r*h
  using V = Vec<T>;
  const int64_t H = r.H, A = r.acc_gate_stride, X = r.gx_gate_stride;
  for (int j = 0; j < r.nu; j += V::W) {
    const int n = r.nu - j;
    V rg = vsigmoid(ld(r.acc + j, n) + ld(r.gx + j, n));
    V z = vsigmoid(ld(r.acc + A + j, n) + ld(r.gx + X + j, n));
    st(r.gates + j, rg, n);
    st(r.gates + H + j, z, n);
    st(r.extra + j, rg * ld(r.h_prev + j, n), n);
  }
}
template <typename T>
inline void gru_reset_new_row(const RowForward<T>& r) {  // phase 2: acc = W_hn (r*h), no bias
  using V = Vec<T>;
  const int64_t H = r.H, X = r.gx_gate_stride;
  for (int j = 0; j < r.nu; j += V::W) {
    const int n = r.nu - j;
    V pre = ld(r.acc + j, n) + ld(r.gx + 2 * X + j, n);
    if (r.b_hn) pre = pre + ld(r.b_hn + j, n);
    V nn = vtanh(pre);
    V z = ld(r.gates + H + j, n), hp = ld(r.h_prev + j, n);
    st(r.gates + 2 * H + j, nn, n);
    st_state(r, j, V::fma(z, hp - nn, nn), n);
  }
}
// Backward phase 1: dn and dz pre-activations, direct dh*z. dgh for n is dn (its weight
// gradient pairs with r*h, not h). dr waits for d(r*h) = dn W_hn.
template <typename T>
inline void gru_reset_backward_row1(const RowBackward<T>& r) {
  using V = Vec<T>;
  const int64_t H = r.H;
  const V one_ = one<T>();
  for (int j = 0; j < r.nu; j += V::W) {
    const int n = r.nu - j;
    V z = ld(r.gates + H + j, n), nn = ld(r.gates + 2 * H + j, n);
    V dh = ld(r.dh + j, n), hp = ld(r.h_prev + j, n);
    V dn = V::fnma(dh, z, dh) * V::fnma(nn, nn, one_);  // dh (1 - z): see gru_backward_row
    V dz = dh * (hp - nn) * z * (one_ - z);
    st(r.dgx + H + j, dz, n);
    st(r.dgx + 2 * H + j, dn, n);
    st(r.dgh + H + j, dz, n);
    st(r.dgh + 2 * H + j, dn, n);
    st(r.dh_prev + j, dh * z, n);
  }
}
// Backward phase 2: drh = d(r*h) (in r.dh); dr pre-activation, and dh_prev += drh * r.
template <typename T>
inline void gru_reset_backward_row2(const RowBackward<T>& r) {
  using V = Vec<T>;
  const V one_ = one<T>();
  for (int j = 0; j < r.nu; j += V::W) {
    const int n = r.nu - j;
    V rg = ld(r.gates + j, n), drh = ld(r.dh + j, n), hp = ld(r.h_prev + j, n);
    V dr = drh * hp * rg * (one_ - rg);
    st(r.dgx + j, dr, n);
    st(r.dgh + j, dr, n);
    st(r.dh_prev + j, V::fma(drh, rg, ld(r.dh_prev + j, n)), n);
  }
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
