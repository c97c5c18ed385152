// Pointers for one batch row over a run of hidden units [u0, u0 + nu), as the fused step
// epilogues and the pointwise backward see them. Every pointer is already offset to unit u0;
// gate g of a (G*H)-wide row sits at +g*H, of a tile row at +g*NR.
#pragma once
#include <cstdint>
#include "kernel_api.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

template <typename T>
struct RowForward {
  const T* acc;     // tile row of W_hh h_prev (no bias), gate g at acc[g*NR + j]
  int64_t acc_gate_stride;  // NR
  const T* gx;      // W_ih x + folded biases for this row's time, gate g at g * gx_gate_stride
  // H (a row of the whole-sequence Gx), NR (the step's own tile) or H rounded up to unit blocks
  // (a row the riding projection wrote)
  int64_t gx_gate_stride;
  const T* b_hn;    // GRU n-gate recurrent bias (kept apart for the reset gate), or null
  const T* h_prev;  // (H) previous state
  const T* c_prev;  // (H) LSTM previous cell
  T* c_next;        // (H) LSTM new cell
  T* h_next;        // (H) new state (LSTM with projection: o*tanh(c) before W_hr)
  // A second home for the new state, or null: y's row where training saves h apart (a copy
  // there afterwards, a memcpy of NR values per row and unit block, was 1.5% of a fastrnns
  // LSTM training forward)
  T* h_copy;
  T* gates;         // activated gates, gate g at gates[g*H + j]
  T* extra;         // GRU: W_hn h + b_hn (linear_before_reset) or r*h (not); may be null
  int64_t H;
  int nu;
  const OnnxCell<T>* onnx = nullptr;  // ONNX's cell options (onnx_cells.h), or null
  const T* peepholes = nullptr;       // their peepholes at unit u0, gate g at +g*H, or null
};

template <typename T>
struct RowBackward {
  const T* dh;      // (H) gradient reaching this step's state (LSTM: before the projection)
  const T* gates;   // saved activated gates, gate g at gates[g*H + j]
  const T* h_prev;  // (H) state before the step
  const T* h_next;  // (H) state after the step (RNN derivative)
  const T* c_prev;  // LSTM
  const T* c_next;  // LSTM
  const T* extra;   // GRU saved extra
  T* dc;            // LSTM: in: dc from later steps; out: dc for the previous step
  T* dgx;           // gradient of the pre-activations on the input side, gate g at +g*H
  T* dgh;           // gradient of the pre-activations on the recurrent side (GRU differs)
  T* dgh_n;         // GRU (torch-style): the recurrent n-gate gradient, which may live apart
  T* dh_prev;       // GRU only: the direct part of d h_prev (dh*z), written
  int64_t H;
  int nu;
};

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
