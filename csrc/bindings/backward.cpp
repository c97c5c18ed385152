// BPTT through a training forward's context: the upstream gradients and the caller's gradient
// arrays (grads_into) checked, the weights read (the forward's or the caller's), the kernels run
// without the GIL.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "bindings/calls.h"
#include "bindings/runtime.h"

namespace fusedrnn::bindings {
namespace {

// The caller's gradient array named `key` in `into` (a dict), to add into or write over: of the
// layer's dtype, C-contiguous, writeable and of shape `shape`, since the kernel writes it in
// place (a copy made to fit would take the gradients and drop them).
template <typename T>
Arr<T> gradient_in_place(const py::dict& into, const char* key, std::vector<int64_t> shape) {
  const std::string where = std::string("grads_into[\"") + key + "\"]";
  if (!into.contains(key)) fail(where + " is missing (an array of shape " + shape_str(shape) + ")");
  py::object o = into[key];
  if (!py::isinstance<py::array>(o)) throw py::type_error(where + " must be a numpy array");
  py::array a = o.cast<py::array>();
  if (!same_dtype(a.dtype(), py::dtype::of<T>()))
    throw py::type_error(where + " must have dtype " + std::string(py::str(py::dtype::of<T>())) +
                         ", got " + std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style) || !(a.flags() & kAligned) || !a.writeable())
    fail(where + " must be a writeable, aligned C-contiguous array (the kernels write it in "
         "place)");
  Arr<T> arr = py::reinterpret_borrow<Arr<T>>(a);
  check_shape(where.c_str(), arr, shape);
  return arr;
}

// The arrays a backward adds its gradients into (grads_into) share memory neither with each
// other nor with what it reads (weights, x, dy, dhn, dcn): a gradient written over a weight
// that the backward reads afterwards would be a silent wrong answer. Null handles are skipped.
void require_gradients_apart(const std::vector<py::object>& outs,
                             const std::vector<py::object>& reads) {
  using Span = std::pair<const char*, const char*>;
  auto span = [](const py::object& o) {
    if (!o || o.is_none()) return Span{nullptr, nullptr};
    py::array a = o.cast<py::array>();
    const char* p = static_cast<const char*>(a.data());
    return Span{p, p + a.nbytes()};
  };
  auto meet = [](Span u, Span v) { return u.first && v.first && u.first < v.second && v.first < u.second; };
  for (size_t i = 0; i < outs.size(); ++i) {
    for (size_t j = 0; j < i; ++j)
      if (meet(span(outs[i]), span(outs[j]))) fail("grads_into must give each gradient an array of its own");
    for (const py::object& r : reads)
      if (meet(span(outs[i]), span(r)))
        fail("grads_into's arrays must not share memory with the weights, x, dy, dhn or dcn");
  }
}

// Every key of grads_into names a gradient this backward writes: an array under any other key
// (a bias's for a layer without biases, weight_hr's without projections, a misspelt name) would
// keep its old values while the caller takes them for gradients.
void refuse_unwritten_keys(const py::dict& into, const std::vector<std::string>& written) {
  for (auto item : into) {
    const std::string key = py::str(item.first);
    if (std::find(written.begin(), written.end(), key) != written.end()) continue;
    std::string names;
    for (const std::string& w : written) names += (names.empty() ? "" : ", ") + w;
    fail("grads_into[\"" + key + "\"]: this backward has no such gradient (it writes " + names +
         "); drop the key");
  }
}

// The weights a backward reads: the forward's (the context's), or the caller's `weights`, a
// tuple (w_ih, w_hh, w_hr or None) of the same shapes, C-contiguous, of the layer's dtype. The
// torch adapter passes what autograd saved: the forward's values, where the memory the context
// points at may have been changed since (allow_mutation_on_saved_tensors) or freed and
// refilled elsewhere (FSDP frees a parameter's storage between forward and backward).
struct BackwardWeights {
  py::object w_ih, w_hh, w_hr;
  bool given = false;  // the caller's: a frozen forward's id does not vouch for them
};

BackwardWeights backward_weights(const Context& c, const py::object& weights, const py::dtype& dt) {
  if (weights.is_none()) return {c.w_ih, c.w_hh, c.w_hr};
  if (!py::isinstance<py::tuple>(weights) || py::len(weights) != 3)
    throw py::type_error("weights must be None or a tuple (w_ih, w_hh, w_hr or None)");
  py::tuple w = weights.cast<py::tuple>();
  const char* names[3] = {"weights[0] (w_ih)", "weights[1] (w_hh)", "weights[2] (w_hr)"};
  const py::object* forward_ones[3] = {&c.w_ih, &c.w_hh, &c.w_hr};
  py::object out[3];
  for (int i = 0; i < 3; ++i) {
    const py::object& want = *forward_ones[i];
    py::object got = w[i];
    if (!want) {
      if (!got.is_none()) fail(std::string(names[i]) + " must be None: the forward had none");
      continue;
    }
    require_dtype(names[i], got, dt);
    if (got.is_none()) fail(std::string(names[i]) + " must be an array: the forward had one");
    py::array a = got.cast<py::array>(), f = want.cast<py::array>();
    std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim()), fshape(f.shape(), f.shape() + f.ndim());
    if (shape != fshape)
      fail(std::string(names[i]) + " must have shape " + shape_str(fshape) + ", got " + shape_str(shape));
    if (!(a.flags() & py::array::c_style)) fail(std::string(names[i]) + " must be C-contiguous");
    out[i] = a.flags() & kAligned ? got : py::object(py::array::ensure(got, kAligned));
  }
  return {out[0], out[1], out[2], true};
}

}  // namespace

