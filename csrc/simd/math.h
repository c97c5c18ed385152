// Vector exp / tanh / sigmoid on Vec<T>, written once for every ISA (float and double).
//
// Error rule (bench/measure_math_ulp.py measures it, tests/test_math.py checks it): the error of a
// result is |got - f(x)| / ulp(f(x)), f(x) the exact value (references: float64 libm for float32,
// x87 long double libm for float64), ulp(y) = 2^(floor(log2|y|) - 23) (double: - 52) but never
// below the smallest denormal, so denormal results count in denormal ulps: gradual underflow is
// kept, to within 1 such ulp (the kernels run with FTZ/DAZ, which flushes those results to 0).
// Where f(x) rounds to +-inf or is NaN the result is exactly that. The numbers beside each
// function are max errors over normal-range results; denormal-range results are all <= 0.78.
//
// Techniques. exp: x = n ln2 + r, |r| <= ln2/2, by Cody-Waite with ln2 split so that n * ln2_hi is
// exact even without FMA; in float64 the rounding error of r is carried (Fast2Sum) and 1 + r is
// kept as two doubles, so the result rounds essentially once: exp(r) = 1 + r + r^2 Q(r), Q
// minimax (float32 rounds r and 1 + (r + r^2 Q) plainly: ~1 ulp, see C<float>::compensated).
// 2^n is applied as two exact powers of two (AVX-512: one vscalef), so n = 128 (1024) overflows
// exactly where it should and denormal results round once. tanh (float64): odd minimax polynomial
// |x| + |x|^3 P(x^2) for small |x| (no cancellation; exact for tiny x and +-0) and
// 1 - 2e / (1 + e), e = exp(-2|x|), beyond; (float32) -m / (m + 2), m = expm1(-2|x|), for every
// x; |x| clamped so that it saturates to exactly +-1; the sign is copied back (odd exactly).
// sigmoid: num / (1 + e), e = exp(-|x|), num = 1 (x >= 0) or e (x < 0), so tiny results keep
// relative accuracy, plus (float64) one FMA residual step that removes the roundings of 1 + e and
// of the division.
// One division in tanh and sigmoid, none in exp; no tables. NaN in -> NaN out without a select:
// every clamp takes x as the second operand of x86 max/min, which returns that operand when
// either is NaN, and NaN then goes through the arithmetic (pow2i turns it into some power of two,
// which the NaN it multiplies absorbs). The selects were 7% of the LSTM epilogue (C++ loop,
// AVX-512: 73 -> 68 TSC cycles a vector).
//
// Coefficients: Remez exchange for the relative-error minimax problem on the intervals below,
// solved with 60-digit mpmath, then rounded to T (float exp, double tanh: rounded one at
// a time from the lowest order, refitting the rest after each; double exp: rounded at once).
// Max relative error of each rounded polynomial, from the fit, is noted beside it.
#pragma once
#include <type_traits>
#include <utility>
#include "simd/vec.h"

// Inlined into the cell epilogues so the compiler can interleave the independent gates' long
// dependency chains (exp, divide, correction) instead of running them call by call.
#if defined(__GNUC__)
#define FUSEDRNN_ALWAYS_INLINE __attribute__((always_inline))
#else
#define FUSEDRNN_ALWAYS_INLINE
#endif

