"""Facts about this machine and the software measured: CPU, ISA, versions, NumPy's BLAS.

Also ``blas_threads(n)``: a context that limits NumPy's BLAS to n threads through threadpoolctl
when it is installed (otherwise NumPy keeps its default in this process, and ``numpy_blas()``
says so; peak.py then measures NumPy's GEMM rate in a fresh process).
"""
import contextlib
import importlib.metadata
import os
import platform

import numpy as np

BUSY_LOAD = 0.5      # 1-minute load average above which a run warns that timings are noisy
ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE",
            "OPENBLAS_L2_SIZE", "FUSEDRNN_ISA", "FUSEDRNN_THREAD_POLICY", "GOMP_SPINCOUNT",
            "OMP_WAIT_POLICY")


def _threadpoolctl():
    try:
        import threadpoolctl
        return threadpoolctl
    except ImportError:
        return None


def blas_threads(n):
    """Context manager limiting NumPy's BLAS to ``n`` threads (a no-op without threadpoolctl)."""
    tpc = _threadpoolctl()
    if tpc is None:
        return contextlib.nullcontext()
    return tpc.threadpool_limits(limits=n, user_api="blas")


def numpy_blas():
    """Which BLAS NumPy uses, and whether its thread count can be set here."""
    info = {"thread_control": "threadpoolctl" if _threadpoolctl() else
            "none here (threadpoolctl not installed: NumPy's default thread count; its GEMM "
            "rate is measured in a fresh process started at each thread count)"}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["name"] = blas.get("name")
        info["version"] = blas.get("version")
        if blas.get("openblas configuration"):
            info["configuration"] = blas["openblas configuration"]
    except Exception as e:       # older NumPy: show_config has no mode="dicts"
        info["name"] = f"unknown ({type(e).__name__})"
    tpc = _threadpoolctl()
    if tpc is not None:
        info["threadpools"] = [{k: v for k, v in pool.items() if k != "filepath"}
                               for pool in tpc.threadpool_info()]
    return info


def _version(distribution):
    """Installed version, without importing the package (torch takes seconds to import)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def facts():
    """The machine section of the JSON."""
    from .. import _config
    cfg = _config.config()
    return {
        "cpu": cfg["cpu"],
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "isa": cfg["isa"],
        "available_isas": cfg["available_isas"],
        "vector_bytes": cfg["vector_bytes"],
        "prefetch_ahead": cfg["prefetch_ahead"],
        "openmp": cfg["openmp"],
        "thread_policy": cfg["thread_policy"],
        "compiler": cfg["compiler"],
        "versions": {
            "python": platform.python_version(),
            "fusedrnn": cfg["version"],
            "numpy": np.__version__,
            "torch": _version("torch"),
            "onnx": _version("onnx"),
            "onnxruntime": _version("onnxruntime"),
            "matplotlib": _version("matplotlib"),
        },
        "numpy_blas": numpy_blas(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "load_average": load_average(),
    }


def load_average():
    """1-, 5- and 15-minute load averages (None where the OS does not say)."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None
