"""Vector exp / tanh / sigmoid (csrc/simd/math.h) through fusedrnn._C.math, on every ISA this CPU runs.

1. Special values: NaN, +-inf, +-0, the exact overflow threshold of exp, underflow to 0,
   saturation of tanh and sigmoid to exactly +-1 / 0 / 1, odd symmetry of tanh, tails of arrays.
2. Accuracy on a dense sample (float32: random bit patterns over every exponent plus a fine grid
   over [-20, 20]; float64: log-uniform magnitudes over the whole range plus a grid): the error in
   ulp stays within MATH_ULP_FLOAT32 / MATH_ULP_FLOAT64. The exhaustive float32 measurement (all
   2^32 inputs) is bench/measure_math_ulp.py; its numbers are written beside each function.

Error rule (as in the bench script): |got - f(x)| / ulp(f(x)), with ulp never below the smallest
denormal, so denormal results count in denormal ulps; where f(x) rounds to inf or is NaN the result
must be exactly that.
"""
import numpy as np
import pytest

from fusedrnn import _C, tolerances

ISAS = list(_C.available_isas())
DTYPES = [np.float32, np.float64]
FUNCS = ["exp", "tanh", "sigmoid"]

# Bounds from fusedrnn.tolerances (reasons there); a lost polynomial term or a sloppy range
# reduction breaks them by orders of magnitude.
MATH_ULP = {np.float32: tolerances.MATH_ULP_FLOAT32, np.float64: tolerances.MATH_ULP_FLOAT64}

# The reference is evaluated in a wider type: float64 for float32, long double for float64 (x87
# 80-bit on x86-64; where long double is just float64 the float64 accuracy test is skipped).
WIDE = {np.float32: np.float64, np.float64: np.longdouble}
LONGDOUBLE_IS_WIDER = np.finfo(np.longdouble).nmant > np.finfo(np.float64).nmant


def run(func, x, isa):
    return _C.math(FUNCS.index(func), np.asarray(x), isa)


def reference(func, x, wide):
    with np.errstate(over="ignore", invalid="ignore"):  # signalling NaN patterns, overflow
        xw = np.asarray(x).astype(wide)
        if func == "exp":
            return np.exp(xw)
        if func == "tanh":
            return np.tanh(xw)
        return 1 / (1 + np.exp(-xw))


