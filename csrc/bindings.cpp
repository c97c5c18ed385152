// fusedrnn._C: NumPy buffers in, NumPy buffers out. Shapes are checked here again (the Python
// layer checks them first, with friendlier messages) so no call can read or write out of bounds.
// Every kernel runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernel_api.h"
#include "team_policy.h"
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;
using fusedrnn::Cell;
using fusedrnn::KernelTable;
using fusedrnn::LayerShape;

namespace {

std::atomic<int> g_num_threads{0};  // 0: not set, use OpenMP's default (OMP_NUM_THREADS)
// The most threads a call may ask for. Where the system cannot start as many as asked, GNU
// OpenMP ends the process (exit 1) at the next parallel region, so an absurd count is refused up
// front; 1024 is more than the logical CPUs of any machine this runs on.
constexpr int kMaxThreads = 1024;

// Starts this thread's OpenMP workers, if it has fewer than n, outside any kernel: a worker
// copies its creator's floating-point mode, and one born inside a kernel's DenormalsFlushed
// would flush denormals for good, in torch's parallel work too (the same libgomp).
void start_workers_with_the_callers_mode(int n) {
#if defined(_OPENMP)
  thread_local int started = 1;
  if (n <= started) return;
  std::atomic<int> joined{0};  // a body the compiler cannot drop
#pragma omp parallel num_threads(n)
  joined.fetch_add(1, std::memory_order_relaxed);
  started = n;
#else
  (void)n;
#endif
}

// Without OpenMP the kernels run on the caller's thread alone, whatever set_num_threads said.
int num_threads() {
#if defined(_OPENMP)
  int n = g_num_threads.load();
  if (n > 0) return n;
  return std::min(omp_get_max_threads(), kMaxThreads);
#else
  return 1;
#endif
}

// num_threads() for a call about to run kernels on them: its workers started first.
int threads_for_call() {
  const int n = num_threads();
  start_workers_with_the_callers_mode(n);
  return n;
}

const KernelTable& kernels(const std::optional<std::string>& isa) {
  if (!isa) return fusedrnn::active_kernels();
  const KernelTable* t = fusedrnn::kernels_for(isa->c_str());
  if (!t) throw py::value_error("isa '" + *isa + "' is not available on this machine");
  return *t;
}

// A kernel call's part without the GIL, counted for tests (_C.calls_without_gil) from before
// the release to after the GIL is back: Python in another thread sees the count from the moment
// it can run, and only while the GIL is away (a call that held it would never show).
std::atomic<int> g_calls_without_gil{0};
class WithoutGil {
  struct Counted {
    Counted() { g_calls_without_gil.fetch_add(1, std::memory_order_relaxed); }
    ~Counted() { g_calls_without_gil.fetch_sub(1, std::memory_order_relaxed); }
  } counted_;  // (members: made in order, ended in reverse)
  py::gil_scoped_release released_;
};

// C-contiguous and aligned to T: NumPy copies an array that is not (an unaligned one comes from
// np.frombuffer at an odd offset, or a packed record's field), since the kernels' loads and
// stores of T assume its alignment (an unaligned T* is undefined behaviour; UBSan).
constexpr int kAligned = py::detail::npy_api::NPY_ARRAY_ALIGNED_;
template <typename T>
using Arr = py::array_t<T, py::array::c_style | kAligned>;

[[noreturn]] void fail(const std::string& what) { throw py::value_error(what); }

// {name: count} for the kernels' counters the tests read.
py::dict counts(std::initializer_list<std::pair<const char*, int64_t>> named) {
  py::dict d;
  for (const auto& [name, n] : named) d[name] = n;
  return d;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

template <typename T>
void check_shape(const char* name, const Arr<T>& a, std::vector<int64_t> want) {
  std::vector<int64_t> got(a.shape(), a.shape() + a.ndim());
  if (got != want) fail(std::string(name) + " must have shape " + shape_str(want) + ", got " + shape_str(got));
}

template <typename T>
const T* opt_ptr(const std::optional<Arr<T>>& a) { return a ? a->data() : nullptr; }

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
  // A backward with consume=True ran (or runs): the saved gates may hold its gradients. And how
  // many backward calls are running on it now (changed under the GIL): a consuming one overwrites
  // the gates only when none is, so no other thread is reading them.
  bool consumed = false;
  int running = 0;
};

// A new C-order array in memory from the kernels' block cache (workspace.cpp): training runs
// allocate the same large saved-state and gradient buffers every call, and fresh pages from the
// OS cost a fault and a zeroing each.
template <typename T>
Arr<T> empty(std::vector<int64_t> shape) {
  size_t n = 1;
  bool too_big = false;
  for (int64_t d : shape) too_big |= __builtin_mul_overflow(n, static_cast<size_t>(d), &n);
  too_big |= n > SIZE_MAX / sizeof(T);
  void* mem = nullptr;
  try {
    if (!too_big) mem = fusedrnn::aligned_alloc_bytes(n * sizeof(T));
  } catch (const std::bad_alloc&) {
  }
  if (!mem) {  // (MemoryError, as NumPy's, with the size: pybind11's says "std::bad_alloc")
    char gib[64];
    std::snprintf(gib, sizeof gib, "%.1f GiB", double(n) * sizeof(T) / (1 << 30));
    const std::string what = std::string("cannot allocate ") +
                             (too_big ? "more bytes than an address space holds" : gib) +
                             " for an array of shape " + shape_str(shape) +
                             (sizeof(T) == 4 ? " float32" : " float64");
    PyErr_SetString(PyExc_MemoryError, what.c_str());
    throw py::error_already_set();
  }
  py::capsule owner(mem, [](void* p) { fusedrnn::aligned_free_bytes(p); });
  return Arr<T>(shape, static_cast<T*>(mem), owner);
}

// dtype equality as numpy's ==: a dtype unpickled (a pickled layer's parameters) is an equal
// dtype but not the same object, which `is` took for another dtype ("must have dtype float32,
// got float32").
bool same_dtype(const py::dtype& a, const py::dtype& b) {
  const int eq = PyObject_RichCompareBool(a.ptr(), b.ptr(), Py_EQ);
  if (eq < 0) throw py::error_already_set();
  return eq == 1;
}

// Every float argument must already have x's dtype: we never cast silently.
void require_dtype(const char* name, const py::object& o, const py::dtype& want) {
  if (o.is_none()) return;
  if (!py::isinstance<py::array>(o)) throw py::type_error(std::string(name) + " must be a numpy array");
  py::dtype got = o.cast<py::array>().dtype();
  if (!same_dtype(got, want))
    throw py::type_error(std::string(name) + " must have dtype " + std::string(py::str(py::handle(want))) + ", got " +
                         std::string(py::str(got)));
}

// A frozen call's weights (forward's `frozen`) are their own memory, unchanged while the id lives:
// read-only arrays, already C-contiguous and of x's dtype (the cast to Arr<T> of any other array
// is a new, writable copy, so it fails here too).
template <typename T>
void require_frozen(const char* name, const std::optional<Arr<T>>& a) {
  if (a && a->writeable())
    fail(std::string(name) + " must be a read-only C-contiguous array when frozen is given (a "
         "frozen layer's own parameters)");
}

bool is_f64(const py::array& x) {
  if (same_dtype(x.dtype(), py::dtype::of<double>())) return true;
  if (same_dtype(x.dtype(), py::dtype::of<float>())) return false;
  throw py::type_error("x must be float32 or float64, got " + std::string(py::str(x.dtype())));
}

template <typename T>
Arr<T> own_copy(const Arr<T>& a) {
  Arr<T> copy(std::vector<int64_t>(a.shape(), a.shape() + a.ndim()));
  std::memcpy(copy.mutable_data(), a.data(), sizeof(T) * a.size());
  return copy;
}

// Whether any of v[0, n) is a NaN or an infinity: an exponent of all ones, tested on the bits
// (a loop the compiler vectorises).
template <typename T>
bool any_not_finite(const T* v, int64_t n) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  const Bits exponent = sizeof(T) == 4 ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
  Bits all_ones = 0;
  for (int64_t i = 0; i < n; ++i) {
    Bits bits;
    std::memcpy(&bits, v + i, sizeof bits);
    all_ones |= Bits((bits & exponent) == exponent);
  }
  return all_ones != 0;
}

