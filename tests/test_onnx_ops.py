"""fusedrnn.onnx_ops, ONNX's operators on the kernels: its layouts and optional inputs against a
layer's own results, and its refusals. ONNX's own cases and ONNX Runtime check its semantics in
test_onnx_oracle.py."""
import numpy as np
import pytest

import fusedrnn
from fusedrnn import onnx_ops
from fusedrnn.onnx_layout import onnx_weights
from fusedrnn.tolerances import assert_close

OPS = {"LSTM": (fusedrnn.LSTM, onnx_ops.lstm), "GRU": (fusedrnn.GRU, onnx_ops.gru),
       "RNN": (fusedrnn.RNN, onnx_ops.rnn)}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bidirectional_node_is_the_layer(rng, op, layout, dtype):
    """A bidirectional layer's weights as ONNX's W, R, B, its states and ragged lengths as the
    node's inputs: Y and Y_h (and Y_c) are the layer's y, hn (cn) laid out as ONNX lays them."""
    T, B, I, H = 5, 4, 3, 6
    layer_cls, node = OPS[op]
    layer = layer_cls(I, H, bidirectional=True, dtype=dtype, seed=1).eval()
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = rng.standard_normal((2, B, H)).astype(dtype)
    c0 = rng.standard_normal((2, B, H)).astype(dtype)
    lens = np.array([5, 2, 4, 1])
    y, states = layer(x, (h0, c0) if op == "LSTM" else h0, lengths=lens)  # y zero past lengths
    W, R, Bias = onnx_weights(layer)
    seq_first = lambda a: np.ascontiguousarray(np.swapaxes(a, 0, 1)) if layout else a  # noqa: E731
    inputs = [seq_first(x), W, R, Bias, lens.astype(np.int32), seq_first(h0)]
    if op == "LSTM":
        inputs.append(seq_first(c0))
    variant = {"linear_before_reset": 1} if op == "GRU" else {}  # the layer's, torch's GRU
    got = node(*inputs, direction="bidirectional", layout=layout, hidden_size=H, **variant)
    want_y = y.reshape(T, B, 2, H).transpose(0, 2, 1, 3)  # (T, D, B, H)
    if layout:
        want_y = want_y.transpose(2, 0, 1, 3)  # (B, T, D, H)
    assert_close(got[0], want_y, dtype, what="Y")
    for name, have, want in zip(("Y_h", "Y_c"), got[1:], states if op == "LSTM" else (states,)):
        assert_close(have, seq_first(want), dtype, what=name)
    assert all(o.dtype == dtype and o.flags.c_contiguous for o in got)


def test_defaults_and_spelled_out_defaults_agree(rng):
    """Absent B and states are zeros; zero peepholes, ONNX's default activations written out
    (either case, bytes as onnx.helper returns them) and one RNN activation for both directions
    change nothing; reverse is the forward of the time-flipped sequence."""
    T, B, I, H = 4, 3, 2, 5
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    W = rng.standard_normal((1, 4 * H, I)).astype(np.float32)
    R = rng.standard_normal((1, 4 * H, H)).astype(np.float32)
    zeros = np.zeros
    base = onnx_ops.lstm(x, W, R)
    same = onnx_ops.lstm(x, W, R, zeros((1, 8 * H), np.float32), np.full(B, T), zeros((1, B, H),
                         np.float32), zeros((1, B, H), np.float32), zeros((1, 3 * H), np.float32),
                         activations=[b"Sigmoid", "tanh", "Tanh"], direction=b"forward")
    for a, b in zip(base, same):
        np.testing.assert_array_equal(a, b)
    flipped = onnx_ops.lstm(x[::-1], W, R, direction="reverse")
    np.testing.assert_array_equal(flipped[0][::-1], base[0])
    np.testing.assert_array_equal(flipped[1], base[1])
    W2 = rng.standard_normal((2, H, I)).astype(np.float32)
    R2 = rng.standard_normal((2, H, H)).astype(np.float32)
    one = onnx_ops.rnn(x, W2, R2, direction="bidirectional", activations=["Relu"])
    both = onnx_ops.rnn(x, W2, R2, direction="bidirectional", activations=["Relu", "Relu"])
    tanh = onnx_ops.rnn(x, W2, R2, direction="bidirectional")
    np.testing.assert_array_equal(one[0], both[0])
    assert not np.array_equal(one[0], tanh[0])
    # The RNN's schema default names two functions whatever the directions; with one direction
    # ONNX Runtime runs the first (onnxruntime's rnn.h), and so does fusedrnn.
    for first, second in (("Tanh", "Tanh"), ("Relu", "Tanh"), ("Tanh", "Relu")):
        np.testing.assert_array_equal(
            onnx_ops.rnn(x, W2[:1], R2[:1], activations=[first, second])[0],
            onnx_ops.rnn(x, W2[:1], R2[:1], activations=[first])[0])


