// fusedrnn._C: NumPy buffers in, NumPy buffers out. Shapes are checked here again (the Python
// layer checks them first, with friendlier messages) so no call can read or write out of bounds.
// Every kernel runs with the GIL released.
//
// This file names what Python sees (functions, arguments, defaults, docstrings); the calls
// themselves are in forward.cpp, backward.cpp and ops.cpp, the threads and the GIL in
// runtime.cpp, the array checks in arrays.h. python/fusedrnn/_C.pyi types the same names for
// type checkers; tests/test_stubs.py fails when the two differ.
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings/arrays.h"
#include "bindings/calls.h"
#include "bindings/runtime.h"
#include "kernel_api.h"
#include "team_policy.h"

using namespace fusedrnn::bindings;

namespace {

// The layer shape step_split and projection_mode describe, as a call can have it: the rules
// read nonsense (B = -1, H = 0) as a shape and gave it a mode. B is bounded as step_split's rules
// walk the batch's row tiles (B = 2^62: 2^58 of them, a hang).
void check_diagnostic_shape(int cell, int64_t B, int64_t I, int64_t H, int64_t Hout) {
  if (cell < 0 || cell > 3) fail("cell must be 0..3 (rnn_tanh, rnn_relu, lstm, gru)");
  if (B < 1 || I < 0 || H < 1 || Hout < 1) fail("B, H and Hout must be >= 1 and I >= 0");
  if (B > (int64_t(1) << 32)) fail("B must be at most 2^32 rows, got " + std::to_string(B));
}
// The rules divide by the thread count: 0 threads was a division by zero (SIGFPE).
void check_diagnostic_threads(int threads) {
  if (threads < 1 || threads > kMaxThreads)
    fail("threads must lie in 1.." + std::to_string(kMaxThreads) + ", got " + std::to_string(threads));
}
// KernelTable::step_split's answer to `query` for a shape and a thread count, both checked.
int step_split_query(int cell, bool f64, int64_t B, int64_t I, int64_t H, int64_t Hout,
                     int threads, const std::optional<std::string>& isa, int query) {
  check_diagnostic_shape(cell, B, I, H, Hout);
  check_diagnostic_threads(threads);
  return kernels(isa).step_split(cell, f64, B, I, H, Hout, threads, query);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedrnn kernels (private; use fusedrnn.functional or the layers)";
  m.attr("__version__") = FUSEDRNN_VERSION;
  fusedrnn::active_kernels();  // fail at import on a bad FUSEDRNN_ISA, not in the first call
  static py::exception<WeightsChanged> weights_changed(m, "WeightsChangedError",
                                                       PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const WeightsChanged& e) {  // (the message, and which weight and direction)
      py::object error = py::reinterpret_borrow<py::object>(weights_changed.ptr())(e.what());
      error.attr("weight") = e.weight;
      error.attr("direction") = e.direction;
      PyErr_SetObject(weights_changed.ptr(), error.ptr());
    }
  });
  m.def("isa", [] { return std::string(fusedrnn::active_isa_name()); }, "ISA of the kernels in use");
  m.def("available_isas", &available_isas, "ISAs built into this module that this CPU can run");
  m.def("vector_bytes", [](std::optional<std::string> isa) { return kernels(isa).vector_bytes; },
        py::arg("isa") = py::none());
