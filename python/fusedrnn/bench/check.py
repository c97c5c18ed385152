"""Correctness right before timing (the benchmark and the tests share the oracle).

1. ``against_reference``: fusedrnn (float32) against the float64 NumPy reference on the case's
   weights, cut to the first CHECK_T steps and CHECK_B batch rows (the reference is a Python
   loop), with the tolerances of ``fusedrnn.tolerances``; and fusedrnn at the case's full shape
   (the paths the timed calls take: the projection in the step, chunked backward, pipelined
   stacks) on its first and last batch rows, all steps, at PEER_FACTOR times them (as 2.).
2. ``agreement``: every peer's full-size float32 outputs against fusedrnn's. Two float32
   implementations each differ from the exact result by up to the float32 tolerance, in
   different directions and over up to 1000 steps, so they are compared at PEER_FACTOR times it.
Both fail on an output one side has and the other has not: a peer that skips the weight
gradients does less work, and an output the reference lacks goes unchecked.
"""
import dataclasses

import numpy as np

from .. import tolerances
from .peers import reference as reference_peer

CHECK_T = 10
CHECK_B = 4
PEER_FACTOR = 10
FORWARD_KEYS = ("y", "hn", "cn")
BATCH_KEYS = ("y", "hn", "cn", "dx", "dh0", "dc0")  # outputs with a batch axis (axis 1)

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


def _verdict(got, want, factor=1, partial=False):
    """The errors of ``got`` against ``want`` and whether they are within ``factor`` times the
    float32 tolerances, every output of each in the other (``unmatched``: those that are not;
    with ``partial``, only got's must be in want)."""
    fwd, grad = largest_errors(got, want)
    unmatched = sorted(set(got) - set(want) if partial else set(got) ^ set(want))
    fwd_tol = factor * tolerances.FORWARD[F32]
    grad_tol = factor * tolerances.GRADIENT[F32]
    ok = fwd <= fwd_tol and (grad is None or grad <= grad_tol)
    return {"forward_error": fwd, "forward_tol": fwd_tol,
            "gradient_error": grad, "gradient_tol": grad_tol if grad is not None else None,
            "unmatched": unmatched, "ok": bool(ok) and not unmatched}


def against_reference(ours, problem, mode):
    """Check fusedrnn on a truncated copy of ``problem`` against the float64 reference, and at
    the full shape on two batch rows (``full_rows``); ``ok`` when both are."""
    T, B = problem.shape[:2]
    small = problem.truncated(min(T, CHECK_T), min(B, CHECK_B))
    runner = ours.prepare(small, mode)
    got = runner.outputs(runner())
    want = _reference_outputs(small, mode)
    result = _verdict(got, want)
    result.update({"against": "reference (float64)", "T": small.shape[0], "B": small.shape[1]})
    result["full_rows"] = full = _full_shape_rows(ours, problem, mode)
    result["ok"] = result["ok"] and full["ok"]
    return result


def _reference_outputs(problem, mode):
    runner = reference_peer.ReferencePeer().prepare(problem.astype(np.float64), mode)
    return runner.outputs(runner())


def _full_shape_rows(ours, problem, mode):
    """fusedrnn at the full shape against the reference on the first and last batch rows: dy
    is zero on the others, so the weight gradients come from these rows alone (the reference
    runs them alone: a Python loop over time, on two rows)."""
    B = problem.shape[1]
    rows = sorted({0, B - 1})
    dy = np.zeros_like(problem.dy)
    dy[:, rows] = problem.dy[:, rows]
    runner = ours.prepare(dataclasses.replace(problem, dy=dy), mode)
    got = runner.outputs(runner())
    got = {k: v[:, rows] if k in BATCH_KEYS else v for k, v in got.items()}
    want = _reference_outputs(problem.rows(rows), mode)
    result = _verdict(got, want, factor=PEER_FACTOR)
    result["rows"] = rows
    return result


def agreement(got, want, partial=False):
    """A peer's outputs against fusedrnn's, at PEER_FACTOR times the float32 tolerances.
    ``partial``: the peer was told to compute fewer (bench/adapter_vs_torch.py --needs)."""
    result = _verdict(got, want, factor=PEER_FACTOR, partial=partial)
    result["compared"] = sorted(set(got) & set(want))
    return result
