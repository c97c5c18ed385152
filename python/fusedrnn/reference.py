"""Plain NumPy forward and backward (BPTT) for one RNN/LSTM/GRU layer in one direction.

This is the oracle every test compares the C++ kernels against, so it is written for clarity,
not speed: one small function per cell per pass, and a Python loop over time. It follows
torch.nn exactly (see shared/DESIGN.md, "Conventions"), plus the ONNX-style GRU variant
``linear_before_reset=False``. It imports only NumPy.

Shapes (T steps, B batch rows, I inputs, H hidden units, G gates, H_out = proj size or H):
    x (T, B, I), h0 (B, H_out), c0 (B, H) for LSTM,
    w_ih (G*H, I), w_hh (G*H, H_out), b_ih / b_hh (G*H,) or None, w_hr (H_out, H) or None.
Gate rows: LSTM i, f, g, o; GRU r, z, n.

Variable lengths behave as a PyTorch PackedSequence padded back with zeros: row b runs
``lengths[b]`` steps (from t = 0 upwards, or with ``reverse=True`` from t = lengths[b]-1 down to 0),
outputs past its length are 0 and its final state is the state after its last valid step.
"""
import numpy as np

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")

_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def gate_count(cell):
    """Number of gate blocks G stacked in the weight rows: 1 (RNN), 4 (LSTM), 3 (GRU)."""
    if cell not in _GATES:
        raise ValueError(f"unknown cell {cell!r}; expected one of {CELLS}")
    return _GATES[cell]


def init_weights(cell, input_size, hidden_size, proj_size=0, bias=True, dtype=np.float64, rng=None):
    """Weights as torch initialises them: every parameter drawn from U(-1/sqrt(H), 1/sqrt(H)).

    ``rng`` is a numpy Generator, a seed, or None. Returns a dict with keys w_ih, w_hh, b_ih, b_hh,
    w_hr (biases None when ``bias=False``; w_hr None unless an LSTM with ``proj_size > 0``).
    """
    G = gate_count(cell)
    if proj_size and cell != "lstm":
        raise ValueError("proj_size is only supported for lstm")
    if proj_size < 0 or (proj_size and proj_size >= hidden_size):
        raise ValueError("proj_size must be 0 or in 1..hidden_size-1 (as torch)")
    rng = np.random.default_rng(rng)
    k = 1.0 / np.sqrt(hidden_size)
    H_out = proj_size or hidden_size

    def draw(*shape):
        return rng.uniform(-k, k, size=shape).astype(dtype)

    return {
        "w_ih": draw(G * hidden_size, input_size),
        "w_hh": draw(G * hidden_size, H_out),
        "b_ih": draw(G * hidden_size) if bias else None,
        "b_hh": draw(G * hidden_size) if bias else None,
        "w_hr": draw(H_out, hidden_size) if proj_size else None,
    }


# ----------------------------------------------------------------------------------------------
# Pointwise helpers

def _sigmoid(a):
    # exp(-|a|) never overflows, so this is exact-ish for any input and raises no warnings.
    e = np.exp(-np.abs(a))
    return np.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(a.dtype, copy=False)


def _split(a, n):
    """Split the last axis into n equal gate blocks."""
    return np.split(a, n, axis=-1)


# ----------------------------------------------------------------------------------------------
# Cells. Each *_step_forward(x, h, c, p) takes one step for a subset of batch rows and returns
# (h_new, c_new, step_cache); each *_step_backward(dh, dc, step_cache, p, g) takes the gradient
# w.r.t. (h_new, c_new), accumulates parameter gradients into g and returns (dx, dh, dc) w.r.t.
# the step's inputs (x, h, c). p holds the parameters (biases as zeros when absent).

def _rnn_step_forward(x, h, c, p):
    a = x @ p["w_ih"].T + p["b_ih"] + h @ p["w_hh"].T + p["b_hh"]
    h_new = np.tanh(a) if p["act"] == "tanh" else np.maximum(a, 0)
    return h_new, None, {"x": x, "h": h, "pre": a, "h_new": h_new}


