#!/usr/bin/env python
"""Measure the error in ulp of fusedrnn's vector exp / tanh / sigmoid (csrc/simd/math.h).

Everything goes through ``fusedrnn._C.math(func, x, isa)``, for every ISA this CPU runs and both
dtypes, and prints one table row per (function, dtype, ISA): the max error in ulp over results in
the normal range, the input where it happens, and the max over results in the denormal range.

- float32: exhaustive, all 2^32 bit patterns (NaN, infinities, denormals included), in chunks of
  2^20 spread over --jobs threads; reference: NumPy's float64 exp / tanh (libm, < 1 float64 ulp,
  i.e. ~1e-9 float32 ulp).
- float64: a random sample (default 10^7 points: half log-uniform magnitudes over
  [2^-1074, 2^10], a quarter uniform over [-40, 40], a quarter over [-750, 750], random signs) plus
  special values; reference: NumPy long double (x87 80-bit on x86-64, 11 bits beyond float64).

Error rule: err = |got - f(x)| / ulp(f(x)), where ulp(y) = 2^(floor(log2|y|) - p + 1) for the
dtype's precision p, but never below the smallest denormal (2^-149, 2^-1074): results in the
denormal range count in denormal ulps (the kernels themselves run with FTZ/DAZ and flush them).
Where the reference rounds to +-inf, or is NaN, the result must be exactly that (else err = inf).

Usage: python bench/measure_math_ulp.py [--isa avx2 ...] [--stride S] [--samples N]
(--stride S measures every S-th float32 pattern only. The full run takes about 15 minutes on 2
cores, mostly in the generic ISA, whose Vec<T> calls ldexp/nearbyint lane by lane.)
"""
import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fusedrnn import _C

FUNCS = ["exp", "tanh", "sigmoid"]


def reference(func, x, wide):
    """f(x) evaluated in the wider type ``wide`` (float64 for float32, long double for float64)."""
    with np.errstate(over="ignore", invalid="ignore"):  # signalling NaN patterns, overflow
        xw = x.astype(wide)
        if func == "exp":
            return np.exp(xw)
        if func == "tanh":
            return np.tanh(xw)
        return 1 / (1 + np.exp(-xw))