def test_gru_variants_differ(rng):
    """linear_before_reset picks the GRU variant (ONNX's default 0 is not torch's)."""
    x = rng.standard_normal((3, 2, 4)).astype(np.float32)
    W = rng.standard_normal((1, 9, 4)).astype(np.float32)
    R = rng.standard_normal((1, 9, 3)).astype(np.float32)
    Bias = rng.standard_normal((1, 18)).astype(np.float32)
    original = onnx_ops.gru(x, W, R, Bias)
    torch_variant = onnx_ops.gru(x, W, R, Bias, linear_before_reset=1)
    assert not np.allclose(original[0], torch_variant[0])


def lstm_args(rng, T=3, B=2, I=4, H=5, D=1, dtype=np.float32):
    return dict(X=rng.standard_normal((T, B, I)).astype(dtype),
                W=rng.standard_normal((D, 4 * H, I)).astype(dtype),
                R=rng.standard_normal((D, 4 * H, H)).astype(dtype))


@pytest.mark.parametrize("change,error,match", [
    ({"clip": 0.0}, ValueError, r"clip must be positive \(it bounds"),
    ({"clip": float("nan")}, ValueError, "clip must be positive"),
    ({"input_forget": 2}, ValueError, "input_forget must be 0 or 1"),
    ({"activations": ["Relu", "Tanh"]}, ValueError,
     r"activations must name 3 function\(s\) per direction \(1\)"),
    ({"activations": ["Gelu", "Tanh", "Tanh"]}, ValueError, r"activations \['gelu'\] are not ONNX's"),
    ({"P": np.full((1, 15), 0.1)}, TypeError, "P must have X's dtype float32"),
    ({"P": np.zeros((1, 12), np.float32)}, ValueError, r"P must have shape \(1, 15\)"),
    ({"direction": "backward"}, ValueError, "direction must be one of"),
    ({"layout": 2}, ValueError, "layout must be 0"),
    ({"hidden_size": 6}, ValueError, "hidden_size=6 disagrees"),
    ({"W": np.zeros((1, 20, 3), np.float32)}, ValueError, r"W must have shape \(1, 20, 4\)"),
    ({"R": np.zeros((2, 20, 5), np.float32)}, ValueError, r"R must have shape \(num_directions=1"),
    ({"W": None}, TypeError, "W is required"),
    ({"X": np.zeros((3, 2), np.float32)}, ValueError, r"X must have 3 dimensions \(T, B, "),
    ({"X": np.zeros((2, 0, 4), np.float32), "layout": 1}, ValueError,
     r"X must have at least one time step, got shape \(2, 0, 4\) \(B, T, "),
    ({"X": np.zeros((3, 2, 4), np.int32)}, TypeError,
     "X must be a float16, bfloat16, float32 or float64 array, got int32"),
    ({"R": np.zeros((1, 20, 5))}, TypeError, "R must have X's dtype float32"),
    ({"B": np.zeros((1, 20), np.float32)}, ValueError, r"B must have shape \(1, 40\)"),
    ({"sequence_lens": [3, 4]}, ValueError, "sequence_lens must lie in 0..3"),
    ({"sequence_lens": [-1, 2]}, ValueError, "sequence_lens must lie in 0..3"),
    ({"sequence_lens": [3.0, 1.0]}, TypeError, "sequence_lens must be integers"),
    ({"initial_h": np.zeros((2, 1, 5), np.float32)}, ValueError,
     r"initial_h must have shape \(1, 2, 5\)"),
    ({"layout": 1, "initial_c": np.zeros((1, 3, 5), np.float32)}, ValueError,
     r"initial_c must have shape \(3, 1, 5\)"),
    # (these raised Python's own errors, naming nothing)
    ({"activations": ["Sigmoid", None, "Tanh"]}, TypeError,
     r"activations must be function names, got \[None\]"),
    ({"activations": ["Sigmoid", "Affine", "Tanh"], "activation_alpha": 0.5}, TypeError,
     "activation_alpha must be a list of floats, got float"),
    ({"activations": ["Sigmoid", "Affine", "Tanh"], "activation_beta": ["x"]}, TypeError,
     "activation_beta must be a list of floats"),
    ({"hidden_size": "5"}, TypeError, "hidden_size must be an int, got str"),
    # (NumPy's "setting an array element with a sequence", Python's UnicodeDecodeError)
    ({"X": [[[1.0]], [[1.0, 2.0]]]}, ValueError, "X must be an array, got a list that NumPy"),
    ({"W": [[[1.0]], [[1.0, 2.0]]]}, ValueError, "W must be an array, got a list that NumPy"),
    ({"activations": [b"\xff", b"Tanh", b"Tanh"]}, ValueError,
     r"activations \['\\\\xff'\] are not ONNX's"),
    ({"direction": b"\xff"}, ValueError, r"direction must be one of .*, got '\\\\xff'"),
    ({"clip": [1.0, 2.0]}, TypeError, "clip must be a number, got list"),
    # (Python's "unhashable type: 'list'", NumPy's "setting an array element with a sequence")
    ({"direction": ["forward"]}, ValueError, r"direction must be one of .*, got \['forward'\]"),
    ({"sequence_lens": [[3], [1, 2]]}, ValueError, "sequence_lens must be an array, got a list"),
    ({"X": np.zeros((3, 2, 4), ">f4")}, TypeError, "X must be native-byte-order float32, got >f4"),
    ({"X": np.zeros((3, 2, 4), ">f2")}, TypeError, "X must be native-byte-order float16, got >f2"),
    ({"X": np.zeros((3, 2, 4), np.float16), "W": np.zeros((1, 20, 4), ">f2"),
      "R": np.zeros((1, 20, 5), np.float16)}, TypeError,
     r"W must be native-byte-order float16 \(X's dtype\), got >f2"),
])
def test_refusals_name_the_input(rng, change, error, match):
    args = {**lstm_args(rng), **change}
    with pytest.raises(error, match=match):
        onnx_ops.lstm(**args)


