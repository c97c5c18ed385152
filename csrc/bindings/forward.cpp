// A layer's forward, and a stack's: the arguments checked, the outputs and (training) the saved
// state allocated, the kernels run without the GIL.
#include <cstring>
#include <tuple>
#include <vector>

#include "bindings/calls.h"
#include "bindings/runtime.h"

namespace fusedrnn::bindings {
namespace {

// One layer call's arguments checked, its outputs (and, training, its saved buffers) allocated:
// the kernels' ForwardArgs and what python gets back.
template <typename T>
struct LayerCall {
  fusedrnn::ForwardArgs<T> a{};
  Arr<T> y, hn;
  std::optional<Arr<T>> cn;
  std::optional<Arr<int64_t>> lengths;  // the kernels' copy, alive for the call
  std::optional<Arr<T>> x_clean;        // x with its padding zeroed, where the call needs it
  // The arrays the kernels read, alive until they have run: a stack's per-layer arguments are
  // cast to Arr<T> in forward_stack_impl's loop, and the cast of an array that is not C-contiguous
  // (or not aligned) is a copy, freed with the temporary before the kernels read it.
  std::vector<py::object> inputs;
  Context c{};
  bool training = false;

  // The kernels' arguments, once this call is where it stays until they have run (a training
  // forward's digests of its weights go into its context: ForwardArgs::weight_digests).
  const fusedrnn::ForwardArgs<T>& kernel_args() {
    a.weight_digests = training ? c.weight_digests : nullptr;
    return a;
  }

