"""Correctness right before timing (the benchmark and the tests share the oracle).

1. ``against_reference``: fusedrnn (float32) against the float64 NumPy reference on the case's
   weights, cut to the first CHECK_T steps and CHECK_B batch rows (the reference is a Python
   loop), with the tolerances of ``fusedrnn.tolerances``.
2. ``agreement``: every peer's full-size float32 outputs against fusedrnn's. Two float32
   implementations each differ from the exact result by up to the float32 tolerance, in
   different directions and over up to 1000 steps, so they are compared at PEER_FACTOR times it.
"""
import numpy as np

from .. import tolerances
from .peers import reference as reference_peer

CHECK_T = 10
CHECK_B = 4
PEER_FACTOR = 10
FORWARD_KEYS = ("y", "hn", "cn")

F32 = np.dtype(np.float32)


def largest_errors(got, want):
    """(max forward error, max gradient error) over the keys both dicts have."""
    fwd, grad = 0.0, None
    for key in sorted(set(got) & set(want)):
        err = tolerances.max_scaled_error(got[key], want[key])
        if key in FORWARD_KEYS:
            fwd = max(fwd, err)
        else:
            grad = err if grad is None else max(grad, err)
    return fwd, grad


def _verdict(fwd, grad, factor=1):
    fwd_tol = factor * tolerances.FORWARD[F32]
    grad_tol = factor * tolerances.GRADIENT[F32]
    ok = fwd <= fwd_tol and (grad is None or grad <= grad_tol)
    return {"forward_error": fwd, "forward_tol": fwd_tol,
            "gradient_error": grad, "gradient_tol": grad_tol if grad is not None else None,
            "ok": bool(ok)}


def against_reference(ours, problem, mode):
    """Check fusedrnn on a truncated copy of ``problem`` against the float64 reference."""
    T, B = problem.shape[:2]
    small = problem.truncated(min(T, CHECK_T), min(B, CHECK_B))
    runner = ours.prepare(small, mode)
    got = runner.outputs(runner())
    want_runner = reference_peer.ReferencePeer().prepare(small.astype(np.float64), mode)
    want = want_runner.outputs(want_runner())
    result = _verdict(*largest_errors(got, want))
    result.update({"against": "reference (float64)", "T": small.shape[0], "B": small.shape[1]})
    return result


def agreement(got, want):
    """A peer's outputs against fusedrnn's, at PEER_FACTOR times the float32 tolerances."""
    result = _verdict(*largest_errors(got, want), factor=PEER_FACTOR)
    result["compared"] = sorted(set(got) & set(want))
    return result
