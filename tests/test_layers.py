"""fusedrnn.RNN / LSTM / GRU without torch: the NumPy reference stacked by hand (which covers
GRU ``linear_before_reset=False``, absent from torch), the invariants, dropout, training
semantics (train/eval, grads accumulation, zero_grad), parameter and state-dict semantics, and
several layers run from several threads at once. The grid against torch.nn is in
test_layers_torch.py; bad inputs in test_bad_input.py.
"""
import concurrent.futures
import copy
import subprocess
import sys

import numpy as np
import pytest

import fusedrnn
from fusedrnn import reference as R
from fusedrnn.tolerances import assert_close
from _threads import results_from_threads

F64 = np.float64
CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")


def make_layer(cell, I, H, L=1, bidirectional=False, proj=0, dtype=F64, seed=0, **kw):
    kw.update(num_layers=L, bidirectional=bidirectional, dtype=dtype, seed=seed)
    if cell == "lstm":
        return fusedrnn.LSTM(I, H, proj_size=proj, **kw)
    if cell == "gru":
        return fusedrnn.GRU(I, H, **kw)
    return fusedrnn.RNN(I, H, nonlinearity=cell[4:], **kw)


def hx_of(cell, h0, c0):
    return (h0, c0) if cell == "lstm" else h0


def split_h(cell, h):
    return h if cell == "lstm" else (h, None)


def ref_stack(layer, cell, x, h0, c0, lengths, dy, dhn, dcn, lbr=True):
    """The whole stack with fusedrnn.reference, one layer and direction at a time (time-major,
    no dropout). Returns y, hn, cn, dx, dh0, dc0, grads."""
    sd = layer.state_dict()
    L, D = layer.num_layers, 2 if layer.bidirectional else 1
    H_out = h0.shape[-1]
    inp, caches, hn, cn = x, [], np.zeros_like(h0), np.zeros_like(c0) if c0 is not None else None
    for k in range(L):
        outs = []
        for d in range(D):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            y, h, c, cache = R.forward(
                cell, inp, h0[k * D + d], None if c0 is None else c0[k * D + d],
                sd["weight_ih" + sfx], sd["weight_hh" + sfx], sd.get("bias_ih" + sfx),
                sd.get("bias_hh" + sfx), sd.get("weight_hr" + sfx), lengths=lengths,
                reverse=bool(d), linear_before_reset=lbr)
            hn[k * D + d] = h
            if c is not None:
                cn[k * D + d] = c
            outs.append(y)
            caches.append(cache)
        inp = np.concatenate(outs, axis=-1)
    y = inp
    grads, dh0 = {}, np.zeros_like(h0)
    dc0 = None if c0 is None else np.zeros_like(c0)
    d_out = dy
    for k in reversed(range(L)):
        dx = 0
        for d in range(D):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            dxd, dh, dc, g = R.backward(caches[k * D + d], d_out[..., d * H_out:(d + 1) * H_out],
                                        dhn[k * D + d], None if dcn is None else dcn[k * D + d])
            dh0[k * D + d] = dh
            if dc is not None:
                dc0[k * D + d] = dc
            grads.update({key + sfx: v for key, v in g.items()})
            dx = dx + dxd
        d_out = dx
    return y, hn, cn, d_out, dh0, dc0, grads


def random_problem(rng, cell, T, B, I, H, L, D, proj=0, lengths=False):
    H_out = proj or H
    p = {"x": rng.standard_normal((T, B, I)), "h0": rng.standard_normal((L * D, B, H_out)),
         "c0": rng.standard_normal((L * D, B, H)) if cell == "lstm" else None,
         "dy": rng.standard_normal((T, B, D * H_out)),
         "dhn": rng.standard_normal((L * D, B, H_out)),
         "dcn": rng.standard_normal((L * D, B, H)) if cell == "lstm" else None,
         "lengths": None}
    if lengths:
        p["lengths"] = rng.integers(1, T + 1, size=B)
        p["lengths"][0] = T
    return p


def run_layer(layer, cell, p):
    """Forward and backward of ``layer`` (time-major) on problem ``p``."""
    y, h = layer(p["x"], hx_of(cell, p["h0"], p["c0"]), lengths=p["lengths"])
    hn, cn = split_h(cell, h)
    dx, dh = layer.backward(p["dy"], hx_of(cell, p["dhn"], p["dcn"]))
    dh0, dc0 = split_h(cell, dh)
    return y, hn, cn, dx, dh0, dc0, {k: g.copy() for k, g in layer.grads.items()}


def assert_results_close(got, want, dtype=F64):
    names = ("y", "hn", "cn", "dx", "dh0", "dc0")
    for name, g, w in zip(names, got[:6], want[:6]):
        if w is None:
            assert g is None, name
            continue
        assert_close(g, w, dtype, "forward" if name in ("y", "hn", "cn") else "gradient",
                     what=name)
    assert sorted(got[6]) == sorted(want[6])
    for name in want[6]:
        assert_close(got[6][name], want[6][name], dtype, "gradient", what=name)


# ----------------------------------------------------------------------------------------------
# Against the NumPy reference, stacked by hand