class UlpScale:
    """What the error of any result against one reference array needs (computed once per array)."""

    def __init__(self, want, dtype):
        fi = np.finfo(dtype)
        self.want, self.dtype = want, dtype
        with np.errstate(over="ignore", invalid="ignore"):
            if want.dtype == np.float64:  # fast path: floor(log2|want|) from the exponent bits
                e = ((want.view(np.uint64) >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64) - 1023
                e = np.maximum(e, fi.minexp)  # also for want = 0
                self.inv_ulp = ((fi.nmant - e + 1023) << 52).view(np.float64)  # 1 / ulp(want)
            else:
                _, e = np.frexp(want)  # want = m 2^e, 1/2 <= |m| < 1
                e = np.where(want == 0, fi.minexp, np.maximum(e - 1, fi.minexp))
                self.inv_ulp = np.ldexp(np.ones_like(want), fi.nmant - e)
            self.rounded = want.astype(dtype)
        self.special = np.isinf(self.rounded) | np.isnan(self.rounded)
        self.denormal = np.abs(want) < fi.tiny

    def error(self, got):
        """|got - want| / ulp(want); where want rounds to +-inf or is NaN, or got is +-inf or NaN,
        0 if got is exactly that and inf otherwise."""
        with np.errstate(over="ignore", invalid="ignore"):
            err = np.abs(got.astype(self.want.dtype) - self.want)
            err *= self.inv_ulp
        special = self.special | ~np.isfinite(got)
        if special.any():
            g, r = got[special], self.rounded[special]
            err[special] = np.where((g == r) | (np.isnan(g) & np.isnan(r)), 0.0, np.inf)
        return err


class Worst:
    """Running max error over normal-range results (and where), and max over denormal results."""

    def __init__(self):
        self.err, self.x, self.den = -1.0, None, 0.0

    def update(self, x, err, scale):
        if scale.denormal.any():
            self.den = max(self.den, float(err[scale.denormal].max()))
            err[scale.denormal] = -1.0
        i = int(np.argmax(err))
        if err[i] > self.err:
            self.err, self.x = float(err[i]), x[i]

    def merge(self, other):
        self.den = max(self.den, other.den)
        if other.err > self.err:
            self.err, self.x = other.err, other.x


def measure_chunk(x, isas, wide, dtype):
    """Worst per (function, isa) over the inputs x."""
    worst = {}
    for f in FUNCS:
        scale = UlpScale(reference(f, x, wide), dtype)
        for isa in isas:
            worst[f, isa] = Worst()
            worst[f, isa].update(x, scale.error(_C.math(FUNCS.index(f), x, isa)), scale)
    return worst


def measure_float32(isas, stride, jobs, chunk=1 << 20):
    worst = {(f, isa): Worst() for f in FUNCS for isa in isas}
    n_chunks = (1 << 32) // chunk

    def one(k):  # NumPy and _C.math release the GIL: chunks run in parallel threads
        bits = np.arange(k * chunk, (k + 1) * chunk, stride, dtype=np.uint64).astype(np.uint32)
        return measure_chunk(bits.view(np.float32), isas, np.float64, np.float32)

    t0 = time.time()
    with ThreadPoolExecutor(jobs) as pool:
        for k, res in enumerate(pool.map(one, range(n_chunks)), 1):
            for key, w in res.items():
                worst[key].merge(w)
            if k % (n_chunks // 256) == 0:
                t = time.time() - t0
                print(f"\rfloat32: {100 * k / n_chunks:5.1f}% of 2^32 inputs / {stride}, {t:5.0f} s, "
                      f"{t * (n_chunks - k) / k:5.0f} s to go", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return worst


def float64_sample(n, rng):
    k = rng.integers(0, 4, n)
    mag = np.where(k < 2, np.exp2(rng.uniform(-1074, 10, n)),
                   np.where(k == 2, rng.uniform(0, 40, n), rng.uniform(0, 750, n)))
    x = np.where(rng.integers(0, 2, n) == 1, mag, -mag)
    fi = np.finfo(np.float64)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, fi.tiny, -fi.tiny, fi.smallest_subnormal, fi.max,
               -fi.max, 709.782712893384, 709.7827128933841, -708.3964185322641, -745.1332191019411,
               -745.1332191019412, 19.06, 20.0, 0.6, 1e-5, -1e-5, 1e-300]
    return np.concatenate([np.array(special), x])


def measure_float64(isas, n, seed=0, chunk=1 << 20):
    if np.finfo(np.longdouble).nmant <= np.finfo(np.float64).nmant:
        print("float64: long double is not wider than float64 here; skipped", file=sys.stderr)
        return {}
    rng = np.random.default_rng(seed)
    worst = {(f, isa): Worst() for f in FUNCS for isa in isas}
    x_all = float64_sample(n, rng)
    for s in range(0, x_all.size, chunk):
        for key, w in measure_chunk(x_all[s:s + chunk], isas, np.longdouble, np.float64).items():
            worst[key].merge(w)
        print(f"\rfloat64: {min(s + chunk, x_all.size)}/{x_all.size} samples", end="", file=sys.stderr,
              flush=True)
    print(file=sys.stderr)
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", nargs="*", default=None, help="ISAs to measure (default: all available)")
    ap.add_argument("--stride", type=int, default=1, help="float32: measure every stride-th input")
    ap.add_argument("--samples", type=int, default=10_000_000, help="float64 random sample size")
    ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="threads for the float32 sweep")
    args = ap.parse_args()
    isas = args.isa or list(_C.available_isas())
    res32 = measure_float32(isas, args.stride, args.jobs)
    res64 = measure_float64(isas, args.samples)
    scope32 = "all 2^32" if args.stride == 1 else f"2^32/{args.stride}"
    print(f"{'function':8} {'dtype':8} {'isa':8} {'max ulp':>8}  {'at x':>24}  {'denormal results':>16}  inputs")
    for dtype, res, scope in [("float32", res32, scope32), ("float64", res64, f"{args.samples:.0e} random")]:
        for (f, isa), w in res.items():
            x = np.format_float_scientific(w.x, unique=True) if w.x is not None else "-"
            print(f"{f:8} {dtype:8} {isa:8} {w.err:8.3f}  {x:>24}  {w.den:16.3f}  {scope}")


if __name__ == "__main__":
    main()