def _rnn_step_backward(dh_new, dc_new, s, p, g):
    if p["act"] == "tanh":
        da = dh_new * (1 - s["h_new"] ** 2)
    else:
        da = np.where(s["h_new"] <= 0, 0, dh_new)   # torch's threshold_backward: NaN passes
    return _affine_backward(da, da, s["x"], s["h"], p, g), None


def _lstm_step_forward(x, h, c, p):
    a = x @ p["w_ih"].T + p["b_ih"] + h @ p["w_hh"].T + p["b_hh"]
    a_i, a_f, a_g, a_o = _split(a, 4)
    i, f, g, o = _sigmoid(a_i), _sigmoid(a_f), np.tanh(a_g), _sigmoid(a_o)
    c_new = f * c + i * g
    tc = np.tanh(c_new)
    m = o * tc                                   # h before the projection
    h_new = m @ p["w_hr"].T if p["w_hr"] is not None else m
    return h_new, c_new, {"x": x, "h": h, "c": c, "i": i, "f": f, "g": g, "o": o, "tc": tc, "m": m}


def _lstm_step_backward(dh_new, dc_new, s, p, g):
    if p["w_hr"] is not None:
        g["weight_hr"] += dh_new.T @ s["m"]
        dm = dh_new @ p["w_hr"]
    else:
        dm = dh_new
    i, f, gg, o, tc = s["i"], s["f"], s["g"], s["o"], s["tc"]
    do = dm * tc
    dc = dc_new + dm * o * (1 - tc ** 2)
    di, df, dg = dc * gg, dc * s["c"], dc * i
    dc_prev = dc * f
    da = np.concatenate([di * i * (1 - i), df * f * (1 - f), dg * (1 - gg ** 2), do * o * (1 - o)],
                        axis=-1)
    return _affine_backward(da, da, s["x"], s["h"], p, g), dc_prev


def _gru_step_forward(x, h, c, p):
    gx = x @ p["w_ih"].T + p["b_ih"]
    gx_r, gx_z, gx_n = _split(gx, 3)
    w_hrz, w_hn = p["w_hh"][: 2 * p["H"]], p["w_hh"][2 * p["H"]:]
    b_hrz, b_hn = p["b_hh"][: 2 * p["H"]], p["b_hh"][2 * p["H"]:]
    gh_r, gh_z = _split(h @ w_hrz.T + b_hrz, 2)
    r, z = _sigmoid(gx_r + gh_r), _sigmoid(gx_z + gh_z)
    if p["linear_before_reset"]:                 # PyTorch / cuDNN: reset after the matmul
        gh_n = h @ w_hn.T + b_hn
        n = np.tanh(gx_n + r * gh_n)
    else:                                        # original GRU / ONNX default: reset before it
        gh_n = (r * h) @ w_hn.T + b_hn
        n = np.tanh(gx_n + gh_n)
    h_new = (1 - z) * n + z * h
    return h_new, None, {"x": x, "h": h, "r": r, "z": z, "n": n, "gh_n": gh_n}


def _gru_step_backward(dh_new, dc_new, s, p, g):
    H = p["H"]
    h, r, z, n = s["h"], s["r"], s["z"], s["n"]
    # dh (1 - z) as torch's autograd takes it from h' = n + z (h - n): NaN for an infinite dh
    dn = dh_new - dh_new * z
    dz = dh_new * (h - n)
    dh_direct = dh_new * z
    da_n = dn * (1 - n ** 2)                      # gradient w.r.t. n's pre-activation
    da_z = dz * z * (1 - z)
    if p["linear_before_reset"]:
        da_r = da_n * s["gh_n"] * r * (1 - r)
        dgx = np.concatenate([da_r, da_z, da_n], axis=-1)
        dgh = np.concatenate([da_r, da_z, da_n * r], axis=-1)   # w.r.t. h @ w_hh.T + b_hh
        dx, dh = _affine_backward(dgx, dgh, s["x"], h, p, g)
        return (dx, dh + dh_direct), None
    # linear_before_reset=False: the n block of w_hh multiplies (r*h), not h.
    w_hn = p["w_hh"][2 * H:]
    d_rh = da_n @ w_hn
    da_r = d_rh * h * r * (1 - r)
    g["weight_hh"][2 * H:] += da_n.T @ (r * h)
    g["bias_hh"][2 * H:] += da_n.sum(axis=0)
    dgx = np.concatenate([da_r, da_z, da_n], axis=-1)
    dgh_rz = np.concatenate([da_r, da_z], axis=-1)
    dx = dgx @ p["w_ih"]
    g["weight_ih"] += dgx.T @ s["x"]
    g["bias_ih"] += dgx.sum(axis=0)
    g["weight_hh"][: 2 * H] += dgh_rz.T @ h
    g["bias_hh"][: 2 * H] += dgh_rz.sum(axis=0)
    dh = dgh_rz @ p["w_hh"][: 2 * H] + d_rh * r + dh_direct
    return (dx, dh), None


