"""Peer: the NumPy reference (fusedrnn.reference), a plain Python loop over time.

It is timed only on the smallest cases (under REFERENCE_MAX_FLOP: online-small and long-seq of
the matrix); elsewhere the case reports it as skipped. NumPy's BLAS keeps its own thread
setting (threadpoolctl, when installed, limits it to the case's thread count); its many small
matmuls suffer badly when the BLAS runs more threads than there are idle cores (seconds instead
of tens of milliseconds).
"""
from ... import reference
from . import stack

REFERENCE_MAX_FLOP = 0.2e9


class ReferencePeer:
    name = "reference"
    modes = ("infer", "train")

    def __init__(self):
        import numpy
        self.version = f"numpy {numpy.__version__}"

    def set_threads(self, n):
        pass   # the BLAS thread limit is set around each case by the runner (threadpoolctl)

    def skip_reason(self, case):
        if case.flops > REFERENCE_MAX_FLOP:
            return (f"{case.flops / 1e9:.3g} GFLOP > {REFERENCE_MAX_FLOP / 1e9:g} GFLOP limit "
                    f"(a Python loop over time)")
        return None

    def prepare(self, problem, mode):
        return stack.StackRunner(reference, problem, mode)