def test_a_misshaped_input_is_named_before_a_broadcast_x_is_copied(rng):
    """X was made C-contiguous (and cast, for float16) before W, R and the states were checked:
    a broadcast X of 60 TiB as a copy raised MemoryError instead of naming the misshaped input."""
    for dtype in (np.float32, np.float16):
        args = lstm_args(rng, dtype=dtype)
        for layout in (0, 1):
            x = np.broadcast_to(np.zeros((1, 1, 4), dtype), (2 ** 40, 2, 4))
            with pytest.raises(ValueError, match=r"W must have shape \(1, 20, 4\)"):
                onnx_ops.lstm(x, args["W"][..., :3], args["R"], layout=layout)
            with pytest.raises(ValueError, match="initial_h must have shape"):
                onnx_ops.lstm(x, args["W"], args["R"], initial_h=np.zeros((1, 7, 5), dtype),
                              layout=layout)



def test_activations_given_as_an_iterator_are_the_functions_it_names(rng):
    """An iterator of activations was consumed by the check of its names and then read as no
    activations: ONNX's defaults ran, silently (Tanh for an RNN given iter(["Relu"]))."""
    x = rng.standard_normal((3, 2, 4)).astype(np.float32)
    W, R = rng.standard_normal((1, 5, 4)).astype(np.float32), np.zeros((1, 5, 5), np.float32)
    want = onnx_ops.rnn(x, W, R, activations=["Relu"])
    for given in (iter(["Relu"]), (a for a in ["Relu"])):
        got = onnx_ops.rnn(x, W, R, activations=given)
        np.testing.assert_array_equal(got[0], want[0])
    want = onnx_ops.gru(x, np.tile(W, (1, 3, 1)), np.zeros((1, 15, 5), np.float32),
                        activations=["HardSigmoid", "Affine"], activation_alpha=[0.3, 2.0])
    got = onnx_ops.gru(x, np.tile(W, (1, 3, 1)), np.zeros((1, 15, 5), np.float32),
                       activations=iter(["HardSigmoid", "Affine"]),
                       activation_alpha=iter([0.3, 2.0]))
    np.testing.assert_array_equal(got[0], want[0])