// Whether a (steps, B, n) holds a NaN or an infinity at a step past its row's length.
template <typename T>
bool padding_not_finite(const T* a, int64_t steps, int64_t B, int64_t n,
                        const int64_t* lengths) {
  bool found = false;
  for (int64_t k = 0; k < steps && !found; ++k)
    for (int64_t b = 0; b < B; ++b)
      if (k >= lengths[b]) found |= any_not_finite(a + (k * B + b) * n, n);
  return found;
}

// Zeros the steps of a (steps, B, n) past each row's length.
template <typename T>
void zero_padding(T* a, int64_t steps, int64_t B, int64_t n, const int64_t* lengths) {
  for (int64_t k = 0; k < steps; ++k)
    for (int64_t b = 0; b < B; ++b)
      if (k >= lengths[b]) std::fill_n(a + (k * B + b) * n, n, T(0));
}

// A copy of a (rows, B, n) whose steps past each row's length, before `steps`, are zeros.
template <typename T>
Arr<T> padding_zeroed(const T* a, int64_t rows, int64_t steps, int64_t B, int64_t n,
                      const int64_t* lengths) {
  Arr<T> clean = empty<T>({rows, B, n});
  std::memcpy(clean.mutable_data(), a, sizeof(T) * rows * B * n);
  zero_padding(clean.mutable_data(), steps, B, n, lengths);
  return clean;
}

