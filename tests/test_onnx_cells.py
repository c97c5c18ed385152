"""The kernels' forward under ONNX's cell options (csrc/cells/onnx_cells.h, ForwardArgs::onnx)
against the NumPy reference's: every activation function in every slot of every cell, clip,
the LSTM's peepholes and coupled input and forget gates, on every ISA in float32 and float64,
on the step's paths (rows, in-step projection, a single row, a team), and what is refused.
ONNX Runtime checks the semantics themselves (test_onnx_oracle.py)."""
import numpy as np
import pytest

import fusedrnn
from _kernel_cases import hidden_past_l2
from fusedrnn import _C, functional, reference
from fusedrnn.tolerances import assert_close

ISAS = list(_C.available_isas())
DTYPES = [np.float32, np.float64]
NAMES = list(reference.ACTIVATIONS)
# (cell, linear_before_reset): the cells ONNX's operators run.
CELLS = [("rnn_tanh", True), ("lstm", True), ("gru", True), ("gru", False)]
# Alpha and beta per function where it takes them, away from ONNX Runtime's defaults so that a
# dropped one shows.
ALPHA_BETA = {"affine": (0.7, 0.3), "leakyrelu": (0.3, 0.0), "thresholdedrelu": (0.4, 0.0),
              "scaledtanh": (1.3, 0.6), "hardsigmoid": (0.35, 0.45), "elu": (0.8, 0.0)}


def options(cell, k, dtype, rng, H):
    """Option set k: function NAMES[k] in the cell's first slot and the next ones after it, clip
    on odd k, and for the LSTM peepholes unless k % 3 == 0 and input_forget where k % 4 == 1."""
    count = functional.ONNX_FUNCTIONS[cell]
    fns = [(n, *ALPHA_BETA.get(n, (0.0, 0.0)))
           for n in (NAMES[(k + j) % len(NAMES)] for j in range(count))]
    lstm = cell == "lstm"
    return {"activations": fns, "clip": 1.7 if k % 2 else None,
            "input_forget": lstm and k % 4 == 1,
            "peepholes": (0.5 * rng.standard_normal((3, H))).astype(dtype)
            if lstm and k % 3 else None}