void weight_digests(const KernelTable& kt, const py::object* const weights[3], uint64_t out[3]) {
  const void* data[3] = {nullptr, nullptr, nullptr};
  size_t bytes[3] = {0, 0, 0}, total = 0;
  for (int i = 0; i < 3; ++i) {
    if (!*weights[i]) continue;
    const py::array a = weights[i]->cast<py::array>();
    data[i] = a.data();
    bytes[i] = size_t(a.nbytes());
    total += bytes[i];
  }
  auto digest_all = [&] {
    for (int i = 0; i < 3; ++i) out[i] = data[i] ? kt.digest(data[i], bytes[i]) : 0;
  };
  // (releasing the GIL costs about a microsecond: small weights keep it)
  if (total < (size_t(1) << 20)) return digest_all();
  WithoutGil nogil;
  digest_all();
}

namespace {

// Whether the weights a backward reads are those its forward read (Context::weight_digests).
void require_forward_weights(const Context& c, const BackwardWeights& w) {
  const py::object* weights[3] = {&w.w_ih, &w.w_hh, &w.w_hr};
  uint64_t now[3];
  weight_digests(*c.table, weights, now);
  const char* names[3] = {"weight_ih", "weight_hh", "weight_hr"};
  for (int i = 0; i < 3; ++i)
    if (now[i] != c.weight_digests[i])
      throw WeightsChanged(
          std::string(names[i]) + " changed (in place) after the training forward whose saved "
          "state this backward reads: its gradients would be of neither model, the forward's "
          "nor the changed one (torch.nn's autograd raises here too). Change the weights after "
          "backward, or run the forward again", names[i]);
}

// A context's count of backwards running through it, held from claim() until this is
// destroyed (with the GIL held again, also when the kernel throws).
class RunningClaim {
 public:
  RunningClaim() = default;
  RunningClaim(RunningClaim&& o) noexcept : count_(std::exchange(o.count_, nullptr)) {}
  RunningClaim& operator=(RunningClaim&&) = delete;
  ~RunningClaim() {
    if (count_) --*count_;
  }
  void hold(int& count) {
    count_ = &count;
    ++count;
  }

 private:
  int* count_ = nullptr;
};

// One backward call's arguments checked and its outputs allocated: the kernels' BackwardArgs,
// the arrays they write, and the context marked running (until this is destroyed, with the GIL
// held) so that another thread's backward through it leaves its saved gates alone.
template <typename T>
struct BackwardCall {
  fusedrnn::BackwardArgs<T> a{};
  Arr<T> dh0;
  std::optional<Arr<T>> dx, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, h_prev_clean;
  // What the kernels read (x, the weights, dy, dhn, dcn), kept alive until they have run (the
  // cast of a dy that is not C-contiguous is a copy, which would go with the caller's
  // temporary), and the caller's arrays they write (grads_into's): a pair's two calls run at
  // once, so neither may write what the other reads or writes.
  std::vector<py::object> reads, caller_outs;
  RunningClaim running;