STACK_CASES = [  # cell, lbr, L, bidirectional, proj, lengths
    ("gru", False, 1, False, 0, False),
    ("gru", False, 2, True, 0, True),
    ("gru", False, 3, False, 0, True),
    ("gru", False, 2, True, 0, False),
    ("gru", True, 2, True, 0, True),
    ("rnn_relu", True, 2, True, 0, True),
    ("lstm", True, 2, True, 3, True),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell,lbr,L,bidirectional,proj,lengths", STACK_CASES)
def test_stack_matches_reference(rng, cell, lbr, L, bidirectional, proj, lengths, dtype):
    """Including GRU linear_before_reset=False, which torch does not have."""
    kw = {"linear_before_reset": lbr} if cell == "gru" else {}
    T, B, I, H, D = 5, 3, 4, 7, 2 if bidirectional else 1
    layer = make_layer(cell, I, H, L, bidirectional, proj, dtype=dtype, seed=1, **kw)
    p = random_problem(rng, cell, T, B, I, H, L, D, proj, lengths)
    if dtype == np.float32:
        # the float32 layer runs on float32 data; the reference on the same values in float64
        p = {k: v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == F64 else v
             for k, v in p.items()}
    got = run_layer(layer, cell, p)
    ref_layer = make_layer(cell, I, H, L, bidirectional, proj, seed=1, **kw)
    ref_layer.load_state_dict(layer.state_dict())
    p64 = {k: v.astype(F64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
           for k, v in p.items()}
    want = ref_stack(ref_layer, cell, p64["x"], p64["h0"], p64["c0"], p["lengths"], p64["dy"],
                     p64["dhn"], p64["dcn"], lbr=lbr)
    assert_results_close(got, want, dtype)


def test_gru_linear_before_reset_changes_the_result(rng):
    a = fusedrnn.GRU(3, 4, seed=0, dtype=F64)
    b = fusedrnn.GRU(3, 4, seed=0, dtype=F64, linear_before_reset=False)
    x = rng.standard_normal((4, 2, 3))
    assert np.abs(a(x)[0] - b(x)[0]).max() > 1e-3
    assert "linear_before_reset=False" in repr(b)


# ----------------------------------------------------------------------------------------------
# Invariants

@pytest.mark.parametrize("cell", CELLS)
def test_batch_of_n_equals_n_batches_of_one(rng, cell):
    T, B, I, H, L, D = 6, 4, 5, 9, 2, 2
    layer = make_layer(cell, I, H, L, True, proj=4 if cell == "lstm" else 0)
    p = random_problem(rng, cell, T, B, I, H, L, D, proj=4 if cell == "lstm" else 0,
                       lengths=True)
    y, hn, cn, dx, dh0, dc0, grads = run_layer(layer, cell, p)
    total = {k: np.zeros_like(v) for k, v in grads.items()}
    for b in range(B):
        layer.zero_grad()
        one = {k: None if v is None else (v[b:b + 1] if k == "lengths" else v[:, b:b + 1])
               for k, v in p.items()}
        yb, hnb, cnb, dxb, dh0b, dc0b, gb = run_layer(layer, cell, one)
        assert_close(yb, y[:, b:b + 1], F64)
        assert_close(hnb, hn[:, b:b + 1], F64)
        assert_close(dxb, dx[:, b:b + 1], F64, "gradient")
        assert_close(dh0b, dh0[:, b:b + 1], F64, "gradient")
        if cell == "lstm":
            assert_close(cnb, cn[:, b:b + 1], F64)
            assert_close(dc0b, dc0[:, b:b + 1], F64, "gradient")
        for k in total:
            total[k] += gb[k]
    for k in total:
        assert_close(total[k], grads[k], F64, "gradient", what=k)


@pytest.mark.parametrize("cell", CELLS)
def test_two_half_calls_equal_one_call(rng, cell):
    """Forward over T/2 twice with the state carried equals one call over T; backward through
    the two halves (two layers with the same weights) gives the same gradients, summed."""
    T, B, I, H, L = 6, 3, 4, 5, 3
    full = make_layer(cell, I, H, L, seed=3)
    p = random_problem(rng, cell, T, B, I, H, L, 1)
    y, hn, cn, dx, dh0, dc0, grads = run_layer(full, cell, p)

    first, second = make_layer(cell, I, H, L, seed=3), make_layer(cell, I, H, L, seed=3)
    y1, h1 = first(p["x"][:3], hx_of(cell, p["h0"], p["c0"]))
    y2, h2 = second(p["x"][3:], h1)
    hn2, cn2 = split_h(cell, h2)
    assert_close(np.concatenate([y1, y2]), y, F64)
    assert_close(hn2, hn, F64)
    if cell == "lstm":
        assert_close(cn2, cn, F64)
    dx2, dmid = second.backward(p["dy"][3:], hx_of(cell, p["dhn"], p["dcn"]))
    dx1, dstart = first.backward(p["dy"][:3], dmid)
    assert_close(np.concatenate([dx1, dx2]), dx, F64, "gradient")
    dh0_1, dc0_1 = split_h(cell, dstart)
    assert_close(dh0_1, dh0, F64, "gradient")
    if cell == "lstm":
        assert_close(dc0_1, dc0, F64, "gradient")
    for k in grads:
        assert_close(first.grads[k] + second.grads[k], grads[k], F64, "gradient", what=k)


def reverse_rows(a, lengths):
    """Reverse each batch row of a (T, B, ...) array within its length (rest stays zero)."""
    out = np.zeros_like(a)
    for b, n in enumerate(lengths):
        out[:n, b] = a[:n, b][::-1]
    return out


@pytest.mark.parametrize("cell", CELLS)
def test_bidirectional_equals_forward_plus_reversed(rng, cell):
    T, B, I, H = 6, 4, 3, 5
    proj = 2 if cell == "lstm" else 0
    H_out = proj or H
    bi = make_layer(cell, I, H, 1, True, proj, seed=4)
    fwd, rev = make_layer(cell, I, H, 1, False, proj), make_layer(cell, I, H, 1, False, proj)
    sd = bi.state_dict()
    fwd.load_state_dict({k: v for k, v in sd.items() if not k.endswith("_reverse")})
    rev.load_state_dict({k[:-len("_reverse")]: v for k, v in sd.items() if k.endswith("_reverse")})
    p = random_problem(rng, cell, T, B, I, H, 1, 2, proj, lengths=True)
    lens = p["lengths"]
    y, hn, cn, dx, dh0, dc0, grads = run_layer(bi, cell, p)

    def part(a, d):
        return None if a is None else a[d:d + 1]

    pf = dict(p, h0=part(p["h0"], 0), c0=part(p["c0"], 0), dhn=part(p["dhn"], 0),
              dcn=part(p["dcn"], 0), dy=p["dy"][..., :H_out])
    pr = dict(p, x=reverse_rows(p["x"], lens), h0=part(p["h0"], 1), c0=part(p["c0"], 1),
              dhn=part(p["dhn"], 1), dcn=part(p["dcn"], 1),
              dy=reverse_rows(p["dy"][..., H_out:], lens))
    yf, hnf, cnf, dxf, dh0f, dc0f, gf = run_layer(fwd, cell, pf)
    yr, hnr, cnr, dxr, dh0r, dc0r, gr = run_layer(rev, cell, pr)
    assert_close(np.concatenate([yf, reverse_rows(yr, lens)], axis=-1), y, F64)
    assert_close(np.concatenate([hnf, hnr]), hn, F64)
    assert_close(dxf + reverse_rows(dxr, lens), dx, F64, "gradient")
    assert_close(np.concatenate([dh0f, dh0r]), dh0, F64, "gradient")
    if cell == "lstm":
        assert_close(np.concatenate([cnf, cnr]), cn, F64)
        assert_close(np.concatenate([dc0f, dc0r]), dc0, F64, "gradient")
    for k, v in gf.items():
        assert_close(v, grads[k], F64, "gradient", what=k)
        assert_close(gr[k], grads[k + "_reverse"], F64, "gradient", what=k + "_reverse")


@pytest.mark.parametrize("cell", CELLS)
def test_batch_first_and_unbatched_agree_with_time_major(rng, cell):
    T, B, I, H, L = 5, 3, 4, 6, 2
    tm = make_layer(cell, I, H, L, True, seed=8)
    bf = make_layer(cell, I, H, L, True, seed=8, batch_first=True)
    p = random_problem(rng, cell, T, B, I, H, L, 2, lengths=True)
    y, hn, cn, dx, dh0, dc0, grads = run_layer(tm, cell, p)
    yb, hb = bf(p["x"].transpose(1, 0, 2).copy(), hx_of(cell, p["h0"], p["c0"]),
                lengths=p["lengths"])
    assert yb.shape == (B, T, 2 * H)
    np.testing.assert_array_equal(yb, y.transpose(1, 0, 2))
    dxb, _ = bf.backward(p["dy"].transpose(1, 0, 2).copy(), hx_of(cell, p["dhn"], p["dcn"]))
    np.testing.assert_array_equal(dxb, dx.transpose(1, 0, 2))
    for k in grads:
        np.testing.assert_array_equal(bf.grads[k], grads[k])
    # unbatched (T, I) with hx (L*D, H) equals batch row 0 of a batch of one
    one = {k: None if v is None else (v[0:1] if k == "lengths" else v[:, 0:1])
           for k, v in p.items()}
    one["lengths"] = None
    tm.zero_grad()
    y1, hn1, cn1, dx1, dh01, dc01, g1 = run_layer(tm, cell, one)
    un = make_layer(cell, I, H, L, True, seed=8)
    sq = {k: None if v is None else v[:, 0] for k, v in one.items() if k != "lengths"}
    yu, hu = un(sq["x"], hx_of(cell, sq["h0"], sq["c0"]))
    hnu, cnu = split_h(cell, hu)
    assert yu.shape == (T, 2 * H) and hnu.shape == (2 * L, H)
    np.testing.assert_array_equal(yu, y1[:, 0])
    np.testing.assert_array_equal(hnu, hn1[:, 0])
    dxu, dhu = un.backward(sq["dy"], hx_of(cell, sq["dhn"], sq["dcn"]))
    dh0u, dc0u = split_h(cell, dhu)
    assert dxu.shape == (T, I) and dh0u.shape == (2 * L, H)
    np.testing.assert_array_equal(dxu, dx1[:, 0])
    np.testing.assert_array_equal(dh0u, dh01[:, 0])
    if cell == "lstm":
        np.testing.assert_array_equal(cnu, cn1[:, 0])
        np.testing.assert_array_equal(dc0u, dc01[:, 0])


# ----------------------------------------------------------------------------------------------
# Dropout

def test_dropout_is_seeded_and_only_in_training(rng):
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    a = fusedrnn.LSTM(4, 6, num_layers=3, dropout=0.5, seed=1)
    b = fusedrnn.LSTM(4, 6, num_layers=3, dropout=0.5, seed=1)
    plain = fusedrnn.LSTM(4, 6, num_layers=3, seed=1)
    ya1, ya2 = a(x)[0], a(x)[0]
    np.testing.assert_array_equal(ya1, b(x)[0])          # same seed, same masks
    np.testing.assert_array_equal(ya2, b(x)[0])
    assert np.abs(ya1 - ya2).max() > 0                   # a new mask each forward
    y_plain = plain(x)[0]
    assert np.abs(ya1 - y_plain).max() > 0
    np.testing.assert_array_equal(a.eval()(x)[0], plain.eval()(x)[0])   # eval: no dropout
    np.testing.assert_array_equal(a.train()(x)[0], b(x)[0])   # stream continues in step


def test_dropout_and_batch_first_may_be_set_as_on_a_torch_module(rng):
    """torch.nn reads dropout and batch_first at each forward, so code sets them on a built
    module (model.rnn.dropout = 0.0): the next forward here uses them too."""
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    layer = fusedrnn.LSTM(4, 6, num_layers=3, dropout=0.5, seed=1)
    plain = fusedrnn.LSTM(4, 6, num_layers=3, seed=1)
    assert np.abs(layer(x)[0] - plain(x)[0]).max() > 0
    layer.dropout = 0
    assert layer.dropout == 0.0 and "dropout" not in repr(layer)
    np.testing.assert_array_equal(layer(x)[0], plain(x)[0])
    y, _ = layer(x)
    layer.batch_first = True
    assert layer.batch_first and "batch_first=True" in repr(layer)
    with pytest.raises(RuntimeError, match="batch_first changed after the last training forward"):
        layer.backward(y)                     # dy would be read in the other layout
    y_bf, _ = layer(x.transpose(1, 0, 2))
    np.testing.assert_array_equal(y_bf, y.transpose(1, 0, 2))
    layer.batch_first = True                  # (no change: the pending backward stays)
    layer.backward(np.ones_like(y_bf))
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\], got 2"):
        layer.dropout = 2
    with pytest.raises(TypeError, match="batch_first must be"):
        layer.batch_first = "yes"
    assert layer.dropout == 0.0 and layer.batch_first   # unchanged by the refusals
    with pytest.raises(AttributeError):
        layer.hidden_size = 7                 # the parameter shapes depend on it


def test_dropout_is_torchs_inverted_dropout_of_every_layer_output_but_the_last(rng):
    """As torch.nn's: in training each unit of a lower layer's output is zeroed with probability
    p and the others scaled by 1 / (1 - p); the top layer's output is left as it is. A relu RNN
    whose top layer passes its input through (W_ih the identity, W_hh and the biases zero) shows
    the mask itself: y over the eval-mode y is 0 or 1 / (1 - p), nothing else."""
    p, H = 0.25, 8
    layer = make_layer("rnn_relu", 3, H, L=2, bidirectional=True, seed=4, dropout=p)
    eye = np.eye(2 * H)
    layer.weight_ih_l1, layer.weight_ih_l1_reverse = eye[:H], eye[H:]
    for name in ("weight_hh_l1", "bias_ih_l1", "bias_hh_l1"):
        for sfx in ("", "_reverse"):
            setattr(layer, name + sfx, np.zeros_like(getattr(layer, name + sfx)))
    x = rng.standard_normal((20, 16, 3))
    y_eval = layer.eval()(x)[0]
    y = layer.train()(x)[0]
    kept = y_eval > 0
    assert not y[~kept].any()
    ratio = y[kept] / y_eval[kept]
    dropped = ratio == 0
    np.testing.assert_allclose(ratio[~dropped], 1 / (1 - p), rtol=1e-14)
    assert 0.2 < dropped.mean() < 0.3, dropped.mean()   # ~p of 2000-odd units


def test_dropout_one_cuts_the_lower_layers():
    """p = 1 zeroes every layer output but the last: the top layer sees zeros, and no gradient
    reaches the input or the lower layers."""
    layer = fusedrnn.GRU(3, 4, num_layers=2, dropout=1.0, seed=0, dtype=F64)
    x = np.random.default_rng(0).standard_normal((4, 2, 3))
    y, hn = layer(x)
    dx, dh0 = layer.backward(np.ones_like(y))
    sd = layer.state_dict()
    y_top, _, _, _ = R.forward("gru", np.zeros((4, 2, 4)), np.zeros((2, 4)), None,
                               sd["weight_ih_l1"], sd["weight_hh_l1"], sd["bias_ih_l1"],
                               sd["bias_hh_l1"], training=False)
    assert_close(y, y_top, F64)
    assert not dx.any()
    assert not layer.grads["weight_ih_l0"].any() and not layer.grads["weight_hh_l0"].any()
    assert layer.grads["weight_hh_l1"].any()


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_backward_uses_the_forward_mask(rng, cell):
    """Finite differences through a dropout layer, replaying the same masks: the gradient of
    (y*dy).sum() with respect to x matches."""
    layer = make_layer(cell, 3, 4, L=3, bidirectional=True, seed=2, dropout=0.4)
    x = rng.standard_normal((4, 2, 3))
    dy = rng.standard_normal((4, 2, 8))
    state = copy.deepcopy(layer._dropout_rng.bit_generator.state)

    def loss(xx):
        layer._dropout_rng.bit_generator.state = copy.deepcopy(state)
        return float((layer(xx)[0] * dy).sum())

    loss(x)
    dx, _ = layer.backward(dy)
    eps = 1e-6
    for idx in [(0, 0, 0), (1, 1, 2), (3, 0, 1), (2, 1, 0)]:
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fd = (loss(xp) - loss(xm)) / (2 * eps)
        # central differences in float64: ~1e-9 agreement (see test_reference.py, FD_TOL)
        assert abs(fd - dx[idx]) <= 1e-6 * max(1.0, abs(fd)), (idx, fd, dx[idx])


# ----------------------------------------------------------------------------------------------
# Training semantics, parameters and state dicts

def test_grads_accumulate_and_zero_grad(rng):
    layer = fusedrnn.GRU(3, 5, num_layers=2, dtype=F64, seed=0)
    x = rng.standard_normal((4, 2, 3))
    dy = rng.standard_normal((4, 2, 5))
    y, _ = layer(x)
    layer.backward(dy)
    once = copy.deepcopy(layer.grads)
    held = layer.grads["weight_ih_l0"]
    layer(x)
    layer.backward(dy)
    for k, g in layer.grads.items():
        assert_close(g, 2 * once[k], F64, "gradient", what=k)
    assert layer.grads["weight_ih_l0"] is held           # accumulated in place
    layer.zero_grad()
    assert all(not g.any() for g in layer.grads.values())
    assert layer.grads["weight_ih_l0"] is held
    assert list(layer.grads) == list(layer.state_dict())


class _Subclass(np.ndarray):
    pass


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("subclass", [False, True])
def test_the_caller_may_reuse_x_between_forward_and_backward(rng, bidirectional, batch_first,
                                                             subclass):
    """The first layer's input is the caller's: a training forward keeps what the backward needs
    of it (a bidirectional stack one copy for both directions), so overwriting x before backward
    changes no gradient. Also for an ndarray subclass (np.memmap), whose C-order array is a view
    of its memory: a bidirectional stack took that view for its own copy (gradients 41 off)."""
    x0 = rng.standard_normal((4, 3, 5)).astype(np.float32)
    dy = rng.standard_normal((4, 3, 12 if bidirectional else 6)).astype(np.float32)

    def grads(overwrite):
        layer = fusedrnn.LSTM(5, 6, num_layers=2, bidirectional=bidirectional,
                              batch_first=batch_first, seed=0)
        x = x0.copy().view(_Subclass) if subclass else x0.copy()
        layer(x)
        if overwrite:
            x[...] = 0.0
        dx, _ = layer.backward(dy)
        return dx, layer.grads

    (dx, kept), (dx_over, over) = grads(False), grads(True)
    np.testing.assert_array_equal(dx, dx_over)
    for name, g in kept.items():
        np.testing.assert_array_equal(g, over[name], err_msg=name)


@pytest.mark.parametrize("cell", CELLS)
def test_backward_without_hx_gives_the_gradient_at_the_zero_state(rng, cell):
    """Without hx the state starts at zeros, and backward's dh0 (dc0) is the gradient there: the
    bits of a call given those zeros, not zeros or None (torch has no tensor to give it to)."""
    T, B, I, H, L, D = 4, 3, 2, 5, 2, 2
    p = random_problem(rng, cell, T, B, I, H, L, D, lengths=True)
    layer = make_layer(cell, I, H, L=L, bidirectional=True)
    zeros = {k: None if p[k] is None else np.zeros_like(p[k]) for k in ("h0", "c0")}
    given = run_layer(layer, cell, {**p, **zeros})
    layer(p["x"], lengths=p["lengths"])
    dx, dh = layer.backward(p["dy"], hx_of(cell, p["dhn"], p["dcn"]))
    dh0, dc0 = split_h(cell, dh)
    assert np.abs(dh0).max() > 0.1
    np.testing.assert_array_equal(dx, given[3])
    np.testing.assert_array_equal(dh0, given[4])
    if cell == "lstm":
        np.testing.assert_array_equal(dc0, given[5])


@pytest.mark.parametrize("cell", CELLS)
def test_backward_of_no_dy_is_that_of_a_zero_dy(rng, cell):
    """dy=None (a loss of hn alone) is a zero dy: the same dx, dh0 and gradients."""
    layers = [make_layer(cell, 4, 5, L=2, seed=3) for _ in range(2)]
    x = rng.standard_normal((3, 2, 4))
    ys = [layer(x) for layer in layers]
    dhn = tuple(np.ones_like(h) for h in ys[0][1]) if cell == "lstm" else np.ones_like(ys[0][1])
    got = layers[0].backward(None, dhn)
    want = layers[1].backward(np.zeros_like(ys[1][0]), dhn)
    for a, b in zip(_flat(got), _flat(want)):
        np.testing.assert_array_equal(a, b)
    for name in layers[1].grads:
        np.testing.assert_array_equal(layers[0].grads[name], layers[1].grads[name], err_msg=name)


def _flat(out):
    """The arrays of a backward's (dx, dh0) or (dx, (dh0, dc0))."""
    dx, dh = out
    return [dx, *(dh if isinstance(dh, tuple) else (dh,))]


@pytest.mark.parametrize("frozen", [False, True])
def test_a_batch_of_several_lengths_runs_longest_first(rng, monkeypatch, frozen):
    """The kernels skip a step's products for rows past their length where those lie together
    at the batch's end, so the stack runs its rows longest first (_layer_base.descending_order,
    as torch.nn runs a PackedSequence sorted) and gives every output and gradient back in the
    caller's order (which the reference tests check): each layer and direction's kernel call
    sees lengths in descending order."""
    from fusedrnn import functional
    seen = []
    # (the lengths argument's place, and the directions one call runs)
    for name, where, directions in (("forward", 9, 1), ("forward_checked", 9, 1),
                                    ("forward_directions", 5, 2)):
        real = getattr(functional, name)

        def spy(*args, _real=real, _where=where, _directions=directions, **kwargs):
            lengths = kwargs["lengths"] if "lengths" in kwargs else args[_where]
            seen.extend([np.array(lengths)] * _directions)
            return _real(*args, **kwargs)
        monkeypatch.setattr(functional, name, spy)
    layer = fusedrnn.LSTM(5, 7, num_layers=2, bidirectional=True)
    if frozen:
        layer.freeze()
    x = rng.standard_normal((6, 5, 5)).astype(np.float32)
    lengths = np.array([3, 6, 1, 6, 2])
    y, _ = layer(x, lengths=lengths)
    assert len(seen) == 4
    assert all(list(seen_lengths) == [6, 6, 3, 2, 1] for seen_lengths in seen)
    assert np.all(y[3:, 0] == 0) and np.any(y[2, 0] != 0)   # row 0 (length 3) in its place


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_padding_past_lengths_leaves_the_gradients_as_zeros_do(rng, cell, batch_first):
    """NaN in x past a row's length (padding from np.empty, say) made weight_ih_l0 NaN: a
    PackedSequence never holds it. And the lengths array may be the next batch's by backward."""
    T, B, I, H = 5, 4, 3, 6
    lengths0 = np.array([5, 2, 4, 1])
    x0 = rng.standard_normal((B, T, I) if batch_first else (T, B, I))
    dy = rng.standard_normal((B, T, 2 * H) if batch_first else (T, B, 2 * H))
    steps = np.arange(T)[None, :] if batch_first else np.arange(T)[:, None]
    rows = lengths0[:, None] if batch_first else lengths0[None, :]

    def grads(fill):
        layer = make_layer(cell, I, H, L=2, bidirectional=True, batch_first=batch_first)
        x, lengths = x0.copy(), lengths0.copy()
        x[steps >= rows] = fill
        layer(x, lengths=lengths)
        lengths[:] = T
        dx, _ = layer.backward(dy)
        return {"dx": dx, **layer.grads}

    want = grads(0.0)
    got = grads(np.nan)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_backward_frees_saved_state_and_eval_keeps_nothing(rng):
    layer = fusedrnn.RNN(3, 4)
    x = rng.standard_normal((2, 1, 3)).astype(np.float32)
    y, _ = layer(x)
    layer.backward(y)
    with pytest.raises(RuntimeError, match="backward already ran"):
        layer.backward(y)
    layer.eval()
    y, _ = layer(x)
    assert layer._saved is None
    with pytest.raises(RuntimeError, match="eval mode"):
        layer.backward(y)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_backward_frees_each_layers_saved_state_as_it_goes(rng, monkeypatch, request, cell,
                                                            bidirectional, threads):
    """A layer direction's saved state goes as soon as its backward has run (torch's autograd
    frees a node's so), not once the layers below have run theirs too: from the start of one
    kernel backward to the next, the kernels' blocks in use grow by at most what the first
    returned (dx, dh0, dc0) less the saved state it ran through. (A bidirectional layer's
    directions: one pair call on two threads, else one call each.)"""
    request.getfixturevalue("two_threads" if threads == 2 else "one_thread")
    from fusedrnn import _C, functional
    seen = []  # per kernel backward: bytes in use at its start, its saved state, what it returned
    run, run_both = functional.backward, functional.backward_directions

    def watched(ctx, *args, **kwargs):
        in_use, saved = _C.workspace_bytes()["in_use"], ctx.saved_bytes
        out = run(ctx, *args, **kwargs)
        seen.append((in_use, saved, sum(a.nbytes for a in out[:3] if a is not None)))
        return out

    def watched_both(ctxs, *args, **kwargs):  # (a bidirectional layer's: one kernel call)
        in_use, saved = _C.workspace_bytes()["in_use"], sum(c.saved_bytes for c in ctxs)
        outs = run_both(ctxs, *args, **kwargs)
        seen.append((in_use, saved,
                     sum(a.nbytes for out in outs for a in out[:3] if a is not None)))
        return outs

    layer = getattr(fusedrnn, cell.upper())(16, 32, num_layers=2, bidirectional=bidirectional,
                                            seed=0)
    x = rng.standard_normal((20, 8, 16)).astype(np.float32)
    for watch in (False, True):  # (the first: the threads' lasting buffers)
        if watch:
            monkeypatch.setattr(functional, "backward", watched)
            monkeypatch.setattr(functional, "backward_directions", watched_both)
        y, _ = layer(x)
        layer.backward(np.ones_like(y))
    assert len(seen) == (2 if threads == 2 or not bidirectional else 4)
    for (in_use, saved, returned), (next_in_use, _, _) in zip(seen, seen[1:]):
        assert saved > 0
        assert next_in_use - in_use <= returned - saved


def test_sgd_step_through_named_parameters_changes_the_layer(rng):
    """The parameters are live: an in-place optimiser step changes the layer's output, and the
    loss goes down."""
    layer = fusedrnn.LSTM(3, 6, num_layers=2, batch_first=True, dtype=F64, seed=0)
    x = rng.standard_normal((4, 5, 3))
    target = rng.standard_normal((4, 5, 6)) * 0.5
    losses = []
    for _ in range(30):
        y, _ = layer(x)
        losses.append(float(((y - target) ** 2).mean()))
        layer.zero_grad()
        layer.backward(2 * (y - target) / y.size)
        for name, p in layer.named_parameters():
            p -= 2.0 * layer.grads[name]
    assert all(np.diff(losses) < 0) and losses[-1] < 0.95 * losses[0]
    sd = layer.state_dict()
    assert all(sd[k] is p for k, p in layer.named_parameters())
    assert [id(p) for p in layer.parameters()] == [id(v) for v in sd.values()]


def test_parameters_are_attributes_under_torch_names(rng):
    """layer.weight_ih_l0 etc. are the live arrays; assigning one copies into that array after
    the checks load_state_dict makes (a plain attribute would shadow the parameter, unused)."""
    layer = fusedrnn.GRU(3, 4, num_layers=2, bidirectional=True, dtype=F64, seed=0)
    sd = layer.state_dict()
    for name in sd:
        assert getattr(layer, name) is sd[name] and name in dir(layer)
    x = rng.standard_normal((5, 2, 3))
    y0, _ = layer(x)
    held = layer.weight_hh_l1_reverse
    new = rng.standard_normal(held.shape).astype(np.float32)   # other float dtypes are cast
    layer.weight_hh_l1_reverse = new
    assert layer.weight_hh_l1_reverse is held and np.array_equal(held, new.astype(F64))
    assert "weight_hh_l1_reverse" not in vars(layer)
    y1, _ = layer(x)
    assert not np.array_equal(y0[:, :, 4:], y1[:, :, 4:])     # the reverse direction's output
    np.testing.assert_array_equal(y0[:, :, :4], y1[:, :, :4])
    with pytest.raises(ValueError, match=r"weight_ih_l0 must have shape \(12, 3\), got \(12, 4\)"):
        layer.weight_ih_l0 = np.zeros((12, 4))
    with pytest.raises(TypeError, match="bias_hh_l0 must have a float dtype, got int64"):
        layer.bias_hh_l0 = np.zeros(12, dtype=np.int64)
    with pytest.raises(TypeError, match=r"bias_hh_l0 must be an array of shape \(12,\), got None"):
        layer.bias_hh_l0 = None     # (it said "must have a float dtype, got object")
    with pytest.raises(AttributeError, match="no attribute 'weight_hr_l0'"):
        layer.weight_hr_l0
    layer.note = "plain attributes still work"
    assert layer.note == "plain attributes still work"
    assert [len(g) for g in layer.all_weights] == [4, 4, 4, 4]
    assert layer.all_weights[3][1] is layer.weight_hh_l1_reverse


def test_state_dict_prefix_and_destination_as_torch():
    """state_dict(destination, prefix, keep_vars), as a parent module calls torch's: the prefix
    before every name as it is, the destination filled (what it held kept) and returned, the
    arrays live with or without keep_vars; positional as torch still takes them."""
    layer = fusedrnn.LSTM(3, 4, num_layers=2, seed=0)
    own = dict(layer.named_parameters())
    into = {"head.weight": np.zeros(2)}
    got = layer.state_dict(destination=into, prefix="rnn.", keep_vars=True)
    assert got is into and list(got) == ["head.weight"] + [f"rnn.{k}" for k in own]
    assert all(got[f"rnn.{k}"] is p for k, p in own.items())
    assert layer.state_dict({}, "enc.")["enc.weight_hh_l1"] is own["weight_hh_l1"]
    assert list(layer.state_dict(prefix="")) == list(own)


@pytest.mark.parametrize("frozen", [False, True], ids=["plain", "frozen"])
def test_double_and_float_cast_the_layer_as_torchs_do(rng, frozen):
    """double() / float() / to(dtype): the parameters and gradients in the new dtype (new
    arrays: NumPy cannot change an array's dtype in place), the outputs those of a layer made
    in it; a frozen layer stays frozen under a new id; a pending backward is dropped."""
    layer = make_layer("lstm", 3, 4, L=2, proj=2, dtype=np.float32)
    layer.grads["bias_hh_l1"] += 0.5
    if frozen:
        layer.zero_grad(set_to_none=True)
        layer.freeze()
        first_id = layer._params.frozen_id
    x32 = rng.standard_normal((5, 2, 3)).astype(np.float32)
    y, _ = layer(x32)
    values = {name: p.copy() for name, p in layer.named_parameters()}
    assert layer.double() is layer and layer.dtype == F64 and layer.frozen == frozen
    for name, p in layer.named_parameters():
        assert p.dtype == F64 and np.array_equal(p, values[name]), name
    for name, g in layer.grads.items():
        assert g is None if frozen else (g.dtype == F64), name
    if frozen:
        assert layer._params.frozen_id != first_id
    else:
        assert (layer.grads["bias_hh_l1"] == 0.5).all()
    with pytest.raises(RuntimeError, match="cast to float64 since the last forward"):
        layer.backward(np.ones_like(y))
    twin = make_layer("lstm", 3, 4, L=2, proj=2, dtype=F64)
    twin.load_state_dict(layer.state_dict())
    x = x32.astype(F64)
    assert np.array_equal(layer(x)[0], twin(x)[0])
    layer.backward(np.ones((5, 2, 2)))
    assert all(g.dtype == F64 for g in layer.grads.values())
    assert layer.to(np.float32) is layer and layer.dtype == np.float32
    assert layer.weight_hh_l0.dtype == np.float32 and layer.frozen == frozen
    assert np.array_equal(layer(x32)[0], y)
    assert layer.float() is layer and layer.to(dtype=np.float32) is layer    # nothing to do


def test_to_takes_torchs_forms_for_the_cpu_and_names_what_it_refuses():
    layer = make_layer("gru", 3, 4, dtype=np.float32)
    held = layer.weight_ih_l0
    for call in (lambda: layer.to("cpu"), lambda: layer.to(device="cpu:0"), layer.cpu,
                 lambda: layer.to("cpu", np.float32), lambda: layer.to(non_blocking=True)):
        assert call() is layer and layer.weight_ih_l0 is held
    assert layer.to("cpu", float).dtype == F64 and layer.to(np.dtype("float32")).dtype == "f4"
    held = layer.weight_ih_l0                # a new array: the cast's
    with pytest.raises(ValueError, match="device must be None or 'cpu'"):
        layer.to("cuda")
    with pytest.raises(ValueError, match="device must be None or 'cpu'.*got 'float64'"):
        layer.to("float64")                  # a str is a device, as torch reads it
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got int32"):
        layer.to(np.int32)
    with pytest.raises(TypeError, match="to\\(\\) got a dtype twice"):
        layer.to(np.float32, dtype=F64)
    with pytest.raises(TypeError, match="to\\(\\) got a device twice"):
        layer.to("cpu", device="cpu")
    with pytest.raises(TypeError, match="non_blocking must be a bool"):
        layer.to(non_blocking="yes")
    assert layer.dtype == np.float32 and layer.weight_ih_l0 is held


def test_load_state_dict_copies_into_the_live_arrays_and_casts(rng):
    a = fusedrnn.LSTM(3, 4, proj_size=2, bidirectional=True, seed=0)
    b = fusedrnn.LSTM(3, 4, proj_size=2, bidirectional=True, seed=1, dtype=F64)
    held = a.state_dict()["weight_hr_l0_reverse"]
    a.load_state_dict(b.state_dict())          # float64 values into a float32 layer
    assert a.state_dict()["weight_hr_l0_reverse"] is held
    assert held.dtype == np.float32
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(a.state_dict()[k], v.astype(np.float32))
    snapshot = copy.deepcopy(a.state_dict())   # a snapshot is a copy
    for p in a.parameters():
        p *= 0
    a.load_state_dict(snapshot)
    np.testing.assert_array_equal(a.state_dict()["weight_ih_l0"], snapshot["weight_ih_l0"])


def test_load_state_dict_drops_a_pending_backward(rng):
    layer = fusedrnn.RNN(2, 3)
    y, _ = layer(np.ones((2, 1, 2), np.float32))
    layer.load_state_dict(layer.state_dict())
    with pytest.raises(RuntimeError, match="reloaded"):
        layer.backward(y)


def test_seed_reproducible_and_repr():
    a, b = fusedrnn.GRU(3, 4, num_layers=2, seed=5), fusedrnn.GRU(3, 4, num_layers=2, seed=5)
    for (ka, va), (kb, vb) in zip(a.named_parameters(), b.named_parameters()):
        assert ka == kb
        np.testing.assert_array_equal(va, vb)
    c = fusedrnn.GRU(3, 4, num_layers=2, seed=6)
    assert np.abs(a.state_dict()["weight_ih_l0"] - c.state_dict()["weight_ih_l0"]).max() > 0
    assert repr(a) == "GRU(3, 4, num_layers=2)"
    assert repr(fusedrnn.RNN(3, 4, nonlinearity="relu", dtype=F64)) == \
        "RNN(3, 4, nonlinearity='relu', dtype=float64)"
    lstm = fusedrnn.LSTM(3, 4, num_layers=2, proj_size=2, dtype=F64)
    assert lstm.extra_repr() == "3, 4, proj_size=2, num_layers=2, dtype=float64"   # torch's order
    assert a.training and not a.eval().training and a.train().training
    lstm = fusedrnn.LSTM(3, 4, proj_size=2)
    assert (lstm.input_size, lstm.hidden_size, lstm.proj_size, lstm.num_layers) == (3, 4, 2, 1)


@pytest.mark.parametrize("cell,proj", [(c, 0) for c in CELLS] + [("lstm", 2)])
def test_reset_parameters_draws_again_into_the_same_arrays(cell, proj):
    """As the constructor draws (torch's U(-1/sqrt(H), 1/sqrt(H)) in torch's order), from the
    layer's own generator going on from its first draws, into the arrays the layer had: the
    references an optimiser holds stay the layer's. Gradients are kept, as torch keeps .grad."""
    layer = make_layer(cell, 3, 16, L=2, bidirectional=True, proj=proj, dtype=np.float32, seed=7)
    held = dict(layer.named_parameters())
    views = {name: p[..., :1] for name, p in held.items()}
    before = {name: p.copy() for name, p in held.items()}
    layer.grads["weight_hh_l0"] += 1
    assert layer.reset_parameters() is None                 # as torch's
    init_seq = np.random.SeedSequence(7).spawn(2)[0]
    stream = np.random.default_rng(init_seq)
    bound = 1 / np.sqrt(16)
    first = {n: stream.uniform(-bound, bound, s) for n, s in layer._spec.param_shapes().items()}
    for name, p in layer.named_parameters():
        assert p is held[name] and p.dtype == np.float32 and np.shares_memory(p, views[name])
        np.testing.assert_array_equal(before[name], first[name].astype(np.float32))
        np.testing.assert_array_equal(p, stream.uniform(-bound, bound, p.shape).astype(np.float32))
    assert (layer.grads["weight_hh_l0"] == 1).all()
    twin = make_layer(cell, 3, 16, L=2, bidirectional=True, proj=proj, dtype=np.float32, seed=7)
    twin.reset_parameters()
    for (name, p), q in zip(layer.named_parameters(), twin.parameters()):
        np.testing.assert_array_equal(p, q)
    layer.reset_parameters()                                # the stream goes on
    assert not np.array_equal(layer.weight_ih_l0, twin.weight_ih_l0)


def test_reset_parameters_is_seen_by_the_next_call_and_drops_a_pending_backward(rng):
    """Each call compares the weights with the bytes the kernels packed from, so the next call
    uses the new values; a training forward's saved state holds the old ones: no backward."""
    layer = make_layer("gru", 4, 6, L=2, dtype=np.float32).eval()
    x = rng.standard_normal((5, 2, 4)).astype(np.float32)
    old = layer(x)[0]
    layer.reset_parameters()
    fresh = make_layer("gru", 4, 6, L=2, dtype=np.float32, seed=1).eval()
    fresh.load_state_dict(layer.state_dict())
    got = layer(x)[0]
    assert np.array_equal(got, fresh(x)[0]) and not np.array_equal(got, old)
    y, _ = layer.train()(x)
    layer.reset_parameters()
    with pytest.raises(RuntimeError, match=r"reset \(reset_parameters\(\)\) since the last"):
        layer.backward(np.ones_like(y))


def test_reset_parameters_of_a_layer_pickled_before_it_existed():
    """A layer pickled before reset_parameters() has no generator of its own: it takes a new
    one (unseeded), and resets."""
    layer = make_layer("lstm", 3, 4)
    state = layer.__getstate__()
    del state["_init_rng"]
    again = fusedrnn.LSTM.__new__(fusedrnn.LSTM)
    again.__setstate__(state)
    before = again.weight_ih_l0.copy()
    again.reset_parameters()
    assert not np.array_equal(again.weight_ih_l0, before)


@pytest.mark.parametrize("cell", CELLS)
def test_batch_of_zero(cell):
    layer = make_layer(cell, 3, 4, L=2, bidirectional=True, dtype=np.float32)
    x = np.zeros((5, 0, 3), np.float32)
    y, h = layer(x, lengths=np.zeros(0, np.int64))
    hn, cn = split_h(cell, h)
    assert y.shape == (5, 0, 8) and hn.shape == (4, 0, 4)
    dx, dh = layer.backward(y)
    assert dx.shape == (5, 0, 3) and split_h(cell, dh)[0].shape == (4, 0, 4)
    assert all(not g.any() for g in layer.grads.values())


def test_import_fusedrnn_does_not_import_torch():
    code = "import sys, fusedrnn; fusedrnn.LSTM(2, 3); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# Threads

def test_separate_layers_in_parallel_threads(rng):
    """Several layers run at once from Python threads give the sequential results exactly."""
    jobs = []
    for i, cell in enumerate(CELLS * 2):
        dtype = np.float32 if i % 2 else F64
        layer = make_layer(cell, 16, 24, L=2, bidirectional=True, dtype=dtype, seed=i)
        p = random_problem(rng, cell, 20, 8, 16, 24, 2, 2, lengths=True)
        p = {k: v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
             for k, v in p.items()}
        jobs.append((layer, cell, p))

    def work(job):
        layer, cell, p = job
        layer.zero_grad()
        return run_layer(layer, cell, p)

    sequential = [work(j) for j in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for _ in range(3):
            parallel = list(pool.map(work, jobs))
            for seq, par in zip(sequential, parallel):
                for a, b in zip(seq[:6], par[:6]):
                    if a is not None:
                        np.testing.assert_array_equal(a, b)
                for k in seq[6]:
                    np.testing.assert_array_equal(seq[6][k], par[6][k])


@pytest.mark.parametrize("frozen", [False, True], ids=["eval", "frozen"])
def test_one_layer_serves_inference_from_several_threads(rng, frozen):
    """One layer in eval mode (frozen or not), called at once from four Python threads on
    inputs of many shapes, as a server shares one model: every output is the sequential one
    exactly (the packed-weight cache is per thread, the block cache locked)."""
    for cell in CELLS:
        layer = make_layer(cell, 12, 20, L=2, bidirectional=True, dtype=np.float32, seed=3).eval()
        if frozen:
            layer.freeze()
        xs = [rng.standard_normal((int(rng.integers(1, 25)), int(rng.integers(1, 9)), 12))
              .astype(np.float32) for _ in range(16)]
        want = [[a.copy() for a in flat_outputs(layer(x))] for x in xs]

        def work(first):
            return [(i, flat_outputs(layer(xs[i]))) for _ in range(5)
                    for i in range(first, len(xs), 4)]

        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            for results in pool.map(work, range(4)):
                for i, got in results:
                    for a, b in zip(got, want[i]):
                        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_a_training_call_meeting_another_threads_on_one_layer_raises(rng, monkeypatch, cell):
    """In training one layer object serves one thread at a time: a training forward or a
    backward that meets another thread's (held here inside the kernels' call) raises and names
    the rule, instead of taking or replacing the state the other saves; the held call then
    finishes, and its backward gives the right gradients."""
    import threading

    from fusedrnn import _layer_base
    layer = make_layer(cell, 6, 8, dtype=np.float64, seed=2)
    x = rng.standard_normal((5, 3, 6))
    want_y = layer(x)[0].copy()
    want_dx = layer.backward(np.ones_like(want_y))[0].copy()
    inside, go_on = threading.Event(), threading.Event()
    real_forward = _layer_base.stack_forward

    def held_forward(*args, **kwargs):
        inside.set()
        assert go_on.wait(10)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(_layer_base, "stack_forward", held_forward)
    result = {}
    holder = threading.Thread(target=lambda: result.setdefault("y", layer(x)[0]))
    holder.start()
    try:
        assert inside.wait(10)
        monkeypatch.setattr(_layer_base, "stack_forward", real_forward)
        for call in (lambda: layer(x), lambda: layer.backward(np.ones_like(want_y))):
            with pytest.raises(RuntimeError, match="one layer object serves one thread at a time"):
                call()
    finally:
        go_on.set()
        holder.join()
    np.testing.assert_array_equal(result["y"], want_y)
    np.testing.assert_array_equal(layer.backward(np.ones_like(want_y))[0], want_dx)


@pytest.mark.parametrize("cell", CELLS)
def test_a_backward_whose_forward_another_thread_replaced_raises(rng, cell):
    """Thread A's training forward, then B's, then A's backward: the calls never overlap, so no
    claim meets another, but A's backward would run through B's forward and silently give B's
    gradients. It raises and names the rule; B's own backward, and A's after a forward of its
    own, give the right gradients; a forward handed to another thread for its backward (no
    forward of that thread replaced) still runs."""
    layer = make_layer(cell, 6, 8, dtype=np.float64, seed=2)
    x_a, x_b = rng.standard_normal((2, 5, 3, 6))
    dy = np.ones((5, 3, 8))
    want_a = copy.deepcopy(layer)
    want_a(x_a)
    want_dx_a = want_a.backward(dy)[0]
    want_b = copy.deepcopy(layer)
    want_b(x_b)
    want_dx_b = want_b.backward(dy)[0]

    layer(x_a)
    results_from_threads(lambda: layer(x_b), 1, 1)
    with pytest.raises(RuntimeError, match="replaced by another thread's forward"):
        layer.backward(dy)
    dx_b = results_from_threads(lambda: layer.backward(dy)[0], 1, 1)[0]
    np.testing.assert_array_equal(dx_b, want_dx_b)
    layer(x_a)
    np.testing.assert_array_equal(layer.backward(dy)[0], want_dx_a)
    results_from_threads(lambda: layer(x_b), 1, 1)  # handed over: this thread had none pending
    np.testing.assert_array_equal(layer.backward(dy)[0], want_dx_b)


@pytest.mark.parametrize("call", ["forward", "backward"])
def test_an_interrupted_training_call_leaves_the_layer_usable(rng, call):
    """A KeyboardInterrupt landing after a training call's claim on the layer and before its
    release (a Ctrl-C in a training loop) left the claim held: every later training call raised
    "another thread is in a training forward or backward", with no other thread. The thread
    that held it now takes it back; another thread is still refused."""
    import sys
    import threading

    from fusedrnn import layers
    layer = make_layer("lstm", 4, 5, seed=0)
    x = rng.standard_normal((3, 2, 4))
    want = layer(x)[0].copy()
    dy = np.ones_like(want)
    if call == "backward":
        layer(x)
    claim = layers._Layer._claim_training_call.__code__
    tracer_before = sys.gettrace()  # (a coverage run's or a debugger's: given back after)

    def interrupt_after_the_claim(frame, event, arg):
        if frame.f_code is claim:
            def local(frame, event, arg):
                if event == "return":
                    sys.settrace(tracer_before)
                    raise KeyboardInterrupt  # as a signal handler's, before the caller's `try`
                return local
            return local
        return None

    sys.settrace(interrupt_after_the_claim)
    try:
        with pytest.raises(KeyboardInterrupt):
            layer(x) if call == "forward" else layer.backward(dy)
    finally:
        sys.settrace(tracer_before)
    errors = []
    other = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, layer, x)))
    other.start()
    other.join()
    assert "one layer object serves one thread at a time" in str(errors[0].value)
    np.testing.assert_array_equal(layer(x)[0], want)
    layer.backward(dy)
    layer(x)  # (released: nothing held after a whole call)
    other = threading.Thread(target=lambda: errors.append(layer.backward(dy)))
    other.start()
    other.join()
    assert len(errors) == 2