def forward_both(rng, cell, lbr, k, dtype, isa, T=5, B=3, I=6, H=11, lengths=None,
                 reverse=False):
    """(kernels' (y, hn, cn), the float64 reference's) for option set k."""
    w = reference.init_weights(cell, I, H, 0, True, np.float64, rng)
    x = rng.standard_normal((T, B, I))
    h0 = 0.5 * rng.standard_normal((B, H))
    c0 = 0.5 * rng.standard_normal((B, H)) if cell == "lstm" else None
    onnx = options(cell, k, np.float64, rng, H)
    args = (x, h0, c0, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    want = reference.forward(cell, *args, lengths=lengths, reverse=reverse,
                             linear_before_reset=lbr, training=False, onnx=onnx)[:3]
    cast = [None if a is None else a.astype(dtype) for a in args]
    if onnx["peepholes"] is not None:
        onnx = dict(onnx, peepholes=onnx["peepholes"].astype(dtype))
    got = functional.forward(cell, *cast, lengths=lengths, reverse=reverse,
                             linear_before_reset=lbr, training=False, isa=isa, onnx=onnx)[:3]
    return got, want


def assert_forward_matches(got, want, dtype):
    for name, g, w in zip(("y", "hn", "cn"), got, want):
        if w is not None:
            assert g.dtype == dtype
            assert_close(g, w, dtype, what=name)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("cell,lbr", CELLS, ids=lambda v: str(v))
@pytest.mark.parametrize("k", range(len(NAMES)))
def test_options_against_the_reference(rng, isa, dtype, cell, lbr, k):
    """Each option set with ragged lengths on even k and reversed where k % 3 == 1; H = 11
    leaves a partial vector."""
    lengths = np.array([5, 2, 4]) if k % 2 == 0 else None
    got, want = forward_both(rng, cell, lbr, k, dtype, isa, lengths=lengths, reverse=k % 3 == 1)
    assert_forward_matches(got, want, dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell,lbr", CELLS, ids=lambda v: str(v))
@pytest.mark.parametrize("B,I,H", [(1, 5, 33), (16, 21, 40)])
def test_options_on_the_step_paths(rng, isa, cell, lbr, B, I, H):
    """A single row (whose projection may ride along the steps) and a batch whose projection
    runs inside the steps (projection_mode.h), float32, on one thread."""
    before = fusedrnn.get_num_threads()
    fusedrnn.set_num_threads(1)
    try:
        for k in (1, 6):
            got, want = forward_both(rng, cell, lbr, k, np.float32, isa, T=9, B=B, I=I, H=H)
            assert_forward_matches(got, want, np.float32)
    finally:
        fusedrnn.set_num_threads(before)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell,lbr", CELLS, ids=lambda v: str(v))
def test_options_on_two_threads_give_the_one_thread_bits(rng, isa, cell, lbr, fixed_threads):
    """Steps split by batch rows (B = 96, H = 128) and by hidden units (B = 12, H = 300 or wider,
    W_ih and W_hh past L2)."""
    if not _C.openmp:
        pytest.skip("built without OpenMP: one thread only")
    before = fusedrnn.get_num_threads()
    code = functional.CELL_CODES[cell]
    try:
        wide = hidden_past_l2(cell, 20, at_least=300)
        for B, H, split in ((96, 128, "rows"), (12, wide, "units")):
            assert _C.step_split(code, B, 20, H, H, threads=2, isa=isa) == split
            results = []
            for n in (1, 2):
                fusedrnn.set_num_threads(n)
                results.append(forward_both(np.random.default_rng(5), cell, lbr, 7, np.float32,
                                            isa, T=4, B=B, I=20, H=H)[0])
            for one, two in zip(*results):
                if one is not None:
                    assert np.array_equal(one, two)
    finally:
        fusedrnn.set_num_threads(before)


def test_defaults_as_options_are_the_plain_cells(rng):
    """ONNX's default functions passed as options give torch.nn's cells' results (the options'
    epilogues against the plain ones), float64."""
    for cell, lbr in CELLS:
        w = reference.init_weights(cell, 4, 9, 0, True, np.float64, rng)
        x = rng.standard_normal((6, 2, 4))
        h0 = rng.standard_normal((2, 9))
        c0 = rng.standard_normal((2, 9)) if cell == "lstm" else None
        args = (cell, x, h0, c0, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
        names = {"rnn_tanh": ["tanh"], "lstm": ["sigmoid", "tanh", "tanh"],
                 "gru": ["sigmoid", "tanh"]}[cell]
        onnx = {"activations": [(n, 0.0, 0.0) for n in names]}
        plain = functional.forward(*args, linear_before_reset=lbr, training=False)
        optioned = functional.forward(*args, linear_before_reset=lbr, training=False, onnx=onnx)
        for a, b in zip(plain[:3], optioned[:3]):
            if a is not None:
                assert_close(b, a, np.float64)


def test_clip_and_functions_change_the_result(rng):
    """Each option moves the output (a test whose options were dropped would still pass the
    others when both sides dropped them)."""
    w = reference.init_weights("lstm", 4, 9, 0, True, np.float64, rng)
    x = 3 * rng.standard_normal((6, 2, 4))
    h0, c0 = rng.standard_normal((2, 9)), rng.standard_normal((2, 9))
    args = ("lstm", x, h0, c0, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    base = {"activations": [("sigmoid", 0, 0), ("tanh", 0, 0), ("tanh", 0, 0)]}
    y0 = functional.forward(*args, training=False, onnx=base)[0]
    for change in ({"clip": 0.5}, {"input_forget": True},
                   {"peepholes": rng.standard_normal((3, 9))},
                   {"activations": [("hardsigmoid", 0.2, 0.5), ("tanh", 0, 0), ("tanh", 0, 0)]}):
        y = functional.forward(*args, training=False, onnx={**base, **change})[0]
        assert np.abs(y - y0).max() > 1e-3, change


def test_options_refused(rng):
    w = reference.init_weights("lstm", 4, 5, 0, True, np.float32, rng)
    x = rng.standard_normal((3, 2, 4)).astype(np.float32)
    h0 = np.zeros((2, 5), np.float32)
    args = ("lstm", x, h0, h0, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    ok = {"activations": [("sigmoid", 0, 0), ("tanh", 0, 0), ("tanh", 0, 0)]}
    with pytest.raises(ValueError, match="inference only"):
        functional.forward(*args, training=True, onnx=ok)
    with pytest.raises(ValueError, match="lstm takes 3"):
        functional.forward(*args, training=False, onnx={"activations": [("tanh", 0, 0)]})
    with pytest.raises(ValueError, match="'gelu' is not one of"):
        functional.forward(*args, training=False,
                           onnx={"activations": [("gelu", 0, 0)] + ok["activations"][1:]})
    with pytest.raises(ValueError, match="clip must be positive"):
        functional.forward(*args, training=False, onnx={**ok, "clip": 0.0})
    with pytest.raises(ValueError, match=r"peepholes must be \(3, hidden_size=5\)"):
        functional.forward(*args, training=False,
                           onnx={**ok, "peepholes": np.zeros((3, 4), np.float32)})
    with pytest.raises(TypeError, match="peepholes must have x's dtype float32"):
        functional.forward(*args, training=False, onnx={**ok, "peepholes": np.zeros((3, 5))})
    with pytest.raises(ValueError, match="inference"):
        reference.forward(*args, training=True, onnx=ok)
    # The kernels refuse them too, not cast (NumPy casts a byte-swapped array "safely")
    codes = ([(0, 0.0, 0.0), (1, 0.0, 0.0), (1, 0.0, 0.0)], np.inf, False)
    for peepholes in (np.zeros((3, 5), ">f4"), np.zeros((3, 5), np.float16)):
        with pytest.raises(TypeError, match="peepholes must have dtype float32"):
            _C.forward(2, True, False, False, x, h0, h0, w["w_ih"], w["w_hh"], w["b_ih"],
                       w["b_hh"], None, None, None, 0, False, codes + (peepholes,), True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_thresholded_relu_at_its_threshold(isa, dtype):
    """ThresholdedRelu keeps x only above alpha (ONNX's ThresholdedRelu operator, ONNX Runtime):
    x == alpha gives 0, NaN stays NaN. An RNN whose step is f(x): W = I, R = 0, no bias."""
    alpha = dtype(0.3)
    x = np.array([alpha, np.nextafter(alpha, dtype(1)), np.nextafter(alpha, dtype(0)), -1.0,
                  2.0], dtype)
    H = len(x)
    eye, zeros = np.eye(H, dtype=dtype), np.zeros((H, H), dtype)
    xs = np.stack([x, np.full(H, np.nan, dtype)])[None]  # (T, B, I): batch row 1 all NaN
    want = np.stack([np.array([0, x[1], 0, 0, 2.0], dtype), np.full(H, np.nan, dtype)])
    for name, f in (("kernels", lambda *a, **k: functional.forward(*a, isa=isa, **k)),
                    ("reference", reference.forward)):
        y = f("rnn_tanh", xs, np.zeros((2, H), dtype), None, eye, zeros, None, None,
              training=False, onnx={"activations": [("thresholdedrelu", alpha, 0.0)]})[0]
        np.testing.assert_array_equal(y[0], want, err_msg=name)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("lbr", [True, False])
def test_gru_state_is_onnx_sum_of_large_and_infinite_terms(isa, dtype, lbr):
    """The GRU's new state under options is ONNX's (1 - z) n + z h, as the reference takes it:
    the kernels took torch.nn's n + z (h - n), whose h - n overflows where n and h are finite,
    large and of opposite signs (n = -h = 0.9 max, z = 1/2: -inf, not ONNX Runtime's 0), and
    gives NaN, not inf, for an infinite n (g unbounded, here Affine). A one-unit GRU with x = 1
    and zero weights but n's: z = r = 1/2."""
    big = 0.9 * np.finfo(dtype).max
    x, h0 = np.ones((1, 2, 1), dtype), np.array([[-big], [1.0]], dtype)
    w_hh = np.zeros((3, 1), dtype)
    onnx = {"activations": [("sigmoid", 0.0, 0.0), ("affine", 1.0, 0.0)]}
    for w_n, want in ((big, [0, big / 2 + 0.5]), (np.inf, [np.inf, np.inf])):
        w_ih = np.array([[0.0], [0.0], [w_n]], dtype)  # gates r, z, n
        args = ("gru", x, h0, None, w_ih, w_hh, None, None)
        got = functional.forward(*args, linear_before_reset=lbr, training=False, isa=isa,
                                 onnx=onnx)[1]
        ref = reference.forward(*args, linear_before_reset=lbr, training=False, onnx=onnx)[1]
        np.testing.assert_array_equal(ref[:, 0], np.array(want, dtype))
        np.testing.assert_array_equal(got, ref)