// One layer call's arguments checked, its outputs (and, training, its saved buffers) allocated:
// the kernels' ForwardArgs and what python gets back.
template <typename T>
struct LayerCall {
  fusedrnn::ForwardArgs<T> a{};
  Arr<T> y, hn;
  std::optional<Arr<T>> cn;
  std::optional<Arr<int64_t>> lengths;  // the kernels' copy, alive for the call
  std::optional<Arr<T>> x_clean;        // x with its padding zeroed, where the call needs it
  Context c{};
  bool training = false;

  py::tuple result() {
    py::object ctx = training ? py::cast(std::move(c)) : py::none();
    return py::make_tuple(y, hn, cn ? py::object(*cn) : py::none(), ctx);
  }
};

template <typename T>
LayerCall<T> prepare_forward(const KernelTable& kt, int cell_code, bool lbr, bool reverse,
                             bool training, Arr<T> x, Arr<T> h0, std::optional<Arr<T>> c0,
                             Arr<T> w_ih, Arr<T> w_hh, std::optional<Arr<T>> b_ih,
                             std::optional<Arr<T>> b_hh, std::optional<Arr<T>> w_hr,
                             std::optional<Arr<int64_t>> lengths, uint64_t frozen,
                             bool pack_x) {
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
  if (b_ih.has_value() != b_hh.has_value()) fail("bias_ih and bias_hh are given together or not at all");
  if (b_ih) { check_shape("bias_ih", *b_ih, {G * s.H}); check_shape("bias_hh", *b_hh, {G * s.H}); }
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
        fail("lengths must lie in 1.." + std::to_string(s.T) + ", got " + std::to_string(lengths->data()[b]));
  }
  if (s.T < 1) fail("x must have at least one time step");
  if (frozen) {
    require_frozen<T>("w_ih", w_ih); require_frozen<T>("w_hh", w_hh);
    require_frozen<T>("b_ih", b_ih); require_frozen<T>("b_hh", b_hh); require_frozen<T>("w_hr", w_hr);
  }

  LayerCall<T> call;
  call.training = training;
  call.lengths = lengths;
  if (training && lengths && padding_not_finite(x.data(), s.T, s.B, s.I, lengths->data())) {
    // Steps past a row's length enter nothing but dW_ih = dG^T X, where dG is 0 and 0 * NaN is
    // NaN: the kernels take x with them zeroed (torch's PackedSequence never holds them).
    x = padding_zeroed(x.data(), s.T, s.T, s.B, s.I, lengths->data());
    call.x_clean = x;
    pack_x = true;  // (the context keeps this copy, not the caller's x)
  }
  call.y = empty<T>({s.T, s.B, s.Hout});
  call.hn = empty<T>({s.B, s.Hout});
  if (cell == Cell::Lstm) call.cn.emplace(std::vector<int64_t>{s.B, s.H});
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
  if (training) {
    Context& c = call.c;
    c.frozen = frozen;
    const bool gru = cell == Cell::Gru;
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
    if (cell == Cell::Lstm) c.c = empty<T>({s.T + 1, s.B, s.H});
    if (s.has_proj) c.hfull = empty<T>({s.T, s.B, s.H});
    if (gru) c.extra = empty<T>({s.T, s.B, s.H});
    auto mut = [](py::object& o) -> T* { return o ? static_cast<T*>(o.cast<py::array>().mutable_data()) : nullptr; };
    a.saved = {mut(c.gates), mut(c.h), mut(c.c), mut(c.hfull), mut(c.extra)};
  }
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
                       uint64_t frozen, bool keep_x, const py::object& onnx) {
  LayerCall<T> call = prepare_forward<T>(kt, cell_code, lbr, reverse, training, x, h0, c0, w_ih,
                                         w_hh, b_ih, b_hh, w_hr, lengths, frozen, !keep_x);
  OnnxOptions<T> options;
  call.a.onnx = options.parse(onnx, call.a.s, training);
  {
    WithoutGil nogil;
    if constexpr (sizeof(T) == 4) kt.forward_f32(call.a); else kt.forward_f64(call.a);
  }
  return call.result();
}