def ulp_error(got, want, dtype):
    """|got - want| / ulp(want) in ulps of dtype; want is in a wider type."""
    fi = np.finfo(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        _, e = np.frexp(want)  # want = m 2^e, 1/2 <= |m| < 1
        e = np.where(want == 0, fi.minexp, np.maximum(e - 1, fi.minexp))
        ulp = np.ldexp(np.ones_like(want), e - fi.nmant)
        err = np.abs(got.astype(want.dtype) - want) / ulp
        rounded = want.astype(dtype)
        special = np.isinf(rounded) | np.isinf(got) | np.isnan(rounded) | np.isnan(got)
        if special.any():
            same = (got[special] == rounded[special]) | (np.isnan(got[special]) & np.isnan(rounded[special]))
            err[special] = np.where(same, 0.0, np.inf)
    return err


def max_ulp(func, x, dtype, isa):
    x = np.asarray(x, dtype=dtype)
    err = ulp_error(run(func, x, isa), reference(func, x, WIDE[dtype]), dtype)
    i = int(np.argmax(err))
    return float(err[i]), x[i]


def assert_exact(func, dtype, isa, pairs):
    x = np.array([p[0] for p in pairs], dtype=dtype)
    want = np.array([p[1] for p in pairs], dtype=dtype)
    got = run(func, x, isa)
    assert got.dtype == dtype
    ok = (got == want) & (np.signbit(got) == np.signbit(want)) | (np.isnan(got) & np.isnan(want))
    bad = [(float(a), float(g), float(w)) for a, g, w in zip(x[~ok], got[~ok], want[~ok])]
    assert not bad, f"{func} {np.dtype(dtype).name} {isa}: (x, got, want) = {bad}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
class TestSpecialValues:
    def test_exp(self, isa, dtype):
        inf, nan = np.inf, np.nan
        assert_exact("exp", dtype, isa, [(0.0, 1.0), (-0.0, 1.0), (inf, inf), (-inf, 0.0), (nan, nan),
                                         (-nan, nan), (1e30, inf), (-1e30, 0.0)])
        # Overflow exactly where the correctly rounded result becomes inf; underflow to 0 below
        # half the smallest denormal (x < log(2^-150) = -103.97, double log(2^-1075) = -745.13).
        fi = np.finfo(dtype)
        last = dtype(88.72283) if dtype == np.float32 else dtype(709.782712893384)
        assert np.isfinite(reference("exp", last, WIDE[dtype]).astype(dtype))
        nxt = np.nextafter(last, dtype(np.inf))
        assert_exact("exp", dtype, isa, [(nxt, inf), (2 * nxt, inf)])
        err, _ = max_ulp("exp", [last], dtype, isa)  # finite and accurate
        assert err <= MATH_ULP[dtype]
        below = -104.0 if dtype == np.float32 else -745.2
        assert_exact("exp", dtype, isa, [(below, 0.0), (2 * below, 0.0)])
        # smallest results: the denormal range is kept (to within 1 denormal ulp), not flushed
        x = np.linspace(np.log(fi.tiny) - 10, np.log(fi.tiny), 1001).astype(dtype)
        err = ulp_error(run("exp", x, isa), reference("exp", x, WIDE[dtype]), dtype)
        assert err.max() <= 1.0

    def test_tanh(self, isa, dtype):
        inf, nan = np.inf, np.nan
        sat = [9.1, 10.0, 19.0, 1e3, 1e30] if dtype == np.float32 else [19.1, 20.0, 37.0, 1e3, 1e300]
        tiny = np.finfo(dtype).smallest_subnormal
        assert_exact("tanh", dtype, isa, [(0.0, 0.0), (-0.0, -0.0), (inf, 1.0), (-inf, -1.0), (nan, nan),
                                          (tiny, tiny), (-tiny, -tiny)]
                     + [(s, 1.0) for s in sat] + [(-s, -1.0) for s in sat])
        # no cancellation near 0: relative accuracy for tiny arguments
        for x in [1e-5, -1e-5, 3e-8, 0.1, -0.3]:
            err, _ = max_ulp("tanh", [x], dtype, isa)
            assert err <= MATH_ULP[dtype], (x, err)
        # odd, exactly
        x = np.linspace(-12, 12, 4097).astype(dtype)
        np.testing.assert_array_equal(run("tanh", -x, isa), -run("tanh", x, isa))

    def test_sigmoid(self, isa, dtype):
        inf, nan = np.inf, np.nan
        one = [17.5, 20.0, 100.0, 1e30] if dtype == np.float32 else [37.5, 50.0, 1e3, 1e300]
        zero = [-104.0, -200.0, -1e30] if dtype == np.float32 else [-745.2, -800.0, -1e300]
        assert_exact("sigmoid", dtype, isa, [(0.0, 0.5), (-0.0, 0.5), (inf, 1.0), (-inf, 0.0), (nan, nan)]
                     + [(x, 1.0) for x in one] + [(x, 0.0) for x in zero])
        # small results keep relative accuracy: sigmoid(-20) ~ 2.06e-9, sigmoid(-80) ~ 1.8e-35
        for x in [-20.0, -80.0, -30.5, -5.0, 5.0, 1e-6, -1e-6]:
            err, _ = max_ulp("sigmoid", [x], dtype, isa)
            assert err <= MATH_ULP[dtype], (x, err)

    def test_nan_and_tails(self, isa, dtype):
        # NaN lanes do not leak into others; every length (vector body and partial tail) agrees
        x = np.array([np.nan, 1.0, -np.inf, 0.5, np.inf, -2.0, np.nan, 3.0] * 5, dtype=dtype)
        for func in FUNCS:
            full = run(func, x, isa)
            assert np.isnan(full[::8]).all() and np.isnan(full[6::8]).all()
            assert not np.isnan(np.delete(full, np.r_[0:40:8, 6:40:8])).any()
            for n in range(1, 20):
                np.testing.assert_array_equal(run(func, x[1:1 + n], isa), full[1:1 + n])


def float32_sample(rng):
    bits = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([bits.view(np.float32), np.linspace(-20, 20, 1 << 20, dtype=np.float32)])


def float64_sample(rng):
    n = 1 << 18
    mag = np.exp2(rng.uniform(-1074, 10, n))
    x = np.concatenate([np.where(rng.integers(0, 2, n) == 1, mag, -mag), rng.uniform(-750, 750, n // 2),
                        np.linspace(-40, 40, n)])
    return x


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("func", FUNCS)
def test_max_ulp(func, dtype, isa, rng):
    if dtype == np.float64 and not LONGDOUBLE_IS_WIDER:
        pytest.skip("long double is no wider than float64 here: no reference")
    x = float32_sample(rng) if dtype == np.float32 else float64_sample(rng)
    err, where = max_ulp(func, x, dtype, isa)
    assert err <= MATH_ULP[dtype], f"{func} {np.dtype(dtype).name} {isa}: {err:.3f} ulp at x = {where!r}"
