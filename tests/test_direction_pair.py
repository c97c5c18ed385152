"""A bidirectional layer's two directions in one kernel call (functional.forward_directions and
backward_directions, csrc/sequence/direction_pair.h): on two threads they run side by side, one
thread each. Each direction is the one-thread computation either way, so the pair must give the
bits of the directions run as separate calls on one thread, forward and backward."""
import numpy as np
import pytest

import fusedrnn
from fusedrnn import _C, functional, reference
from fusedrnn.tolerances import assert_close
from _kernel_cases import VARIANTS, _cast, make_case, variant_id
from _threads import results_from_threads

needs_threads = pytest.mark.skipif(not _C.openmp, reason="built without OpenMP: one thread only")


def directions_case(rng, cell, proj, dtype, T=100, B=3, I=6, H=24, lengths=False):
    """x, the state and weights of both directions, and the backward's per-direction inputs."""
    cases = [make_case(rng, cell, proj, T=T, B=B, I=I, H=H, lengths=lengths) for _ in range(2)]
    c = lambda a: _cast(a, dtype)  # noqa: E731
    x = c(cases[0]["x"])
    weights = [tuple(c(case["w"][k]) for k in ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr"))
               for case in cases]
    per = {k: [c(case[k]) for case in cases] for k in ("h0", "c0", "dy", "dhn", "dcn")}
    return x, cases[0]["lengths"], weights, per


def calls_during(fn):
    before = _C.direction_calls()
    result = fn()
    after = _C.direction_calls()
    return result, {k: after[k] - before[k] for k in after}


def separate_calls(cell, x, lengths, weights, per, lbr, isa):
    """Each direction as a forward and a backward call of its own: forward's and backward's
    outputs per direction."""
    outs = []
    for d in range(2):
        y, hn, cn, ctx = functional.forward(cell, x, per["h0"][d], per["c0"][d], *weights[d],
                                            lengths=lengths, reverse=bool(d),
                                            linear_before_reset=lbr, isa=isa)
        outs.append(((y, hn, cn), functional.backward(ctx, per["dy"][d], per["dhn"][d],
                                                      per["dcn"][d])))
    return outs


def paired_calls(cell, x, lengths, weights, per, lbr, isa, consume=False):
    forwards = functional.forward_directions(cell, x, per["h0"], per["c0"], weights,
                                             lengths=lengths, linear_before_reset=lbr, isa=isa)
    backwards = functional.backward_directions([f[3] for f in forwards], per["dy"], per["dhn"],
                                               per["dcn"], consume=consume)
    return [(f[:3], b) for f, b in zip(forwards, backwards)]


def assert_same_bits(got, want):
    for (fwd, bwd), (fwd_want, bwd_want) in zip(got, want):
        for a, b in zip(list(fwd) + list(bwd[:3]), list(fwd_want) + list(bwd_want[:3])):
            assert (a is None and b is None) or np.array_equal(a, b)
        assert set(bwd[3]) == set(bwd_want[3])
        for name, g in bwd[3].items():
            assert np.array_equal(g, bwd_want[3][name]), name


@needs_threads
@pytest.mark.parametrize("isa", _C.available_isas())
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("B,lengths", [(1, False), (3, False), (3, True)])
def test_directions_side_by_side_give_the_one_thread_bits(two_threads, rng, isa, dtype, variant,
                                                          B, lengths):
    cell, lbr, proj = variant
    x, lens, weights, per = directions_case(rng, cell, proj, dtype, B=B, lengths=lengths)
    got, ran = calls_during(lambda: paired_calls(cell, x, lens, weights, per, lbr, isa,
                                                 consume=True))
    assert ran == {"side_by_side": 2, "in_turn": 0}  # the forward and the backward
    fusedrnn.set_num_threads(1)
    assert_same_bits(got, separate_calls(cell, x, lens, weights, per, lbr, isa))
    # and the numbers are right, not only the same
    f64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    for d in range(2):
        y, hn, _, _ = reference.forward(cell, f64(x), f64(per["h0"][d]), f64(per["c0"][d]),
                                        *map(f64, weights[d]), lens, bool(d), lbr)
        assert_close(got[d][0][0], y, dtype, what=f"direction {d}'s y")
        assert_close(got[d][0][1], hn, dtype, what=f"direction {d}'s hn")


def l2_sized_hidden():
    """An Elman RNN's H whose W_hh (float32) is 7/8 of this host's L2: a single row's direction
    then fits L2 only on a team (direction_pair.h, directions_side_by_side)."""
    return int(np.sqrt(_C.cache_bytes()["l2"] * 7 / 8 / 4))


def l3_filling_hidden():
    """An Elman RNN's H (I = 4, float32) whose two directions' weights fill more than 3/4 of
    this host's L3 (direction_pair.h, directions_side_by_side)."""
    return int(np.sqrt(_C.cache_bytes()["l3"] * 3 / 4 / 8)) + 16


@needs_threads
@pytest.mark.parametrize("case", ["one thread", "adaptive policy", "little work",
                                  "W_hh fits L2 only halved", "weights fill L3"])
def test_directions_that_would_not_gain_run_in_turn(two_threads, rng, case):
    """Where two threads a direction would not pay (or are not there), the same call runs each
    direction in turn on the team, with the same results as separate calls."""
    shape = {"little work": dict(T=2, B=1, I=2, H=3),
             "W_hh fits L2 only halved": dict(T=3, B=1, I=4, H=l2_sized_hidden()),
             "weights fill L3": dict(T=2, B=2, I=4, H=l3_filling_hidden())}
    x, lens, weights, per = directions_case(rng, "rnn_tanh", 0, np.float32,
                                            **shape.get(case, {}))
    if case == "one thread":
        fusedrnn.set_num_threads(1)
    if case == "adaptive policy":
        fusedrnn.set_thread_policy("adaptive")
    got, ran = calls_during(lambda: paired_calls("rnn_tanh", x, lens, weights, per, True, None))
    assert ran == {"side_by_side": 0, "in_turn": 2}
    assert_same_bits(got, separate_calls("rnn_tanh", x, lens, weights, per, True, None))


@needs_threads
def test_a_bidirectional_layer_runs_its_directions_in_one_call(two_threads, rng):
    """fusedrnn's layers (and so the torch adapter) take the pair for every bidirectional layer
    of a stack, forward and backward."""
    layer = fusedrnn.GRU(16, 24, num_layers=2, bidirectional=True, seed=3)
    x = rng.standard_normal((30, 2, 16)).astype(np.float32)
    (y, _), ran = calls_during(lambda: layer(x))
    assert ran == {"side_by_side": 2, "in_turn": 0}
    _, ran = calls_during(lambda: layer.backward(np.ones_like(y)))
    assert ran == {"side_by_side": 2, "in_turn": 0}


def test_a_pair_whose_second_direction_is_refused_leaves_the_first_unconsumed(rng):
    """Every argument of both directions is checked before either context is marked consumed:
    the corrected call then runs (no "backward already ran")."""
    x, lens, weights, per = directions_case(rng, "lstm", 0, np.float32)
    forwards = functional.forward_directions("lstm", x, per["h0"], per["c0"], weights)
    ctxs = [f[3] for f in forwards]
    bad_dhn = [per["dhn"][0], per["dhn"][1][:, :5].copy()]  # (C order: the kernels' check)
    with pytest.raises(ValueError, match=r"dhn must have shape \(3, 24\), got \(3, 5\)"):
        functional.backward_directions(ctxs, per["dy"], bad_dhn, per["dcn"], consume=True)
    got = functional.backward_directions(ctxs, per["dy"], per["dhn"], per["dcn"], consume=True)
    want = [functional.backward(functional.forward("lstm", x, per["h0"][d], per["c0"][d],
                                                   *weights[d], reverse=bool(d))[3],
                                per["dy"][d], per["dhn"][d], per["dcn"][d]) for d in range(2)]
    for g, w in zip(got, want):
        assert np.array_equal(g[0], w[0])
    with pytest.raises(RuntimeError, match="consume=True"):
        functional.backward_directions(ctxs, per["dy"], per["dhn"], per["dcn"])


def test_pair_arguments_are_checked_with_their_names(rng):
    x, lens, weights, per = directions_case(rng, "gru", 0, np.float32)
    with pytest.raises(ValueError, match=r"h0 must have shape \(3, 24\), got \(3, 5\)"):
        functional.forward_directions("gru", x, [per["h0"][0], per["h0"][1][:, :5]],
                                      per["c0"], weights)
    with pytest.raises(ValueError, match="one entry per direction"):
        functional.forward_directions("gru", x, per["h0"][:1], per["c0"], weights)
    bad = [weights[0], (weights[1][0], weights[1][1].astype(np.float64)) + weights[1][2:]]
    with pytest.raises(TypeError, match="must have dtype float32"):
        functional.forward_directions("gru", x, per["h0"], per["c0"], bad, checked=True)
    ctxs = [f[3] for f in functional.forward_directions("gru", x, per["h0"], per["c0"], weights)]
    with pytest.raises(ValueError, match="two contexts, got one twice"):
        _C.backward_directions(ctxs[0], ctxs[0], per["dy"], [None, None], [None, None])
    with pytest.raises(ValueError, match="a forward and a reverse direction's"):
        _C.backward_directions(ctxs[1], ctxs[0], per["dy"], [None, None], [None, None])
    with pytest.raises(RuntimeError, match="training=True"):
        functional.backward_directions([ctxs[0], None], per["dy"], per["dhn"], per["dcn"])


@needs_threads
def test_pairs_from_several_python_threads_at_once(two_threads, rng):
    """Each Python thread's pairs run on their own team (the kernels release the GIL): the
    results are each thread's own, as on one thread."""
    x, lens, weights, per = directions_case(rng, "lstm", 3, np.float32, T=60, B=1, H=32)
    fusedrnn.set_num_threads(1)
    want = separate_calls("lstm", x, lens, weights, per, True, None)
    fusedrnn.set_num_threads(2)
    results = results_from_threads(
        lambda: paired_calls("lstm", x, lens, weights, per, True, None), 4, 5)
    assert len(results) == 20
    for got in results:
        assert_same_bits(got, want)


@needs_threads
@pytest.mark.parametrize("op", ["rnn", "lstm"])
def test_an_onnx_node_runs_its_two_directions_side_by_side(two_threads, rng, op):
    """fusedrnn.onnx_ops gives a bidirectional node's directions to one pair call, each with its
    own cell and ONNX options (an Elman RNN's Tanh one way and Relu the other, an LSTM's six
    activations and its peepholes): the same outputs as each direction run as a node alone."""
    from fusedrnn import onnx_ops
    T, B, I, H = 40, 2, 8, 24  # (the Elman RNN's direction: 123 KFLOP)
    G = 4 if op == "lstm" else 1
    f32 = lambda *shape, s=0.3: (s * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    X, W, R, Bias, h0 = f32(T, B, I, s=1), f32(2, G * H, I), f32(2, G * H, H), \
        f32(2, 2 * G * H), f32(2, B, H)
    if op == "rnn":
        kw, fns = dict(activations=["Tanh", "Relu"]), [["Tanh"], ["Relu"]]
        run = lambda d, **k: onnx_ops.rnn(X, W[d], R[d], Bias[d], None, h0[d], **k)  # noqa: E731
    else:
        c0, P = f32(2, B, H), f32(2, 3 * H)
        fns = [["Sigmoid", "Tanh", "Softsign"], ["HardSigmoid", "LeakyRelu", "Tanh"]]
        kw = dict(activations=fns[0] + fns[1], activation_alpha=[0.25, 0.2],
                  activation_beta=[0.6], clip=3.0)
        run = lambda d, **k: onnx_ops.lstm(X, W[d], R[d], Bias[d], None, h0[d], c0[d],  # noqa
                                           P[d], **k)
    both, ran = calls_during(lambda: run(slice(None), direction="bidirectional",
                                         hidden_size=H, **kw))
    assert ran == {"side_by_side": 1, "in_turn": 0}
    if op == "lstm":  # each direction alone: its own functions and its alpha / beta
        alone_kw = [dict(activations=fns[0], clip=3.0),
                    dict(activations=fns[1], activation_alpha=[0.25, 0.2],
                         activation_beta=[0.6], clip=3.0)]
    else:
        alone_kw = [dict(activations=f) for f in fns]
    for d, direction in enumerate(("forward", "reverse")):
        alone = run(slice(d, d + 1), direction=direction, hidden_size=H, **alone_kw[d])
        for got, want in zip(both, alone):
            np.testing.assert_array_equal(got[:, d:d + 1] if got.ndim == 4 else got[d:d + 1],
                                          want)


@needs_threads
@pytest.mark.parametrize("frozen", [False, True])
def test_directions_side_by_side_keep_packed_weights_only_where_empty_cache_reaches(
        two_threads, rng, frozen):
    """The reverse direction runs on the kernels' OpenMP worker, whose packed-weight cache lasts
    as long as the worker: empty_cache() clears it too (as a pipelined stack's), and leaves no
    form anywhere."""
    x = rng.standard_normal((60, 2, 16)).astype(np.float32)
    fusedrnn.empty_cache()
    before = _C.packed_forms_all_threads()
    layers = [fusedrnn.GRU(16, 32, bidirectional=True, seed=seed).eval() for seed in range(3)]
    for layer in layers:                         # all alive: new arrays, new forms
        if frozen:
            layer.freeze()
        _, ran = calls_during(lambda: layer(x))
        assert ran == {"side_by_side": 1, "in_turn": 0}
    assert _C.packed_forms_all_threads() > before + _C.packed_cache()["forms"]  # the worker's
    fusedrnn.empty_cache()
    assert _C.packed_forms_all_threads() == before


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_a_pair_reads_arrays_that_are_not_c_contiguous(rng, dtype):
    """_C's pair calls take a copy of such an array (functional's make them C-contiguous first):
    the copy must live until the kernels have read it. Direction 0's dy copy went with its
    cast's temporary before the kernels ran (200 x 8 x 64: a freed block, dx 0.3 off)."""
    x, lens, weights, per = directions_case(rng, "lstm", 0, dtype, T=200, B=8, H=64)
    strided = lambda a: np.repeat(a, 2, axis=-1)[..., ::2]  # noqa: E731 (same values)
    outs = [_C.forward_directions([2, 2], True, True, *args) for args in (
        (x, per["h0"], per["c0"], *map(list, zip(*weights))),
        (x, [strided(h) for h in per["h0"]], [strided(c) for c in per["c0"]],
         *([strided(w) if w is not None else None for w in ws] for ws in zip(*weights))))]
    for got, want in zip(outs[1], outs[0]):
        for a, b in zip(got[:3], want[:3]):
            assert np.array_equal(a, b)
    grads = [_C.backward_directions(out[0][3], out[1][3], *args) for out, args in zip(outs, (
        (per["dy"], per["dhn"], per["dcn"]),
        ([strided(a) for a in per["dy"]], [strided(a) for a in per["dhn"]],
         [strided(a) for a in per["dcn"]])))]
    for got, want in zip(grads[1], grads[0]):
        for a, b in zip(got[:3], want[:3]):
            assert np.array_equal(a, b)
        for name in want[3]:
            assert np.array_equal(got[3][name], want[3][name]), name


def test_a_pair_refuses_gradient_arrays_the_other_direction_reads_or_writes(rng):
    """The two directions run at once: one's grads_into may be neither the other's nor what the
    other reads (its weights, dy), else the writes race (both directions' gradients into one
    array: off by up to 11.7 from one thread's, differing run to run). Each direction alone
    was already checked so."""
    x, lens, weights, per = directions_case(rng, "lstm", 0, np.float32)
    fresh = lambda: [f[3] for f in functional.forward_directions(  # noqa: E731
        "lstm", x, per["h0"], per["c0"], weights)]
    grads = lambda: {k: np.empty_like(w) for k, w in zip(  # noqa: E731
        ("weight_ih", "weight_hh", "bias_ih", "bias_hh"), weights[0])}
    shared = grads()
    reads_other = grads()
    reads_other["weight_hh"] = weights[1][1]  # the reverse direction's W_hh
    dy_other = grads()
    dy_other["weight_ih"] = per["dy"][1].reshape(-1)[:dy_other["weight_ih"].size].reshape(
        dy_other["weight_ih"].shape)  # a view of the reverse direction's dy
    for into, message in (([shared, shared], "an array of its own"),
                          ([reads_other, None], "must not share memory with the weights"),
                          ([dy_other, None], "must not share memory with the weights")):
        ctxs = fresh()
        with pytest.raises(ValueError, match=message):
            functional.backward_directions(ctxs, per["dy"], per["dhn"], per["dcn"],
                                           consume=True, grads_into=into, add_into=False)
        functional.backward_directions(ctxs, per["dy"], per["dhn"], per["dcn"], consume=True)
    with pytest.raises(TypeError, match="dy must be an array"):
        _C.backward_directions(*fresh(), [per["dy"][0], None], [None, None], [None, None])