#if defined(_OPENMP)
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.def("get_num_threads", &num_threads);
  m.attr("max_num_threads") = kMaxThreads;
  m.def("set_num_threads", &set_num_threads);
  // Threads of a layer call: "team" (as asked, the default), "adaptive" or "alone" (see
  // csrc/team_policy.cpp); the names in the order of set_team_mode's codes.
  static const char* const team_modes[] = {"adaptive", "team", "alone"};
  m.def("set_team_mode", [](const std::string& mode) {
    for (int i = 0; i < 3; ++i)
      if (mode == team_modes[i]) return fusedrnn::set_team_mode(i);
    fail("team mode must be 'adaptive', 'team' or 'alone', got '" + mode + "'");
  });
  m.def("get_team_mode", [] { return std::string(team_modes[fusedrnn::team_mode()]); });
  m.def("team_policy_calls", [] {
    return py::make_tuple(fusedrnn::team_policy_calls(true), fusedrnn::team_policy_calls(false));
  }, "calls the adaptive policy has run (on the threads, alone) since import");
  // The step teams' in-call probe (csrc/sequence/team_probe.h), forward and backward: its
  // verdicts so far, and a verdict for tests to impose ("measured", "far_team", "far_alone";
  // setting it forgets the verdicts remembered).
  static const char* const probe_verdicts[] = {"close", "far_team", "far_alone", "recalled_team",
                                               "recalled_alone"};
  m.def("team_barrier_ns", [](int rounds) {
    WithoutGil nogil;
    return kernels(std::nullopt).team_barrier_ns(threads_for_call(), rounds);
  }, py::arg("rounds") = 1000,
     "ns per empty meeting of a step team of get_num_threads() threads (0 for one): 25-60 ns "
     "with the cores close, 165-600 ns when the machine puts them far apart");
  m.def("probe_calls", [] {
    py::dict d;
    for (int v = 0; v < 5; ++v) d[probe_verdicts[v]] = fusedrnn::probe_calls(v);
    return d;
  }, "forward and backward calls whose team probed its cores, by verdict (or recalled one from an "
     "earlier call of the shape: recalled_team, recalled_alone), since import");
  m.def("set_probe_override", [](const std::string& verdict) {
    if (verdict == "measured") return fusedrnn::set_probe_override(-1);
    for (int v = 1; v < 3; ++v)
      if (verdict == probe_verdicts[v]) return fusedrnn::set_probe_override(v);
    fail("probe verdict must be 'measured', 'far_team' or 'far_alone', got '" + verdict + "'");
  });
  m.def("set_probe_recall_ms", [](int ms) {
    if (ms > 3600000) fail("probe recall time must be at most 3600000 ms, got " + std::to_string(ms));
    return fusedrnn::set_probe_recall_ms(ms);
  }, py::arg("ms"), "tests: how long a probe's verdict is remembered (by the calls from now on), "
     "in ms; negative: the default (500); returns the previous setting");
  // Riding or one GEMM for a single row, alone or on a team (csrc/ride_policy.cpp): calls by
  // way, and a way for tests to impose ("measured", "whole", "ride"); setting it forgets every
  // trial.
  m.def("ride_calls", [] {
    return counts({{"ride", fusedrnn::ride_policy_calls(true)},
                   {"whole", fusedrnn::ride_policy_calls(false)}});
  }, "single-row forwards that could ride, alone or on a team, by the way they ran, since import");
  m.def("ride_trials", [] {
    int64_t on_trial[2], decided[2];
    fusedrnn::ride_policy_trials(on_trial, decided);
    return counts({{"alone_on_trial", on_trial[0]}, {"team_on_trial", on_trial[1]},
                   {"alone_decided", decided[0]}, {"team_decided", decided[1]}});
  }, "the riding trials of the shapes since the last set_ride_override, one thread or a team, "
     "by whether they have chosen");
  m.def("set_ride_override", [](const std::string& way) {
    if (way == "measured") return fusedrnn::set_ride_override(-1);
    if (way == "whole") return fusedrnn::set_ride_override(0);
    if (way == "ride") return fusedrnn::set_ride_override(1);
    fail("ride override must be 'measured', 'whole' or 'ride', got '" + way + "'");
  });
  // One policy on its own, for tests to drive with made-up times.
  py::class_<fusedrnn::TeamPolicyState>(m, "TeamPolicy", py::module_local(),
                                        "the adaptive thread policy of one shape (tests)")
      .def(py::init<>())
      .def("choose_team", &fusedrnn::TeamPolicyState::choose_team)
      .def("report", &fusedrnn::TeamPolicyState::report, py::arg("team"), py::arg("ns_per_step"))
      .def_property_readonly("alone", &fusedrnn::TeamPolicyState::alone);
  m.def("compiler", [] {
#if defined(__clang__)
    return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    return std::string("gcc ") + __VERSION__;
#else
    return std::string("unknown");
#endif
  });

  // module_local, as TeamPolicy: pybind11 knows a type by its C++ name, the same in every build
  // of this module, and two builds in one process (bench/ab_builds.py) each register theirs.
  py::class_<Context>(m, "Context", py::module_local(),
                      "What a training forward keeps for backward (opaque).")
      .def_property_readonly("saved_bytes", [](const Context& c) {
        size_t n = 0;
        for (const py::object* a : {&c.gates, &c.h, &c.c, &c.hfull, &c.extra})
          if (*a) n += a->cast<py::array>().nbytes();
        return n;
      })
      // Raises WeightsChangedError where the weights a backward would read (weights as
      // backward takes it) are not those the forward read: a stack's backward checks every
      // layer before any runs.
      .def("check_weights", &check_forward_weights, py::arg("weights") = py::none())
      .def_property_readonly("x_bytes", [](const Context& c) {  // its copy of x, packed or not
        const py::object& x = c.x_packed ? c.x_packed : c.x;
        return x ? x.cast<py::array>().nbytes() : 0;
      })
      // The shapes backward expects of what it is given, for the Python side to check before
      // it copies an argument to C order (a broadcast one of the wrong shape may not fit).
      .def_property_readonly("shapes", [](const Context& c) {
        const fusedrnn::LayerShape& s = c.s;
        auto shape_of = [](const py::object& a) -> py::object {  // of a weight the forward read
          return a ? py::object(a.attr("shape")) : py::object(py::none());
        };
        py::dict d;
        d["dy"] = py::make_tuple(s.T, s.B, s.Hout);
        d["dhn"] = py::make_tuple(s.B, s.Hout);
        const bool lstm = s.cell == fusedrnn::Cell::Lstm;
        d["dcn"] = lstm ? py::object(py::make_tuple(s.B, s.H)) : py::object(py::none());
        d["w_ih"] = shape_of(c.w_ih);
        d["w_hh"] = shape_of(c.w_hh);
        d["w_hr"] = shape_of(c.w_hr);
        return d;
      });

  // The torch adapter's view of a tensor's memory: what Tensor.numpy() gives, without its side
  // effect, which marks the tensor's storage never resizable again (FSDP frees and refills its
  // parameters' storage; a caller may resize_ a buffer it reuses). `owner`, the tensor, keeps
  // the memory alive while the view lives; the caller vouches for the pointer, shape and
  // element strides (fusedrnn/_torch_views.py reads them off the tensor).
  m.def("tensor_view", [](uintptr_t data, std::vector<py::ssize_t> shape,
                          std::vector<py::ssize_t> strides, bool f64, py::object owner,
                          py::ssize_t storage_offset) -> py::array {
    if (shape.size() != strides.size()) fail("tensor_view: shape and strides differ in length");
    const py::ssize_t item = f64 ? sizeof(double) : sizeof(float);
    py::ssize_t count = 1;
    for (auto n : shape) count *= n;
    // A storage resized to 0 (FSDP frees parameters' so) has no memory: the pointer is its
    // offset from null, and pybind11 would allocate a new array for a null one.
    if (count > 0 && data == uintptr_t(storage_offset * item))
      throw std::runtime_error("fusedrnn.torch: a tensor of shape " + shape_str({shape.begin(), shape.end()}) +
                               " has no memory: its storage was resized to 0 (as FSDP frees "
                               "parameters between calls) and not refilled");
    for (auto& st : strides) st *= item;
    const py::dtype dt = f64 ? py::dtype::of<double>() : py::dtype::of<float>();
    return py::array(dt, shape, strides, reinterpret_cast<const void*>(data), owner);
  }, py::arg("data"), py::arg("shape"), py::arg("strides"), py::arg("f64"), py::arg("owner"),
     py::arg("storage_offset"));

  m.def("math", &math, py::arg("func"), py::arg("x"), py::arg("isa") = py::none());

  m.def("step_split", [](int cell, int64_t B, int64_t I, int64_t H, int64_t Hout, bool f64,
                         int threads, std::optional<std::string> isa, bool backward) {
    static const char* names[] = {"one", "rows", "units", "team", "halves"};
    return std::string(names[step_split_query(
        cell, f64, B, I, H, Hout, threads, isa,
        backward ? fusedrnn::kBackwardSplit : fusedrnn::kForwardSplit)]);
  }, py::arg("cell"), py::arg("B"), py::arg("I"), py::arg("H"), py::arg("Hout"),
     py::arg("f64") = false,
     py::arg("threads") = 2, py::arg("isa") = py::none(), py::arg("backward") = false,
     "how the forward spreads one step over threads: 'one', 'rows' or 'units'; with "
     "backward=True, how the backward's time loop does without lengths: 'one', 'rows' (each "
     "thread its own rows, never meeting), 'team', or 'halves' (a single row's units in two "
     "halves, alone or on a team of two)");

  m.def("shared_block_rows", [](int cell, int64_t B, int64_t I, int64_t H, int64_t Hout,
                                bool f64, int threads, std::optional<std::string> isa) {
    return static_cast<int64_t>(step_split_query(cell, f64, B, I, H, Hout, threads, isa,
                                                 fusedrnn::kSharedBlockRows));
  }, py::arg("cell"), py::arg("B"), py::arg("I"), py::arg("H"), py::arg("Hout"),
     py::arg("f64") = false, py::arg("threads") = 2, py::arg("isa") = py::none(),
     "where a forward team split by hidden units evens its shares: the row from which the "
     "second member takes the first member's last unit block, or 0 (the forward leaves out "
     "teams that ride along or run on AMX tiles)");

  m.def("shared_block_vector", [](int cell, int64_t B, int64_t I, int64_t H, int64_t Hout,
                                  bool f64, int threads, std::optional<std::string> isa) {
    return step_split_query(cell, f64, B, I, H, Hout, threads, isa,
                            fusedrnn::kSharedBlockVector) != 0;
  }, py::arg("cell"), py::arg("B"), py::arg("I"), py::arg("H"), py::arg("Hout"),
     py::arg("f64") = false, py::arg("threads") = 2, py::arg("isa") = py::none(),
     "whether a forward team split by hidden units evens a single row's shares by handing the "
     "second vector of the first member's last unit block to the second (where the projection "
     "does not ride along, or its riding slices are one vector)");

  m.def("projection_mode", [](int cell, int64_t B, int64_t I, int64_t H, int64_t Hout,
                              bool f64, bool lengths, std::optional<std::string> isa) {
    check_diagnostic_shape(cell, B, I, H, Hout);
    static const char* const modes[] = {"whole", "in_step", "rides"};
    return std::string(modes[kernels(isa).projection_mode(cell, f64, B, I, H, Hout, lengths)]);
  }, py::arg("cell"), py::arg("B"), py::arg("I"), py::arg("H"), py::arg("Hout"),
     py::arg("f64") = false, py::arg("lengths") = false, py::arg("isa") = py::none(),
     "how the forward computes x_t W_ih^T: 'whole' (one GEMM over the sequence before the time "
     "loop), 'in_step' (inside each step's tiles) or 'rides' (a chunk of the next steps' rows "
     "in each step of a single LSTM or GRU row, alone or on a step team, or one GEMM if the "
     "shape's first calls on those threads measured that faster: csrc/ride_policy.cpp)");

  m.def("cache_bytes", []() {
    return counts({{"l2", kernels(std::nullopt).cache_bytes(2)},
                   {"l3", kernels(std::nullopt).cache_bytes(3)}});
  }, "the cache sizes the kernels plan for: one core's L2 and the shared L3, in bytes");
  m.def("prefetch_ahead", [](const std::optional<std::string>& isa) {
    return kernels(isa).prefetch_ahead();
  }, py::arg("isa") = py::none(),
     "how many k-steps ahead the micro-kernels prefetch their weight panels on this CPU (0: "
     "none, the hardware prefetchers alone)");

  m.def("empty_cache", [] {
    fusedrnn::packed_cache_clear_team();
    fusedrnn::free_idle_blocks();
  }, "frees the calling thread's packed weights (and its OpenMP workers', which pipelined "
     "stacks ran layers on) and the idle blocks kept for reuse");
  m.def("packed_cache", [](bool clear) {
    if (clear) fusedrnn::packed_cache_clear();
    size_t forms = 0, copies = 0, bytes = 0;
    fusedrnn::packed_cache_stats(&forms, &copies, &bytes);
    return counts({{"forms", int64_t(forms)}, {"copies", int64_t(copies)}, {"bytes", int64_t(bytes)}});
  }, py::arg("clear") = false,
     "the calling thread's packed-weight cache: packed forms, copies of weights' bytes (one per "
     "weight that unfrozen inference calls met, shared by its forms), and the bytes of both; "
     "clear=True empties it first");
  m.def("workspace_bytes", [](bool reset_peak) {
    size_t in_use = 0, peak = 0, idle = 0;
    fusedrnn::workspace_bytes(&in_use, &peak, &idle, reset_peak);
    return counts({{"in_use", int64_t(in_use)}, {"peak", int64_t(peak)}, {"idle", int64_t(idle)}});
  }, py::arg("reset_peak") = false,
     "the kernels' memory blocks (their scratch and the arrays they make), all threads: bytes in "
     "use (as asked for), the most in use at once since the last reset_peak=True (which starts "
     "it from the bytes in use), and the idle blocks kept for reuse");
  m.def("fail_worker_allocations", [](int64_t n) { fusedrnn::fail_worker_allocations(n); },
        py::arg("n"),
        "tests: the next n allocations of the kernels' blocks on OpenMP worker threads fail "
        "(std::bad_alloc, as running out of memory there); 0 stops it");
  m.def("packed_forms_all_threads", [] { return fusedrnn::packed_forms_all_threads(); },
        "tests: the packed forms every thread's packed-weight cache holds, together");

  m.def("gemm", &gemm, py::arg("A"), py::arg("B"), py::arg("isa") = py::none(),
        "C = A @ B with our packed GEMM");

  m.def("forward", &forward, py::arg("cell"), py::arg("linear_before_reset"), py::arg("reverse"),
        py::arg("training"), py::arg("x"), py::arg("h0"), py::arg("c0"), py::arg("w_ih"),
        py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("w_hr"), py::arg("lengths"),
        py::arg("isa") = py::none(), py::arg("frozen") = 0, py::arg("keep_x") = false,
        py::arg("onnx") = py::none(), py::arg("keep_packed") = true,
        py::arg("training_bits") = false,
        "frozen: 0, or an id under which every weight array holds the same bytes, in the same "
        "memory, in every call that passes it (a layer's freeze()); the kernels then reuse their "
        "packed weights without comparing the arrays with their copies. keep_x: a training "
        "context keeps x itself, which must not change before backward; else it keeps x packed "
        "as the backward reads it (a copy of its own). onnx: None, or ONNX's cell options "
        "(fusedrnn.onnx_ops) as (((code, alpha, beta) for f, g, h), clip, input_forget, "
        "peepholes (3, H) i, f, o or None); inference only. keep_packed=False: the weights are "
        "copies made for this call (freed after it): they are packed for it alone and nothing is "
        "kept in the calling thread's packed-weight cache. training_bits: an inference call "
        "(training False) gives the bits a training call would (a stack's layer below the ones "
        "that train)");

  m.def("forward_stack", &forward_stack, py::arg("cell"), py::arg("linear_before_reset"),
        py::arg("training"), py::arg("x"), py::arg("h0"), py::arg("c0"), py::arg("w_ih"),
        py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("w_hr"),
        py::arg("isa") = py::none(), py::arg("frozen") = 0, py::arg("keep_x") = false,
        py::arg("keep_packed") = true, py::arg("train_from") = 0,
        "a unidirectional stack without lengths, bottom layer first: per layer lists of forward's "
        "states and weights; returns the list of forward's (y, hn, cn, ctx) per layer (keep_x: "
        "as forward's, for x; each layer above keeps its input, the output below, itself; "
        "keep_packed: as forward's; train_from: in training, the layers below it keep no "
        "context (ctx None), as no backward will run through them, and give a training "
        "call's bits as forward's training_bits)");
  m.def("forward_directions", &forward_directions, py::arg("cells"),
        py::arg("linear_before_reset"), py::arg("training"), py::arg("x"), py::arg("h0"),
        py::arg("c0"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"),
        py::arg("w_hr"), py::arg("lengths") = py::none(), py::arg("isa") = py::none(),
        py::arg("frozen") = 0, py::arg("keep_x") = false,
        py::arg("onnx") = py::make_tuple(py::none(), py::none()), py::arg("keep_packed") = true,
        py::arg("training_bits") = false,
        "a bidirectional layer: per direction (forward, reverse) lists of forward's cell codes "
        "(an ONNX node's directions may differ: tanh and relu), states, weights and onnx "
        "options, both directions on x; returns the list of forward's (y, hn, cn, ctx) per "
        "direction. On two threads the directions run side by side, one thread each "
        "(sequence/direction_pair.h); the same results either way");
  m.def("calls_without_gil", [] { return g_calls_without_gil.load(std::memory_order_relaxed); },
        "tests: kernel calls running now with the GIL released (by any thread)");
  m.def("direction_calls", [] {
    return counts({{"side_by_side", fusedrnn::direction_calls(true)},
                   {"in_turn", fusedrnn::direction_calls(false)}});
  }, "forward_directions and backward_directions calls since import, by how they ran "
     "(sequence/direction_pair.h)");
  m.def("stack_calls", [] {
    return counts({{"pipelined", fusedrnn::stack_calls(true)},
                   {"layer_by_layer", fusedrnn::stack_calls(false)}});
  }, "forward_stack calls since import, by how they ran (sequence/layer_pipeline.h)");
  m.def("beside_walk_calls", [] {
    using fusedrnn::BesideWalk;
    return counts({{"products_after_walk", fusedrnn::beside_walk_calls(BesideWalk::ProductsAfter)},
                   {"products_beside_walk", fusedrnn::beside_walk_calls(BesideWalk::ProductsBeside)},
                   {"projection_beside_walk", fusedrnn::beside_walk_calls(BesideWalk::Projection)}});
  }, "single-row calls since import by the work that went beside the walk: the backward's "
     "whole-sequence products chunk by chunk of steps, after the walk or beside it on a second "
     "thread (sequence/backward_products.h), and the forward's input projection on a second "
     "thread (sequence/forward.h)");
  m.def("gathered_product_chunks", [] { return fusedrnn::gathered_chunks(); },
        "chunks of the rows that ran, gathered for the backward's whole-sequence products with "
        "lengths, since import (sequence/live_products.h)");

  m.def("team_blocks", [] {
    return counts({{"own", fusedrnn::team_blocks(false)},
                   {"taken_over", fusedrnn::team_blocks(true)}});
  }, "blocks of large team steps since import (the forward's unit blocks, the backward's "
     "panels of dG W_hh): run by the member that owns them, or taken over by another "
     "(sequence/block_queue.h)");
  m.def("set_team_lag_us", [](int us) {
    if (us < 0 || us > 100000) fail("team lag must be 0..100000 us, got " + std::to_string(us));
    fusedrnn::set_team_lag_us(us);
  }, py::arg("us"), "tests: every team member but the first waits this long at the start of each "
     "large step, so that the first takes its blocks over (0: off)");

  m.def("backward_directions", &backward_directions, py::arg("ctx0"), py::arg("ctx1"),
        py::arg("dy"), py::arg("dhn"), py::arg("dcn"), py::arg("consume") = false,
        py::arg("grads_into") = py::make_tuple(py::none(), py::none()),
        py::arg("add_into") = true, py::arg("weights") = py::make_tuple(py::none(), py::none()),
        py::arg("need_dx") = true, py::arg("need_weight_grads") = true,
        "backward through both directions of a bidirectional layer (ctx0 forward, ctx1 "
        "reverse): per direction lists of backward's dy, dhn, dcn, grads_into and weights; "
        "returns backward's (dx, dh0, dc0, grads) per direction. On two threads the directions "
        "run side by side (sequence/direction_pair.h); the same results either way");
  m.def("backward", &backward, py::arg("ctx"), py::arg("dy"), py::arg("dhn") = py::none(),
        py::arg("dcn") = py::none(), py::arg("consume") = false,
        py::arg("grads_into") = py::none(), py::arg("add_into") = true,
        py::arg("weights") = py::none(), py::arg("need_dx") = true,
        py::arg("need_weight_grads") = true,
        "BPTT through a training forward's context; consume=True: the caller will not run backward "
        "on it again (a second one raises), so its saved gates may hold the gradients. grads_into: "
        "None, or a dict with the gradients' keys (those only) whose arrays (writeable, "
        "C-contiguous, of the layer's dtype and the gradients' shapes) the weight and bias "
        "gradients are added into "
        "(add_into=False: written over, whatever they held); the returned grads are then those "
        "arrays. weights: None (the forward's), or (w_ih, w_hh, w_hr or None) with the forward's "
        "values, shapes and dtype, read instead of the memory the forward read. need_dx=False: dx is "
        "None and its product skipped; need_weight_grads=False: grads is {} (grads_into "
        "untouched) and their products skipped");
}
