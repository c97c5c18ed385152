"""Training buffers that share the saved gates' memory: the forward's whole-sequence input
projection written where the gates will be saved (forward.h, gx_in_gates), and a consuming
backward's pre-activation gradients written over them (backward.h, in_gates; the torch-style
GRU's recurrent n gradients over its saved W_hn h + b_hn). Both must give the bits of the
separate buffers and hold those buffers' bytes less, and a consumed context must refuse a second
backward."""
import itertools

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _C, functional

from _kernel_cases import VARIANTS, make_case, variant_id

ISAS = list(_C.available_isas())
DTYPES = [np.float32, np.float64]
# B = 3: the input projection before the loop (gx_in_gates without lengths); B = 13: in the
# step; B = 1: riding along or before the loop, as measured (LSTM, GRU: csrc/ride_policy.cpp), or
# before the loop (RNN).
BATCHES = {"whole": 3, "in_step": 13, "single_row": 1}


def forward(case, dtype, isa, training, reverse, lbr):
    w, c = case["w"], lambda a: None if a is None else a.astype(dtype)
    return functional.forward(case["cell"], c(case["x"]), c(case["h0"]), c(case["c0"]),
                              c(w["w_ih"]), c(w["w_hh"]), c(w["b_ih"]), c(w["b_hh"]), c(w["w_hr"]),
                              case["lengths"], reverse, lbr, training, isa)


def backward(case, ctx, dtype, consume):
    c = lambda a: None if a is None else a.astype(dtype)
    dx, dh0, dc0, grads = functional.backward(ctx, c(case["dy"]), c(case["dhn"]), c(case["dcn"]),
                                              consume=consume)
    return {"dx": dx, "dh0": dh0, "dc0": dc0, **grads}


def assert_same_bits(got, want):
    assert got.keys() == want.keys()
    for k in want:
        if want[k] is None:
            assert got[k] is None, k
        else:
            assert np.array_equal(got[k], want[k]), k


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("lengths,reverse", list(itertools.product([False, True], repeat=2)))
def test_consuming_backward_gives_the_same_bits(rng, isa, dtype, variant, batch, lengths, reverse):
    cell, lbr, proj = variant
    B = BATCHES[batch]
    case = make_case(rng, cell, proj, T=6, B=B, I=7, H=21, lengths=lengths and B > 1)
    code = functional.CELL_CODES[cell]
    mode = _C.projection_mode(code, B, 7, 21, proj or 21, dtype == np.float64,
                              lengths=case["lengths"] is not None, isa=isa)
    if batch == "whole" or (batch == "single_row" and cell.startswith("rnn")) or case["lengths"] is not None:
        assert mode == "whole"
    ctx = forward(case, dtype, isa, True, reverse, lbr)[3]
    kept = backward(case, ctx, dtype, consume=False)
    assert_same_bits(backward(case, ctx, dtype, consume=False), kept)  # still whole
    assert_same_bits(backward(case, ctx, dtype, consume=True), kept)
    with pytest.raises(RuntimeError, match="consume=True"):
        backward(case, ctx, dtype, consume=False)


