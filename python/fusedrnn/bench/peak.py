"""This machine's float32 GEMM peak, measured in the same run as the cases.

Two figures per thread count: our packed GEMM (``fusedrnn._C.gemm``) and NumPy's matmul (its
BLAS, limited to the thread count when threadpoolctl is installed), on 1024^3 (smaller only
where one product takes over a quarter second); the peak is the best of the repetitions, and
the run keeps the better of a measurement at its start and one at its end.

``gemm_beside`` is the same GEMM as a call that each case times once per round (after one
untimed call, as each runner's block) beside its runners (runner.run_case): this VM's speed
drifts by 10-40% over minutes, so a case's rate over the run's best GEMM minute says more
about the minute than about the kernels; over the GEMM rate of the case's own minutes it does
not.
"""
import time

import numpy as np

from .. import _C
from .machine import blas_threads
from .timing import wait_until_idle

SIZES = (1024, 512, 256)      # the first whose product takes at most MAX_CALL_S
MAX_CALL_S = 0.25


def _best(fn, A, B, budget_s, min_reps=3):
    best, spent, reps = float("inf"), 0.0, 0
    while reps < min_reps or spent < budget_s:
        t0 = time.perf_counter()
        fn(A, B)
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best, reps


def gemm_peak(fn, budget_s=0.3, rng=None):
    """GFLOP/s of C = A @ B with square float32 matrices; returns a dict of the figures."""
    rng = np.random.default_rng(rng)
    for n in SIZES:
        A = rng.standard_normal((n, n), dtype=np.float32)
        B = rng.standard_normal((n, n), dtype=np.float32)
        wait_until_idle()                         # another library's pool still spinning
        fn(A, B)                                  # warm-up (and packing buffers)
        t0 = time.perf_counter()
        fn(A, B)
        if time.perf_counter() - t0 <= MAX_CALL_S:
            break
    best, reps = _best(fn, A, B, budget_s)
    return {"size": n, "best_s": best, "reps": reps, "gflops": 2 * n**3 / best / 1e9}


def gemm_beside(size, rng=None):
    """(call, flops): our GEMM on size^3 float32 as a zero-argument call, timed beside a case."""
    rng = np.random.default_rng(rng)
    A = rng.standard_normal((size, size), dtype=np.float32)
    B = rng.standard_normal((size, size), dtype=np.float32)
    return (lambda: _C.gemm(A, B)), 2 * size**3


def best_of(first, second):
    """Per figure, the better of two measurements (the run measures at its start and end, so a
    busy moment of the machine does not lower the peak)."""
    out = {}
    for key in first:
        a, b = first[key], second[key]
        out[key] = dict(a if a["gflops"] >= b["gflops"] else b,
                        measured_gflops=[a["gflops"], b["gflops"]])
    return out


def measure(threads, set_threads, budget_s=0.3):
    """{"fusedrnn_gemm": ..., "numpy_matmul": ...} at ``threads`` threads."""
    set_threads(threads)
    ours = gemm_peak(_C.gemm, budget_s)
    with blas_threads(threads) as limited:
        theirs = gemm_peak(np.matmul, budget_s)
    theirs["threads"] = threads if limited is not None else "numpy's default"
    return {"fusedrnn_gemm": ours, "numpy_matmul": theirs}