def test_a_backward_interrupted_after_consuming_a_layer_refuses_to_run_again(rng, monkeypatch):
    """A consuming backward frees each layer's saved state as it goes: interrupted below the top
    layer (a Ctrl-C), the layer still holds the forward's saved state with the top layer's
    gone, so a second backward says so instead of reading freed state."""
    from fusedrnn import functional
    layer = make_layer("lstm", 4, 5, L=2, seed=0)
    y, _ = layer(rng.standard_normal((3, 2, 4)))
    real, calls = functional.backward, []

    def interrupted_below_the_top(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:   # layer 1 ran (and consumed its state); layer 0 is interrupted
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "backward", interrupted_below_the_top)
    with pytest.raises(KeyboardInterrupt):
        layer.backward(np.ones_like(y))
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="backward already ran through this saved state with "
                                           "consume=True, which frees it: run the forward again"):
        layer.backward(np.ones_like(y))


@pytest.mark.parametrize("call", ["forward", "backward"])
def test_a_claim_taken_by_another_thread_is_not_mistaken_for_the_callers_stale_one(rng, call):
    """The thread that made the last training call calls again while another thread is inside
    its claim of the layer (paused here at each line of it in turn, as a GIL switch can): it got
    the layer and had not yet written itself down as the owner, where the last owner's name
    still stood. Taken for the caller's own interrupted claim, both calls ran at once: the
    caller's forward or backward took or replaced the other's saved state, and the other's
    release then raised "release unlocked lock". Every pause: one call is refused or they run
    one after the other, each giving the serial bits, and the layer is free after (where the
    other's forward ran, it replaced this thread's, whose backward then raises)."""
    import threading

    from fusedrnn import layers
    layer = make_layer("gru", 4, 5, seed=0)
    x = rng.standard_normal((3, 2, 4))
    want = layer(x)[0].copy()
    dy = np.ones_like(want)
    want_dx = layer.backward(dy)[0].copy()
    claim = layers._Layer._claim_training_call.__code__
    run = (lambda: layer(x)[0]) if call == "forward" else (lambda: layer.backward(dy)[0])
    pause_at = 0
    while True:
        layer(x)  # by this thread: the last owner (and a forward for backward to run through)
        paused, go_on, outcome = threading.Event(), threading.Event(), {}
        lines = [0]

        def pause_in_the_claim(frame, event, arg):
            if frame.f_code is not claim:
                return None

            def line(frame, event, arg):
                if event == "line":
                    lines[0] += 1
                    if lines[0] == pause_at + 1:
                        paused.set()
                        assert go_on.wait(10)
                return line
            return line

        def other():
            sys.settrace(pause_in_the_claim)
            try:
                outcome["other"] = run()
            except RuntimeError as e:
                outcome["other"] = e
            finally:
                sys.settrace(None)
                paused.set()  # (past the claim's last line: nothing left to pause at)

        t = threading.Thread(target=other)
        t.start()
        assert paused.wait(10)
        if "other" in outcome:  # every line of the claim has been paused at
            t.join()
            break
        try:
            outcome["mine"] = run()
        except RuntimeError as e:
            outcome["mine"] = e
        go_on.set()
        t.join()
        got = [v for v in outcome.values() if not isinstance(v, RuntimeError)]
        errors = [v for v in outcome.values() if isinstance(v, RuntimeError)]
        for e in errors:  # (run one after the other, the second backward has no forward)
            assert ("one layer object serves one thread at a time" in str(e)
                    or call == "backward" and "backward needs a forward" in str(e)), (pause_at, e)
        for y in got:
            np.testing.assert_array_equal(y, want if call == "forward" else want_dx)
        if call == "forward" and isinstance(outcome["other"], RuntimeError):
            np.testing.assert_array_equal(layer.backward(dy)[0], want_dx)  # not taken
        elif call == "forward":  # the other's forward ran last: this thread's was replaced
            with pytest.raises(RuntimeError, match="replaced by another thread's forward"):
                layer.backward(dy)
        pause_at += 1
    assert pause_at >= 2


