// The forward epilogues under ONNX's cell options (OnnxCell, fusedrnn.onnx_ops): any of ONNX's
// activation functions, clip, and the LSTM's peepholes and coupled input and forget gates. The
// gates' inputs are the same tiles as torch.nn's cells get (cells.h); ONNX Runtime's order of
// operations: peepholes, then clip, then the function. One vector of units at a time: these
// run where a model asks for the options, not on the benchmark's paths. Inference only (the
// bindings refuse training): nothing is saved, so only the two-phase GRU's rows write gates (its
// second phase reads them).
#pragma once
#include <algorithm>
#include <cmath>
#include "cells/cells.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

// fn(x) lane by lane; NaN stays NaN (selects on ordered compares keep x).
template <typename T>
inline Vec<T> activate(const ActivationFn<T>& fn, Vec<T> x) {
  using V = Vec<T>;
  const V zero = V::zero(), one_ = one<T>(), a = V::set1(fn.alpha), b = V::set1(fn.beta);
  switch (fn.kind) {
    case Activation::Sigmoid: return vsigmoid(x);
    case Activation::Tanh: return vtanh(x);
    case Activation::Relu: return vrelu(x);
    case Activation::Affine: return V::fma(a, x, b);
    case Activation::LeakyRelu: return V::select(V::lt(x, zero), a * x, x);
    case Activation::ThresholdedRelu: return V::select(V::le(x, a), zero, x);  // x == a: 0, NaN: NaN
    case Activation::ScaledTanh: return a * vtanh(b * x);
    case Activation::HardSigmoid: {
      const V y = V::fma(a, x, b);
      return V::select(V::lt(y, zero), zero, V::select(V::gt(y, one_), one_, y));
    }
    case Activation::Elu: return V::select(V::lt(x, zero), a * (vexp(V::min(x, zero)) - one_), x);
    case Activation::Softsign: return x / (one_ + V::abs(x));
    case Activation::Softplus: {  // max(x, 0) + log1p(e^-|x|): no overflow; in libm, lane by lane
      alignas(64) T v[V::W];
      x.store(v);
      for (T& e : v) e = std::max(e, T(0)) + std::log1p(std::exp(-std::fabs(e)));
      return V::load(v);
    }
  }
  return x;
}

// x clamped to [-c, c] (c = +infinity: unchanged); NaN stays NaN.
template <typename T>
inline Vec<T> clipped(Vec<T> x, Vec<T> c) {
  using V = Vec<T>;
  return V::select(V::gt(x, c), c, V::select(V::lt(x, V::neg(c)), V::neg(c), x));
}

// fn(clip(pre-activation)) of gate g for units j.. (n lanes), the tile's and gx's parts added.
template <typename T>
inline Vec<T> onnx_gate(const RowForward<T>& r, int g, int j, int n, const ActivationFn<T>& fn,
                        Vec<T> clip) {
  const Vec<T> pre = ld(r.acc + g * r.acc_gate_stride + j, n) + ld(r.gx + g * r.gx_gate_stride + j, n);
  return activate(fn, clipped(pre, clip));
}

// ---- RNN: h' = f(clip(W_ih x + b_ih + W_hh h + b_hh)) ----
template <typename T>
inline void rnn_onnx_forward_row(const RowForward<T>& r) {
  using V = Vec<T>;
  const OnnxCell<T>& o = *r.onnx;
  const V c = V::set1(o.clip);
  for (int j = 0; j < r.nu; j += V::W) {
    const int n = r.nu - j;
    st_state(r, j, onnx_gate(r, 0, j, n, o.f, c), n);
  }
}

