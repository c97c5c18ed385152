"""Tests of the pure-NumPy reference (python/fusedrnn/reference.py), the oracle for all other tests.

1. Central finite differences in float64 for every cell and option check every gradient.
2. torch.nn.RNN/LSTM/GRU (when installed) check outputs, final states and every gradient.
3. A hand-computed GRU with linear_before_reset=False (torch has no such variant).
4. B = 0, lengths semantics, dtypes, the small helpers.
"""
import math

import numpy as np
import pytest

from fusedrnn import reference as R
from fusedrnn import tolerances

F64 = np.float64

# Finite-difference check, the one tolerance defined here rather than in fusedrnn.tolerances:
# central differences in float64 with FD_EPS = 1e-6 have truncation error ~eps^2 * f''' ~ 1e-12
# and rounding error ~1e-16 * |loss| / eps ~ 1e-10 * |loss| (the loss here is a sum of O(10)
# terms of size O(1)), so they agree with exact gradients to ~1e-8 relative (observed: <1e-9).
# 1e-6 leaves margin while still catching any wrong term (those show up at 1e-2 or larger).
FD_EPS = 1e-6
FD_TOL = 1e-6

# (cell, proj_size, linear_before_reset): every cell and option the reference implements.
VARIANTS = [
    ("rnn_tanh", 0, True),
    ("rnn_relu", 0, True),
    ("lstm", 0, True),
    ("lstm", 2, True),
    ("gru", 0, True),
    ("gru", 0, False),
]
VARIANT_IDS = ["rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru_lbr", "gru_no_lbr"]

# Which gradient belongs to which input.
GRAD_OF = {"x": "dx", "h0": "dh0", "c0": "dc0", "w_ih": "weight_ih", "w_hh": "weight_hh",
           "b_ih": "bias_ih", "b_hh": "bias_hh", "w_hr": "weight_hr"}


# ----------------------------------------------------------------------------------------------
# Helpers

def make_case(rng, cell, T, B, I, H, proj=0, bias=True, h0_given=True, lengths="none",
              dtype=F64):
    """Random inputs for R.forward (as a dict of keyword arguments) and upstream gradients.

    lengths: "none" (all rows length T), "unequal" (random in 1..T, at least one < T when T > 1).
    """
    w = R.init_weights(cell, I, H, proj_size=proj, bias=bias, dtype=dtype, rng=rng)
    H_out = proj or H
    args = dict(x=rng.standard_normal((T, B, I)).astype(dtype),
                h0=rng.standard_normal((B, H_out)).astype(dtype) if h0_given else None,
                c0=rng.standard_normal((B, H)).astype(dtype) if h0_given and cell == "lstm"
                else None,
                **w)
    if lengths == "unequal":
        lens = rng.integers(1, T + 1, size=B)
        if T > 1 and B:
            lens[0] = T                           # the longest row need not be first
            lens[-1] = rng.integers(1, T)         # and at least one row is short
        args["lengths"] = lens
    ups = dict(dy=rng.standard_normal((T, B, H_out)).astype(dtype),
               dhn=rng.standard_normal((B, H_out)).astype(dtype),
               dcn=rng.standard_normal((B, H)).astype(dtype) if cell == "lstm" else None)
    return args, ups


def scalar_loss(cell, args, ups, **opts):
    """(y*dy).sum() + (hn*dhn).sum() + (cn*dcn).sum(), the loss whose gradient backward returns."""
    y, hn, cn, _ = R.forward(cell, **args, training=False, **opts)
    loss = (y * ups["dy"]).sum() + (hn * ups["dhn"]).sum()
    if cn is not None:
        loss += (cn * ups["dcn"]).sum()
    return loss


def analytic_grads(cell, args, ups, **opts):
    y, hn, cn, cache = R.forward(cell, **args, **opts)
    dx, dh0, dc0, grads = R.backward(cache, ups["dy"], ups["dhn"], ups["dcn"])
    return dict(grads, dx=dx, dh0=dh0, dc0=dc0)


def relu_margin(cell, args, **opts):
    """Smallest |pre-activation| over every step (reads the reference's own cache layout)."""
    _, _, _, cache = R.forward(cell, **args, **opts)
    pre = [np.abs(s["pre"]).min() for _, _, s in cache["steps"] if s["pre"].size]
    return min(pre, default=np.inf)


