// Arrays between NumPy and the kernels: Arr<T> (C-contiguous, aligned), the shape and dtype
// checks with their error messages, new arrays from the kernels' block cache, and the scans and
// copies of the steps past a row's length. Shared by every file of the bindings.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // (every unit sees the same casters of std::optional, vector, tuple)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernel_api.h"

namespace fusedrnn::bindings {

namespace py = pybind11;

// C-contiguous and aligned to T: NumPy copies an array that is not (an unaligned one comes from
// np.frombuffer at an odd offset, or a packed record's field), since the kernels' loads and
// stores of T assume its alignment (an unaligned T* is undefined behaviour; UBSan).
constexpr int kAligned = py::detail::npy_api::NPY_ARRAY_ALIGNED_;
template <typename T>
using Arr = py::array_t<T, py::array::c_style | kAligned>;

[[noreturn]] inline void fail(const std::string& what) { throw py::value_error(what); }

// {name: count} for the kernels' counters the tests read.
inline py::dict counts(std::initializer_list<std::pair<const char*, int64_t>> named) {
  py::dict d;
  for (const auto& [name, n] : named) d[name] = n;
  return d;
}

inline std::string shape_str(const std::vector<int64_t>& s) {
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

// An optional argument's array (None: empty), after require_dtype has checked its dtype.
template <typename A>
std::optional<A> optional_cast(const py::object& o) {
  return o.is_none() ? std::optional<A>() : std::optional<A>(o.cast<A>());
}

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
inline bool same_dtype(const py::dtype& a, const py::dtype& b) {
  const int eq = PyObject_RichCompareBool(a.ptr(), b.ptr(), Py_EQ);
  if (eq < 0) throw py::error_already_set();
  return eq == 1;
}

// Every float argument must already have x's dtype: we never cast silently.
inline void require_dtype(const char* name, const py::object& o, const py::dtype& want) {
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

inline bool is_f64(const py::array& x) {
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

// Whether row_holds(row) for a row of a (steps, B, n) at a step past its row's length. Rows of
// no values hold nothing: an x of I = 0 takes no memory whatever its steps, and the walk of its
// 2^61 empty rows hung the call before its y could be refused.
template <typename T, typename RowTest>
bool any_padding_row(const T* a, int64_t steps, int64_t B, int64_t n, const int64_t* lengths,
                     RowTest row_holds) {
  if (n == 0) return false;
  for (int64_t k = 0; k < steps; ++k)
    for (int64_t b = 0; b < B; ++b)
      if (k >= lengths[b] && row_holds(a + (k * B + b) * n)) return true;
  return false;
}

// Whether a (steps, B, n) holds a NaN or an infinity at a step past its row's length.
template <typename T>
bool padding_not_finite(const T* a, int64_t steps, int64_t B, int64_t n,
                        const int64_t* lengths) {
  return any_padding_row(a, steps, B, n, lengths, [n](const T* row) { return any_not_finite(row, n); });
}

// Whether a (steps, B, n) holds, at a step past its row's length, a value the kernels are not
// to meet: a NaN or an infinity (0 * NaN is NaN in dW_ih = dG^T X, where dG is 0 there), or one
// the AMX tiles cannot split (kAmxSplitMax, kAmxSplitMin): a scan of x for the tiles would send
// the whole call to the FMA kernels, and what lies in the padding would change the other rows'
// bits (T = 16, B = 64 GRU: 4.6e-7).
template <typename T>
bool padding_to_clear(const T* a, int64_t steps, int64_t B, int64_t n, const int64_t* lengths) {
  return any_padding_row(a, steps, B, n, lengths, [n](const T* row) {
    bool found = false;
    for (int64_t i = 0; i < n; ++i) {
      const T m = std::abs(row[i]);
      found |= !(m <= T(kAmxSplitMax)) | ((m != T(0)) & (m < T(kAmxSplitMin)));  // (no branches)
    }
    return found;
  });
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

}  // namespace fusedrnn::bindings