// A unidirectional stack: layer k's input is layer k - 1's output (allocated here), so the
// kernels may run the layers side by side (sequence/layer_pipeline.h). Per layer lists of the
// states and weights (None where forward takes None); returns a list of forward's tuples.
template <typename T>
py::list forward_stack_impl(const KernelTable& kt, int cell_code, bool lbr, bool training,
                            Arr<T> x, const py::list& h0, const py::list& c0,
                            const py::list& w_ih, const py::list& w_hh, const py::list& b_ih,
                            const py::list& b_hh, const py::list& w_hr, uint64_t frozen,
                            bool keep_x) {
  const size_t n = w_hh.size();
  if (n == 0) fail("a stack needs at least one layer");
  for (const py::list* l : {&h0, &c0, &w_ih, &b_ih, &b_hh, &w_hr})
    if (l->size() != n) fail("every per-layer list of a stack needs " + std::to_string(n) + " entries");
  const py::dtype dt = x.dtype();
  auto opt = [&](py::handle o, const char* name) {
    require_dtype(name, py::reinterpret_borrow<py::object>(o), dt);
    return o.is_none() ? std::optional<Arr<T>>() : std::optional<Arr<T>>(o.cast<Arr<T>>());
  };
  auto req = [&](py::handle o, const char* name) {
    require_dtype(name, py::reinterpret_borrow<py::object>(o), dt);
    if (o.is_none()) fail(std::string(name) + " must be an array, got None");
    return o.cast<Arr<T>>();
  };
  std::vector<LayerCall<T>> calls;
  calls.reserve(n);
  Arr<T> layer_in = x;
  for (size_t k = 0; k < n; ++k) {
    calls.push_back(prepare_forward<T>(kt, cell_code, lbr, false, training, layer_in,
                                       req(h0[k], "h0"), opt(c0[k], "c0"), req(w_ih[k], "w_ih"),
                                       req(w_hh[k], "w_hh"), opt(b_ih[k], "b_ih"),
                                       opt(b_hh[k], "b_hh"), opt(w_hr[k], "w_hr"), std::nullopt,
                                       frozen, k == 0 && !keep_x));
    layer_in = calls.back().y;
  }
  std::vector<fusedrnn::ForwardArgs<T>> args;
  for (const LayerCall<T>& call : calls) args.push_back(call.a);
  {
    WithoutGil nogil;
    if constexpr (sizeof(T) == 4) kt.forward_stack_f32(args.data(), int(n));
    else kt.forward_stack_f64(args.data(), int(n));
  }
  py::list out;
  for (LayerCall<T>& call : calls) out.append(call.result());
  return out;
}

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

