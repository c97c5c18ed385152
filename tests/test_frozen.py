"""Frozen layers (freeze()): read-only copies of the parameters, whose packed forms the kernels
reuse without comparing the weights with their cached copies every call. Every result is the
plain layer's, bit for bit; what the promise covers and how it ends."""
import copy
import ctypes
import pickle
import sys

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _C, functional

CELLS = [("RNN", {}), ("RNN", {"nonlinearity": "relu"}), ("LSTM", {}), ("LSTM", {"proj_size": 3}),
         ("GRU", {})]


def layer(cls, kw, I=5, H=7, seed=3, **more):
    return getattr(fusedrnn, cls)(I, H, seed=seed, **kw, **more)


def run(m, x, dy=None):
    """Outputs, and with dy the gradients of a training call (x's, the states', the weights')."""
    y, h = m(x)
    out = [y, *(h if isinstance(h, tuple) else (h,))]
    if dy is not None:
        m.zero_grad()
        dx, dh = m.backward(dy)
        out += [dx, *(dh if isinstance(dh, tuple) else (dh,))]
        out += [g.copy() for g in m.grads.values()]
    return out


def alias(a):
    """A writable array over a's memory: writes behind a frozen layer's back (tests only)."""
    buf = (ctypes.c_char * a.nbytes).from_address(a.ctypes.data)
    return np.frombuffer(buf, dtype=a.dtype).reshape(a.shape)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("L,bidirectional", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("cls,kw", CELLS, ids=lambda v: v if isinstance(v, str) else str(v))
def test_frozen_gives_the_plain_bits(rng, fixed_threads, threads, cls, kw, L, bidirectional):
    before = fusedrnn.get_num_threads()
    fusedrnn.set_num_threads(threads)
    try:
        plain = layer(cls, kw, num_layers=L, bidirectional=bidirectional)
        frozen = copy.deepcopy(plain).freeze()
        assert frozen.frozen and not plain.frozen
        x = rng.standard_normal((6, 3, 5)).astype(np.float32)
        y_shape = plain(x)[0].shape
        dy = rng.standard_normal(y_shape).astype(np.float32)
        for m in (plain, frozen):
            m.train(False)
        for _ in range(2):  # the second call reuses the packed weights
            for got, want in zip(run(frozen, x), run(plain, x)):
                assert np.array_equal(got, want)
        for m in (plain, frozen):
            m.train(True)
        for _ in range(2):
            for got, want in zip(run(frozen, x, dy), run(plain, x, dy)):
                assert np.array_equal(got, want)
    finally:
        fusedrnn.set_num_threads(before)


@pytest.mark.parametrize("cls", ["RNN", "LSTM", "GRU"])
def test_frozen_training_gives_the_plain_bits_where_inference_takes_the_tiles(rng, cls):
    """20 steps of 16 rows: enough for inference to take the amx build's tiles in the steps
    (their forms kept), not for training, frozen or not (a frozen layer's training once took
    the tiles and gave other bits than the same layer unfrozen)."""
    plain = layer(cls, {}, I=64, H=128)
    frozen = copy.deepcopy(plain).freeze()
    x = rng.standard_normal((20, 16, 64)).astype(np.float32)
    dy = rng.standard_normal((20, 16, 128)).astype(np.float32)
    for got, want in zip(run(frozen, x, dy), run(plain, x, dy)):
        assert np.array_equal(got, want)


def test_frozen_calls_skip_the_comparison_and_unfreeze_ends_it(rng):
    """Weights changed behind the promise's back (through a raw alias) are not seen while
    frozen, which is what saves the comparison; unfreeze() copies them and calls see them."""
    m = layer("LSTM", {}).eval().freeze()
    x = rng.standard_normal((4, 2, 5)).astype(np.float32)
    before = m(x)[0]
    w = m.weight_hh_l0
    alias(w)[...] = 0
    assert np.array_equal(m(x)[0], before)         # the packed weights of the first call
    m.unfreeze()
    assert not m.frozen and m.weight_hh_l0.flags.writeable
    assert not m.weight_hh_l0.any()
    changed = m(x)[0]
    assert not np.array_equal(changed, before)
    m.weight_hh_l0[...] = w                         # (a read-only view of the old frozen copy)
    assert not m.frozen


def test_frozen_parameters_cannot_be_made_writable(rng):
    """Made writable, changed and made read-only again between two calls, a parameter would
    have been taken as unchanged; NumPy refuses the first step."""
    m = layer("GRU", {}).eval().freeze()
    x = rng.standard_normal((4, 2, 5)).astype(np.float32)
    before = m(x)[0]
    for name, p in m.named_parameters():
        with pytest.raises(ValueError, match="WRITEABLE"):
            p.flags.writeable = True
        assert not p.flags.writeable, name
    assert m.frozen
    assert np.array_equal(m(x)[0], before)
    m.unfreeze()
    m.weight_ih_l0 *= 0.5
    want = layer("GRU", {})
    want.load_state_dict(m.state_dict())
    assert np.array_equal(m(x)[0], want.eval()(x)[0])
    assert not np.array_equal(m(x)[0], before)


def test_frozen_parameters_are_read_only_copies():
    m = layer("LSTM", {})
    old = m.weight_hh_l0
    m.freeze()
    assert m.frozen
    assert m.weight_hh_l0 is not old and np.array_equal(m.weight_hh_l0, old)
    for name, p in m.named_parameters():
        assert not p.flags.writeable, name
        assert m.state_dict()[name] is p
    with pytest.raises(ValueError, match="read-only"):
        m.weight_hh_l0 += 1
    with pytest.raises(RuntimeError, match="frozen"):
        m.load_state_dict(m.state_dict())
    with pytest.raises(RuntimeError, match="frozen"):
        m.bias_ih_l0 = np.zeros(4 * 7, np.float32)
    old[...] = 0                                    # no longer the layer's
    assert m.weight_hh_l0.any()
    assert m.freeze() is m and m.frozen             # freezing twice keeps the same copies
    assert m.unfreeze() is m and not m.frozen and m.unfreeze() is m


def test_copies_freeze_again_under_their_own_id(rng):
    m = layer("LSTM", {}).eval().freeze()
    x = rng.standard_normal((4, 2, 5)).astype(np.float32)
    want = m(x)[0]
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert other.frozen and other._params.frozen_id != m._params.frozen_id
        assert np.array_equal(other(x)[0], want)


def test_the_kernels_take_frozen_weights_only_read_only_and_contiguous(rng):
    T, B, I, H = 3, 2, 5, 7
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = np.zeros((B, H), np.float32)
    w_ih, w_hh = (rng.standard_normal(s).astype(np.float32) for s in ((H, I), (H, H)))
    ro = []
    for w in (w_ih, w_hh):
        w = w.copy()
        w.flags.writeable = False
        ro.append(w)
    with pytest.raises(ValueError, match="w_hh must be a read-only C-contiguous array"):
        _C.forward(0, True, False, False, x, h0, None, ro[0], w_hh, None, None, None,
                   None, frozen=7)
    fortran = np.asfortranarray(w_ih)
    fortran.flags.writeable = False
    with pytest.raises(ValueError, match="w_ih must be a read-only C-contiguous array"):
        _C.forward(0, True, False, False, x, h0, None, fortran, ro[1], None, None, None, None,
                   frozen=7)
    y = _C.forward(0, True, False, False, x, h0, None, *ro, None, None, None, None, frozen=7)[0]
    assert np.array_equal(y, functional.forward("rnn_tanh", x, h0, None, w_ih, w_hh, None, None,
                                                training=False)[0])
    with pytest.raises(ValueError, match="read-only"):
        _C.forward_stack(0, True, False, x, [h0], [None], [w_ih], [ro[1]], [None], [None], [None],
                         frozen=8)


@pytest.mark.skipif(not _C.openmp, reason="built without OpenMP: one thread only")
@pytest.mark.parametrize("cls,kw", [("LSTM", {}), ("GRU", {})], ids=["lstm", "gru"])
def test_a_frozen_stack_pipelined_on_two_threads_gives_the_plain_bits(rng, two_threads, cls, kw):
    """A stack on a thread per layer: each layer's thread keeps its own packed weights, which
    the frozen id lets it reuse too."""
    plain = layer(cls, kw, I=12, H=12, num_layers=2).eval()
    frozen = copy.deepcopy(plain).freeze()
    x = rng.standard_normal((51, 9, 12)).astype(np.float32)
    for _ in range(2):
        before = _C.stack_calls()["pipelined"]
        got = run(frozen, x)
        assert _C.stack_calls()["pipelined"] == before + 1
        for one, two in zip(got, run(plain, x)):
            assert np.array_equal(one, two)


def test_a_writable_parameter_ends_the_promise(rng):
    """A frozen layer whose parameter is writable all the same (a pickle restored with another
    array there) is not trusted: calls compare again, and unfreeze() keeps that array."""
    m = layer("RNN", {}).eval().freeze()
    x = rng.standard_normal((4, 2, 5)).astype(np.float32)
    before = m(x)[0]
    writable = m.weight_hh_l0.copy()
    m._params["weight_hh_l0"] = writable
    assert not m.frozen
    writable *= 0.5
    assert not np.array_equal(m(x)[0], before)
    m.unfreeze()
    assert m.weight_hh_l0 is writable
    assert all(p.flags.writeable for p in m.parameters())
    m.load_state_dict(layer("RNN", {}).state_dict())


def test_reset_parameters_of_a_frozen_layer_is_refused(rng):
    """The frozen promise covers the values (calls reuse the packed weights under its id
    without looking at them), and the copies are read-only: reset_parameters() names
    unfreeze(), changes nothing, and works once unfrozen."""
    m = layer("LSTM", {}).eval().freeze()
    x = rng.standard_normal((4, 2, 5)).astype(np.float32)
    want = m(x)[0]
    before = {name: p.copy() for name, p in m.named_parameters()}
    with pytest.raises(RuntimeError, match=r"LSTM is frozen \(freeze\(\)\): unfreeze\(\) it "
                                           r"before resetting its parameters"):
        m.reset_parameters()
    assert m.frozen and np.array_equal(m(x)[0], want)
    for name, p in m.named_parameters():
        assert np.array_equal(p, before[name]), name
    m.unfreeze().reset_parameters()
    assert not np.array_equal(m(x)[0], want)


def test_loading_with_one_frozen_copy_left_changes_nothing(rng):
    """A layer whose frozen promise ended (a writable array put among the frozen copies) but
    that still holds read-only copies refuses a load before writing anything: it once copied
    the names before the first read-only one and then failed, half loaded."""
    m = layer("RNN", {}).freeze()
    m._params["weight_ih_l0"] = m.weight_ih_l0.copy()       # first in torch's order
    before = {name: p.copy() for name, p in m.named_parameters()}
    with pytest.raises(RuntimeError,
                       match=r"frozen \(freeze\(\)\): unfreeze\(\) it before loading"):
        m.load_state_dict(layer("RNN", {}, seed=4).state_dict())
    for name, p in m.named_parameters():
        assert np.array_equal(p, before[name]), name
    m.unfreeze().load_state_dict(layer("RNN", {}, seed=4).state_dict())


def test_frozen_calls_keep_packed_weights_but_no_copy_of_their_bytes(rng):
    """Under a frozen id the promise replaces the comparison, so the kernels keep the packed
    forms and no copy of the bytes. An unfrozen call, or another id, meeting those forms has
    nothing to compare with: it packs again (bytes changed behind the promise's back are seen)
    and the unfrozen call keeps a copy, which the next calls compare with."""
    T, B, I, H = 3, 2, 5, 7
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = np.zeros((B, H), np.float32)
    w_ih, w_hh = (rng.standard_normal(s).astype(np.float32) for s in ((H, I), (H, H)))
    for w in (w_ih, w_hh):
        w.flags.writeable = False

    def run(frozen):
        return _C.forward(0, True, False, False, x, h0, None, w_ih, w_hh, None, None, None, None,
                          frozen=frozen)[0]

    def want():  # the plain call on copies: other addresses, other cache entries
        return functional.forward("rnn_tanh", x, h0, None, w_ih.copy(), w_hh.copy(), None, None,
                                  training=False)[0]

    wants = [want()]
    alias(w_hh)[...] *= 0.5
    wants.append(want())
    alias(w_hh)[...] *= 2
    _C.packed_cache(clear=True)
    assert np.array_equal(run(7), wants[0])
    assert (_C.packed_cache()["forms"], _C.packed_cache()["copies"]) == (2, 0)
    alias(w_hh)[...] *= 0.5
    assert np.array_equal(run(7), wants[0])          # the promise, trusted
    assert np.array_equal(run(0), wants[1])          # no copy to compare with: packed again
    held = _C.packed_cache()
    assert (held["forms"], held["copies"]) == (2, 2)
    assert np.array_equal(run(0), wants[1]) and _C.packed_cache() == held
    alias(w_hh)[...] *= 2
    assert np.array_equal(run(8), wants[0])          # a new id compares with the copy
    assert np.array_equal(run(8), wants[0]) and _C.packed_cache() == held


@pytest.mark.parametrize("start_frozen", [False, True], ids=["freeze", "unfreeze"])
def test_an_eval_call_survives_freeze_or_unfreeze_at_any_point(rng, start_frozen):
    """Another thread may freeze() or unfreeze() the layer at any point of a call: here at each
    function call of an eval forward in turn, in the caller's thread, as a thread switch would
    (sys.setprofile). Before, a call that read the parameters and then their frozen id could get
    the writable set with the new id (about once in 18k calls racing freeze()), which the
    kernels refused with a ValueError."""
    m = fusedrnn.LSTM(3, 4, seed=1)
    m.eval()
    x = rng.standard_normal((2, 1, 3)).astype(np.float32)
    want = m(x)[0]

    def call_with_toggle_at(event):
        (m.freeze if start_frozen else m.unfreeze)()
        seen = [0]

        def hook(frame, what, arg):
            if what in ("call", "c_call"):
                if seen[0] == event:
                    (m.unfreeze if start_frozen else m.freeze)()
                seen[0] += 1

        sys.setprofile(hook)
        try:
            y = m(x)[0]
        finally:
            sys.setprofile(None)
        return y, seen[0]

    _, events = call_with_toggle_at(-1)
    assert events > 20
    for event in range(events):
        y, _ = call_with_toggle_at(event)
        assert np.array_equal(y, want), event
