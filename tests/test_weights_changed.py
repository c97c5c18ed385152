"""A backward whose weights changed since its training forward: the backward reads W_ih, W_hh
and W_hr with the gates the forward saved, so a weight changed in place in between (an optimiser
step before backward) would give the gradients of neither model. torch.nn's autograd raises
there; so do the kernels (csrc/weights_digest.h: the forward keeps a digest of each weight, the
backward checks the weights it reads against it), and the layers name the parameter as torch
does. Biases, which the backward does not read, may change."""
import numpy as np
import pytest

import fusedrnn
from fusedrnn import _C, functional

from _kernel_cases import VARIANTS, make_case, variant_id

ISAS = list(_C.available_isas())
DTYPES = [np.float32, np.float64]
WEIGHTS = ("w_ih", "w_hh", "w_hr")
KEYS = {"w_ih": "weight_ih", "w_hh": "weight_hh", "w_hr": "weight_hr"}


def weights_of(case, dtype):
    return {k: None if v is None else v.astype(dtype) for k, v in case["w"].items()}


def forward(case, w, isa, training=True):
    c = lambda a: None if a is None else a.astype(w["w_hh"].dtype)
    return functional.forward(case["cell"], c(case["x"]), c(case["h0"]), c(case["c0"]),
                              w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], w["w_hr"],
                              case["lengths"], False, True, training, isa)


def backward(case, ctx, dtype, weights=None):
    c = lambda a: None if a is None else a.astype(dtype)
    dx, dh0, dc0, grads = functional.backward(ctx, c(case["dy"]), c(case["dhn"]),
                                              c(case["dcn"]), weights=weights)
    return {"dx": dx, "dh0": dh0, "dc0": dc0, **grads}


