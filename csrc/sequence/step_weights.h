// The weights as a forward call's steps read them (StepWeights): W_hh packed per unit block or
// as its AMX split panels, W_ih so too where the steps project x themselves (in the step or
// riding along), with the folded bias, and the LSTM projection's W_hr. Members are made in
// declaration order, the order the call always packed them in.
#pragma once
#include <cstdint>
#include "sequence/amx_step.h"
#include "sequence/layout.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

template <typename T>
struct StepWeights {
  const ForwardArgs<T>& a;
  const LayerShape& s = a.s;
  const int G = gates_of(s.cell);
  const int64_t H = s.H, Hout = s.Hout, GH = G * H;
  const bool by_gates;  // W_ih packed like W_hh, per unit block (in step or riding along)
  const bool amx;       // on AMX tiles (amx_step) the steps meet only the split panels
  const bool in_step;
  const int64_t padded_units;  // ForwardLoop::padded_units: the gates' stride in bias_in
  const int nthreads;
  const PanelReuse reuse;
  // The members of a step team split by hidden units pack W_hh's (and W_ih's, by_gates) panels
  // of their own unit blocks (pack_unit_blocks), where the call packs them every call (a
  // training call, unfrozen: PanelReuse): packed by the calling thread, the other core's share
  // came to it from that core's cache at its first steps.
  const bool members_pack;
  CachedPanels<T> w_in{PanelKind::InputGates, a.w_ih, by_gates && !amx ? GH : 0, s.I,
                       by_gates ? packed_gates_size<T>(G, s.I, H) : 0, nthreads, reuse,
                       [this](T* buf, const T* from) {
                         if (!members_pack) pack_gates<T>(G, s.I, H, from, buf, nthreads);
                       }};
  Scratch<T> bias_in{by_gates && s.has_bias ? G * padded_units : 0};
  CachedPanels<T> wbuf{PanelKind::Gates, a.w_hh, amx ? 0 : GH, Hout,
                       packed_gates_size<T>(G, Hout, H), nthreads, reuse,
                       [this](T* buf, const T* from) {
                         if (!members_pack) pack_gates<T>(G, Hout, H, from, buf, nthreads, true);
                       }};
  // (none on AMX tiles, where the steps meet only amx_w's panels)
  const PackedGates<T> w = amx ? PackedGates<T>{G, Hout, nullptr}
                               : recurrent_gates<T>(G, Hout, H, wbuf.get());
  const AmxGatesPanels<T> amx_w{amx, PanelKind::AmxGates, a.w_hh, G, H, Hout, nthreads, reuse};
  const AmxGatesPanels<T> amx_w_in{amx && in_step, PanelKind::AmxInputGates, a.w_ih, G, H, s.I,
                                   nthreads, reuse};
  // Null without a projection (nothing is packed then).
  CachedPanels<T> wproj{PanelKind::Proj, a.w_hr, s.has_proj ? Hout : 0, H,
                        s.has_proj ? packed_b_size<T>(H, Hout) : 0, nthreads, reuse,
                        [this](T* buf, const T* from) {
                          pack_b<T>(H, Hout, from, 1, H, buf, nthreads);
                        }};

  // team_by_units: the steps run on a step team split by hidden units.
  StepWeights(const ForwardArgs<T>& args, bool gates_blocked, bool on_tiles, bool projects_in_step,
              int64_t units_padded, int threads, PanelReuse panel_reuse, bool team_by_units)
      : a(args), by_gates(gates_blocked), amx(on_tiles), in_step(projects_in_step),
        padded_units(units_padded), nthreads(threads), reuse(panel_reuse),
        members_pack(team_by_units && !reuse.keep && !amx) {
    if (bias_in.p) {
      set_bytes(bias_in.p, 0, sizeof(T) * G * padded_units);
      folded_bias(s, a.b_ih, a.b_hh, bias_in.p, padded_units);
    }
  }

  // Unit blocks [ub0, ub1)'s panels, where the members pack them (members_pack).
  void pack_unit_blocks(int64_t ub0, int64_t ub1) const {
    if (!members_pack) return;
    if (by_gates) pack_gate_blocks<T>(G, s.I, H, a.w_ih, w_in.get(), ub0, ub1);
    pack_gate_blocks<T>(G, Hout, H, a.w_hh, wbuf.get(), ub0, ub1, true);
  }
};

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