def flat_outputs(out):
    """y, hn (and cn) of a layer call as one list."""
    y, h = out
    return [y, *h] if isinstance(h, tuple) else [y, h]


def test_weights_swapped_and_back_during_a_call_leave_no_stale_panels(one_thread):
    """Another thread writes the weights during a call and then puts them back (an A/B or EMA
    swap): that call may be torn, as torch's would be, but the calls after must be right. The
    cache packed from the live weights after copying them, so its copy vouched for panels of the
    other weights, for good (35 of 150 rounds before)."""
    import random
    import threading
    import time

    layer = fusedrnn.LSTM(512, 512, seed=0).eval()
    s1 = {k: v.copy() for k, v in layer.state_dict().items()}
    s2 = fusedrnn.LSTM(512, 512, seed=1).state_dict()
    x = np.random.default_rng(0).standard_normal((2, 1, 512)).astype(np.float32)
    want = fusedrnn.LSTM(512, 512, seed=0).eval()(x)[0]
    pause = random.Random(0)

    def swap_and_back(delay):
        time.sleep(delay)
        layer.load_state_dict(s2)
        layer.load_state_dict(s1)

    stale = 0
    for _ in range(150):
        layer.load_state_dict(s2)
        layer(x)                                  # the cache holds s2's panels ...
        layer.load_state_dict(s1)                 # ... so the next call copies and repacks
        swapper = threading.Thread(target=swap_and_back, args=(pause.uniform(0, 0.002),))
        swapper.start()
        layer(x)                                  # overlaps the swap: may be torn
        swapper.join()
        stale += not np.array_equal(layer(x)[0], want)
    assert stale == 0