def assert_same_bits(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert (got[k] is None and want[k] is None) or np.array_equal(got[k], want[k]), k


def next_value(v):
    """The next representable value after v: the smallest change a weight can take."""
    return np.nextafter(v, np.inf, dtype=v.dtype)


# Where a weight changes: its first element, its last, one in the middle. The digest takes 128
# bytes at a time (16 lanes of 8) and the last few apart: of these weights' sizes (G * 4 x 5,
# G * 4 x 4 or x 3, 3 x 4) some have whole runs and a rest, some only a rest.
PLACES = {"first": 0, "middle": None, "last": -1}


# Every variant's weights (only a projection has weight_hr).
VARIANT_WEIGHTS = [(v, which) for v in VARIANTS for which in WEIGHTS if which != "w_hr" or v[2]]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("variant,which", VARIANT_WEIGHTS,
                         ids=[f"{variant_id(v)}-{which}" for v, which in VARIANT_WEIGHTS])
@pytest.mark.parametrize("place", PLACES)
def test_backward_refuses_a_weight_changed_since_its_forward(rng, isa, dtype, variant, which,
                                                              place):
    cell, _, proj = variant
    case = make_case(rng, cell, proj, T=4, B=2, I=5, H=4)
    w = weights_of(case, dtype)
    want = backward(case, forward(case, w, isa)[3], dtype)
    ctx = forward(case, w, isa)[3]
    flat = w[which].reshape(-1)
    i = flat.size // 2 if PLACES[place] is None else PLACES[place]
    before = flat[i].copy()
    flat[i] = next_value(before)
    with pytest.raises(functional.WeightsChangedError, match=f"^{KEYS[which]} changed") as error:
        backward(case, ctx, dtype)
    assert isinstance(error.value, RuntimeError)
    assert (error.value.weight, error.value.direction) == (KEYS[which], 0)
    # The refusal leaves the context as it was: the weights as the forward read them again,
    # the backward runs, with the bits of one that was never refused.
    flat[i] = before
    assert_same_bits(backward(case, ctx, dtype), want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_backward_refuses_two_weights_swapped(rng, isa, dtype):
    """The same values in other places: two values 128 bytes apart, which the digest's lanes
    sum together (its sums alone would take the swap; its sums of sums see it)."""
    case = make_case(rng, "lstm", T=4, B=2, I=5, H=6)
    w = weights_of(case, dtype)
    ctx = forward(case, w, isa)[3]
    flat, apart = w["w_hh"].reshape(-1), 128 // np.dtype(dtype).itemsize
    assert flat[0] != flat[apart]
    flat[[0, apart]] = flat[[apart, 0]]
    with pytest.raises(functional.WeightsChangedError, match="^weight_hh changed"):
        backward(case, ctx, dtype)


# Changes that add one constant to every word of a float64 weight (its sign: 2^63; a power of
# two: 2^52 to the exponent), which sums of the words alone lose in a large weight: W_ih of
# LSTM(128, 256), 1 MiB, 8192 words in each of the digest's 16 lanes (found by an audit helper).
# Its values as drawn, and float16 values in float64 (their words' low halves all 0).
STEPS = {"negated": -1.0, "doubled": 2.0, "halved": 0.5, "times_16": 16.0}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("values", ["drawn", "float16_in_float64"])
def test_backward_refuses_every_word_stepped_alike(rng, isa, dtype, step, values):
    case = make_case(rng, "lstm", T=2, B=1, I=128, H=256)
    if values == "float16_in_float64":
        case["w"] = {k: None if v is None else v.astype(np.float16).astype(np.float64)
                     for k, v in case["w"].items()}
    w = weights_of(case, dtype)
    assert w["w_ih"].nbytes >= 1 << 20 or dtype == np.float32
    ctx = forward(case, w, isa)[3]
    w["w_ih"] *= STEPS[step]
    with pytest.raises(functional.WeightsChangedError, match="^weight_ih changed"):
        backward(case, ctx, dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_biases_may_change_between_forward_and_backward(rng, isa, variant):
    """The backward reads no bias: its results are those at the forward's biases."""
    cell, lbr, proj = variant
    case = make_case(rng, cell, proj, T=4, B=2, I=5, H=4)
    w = weights_of(case, np.float64)
    want = backward(case, forward(case, w, isa)[3], np.float64)
    ctx = forward(case, w, isa)[3]
    w["b_ih"] *= 2
    w["b_hh"] += 1
    assert_same_bits(backward(case, ctx, np.float64), want)


@pytest.mark.parametrize("isa", ISAS)
def test_given_weights_must_hold_the_forwards_values(rng, isa):
    """``weights`` (the torch adapter's: what autograd saved) may be other arrays, but with the
    forward's values."""
    case = make_case(rng, "lstm", 3, T=4, B=2, I=5, H=4)
    w = weights_of(case, np.float32)
    want = backward(case, forward(case, w, isa)[3], np.float32)
    copies = tuple(w[k].copy() for k in WEIGHTS)
    assert_same_bits(backward(case, forward(case, w, isa)[3], np.float32, copies), want)
    ctx = forward(case, w, isa)[3]
    changed = list(copies)
    changed[2] = changed[2] * 2
    with pytest.raises(functional.WeightsChangedError, match="^weight_hr changed"):
        backward(case, ctx, np.float32, tuple(changed))
    assert_same_bits(backward(case, ctx, np.float32, copies), want)


@pytest.mark.parametrize("cell", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one_way", "bidir"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_layers_name_the_changed_parameter_as_torch_does(cell, threads, bidirectional,
                                                         num_layers, fixed_threads):
    before = fusedrnn.get_num_threads()
    fusedrnn.set_num_threads(threads)
    try:
        kwargs = {"proj_size": 2} if cell == "LSTM" else {}
        layer = getattr(fusedrnn, cell)(3, 4, num_layers=num_layers, bidirectional=bidirectional,
                                        seed=0, dtype=np.float64, **kwargs)
        x = np.random.default_rng(0).standard_normal((5, 2, 3))
        names = [n for n in layer.state_dict() if n.startswith("weight_")]
        for name in names:
            y, _ = layer(x)
            dy = np.ones_like(y)
            want = layer.backward(dy)
            grads = {k: v.copy() for k, v in layer.grads.items()}
            layer.zero_grad()
            y, _ = layer(x)
            weight = getattr(layer, name)
            value = weight[0, 0]
            weight[0, 0] += 1  # in place, as an optimiser step before backward would
            with pytest.raises(RuntimeError, match=f"^{name} changed") as error:
                layer.backward(dy)
            assert isinstance(error.value, functional.WeightsChangedError)
            assert error.value.weight == name
            assert not any(g.any() for g in layer.grads.values())  # nothing added
            weight[0, 0] = value
            got = layer.backward(dy)
            assert np.array_equal(got[0], want[0]), name
            for k in grads:
                assert np.array_equal(layer.grads[k], grads[k]), (name, k)
            layer.zero_grad()
    finally:
        fusedrnn.set_num_threads(before)


def test_an_optimiser_step_before_backward_is_refused():
    """SGD over named_parameters() between forward and backward (the order reversed)."""
    layer = fusedrnn.GRU(3, 4, dtype=np.float64, seed=0)
    x = np.random.default_rng(1).standard_normal((5, 2, 3))
    y, _ = layer(x)
    layer.backward(np.ones_like(y))
    y, _ = layer(x)
    for name, p in layer.named_parameters():
        p -= 0.1 * layer.grads[name]
    with pytest.raises(RuntimeError, match="^weight_ih_l0 changed .*after backward"):
        layer.backward(np.ones_like(y))