# ----------------------------------------------------------------------------------------------
# 1. Finite differences

# Every pair of (bias, h0 given, lengths) values appears at least once (an L4 orthogonal array),
# plus the everything-on case; each combination runs in both directions for every variant.
FD_OPTIONS = [  # (bias, h0_given, lengths)
    (True, True, "none"), (True, False, "unequal"), (False, True, "unequal"),
    (False, False, "none"), (True, True, "unequal"),
]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias,h0_given,lengths", FD_OPTIONS,
                         ids=[f"{'bias' if b else 'nobias'}-{'h0' if h else 'zeroh0'}-len{n}"
                              for b, h, n in FD_OPTIONS])
@pytest.mark.parametrize("cell,proj,lbr", VARIANTS, ids=VARIANT_IDS)
def test_gradients_match_finite_differences(rng, cell, proj, lbr, bias, h0_given, lengths,
                                            reverse):
    opts = dict(reverse=reverse, linear_before_reset=lbr)
    T, B, I, H = 3, 3, 2, 3
    for _ in range(100):
        args, ups = make_case(rng, cell, T, B, I, H, proj, bias, h0_given, lengths)
        # relu is not differentiable at 0: keep every pre-activation far from the kink compared
        # with how far an FD_EPS perturbation can move it.
        if cell != "rnn_relu" or relu_margin(cell, args, **opts) > 1e-3:
            break
    else:
        pytest.fail("could not draw relu inputs away from the kink")
    got = analytic_grads(cell, args, ups, **opts)

    # Absent h0/c0 mean zeros: differentiate at explicit zeros, so dh0/dc0 are checked too.
    H_out = proj or H
    full = dict(args)
    if full["h0"] is None:
        full["h0"] = np.zeros((B, H_out))
    if cell == "lstm" and full["c0"] is None:
        full["c0"] = np.zeros((B, H))

    expected_keys = {"weight_ih", "weight_hh"} | ({"bias_ih", "bias_hh"} if bias else set()) \
        | ({"weight_hr"} if proj else set())
    assert set(got) - {"dx", "dh0", "dc0"} == expected_keys
    assert (got["dc0"] is None) == (cell != "lstm")

    checked = []
    for name, gname in GRAD_OF.items():
        if full.get(name) is None:
            continue
        value = full[name]
        fd = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            orig = value[idx]
            value[idx] = orig + FD_EPS
            plus = scalar_loss(cell, full, ups, **opts)
            value[idx] = orig - FD_EPS
            minus = scalar_loss(cell, full, ups, **opts)
            value[idx] = orig
            fd[idx] = (plus - minus) / (2 * FD_EPS)
        err = tolerances.max_scaled_error(got[gname], fd)
        assert err <= FD_TOL, f"{gname}: scaled error {err:.3g} vs finite differences"
        checked.append(gname)
    assert len(checked) == len(expected_keys) + 2 + (cell == "lstm")


def test_gradient_is_zero_past_lengths_and_ignores_padded_dy(rng):
    args, ups = make_case(rng, "lstm", 4, 3, 2, 3, lengths="unequal")
    args["lengths"] = np.array([4, 1, 2])
    y, hn, cn, cache = R.forward("lstm", **args, reverse=True)
    dx, dh0, dc0, g = R.backward(cache, **ups)
    garbage = ups["dy"].copy()
    for b, n in enumerate(args["lengths"]):
        garbage[n:, b] = 1e3
        assert not dx[n:, b].any()
    dx2, dh02, dc02, g2 = R.backward(cache, garbage, ups["dhn"], ups["dcn"])
    np.testing.assert_array_equal(dx2, dx)
    np.testing.assert_array_equal(dh02, dh0)
    np.testing.assert_array_equal(dc02, dc0)
    for k in g:
        np.testing.assert_array_equal(g2[k], g[k])


# ----------------------------------------------------------------------------------------------
# 2. torch.nn as the oracle

