// The forward step's products on AMX tiles (gemm/amx.h), in the "amx" build for float32: each
// step splits its rows of h (and of x_t, with the projection in the step) into bfloat16 parts
// once, and meets the weights' split panels, made once a call (and kept as the call keeps its
// packed weights). Which calls: amx_step. The cells' epilogues are the FMA build's.
#pragma once
#include <cstdint>
#include <type_traits>
#include "common.h"
#include "gemm/amx.h"
#include "kernel_api.h"
#include "sequence/layout.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

#if !defined(FUSEDRNN_AMX)
constexpr int kAmxRows = 1;  // (no AMX tiles: the step's row tiles stay the FMA kernels')
using bf16_t = uint16_t;
#endif
// Rows of a step's row tile: the FMA kernels' MR, or an AMX tile's.
template <typename T>
constexpr int step_tile_rows() { return kAmxRows > Tile<T>::MR ? kAmxRows : Tile<T>::MR; }

// Batches from which the step runs on AMX tiles: 32 rows, or 16 where the split weights a step
// meets fit kAmxSmallStepBytes; smaller batches stream the split panels, 1.5 times the bytes of
// the float32 ones, for too few rows. In-process A/B against the FMA build, 1 thread, T x B x I
// x H: LSTM 100x32x512x512 x1.18, 64 rows x1.31-1.39; 50x16x256x256 (3 MB split) LSTM x1.06,
// GRU x1.20, RNN x1.43; 100x16x512x512 (12 MB) LSTM x0.95, 100x24x512x512 x0.95.
constexpr int64_t kAmxStepRows = 32, kAmxSmallStepRows = 16;
constexpr int64_t kAmxSmallStepBytes = int64_t(4) << 20;
// And the least T*B whose steps repay splitting the weights once a call (with a call's packed
// forms kept, the later calls only check that the weights still split: weight_splits, which
// keeps a frozen layer's verdict). LSTM, I = H = 512, against
// the FMA build: training T x B 4x64 x0.97, 8x32 x0.99, 8x64 x1.08, 16x64 x1.18; inference
// 1x64 x1.01, 2x32 x1.03, 2x64 x1.18. Inference keeps its forms; training takes the
// training bound frozen or not (a frozen layer's training keeps its forms too, but gave other
// bits than the same layer unfrozen, which README promises it does not).
constexpr int64_t kAmxStepWorkRows = 512, kAmxStepWorkRowsKept = 64;

// Whether this call's steps take AMX tiles: float32 in the amx build, a batch and T*B as above,
// and operands that split (amx_all_splits): the weights the steps meet, h0 and, with the
// projection in the step, x. (A state that overflows float32 later is out of range either way.)
// The choice depends on the call's data and shape, never on its threads.
// x_later: x is still being written (a pipelined layer above the first, layer_pipeline.h), so
// it is not scanned here; the steps check their rows of it instead (ForwardLoop::x_unsplit).
template <typename T>
bool amx_step(const ForwardArgs<T>& a, bool in_step, PanelReuse reuse, int nthreads,
              bool x_later = false) {
#if defined(FUSEDRNN_AMX)
  if constexpr (std::is_same_v<T, float>) {
    const LayerShape& s = a.s;
    const int64_t GH = gates_of(s.cell) * s.H;
    const bool training = a.saved.h != nullptr || a.training_bits;
    const int64_t work = training ? kAmxStepWorkRows : kAmxStepWorkRowsKept;
    const int64_t split_bytes = GH * (s.Hout + (in_step ? s.I : 0)) * 6;
    const bool rows = s.B >= kAmxStepRows ||
                      (s.B >= kAmxSmallStepRows && split_bytes <= kAmxSmallStepBytes);
    return rows && s.T * s.B >= work &&
           amx_all_splits(a.h0, s.B, s.Hout, s.Hout, nthreads) &&
           weight_splits<T>(a.w_hh, GH, s.Hout, nthreads, reuse) &&
           (!in_step || (weight_splits<T>(a.w_ih, GH, s.I, nthreads, reuse) &&
                         (x_later || amx_all_splits(a.x, s.T * s.B, s.I, s.I, nthreads))));
  }
#endif
  (void)a;
  (void)in_step;
  (void)reuse;
  (void)nthreads;
  (void)x_later;
  return false;
}

// Every gate panel of a PackedGates, split (amx_split_b), panel (g, ub) at panel(g, ub).
struct AmxGates {
  int G = 0;
  int64_t K = 0;
  bf16_t* data = nullptr;
  const bf16_t* panel(int g, int64_t ub) const {
#if defined(FUSEDRNN_AMX)
    return data + (ub * G + g) * amx_b_panel_size(K);
#else
    (void)g;
    (void)ub;
    return data;
#endif
  }
};

// The split panels of a G*H x K weight (W_hh or W_ih) as the step meets them, panel (g, ub) the
// units of block ub of gate g (as PackedGates lays them out in float32), for the call, and for
// later calls as CachedPanels keeps packed forms (PanelReuse); nothing unless `on`. Split panel
// by panel through one float32 panel, so a call on tiles never holds the weight's float32
// packed copy too (fastrnns LSTM training peak, split from that copy: 131.6 -> 148.8 MiB).
template <typename T>
class AmxGatesPanels {
 public:
  AmxGatesPanels(bool on, PanelKind kind, const T* src, int G, int64_t H, int64_t K,
                 int nthreads, PanelReuse reuse)
      : cached_(kind, src, on ? int64_t(G) * H : 0, K, floats(G, H, K), nthreads, reuse,
                [&](T* buf, const T* from) {
                  split(from, G, H, K, reinterpret_cast<bf16_t*>(buf), nthreads);
                }) {
    gates_ = AmxGates{G, K, reinterpret_cast<bf16_t*>(cached_.get())};
  }
  const AmxGates& gates() const { return gates_; }