  // Once every call of a kernel run is prepared (a check failing leaves each context as it
  // was): the context marked consumed, before the GIL goes, so a later backward sees it, and
  // running. The gates are overwritten only while no other backward (another thread's) reads
  // them.
  void claim(Context& c, bool consume) {
    a.gates_consumed = consume && c.running == 0;
    c.consumed = consume;
    running.hold(c.running);
  }

  // After the kernels: dx past a row's length is dG W_ih with a dG of 0: zeros, unless W_ih
  // holds an infinity or a NaN (0 * inf); torch's PackedSequence gives zeros there.
  py::tuple result() {
    const LayerShape& s = a.s;
    if (dx && a.lengths) zero_padding(dx->mutable_data(), s.T, s.B, s.I, a.lengths);
    py::dict grads;
    if (dw_ih) { grads["weight_ih"] = *dw_ih; grads["weight_hh"] = *dw_hh; }
    if (db_ih) { grads["bias_ih"] = *db_ih; grads["bias_hh"] = *db_hh; }
    if (dw_hr) grads["weight_hr"] = *dw_hr;
    return py::make_tuple(dx ? py::object(*dx) : py::none(), dh0,
                          dc0 ? py::object(*dc0) : py::none(), grads);
  }
};

template <typename T>
BackwardCall<T> prepare_backward(Context& c, Arr<T> dy, std::optional<Arr<T>> dhn,
                                 std::optional<Arr<T>> dcn, bool consume, py::object grads_into,
                                 bool add_into, const BackwardWeights& w, bool need_dx,
                                 bool need_weight_grads) {
  if (c.consumed)
    throw std::runtime_error("backward already ran on this context with consume=True, which "
                             "reuses its saved state: run the forward again");
  require_forward_weights(c, w);
  const LayerShape& s = c.s;
  const int64_t G = fusedrnn::gate_count(s.cell);
  check_shape("dy", dy, {s.T, s.B, s.Hout});
  if (dhn) check_shape("dhn", *dhn, {s.B, s.Hout});
  if (dcn) {
    if (s.cell != Cell::Lstm) fail("dcn is only for LSTM");
    check_shape("dcn", *dcn, {s.B, s.H});
  }
  BackwardCall<T> call;
  call.dh0 = empty<T>({s.B, s.Hout});
  if (need_dx) call.dx.emplace(empty<T>({s.T, s.B, s.I}));
  if (s.cell == Cell::Lstm) call.dc0.emplace(std::vector<int64_t>{s.B, s.H});
  // The weight and bias gradients: new arrays, or the caller's, added into or written over; none
  // where the caller needs none (grads_into is then left as it is).
  const bool given = need_weight_grads && !grads_into.is_none();
  const bool accumulate = given && add_into;
  py::dict into = given ? grads_into.cast<py::dict>() : py::dict();
  std::vector<std::string> written;
  auto gradient = [&](const char* key, std::vector<int64_t> shape) {
    written.emplace_back(key);
    return given ? gradient_in_place<T>(into, key, shape) : empty<T>(shape);
  };
  if (need_weight_grads) {
    call.dw_ih.emplace(gradient("weight_ih", {G * s.H, s.I}));
    call.dw_hh.emplace(gradient("weight_hh", {G * s.H, s.Hout}));
    if (c.has_bias) {
      call.db_ih.emplace(gradient("bias_ih", {G * s.H}));
      call.db_hh.emplace(gradient("bias_hh", {G * s.H}));
    }
    if (s.has_proj) call.dw_hr.emplace(gradient("weight_hr", {s.Hout, s.H}));
  }
  call.reads = {c.x, w.w_ih, w.w_hh, w.w_hr, dy};
  if (dhn) call.reads.push_back(*dhn);
  if (dcn) call.reads.push_back(*dcn);
  if (given) {
    refuse_unwritten_keys(into, written);
    for (auto* o : {&call.dw_ih, &call.dw_hh, &call.db_ih, &call.db_hh, &call.dw_hr})
      if (*o) call.caller_outs.push_back(**o);
    require_gradients_apart(call.caller_outs, call.reads);
  }
  auto ptr = [](const py::object& o) -> T* {
    return o ? static_cast<T*>(const_cast<void*>(o.cast<py::array>().data())) : nullptr;
  };
  auto mptr = [](std::optional<Arr<T>>& o) -> T* { return o ? o->mutable_data() : nullptr; };
  fusedrnn::BackwardArgs<T>& a = call.a;
  a.s = s;
  a.dx = mptr(call.dx); a.dh0 = call.dh0.mutable_data(); a.dc0 = mptr(call.dc0);
  a.dw_ih = mptr(call.dw_ih); a.dw_hh = mptr(call.dw_hh);
  a.db_ih = mptr(call.db_ih); a.db_hh = mptr(call.db_hh); a.dw_hr = mptr(call.dw_hr);
  a.dy = dy.data(); a.dhn = opt_ptr(dhn); a.dcn = opt_ptr(dcn);
  a.x = ptr(c.x); a.x_packed = ptr(c.x_packed); a.w_ih = ptr(w.w_ih); a.w_hh = ptr(w.w_hh); a.w_hr = ptr(w.w_hr);
  a.lengths = c.lengths ? static_cast<const int64_t*>(c.lengths.cast<py::array>().data()) : nullptr;
  a.saved = {ptr(c.gates), ptr(c.h), ptr(c.c), ptr(c.hfull), ptr(c.extra)};
  // A finished row carries its last state through the steps past its length, where dW_hh =
  // dG^T H_prev multiplies it by a dG of 0: a state not finite there (a relu RNN's overflow)
  // would make dW_hh NaN where torch's sum has no such terms. The product then reads a copy
  // with those rows zeroed (step k's h_prev is saved row k: rows lengths[b] .. T - 1).
  if (a.dw_hh && a.lengths && padding_not_finite(a.saved.h, s.T, s.B, s.Hout, a.lengths)) {
    call.h_prev_clean = padding_zeroed(a.saved.h, s.T + 1, s.T, s.B, s.Hout, a.lengths);
    a.h_prev_products = call.h_prev_clean->data();
  }
  a.num_threads = threads_for_call();
  a.frozen = w.given ? 0 : c.frozen;
  a.accumulate = accumulate;
  return call;
}

template <typename T>
py::tuple backward_impl(Context& c, Arr<T> dy, std::optional<Arr<T>> dhn, std::optional<Arr<T>> dcn,
                        bool consume, py::object grads_into, bool add_into, const BackwardWeights& w,
                        bool need_dx, bool need_weight_grads) {
  BackwardCall<T> call = prepare_backward<T>(c, dy, dhn, dcn, consume, grads_into, add_into, w,
                                             need_dx, need_weight_grads);
  call.claim(c, consume);
  {
    WithoutGil nogil;
    if constexpr (sizeof(T) == 4) c.table->backward_f32(call.a); else c.table->backward_f64(call.a);
  }
  return call.result();
}

// Both directions of a bidirectional layer (ctx0 forward, ctx1 reverse, contexts of one
// forward_directions call or of two forwards of one shape): on two threads side by side
// (sequence/direction_pair.h). Per direction what backward takes; returns backward's tuple per
// direction.
template <typename T>
py::list backward_directions_impl(Context& c0, Context& c1, const py::sequence& dy,
                                  const py::sequence& dhn, const py::sequence& dcn, bool consume,
                                  const py::sequence& grads_into, bool add_into,
                                  const BackwardWeights* w, bool need_dx, bool need_weight_grads) {
  Context* ctx[2] = {&c0, &c1};
  std::vector<BackwardCall<T>> calls;
  calls.reserve(2);
  for (int d = 0; d < 2; ++d) {
    if (dy[d].is_none())
      throw py::type_error("dy must be an array shaped as the forward's y, got None");
    try {
      calls.push_back(prepare_backward<T>(*ctx[d], dy[d].cast<Arr<T>>(),
                                          optional_cast<Arr<T>>(dhn[d]),
                                          optional_cast<Arr<T>>(dcn[d]), consume, grads_into[d],
                                          add_into, w[d], need_dx, need_weight_grads));
    } catch (WeightsChanged& e) {
      e.direction = d;
      throw;
    }
  }
  // Each call checked its own arrays; across the two (which run at once), each one's
  // grads_into against the other's too.
  for (int d = 0; d < 2; ++d) {
    std::vector<py::object> outs = calls[d].caller_outs;
    outs.insert(outs.end(), calls[1 - d].caller_outs.begin(), calls[1 - d].caller_outs.end());
    require_gradients_apart(outs, calls[1 - d].reads);
  }
  for (int d = 0; d < 2; ++d) calls[d].claim(*ctx[d], consume);
  const fusedrnn::BackwardArgs<T> args[2] = {calls[0].a, calls[1].a};
  {
    WithoutGil nogil;
    if constexpr (sizeof(T) == 4) c0.table->backward_directions_f32(args);
    else c0.table->backward_directions_f64(args);
  }
  py::list out;
  for (BackwardCall<T>& call : calls) out.append(call.result());
  return out;
}

py::dtype dtype_of(const Context& c) {
  return c.f64 ? py::dtype::of<double>() : py::dtype::of<float>();
}

// One direction's backward arguments as Python gave them, of the context's dtype (grads_into a
// dict or None); returns the weights it reads.
BackwardWeights checked_arguments(const Context& c, const py::object& dy, const py::object& dhn,
                                  const py::object& dcn, const py::object& grads_into,
                                  const py::object& weights) {
  const py::dtype dt = dtype_of(c);
  require_dtype("dy", dy, dt); require_dtype("dhn", dhn, dt); require_dtype("dcn", dcn, dt);
  if (!grads_into.is_none() && !py::isinstance<py::dict>(grads_into))
    throw py::type_error("grads_into must be a dict of gradient arrays or None");
  return backward_weights(c, weights, dt);
}

}  // namespace