def _compare_with_torch(cell, args, ups, reverse, dtype):
    """Compare reference outputs and every gradient with torch, at the tolerances for dtype."""
    oracle = _torch_oracle()
    t_y, t_hn, t_cn, t_dx, t_dh0, t_dc0, t_grads = oracle.run_torch(cell, **args, reverse=reverse,
                                                                    **ups)
    y, hn, cn, cache = R.forward(cell, **args, reverse=reverse)
    dx, dh0, dc0, grads = R.backward(cache, **ups)
    ac = tolerances.assert_close
    ac(y, t_y, dtype, "forward", "y")
    ac(hn, t_hn, dtype, "forward", "hn")
    if cell == "lstm":
        ac(cn, t_cn, dtype, "forward", "cn")
    ac(dx, t_dx, dtype, "gradient", "dx")
    if args["h0"] is not None:
        ac(dh0, t_dh0, dtype, "gradient", "dh0")
    if args.get("c0") is not None:
        ac(dc0, t_dc0, dtype, "gradient", "dc0")
    assert set(grads) == set(t_grads)
    for k in grads:
        ac(grads[k], t_grads[k], dtype, "gradient", k)


def _torch_oracle():
    pytest.importorskip("torch")
    import _torch_oracle
    return _torch_oracle


@pytest.mark.torch
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_matches_torch_float64(cell, reverse, seed):
    rng = np.random.default_rng([seed, R.CELLS.index(cell), reverse])
    T, B, I, H = (int(v) for v in rng.integers(1, 6, size=4))
    if seed == 0:
        T, B, I, H = 5, 3, 2, 4                   # a fixed case with I != H and unequal lengths
    proj = 0
    if cell == "lstm" and H > 1 and (seed % 2 == 1 or rng.random() < 0.5):
        proj = int(rng.integers(1, H))
    bias = seed == 0 or bool(rng.random() < 0.7)
    h0_given = seed == 0 or bool(rng.random() < 0.6)
    lengths = "unequal" if seed == 0 or rng.random() < 0.5 else "none"
    args, ups = make_case(rng, cell, T, B, I, H, proj, bias, h0_given, lengths)
    _compare_with_torch(cell, args, ups, reverse, F64)


@pytest.mark.torch
@pytest.mark.parametrize("where", ["x", "w_hh"])
def test_relu_nan_gradients_match_torch(rng, where):
    """torch's relu passes the gradient at a NaN (threshold_backward zeroes only h <= 0)."""
    args, ups = make_case(rng, "rnn_relu", 4, 3, 5, 6)
    if where == "x":
        args["x"][1, 0, 2] = np.nan
    else:
        args["w_hh"][3, 4] = np.nan
    _compare_with_torch("rnn_relu", args, ups, False, F64)


@pytest.mark.torch
def test_relu_derivative_at_an_exact_zero_matches_torch(rng):
    """At a pre-activation of exactly 0 torch's relu passes no gradient (threshold_backward keeps
    it only where h > 0), nor does the reference's: x_0 = 0, h0 = 0 and b_hh = -b_ih make every
    unit's first pre-activation exactly 0, and x_0 then gets no gradient."""
    args, ups = make_case(rng, "rnn_relu", 4, 3, 2, 5)
    args["x"][0] = 0
    args["h0"][:] = 0
    args["b_hh"] = -args["b_ih"]
    *_, cache = R.forward("rnn_relu", **args)
    assert not R.backward(cache, **ups)[0][0].any()
    _compare_with_torch("rnn_relu", args, ups, False, F64)


@pytest.mark.torch
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell,proj", [("rnn_tanh", 0), ("rnn_relu", 0), ("lstm", 0), ("lstm", 3),
                                       ("gru", 0)])
def test_matches_torch_float32(rng, cell, proj, reverse):
    args, ups = make_case(rng, cell, 6, 3, 5, 4, proj, lengths="unequal", dtype=np.float32)
    # The float32 reference against torch float32 ...
    _compare_with_torch(cell, args, ups, reverse, np.float32)
    # ... and against the float64 reference fed the same (float32-representable) numbers.
    y32, hn32, cn32, c32 = R.forward(cell, **args, reverse=reverse)
    assert y32.dtype == hn32.dtype == np.float32
    g32 = R.backward(c32, **ups)
    a64 = {k: v if v is None or k == "lengths" else v.astype(F64) for k, v in args.items()}
    u64 = {k: None if v is None else v.astype(F64) for k, v in ups.items()}
    y64, hn64, cn64, c64 = R.forward(cell, **a64, reverse=reverse)
    g64 = R.backward(c64, **u64)
    tolerances.assert_close(y32, y64, np.float32, "forward", "y")
    tolerances.assert_close(hn32, hn64, np.float32, "forward", "hn")
    for a, b in zip(g32[:3], g64[:3]):
        if b is not None:
            assert a.dtype == np.float32
            tolerances.assert_close(a, b, np.float32, "gradient", "dx/dh0/dc0")
    for k in g64[3]:
        assert g32[3][k].dtype == np.float32
        tolerances.assert_close(g32[3][k], g64[3][k], np.float32, "gradient", k)