  py::tuple result() {
    py::object ctx = training ? py::cast(std::move(c)) : py::none();
    return py::make_tuple(y, hn, cn ? py::object(*cn) : py::none(), ctx);
  }
};

// The layer's shape from x and the weights, every input checked against it (a ValueError naming
// the argument and the shape expected); lengths replaced by our own checked copy.
template <typename T>
LayerShape checked_layer_shape(int cell_code, bool lbr, bool reverse, const Arr<T>& x,
                               const Arr<T>& h0, const std::optional<Arr<T>>& c0,
                               const Arr<T>& w_ih, const Arr<T>& w_hh,
                               const std::optional<Arr<T>>& b_ih, const std::optional<Arr<T>>& b_hh,
                               const std::optional<Arr<T>>& w_hr,
                               std::optional<Arr<int64_t>>& lengths, uint64_t frozen) {
  if (cell_code < 0 || cell_code > 3) fail("cell code must be 0..3");
  const Cell cell = static_cast<Cell>(cell_code);
  const int64_t G = fusedrnn::gate_count(cell);
  if (x.ndim() != 3) fail("x must be 3-d (T, B, I)");
  if (w_hh.ndim() != 2 || w_hh.shape(0) % G != 0) fail("weight_hh must be 2-d (G*H, H_out)");
  LayerShape s{x.shape(0), x.shape(1), x.shape(2), w_hh.shape(0) / G, w_hh.shape(1), cell, lbr,
               reverse, b_ih.has_value(), w_hr.has_value()};
  check_shape("weight_ih", w_ih, {G * s.H, s.I});
  if (w_hr) {
    if (cell != Cell::Lstm) fail("weight_hr (projection) is only for LSTM");
    check_shape("weight_hr", *w_hr, {s.Hout, s.H});
  } else if (s.Hout != s.H) {
    fail("weight_hh must have shape " + shape_str({G * s.H, s.H}));
  }
  if (b_ih.has_value() != b_hh.has_value())
    fail("bias_ih and bias_hh are given together or not at all");
  if (b_ih) {
    check_shape("bias_ih", *b_ih, {G * s.H});
    check_shape("bias_hh", *b_hh, {G * s.H});
  }
  check_shape("h0", h0, {s.B, s.Hout});
  if (cell == Cell::Lstm) {
    if (!c0) fail("c0 is required for LSTM");
    check_shape("c0", *c0, {s.B, s.H});
  }
  if (lengths) {
    check_shape("lengths", *lengths, {s.B});
    // Our own copy, checked, read by the kernels and kept for backward: the caller may change
    // theirs (the next batch's lengths) before backward, or while the GIL is away.
    lengths = own_copy(*lengths);
    for (int64_t b = 0; b < s.B; ++b)
      if (lengths->data()[b] < 1 || lengths->data()[b] > s.T)
        fail("lengths must lie in 1.." + std::to_string(s.T) + ", got " +
             std::to_string(lengths->data()[b]));
  }
  if (s.T < 1) fail("x must have at least one time step");
  if (frozen) {
    require_frozen<T>("w_ih", w_ih);
    require_frozen<T>("w_hh", w_hh);
    require_frozen<T>("b_ih", b_ih);
    require_frozen<T>("b_hh", b_hh);
    require_frozen<T>("w_hr", w_hr);
  }
  return s;
}

// A training call's context: what its backward reads (x, the weights, lengths) and the saved
// state the kernels fill (a.saved), made in call.c.
template <typename T>
void keep_for_backward(LayerCall<T>& call, const KernelTable& kt, const Arr<T>& x,
                       const Arr<T>& w_ih, const Arr<T>& w_hh, const std::optional<Arr<T>>& w_hr,
                       const std::optional<Arr<int64_t>>& lengths, uint64_t frozen, bool pack_x) {
  fusedrnn::ForwardArgs<T>& a = call.a;
  const LayerShape& s = a.s;
  const int64_t G = fusedrnn::gate_count(s.cell);
  Context& c = call.c;
  c.frozen = frozen;
  c.s = s; c.f64 = sizeof(T) == 8; c.table = &kt; c.has_bias = s.has_bias;
  c.w_ih = w_ih; c.w_hh = w_hh;
  // The caller may reuse x's buffer: keep a copy of x, packed as the backward takes it where
  // that is about as small as x (panels pad I to whole NR columns: I = 1 would take 16-32x x's
  // memory until backward), else plain (the backward packs it 4 MiB at a time). A single
  // row's stays plain: its backward may take dW_ih chunk by chunk of steps
  // (backward_products.h), slicing x by time.
  const int64_t packed_elems = kt.gemm_b_elems(s.T * s.B, s.I, sizeof(T) == 8);
  if (pack_x && s.B > 1 && 4 * packed_elems <= 5 * s.T * s.B * s.I) {
    Arr<T> packed = empty<T>({packed_elems});
    a.x_packed = packed.mutable_data();
    c.x_packed = packed;
  } else if (call.x_clean) {
    c.x = *call.x_clean;
  } else if (pack_x) {
    Arr<T> copy = empty<T>({s.T, s.B, s.I});
    std::memcpy(copy.mutable_data(), x.data(), sizeof(T) * s.T * s.B * s.I);
    c.x = copy;
  } else {
    c.x = x;
  }
  if (w_hr) c.w_hr = *w_hr;
  if (lengths) c.lengths = *lengths;
  c.h = empty<T>({s.T + 1, s.B, s.Hout});
  if (G > 1) c.gates = empty<T>({s.T, s.B, G * s.H});
  if (s.cell == Cell::Lstm) c.c = empty<T>({s.T + 1, s.B, s.H});
  if (s.has_proj) c.hfull = empty<T>({s.T, s.B, s.H});
  if (s.cell == Cell::Gru) c.extra = empty<T>({s.T, s.B, s.H});
  auto mut = [](py::object& o) -> T* {
    return o ? static_cast<T*>(o.cast<py::array>().mutable_data()) : nullptr;
  };
  a.saved = {mut(c.gates), mut(c.h), mut(c.c), mut(c.hfull), mut(c.extra)};
}

template <typename T>
LayerCall<T> prepare_forward(const KernelTable& kt, int cell_code, bool lbr, bool reverse,
                             bool training, Arr<T> x, Arr<T> h0, std::optional<Arr<T>> c0,
                             Arr<T> w_ih, Arr<T> w_hh, std::optional<Arr<T>> b_ih,
                             std::optional<Arr<T>> b_hh, std::optional<Arr<T>> w_hr,
                             std::optional<Arr<int64_t>> lengths, uint64_t frozen,
                             bool pack_x, bool keep_packed) {
  const LayerShape s = checked_layer_shape<T>(cell_code, lbr, reverse, x, h0, c0, w_ih, w_hh,
                                              b_ih, b_hh, w_hr, lengths, frozen);
  LayerCall<T> call;
  call.training = training;
  call.lengths = lengths;
  for (const py::object& held : {py::object(x), py::object(h0), py::object(w_ih), py::object(w_hh)})
    call.inputs.push_back(held);
  for (const auto* held : {&c0, &b_ih, &b_hh, &w_hr})
    if (*held) call.inputs.push_back(**held);
  if (lengths && padding_to_clear(x.data(), s.T, s.B, s.I, lengths->data())) {
    // Steps past a row's length enter no result (torch's PackedSequence never holds them) but
    // dW_ih = dG^T X, where dG is 0 and 0 * NaN is NaN, and the tiles' scans of x: the kernels
    // take x with them zeroed, so the results are the bits zeros there give.
    x = padding_zeroed(x.data(), s.T, s.T, s.B, s.I, lengths->data());
    call.x_clean = x;
    pack_x = true;  // (training: the context keeps this copy, not the caller's x)
  }
  call.y = empty<T>({s.T, s.B, s.Hout});
  call.hn = empty<T>({s.B, s.Hout});
  if (s.cell == Cell::Lstm) call.cn.emplace(std::vector<int64_t>{s.B, s.H});
  fusedrnn::ForwardArgs<T>& a = call.a;
  a.s = s;
  a.y = call.y.mutable_data();
  a.hn = call.hn.mutable_data();
  a.cn = call.cn ? call.cn->mutable_data() : nullptr;
  a.x = x.data(); a.h0 = h0.data(); a.c0 = opt_ptr(c0);
  a.w_ih = w_ih.data(); a.w_hh = w_hh.data(); a.b_ih = opt_ptr(b_ih); a.b_hh = opt_ptr(b_hh);
  a.w_hr = opt_ptr(w_hr);
  a.lengths = lengths ? lengths->data() : nullptr;
  a.num_threads = threads_for_call();
  a.frozen = frozen;
  a.keep_packed = keep_packed;
  if (training) keep_for_backward(call, kt, x, w_ih, w_hh, w_hr, lengths, frozen, pack_x);
  return call;
}

// ONNX's cell options (ForwardArgs::onnx) from forward's `onnx`: None, or a tuple (functions,
// clip, input_forget, peepholes) with functions three (Activation code, alpha, beta) for f, g, h,
// clip a float (inf: none) and peepholes None or (3, H) in gates i, f, o. The array stays
// referenced here for the call.
template <typename T>
struct OnnxOptions {
  fusedrnn::OnnxCell<T> cell{};
  std::optional<Arr<T>> peepholes;