def test_kernels_release_the_gil_while_a_layer_runs():
    """While one thread runs a layer, the main thread runs Python and sees the layer's kernel call
    running (_C.calls_without_gil, counted in the call's part without the GIL), which a held GIL
    would never let it see. Seen, not timed: the main thread's longest pause had to stay under
    half a call, but beside the kernels' two threads on two cores that pause is the scheduler's
    (22% of a call on a quiet machine, 37% beside busy processes, and once 53%)."""
    import threading
    import time

    from fusedrnn import _C

    layer = fusedrnn.LSTM(128, 256).eval()
    x = np.random.default_rng(0).standard_normal((50, 32, 128)).astype(np.float32)
    seen = threading.Event()

    def work():  # until seen; under a held GIL, a minute of calls and the test fails
        stop = time.monotonic() + 60
        while not seen.is_set() and time.monotonic() < stop:
            layer(x)

    assert _C.calls_without_gil() == 0
    worker = threading.Thread(target=work)
    worker.start()
    while worker.is_alive():
        if _C.calls_without_gil() > 0:
            seen.set()
    worker.join()
    assert seen.is_set()
    assert _C.calls_without_gil() == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_pickled_layer_runs_and_trains_as_the_original(rng, dtype):
    """Unpickled arrays carry an equal dtype that is not numpy's own object (the kernels once
    refused them: "w_ih must have dtype float32, got float32")."""
    import pickle
    layer = make_layer("lstm", 5, 7, L=2, dtype=dtype)
    again = pickle.loads(pickle.dumps(layer))
    assert again.weight_ih_l0.dtype is not np.dtype(dtype)  # what made it fail
    x = rng.standard_normal((4, 3, 5)).astype(dtype)
    x_pickled = pickle.loads(pickle.dumps(x))
    for got, want in zip(again(x_pickled)[0:1], layer(x)[0:1]):
        assert np.array_equal(got, want)
    dy = rng.standard_normal((4, 3, 7)).astype(dtype)
    assert np.array_equal(again.backward(dy)[0], layer.backward(dy)[0])


