"""Stacks of layers in one kernel call (functional.forward_stack, csrc/sequence/layer_pipeline.h):
on a thread per layer the layers run side by side, each a step behind the one below. Every layer
is the one-thread computation either way, so the pipeline must give the bits of the layers run
one by one on one thread, forward and through backward."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _C, functional, reference
from fusedrnn.tolerances import assert_close
from _threads import results_from_threads
from test_kernels import in_step_fits_l2, projection_apart

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
# (cell, linear_before_reset, proj): every cell and option a stack can have
VARIANTS = [("rnn_tanh", True, 0), ("rnn_relu", True, 0), ("lstm", True, 0), ("lstm", True, 7),
            ("gru", True, 0), ("gru", False, 0)]
needs_threads = pytest.mark.skipif(not _C.openmp, reason="built without OpenMP: one thread only")


def make_stack(rng, cell, dtype, L=2, T=51, B=9, I=None, H=12, proj=0, bias=True, scale=0.4):
    """x and per-layer (h0, c0, weights) for a stack; by default every layer has the same work
    (I = H_out) and the steps are many enough for the pipeline (T >= 50, B >= 8). Weights
    uniform in +-scale (for wide layers about 1/sqrt(H), as torch's, or a relu RNN overflows)."""
    G, H_out = GATES[cell], proj or H
    I = H_out if I is None else I
    u = lambda *shape: rng.uniform(-scale, scale, shape).astype(dtype)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = [u(B, H_out) for _ in range(L)]
    c0 = [u(B, H) if cell == "lstm" else None for _ in range(L)]
    layers = [(u(G * H, I if k == 0 else H_out), u(G * H, H_out),
               u(G * H) if bias else None, u(G * H) if bias else None,
               u(H_out, H) if proj else None) for k in range(L)]
    return x, h0, c0, layers


def layer_by_layer(module, cell, x, h0, c0, layers, lbr=True, training=False, **kw):
    """The stack as separate forward calls of ``module`` (functional or reference)."""
    outs, layer_in = [], x
    for k, (w_ih, w_hh, b_ih, b_hh, w_hr) in enumerate(layers):
        outs.append(module.forward(cell, layer_in, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, w_hr,
                                   linear_before_reset=lbr, training=training, **kw))
        layer_in = outs[-1][0]
    return outs


def backward_through(outs, dy):
    """BPTT down the stack from the top layer's dy: every layer's dx, dh0, dc0 and grads."""
    results, d_out = [], dy
    for _, _, _, ctx in reversed(outs):
        dx, dh0, dc0, grads = functional.backward(ctx, d_out)
        results += [dx, dh0, dc0] + [grads[k] for k in sorted(grads)]
        d_out = dx
    return results


def stack_calls_during(fn):
    before = _C.stack_calls()
    result = fn()
    after = _C.stack_calls()
    return result, {k: after[k] - before[k] for k in after}


@needs_threads
@pytest.mark.parametrize("isa", _C.available_isas())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell,lbr,proj", VARIANTS)
def test_pipelined_stack_gives_the_one_thread_bits(two_threads, rng, isa, dtype, cell, lbr, proj):
    x, h0, c0, layers = make_stack(rng, cell, dtype, proj=proj)
    dy = rng.standard_normal((x.shape[0], x.shape[1], proj or 12)).astype(dtype)
    outs, ran = stack_calls_during(lambda: functional.forward_stack(
        cell, x, h0, c0, layers, linear_before_reset=lbr, isa=isa))
    assert ran == {"pipelined": 1, "layer_by_layer": 0}
    fusedrnn.set_num_threads(1)
    alone = layer_by_layer(functional, cell, x, h0, c0, layers, lbr, training=True, isa=isa)
    for got, want in zip(outs, alone):
        for a, b in zip(got[:3], want[:3]):
            assert (a is None and b is None) or np.array_equal(a, b)
    for a, b in zip(backward_through(outs, dy), backward_through(alone, dy)):
        assert (a is None and b is None) or np.array_equal(a, b)
    # and the numbers are right, not only the same
    want = layer_by_layer(reference, cell, x.astype(np.float64), [h.astype(np.float64) for h in h0],
                          [None if c is None else c.astype(np.float64) for c in c0],
                          [tuple(None if w is None else w.astype(np.float64) for w in ws)
                           for ws in layers], lbr)
    assert_close(outs[-1][0], want[-1][0], dtype, what="top layer's y")
    assert_close(outs[0][1], want[0][1], dtype, what="bottom layer's hn")


def whole_gemm_shape(cell, proj, dtype, isa):
    """(H, H_out) of a layer (I = H_out) whose projection this host's rule takes as one GEMM
    before the loop (projection_mode.h, projection_apart) though it would fit in the step:
    found from this host's L2, so the case exists on any host."""
    f64 = dtype == np.float64
    for H in range(16, 2048, 4):
        H_out = H // 2 if proj else H
        if (projection_apart(cell, 13, H_out, H, H_out, f64, isa)
                and in_step_fits_l2(cell, 13, H_out, H_out, f64, isa)):
            assert _C.projection_mode(functional.CELL_CODES[cell], 13, H_out, H, H_out, f64, isa=isa) == "whole"
            return H, H_out
    raise AssertionError(f"no {cell} shape takes the GEMM apart on this host")


@needs_threads
@pytest.mark.parametrize("isa", _C.available_isas())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell,lbr,proj", VARIANTS)
def test_a_stack_whose_layers_take_the_gemm_pipelines_with_its_bits(two_threads, rng, isa, dtype,
                                                                   cell, lbr, proj):
    """Layers whose projection the rule takes as one GEMM (past L2 with W_ih) take it in their
    steps in a pipelined stack (in_step_when_pipelined), k whole in every tile, so the bits are
    the GEMM's: B = 13 leaves a tile of 1 row (12 + 1, 6 + 6 + 1, 4 * 3 + 1), which would split
    k. The amx build's float32 keeps the GEMM and runs the layers one by one."""
    H, H_out = whole_gemm_shape(cell, proj, dtype, isa)
    x, h0, c0, layers = make_stack(rng, cell, dtype, B=13, H=H, proj=H_out if proj else 0,
                                   scale=1 / np.sqrt(H))
    outs, ran = stack_calls_during(lambda: functional.forward_stack(
        cell, x, h0, c0, layers, linear_before_reset=lbr, isa=isa))
    assert np.all(np.abs(outs[-1][0]) < 1e3) and np.std(outs[-1][0]) > 1e-2  # numbers, not inf
    pipelines = not (isa == "amx" and dtype == np.float32)
    assert ran == {"pipelined": int(pipelines), "layer_by_layer": int(not pipelines)}
    fusedrnn.set_num_threads(1)
    alone = layer_by_layer(functional, cell, x, h0, c0, layers, lbr, training=True, isa=isa)
    for got, want in zip(outs, alone):
        for a, b in zip(got[:3], want[:3]):
            assert (a is None and b is None) or np.array_equal(a, b)


@needs_threads
@pytest.mark.parametrize("case", ["three layers on two threads", "unequal layers", "few rows",
                                  "few steps", "adaptive policy"])
@pytest.mark.parametrize("isa", _C.available_isas())
def test_stacks_that_cannot_pipeline_run_layer_by_layer(two_threads, rng, case, isa):
    """Where one thread a layer would not pay (or could not run), the same call runs each layer
    on the team, with the same results as separate calls."""
    kw = {"three layers on two threads": dict(L=3), "unequal layers": dict(I=48),
          "few rows": dict(B=4), "few steps": dict(T=20), "adaptive policy": {}}[case]
    x, h0, c0, layers = make_stack(rng, "lstm", np.float32, **kw)
    if case == "adaptive policy":
        fusedrnn.set_thread_policy("adaptive")
    outs, ran = stack_calls_during(
        lambda: functional.forward_stack("lstm", x, h0, c0, layers, training=False, isa=isa))
    assert ran == {"pipelined": 0, "layer_by_layer": 1}
    for got, want in zip(outs, layer_by_layer(functional, "lstm", x, h0, c0, layers, isa=isa)):
        for a, b in zip(got[:3], want[:3]):
            assert np.array_equal(a, b)


@needs_threads
def test_a_pipelined_layer_whose_input_does_not_split_runs_again(two_threads, rng):
    """On AMX tiles (csrc/sequence/amx_step.h) a layer's steps need its x found finite, and a
    pipelined layer above the first starts before the layer below has written its x: it checks
    each step's rows as it goes, and where the layer below wrote an infinity the stack runs it
    again as a separate call would (which scans x first and takes the FMA kernels), with the
    same bits."""
    if "amx" not in _C.available_isas():
        pytest.skip("no AMX here (CPU or OS)")
    # H = 28 pads its unit block little, so the projection is in the step (projection_mode.h
    # pads_little) and a layer's steps take the tiles, x's rows split with them
    x, h0, c0, layers = make_stack(rng, "rnn_relu", np.float32, B=32, H=28)
    finite = [functional.forward_stack("rnn_relu", x, h0, c0, layers, isa=isa)[1][0]
              for isa in ("amx", "avx512")]
    assert not np.array_equal(*finite)  # the upper layer's steps take the tiles
    x[40, 3] = 3e38  # the bottom layer's state overflows there: its W_ih row sums pass 1.2
    w_ih, *rest = layers[0]
    layers[0] = (np.abs(w_ih) + 0.1, *rest)
    outs, ran = stack_calls_during(
        lambda: functional.forward_stack("rnn_relu", x, h0, c0, layers, isa="amx"))
    assert ran == {"pipelined": 1, "layer_by_layer": 0}
    assert np.isinf(outs[0][0][40:]).any() and np.isfinite(outs[0][0][:40]).all()
    alone = layer_by_layer(functional, "rnn_relu", x, h0, c0, layers, training=True, isa="amx")
    for got, want in zip(outs, alone):
        for a, b in zip(got[:2], want[:2]):  # y and hn (an Elman RNN has no c)
            assert np.array_equal(a, b, equal_nan=True)
    # The bottom layer's infinite state does not split for the tiles either (its products were
    # NaN from step 41): that layer runs again too, and the stack gives the FMA kernels' bits.
    fma = functional.forward_stack("rnn_relu", x, h0, c0, layers, isa="avx512")
    for got, want in zip(outs, fma):
        for a, b in zip(got[:2], want[:2]):
            np.testing.assert_array_equal(a, b)
    # and what the layer run again saved for its backward is the separate call's
    dy = rng.standard_normal(outs[-1][0].shape).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for a, b in zip(backward_through(outs, dy), backward_through(alone, dy)):
            assert (a is None and b is None) or np.array_equal(a, b, equal_nan=True)


@needs_threads
def test_layers_run_one_way_stacks_through_the_pipeline(two_threads, rng):
    """fusedrnn.LSTM with num_layers=2 takes the stack path; bidirectional stacks (one call per
    layer for both directions: test_direction_pair.py) and dropout between layers do not."""
    x = rng.standard_normal((60, 8, 16)).astype(np.float32)
    for kwargs, pipelined in ((dict(), 1), (dict(bidirectional=True), 0), (dict(dropout=0.5), 0)):
        layer = fusedrnn.LSTM(16, 16, num_layers=2, seed=1, **kwargs)
        _, ran = stack_calls_during(lambda: layer(x))   # training mode: dropout applies
        assert ran["pipelined"] == pipelined, kwargs


def test_stack_arguments_are_checked_with_their_names(rng):
    x, h0, c0, layers = make_stack(rng, "gru", np.float32)
    with pytest.raises(ValueError, match=r"h0 must have shape \(9, 12\), got \(9, 5\)"):
        functional.forward_stack("gru", x, [h0[0], h0[1][:, :5]], c0, layers)
    bad = list(layers)
    bad[1] = (layers[1][0], layers[1][1].astype(np.float64)) + layers[1][2:]
    with pytest.raises(TypeError, match="w_hh must have dtype float32"):
        functional.forward_stack("gru", x, h0, c0, bad)
    bad[1] = (layers[1][0][:, :5],) + layers[1][1:]
    with pytest.raises(ValueError, match=r"w_ih must have shape \(36, 12\)"):
        functional.forward_stack("gru", x, h0, c0, bad)
    with pytest.raises(ValueError, match="one entry per layer"):
        functional.forward_stack("gru", x, h0[:1], c0, layers)


@pytest.mark.parametrize("training", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("arg", ["h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"])
def test_a_stack_reads_arrays_that_are_not_c_contiguous(rng, arg, training):
    """The kernels take a copy of such an array (checked=True passes them on as they are, as the
    torch adapter's tensor views can be); the copy must live until they have read it: each layer's
    copies were freed before the stack ran, and the kernels read freed memory (h0 transposed, as
    a batch-first model's hx can be: outputs 0.03 off)."""
    x, h0, c0, layers = make_stack(rng, "lstm", np.float32, L=3, proj=7)
    strided = lambda a: np.repeat(a, 2, axis=-1)[..., ::2]   # same values, every other element
    h0_given = [strided(h) for h in h0] if arg == "h0" else h0
    c0_given = [strided(c) for c in c0] if arg == "c0" else c0
    names = ["w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]
    i = names.index(arg) if arg in names else None
    given = layers if i is None else [w[:i] + (strided(w[i]),) + w[i + 1:] for w in layers]
    run = lambda h, c, w: functional.forward_stack("lstm", x, h, c, w, training=training,
                                                   checked=True)
    got = run(h0_given, c0_given, given)
    want = run(h0, c0, layers)
    for k, (g, w) in enumerate(zip(got, want)):
        for what, a, b in zip(("y", "hn", "cn"), g[:3], w[:3]):
            np.testing.assert_array_equal(a, b, err_msg=f"layer {k} {what}")
    if training:
        dy = rng.standard_normal(got[-1][0].shape).astype(np.float32)
        for a, b in zip(backward_through(got, dy), backward_through(want, dy)):
            np.testing.assert_array_equal(a, b)


@needs_threads
def test_concurrent_pipelined_stacks_from_python_threads(two_threads, rng):
    x, h0, c0, layers = make_stack(rng, "lstm", np.float32, H=32)
    def stack():
        return functional.forward_stack("lstm", x, h0, c0, layers, training=False)[-1][0]

    want = stack()
    got = results_from_threads(stack, threads=3, calls_each=3)
    assert len(got) == 9 and all(np.array_equal(y, want) for y in got)


@needs_threads
@pytest.mark.parametrize("frozen", [False, True])
def test_a_pipelined_stack_keeps_packed_weights_only_where_empty_cache_reaches(two_threads, rng,
                                                                              frozen):
    """The layers of a pipelined stack above the first run on the kernels' OpenMP threads, which
    never end and never call empty_cache(): their packed weights stayed in those threads' caches
    (up to 256 MiB), out of reach. 2000 inference calls of fresh LSTM(16, 16, num_layers=2) on 8
    rows, 2 threads, then empty_cache(): 93 MiB resident against 37 on one thread. Now
    empty_cache() clears those workers' caches too, and leaves no form anywhere."""
    x = rng.standard_normal((60, 8, 16)).astype(np.float32)
    fusedrnn.empty_cache()
    before = _C.packed_forms_all_threads()
    layers = [fusedrnn.LSTM(16, 16, num_layers=2, seed=seed).eval() for seed in range(3)]
    for layer in layers:                         # all alive: new arrays, new forms
        if frozen:
            layer.freeze()
        _, ran = stack_calls_during(lambda: layer(x))
        assert ran["pipelined"] == 1
    assert _C.packed_cache()["forms"] > 0
    fusedrnn.empty_cache()
    assert _C.packed_forms_all_threads() == before


@needs_threads
def test_a_team_short_of_threads_runs_the_layers_in_turn():
    """OMP_THREAD_LIMIT=1: the pipeline's team comes out with one thread, which then runs the
    layers in turn (same bits), and the call counts as layer by layer."""
    code = """
import numpy as np, fusedrnn
from fusedrnn import _C, functional
import test_layer_pipeline as t
rng = np.random.default_rng(0)
x, h0, c0, layers = t.make_stack(rng, "lstm", np.float32)
fusedrnn.set_num_threads(2)
got = functional.forward_stack("lstm", x, h0, c0, layers, training=False)
fusedrnn.set_num_threads(1)
want = t.layer_by_layer(functional, "lstm", x, h0, c0, layers)
assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(got, want))
print(_C.stack_calls())
"""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_THREAD_LIMIT="1",
               PYTHONPATH=os.pathsep.join([here] + [os.path.abspath(p) for p in sys.path if p]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'pipelined': 0, 'layer_by_layer': 1" in out.stdout