# ----------------------------------------------------------------------------------------------
# 3. GRU with linear_before_reset=False, by hand

def _sig(v):
    return 1.0 / (1.0 + math.exp(-v))


# I = 1, H = 1: rows of w_ih / w_hh / biases are the gates r, z, n.
HAND = dict(w_ih=[[0.5], [-0.3], [0.8]], w_hh=[[0.2], [0.4], [-0.6]],
            b_ih=[0.1, -0.2, 0.05], b_hh=[0.3, 0.1, 0.7])
HAND_X = [1.0, -2.0]
HAND_H0 = 0.5


def _hand_gru(linear_before_reset):
    """The GRU written out with scalars; returns the list of h after each step."""
    (wir,), (wiz,), (win,) = HAND["w_ih"]
    (whr,), (whz,), (whn,) = HAND["w_hh"]
    bir, biz, bin_ = HAND["b_ih"]
    bhr, bhz, bhn = HAND["b_hh"]
    h, hs = HAND_H0, []
    for x in HAND_X:
        r = _sig(wir * x + bir + whr * h + bhr)
        z = _sig(wiz * x + biz + whz * h + bhz)
        if linear_before_reset:
            n = math.tanh(win * x + bin_ + r * (whn * h + bhn))     # reset scales W_hn h + b_hn
        else:
            n = math.tanh(win * x + bin_ + whn * (r * h) + bhn)     # reset scales h only
        h = (1 - z) * n + z * h
        hs.append(h)
    return hs


def _run_hand(linear_before_reset):
    arr = {k: np.array(v, dtype=F64) for k, v in HAND.items()}
    x = np.array(HAND_X, dtype=F64).reshape(2, 1, 1)
    h0 = np.array([[HAND_H0]])
    return R.forward("gru", x, h0, None, **arr, linear_before_reset=linear_before_reset)


def test_gru_linear_before_reset_false_by_hand():
    want = _hand_gru(linear_before_reset=False)
    y, hn, cn, cache = _run_hand(linear_before_reset=False)
    assert cn is None
    tolerances.assert_close(y[:, 0, 0], np.array(want), F64, "forward", "y")
    tolerances.assert_close(hn[0, 0], want[-1], F64, "forward", "hn")

    # The PyTorch variant gives different numbers: with H = 1 the two differ only through b_hn
    # (r * b_hn inside the tanh versus b_hn), so b_hn = 0.7 makes the difference visible.
    other = _hand_gru(linear_before_reset=True)
    y_true, *_ = _run_hand(linear_before_reset=True)
    tolerances.assert_close(y_true[:, 0, 0], np.array(other), F64, "forward", "y (lbr=True)")
    assert np.abs(y[:, 0, 0] - y_true[:, 0, 0]).min() > 1e-3

    # One step's dh0 by the chain rule: h' = (1-z) n + z h with
    # n = tanh(a_n), a_n = win x + b_in + whn r h + bhn, r = sig(a_r), z = sig(a_z).
    (wir,), (wiz,), (win,) = HAND["w_ih"]
    (whr,), (whz,), (whn,) = HAND["w_hh"]
    x, h = HAND_X[0], HAND_H0
    r = _sig(wir * x + HAND["b_ih"][0] + whr * h + HAND["b_hh"][0])
    z = _sig(wiz * x + HAND["b_ih"][1] + whz * h + HAND["b_hh"][1])
    n = math.tanh(win * x + HAND["b_ih"][2] + whn * r * h + HAND["b_hh"][2])
    dr_dh = r * (1 - r) * whr
    dz_dh = z * (1 - z) * whz
    dn_dh = (1 - n * n) * whn * (r + h * dr_dh)     # d(r h)/dh = r + h dr/dh
    dh0_want = z + (h - n) * dz_dh + (1 - z) * dn_dh
    _, _, _, cache1 = R.forward("gru", np.array([[[x]]]), np.array([[h]]), None,
                                **{k: np.array(v) for k, v in HAND.items()},
                                linear_before_reset=False)
    _, dh0, _, _ = R.backward(cache1, np.zeros((1, 1, 1)), np.ones((1, 1)))
    tolerances.assert_close(dh0[0, 0], dh0_want, F64, "gradient", "dh0")


