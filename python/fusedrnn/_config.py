"""Version, threads and a report of how the kernels were built and which ISA runs."""
import platform

from . import _C

__version__ = _C.__version__


def set_num_threads(n):
    """Threads the kernels may use (overrides OMP_NUM_THREADS for fusedrnn)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"num_threads must be an int, got {type(n).__name__}")
    _C.set_num_threads(n)


def get_num_threads():
    return _C.get_num_threads()


def config():
    """The facts show_config() prints, as a dict."""
    import numpy as np
    return {
        "version": __version__,
        "isa": _C.isa(),
        "available_isas": list(_C.available_isas()),
        "vector_bytes": _C.vector_bytes(),
        "openmp": bool(_C.openmp),
        "num_threads": _C.get_num_threads(),
        "compiler": _C.compiler(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def show_config():
    """Print the ISA in use, the ISAs this CPU can run, threads and build facts."""
    for key, value in config().items():
        print(f"{key:>15}: {value}")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