def test_a_spec_s_repr_is_its_fields_the_same_for_equal_layers():
    """torch.jit.trace checks a trace by comparing two runs' graphs, where the adapter's
    autograd Function shows its Spec: an address in the repr made the two differ."""
    a, b = (fusedrnn.LSTM(3, 4, num_layers=2, proj_size=2, seed=s)._spec for s in (0, 1))
    assert repr(a) == repr(b) == (
        "Spec(cell='lstm', input_size=3, hidden_size=4, num_layers=2, bias=True, "
        "batch_first=False, dropout=0.0, bidirectional=False, proj_size=2, "
        "linear_before_reset=True)")


@pytest.mark.parametrize("protocol", [0, 1])
def test_a_layer_pickles_with_the_old_protocols_as_torchs_modules_do(rng, protocol):
    """Protocols 0 and 1 refused the layer's Spec (__slots__ without __getstate__)."""
    import pickle
    for frozen in (False, True):
        layer = make_layer("gru", 5, 7, L=2, dtype=np.float32)
        if frozen:
            layer.freeze()
        again = pickle.loads(pickle.dumps(layer, protocol=protocol))
        assert repr(again) == repr(layer) and again.frozen == frozen
        x = rng.standard_normal((4, 3, 5)).astype(np.float32)
        assert np.array_equal(again(x)[0], layer(x)[0])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_layer_copies_after_a_training_forward_without_its_pending_backward(rng, how):
    """The kernels' saved state of a pending training forward stays with the layer: the copy
    (as torch's modules, which keep no graph) has no forward to run backward through, and the
    original still has."""
    import copy
    import pickle
    for frozen in (False, True):
        layer = make_layer("lstm", 5, 7, L=2, dtype=np.float32)
        if frozen:
            layer.freeze()
        x = rng.standard_normal((4, 3, 5)).astype(np.float32)
        dy = rng.standard_normal((4, 3, 7)).astype(np.float32)
        layer(x)
        again = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
        assert again.frozen == frozen
        with pytest.raises(RuntimeError, match="is a copy"):
            again.backward(dy)
        want = layer.backward(dy)[0]
        again(x)
        assert np.array_equal(again.backward(dy)[0], want)