def _affine_backward(dgx, dgh, x, h, p, g):
    """Backward of gx = x @ w_ih.T + b_ih and gh = h @ w_hh.T + b_hh given dgx, dgh."""
    g["weight_ih"] += dgx.T @ x
    g["bias_ih"] += dgx.sum(axis=0)
    g["weight_hh"] += dgh.T @ h
    g["bias_hh"] += dgh.sum(axis=0)
    return dgx @ p["w_ih"], dgh @ p["w_hh"]


# ----------------------------------------------------------------------------------------------
# ONNX's cell options (inference only): ``onnx`` = {"activations": [(name, alpha, beta), ...] for
# f, g, h as the cell takes them (RNN f; GRU f, g; LSTM f, g, h), "clip": None or c > 0 (every
# activation's input clamped to [-c, c]), "input_forget": LSTM f = 1 - i, "peepholes": None or
# (3, H) for the LSTM's gates i, f, o}. As ONNX Runtime: peepholes, then clip, then the function.
# ThresholdedRelu is 0 at x == alpha, as ONNX's ThresholdedRelu operator and ONNX Runtime have it
# (the RNN operators' text says x >= alpha keeps x).

ACTIVATIONS = {
    "sigmoid": lambda x, a, b: _sigmoid(x),
    "tanh": lambda x, a, b: np.tanh(x),
    "relu": lambda x, a, b: np.maximum(x, 0),
    "affine": lambda x, a, b: a * x + b,
    "leakyrelu": lambda x, a, b: np.where(x < 0, a * x, x),
    "thresholdedrelu": lambda x, a, b: np.where(x <= a, 0, x).astype(x.dtype, copy=False),
    "scaledtanh": lambda x, a, b: a * np.tanh(b * x),
    "hardsigmoid": lambda x, a, b: np.clip(a * x + b, 0, 1),
    "elu": lambda x, a, b: np.where(x < 0, a * np.expm1(np.minimum(x, 0)), x),
    "softsign": lambda x, a, b: x / (1 + np.abs(x)),
    "softplus": lambda x, a, b: np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x))),
}


def _onnx_fn(onnx, k):
    """The cell's k-th function (0 f, 1 g, 2 h) applied after ONNX's clip."""
    name, alpha, beta = onnx["activations"][k]
    clip = onnx.get("clip")

    def fn(v):
        if clip is not None:
            v = np.clip(v, -clip, clip)
        return ACTIVATIONS[name](v, alpha, beta)
    return fn


def _rnn_onnx_step_forward(x, h, c, p):
    a = x @ p["w_ih"].T + p["b_ih"] + h @ p["w_hh"].T + p["b_hh"]
    return _onnx_fn(p["onnx"], 0)(a), None, {}


def _lstm_onnx_step_forward(x, h, c, p):
    o = p["onnx"]
    f_fn, g_fn = _onnx_fn(o, 0), _onnx_fn(o, 1)
    h_name, h_alpha, h_beta = o["activations"][2]   # the new cell state is not clipped
    P = o.get("peepholes")
    a = x @ p["w_ih"].T + p["b_ih"] + h @ p["w_hh"].T + p["b_hh"]
    a_i, a_f, a_g, a_o = _split(a, 4)
    if P is not None:
        a_i, a_f = a_i + P[0] * c, a_f + P[1] * c
    i = f_fn(a_i)
    f = 1 - i if o.get("input_forget") else f_fn(a_f)
    c_new = f * c + i * g_fn(a_g)
    if P is not None:
        a_o = a_o + P[2] * c_new
    h_new = f_fn(a_o) * ACTIVATIONS[h_name](c_new, h_alpha, h_beta)
    return h_new, c_new, {}