def backward_peak_bytes(case, ctx, dtype, consume):
    """The most bytes the kernels' blocks (their scratch and the arrays they return) held at once
    during a backward, beyond those in use before it."""
    before = _C.workspace_bytes(reset_peak=True)["in_use"]
    backward(case, ctx, dtype, consume)
    return _C.workspace_bytes()["peak"] - before


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("lengths,reverse", list(itertools.product([False, True], repeat=2)))
def test_consuming_backward_keeps_its_gradients_in_the_saved_state(rng, variant, lengths,
                                                                   reverse):
    """A consuming backward of a forward-direction run (lengths or not) writes its pre-activation
    gradients over the saved gates, and the torch-style GRU its recurrent n gradients over the
    saved W_hn h + b_hn; a reversed run its recurrent side's, in step order as the gates lie (the
    input side's, in time order, stay apart): at its peak it holds exactly those buffers' bytes
    less than a backward that keeps the context (the Elman RNN saves no gates: the same)."""
    cell, lbr, proj = variant
    T, B, H, itemsize = 16, 8, 32, 4
    case = make_case(rng, cell, proj, T=T, B=B, I=24, H=H, lengths=lengths)
    G = {"lstm": 4, "gru": 3}.get(cell, 0)
    n_apart = cell == "gru" and lbr and not reverse
    in_saved = T * B * (G + n_apart) * H * itemsize
    peaks = []
    for consume in (False, True, False, True):  # (the first calls: the threads' lasting buffers)
        ctx = forward(case, np.float32, None, True, reverse, lbr)[3]
        peaks.append(backward_peak_bytes(case, ctx, np.float32, consume))
    assert peaks[2] - peaks[3] == in_saved


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("reverse", [False, True])
def test_training_forward_gives_the_inference_bits(rng, isa, dtype, variant, reverse):
    """The whole-sequence projection written into the saved gates (training) and into its own
    buffer (inference) meet the same tiles: y and the final states agree bit for bit."""
    cell, lbr, proj = variant
    case = make_case(rng, cell, proj, T=7, B=5, I=9, H=37)
    assert _C.projection_mode(functional.CELL_CODES[cell], 5, 9, 37, proj or 37,
                              dtype == np.float64, isa=isa) == "whole"
    trained = forward(case, dtype, isa, True, reverse, lbr)[:3]
    inferred = forward(case, dtype, isa, False, reverse, lbr)[:3]
    for got, want in zip(trained, inferred):
        if want is None:
            assert got is None
        else:
            assert np.array_equal(got, want)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_consuming_backward_on_two_threads(rng, variant, fixed_threads):
    """The backward's team (rows of the pointwise maths split between members) reading and
    overwriting the gates gives the one-thread bits, for both ways a forward step is split."""
    if not _C.openmp:
        pytest.skip("built without OpenMP: one thread only")
    cell, lbr, proj = variant
    before = fusedrnn.get_num_threads()
    try:
        for B, H in ((96, 128), (12, 300)):
            case = make_case(rng, cell, proj and 24, T=4, B=B, I=20, H=H)
            results = []
            for n in (1, 2):
                fusedrnn.set_num_threads(n)
                ctx = forward(case, np.float32, None, True, False, lbr)[3]
                results.append(backward(case, ctx, np.float32, consume=True))
            assert_same_bits(results[1], results[0])
    finally:
        fusedrnn.set_num_threads(before)


def test_layer_backward_consumes_its_forward(rng):
    """The layers run their backward with consume=True and then forget the forward: a second
    backward raises the layer's own error, and the gradients match a functional backward that
    keeps its context."""
    layer = fusedrnn.LSTM(5, 8, num_layers=2, seed=3)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    dy = rng.standard_normal((4, 3, 8)).astype(np.float32)
    layer.train()
    layer(x)
    dx, _ = layer.backward(dy)
    with pytest.raises(RuntimeError, match="backward"):
        layer.backward(dy)
    y0, _, _, ctx0 = functional.forward("lstm", x, np.zeros((3, 8), np.float32),
                                        np.zeros((3, 8), np.float32), layer.weight_ih_l0,
                                        layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0)
    y1, _, _, ctx1 = functional.forward("lstm", y0, np.zeros((3, 8), np.float32),
                                        np.zeros((3, 8), np.float32), layer.weight_ih_l1,
                                        layer.weight_hh_l1, layer.bias_ih_l1, layer.bias_hh_l1)
    d_y0, _, _, g1 = functional.backward(ctx1, dy)
    want_dx, _, _, g0 = functional.backward(ctx0, d_y0)
    assert np.array_equal(dx, want_dx)
    assert np.array_equal(layer.grads["weight_hh_l1"], g1["weight_hh"])
    assert np.array_equal(layer.grads["weight_ih_l0"], g0["weight_ih"])


def test_concurrent_backwards_never_read_consumed_gates(rng):
    """Threads running backward on one context while another consumes it: every backward that
    runs gives the kept context's bits (a consuming backward overwrites the gates only while no
    other runs, bindings/backward.cpp), and those after the consuming one raise."""
    import threading
    case = make_case(rng, "lstm", 0, T=40, B=4, I=64, H=256)
    ctx = forward(case, np.float32, None, True, False, True)[3]
    want = backward(case, ctx, np.float32, consume=False)
    results, refused = [], []

    def worker(consume):
        for _ in range(1 if consume else 6):
            try:
                results.append(backward(case, ctx, np.float32, consume=consume))
            except RuntimeError as e:
                assert "consume=True" in str(e)
                refused.append(consume)

    threads = [threading.Thread(target=worker, args=(c,)) for c in (False, False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) + len(refused) == 13 and True not in refused
    for got in results:
        assert_same_bits(got, want)