// ---- LSTM: i = f(clip(. + P_i c)), f = f(clip(. + P_f c)) or 1 - i, g = g(clip(.)),
//      c' = f c + i g, o = f(clip(. + P_o c')), h' = o h(c') ----
template <typename T>
inline void lstm_onnx_forward_row(const RowForward<T>& r) {
  using V = Vec<T>;
  const OnnxCell<T>& o = *r.onnx;
  const V clip = V::set1(o.clip);
  const int64_t H = r.H, A = r.acc_gate_stride, X = r.gx_gate_stride;
  const T* P = r.peepholes;
  for (int j = 0; j < r.nu; j += V::W) {
    const int n = r.nu - j;
    auto pre = [&](int g) { return ld(r.acc + g * A + j, n) + ld(r.gx + g * X + j, n); };
    const V cp = ld(r.c_prev + j, n);
    V pi = pre(0), pf = pre(1), po = pre(3);
    if (P) {
      pi = V::fma(ld(P + j, n), cp, pi);
      pf = V::fma(ld(P + H + j, n), cp, pf);
    }
    const V i = activate(o.f, clipped(pi, clip));
    const V f = o.input_forget ? one<T>() - i : activate(o.f, clipped(pf, clip));
    const V g = activate(o.g, clipped(pre(2), clip));
    const V c = V::fma(f, cp, i * g);
    if (P) po = V::fma(ld(P + 2 * H + j, n), c, po);
    const V og = activate(o.f, clipped(po, clip));
    st(r.c_next + j, c, n);
    st_state(r, j, og * activate(o.h, c), n);
  }
}

// The GRU's new state as ONNX writes it, (1 - z) n + z h: torch.nn's n + z (h - n) (cells.h)
// overflows in h - n where n and h are large and of opposite signs, and gives NaN for an
// infinite n, which an unbounded g (Affine, Relu, ...) can make.
template <typename T>
inline Vec<T> onnx_gru_state(Vec<T> z, Vec<T> nn, Vec<T> h_prev) {
  return Vec<T>::fma(z, h_prev, (one<T>() - z) * nn);
}

// ---- GRU, linear_before_reset: r, z = f(clip(.)), n = g(clip(gx_n + r (W_hn h + b_hn))) ----
template <typename T>
inline void gru_onnx_forward_row(const RowForward<T>& r) {
  using V = Vec<T>;
  const OnnxCell<T>& o = *r.onnx;
  const V clip = V::set1(o.clip);
  const int64_t A = r.acc_gate_stride, X = r.gx_gate_stride;
  for (int j = 0; j < r.nu; j += V::W) {
    const int n = r.nu - j;
    const V rg = onnx_gate(r, 0, j, n, o.f, clip), z = onnx_gate(r, 1, j, n, o.f, clip);
    V hn_lin = ld(r.acc + 2 * A + j, n);
    if (r.b_hn) hn_lin = hn_lin + ld(r.b_hn + j, n);
    const V nn = activate(o.g, clipped(V::fma(rg, hn_lin, ld(r.gx + 2 * X + j, n)), clip));
    st_state(r, j, onnx_gru_state(z, nn, ld(r.h_prev + j, n)), n);
  }
}

// ---- GRU, original formulation, in gru_reset_*_row's two phases ----
template <typename T>
inline void gru_onnx_reset_forward_row(const RowForward<T>& r) {  // phase 1: r, z; extra = r*h
  using V = Vec<T>;
  const OnnxCell<T>& o = *r.onnx;
  const V clip = V::set1(o.clip);
  for (int j = 0; j < r.nu; j += V::W) {
    const int n = r.nu - j;
    const V rg = onnx_gate(r, 0, j, n, o.f, clip);
    st(r.gates + j, rg, n);
    st(r.gates + r.H + j, onnx_gate(r, 1, j, n, o.f, clip), n);
    st(r.extra + j, rg * ld(r.h_prev + j, n), n);
  }
}
template <typename T>
inline void gru_onnx_reset_new_row(const RowForward<T>& r) {  // phase 2: acc = W_hn (r*h)
  using V = Vec<T>;
  const OnnxCell<T>& o = *r.onnx;
  const V clip = V::set1(o.clip);
  const int64_t H = r.H, X = r.gx_gate_stride;
  for (int j = 0; j < r.nu; j += V::W) {
    const int n = r.nu - j;
    V pre = ld(r.acc + j, n) + ld(r.gx + 2 * X + j, n);
    if (r.b_hn) pre = pre + ld(r.b_hn + j, n);
    const V nn = activate(o.g, clipped(pre, clip));
    st(r.gates + 2 * H + j, nn, n);
    st_state(r, j, onnx_gru_state(ld(r.gates + H + j, n), nn, ld(r.h_prev + j, n)), n);
  }
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
