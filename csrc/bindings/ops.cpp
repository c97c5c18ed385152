// The kernels' building blocks called alone, for the tests and fusedrnn.bench: the vector
// exp/tanh/sigmoid and the packed GEMM.
#include "bindings/calls.h"
#include "bindings/runtime.h"

namespace fusedrnn::bindings {
namespace {

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

}  // namespace

py::array math(int func, py::array x, std::optional<std::string> isa) {
  if (func < 0 || func > 2) fail("func must be 0 (exp), 1 (tanh) or 2 (sigmoid)");
  const KernelTable& kt = kernels(isa);
  return is_f64(x) ? math_impl<double>(kt, func, x) : math_impl<float>(kt, func, x);
}

py::array gemm(py::array A, py::array B, std::optional<std::string> isa) {
  const KernelTable& kt = kernels(isa);
  // (is_f64's own error names x, an argument gemm does not have)
  if (!same_dtype(A.dtype(), py::dtype::of<float>()) && !same_dtype(A.dtype(), py::dtype::of<double>()))
    throw py::type_error("gemm needs A of float32 or float64, got " + std::string(py::str(A.dtype())));
  // (B would be cast to A's dtype: a complex B lost its imaginary part, a float64 B its digits)
  if (!same_dtype(A.dtype(), B.dtype()))
    throw py::type_error("gemm needs B of A's dtype, " + std::string(py::str(A.dtype())) + ", got " +
                         std::string(py::str(B.dtype())));
  return is_f64(A) ? gemm_impl<double>(kt, A, B) : gemm_impl<float>(kt, A, B);
}

}  // namespace fusedrnn::bindings