void check_forward_weights(const Context& c, py::object weights) {
  require_forward_weights(c, backward_weights(c, weights, dtype_of(c)));
}

py::tuple backward(Context& c, py::array dy, py::object dhn, py::object dcn, bool consume,
                   py::object grads_into, bool add_into, py::object weights, bool need_dx,
                   bool need_weight_grads) {
  const BackwardWeights w = checked_arguments(c, dy, dhn, dcn, grads_into, weights);
  auto run = [&](auto zero) {  // the same call in either precision
    using T = decltype(zero);
    return backward_impl<T>(c, dy, optional_cast<Arr<T>>(dhn), optional_cast<Arr<T>>(dcn), consume,
                            grads_into, add_into, w, need_dx, need_weight_grads);
  };
  return c.f64 ? run(0.0) : run(0.0f);
}

py::list backward_directions(Context& c0, Context& c1, py::sequence dy, py::sequence dhn,
                             py::sequence dcn, bool consume, py::sequence grads_into,
                             bool add_into, py::sequence weights, bool need_dx,
                             bool need_weight_grads) {
  for (const py::sequence* l : {&dy, &dhn, &dcn, &grads_into, &weights})
    if (l->size() != 2) fail("every per-direction list needs 2 entries");
  if (&c0 == &c1) fail("the two directions' contexts must be two contexts, got one twice");
  if (c0.f64 != c1.f64 || c0.table != c1.table || c0.s.reverse || !c1.s.reverse)
    fail("the contexts must be a forward and a reverse direction's, of one dtype and ISA");
  BackwardWeights w[2];
  for (int d = 0; d < 2; ++d)
    w[d] = checked_arguments(d ? c1 : c0, dy[d], dhn[d], dcn[d], grads_into[d], weights[d]);
  if (c0.f64)
    return backward_directions_impl<double>(c0, c1, dy, dhn, dcn, consume, grads_into, add_into,
                                            w, need_dx, need_weight_grads);
  return backward_directions_impl<float>(c0, c1, dy, dhn, dcn, consume, grads_into, add_into, w,
                                         need_dx, need_weight_grads);
}

}  // namespace fusedrnn::bindings