def test_rnn_and_gru_refusals(rng):
    x = rng.standard_normal((3, 2, 4)).astype(np.float32)
    W, R = np.zeros((2, 5, 4), np.float32), np.zeros((2, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"name 1 function\(s\) per direction \(2\)"):
        onnx_ops.rnn(x, W, R, direction="bidirectional", activations=["Tanh"] * 3)
    with pytest.raises(ValueError, match=r"name 2 function\(s\) per direction \(1\)"):
        onnx_ops.gru(x, W[:1, :3].repeat(5, 1), R[:1, :3].repeat(5, 1), activations=["Tanh"])
    with pytest.raises(ValueError, match=r"name 1 function\(s\) per direction \(1\), got "
                                         r"\['Tanh', 'Relu', 'Tanh'\]"):
        onnx_ops.rnn(x, W[:1], R[:1], activations=[b"Tanh", "Relu", "Tanh"])
    with pytest.raises(TypeError, match="a list of function names, got the string 'Tanh'"):
        onnx_ops.rnn(x, W[:1], R[:1], activations="Tanh")
    with pytest.raises(ValueError, match="linear_before_reset must be 0 or 1"):
        onnx_ops.gru(x, np.zeros((1, 15, 4), np.float32), np.zeros((1, 15, 5), np.float32),
                     linear_before_reset=2)


def test_run_node_inputs_by_name_or_position(rng):
    """run_node reads the node's attributes and inputs (by name, or by position with absent
    optional ones left out) and returns the outputs the node names; it refuses other ops, other
    attributes, inputs it was not given and values for inputs the node does not take."""
    onnx = pytest.importorskip("onnx")
    a = lstm_args(rng, T=4, B=3, I=2, H=3)
    lens = np.array([4, 1, 3], np.int32)
    node = onnx.helper.make_node("LSTM", ["X", "W", "R", "", "lens"], ["", "Y_h"], hidden_size=3,
                                 direction="reverse")
    want = onnx_ops.lstm(a["X"], a["W"], a["R"], sequence_lens=lens, direction="reverse")
    by_name = onnx_ops.run_node(node, {"X": a["X"], "W": a["W"], "R": a["R"], "lens": lens})
    by_position = onnx_ops.run_node(node, [a["X"], a["W"], a["R"], None, lens])
    assert list(by_name) == ["Y_h"]
    np.testing.assert_array_equal(by_name["Y_h"], want[1])
    np.testing.assert_array_equal(by_position["Y_h"], want[1])
    for short in ({"X": a["X"], "W": a["W"], "R": a["R"]}, [a["X"], a["W"], a["R"], None]):
        with pytest.raises(ValueError, match=r"no value for the node's input\(s\) \['lens'\]"):
            onnx_ops.run_node(node, short)
    with pytest.raises(ValueError, match="inputs has 6 values for the node's 5 inputs"):
        onnx_ops.run_node(node, [a["X"], a["W"], a["R"], None, lens, lens])
    # A value the node does not take was dropped: an initial state meant for it ran as zeros.
    h0 = np.ones((1, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"names \['initial_h'\], which the node does not take"):
        onnx_ops.run_node(node, {"X": a["X"], "W": a["W"], "R": a["R"], "lens": lens,
                                 "initial_h": h0})
    with pytest.raises(ValueError, match=r"gives \['B'\], which the node leaves out"):
        onnx_ops.run_node(node, [a["X"], a["W"], a["R"], np.ones((1, 24), np.float32), lens])
    with pytest.raises(ValueError, match="got op_type 'Gemm'"):
        onnx_ops.run_node(onnx.helper.make_node("Gemm", ["a", "b"], ["c"]), [a["X"], a["W"]])
    odd = onnx.helper.make_node("GRU", ["X", "W", "R"], ["Y"], hidden_size=3, pitch=1)
    with pytest.raises(ValueError, match=r"GRU has no attribute\(s\) \['pitch'\]"):
        onnx_ops.run_node(odd, [a["X"], a["W"], a["R"]])
    crowded = onnx.helper.make_node("LSTM", ["X", "W", "R", *"abcdef"], ["Y"], hidden_size=3)
    with pytest.raises(ValueError, match=r"LSTM takes at most 8 inputs .*, the node names 9"):
        onnx_ops.run_node(crowded, [a["X"], a["W"], a["R"]])


def test_a_node_runs_its_rows_longest_first(rng, monkeypatch):
    """sequence_lens in any order: the kernels run the rows with steps longest first (so that
    rows past their length lie together and leave the steps' products) and every output comes
    back in the node's order, rows of length 0 zeros (the ONNX Runtime and reference tests check
    the values)."""
    from fusedrnn import functional
    seen = []
    for name, directions in (("forward", 1), ("forward_directions", 2)):
        def spy(*args, _real=getattr(functional, name), _directions=directions, **kwargs):
            seen.extend([np.array(kwargs["lengths"])] * _directions)
            return _real(*args, **kwargs)
        monkeypatch.setattr(functional, name, spy)
    T, B, I, H = 5, 6, 3, 4
    X = rng.standard_normal((T, B, I)).astype(np.float32)
    W = rng.standard_normal((2, 4 * H, I)).astype(np.float32)
    R = rng.standard_normal((2, 4 * H, H)).astype(np.float32)
    lens = np.array([2, 5, 0, 3, 5, 1], np.int32)
    Y, Y_h, _ = onnx_ops.lstm(X, W, R, sequence_lens=lens, direction="bidirectional",
                              hidden_size=H)
    assert [list(s) for s in seen] == [[5, 5, 3, 2, 1]] * 2
    assert np.all(Y[:, :, 2] == 0) and np.all(Y_h[:, 2] == 0)
    assert np.all(Y[2:, 0, 0] == 0) and np.any(Y[1, 0, 0] != 0)  # row 0 (length 2) in place


def test_nodes_keep_no_packed_forms_of_their_weights(rng):
    """The kernels get a node's weights as new arrays every call (ONNX's gate order to torch's):
    the thread's packed-weight cache kept each call's forms, dead once it returned, until its
    256 MiB were full (50 nodes of random shapes: within 4000 calls, 61 -> 417 MiB resident).
    It keeps none of them now."""
    from fusedrnn import _C
    a = lstm_args(rng, T=4, B=3, I=2, H=3, D=2)
    _C.packed_cache(clear=True)
    for _ in range(3):
        onnx_ops.lstm(a["X"], a["W"], a["R"], direction="bidirectional")
        onnx_ops.gru(a["X"], a["W"][:, :9], a["R"][:, :9], direction="bidirectional")
        onnx_ops.rnn(a["X"][:1], a["W"][:, :3], a["R"][:, :3], direction="bidirectional",
                     activations=["Relu", "Tanh"], clip=1.0)
    assert _C.packed_cache()["forms"] == 0


def test_run_node_refuses_by_name_what_it_cannot_run(rng):
    """A GRU naming a third output (Y_c) ran and left it out; another domain's LSTM was blamed
    on its op_type; inputs=None raised "'NoneType' object is not iterable"; outputs named twice
    returned the second under the name."""
    helper = pytest.importorskip("onnx").helper
    args = lstm_args(rng)
    inputs = {k: args[k] for k in ("X", "W", "R")}
    W, R = np.zeros((1, 15, 4), np.float32), np.zeros((1, 15, 5), np.float32)
    gru = helper.make_node("GRU", ["X", "W", "R"], ["Y", "Y_h", "Y_c"], hidden_size=5)
    with pytest.raises(ValueError, match=r"GRU has at most 2 outputs \['Y', 'Y_h'\]"):
        onnx_ops.run_node(gru, {"X": args["X"], "W": W, "R": R})
    lstm = helper.make_node("LSTM", ["X", "W", "R"], ["Y"], hidden_size=5,
                            domain="com.microsoft")
    with pytest.raises(ValueError, match="domain 'com.microsoft'"):
        onnx_ops.run_node(lstm, inputs)
    lstm = helper.make_node("LSTM", ["X", "W", "R"], ["Y"], hidden_size=5)
    with pytest.raises(TypeError, match="inputs must be a dict"):
        onnx_ops.run_node(lstm, None)
    twice = helper.make_node("LSTM", ["X", "W", "R"], ["Y", "Y"], hidden_size=5)
    with pytest.raises(ValueError, match=r"distinct names, got \['Y', 'Y'\]"):
        onnx_ops.run_node(twice, inputs)  # (it returned Y_h under the name Y)


@pytest.mark.parametrize("op", ["lstm", "gru"])
def test_a_nan_input_reaches_the_outputs_of_its_row_from_its_step(op):
    """IEEE semantics, bias B given (README: ONNX Runtime 1.32's LSTM and GRU turn it into finite
    numbers there): from the NaN's step on, its row is NaN in Y and in the states; the other
    rows and the earlier steps stay finite."""
    rng = np.random.default_rng(3)
    T, B, I, H = 5, 3, 4, 6
    G = 4 if op == "lstm" else 3
    X = rng.standard_normal((T, B, I)).astype(np.float32)
    X[2, 1, 0] = np.nan
    W = (0.4 * rng.standard_normal((1, G * H, I))).astype(np.float32)
    R = (0.4 * rng.standard_normal((1, G * H, H))).astype(np.float32)
    bias = (0.2 * rng.standard_normal((1, 2 * G * H))).astype(np.float32)
    Y, Y_h, *rest = getattr(onnx_ops, op)(X, W, R, bias)
    assert np.isnan(Y[2:, 0, 1]).all() and np.isnan(Y_h[0, 1]).all()
    assert np.isfinite(Y[:2]).all() and np.isfinite(Y[:, :, [0, 2]]).all()
    assert all(np.isnan(c[0, 1]).all() and np.isfinite(c[0, [0, 2]]).all() for c in rest)


@pytest.mark.parametrize("name,alphas,betas,f", [
    ("Affine", None, None, lambda x: x),
    ("Affine", [2.0], None, lambda x: 2 * x),
    ("Affine", None, [0.5], lambda x: x + 0.5),
    ("ThresholdedRelu", None, None, lambda x: np.where(x > 1, x, 0)),
    ("ScaledTanh", None, None, np.tanh),
    ("ScaledTanh", [2.0], None, lambda x: 2 * np.tanh(x)),
])
def test_absent_alpha_and_beta_are_the_operators_defaults(name, alphas, betas, f):
    """ONNX's RNN operators: alpha and beta not given take "the same [defaults] as of
    corresponding ONNX operators": Affine alpha 1, beta 0; ThresholdedRelu alpha 1; ScaledTanh
    alpha 1, beta 1. We took 0 for each, as ONNX Runtime 1.32 does (Affine gave 0 for every x;
    found by fuzzing against the spec's equations). An RNN with W = I, R = 0: Y = f(X)."""
    x = np.linspace(-3, 3, 25, dtype=np.float32).reshape(1, 1, 25)
    W, R = np.eye(25, dtype=np.float32)[None], np.zeros((1, 25, 25), np.float32)
    Y, _ = onnx_ops.rnn(x, W, R, activations=[name], activation_alpha=alphas,
                        activation_beta=betas)
    assert_close(Y[:, 0], f(x.astype(np.float64)), np.float32, what=name)
