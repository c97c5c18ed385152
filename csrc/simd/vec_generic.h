// Vec<T> portable fallback: a small fixed-width array the compiler may vectorise with baseline
// SSE2. No FMA instruction is assumed: fma() is a multiply and an add, rounded twice.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {

constexpr const char* kIsaName = "generic";

template <typename T>
struct Vec {
  static constexpr int W = 16 / sizeof(T);  // one SSE register's worth
  struct Mask { bool m[W]; };
  T v[W];
#define FUSEDRNN_LANES(expr) Vec r; for (int i = 0; i < W; ++i) r.v[i] = (expr); return r
  static Vec load(const T* p) { Vec r; std::memcpy(r.v, p, sizeof(r.v)); return r; }
  void store(T* p) const { std::memcpy(p, v, sizeof(v)); }
  // The first n < W lanes (the rest zero / untouched).
  static Vec load_first(const T* p, int n) { Vec r = zero(); for (int i = 0; i < n; ++i) r.v[i] = p[i]; return r; }
  void store_first(T* p, int n) const { for (int i = 0; i < n; ++i) p[i] = v[i]; }
  static Vec set1(T x) { FUSEDRNN_LANES(x); }
  static Vec zero() { FUSEDRNN_LANES(T(0)); }
  static Vec add(Vec a, Vec b) { FUSEDRNN_LANES(a.v[i] + b.v[i]); }
  static Vec sub(Vec a, Vec b) { FUSEDRNN_LANES(a.v[i] - b.v[i]); }
  static Vec mul(Vec a, Vec b) { FUSEDRNN_LANES(a.v[i] * b.v[i]); }
  static Vec div(Vec a, Vec b) { FUSEDRNN_LANES(a.v[i] / b.v[i]); }
  static Vec fma(Vec a, Vec b, Vec c) { FUSEDRNN_LANES(a.v[i] * b.v[i] + c.v[i]); }
  static Vec fnma(Vec a, Vec b, Vec c) { FUSEDRNN_LANES(c.v[i] - a.v[i] * b.v[i]); }
  // Same NaN rule as x86 max/min: the second operand wins when either is NaN.
  static Vec max(Vec a, Vec b) { FUSEDRNN_LANES(a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
  static Vec min(Vec a, Vec b) { FUSEDRNN_LANES(a.v[i] < b.v[i] ? a.v[i] : b.v[i]); }
  static Vec abs(Vec a) { FUSEDRNN_LANES(std::fabs(a.v[i])); }
  static Vec neg(Vec a) { FUSEDRNN_LANES(-a.v[i]); }
  static Vec copysign(Vec a, Vec s) { FUSEDRNN_LANES(std::copysign(a.v[i], s.v[i])); }
  static Vec round(Vec a) { FUSEDRNN_LANES(std::nearbyint(a.v[i])); }
  static Vec pow2i(Vec n) {
    Vec r;
    // NaN (which the math functions let through) must not reach the int conversion: that is UB.
    for (int i = 0; i < W; ++i) r.v[i] = n.v[i] == n.v[i] ? std::ldexp(T(1), static_cast<int>(n.v[i])) : n.v[i];
    return r;
  }
  static Vec select(Mask m, Vec t, Vec f) { FUSEDRNN_LANES(m.m[i] ? t.v[i] : f.v[i]); }
#undef FUSEDRNN_LANES
  static Mask lt(Vec a, Vec b) { Mask m; for (int i = 0; i < W; ++i) m.m[i] = a.v[i] < b.v[i]; return m; }
  static Mask le(Vec a, Vec b) { Mask m; for (int i = 0; i < W; ++i) m.m[i] = a.v[i] <= b.v[i]; return m; }
  static Mask gt(Vec a, Vec b) { Mask m; for (int i = 0; i < W; ++i) m.m[i] = a.v[i] > b.v[i]; return m; }
};

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