def test_frozen_single_rows_in_parallel_threads(rng):
    """Frozen layers with a single row, on one thread each (where the input projection's way is
    on trial per shape, csrc/ride_policy.cpp, shared by the threads), run at once from Python
    threads: the sequential results exactly, round after round, as the trials take turns."""
    before = fusedrnn.get_num_threads()
    fusedrnn.set_num_threads(1)
    try:
        jobs = []
        for i, cell in enumerate(["lstm", "gru"] * 3):
            layer = make_layer(cell, 16, 64, dtype=np.float32, seed=i).freeze()
            x = rng.standard_normal((40, 1, 16)).astype(np.float32)
            jobs.append((layer, x))

        def work(job):
            layer, x = job
            layer.zero_grad()
            y, _ = layer(x)
            dx, _ = layer.backward(np.ones_like(y))
            return [y, dx, *(g.copy() for g in layer.grads.values())]

        sequential = [work(j) for j in jobs]
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            for _ in range(5):
                for seq, par in zip(sequential, pool.map(work, jobs)):
                    for a, b in zip(seq, par):
                        np.testing.assert_array_equal(a, b)
    finally:
        fusedrnn.set_num_threads(before)


def _misaligned_copy(a):
    """a's values in memory at an odd offset (np.frombuffer): C-contiguous but not aligned."""
    v = np.frombuffer(bytearray(a.nbytes + 1), a.dtype, a.size, offset=1).reshape(a.shape)
    v[...] = a
    return v


@pytest.mark.parametrize("swap", [np.asfortranarray, _misaligned_copy], ids=["F", "misaligned"])
@pytest.mark.parametrize("cell", CELLS)
def test_backward_adds_into_grads_in_place(rng, cell, swap):
    """The kernels add into the layer's own gradient arrays (the same objects before and after);
    a gradient array swapped for one they cannot write in place (not C-contiguous, or not
    aligned: the kernels refused that one, and the backward raised after consuming the layers
    above) is added into by NumPy instead, and both ways give the same numbers, accumulating
    over calls."""
    layers = [make_layer(cell, 5, 6, L=2, bidirectional=True, dtype=np.float32, seed=4)
              for _ in range(2)]
    swapped = layers[1]
    name = "weight_hh_l0_reverse"   # (a lower layer's: the backward reaches it last)
    swapped.grads[name] = swap(swapped.grads[name])
    assert swapped._grads_to_add_into(swapped.grads) is None
    assert layers[0]._grads_to_add_into(layers[0].grads) is not None
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    dy = rng.standard_normal((4, 3, 12)).astype(np.float32)
    arrays = dict(layers[0].grads)
    for calls in (1, 2):
        for layer in layers:
            layer.train()
            layer(x)
            layer.backward(dy)
        assert all(layers[0].grads[k] is arrays[k] for k in arrays)
        for k in arrays:
            if calls == 1:  # into zeros: the very bits of the gradients
                assert np.array_equal(layers[0].grads[k], swapped.grads[k]), k
            else:
                assert_close(layers[0].grads[k], swapped.grads[k], np.float32, "gradient", what=k)
    assert not np.array_equal(arrays["weight_ih_l0"], 0)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B", [3, 0])
def test_zero_grad_set_to_none_writes_over_arrays_nothing_else_holds(rng, cell, B):
    """zero_grad(set_to_none=True) leaves None in grads, as torch's .grad; the next backward
    writes the gradients over the arrays they had (whatever those held) when nothing else holds
    them, the very bits of zero_grad() then backward, and a backward after that adds as usual.
    An entry set to None alone starts from zero; zero_grad() after set_to_none gives the arrays
    back, zeroed."""
    ref, layer = (make_layer(cell, 5, 6, L=2, bidirectional=True, proj=2 if cell == "lstm" else 0,
                             dtype=np.float32, seed=3) for _ in range(2))
    x = rng.standard_normal((4, B, 5)).astype(np.float32)
    dy = rng.standard_normal((4, B, 4 if cell == "lstm" else 12)).astype(np.float32)
    ids = {k: id(g) for k, g in layer.grads.items()}   # (ids alone: a name would hold the array)
    for k in ids:
        layer.grads[k].fill(np.nan)  # stale values the backward must write over
    layer.zero_grad(set_to_none=True)
    assert all(g is None for g in layer.grads.values())
    ref.zero_grad()
    for m in (ref, layer):
        m(x)
        m.backward(dy)
    for k, g in layer.grads.items():
        assert id(g) == ids[k], k
        np.testing.assert_array_equal(g, ref.grads[k], err_msg=k)
    if B == 0:
        assert not any(g.any() for g in layer.grads.values())
    for m in (ref, layer):  # no reset: adds
        m(x)
        m.backward(dy)
    for k, g in layer.grads.items():
        np.testing.assert_array_equal(g, ref.grads[k], err_msg=k)
    layer.grads["bias_hh_l0"] = None  # one entry alone: from zero, the rest add
    ref.grads["bias_hh_l0"].fill(0)
    for m in (ref, layer):
        m(x)
        m.backward(dy)
    for k, g in layer.grads.items():
        np.testing.assert_array_equal(g, ref.grads[k], err_msg=k)
    del g   # the loop's name holds an array, which zero_grad would then leave alone
    layer.zero_grad(set_to_none=True)
    layer.zero_grad()
    assert not any(g.any() for g in layer.grads.values())
    assert all(id(g) == ids[k] for k, g in layer.grads.items() if k != "bias_hh_l0")