  const fusedrnn::OnnxCell<T>* parse(const py::object& o, const LayerShape& s, bool training) {
    if (o.is_none()) return nullptr;
    if (training) fail("onnx cell options are for inference only (training=False)");
    if (s.has_proj) fail("onnx cell options take no projection (weight_hr)");
    const auto t = o.cast<py::tuple>();
    const auto fns = t[0].cast<std::vector<std::tuple<int, double, double>>>();
    if (fns.size() != 3) fail("onnx functions must be three (code, alpha, beta): f, g, h");
    fusedrnn::ActivationFn<T>* dst[3] = {&cell.f, &cell.g, &cell.h};
    for (int i = 0; i < 3; ++i) {
      const auto [code, alpha, beta] = fns[i];
      if (code < 0 || code > int(fusedrnn::Activation::Softplus)) fail("onnx activation code out of range");
      *dst[i] = {static_cast<fusedrnn::Activation>(code), T(alpha), T(beta)};
    }
    cell.clip = T(t[1].cast<double>());
    if (!(cell.clip > 0)) fail("onnx clip must be positive (infinity: no clip)");
    cell.input_forget = t[2].cast<bool>();
    if (!t[3].is_none()) {
      if (s.cell != Cell::Lstm) fail("peepholes are only for LSTM");
      // (the cast converts what NumPy casts safely: a byte-swapped or float32 array in float64)
      require_dtype("peepholes", t[3], py::dtype::of<T>());
      peepholes = t[3].cast<Arr<T>>();
      check_shape("peepholes", *peepholes, {3, s.H});
      cell.peepholes = peepholes->data();
    }
    return &cell;
  }
};

template <typename T>
py::tuple forward_impl(const KernelTable& kt, int cell_code, bool lbr, bool reverse, bool training,
                       Arr<T> x, Arr<T> h0, std::optional<Arr<T>> c0, Arr<T> w_ih, Arr<T> w_hh,
                       std::optional<Arr<T>> b_ih, std::optional<Arr<T>> b_hh,
                       std::optional<Arr<T>> w_hr, std::optional<Arr<int64_t>> lengths,
                       uint64_t frozen, bool keep_x, const py::object& onnx, bool keep_packed,
                       bool training_bits) {
  LayerCall<T> call = prepare_forward<T>(kt, cell_code, lbr, reverse, training, x, h0, c0, w_ih,
                                         w_hh, b_ih, b_hh, w_hr, lengths, frozen, !keep_x,
                                         keep_packed);
  call.a.training_bits = training_bits;
  OnnxOptions<T> options;
  call.a.onnx = options.parse(onnx, call.a.s, training);
  {
    WithoutGil nogil;
    if constexpr (sizeof(T) == 4) kt.forward_f32(call.kernel_args());
    else kt.forward_f64(call.kernel_args());
  }
  return call.result();
}

// Per-layer (or per-direction) lists of a stack's arguments, each entry checked as it is taken:
// of x's dtype, and an array where one is required.
template <typename T>
struct ListEntries {
  py::dtype dt;

