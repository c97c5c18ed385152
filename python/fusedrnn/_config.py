"""Version, threads and a report of how the kernels were built and which ISA runs."""
import numbers
import os
import platform
import sys


def _why_no_extension(error):
    """Why ``from . import _C`` failed: Python's own message for a missing _C guesses "most
    likely due to a circular import"."""
    import importlib.machinery
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if os.path.isfile(os.path.join(here, "_C" + suffix)):   # there, and failed to load
            return f"{os.path.join(here, '_C' + suffix)} did not load: {error}"
    others = sorted(f for f in os.listdir(here)
                    if f.startswith("_C.") and f.endswith((".so", ".pyd")))
    if others:
        return f"the _C there is built for another Python ({', '.join(others)})"
    return "there is no built _C there (a source tree that was not built)"


try:
    from . import _C
except ImportError as _e:   # else: "partially initialized module ... circular import"
    if "FUSEDRNN_ISA=" in str(_e):  # _C loaded and refused the ISA forced: its message says all
        raise ImportError(str(_e)) from None
    raise ImportError(
        f"fusedrnn's compiled module fusedrnn._C did not import for this Python "
        f"({sys.implementation.cache_tag}) from {os.path.dirname(os.path.abspath(__file__))}: "
        f"{_why_no_extension(_e)}. Install the package (pip install . in the source tree), or "
        "build _C for this Python (README, fast rebuild)") from None   # (the why says all)

__version__ = _C.__version__


_in_forked_child = False


def set_num_threads(n):
    """Threads the kernels may use (overrides OMP_NUM_THREADS for fusedrnn), 1 to 1024. A build
    without OpenMP (``show_config()``: openmp False) runs on one thread: there this checks ``n``
    and ``get_num_threads()`` stays 1."""
    # Any integer, as the layers' sizes and torch.set_num_threads take (np.int64 too; numpy's
    # bool_ is no numbers.Integral, and this module imports no numpy: see _why_no_extension).
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"num_threads must be an int, got {type(n).__name__}")
    n = int(n)
    if n < 1:   # (checked here too: below C's int, pybind11 names no argument)
        raise ValueError(f"num_threads must be >= 1, got {n}")
    if n > _C.max_num_threads:   # (before the int reaches C++, which takes 32 bits)
        raise ValueError(f"num_threads must be <= {_C.max_num_threads} (more threads than any "
                         f"machine's CPUs; this one has {os.cpu_count()}), got {n}")
    if _in_forked_child and n > 1:
        raise RuntimeError(
            f"set_num_threads({n}) in a process made by fork(): GNU OpenMP's threads do not "
            "survive a fork, so a call on more than one thread could hang here; fusedrnn runs "
            "on one thread in a forked child. For threaded workers, start them with "
            "multiprocessing's 'spawn' or 'forkserver' method")
    _C.set_num_threads(n)


def _one_thread_after_fork():
    # The parent's OpenMP pool (ours, or torch's: the same libgomp) is gone in the child, yet
    # libgomp would wait for it at the next parallel region: the child would hang.
    global _in_forked_child
    _in_forked_child = True
    _C.set_num_threads(1)


os.register_at_fork(after_in_child=_one_thread_after_fork)


def empty_cache():
    """Give memory the kernels keep between calls back to the system: the blocks kept for reuse
    (up to 1 GiB, process-wide) and the calling thread's packed weights (up to 256 MiB and 4096
    packed forms a thread, which other threads' caches also hold until they call this or end),
    with those its OpenMP workers hold for the pipelined stacks and the bidirectional layers'
    directions side by side it ran.
    The next calls allocate and pack again."""
    _C.empty_cache()


def get_num_threads():
    """Threads the kernels use: set_num_threads's count, else OMP_NUM_THREADS's (at most 1024),
    else OpenMP's default (the CPUs the process may run on); 1 in a process made by fork() and
    in a build without OpenMP."""
    return _C.get_num_threads()


_POLICIES = {"adaptive": "adaptive", "fixed": "team"}   # public name -> the kernels' mode


def set_thread_policy(policy):
    """How a layer call uses its threads. "fixed" (the default): always the number set by
    ``set_num_threads``. "adaptive": the same, except for shapes where the call has been measured
    slower on them than on one thread; those run on one thread and try the threads again now and
    then (csrc/team_policy.h). It pays beside a process that keeps a core busy (long-seq LSTM on
    2 threads: a 6.2 ms mean call fixed, 1.4 ms adaptive, 0.96 ms on one thread) and can lose
    where the interference comes in short bursts (another library's threads still spinning),
    which it may take for lasting. Results are bitwise identical either way; setting the policy
    forgets what was measured. The environment variable FUSEDRNN_THREAD_POLICY sets it at
    import."""
    if not isinstance(policy, str):   # (before the dict: a list there raised "unhashable type")
        raise TypeError(f"thread policy must be a name, one of {sorted(_POLICIES)}, got "
                        f"{type(policy).__name__}")
    if policy not in _POLICIES:
        raise ValueError(f"thread policy must be one of {sorted(_POLICIES)}, got {policy!r}")
    _C.set_team_mode(_POLICIES[policy])


def get_thread_policy():
    """The thread policy in use, "fixed" or "adaptive" (see set_thread_policy)."""
    mode = _C.get_team_mode()
    return next((k for k, v in _POLICIES.items() if v == mode), mode)


_policy_env = os.environ.get("FUSEDRNN_THREAD_POLICY")
if _policy_env:   # as OMP_NUM_THREADS is for the thread count
    try:
        set_thread_policy(_policy_env)
    except ValueError:
        raise ImportError(f"FUSEDRNN_THREAD_POLICY={_policy_env} is not a thread policy; choose "
                          f"one of: {', '.join(sorted(_POLICIES))} (or unset it)") from None


def config():
    """The facts show_config() prints, as a dict."""
    import numpy as np
    return {
        "version": __version__,
        "isa": _C.isa(),
        "available_isas": list(_C.available_isas()),
        "vector_bytes": _C.vector_bytes(),
        "prefetch_ahead": _C.prefetch_ahead(),
        "openmp": bool(_C.openmp),
        "num_threads": _C.get_num_threads(),
        "thread_policy": get_thread_policy(),
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
