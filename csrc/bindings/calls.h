// The calls module.cpp binds that take more than a few lines: the layer forward and the stack
// (forward.cpp), BPTT (backward.cpp), the vector math and the GEMM alone (ops.cpp). Each takes
// its arguments as Python gave them and picks float32 or float64.
#pragma once
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "bindings/arrays.h"

namespace fusedrnn::bindings {

// What a training forward keeps for backward: the saved buffers and the forward's inputs.
struct Context {
  LayerShape s;
  bool f64;
  const KernelTable* table;
  // Null handles (not empty arrays) where a buffer does not exist.
  py::object x, w_ih, w_hh, w_hr, lengths;  // forward inputs (x: null where x_packed is kept)
  py::object x_packed;                      // ForwardArgs::x_packed, or null
  py::object gates, h, c, hfull, extra;     // saved by the forward
  bool has_bias;
  uint64_t frozen = 0;                      // the forward's ForwardArgs::frozen
  uint64_t weight_digests[3] = {0, 0, 0};   // of w_ih, w_hh, w_hr as the forward read them
  // A backward with consume=True ran (or runs): the saved gates may hold its gradients. And how
  // many backward calls are running on it now (changed under the GIL): a consuming one overwrites
  // the gates only when none is, so no other thread is reading them.
  bool consumed = false;
  int running = 0;
};

// A backward's weights are not the bytes its training forward read (weight_digests): the
// saved gates are of the forward's model, so its gradients would be of neither. Python's
// fusedrnn._C.WeightsChangedError, a RuntimeError as torch.nn's autograd raises there, whose
// `weight` names the weight ("weight_hh") and `direction` the call's (1: a pair's reverse one),
// for the layers to name it as torch does.
struct WeightsChanged : std::runtime_error {
  WeightsChanged(const std::string& what, std::string weight)
      : std::runtime_error(what), weight(std::move(weight)) {}
  std::string weight;
  int direction = 0;
};

// The digests (weights_digest.h) of w_ih, w_hh and w_hr by the kernels in `kt` (0 for a null
// handle), as a training forward's kernels took them into its context
// (ForwardArgs::weight_digests): its backward checks the weights it reads against them. Without
// the GIL where the weights are large.
void weight_digests(const KernelTable& kt, const py::object* const weights[3], uint64_t out[3]);

// Context.check_weights: WeightsChanged where the weights a backward would read (backward's
// `weights`, None for the forward's arrays) are not the values its forward read.
void check_forward_weights(const Context& c, py::object weights);

py::tuple forward(int cell, bool lbr, bool reverse, bool training, py::array x, py::array h0,
                  py::object c0, py::array w_ih, py::array w_hh, py::object b_ih, py::object b_hh,
                  py::object w_hr, py::object lengths, std::optional<std::string> isa,
                  uint64_t frozen, bool keep_x, py::object onnx, bool keep_packed,
                  bool training_bits);
py::list forward_stack(int cell, bool lbr, bool training, py::array x, py::list h0, py::list c0,
                       py::list w_ih, py::list w_hh, py::list b_ih, py::list b_hh, py::list w_hr,
                       std::optional<std::string> isa, uint64_t frozen, bool keep_x,
                       bool keep_packed, int64_t train_from);
py::list forward_directions(py::sequence cells, bool lbr, bool training, py::array x,
                            py::list h0, py::list c0, py::list w_ih, py::list w_hh,
                            py::list b_ih, py::list b_hh, py::list w_hr, py::object lengths,
                            std::optional<std::string> isa, uint64_t frozen, bool keep_x,
                            py::sequence onnx, bool keep_packed, bool training_bits);
py::tuple backward(Context& c, py::array dy, py::object dhn, py::object dcn, bool consume,
                   py::object grads_into, bool add_into, py::object weights, bool need_dx,
                   bool need_weight_grads);
py::list backward_directions(Context& c0, Context& c1, py::sequence dy, py::sequence dhn,
                             py::sequence dcn, bool consume, py::sequence grads_into,
                             bool add_into, py::sequence weights, bool need_dx,
                             bool need_weight_grads);
py::array math(int func, py::array x, std::optional<std::string> isa);
py::array gemm(py::array A, py::array B, std::optional<std::string> isa);

}  // namespace fusedrnn::bindings
