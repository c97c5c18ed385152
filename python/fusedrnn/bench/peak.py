"""This machine's float32 GEMM peak, measured in the same run as the cases.

Two figures per thread count: our packed GEMM (``fusedrnn._C.gemm``) and NumPy's matmul (its
BLAS at the thread count: through threadpoolctl when installed, else in a fresh Python whose
BLAS reads the count from the environment as it loads), on 1024 x 1024 x 1056 (``product_shape``;
smaller only where one product takes over a quarter second); the peak is the best of the
repetitions, and the run keeps the better of a measurement at its start and one at its end.

``gemm_beside`` is the same GEMM as a call that each case times once per round (after one
untimed call, as each runner's block) beside its runners (runner.run_case): this VM's speed
drifts by 10-40% over minutes, so a case's rate over the run's best GEMM minute says more
about the minute than about the kernels; over the GEMM rate of the case's own minutes it does
not.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

from .. import _C
from .machine import blas_threads
from .timing import wait_until_idle

# What BLAS libraries read their thread count from when they load (OpenBLAS, MKL, BLIS, Apple's
# Accelerate, and OpenMP for the rest).
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "OMP_NUM_THREADS")
SIZES = (1024, 512, 256)      # the first whose product takes at most MAX_CALL_S
MAX_CALL_S = 0.25
# B is one panel of our kernels wider than square: at 1024^3 C's rows lie 4 KB apart, share L1
# sets, and every k block's sum passes through them, which cost our GEMM 3-4% on the Zen 4 host
# (1 thread: 100.5-102.0 GFLOP/s at 1024^3, 105.1-105.3 at 1024 x 1024 x 1056; NumPy's BLAS
# 101-104 and 102.5-105). The layers' own products avoid such strides (gx_row_stride), so a
# case's fraction of the square GEMM read that much high (bench/HOSTS.md, session 54).
EXTRA_COLUMNS = 32


def product_shape(n):
    """(M, K, N) of the reference GEMM at size n: A is n x n, B n x (n + EXTRA_COLUMNS)."""
    return n, n, n + EXTRA_COLUMNS


def _best(fn, A, B, budget_s, min_reps=3):
    best, spent, reps = float("inf"), 0.0, 0
    while reps < min_reps or spent < budget_s:
        t0 = time.perf_counter()
        fn(A, B)
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best, reps


def gemm_peak(fn, budget_s=0.3, rng=None):
    """GFLOP/s of C = A @ B, float32, of product_shape(n); returns a dict of the figures."""
    rng = np.random.default_rng(rng)
    for n in SIZES:
        M, K, N = product_shape(n)
        A = rng.standard_normal((M, K), dtype=np.float32)
        B = rng.standard_normal((K, N), dtype=np.float32)
        wait_until_idle()                         # another library's pool still spinning
        fn(A, B)                                  # warm-up (and packing buffers)
        t0 = time.perf_counter()
        fn(A, B)
        if time.perf_counter() - t0 <= MAX_CALL_S:
            break
    best, reps = _best(fn, A, B, budget_s)
    return {"size": n, "shape": [M, K, N], "best_s": best, "reps": reps,
            "gflops": 2 * M * K * N / best / 1e9}


def gemm_beside(size, rng=None):
    """(call, flops): our GEMM of product_shape(size), float32, as a zero-argument call, timed
    beside a case."""
    rng = np.random.default_rng(rng)
    M, K, N = product_shape(size)
    A = rng.standard_normal((M, K), dtype=np.float32)
    B = rng.standard_normal((K, N), dtype=np.float32)
    return (lambda: _C.gemm(A, B)), 2 * M * K * N


def best_of(first, second):
    """Per figure, the better of two measurements (the run measures at its start and end, so a
    busy moment of the machine does not lower the peak)."""
    out = {}
    for key in first:
        a, b = first[key], second[key]
        out[key] = dict(a if a["gflops"] >= b["gflops"] else b,
                        measured_gflops=[a["gflops"], b["gflops"]])
    return out


def numpy_peak_apart(threads, budget_s=0.3, timeout_s=300):
    """gemm_peak(np.matmul) in a fresh Python whose BLAS starts with ``threads`` threads (the
    environment's BLAS_THREAD_VARS), or None if that process fails. Without threadpoolctl this
    process cannot limit a BLAS already loaded, which took every core: on 2 cores a --quick run
    set its 1-thread cases beside NumPy on both (52% of NumPy's rate, where NumPy on one core
    ran no faster than our GEMM). Adds "blas_threads" where the child can read its BLAS's count
    (threadpoolctl there)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {package_parent!r})\n"
        "import numpy as np\n"
        "from fusedrnn.bench import peak\n"
        f"peak.SIZES = {tuple(SIZES)!r}\n"
        f"out = peak.gemm_peak(np.matmul, {budget_s!r})\n"
        "try:\n"
        "    import threadpoolctl\n"
        "    out['blas_threads'] = [p['num_threads'] for p in threadpoolctl.threadpool_info()\n"
        "                           if p['user_api'] == 'blas']\n"
        "except ImportError:\n"
        "    pass\n"
        "print(json.dumps(out))\n")
    env = dict(os.environ, **{name: str(threads) for name in BLAS_THREAD_VARS})
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=timeout_s)
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def measure(threads, set_threads, budget_s=0.3):
    """{"fusedrnn_gemm": ..., "numpy_matmul": ...} at ``threads`` threads. NumPy's "threads"
    says how its count was set: a number (threadpoolctl here, or a fresh process, "process":
    "fresh"), or "numpy's default" where neither worked."""
    set_threads(threads)
    ours = gemm_peak(_C.gemm, budget_s)
    with blas_threads(threads) as limited:
        if limited is not None:
            theirs = dict(gemm_peak(np.matmul, budget_s), threads=threads)
            return {"fusedrnn_gemm": ours, "numpy_matmul": theirs}
    apart = numpy_peak_apart(threads, budget_s)
    theirs = (dict(apart, threads=threads, process="fresh") if apart is not None else
              dict(gemm_peak(np.matmul, budget_s), threads="numpy's default"))
    return {"fusedrnn_gemm": ours, "numpy_matmul": theirs}