 private:
  static int64_t floats(int G, int64_t H, int64_t K) {
#if defined(FUSEDRNN_AMX)
    const int64_t blocks = ceil_div<int64_t>(H, Tile<T>::NR);
    return ceil_div<int64_t>(blocks * G * amx_b_panel_size(K), 2);  // bf16 in floats
#else
    (void)G, (void)H, (void)K;
    return 0;
#endif
  }
  // Unit blocks shared by the threads (a training call splits its weights every call).
  static void split(const T* w, int G, int64_t H, int64_t K, bf16_t* out, int nthreads) {
#if defined(FUSEDRNN_AMX)
    if constexpr (std::is_same_v<T, float>) {
      const AmxGates g{G, K, out};
      const int64_t blocks = ceil_div<int64_t>(H, Tile<T>::NR);
      const bool parallel = nthreads > 1 && G * H * K >= (int64_t(1) << 18);
      // Every thread's panel, allocated here: one failing inside the region would end the process.
      const int64_t panel_size = K * Tile<float>::NR;
      Scratch<float> panels((parallel ? nthreads : 1) * panel_size);
#pragma omp parallel num_threads(nthreads) if (parallel)
      {
        float* const panel = panels.p + thread_id() * panel_size;
#pragma omp for schedule(static)
        for (int64_t ub = 0; ub < blocks; ++ub)
          for (int gate = 0; gate < G; ++gate) {
            pack_b_rows<float>(0, K, ub, H, w + gate * H * K, 1, K, panel);  // as pack_gates
            amx_split_b(K, panel, const_cast<bf16_t*>(g.panel(gate, ub)));
          }
      }
    }
#endif
    (void)w, (void)G, (void)H, (void)K, (void)out, (void)nthreads;
  }
  CachedPanels<T> cached_;
  AmxGates gates_;
};

// A step member's rows split for its phases: a, of the product's A (h, or the GRU's r*h), split
// by cell_phase; x, of x_t with the projection in the step (null otherwise), split by run.
struct AmxRows {
  bf16_t* a;
  const bf16_t* x;
};

// bf16 elements of `rows` rows of K values split in row tiles (the member's rows of a step).
inline int64_t amx_rows_size(int64_t rows, int64_t K) {
#if defined(FUSEDRNN_AMX)
  return ceil_div<int64_t>(rows, kAmxRows) * amx_a_tile_size(K);
#else
  (void)rows;
  (void)K;
  return 0;
#endif
}

// Rows [0, rows) of a (lda apart) split into row tiles of kAmxRows from the first: tile i at
// out + i * amx_a_tile_size(K).
template <typename T>
void amx_split_rows(int64_t rows, int64_t K, const T* a, int64_t lda, bf16_t* out) {
#if defined(FUSEDRNN_AMX)
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t m = 0; m < rows; m += kAmxRows)
      amx_split_a(static_cast<int>(imin<int64_t>(kAmxRows, rows - m)), K, a + m * lda, lda,
                  out + (m / kAmxRows) * amx_a_tile_size(K));
  }
#endif
  (void)rows;
  (void)K;
  (void)a;
  (void)lda;
  (void)out;
}

// Gates [g0, g0 + count) of unit block ub for one split row tile a (K values a row): gate i's
// kAmxRows x NR products at out + i * NR (rows ldo apart), k in blocks of kAmxSumBlock and then
// its bias (bias + i * bias_stride, or none), as the FMA kernels sum; the gates two at a time.
template <typename T>
void amx_gate_products(int64_t K, const bf16_t* a, const AmxGates& w, int64_t ub, int g0,
                       int count, T* out, int64_t ldo, const T* bias, int64_t bias_stride) {
#if defined(FUSEDRNN_AMX)
  if constexpr (std::is_same_v<T, float>) {
    constexpr int NR = Tile<float>::NR;
    const int64_t kbs = amx_kblocks(K);
    int i = 0;
    for (; i + 2 <= count; i += 2) {
      const bf16_t* b[2] = {w.panel(g0 + i, ub), w.panel(g0 + i + 1, ub)};
      const float* bs[2] = {bias ? bias + i * bias_stride : nullptr,
                            bias ? bias + (i + 1) * bias_stride : nullptr};
      amx_panels_summed<2>(kbs, a, b, out + i * NR, ldo, false, false, bs);
    }
    if (i < count) {
      const bf16_t* b[1] = {w.panel(g0 + i, ub)};
      const float* bs[1] = {bias ? bias + i * bias_stride : nullptr};
      amx_panels_summed<1>(kbs, a, b, out + i * NR, ldo, false, false, bs);
    }
    return;
  }
#endif
  (void)K, (void)a, (void)w, (void)ub, (void)g0, (void)count, (void)out, (void)ldo, (void)bias,
      (void)bias_stride;
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