template <typename T>
py::tuple backward_impl(Context& c, Arr<T> dy, std::optional<Arr<T>> dhn, std::optional<Arr<T>> dcn,
                        bool consume, py::object grads_into, bool add_into, const BackwardWeights& w) {
  if (c.consumed)
    throw std::runtime_error("backward already ran on this context with consume=True, which "
                             "reuses its saved state: run the forward again");
  const LayerShape& s = c.s;
  const int64_t G = fusedrnn::gate_count(s.cell);
  check_shape("dy", dy, {s.T, s.B, s.Hout});
  if (dhn) check_shape("dhn", *dhn, {s.B, s.Hout});
  if (dcn) {
    if (s.cell != Cell::Lstm) fail("dcn is only for LSTM");
    check_shape("dcn", *dcn, {s.B, s.H});
  }
  Arr<T> dx = empty<T>({s.T, s.B, s.I}), dh0 = empty<T>({s.B, s.Hout});
  std::optional<Arr<T>> dc0, db_ih, db_hh, dw_hr;
  if (s.cell == Cell::Lstm) dc0.emplace(std::vector<int64_t>{s.B, s.H});
  // The weight and bias gradients: new arrays, or the caller's, added into or written over.
  const bool given = !grads_into.is_none();
  const bool accumulate = given && add_into;
  py::dict into = given ? grads_into.cast<py::dict>() : py::dict();
  auto gradient = [&](const char* key, std::vector<int64_t> shape) {
    return given ? gradient_in_place<T>(into, key, shape) : empty<T>(shape);
  };
  Arr<T> dw_ih = gradient("weight_ih", {G * s.H, s.I}), dw_hh = gradient("weight_hh", {G * s.H, s.Hout});
  if (c.has_bias) { db_ih.emplace(gradient("bias_ih", {G * s.H})); db_hh.emplace(gradient("bias_hh", {G * s.H})); }
  if (s.has_proj) dw_hr.emplace(gradient("weight_hr", {s.Hout, s.H}));
  if (given) {
    std::vector<py::object> outs{dw_ih, dw_hh}, reads{c.x, w.w_ih, w.w_hh, w.w_hr, dy};
    for (auto* o : {&db_ih, &db_hh, &dw_hr})
      if (*o) outs.push_back(**o);
    if (dhn) reads.push_back(*dhn);
    if (dcn) reads.push_back(*dcn);
    require_gradients_apart(outs, reads);
  }
  auto ptr = [](const py::object& o) -> T* {
    return o ? static_cast<T*>(const_cast<void*>(o.cast<py::array>().data())) : nullptr;
  };
  auto mptr = [](std::optional<Arr<T>>& o) -> T* { return o ? o->mutable_data() : nullptr; };
  fusedrnn::BackwardArgs<T> a{};
  a.s = s;
  a.dx = dx.mutable_data(); a.dh0 = dh0.mutable_data(); a.dc0 = mptr(dc0);
  a.dw_ih = dw_ih.mutable_data(); a.dw_hh = dw_hh.mutable_data();
  a.db_ih = mptr(db_ih); a.db_hh = mptr(db_hh); a.dw_hr = mptr(dw_hr);
  a.dy = dy.data(); a.dhn = opt_ptr(dhn); a.dcn = opt_ptr(dcn);
  a.x = ptr(c.x); a.x_packed = ptr(c.x_packed); a.w_ih = ptr(w.w_ih); a.w_hh = ptr(w.w_hh); a.w_hr = ptr(w.w_hr);
  a.lengths = c.lengths ? static_cast<const int64_t*>(c.lengths.cast<py::array>().data()) : nullptr;
  a.saved = {ptr(c.gates), ptr(c.h), ptr(c.c), ptr(c.hfull), ptr(c.extra)};
  // A finished row carries its last state through the steps past its length, where dW_hh =
  // dG^T H_prev multiplies it by a dG of 0: a state not finite there (a relu RNN's overflow)
  // would make dW_hh NaN where torch's sum has no such terms. The product then reads a copy
  // with those rows zeroed (step k's h_prev is saved row k: rows lengths[b] .. T - 1).
  std::optional<Arr<T>> h_prev_clean;
  if (a.lengths && padding_not_finite(a.saved.h, s.T, s.B, s.Hout, a.lengths)) {
    h_prev_clean = padding_zeroed(a.saved.h, s.T + 1, s.T, s.B, s.Hout, a.lengths);
    a.h_prev_products = h_prev_clean->data();
  }
  a.num_threads = threads_for_call();
  a.frozen = w.given ? 0 : c.frozen;
  a.accumulate = accumulate;
  // Overwrite the gates only while no other backward (another thread's) reads them.
  a.gates_consumed = consume && c.running == 0;
  c.consumed = consume;  // before the GIL goes: a later backward sees it
  struct Running {  // decremented with the GIL held again, also when the kernel throws
    int& n;
    explicit Running(int& count) : n(count) { ++n; }
    ~Running() { --n; }
  } running(c.running);
  {
    WithoutGil nogil;
    if constexpr (sizeof(T) == 4) c.table->backward_f32(a); else c.table->backward_f64(a);
  }
  // dx past a row's length is dG W_ih with a dG of 0: zeros, unless W_ih holds an infinity or
  // a NaN (0 * inf); torch's PackedSequence gives zeros there.
  if (a.lengths) zero_padding(dx.mutable_data(), s.T, s.B, s.I, a.lengths);
  py::dict grads;
  grads["weight_ih"] = dw_ih;
  grads["weight_hh"] = dw_hh;
  if (db_ih) { grads["bias_ih"] = *db_ih; grads["bias_hh"] = *db_hh; }
  if (dw_hr) grads["weight_hr"] = *dw_hr;
  return py::make_tuple(dx, dh0, dc0 ? py::object(*dc0) : py::none(), grads);
}