  std::optional<Arr<T>> optional(py::handle o, const char* name) const {
    require_dtype(name, py::reinterpret_borrow<py::object>(o), dt);
    return o.is_none() ? std::optional<Arr<T>>() : std::optional<Arr<T>>(o.cast<Arr<T>>());
  }
  Arr<T> required(py::handle o, const char* name) const {
    require_dtype(name, py::reinterpret_borrow<py::object>(o), dt);
    if (o.is_none()) fail(std::string(name) + " must be an array, got None");
    return o.cast<Arr<T>>();
  }
};

void check_list_sizes(std::initializer_list<const py::list*> lists, size_t n, const char* what) {
  for (const py::list* l : lists)
    if (l->size() != n) fail(std::string("every per-") + what + " list needs " +
                             std::to_string(n) + " entries");
}

// A unidirectional stack: layer k's input is layer k - 1's output (allocated here), so the
// kernels may run the layers side by side (sequence/layer_pipeline.h). Per layer lists of the
// states and weights (None where forward takes None); returns a list of forward's tuples.
template <typename T>
py::list forward_stack_impl(const KernelTable& kt, int cell_code, bool lbr, bool training,
                            Arr<T> x, const py::list& h0, const py::list& c0,
                            const py::list& w_ih, const py::list& w_hh, const py::list& b_ih,
                            const py::list& b_hh, const py::list& w_hr, uint64_t frozen,
                            bool keep_x, bool keep_packed, int64_t train_from) {
  const size_t n = w_hh.size();
  if (n == 0) fail("a stack needs at least one layer");
  check_list_sizes({&h0, &c0, &w_ih, &b_ih, &b_hh, &w_hr}, n, "layer");
  const ListEntries<T> e{x.dtype()};
  std::vector<LayerCall<T>> calls;
  calls.reserve(n);
  Arr<T> layer_in = x;
  for (size_t k = 0; k < n; ++k) {
    const bool train = training && int64_t(k) >= train_from;
    calls.push_back(prepare_forward<T>(
        kt, cell_code, lbr, false, train, layer_in, e.required(h0[k], "h0"),
        e.optional(c0[k], "c0"), e.required(w_ih[k], "w_ih"), e.required(w_hh[k], "w_hh"),
        e.optional(b_ih[k], "b_ih"), e.optional(b_hh[k], "b_hh"), e.optional(w_hr[k], "w_hr"),
        std::nullopt, frozen, k == 0 && !keep_x, keep_packed));
    calls.back().a.training_bits = training;  // (below train_from: the bits of the layers above)
    layer_in = calls.back().y;
  }
  std::vector<fusedrnn::ForwardArgs<T>> args;
  for (LayerCall<T>& call : calls) args.push_back(call.kernel_args());
  {
    WithoutGil nogil;
    if constexpr (sizeof(T) == 4) kt.forward_stack_f32(args.data(), int(n));
    else kt.forward_stack_f64(args.data(), int(n));
  }
  py::list out;
  for (LayerCall<T>& call : calls) out.append(call.result());
  return out;
}

// A bidirectional layer: direction 0 forward, 1 reverse, both on x, so the kernels may run them
// side by side (sequence/direction_pair.h). Per direction lists of the states and weights;
// returns forward's tuple per direction.
template <typename T>
py::list forward_directions_impl(const KernelTable& kt, const int cell_codes[2], bool lbr,
                                 bool training, Arr<T> x, const py::list& h0, const py::list& c0,
                                 const py::list& w_ih, const py::list& w_hh, const py::list& b_ih,
                                 const py::list& b_hh, const py::list& w_hr,
                                 const std::optional<Arr<int64_t>>& lengths, uint64_t frozen,
                                 bool keep_x, const py::sequence& onnx, bool keep_packed,
                                 bool training_bits) {
  check_list_sizes({&h0, &c0, &w_ih, &w_hh, &b_ih, &b_hh, &w_hr}, 2, "direction");
  const ListEntries<T> e{x.dtype()};
  std::vector<LayerCall<T>> calls;
  calls.reserve(2);
  OnnxOptions<T> options[2];
  for (size_t d = 0; d < 2; ++d) {
    calls.push_back(prepare_forward<T>(
        kt, cell_codes[d], lbr, d == 1, training, x, e.required(h0[d], "h0"),
        e.optional(c0[d], "c0"), e.required(w_ih[d], "w_ih"), e.required(w_hh[d], "w_hh"),
        e.optional(b_ih[d], "b_ih"), e.optional(b_hh[d], "b_hh"), e.optional(w_hr[d], "w_hr"),
        lengths, frozen, !keep_x, keep_packed));
    calls.back().a.training_bits = training_bits;
    calls.back().a.onnx = options[d].parse(onnx[d], calls.back().a.s, training);
  }
  const fusedrnn::ForwardArgs<T> args[2] = {calls[0].kernel_args(), calls[1].kernel_args()};
  {
    WithoutGil nogil;
    if constexpr (sizeof(T) == 4) kt.forward_directions_f32(args);
    else kt.forward_directions_f64(args);
  }
  py::list out;
  for (LayerCall<T>& call : calls) out.append(call.result());
  return out;
}

}  // namespace

py::tuple forward(int cell, bool lbr, bool reverse, bool training, py::array x, py::array h0,
                  py::object c0, py::array w_ih, py::array w_hh, py::object b_ih, py::object b_hh,
                  py::object w_hr, py::object lengths, std::optional<std::string> isa,
                  uint64_t frozen, bool keep_x, py::object onnx, bool keep_packed,
                  bool training_bits) {
  const KernelTable& kt = kernels(isa);
  const bool f64 = is_f64(x);  // first: a float16 x is x's error, not "h0 must be float16"
  const py::dtype dt = x.dtype();
  require_dtype("h0", h0, dt); require_dtype("c0", c0, dt); require_dtype("w_ih", w_ih, dt);
  require_dtype("w_hh", w_hh, dt); require_dtype("b_ih", b_ih, dt); require_dtype("b_hh", b_hh, dt);
  require_dtype("w_hr", w_hr, dt); require_dtype("lengths", lengths, py::dtype::of<int64_t>());
  std::optional<Arr<int64_t>> len = optional_cast<Arr<int64_t>>(lengths);
  auto run = [&](auto zero) {  // the same call in either precision
    using T = decltype(zero);
    auto o = [](const py::object& a) { return optional_cast<Arr<T>>(a); };
    return forward_impl<T>(kt, cell, lbr, reverse, training, x, h0, o(c0), w_ih, w_hh, o(b_ih),
                           o(b_hh), o(w_hr), len, frozen, keep_x, onnx, keep_packed,
                           training_bits);
  };
  return f64 ? run(0.0) : run(0.0f);
}

py::list forward_stack(int cell, bool lbr, bool training, py::array x, py::list h0, py::list c0,
                       py::list w_ih, py::list w_hh, py::list b_ih, py::list b_hh, py::list w_hr,
                       std::optional<std::string> isa, uint64_t frozen, bool keep_x,
                       bool keep_packed, int64_t train_from) {
  const KernelTable& kt = kernels(isa);
  if (is_f64(x))
    return forward_stack_impl<double>(kt, cell, lbr, training, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, frozen, keep_x, keep_packed, train_from);
  return forward_stack_impl<float>(kt, cell, lbr, training, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, frozen, keep_x, keep_packed, train_from);
}

py::list forward_directions(py::sequence cells, bool lbr, bool training, py::array x,
                            py::list h0, py::list c0, py::list w_ih, py::list w_hh,
                            py::list b_ih, py::list b_hh, py::list w_hr, py::object lengths,
                            std::optional<std::string> isa, uint64_t frozen, bool keep_x,
                            py::sequence onnx, bool keep_packed, bool training_bits) {
  const KernelTable& kt = kernels(isa);
  if (cells.size() != 2 || onnx.size() != 2)
    fail("cells and onnx need one entry per direction (2)");
  const int codes[2] = {cells[0].cast<int>(), cells[1].cast<int>()};
  require_dtype("lengths", lengths, py::dtype::of<int64_t>());
  const std::optional<Arr<int64_t>> len = optional_cast<Arr<int64_t>>(lengths);
  if (is_f64(x))
    return forward_directions_impl<double>(kt, codes, lbr, training, x, h0, c0, w_ih, w_hh,
                                           b_ih, b_hh, w_hr, len, frozen, keep_x, onnx,
                                           keep_packed, training_bits);
  return forward_directions_impl<float>(kt, codes, lbr, training, x, h0, c0, w_ih, w_hh, b_ih,
                                        b_hh, w_hr, len, frozen, keep_x, onnx, keep_packed,
                                        training_bits);
}

}  // namespace fusedrnn::bindings