def _gru_onnx_step_forward(x, h, c, p):
    f_fn, g_fn = _onnx_fn(p["onnx"], 0), _onnx_fn(p["onnx"], 1)
    H = p["H"]
    gx_r, gx_z, gx_n = _split(x @ p["w_ih"].T + p["b_ih"], 3)
    w_hn, b_hn = p["w_hh"][2 * H:], p["b_hh"][2 * H:]
    gh_r, gh_z = _split(h @ p["w_hh"][: 2 * H].T + p["b_hh"][: 2 * H], 2)
    r, z = f_fn(gx_r + gh_r), f_fn(gx_z + gh_z)
    if p["linear_before_reset"]:
        n = g_fn(gx_n + r * (h @ w_hn.T + b_hn))
    else:
        n = g_fn(gx_n + (r * h) @ w_hn.T + b_hn)
    return (1 - z) * n + z * h, None, {}


_ONNX_STEPS = {"rnn_tanh": _rnn_onnx_step_forward, "rnn_relu": _rnn_onnx_step_forward,
               "lstm": _lstm_onnx_step_forward, "gru": _gru_onnx_step_forward}

_STEPS = {
    "rnn_tanh": (_rnn_step_forward, _rnn_step_backward),
    "rnn_relu": (_rnn_step_forward, _rnn_step_backward),
    "lstm": (_lstm_step_forward, _lstm_step_backward),
    "gru": (_gru_step_forward, _gru_step_backward),
}


# ----------------------------------------------------------------------------------------------
# The time loop

def _check_shape(name, a, shape):
    if a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape}, expected {tuple(shape)}")


def _time_index(step, lengths, reverse):
    """Time index each row reads at processing step ``step`` (only meaningful where active)."""
    return lengths - 1 - step if reverse else np.full_like(lengths, step)


def forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr=None, lengths=None, reverse=False,
            linear_before_reset=True, training=True, onnx=None):
    """One layer, one direction. Returns (y, hn, cn, cache); see the module docstring.
    ``onnx``: ONNX's cell options (see ACTIVATIONS), inference only.

    y (T, B, H_out) with zeros past each row's length, hn (B, H_out), cn (B, H) for LSTM else
    None, cache for ``backward`` (None when ``training=False``).
    """
    G = gate_count(cell)
    x = np.asarray(x)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)
    x = x.astype(dtype, copy=False)
    if x.ndim != 3:
        raise ValueError(f"x must be (T, B, I), got shape {x.shape}")
    T, B, I = x.shape
    if T < 1:
        raise ValueError("T must be >= 1")

    def as_dt(a):
        return None if a is None else np.asarray(a).astype(dtype, copy=False)

    w_ih, w_hh, b_ih, b_hh, w_hr = map(as_dt, (w_ih, w_hh, b_ih, b_hh, w_hr))
    if w_ih.ndim != 2 or w_ih.shape[0] % G:
        raise ValueError(f"w_ih has shape {w_ih.shape}, expected ({G}*H, {I})")
    H = w_ih.shape[0] // G
    if w_hr is not None and cell != "lstm":
        raise ValueError("w_hr (projection) is only supported for lstm")
    H_out = w_hr.shape[0] if w_hr is not None else H
    _check_shape("w_ih", w_ih, (G * H, I))
    _check_shape("w_hh", w_hh, (G * H, H_out))
    if w_hr is not None:
        _check_shape("w_hr", w_hr, (H_out, H))
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            _check_shape(name, b, (G * H,))
    h0 = np.zeros((B, H_out), dtype) if h0 is None else as_dt(h0)
    _check_shape("h0", h0, (B, H_out))
    if cell == "lstm":
        c0 = np.zeros((B, H), dtype) if c0 is None else as_dt(c0)
        _check_shape("c0", c0, (B, H))
    else:
        c0 = None
    if lengths is None:
        lengths = np.full(B, T, dtype=np.int64)
    else:
        lengths = np.asarray(lengths)
        if not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
        lengths = lengths.astype(np.int64)
        _check_shape("lengths", lengths, (B,))
        if B and (lengths.min() < 1 or lengths.max() > T):
            raise ValueError(f"lengths must be in 1..{T}")

    p = {
        "w_ih": w_ih, "w_hh": w_hh, "w_hr": w_hr, "H": H,
        "b_ih": np.zeros(G * H, dtype) if b_ih is None else b_ih,
        "b_hh": np.zeros(G * H, dtype) if b_hh is None else b_hh,
        "act": "relu" if cell == "rnn_relu" else "tanh",
        "linear_before_reset": bool(linear_before_reset),
    }
    if onnx is not None and (training or w_hr is not None):
        raise ValueError("onnx cell options are for inference (training=False) without w_hr")
    if onnx is not None and onnx.get("peepholes") is not None:
        onnx = dict(onnx, peepholes=as_dt(onnx["peepholes"]))
    p["onnx"] = onnx
    step_forward = _STEPS[cell][0] if onnx is None else _ONNX_STEPS[cell]
    y = np.zeros((T, B, H_out), dtype)
    h = h0.copy()
    c = None if c0 is None else c0.copy()
    steps = []
    for step in range(T):
        rows = np.nonzero(step < lengths)[0]         # rows still running at this step
        t = _time_index(step, lengths, reverse)[rows]
        h_new, c_new, s = step_forward(x[t, rows], h[rows], None if c is None else c[rows], p)
        h[rows] = h_new
        if c is not None:
            c[rows] = c_new
        y[t, rows] = h_new
        if training:
            steps.append((rows, t, s))
    cache = None
    if training:
        # steps[k] = (rows, t, step_cache) for processing step k; tests read step_cache["pre"]
        # of the RNN cells to keep relu pre-activations away from the kink.
        cache = {"cell": cell, "p": p, "steps": steps, "shape": (T, B, I, H, H_out),
                 "dtype": dtype, "has_bias": (b_ih is not None, b_hh is not None),
                 "reverse": bool(reverse), "lengths": lengths}
    return y, h, c, cache


