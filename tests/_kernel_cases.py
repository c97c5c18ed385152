"""Builds one single-layer case and runs it through both the NumPy reference (float64) and the
C++ kernels (any dtype, any ISA), returning every output and gradient side by side."""
import numpy as np

from fusedrnn import _C, functional, reference
from fusedrnn.tolerances import assert_close

# (cell, linear_before_reset, proj_size): every cell variant the kernels have.
VARIANTS = [
    ("rnn_tanh", True, 0),
    ("rnn_relu", True, 0),
    ("lstm", True, 0),
    ("lstm", True, 3),
    ("gru", True, 0),
    ("gru", False, 0),
]


def variant_id(v):
    cell, lbr, proj = v
    return cell + ("_proj" if proj else "") + ("" if cell != "gru" else "_lbr" if lbr else "_nolbr")


def tile_rows(isa):
    """A float32 row tile's rows on this ISA's kernels (csrc/gemm/microkernel.h, Tile::MR)."""
    return {16: 4, 32: 6, 64: 12}[_C.vector_bytes(isa)]


def hidden_past_l2(cell, I, proj=0, at_least=1):
    """The smallest hidden size from at_least whose float32 W_ih and W_hh together outgrow this
    host's L2: a forward step of a few rows on two threads then splits its hidden units, not its
    rows (forward_split.h, step_threads)."""
    gates = reference.gate_count(cell)
    H = at_least
    while gates * H * ((proj or H) + I) * 4 <= _C.cache_bytes()["l2"]:
        H += 1
    return H


def make_case(rng, cell, proj=0, T=5, B=3, I=6, H=11, bias=True, lengths=False, h0_zero=False):
    w = reference.init_weights(cell, I, H, proj, bias, np.float64, rng)
    H_out = proj or H
    case = dict(cell=cell, w=w, T=T, B=B)
    case["x"] = rng.standard_normal((T, B, I))
    case["h0"] = np.zeros((B, H_out)) if h0_zero else 0.5 * rng.standard_normal((B, H_out))
    case["c0"] = 0.5 * rng.standard_normal((B, H)) if cell == "lstm" else None
    case["lengths"] = rng.integers(1, T + 1, B) if lengths else None
    case["dy"] = rng.standard_normal((T, B, H_out))
    case["dhn"] = rng.standard_normal((B, H_out))
    case["dcn"] = rng.standard_normal((B, H)) if cell == "lstm" else None
    return case


def _cast(a, dtype):
    return None if a is None else a.astype(dtype, copy=False)   # (as given, if of dtype)


def run(case, runner, dtype=np.float64, reverse=False, linear_before_reset=True, **kw):
    """Forward + backward through `runner` (functional or reference); returns a flat dict."""
    w, c = case["w"], lambda a: _cast(a, dtype)
    y, hn, cn, ctx = runner.forward(case["cell"], c(case["x"]), c(case["h0"]), c(case["c0"]),
                                    c(w["w_ih"]), c(w["w_hh"]), c(w["b_ih"]), c(w["b_hh"]),
                                    c(w["w_hr"]), case["lengths"], reverse, linear_before_reset,
                                    True, **kw)
    dx, dh0, dc0, grads = runner.backward(ctx, c(case["dy"]), c(case["dhn"]), c(case["dcn"]))
    out = {"y": y, "hn": hn, "cn": cn}
    grad = {"dx": dx, "dh0": dh0, "dc0": dc0, **grads}
    return ({k: v for k, v in out.items() if v is not None},
            {k: v for k, v in grad.items() if v is not None})


def run_kernels(case, dtype, isa, **kw):
    return run(case, functional, dtype, isa=isa, **kw)


def run_reference(case, **kw):
    return run(case, reference, np.float64, **kw)


def assert_matches(case, dtype, isa, **kw):
    """The kernels (dtype, isa) against the float64 reference: every output within the forward
    tolerance, every gradient within the gradient one, each of the dtype asked for."""
    want_out, want_grad = run_reference(case, **kw)
    got_out, got_grad = run_kernels(case, dtype, isa, **kw)
    assert got_out.keys() == want_out.keys() and got_grad.keys() == want_grad.keys()
    for k in want_out:
        assert got_out[k].dtype == dtype
        assert_close(got_out[k], want_out[k], dtype, "forward", what=k)
    for k in want_grad:
        assert got_grad[k].dtype == dtype
        assert_close(got_grad[k], want_grad[k], dtype, "gradient", what=k)