def test_gru_variants_coincide_without_hidden_bias_when_h_is_1():
    # For H = 1 and b_hn = 0, r * (W_hn h) == W_hn (r * h): the variants must agree exactly.
    arr = {k: np.array(v, dtype=F64) for k, v in HAND.items()}
    arr["b_hh"][2] = 0.0
    x = np.array(HAND_X, dtype=F64).reshape(2, 1, 1)
    a = R.forward("gru", x, np.array([[HAND_H0]]), None, **arr, linear_before_reset=False)[0]
    b = R.forward("gru", x, np.array([[HAND_H0]]), None, **arr, linear_before_reset=True)[0]
    tolerances.assert_close(a, b, F64, "forward", "y")


# ----------------------------------------------------------------------------------------------
# 4. Shapes, lengths, dtypes, helpers

@pytest.mark.parametrize("with_lengths", [False, True], ids=["nolen", "len"])
@pytest.mark.parametrize("cell,proj,lbr", VARIANTS, ids=VARIANT_IDS)
def test_empty_batch(cell, proj, lbr, with_lengths):
    T, I, H = 3, 2, 4
    H_out = proj or H
    w = R.init_weights(cell, I, H, proj_size=proj, rng=0)
    x = np.zeros((T, 0, I))
    lengths = np.zeros(0, dtype=np.int32) if with_lengths else None
    y, hn, cn, cache = R.forward(cell, x, None, None, **w, lengths=lengths,
                                 linear_before_reset=lbr, reverse=True)
    assert y.shape == (T, 0, H_out) and hn.shape == (0, H_out) and y.dtype == F64
    assert (cn is None) == (cell != "lstm") and (cn is None or cn.shape == (0, H))
    dx, dh0, dc0, g = R.backward(cache, np.zeros((T, 0, H_out)))
    assert dx.shape == (T, 0, I) and dh0.shape == (0, H_out)
    assert dc0 is None or dc0.shape == (0, H)
    for k, v in g.items():
        assert v.shape == w[{"weight_ih": "w_ih", "weight_hh": "w_hh", "bias_ih": "b_ih",
                             "bias_hh": "b_hh", "weight_hr": "w_hr"}[k]].shape
        assert not v.any()


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell,proj,lbr", VARIANTS, ids=VARIANT_IDS)
def test_lengths_equal_running_each_row_alone(rng, cell, proj, lbr, reverse):
    T, B, I, H = 5, 4, 3, 3
    args, ups = make_case(rng, cell, T, B, I, H, proj, lengths="unequal")
    args["lengths"] = np.array([3, 5, 1, 4], dtype=np.int32)   # any integer dtype is accepted
    opts = dict(reverse=reverse, linear_before_reset=lbr)
    y, hn, cn, cache = R.forward(cell, **args, **opts)
    dx, dh0, dc0, g = R.backward(cache, **ups)
    g_sum = {k: np.zeros_like(v) for k, v in g.items()}
    for b, n in enumerate(args["lengths"]):
        # Outputs past the row's length are exactly zero, and hn is the state after the row's
        # last valid step: t = n-1 walking forward, t = 0 walking backward from t = n-1.
        assert not y[n:, b].any() and not dx[n:, b].any()
        np.testing.assert_array_equal(hn[b], y[0 if reverse else n - 1, b])
        # The row on its own, truncated to its length, without lengths, gives the same results.
        row = {k: v for k, v in args.items() if k != "lengths"}
        row["x"] = args["x"][:n, b:b + 1]
        row["h0"] = args["h0"][b:b + 1]
        row["c0"] = None if args["c0"] is None else args["c0"][b:b + 1]
        ry, rhn, rcn, rcache = R.forward(cell, **row, **opts)
        rdx, rdh0, rdc0, rg = R.backward(rcache, ups["dy"][:n, b:b + 1], ups["dhn"][b:b + 1],
                                         None if ups["dcn"] is None else ups["dcn"][b:b + 1])
        ac = tolerances.assert_close
        ac(y[:n, b], ry[:, 0], F64, "forward", "y")
        ac(hn[b], rhn[0], F64, "forward", "hn")
        ac(dx[:n, b], rdx[:, 0], F64, "gradient", "dx")
        ac(dh0[b], rdh0[0], F64, "gradient", "dh0")
        if cell == "lstm":
            ac(cn[b], rcn[0], F64, "forward", "cn")
            ac(dc0[b], rdc0[0], F64, "gradient", "dc0")
        for k in g_sum:
            g_sum[k] += rg[k]
    for k in g:
        tolerances.assert_close(g[k], g_sum[k], F64, "gradient", k)