def backward(cache, dy, dhn=None, dcn=None):
    """BPTT through one layer and direction. Returns (dx, dh0, dc0, grads).

    dy (T, B, H_out) (entries at padded positions are ignored), dhn (B, H_out) or None (zero),
    dcn (B, H) or None (zero). dc0 is None unless the cell is an LSTM. grads has 'weight_ih',
    'weight_hh', plus 'bias_ih' / 'bias_hh' / 'weight_hr' when those parameters exist.
    """
    if cache is None:
        raise ValueError("backward needs the cache of a forward run with training=True")
    cell, p, dtype = cache["cell"], cache["p"], cache["dtype"]
    T, B, I, H, H_out = cache["shape"]
    dy = np.asarray(dy).astype(dtype, copy=False)
    _check_shape("dy", dy, (T, B, H_out))
    dh = np.zeros((B, H_out), dtype) if dhn is None else np.asarray(dhn).astype(dtype)
    _check_shape("dhn", dh, (B, H_out))
    dc = None
    if cell == "lstm":
        dc = np.zeros((B, H), dtype) if dcn is None else np.asarray(dcn).astype(dtype)
        _check_shape("dcn", dc, (B, H))
    dh = dh.copy()
    dc = None if dc is None else dc.copy()
    g = {"weight_ih": np.zeros_like(p["w_ih"]), "weight_hh": np.zeros_like(p["w_hh"]),
         "bias_ih": np.zeros_like(p["b_ih"]), "bias_hh": np.zeros_like(p["b_hh"])}
    if p["w_hr"] is not None:
        g["weight_hr"] = np.zeros_like(p["w_hr"])
    step_backward = _STEPS[cell][1]
    dx = np.zeros((T, B, I), dtype)
    for rows, t, s in reversed(cache["steps"]):
        dh_new = dh[rows] + dy[t, rows]               # the output feeds y[t] and the next step
        (dx_s, dh_prev), dc_prev = step_backward(dh_new, None if dc is None else dc[rows], s, p, g)
        dx[t, rows] = dx_s
        dh[rows] = dh_prev
        if dc is not None:
            dc[rows] = dc_prev
    has_b_ih, has_b_hh = cache["has_bias"]
    if not has_b_ih:
        del g["bias_ih"]
    if not has_b_hh:
        del g["bias_hh"]
    return dx, dh, dc, g