namespace fusedrnn {
namespace FUSEDRNN_ISA_NS {
namespace math_detail {

// Whether Vec<T> has scalef(a, n) = a * 2^n rounded once (AVX-512's vscalef, one instruction;
// overflow to inf and gradual underflow as a multiplication gives them). Elsewhere 2^n is built
// in the exponent bits (pow2i), valid for normal powers only, so wide ranges take two of them.
// Both round the exact a * 2^n once: the results are the same bits. LSTM epilogue (C++ loop,
// AVX-512): 70 -> 63 TSC cycles a vector; bitwise the same over all 2^32 float32 inputs.
template <typename V, typename = void> struct HasScalef : std::false_type {};
template <typename V>
struct HasScalef<V, std::void_t<decltype(V::scalef(std::declval<V>(), std::declval<V>()))>>
    : std::true_type {};

// Horner: c0 + x * (c1 + x * (c2 + ...)).
template <typename T>
inline Vec<T> horner(Vec<T> /*x*/, T c) { return Vec<T>::set1(c); }
template <typename T, typename... R>
inline Vec<T> horner(Vec<T> x, T c, R... rest) {
  return Vec<T>::fma(horner<T>(x, rest...), x, Vec<T>::set1(c));
}

// Scalar constants per type (plain scalars: SIMD constants are built inside the functions).
template <typename T> struct C;
template <> struct C<float> {
  // float32 leaves out the compensations that take exp, tanh and sigmoid to ~1 ulp, and computes
  // tanh by one branch-free formula (see vtanh): the design allows 4 ulp, and the LSTM epilogue
  // (3 sigmoids, 2 tanh a unit) was 10-18% of the B = 1 steps. It now takes 113 instead of 175
  // cycles a vector (C++ loop, AVX-512, with the 2-vector interleave of cells.h); exhaustive
  // float32 maxima went from 0.63 / 1.03 / 1.48 ulp (exp, tanh, sigmoid) to 1.01 / 2.50 / 2.40.
  static constexpr bool compensated = false;
  static constexpr float log2e = 1.44269502f;
  static constexpr float ln2_hi = 0.693145751953125f;  // 16 significant bits: n * ln2_hi is exact
  static constexpr float ln2_lo = 1.42860677e-06f;     // ln2 - ln2_hi
  // exp(x) rounds to 0 below lo and to inf above hi; both keep n within [-150, 128].
  static constexpr float exp_lo = -104.0f, exp_hi = 89.0f;
  static constexpr float tanh_sat = 10.0f;   // tanh(x) rounds to 1 for x > 9.01
  // exp(r) ~ 1 + r + r^2 (c2 + c3 r + ... + c6 r^4) on |r| <= ln2/2 + 2e-5: rel. error 2^-28.2.
  static Vec<float> exp_poly(Vec<float> r) {
    return horner(r, 0.49999994f, 0.166665167f, 0.0416681021f, 0.00836919248f, 0.00138389028f);
  }
};
template <> struct C<double> {
  static constexpr bool compensated = true;  // full double precision (DESIGN.md)
  static constexpr double log2e = 1.4426950408889634;
  static constexpr double ln2_hi = 0x1.62e42fefa38p-1;     // 42 significant bits
  static constexpr double ln2_lo = 5.497923018708371e-14;  // ln2 - ln2_hi
  static constexpr double exp_lo = -746.0, exp_hi = 710.0;  // n within [-1076, 1025]
  static constexpr double tanh_small = 0.6;
  static constexpr double tanh_sat = 20.0;  // tanh(x) rounds to 1 for x > 19.1
  // exp(r) ~ 1 + r + r^2 Q(r), Q of degree 9, on |r| <= ln2/2 + 2e-5: rel. error 2^-56.3.
  static Vec<double> exp_poly(Vec<double> r) {
    return horner(r, 0.5000000000000011, 0.16666666666666413, 0.041666666666530204,
                  0.008333333333494411, 0.0013888888943616444, 0.00019841269506653102,
                  2.480149311462958e-05, 2.7557586338514025e-06, 2.7630242278273733e-07,
                  2.5000062763887494e-08);
  }
  // tanh(x) ~ x + x^3 P(x^2), P of degree 10, on |x| <= 0.6: rel. error 2^-57.7.
  static Vec<double> tanh_poly(Vec<double> s) {
    return horner(s, -0.33333333333333126, 0.13333333333299766, -0.05396825394933422,
                  0.02186948800332271, -0.008863226786399434, 0.003592037445994819,
                  -0.0014552156856157184, 0.0005871894136139732, -0.00023039877249379166,
                  7.931611034667442e-05, -1.7179752307136213e-05);
  }
};

// Uncompensated (float32): returns expm1(r) = r + r^2 Q(r) where x = n ln2 + r, r rounded once
// (two-step Cody-Waite), and sets n (integer-valued). x finite and clamped by the caller.
template <typename T>
FUSEDRNN_ALWAYS_INLINE inline Vec<T> expm1_reduced(Vec<T> x, Vec<T>& n) {
  using V = Vec<T>;
  n = V::round(x * V::set1(C<T>::log2e));
  V r = V::fnma(n, V::set1(C<T>::ln2_lo), V::fnma(n, V::set1(C<T>::ln2_hi), x));
  return V::fma(r * r, C<T>::exp_poly(r), r);
}

// Returns exp(r) (in [0.70, 1.42], before scaling by 2^n) where x = n ln2 + r, and sets n
// (integer-valued). x must be finite and clamped by the caller so that its scaling works.
template <typename T>
FUSEDRNN_ALWAYS_INLINE inline Vec<T> exp_reduced(Vec<T> x, Vec<T>& n) {
  using V = Vec<T>;
  const V one = V::set1(T(1));
  if constexpr (!C<T>::compensated) return one + expm1_reduced(x, n);
  n = V::round(x * V::set1(C<T>::log2e));
  V r_hi = V::fnma(n, V::set1(C<T>::ln2_hi), x);  // exact (Sterbenz), also as mul + sub
  V t = n * V::set1(C<T>::ln2_lo);
  V r = r_hi - t;
  V c = (r_hi - r) - t;  // r + c = r_hi - t: the rounding error of r (Fast2Sum)
  // exp(r + c) = 1 + r + (r^2 Q(r) + c (1 + r)), with 1 + r kept as s + se (Fast2Sum, |r| < 1):
  // the only rounding that matters is the last addition (about 0.5 ulp before scaling).
  V w = V::fma(r * r, C<T>::exp_poly(r), V::fma(c, r, c));
  V s = one + r;
  V se = (one - s) + r;
  return s + (se + w);
}

}  // namespace math_detail

// exp(x). Measured max error (bench/measure_math_ulp.py): float32 1.01 ulp (avx2, avx512), 0.99 ulp
// (generic) over all 2^32 float32 inputs, exhaustive; float64 0.67 ulp (avx2), 0.65 (avx512), 0.70 ulp (generic)
// over two independent samples of 10^7 random inputs covering the whole range (log-uniform
// magnitudes 2^-1074..2^10, uniform in [-40, 40] and [-750, 750]) plus special values. Exact: exp(-inf) = 0, exp(+inf) = inf, NaN -> NaN; inf exactly from
// the first x whose correctly rounded exp is inf (float 88.72284, double 709.7827128933841);
// 0 below log(min denormal / 2) (float -103.97, double -745.13).
template <typename T>
FUSEDRNN_ALWAYS_INLINE inline Vec<T> vexp(Vec<T> x) {
  using V = Vec<T>;
  using K = math_detail::C<T>;
  // Clamp with x second: x86 max/min return the second operand when either is NaN, so NaN goes
  // through every step to the result (see "NaN" above).
  V xc = V::min(V::set1(K::exp_hi), V::max(V::set1(K::exp_lo), x));
  V n;
  V p = math_detail::exp_reduced(xc, n);
  if constexpr (math_detail::HasScalef<V>::value) return V::scalef(p, n);
  // 2^n as 2^h * 2^(n-h), both in pow2i's range: only the last product rounds (denormals).
  V h = V::round(n * V::set1(T(0.5)));
  return (p * V::pow2i(h)) * V::pow2i(n - h);
}

// tanh(x). Measured max error: float32 2.50 ulp (generic, avx2, avx512) over all 2^32 float32
// inputs, exhaustive; float64 1.37 ulp (avx2, avx512), 1.38 ulp (generic) over the 2 x 10^7
// random inputs.
// Exact: tanh(+-0) = +-0, tanh(+-inf) = +-1, +-1 from |x| = 8.4911 (double 19.0616; float32's
// uncompensated formula reaches 1 before the exact tanh rounds to it, 9.01), tanh(-x) = -tanh(x),
// tanh(x) = x for denormal x, NaN -> NaN.
template <typename T>
FUSEDRNN_ALWAYS_INLINE inline Vec<T> vtanh(Vec<T> x) {
  using V = Vec<T>;
  using K = math_detail::C<T>;
  const V one = V::set1(T(1));
  V ax = V::abs(x);
  const V z = V::set1(T(-2)) * V::min(V::set1(K::tanh_sat), ax);  // -2|x|, clamped: saturates
  V y;
  if constexpr (!K::compensated) {
    // One formula for every |x|: tanh|x| = -m / (m + 2), m = expm1(-2|x|) = 2^n (1 + p) - 1 with
    // p = expm1(r) = r + r^2 Q(r), which keeps relative accuracy near 0 (n = 0: m = p), where
    // 1 - 2e / (1 + e) would cancel. One branch instead of two: see C<float>::compensated.
    V n;
    V p = math_detail::expm1_reduced(z, n);
    V s;
    if constexpr (math_detail::HasScalef<V>::value) s = V::scalef(one, n);
    else s = V::pow2i(n);
    V m = V::fma(s, p, s - one);
    y = V::copysign(V::neg(m) / (m + V::set1(T(2))), x);
  } else {
    // Large |x|: 1 - 2e / (1 + e), e = exp(-2|x|) in [exp(-2 sat), 1] (normal: one pow2i).
    V n;
    V p = math_detail::exp_reduced(z, n);
    V e;
    if constexpr (math_detail::HasScalef<V>::value) e = V::scalef(p, n);
    else e = p * V::pow2i(n);
    V big = one - e / V::fma(e, V::set1(T(0.5)), V::set1(T(0.5)));
    // Small |x|: |x| + |x|^3 P(x^2), one rounding at the end.
    V s = ax * ax;
    V small = V::fma(ax * s, K::tanh_poly(s), ax);
    y = V::copysign(V::select(V::lt(ax, V::set1(K::tanh_small)), small, big), x);
  }
  return y;
}

// sigmoid(x) = 1 / (1 + exp(-x)). Measured max error: float32 2.40 ulp (generic, avx2, avx512; no
// residual step in float32) over all 2^32 float32 inputs, exhaustive; float64 1.48 ulp (avx2),
// 1.43 (avx512), 1.81 ulp (generic) over the 2 x 10^7 random inputs.
// Exact: sigmoid(-inf) = 0, sigmoid(+inf) = 1, 1 from x = 16.636 (double 37.430), 0 below
// -103.97 (double -745.13), NaN -> NaN; small results (x < 0) keep relative accuracy.
template <typename T>
FUSEDRNN_ALWAYS_INLINE inline Vec<T> vsigmoid(Vec<T> x) {
  using V = Vec<T>;
  using K = math_detail::C<T>;
  const V one = V::set1(T(1));
  // e = exp(-|x|) in (0, 1]: n in [-150, 0] (double [-1076, 0]); 2^n is applied as
  // 2^(n + k) * 2^-k so that denormal results round once.
  V n;
  V p = math_detail::exp_reduced(V::max(V::set1(K::exp_lo), V::neg(V::abs(x))), n);
  V e;
  if constexpr (math_detail::HasScalef<V>::value) e = V::scalef(p, n);
  else e = (p * V::pow2i(n + V::set1(T(64)))) * V::set1(T(0x1p-64));
  auto neg = V::lt(x, V::zero());
  V num = V::select(neg, e, one);
  V d = one + e;
  V q = num / d;
  if constexpr (!K::compensated) return q;
  V dl = e - (d - one);  // 1 + e = d + dl exactly (Fast2Sum, 1 >= e)
  // One correction step: num / (d + dl) = q + (num - q d - q dl) / (d + dl), where num - q d is
  // exact with a fused multiply-add (without one, as in the generic build, it still removes the
  // rounding of 1 + e), and 1 / d ~ q (x >= 0) or 1 - q (x < 0) is plenty for the correction.
  V res = V::fnma(q, dl, V::fnma(q, d, num));
  return V::fma(res, V::select(neg, one - q, q), q);
}

}  // namespace FUSEDRNN_ISA_NS
}  // namespace fusedrnn