@pytest.mark.parametrize("hold", ["arrays", "views"])
def test_zero_grad_set_to_none_leaves_arrays_the_caller_holds_alone(rng, hold):
    """As torch's .grad after zero_grad(): gradient arrays (or views of them) the caller kept
    keep their values through the next backward, which gives new arrays (gradient accumulation
    by hand: acc = grads[k]; zero_grad(set_to_none=True); backward; acc += grads[k]). Arrays
    nobody kept are still written over (the test above)."""
    ref, layer = (make_layer("lstm", 5, 6, L=2, dtype=np.float32, seed=3) for _ in range(2))
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    dy = rng.standard_normal((4, 3, 6)).astype(np.float32)
    for m in (ref, layer):
        m(x)
        m.backward(dy)
    kept = {k: g if hold == "arrays" else g[:] for k, g in layer.grads.items()}
    before = {k: g.copy() for k, g in kept.items()}
    layer.zero_grad(set_to_none=True)
    ref.zero_grad()
    for m in (ref, layer):
        m(x)
        m.backward(2 * dy)
    for k, g in layer.grads.items():
        assert not np.shares_memory(g, kept[k]), k
        np.testing.assert_array_equal(kept[k], before[k], err_msg=k)
        np.testing.assert_array_equal(g, ref.grads[k], err_msg=k)


@pytest.mark.parametrize("hold", ["view", "base"])
def test_zero_grad_set_to_none_leaves_views_of_a_view_entry_alone(rng, hold):
    """A gradient entry the caller swapped for a view of its own buffer (a flat gradient buffer):
    a view taken from that entry names the buffer as its base, not the entry (NumPy collapses
    chains of views), so the entry's reference count missed it, the entry looked unheld and the
    next backward wrote over the caller's memory. The buffer and views of the entry keep their
    values, as torch's .grad after zero_grad()."""
    ref, layer = (make_layer("lstm", 5, 6, dtype=np.float32, seed=3) for _ in range(2))
    flat = np.zeros(sum(p.size for _, p in layer.named_parameters()), np.float32)
    offsets = np.cumsum([0] + [p.size for _, p in layer.named_parameters()])
    for (k, p), o in zip(layer.named_parameters(), offsets):
        layer.grads[k] = flat[o:o + p.size].reshape(p.shape)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    dy = rng.standard_normal((4, 3, 6)).astype(np.float32)
    layer(x)
    layer.backward(dy)
    kept = flat if hold == "base" else layer.grads["weight_hh_l0"][...]
    before = kept.copy()
    layer.zero_grad(set_to_none=True)
    ref.zero_grad()
    for m in (ref, layer):
        m(x)
        m.backward(2 * dy)
    np.testing.assert_array_equal(kept, before)
    for k, g in layer.grads.items():
        assert not np.shares_memory(g, flat), k
        np.testing.assert_array_equal(g, ref.grads[k], err_msg=k)


def test_zero_grad_set_to_none_counts_references_at_the_call():
    """Whether the caller still holds a gradient array is read from its reference count, against
    that of a local nothing else holds. A tracer that reads frames' locals (a debugger's, a
    snooper's) adds a reference to every local while it runs: counted once, at an import under
    such a tracer, that count made an array the caller held look unheld, and the next backward
    wrote over it. Arrays nothing holds are still written over."""
    code = """if True:
        import sys
        import numpy as np

        def tracer(frame, event, arg):
            frame.f_locals
            return tracer

        sys.settrace(tracer)
        import fusedrnn
        sys.settrace(None)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((4, 3, 5)).astype(np.float32)
        dy = rng.standard_normal((4, 3, 6)).astype(np.float32)
        layer = fusedrnn.GRU(5, 6, seed=1)
        layer(x)
        layer.backward(dy)
        kept = layer.grads["weight_hh_l0"]
        before = kept.copy()
        layer.zero_grad(set_to_none=True)
        layer(x)
        layer.backward(2 * dy)
        assert np.array_equal(kept, before), "an array the caller held was written over"
        del kept
        ids = {k: id(g) for k, g in layer.grads.items()}
        layer.zero_grad(set_to_none=True)
        layer(x)
        layer.backward(dy)
        assert all(id(g) == ids[k] for k, g in layer.grads.items()), "unheld arrays not reused"
    """
    subprocess.run([sys.executable, "-c", code], check=True)


def test_zero_grad_set_to_none_with_spare_arrays_unfit_makes_new_ones(rng):
    """A gradient array swapped for one the kernels cannot write (Fortran order) before
    zero_grad(set_to_none=True): the backward writes new arrays, with the same values."""
    ref, layer = (make_layer("gru", 5, 6, dtype=np.float32, seed=5) for _ in range(2))
    layer.grads["weight_hh_l0"] = np.asfortranarray(layer.grads["weight_hh_l0"])
    swapped = layer.grads["weight_hh_l0"]
    layer.zero_grad(set_to_none=True)
    ref.zero_grad()
    x = rng.standard_normal((4, 2, 5)).astype(np.float32)
    for m in (ref, layer):
        y, _ = m(x)
        m.backward(np.ones_like(y))
    assert layer.grads["weight_hh_l0"] is not swapped
    for k, g in layer.grads.items():
        np.testing.assert_array_equal(g, ref.grads[k], err_msg=k)


def test_a_gradient_array_swapped_after_calls_is_checked_again(rng):
    """The verdict on grads is kept while the same arrays are in place; swapping one for an array
    the kernels cannot add into (here float64 in a float32 layer) sends the layer to NumPy's +=,
    which casts as NumPy does, and swapping back returns to the kernels."""
    layer = make_layer("gru", 5, 6, dtype=np.float32, seed=2).train()
    x = rng.standard_normal((3, 2, 5)).astype(np.float32)
    dy = rng.standard_normal((3, 2, 6)).astype(np.float32)
    layer(x)
    layer.backward(dy)
    assert layer._grads_to_add_into(layer.grads) is layer.grads
    kept = layer.grads["weight_hh_l0"]
    layer.grads["weight_hh_l0"] = np.zeros(kept.shape, np.float64)
    assert layer._grads_to_add_into(layer.grads) is None
    layer(x)
    layer.backward(dy)
    assert_close(layer.grads["weight_hh_l0"], kept, np.float32, "gradient", what="weight_hh_l0")
    layer.grads["weight_hh_l0"] = kept
    assert layer._grads_to_add_into(layer.grads) is layer.grads


@pytest.mark.parametrize("alias", ["a parameter", "another gradient"])
def test_gradient_arrays_that_share_memory_are_added_into_after_the_backward(rng, alias):
    """A gradient array that is a parameter, or that two gradients share, must not take the
    kernels' adds while they run: those read the weights, and each add would land in the
    other gradient too. NumPy's += after the backward gives each array its sum."""
    layer = make_layer("gru", 5, 6, seed=2).train()
    fresh = make_layer("gru", 5, 6, seed=2).train()
    x, dy = rng.standard_normal((3, 2, 5)), rng.standard_normal((3, 2, 6))
    fresh(x)
    fresh.backward(dy)
    if alias == "a parameter":
        shared = layer.grads["weight_hh_l0"] = layer.weight_hh_l0
        names = ["weight_hh_l0"]
    else:
        shared = layer.grads["bias_ih_l0"] = layer.grads["bias_hh_l0"] = np.zeros(18)
        names = ["bias_ih_l0", "bias_hh_l0"]
    start = shared.copy()
    assert layer._grads_to_add_into(layer.grads) is None
    layer(x)
    layer.backward(dy)
    assert_close(shared, start + sum(fresh.grads[n] for n in names), F64, "gradient")
    for name in fresh.grads.keys() - set(names):
        assert_close(layer.grads[name], fresh.grads[name], F64, "gradient", what=name)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_stack_saved_from_a_layer_refuses_a_backward_below_it(bidirectional, rng):
    """stack_forward(save_from=k) keeps no state for the layers below k (the torch adapter,
    when nothing there needs a gradient): a backward asked for more raises rather than reading
    a state that is not there; asked for no more, it gives the bits of a stack that kept all."""
    from fusedrnn import _layer_base as base
    layer = fusedrnn.LSTM(3, 4, num_layers=3, bidirectional=bidirectional, seed=1)
    spec, params = layer._spec, dict(layer.named_parameters())
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    y, _, _, part = base.stack_forward(spec, params, x, save=True, save_from=2)
    _, _, _, whole = base.stack_forward(spec, params, x, save=True)
    assert [all(c is None for c in ctxs) for ctxs in part.ctxs] == [True, True, False]
    dy = rng.standard_normal(y.shape).astype(np.float32)
    top = {n for n in params if "_l2" in n}
    got = base.stack_backward(spec, part, dy, need_dx=False, need_dh0=False, weight_grads=top)[3]
    want = base.stack_backward(spec, whole, dy, need_dx=False, need_dh0=False,
                               weight_grads=top)[3]
    assert sorted(got) == sorted(top)
    for name in top:
        np.testing.assert_array_equal(got[name], want[name])
    _, _, _, part = base.stack_forward(spec, params, x, save=True, save_from=2)
    with pytest.raises(RuntimeError, match="needs layer 1's saved state"):
        base.stack_backward(spec, part, dy, need_dx=False, need_dh0=False,
                            weight_grads=top | {"weight_hh_l1"})