template <typename T>
py::array math_impl(const KernelTable& kt, int func, Arr<T> x) {
  Arr<T> y(std::vector<int64_t>(x.shape(), x.shape() + x.ndim()));
  {
    WithoutGil nogil;
    if constexpr (sizeof(T) == 4) kt.math_f32(func, x.data(), y.mutable_data(), x.size());
    else kt.math_f64(func, x.data(), y.mutable_data(), x.size());
  }
  return y;
}

template <typename T>
py::array gemm_impl(const KernelTable& kt, py::array_t<T, py::array::forcecast | kAligned> A,
                    py::array_t<T, py::array::forcecast | kAligned> B) {
  if (A.ndim() != 2 || B.ndim() != 2 || A.shape(1) != B.shape(0)) fail("gemm needs A (M, K) and B (K, N)");
  const int64_t M = A.shape(0), K = A.shape(1), N = B.shape(1);
  Arr<T> C({M, N});
  const int64_t s = sizeof(T);
  {
    WithoutGil nogil;
    if constexpr (sizeof(T) == 4)
      kt.gemm_f32(M, N, K, A.data(), A.strides(0) / s, A.strides(1) / s, B.data(), B.strides(0) / s,
                  B.strides(1) / s, C.mutable_data(), N, false, threads_for_call());
    else
      kt.gemm_f64(M, N, K, A.data(), A.strides(0) / s, A.strides(1) / s, B.data(), B.strides(0) / s,
                  B.strides(1) / s, C.mutable_data(), N, false, threads_for_call());
  }
  return C;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* isa : {"generic", "avx2", "avx512", "amx"})
    if (fusedrnn::kernels_for(isa)) out.push_back(isa);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedrnn kernels (private; use fusedrnn.functional or the layers)";
  m.attr("__version__") = FUSEDRNN_VERSION;
  fusedrnn::active_kernels();  // fail at import on a bad FUSEDRNN_ISA, not in the first call
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
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("num_threads must be >= 1, got " + std::to_string(n));
    if (n > kMaxThreads)
      throw py::value_error("num_threads must be <= " + std::to_string(kMaxThreads) + ", got " +
                            std::to_string(n));
    g_num_threads.store(n);
  });
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
  // Riding or one GEMM for a single row on one thread (csrc/ride_policy.cpp): calls by way, and
  // a way for tests to impose ("measured", "whole", "ride"); setting it forgets every trial.
  m.def("ride_calls", [] {
    return counts({{"ride", fusedrnn::ride_policy_calls(true)},
                   {"whole", fusedrnn::ride_policy_calls(false)}});
  }, "single-row forwards on one thread that could ride, by the way they ran, since import");
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

  py::class_<Context>(m, "Context", "What a training forward keeps for backward (opaque).")
      .def_property_readonly("saved_bytes", [](const Context& c) {
        size_t n = 0;
        for (const py::object* a : {&c.gates, &c.h, &c.c, &c.hfull, &c.extra})
          if (*a) n += a->cast<py::array>().nbytes();
        return n;
      })
      .def_property_readonly("x_bytes", [](const Context& c) {  // its copy of x, packed or not
        const py::object& x = c.x_packed ? c.x_packed : c.x;
        return x ? x.cast<py::array>().nbytes() : 0;
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

  m.def("math", [](int func, py::array x, std::optional<std::string> isa) -> py::array {
    if (func < 0 || func > 2) fail("func must be 0 (exp), 1 (tanh) or 2 (sigmoid)");
    const KernelTable& kt = kernels(isa);
    return is_f64(x) ? math_impl<double>(kt, func, x) : math_impl<float>(kt, func, x);
  }, py::arg("func"), py::arg("x"), py::arg("isa") = py::none());

  m.def("step_split", [](int cell, int64_t B, int64_t I, int64_t H, int64_t Hout, bool f64,
                         int threads, std::optional<std::string> isa, bool backward) {
    static const char* names[] = {"one", "rows", "units", "team", "halves"};
    if (cell < 0 || cell > 3) fail("cell must be 0..3 (rnn_tanh, rnn_relu, lstm, gru)");
    if (B < 1 || I < 0 || H < 1 || Hout < 1) fail("B, H and Hout must be >= 1 and I >= 0");
    return std::string(
        names[kernels(isa).step_split(cell, f64, B, I, H, Hout, threads, backward)]);
  }, py::arg("cell"), py::arg("B"), py::arg("I"), py::arg("H"), py::arg("Hout"),
     py::arg("f64") = false,
     py::arg("threads") = 2, py::arg("isa") = py::none(), py::arg("backward") = false,
     "how the forward spreads one step over threads: 'one', 'rows' or 'units'; with "
     "backward=True, how the backward's time loop does without lengths: 'one', 'team', or "
     "'halves' (a single row's units in two halves, alone or on a team of two)");

  m.def("projection_mode", [](int cell, int64_t B, int64_t I, int64_t H, int64_t Hout,
                              bool f64, bool lengths, std::optional<std::string> isa) {
    if (cell < 0 || cell > 3) fail("cell must be 0..3 (rnn_tanh, rnn_relu, lstm, gru)");
    static const char* const modes[] = {"whole", "in_step", "rides"};
    return std::string(modes[kernels(isa).projection_mode(cell, f64, B, I, H, Hout, lengths)]);
  }, py::arg("cell"), py::arg("B"), py::arg("I"), py::arg("H"), py::arg("Hout"),
     py::arg("f64") = false, py::arg("lengths") = false, py::arg("isa") = py::none(),
     "how the forward computes x_t W_ih^T: 'whole' (one GEMM over the sequence before the time "
     "loop), 'in_step' (inside each step's tiles) or 'rides' (a chunk of the next steps' rows "
     "in each step of a single LSTM or GRU row, on one thread, or one GEMM if the shape's first "
     "calls measured that faster: csrc/ride_policy.cpp; a step team makes it 'whole')");

  m.def("cache_bytes", []() {
    return counts({{"l2", kernels(std::nullopt).cache_bytes(2)},
                   {"l3", kernels(std::nullopt).cache_bytes(3)}});
  }, "the cache sizes the kernels plan for: one core's L2 and the shared L3, in bytes");

  m.def("empty_cache", [] {
    fusedrnn::packed_cache_clear();
    fusedrnn::free_idle_blocks();
  }, "frees the calling thread's packed weights and the idle blocks kept for reuse");
  m.def("packed_cache", [](bool clear) {
    if (clear) fusedrnn::packed_cache_clear();
    size_t forms = 0, copies = 0, bytes = 0;
    fusedrnn::packed_cache_stats(&forms, &copies, &bytes);
    return counts({{"forms", int64_t(forms)}, {"copies", int64_t(copies)}, {"bytes", int64_t(bytes)}});
  }, py::arg("clear") = false,
     "the calling thread's packed-weight cache: packed forms, copies of weights' bytes (one per "
     "weight that unfrozen inference calls met, shared by its forms), and the bytes of both; "
     "clear=True empties it first");

  m.def("gemm", [](py::array A, py::array B, std::optional<std::string> isa) -> py::array {
    const KernelTable& kt = kernels(isa);
    return is_f64(A) ? gemm_impl<double>(kt, A, B) : gemm_impl<float>(kt, A, B);
  }, py::arg("A"), py::arg("B"), py::arg("isa") = py::none(), "C = A @ B with our packed GEMM");

  m.def("forward", [](int cell, bool lbr, bool reverse, bool training, py::array x, py::array h0,
                      py::object c0, py::array w_ih, py::array w_hh, py::object b_ih, py::object b_hh,
                      py::object w_hr, py::object lengths, std::optional<std::string> isa,
                      uint64_t frozen, bool keep_x, py::object onnx) -> py::tuple {
    const KernelTable& kt = kernels(isa);
    auto opt = [](py::object o, auto tag) {
      using A = decltype(tag);
      return o.is_none() ? std::optional<A>() : std::optional<A>(o.cast<A>());
    };
    const py::dtype dt = x.dtype();
    require_dtype("h0", h0, dt); require_dtype("c0", c0, dt); require_dtype("w_ih", w_ih, dt);
    require_dtype("w_hh", w_hh, dt); require_dtype("b_ih", b_ih, dt); require_dtype("b_hh", b_hh, dt);
    require_dtype("w_hr", w_hr, dt); require_dtype("lengths", lengths, py::dtype::of<int64_t>());
    std::optional<Arr<int64_t>> len = opt(lengths, Arr<int64_t>());
    if (is_f64(x))
      return forward_impl<double>(kt, cell, lbr, reverse, training, x, h0, opt(c0, Arr<double>()), w_ih, w_hh,
                                  opt(b_ih, Arr<double>()), opt(b_hh, Arr<double>()), opt(w_hr, Arr<double>()), len,
                                  frozen, keep_x, onnx);
    return forward_impl<float>(kt, cell, lbr, reverse, training, x, h0, opt(c0, Arr<float>()), w_ih, w_hh,
                               opt(b_ih, Arr<float>()), opt(b_hh, Arr<float>()), opt(w_hr, Arr<float>()), len,
                               frozen, keep_x, onnx);
  }, py::arg("cell"), py::arg("linear_before_reset"), py::arg("reverse"), py::arg("training"), py::arg("x"),
     py::arg("h0"), py::arg("c0"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"),
     py::arg("w_hr"), py::arg("lengths"), py::arg("isa") = py::none(), py::arg("frozen") = 0,
     py::arg("keep_x") = false, py::arg("onnx") = py::none(),
     "frozen: 0, or an id under which every weight array holds the same bytes, in the same "
     "memory, in every call that passes it (a layer's freeze()); the kernels then reuse their "
     "packed weights without comparing the arrays with their copies. keep_x: a training "
     "context keeps x itself, which must not change before backward; else it keeps x packed "
     "as the backward reads it (a copy of its own). onnx: None, or ONNX's cell options "
     "(fusedrnn.onnx_ops) as (((code, alpha, beta) for f, g, h), clip, input_forget, "
     "peepholes (3, H) i, f, o or None); inference only");

  m.def("forward_stack", [](int cell, bool lbr, bool training, py::array x, py::list h0,
                            py::list c0, py::list w_ih, py::list w_hh, py::list b_ih,
                            py::list b_hh, py::list w_hr, std::optional<std::string> isa,
                            uint64_t frozen, bool keep_x) -> py::list {
    const KernelTable& kt = kernels(isa);
    if (is_f64(x))
      return forward_stack_impl<double>(kt, cell, lbr, training, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, frozen, keep_x);
    return forward_stack_impl<float>(kt, cell, lbr, training, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, frozen, keep_x);
  }, py::arg("cell"), py::arg("linear_before_reset"), py::arg("training"), py::arg("x"),
     py::arg("h0"), py::arg("c0"), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"),
     py::arg("b_hh"), py::arg("w_hr"), py::arg("isa") = py::none(), py::arg("frozen") = 0,
     py::arg("keep_x") = false,
     "a unidirectional stack without lengths, bottom layer first: per layer lists of forward's "
     "states and weights; returns the list of forward's (y, hn, cn, ctx) per layer (keep_x: "
     "as forward's, for x; each layer above keeps its input, the output below, itself)");
  m.def("calls_without_gil", [] { return g_calls_without_gil.load(std::memory_order_relaxed); },
        "tests: kernel calls running now with the GIL released (by any thread)");
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

  m.def("backward", [](Context& c, py::array dy, py::object dhn, py::object dcn, bool consume,
                       py::object grads_into, bool add_into, py::object weights) -> py::tuple {
    auto opt = [](py::object o, auto tag) {
      using A = decltype(tag);
      return o.is_none() ? std::optional<A>() : std::optional<A>(o.cast<A>());
    };
    const py::dtype dt = c.f64 ? py::dtype::of<double>() : py::dtype::of<float>();
    require_dtype("dy", dy, dt); require_dtype("dhn", dhn, dt); require_dtype("dcn", dcn, dt);
    if (!grads_into.is_none() && !py::isinstance<py::dict>(grads_into))
      throw py::type_error("grads_into must be a dict of gradient arrays or None");
    const BackwardWeights w = backward_weights(c, weights, dt);
    if (c.f64)
      return backward_impl<double>(c, dy, opt(dhn, Arr<double>()), opt(dcn, Arr<double>()), consume, grads_into, add_into, w);
    return backward_impl<float>(c, dy, opt(dhn, Arr<float>()), opt(dcn, Arr<float>()), consume, grads_into, add_into, w);
  }, py::arg("ctx"), py::arg("dy"), py::arg("dhn") = py::none(), py::arg("dcn") = py::none(),
     py::arg("consume") = false, py::arg("grads_into") = py::none(), py::arg("add_into") = true,
     py::arg("weights") = py::none(),
     "BPTT through a training forward's context; consume=True: the caller will not run backward "
     "on it again (a second one raises), so its saved gates may hold the gradients. grads_into: "
     "None, or a dict with the gradients' keys whose arrays (writeable, C-contiguous, of the "
     "layer's dtype and the gradients' shapes) the weight and bias gradients are added into "
     "(add_into=False: written over, whatever they held); the returned grads are then those "
     "arrays. weights: None (the forward's), or (w_ih, w_hh, w_hr or None) with the forward's "
     "values, shapes and dtype, read instead of the memory the forward read");
}
