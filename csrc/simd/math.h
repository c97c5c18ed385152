// Vector exp / tanh / sigmoid on Vec<T>.
// PLACEHOLDER: lane-by-lane libm calls (correctly rounded to < 1 ulp, slow). Replaced by
// polynomial SIMD versions with measured error bounds.
#pragma once
#include <cmath>
#include "simd/vec.h"

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

template <typename T, typename F>
inline Vec<T> map_lanes(Vec<T> x, F f) {
  alignas(64) T buf[Vec<T>::W];
  x.store(buf);
  for (int i = 0; i < Vec<T>::W; ++i) buf[i] = f(buf[i]);
  return Vec<T>::load(buf);
}

template <typename T> inline Vec<T> vexp(Vec<T> x) { return map_lanes(x, [](T a) { return std::exp(a); }); }
template <typename T> inline Vec<T> vtanh(Vec<T> x) { return map_lanes(x, [](T a) { return std::tanh(a); }); }
template <typename T> inline Vec<T> vsigmoid(Vec<T> x) {
  return map_lanes(x, [](T a) { return T(1) / (T(1) + std::exp(-a)); });
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