def test_lengths_all_full_equal_no_lengths(rng):
    args, ups = make_case(rng, "gru", 3, 2, 2, 2)
    a = R.forward("gru", **args, reverse=True)
    b = R.forward("gru", **args, lengths=[3, 3], reverse=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell,proj,lbr", VARIANTS, ids=VARIANT_IDS)
def test_dtype_is_kept_and_inference_matches_training(rng, cell, proj, lbr, dtype):
    args, ups = make_case(rng, cell, 3, 2, 3, 3, proj, lengths="unequal", dtype=dtype)
    y, hn, cn, cache = R.forward(cell, **args, linear_before_reset=lbr)
    yi, hni, cni, none = R.forward(cell, **args, linear_before_reset=lbr, training=False)
    assert none is None
    np.testing.assert_array_equal(y, yi)
    np.testing.assert_array_equal(hn, hni)
    for out in (y, hn, cn) + R.backward(cache, **ups)[:3]:
        assert out is None or out.dtype == dtype
    for v in R.backward(cache, **ups)[3].values():
        assert v.dtype == dtype


def test_helpers():
    assert [R.gate_count(c) for c in R.CELLS] == [1, 1, 4, 3]
    with pytest.raises(ValueError):
        R.gate_count("transformer")
    w = R.init_weights("lstm", 5, 4, proj_size=2, rng=1)
    assert w["w_ih"].shape == (16, 5) and w["w_hh"].shape == (16, 2)
    assert w["b_ih"].shape == w["b_hh"].shape == (16,) and w["w_hr"].shape == (2, 4)
    assert all(np.abs(v).max() <= 0.5 for v in w.values())        # 1/sqrt(4)
    w = R.init_weights("gru", 3, 9, bias=False, dtype=np.float32, rng=np.random.default_rng(2))
    assert w["b_ih"] is None and w["b_hh"] is None and w["w_hr"] is None
    assert w["w_ih"].dtype == np.float32 and np.abs(w["w_ih"]).max() <= 1 / 3
    np.testing.assert_array_equal(R.init_weights("rnn_tanh", 2, 2, rng=7)["w_ih"],
                                  R.init_weights("rnn_tanh", 2, 2, rng=7)["w_ih"])


@pytest.mark.parametrize("lengths", [[0, 2], [1, 4], [1, 2, 3]])
def test_bad_lengths_are_refused(lengths):
    w = R.init_weights("rnn_tanh", 2, 2, rng=0)
    with pytest.raises(ValueError):
        R.forward("rnn_tanh", np.zeros((3, 2, 2)), None, None, **w, lengths=lengths)


@pytest.mark.parametrize("missing", ["b_ih", "b_hh"])
@pytest.mark.parametrize("cell,proj,lbr", VARIANTS, ids=VARIANT_IDS)
def test_one_missing_bias_means_zero_bias_and_no_gradient(rng, cell, proj, lbr, missing):
    # torch has one `bias` switch for both biases; the reference also takes them one at a time.
    args, ups = make_case(rng, cell, 3, 2, 2, 3, proj, lengths="unequal")
    zero = dict(args, **{missing: np.zeros_like(args[missing])})
    none = dict(args, **{missing: None})
    y0, hn0, _, c0 = R.forward(cell, **zero, linear_before_reset=lbr)
    y1, hn1, _, c1 = R.forward(cell, **none, linear_before_reset=lbr)
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(hn1, hn0)
    g0, g1 = R.backward(c0, **ups)[3], R.backward(c1, **ups)[3]
    assert set(g0) - set(g1) == {GRAD_OF[missing]}
    for k in g1:
        np.testing.assert_array_equal(g1[k], g0[k])


def test_scaled_error_takes_equal_infinities_as_equal_and_others_as_infinitely_wrong():
    """An overflow both sides give matches; one on one side only, or of the other sign, does
    not; the scale is the largest finite |want| (before: inf - inf made every such comparison
    NaN, a test that could not pass)."""
    want = np.array([np.inf, -np.inf, np.nan, 2.0, -4.0])
    assert tolerances.max_scaled_error(want.copy(), want) == 0.0
    nudged = want.copy()
    nudged[3] += 0.04
    assert tolerances.max_scaled_error(nudged, want) == pytest.approx(0.01)
    for i, value in ((0, -np.inf), (0, 1e30), (1, np.nan), (3, np.inf), (4, -np.inf)):
        wrong = want.copy()
        wrong[i] = value
        assert tolerances.max_scaled_error(wrong, want) == np.inf, (i, value)


def test_assert_close_fails_past_the_tolerance_and_on_another_shape():
    """The oracle comparison every test leans on fails where it must: an error just past the
    dtype's tolerance, got's NaN where want has a number, and another shape."""
    want = np.array([1.0, -2.0, 0.5])
    for dtype in (np.float32, np.float64):
        for kind, table in (("forward", tolerances.FORWARD), ("gradient", tolerances.GRADIENT)):
            tol = table[np.dtype(dtype)]
            near, far = want.copy(), want.copy()
            near[0] += 0.9 * tol * 2.0          # the scale: max(1, max|want|) = 2
            far[0] += 1.1 * tol * 2.0
            assert tolerances.assert_close(near, want, dtype, kind) <= tol
            with pytest.raises(AssertionError, match=f"y: scaled error .* exceeds {kind} "
                                                     f"tolerance {tol:g} for {np.dtype(dtype)}"):
                tolerances.assert_close(far, want, dtype, kind, "y")
    with pytest.raises(AssertionError, match="exceeds forward tolerance"):
        tolerances.assert_close(np.array([np.nan, -2.0, 0.5]), want, np.float64)
    with pytest.raises(AssertionError, match=r"shape \(2,\) != expected \(3,\)"):
        tolerances.assert_close(want[:2], want, np.float64)


@pytest.mark.parametrize("call,match", [
    (lambda w: R.init_weights("gru", 3, 4, proj_size=2), "proj_size is only supported for lstm"),
    (lambda w: R.init_weights("lstm", 3, 4, proj_size=4), r"proj_size must be 0 or in 1..hidden_size-1"),
    (lambda w: R.init_weights("lstm", 3, 4, proj_size=-1), r"proj_size must be 0 or in 1..hidden_size-1"),
    (lambda w: R.forward("rnn_tanh", np.zeros((3, 2)), None, None, **w), r"x must be \(T, B, I\)"),
    (lambda w: R.forward("rnn_tanh", np.zeros((0, 2, 2)), None, None, **w), "T must be >= 1"),
    (lambda w: R.forward("rnn_tanh", np.zeros((3, 2, 2)), None, None, **dict(w, w_ih=np.zeros(2))),
     r"w_ih has shape \(2,\), expected \(1\*H, 2\)"),
    (lambda w: R.forward("rnn_tanh", np.zeros((3, 2, 2)), None, None, **w, w_hr=np.zeros((1, 2))),
     "w_hr .* only supported for lstm"),
    (lambda w: R.forward("rnn_tanh", np.zeros((3, 2, 2)), None, None, **w, lengths=[1.0, 2.0]),
     "lengths must be integers"),
    (lambda w: R.backward(None, np.zeros((3, 2, 2))), "backward needs the cache"),
])
def test_the_reference_refuses_what_it_cannot_compute(call, match):
    w = {k: v for k, v in R.init_weights("rnn_tanh", 2, 2, rng=0).items() if k != "w_hr"}
    with pytest.raises(ValueError, match=match):
        call(w)
