"""fusedrnn against ONNX, through fusedrnn.onnx_ops: the operator's own test cases
(onnx/backend/test/case/node/{rnn,gru,lstm}.py, their expected outputs and their NumPy helpers)
and ONNX Runtime on random ones.

These are the independent oracle for what torch does not have, above all the GRU with
``linear_before_reset=False`` (ONNX's default), and a second one for the rest: ONNX's gate orders
(LSTM i,o,f,c; GRU z,r,h), its ``direction`` (with "reverse" alone), ``layout=1`` (batch first)
and ``sequence_lens``. Skipped without onnx, and the ONNX Runtime tests without onnxruntime (the
test extra installs both)."""
import re
import warnings

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _C, onnx_ops, reference
from fusedrnn.onnx_layout import check_node, load_onnx_weights, onnx_weights
from fusedrnn.tolerances import assert_close, low_precision_tolerance, max_scaled_error

onnx = pytest.importorskip("onnx")

# ONNX's case modules compute their expected outputs with np.dot when imported (and again in
# onnx_cases, and their Helpers in the tests below). numpy's OpenBLAS now and then raises the
# floating-point invalid flag there on finite inputs and outputs (two full runs in about twenty:
# "RuntimeWarning: invalid value encountered in dot" in onnx's gru.py at import), which
# filterwarnings = error made a collection error. That warning of theirs alone is ignored; the
# outputs are still compared, so a real NaN in them fails the tests as before.
ONNX_DOT_WARNING = "invalid value encountered in dot"
pytestmark = pytest.mark.filterwarnings(f"ignore:{ONNX_DOT_WARNING}:RuntimeWarning")

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", ONNX_DOT_WARNING, RuntimeWarning)
    from onnx.backend.test.case.node import gru as onnx_gru  # noqa: E402
    from onnx.backend.test.case.node import lstm as onnx_lstm  # noqa: E402
    from onnx.backend.test.case.node import rnn as onnx_rnn  # noqa: E402

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# ONNX's case module per op: its exported cases are the class named after the op, and its NumPy
# reference the op's Helper.
CASE_MODULES = {"LSTM": onnx_lstm, "GRU": onnx_gru, "RNN": onnx_rnn}
# ONNX's cases that only its options reach (peepholes), named so that none goes missing unseen.
BEYOND_TORCH = {"test_lstm_with_peepholes"}
# Every case of the three ops in onnx 1.23 (its backend test data, onnx/backend/test/data/node,
# holds each as model.onnx and test_data_set_0, written from these same exports).
ONNX_1_23_CASES = {f"test_{name}" for name in (
    "gru_batchwise", "gru_bidirectional", "gru_defaults", "gru_reverse", "gru_seq_length",
    "gru_with_initial_bias", "lstm_batchwise", "lstm_bidirectional", "lstm_defaults",
    "lstm_reverse", "lstm_with_initial_bias", "lstm_with_peepholes", "rnn_seq_length",
    "simple_rnn_batchwise", "simple_rnn_bidirectional", "simple_rnn_defaults",
    "simple_rnn_reverse", "simple_rnn_with_initial_bias")}


def onnx_cases():
    """(name, node, inputs, expected outputs) of every exported ONNX test case of the three ops,
    caught by standing in for the modules' ``expect``."""
    found = []
    for op, module in CASE_MODULES.items():
        cls = getattr(module, op)
        saved = module.expect

        def catch(node, inputs, outputs, name, **_):
            found.append((name, node, inputs, outputs))
        module.expect = catch
        try:
            np.random.seed(0)  # some cases draw random weights
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ONNX_DOT_WARNING, RuntimeWarning)
                for attr in sorted(dir(cls)):
                    if attr.startswith("export"):
                        getattr(cls, attr)()
        finally:
            module.expect = saved
    return found


CASES = onnx_cases()


def node_attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def run_fusedrnn(node, feeds, dtype, isa=None):
    """The node's outputs from fusedrnn.onnx_ops.run_node, its float inputs in ``dtype``."""
    cast = {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in feeds.items()}
    return onnx_ops.run_node(node, cast, isa=isa)


def feeds_of(node, inputs):
    return {name: value for name, value in zip(node.input, inputs) if name}


def test_every_onnx_case_is_seen():
    """The ONNX package's cases were found, all three ops, the peephole case among them and
    every one onnx 1.23 has: a test over no cases would pass whatever the kernels did."""
    names = {name for name, *_ in CASES}
    for op in ("lstm", "gru", "rnn"):
        assert sum(op in n for n in names) >= 4, names
    assert BEYOND_TORCH <= names
    assert ONNX_1_23_CASES <= names, sorted(ONNX_1_23_CASES - names)


@pytest.mark.parametrize("name,node,inputs,outputs", CASES, ids=[c[0] for c in CASES])
def test_onnx_case_float32(name, node, inputs, outputs):
    """ONNX's expected outputs (computed by its helpers in float32) within our float32 forward
    tolerance."""
    got = run_fusedrnn(node, feeds_of(node, inputs), np.float32)
    named = [n for n in node.output if n]  # expect() lists the outputs the node names
    assert len(named) == len(outputs)
    for out_name, want in zip(named, outputs):
        assert_close(got[out_name], want, np.float32, what=f"{name} {out_name}")


@pytest.mark.parametrize("name,node,inputs,outputs", CASES, ids=[c[0] for c in CASES])
def test_onnx_case_float64(name, node, inputs, outputs):
    """The same case in float64 against ONNX's own helper run in float64: the semantics to the
    last bits, not only to float32's tolerance."""
    feeds = feeds_of(node, inputs)
    attrs = node_attrs(node)
    helper_args = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v)
                   for k, v in feeds.items() if k not in ("sequence_lens",)}
    for key in ("direction", "layout", "linear_before_reset"):
        if key in attrs:
            v = attrs[key]
            helper_args[key] = v.decode() if isinstance(v, bytes) else v
    want = dict(zip(["Y", "Y_h", "Y_c"], getattr(CASE_MODULES[node.op_type], node.op_type + "Helper")(**helper_args).step()))
    got = run_fusedrnn(node, feeds, np.float64)
    for out_name in node.output:
        if out_name:
            assert_close(got[out_name], want[out_name], np.float64, what=f"{name} {out_name}")


# ---- ONNX Runtime on random cases: lengths, both GRU variants, relu, directions ----


RANDOM_CASES = [  # op, activation or linear_before_reset, direction, ragged lengths
    ("RNN", "Tanh", "forward", False),
    ("RNN", "Relu", "bidirectional", True),
    ("RNN", "Tanh", "reverse", True),
    ("RNN", ("Relu", "Tanh"), "bidirectional", False),
    ("LSTM", None, "forward", True),
    ("LSTM", None, "bidirectional", True),
    ("LSTM", None, "reverse", False),
    ("GRU", 0, "forward", True),
    ("GRU", 0, "bidirectional", True),
    ("GRU", 0, "reverse", True),
    ("GRU", 1, "forward", False),
    ("GRU", 1, "bidirectional", True),
]


def ort_node_outputs(node, feeds):
    """The node's outputs from ONNX Runtime's CPU kernels (the test skips without it)."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper
    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
             np.dtype(np.int32): TensorProto.INT32}
    inputs = [helper.make_tensor_value_info(n, types[v.dtype], list(v.shape))
              for n, v in feeds.items()]
    out_type = types[feeds["X"].dtype]
    outputs = [helper.make_tensor_value_info(n, out_type, None) for n in node.output]
    graph = helper.make_graph([node], "case", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return dict(zip(node.output, session.run(None, feeds)))


@pytest.mark.parametrize("op,variant,direction,ragged", RANDOM_CASES)
def test_onnxruntime_random(rng, op, variant, direction, ragged):
    """Random weights and states, batch 5 with ragged lengths (some rows the whole T) and H = 37
    (partial vectors), against ONNX Runtime's operator in float32 (its CPU kernels refuse
    layout = 1; ONNX's own batchwise cases above cover it)."""
    layout = 0
    T, B, I, H = 7, 5, 6, 37
    G = GATES[op]
    D = 2 if direction == "bidirectional" else 1
    f32 = np.float32
    x = rng.standard_normal((B, T, I) if layout else (T, B, I)).astype(f32)
    feeds = {"X": x,
             "W": (0.4 * rng.standard_normal((D, G * H, I))).astype(f32),
             "R": (0.4 * rng.standard_normal((D, G * H, H))).astype(f32),
             "B": (0.2 * rng.standard_normal((D, 2 * G * H))).astype(f32)}
    lens = rng.integers(1, T + 1, size=B).astype(np.int32) if ragged else np.full(B, T, np.int32)
    if ragged:
        lens[0] = T
    feeds["sequence_lens"] = lens
    state_shape = (B, D, H) if layout else (D, B, H)
    feeds["initial_h"] = (0.5 * rng.standard_normal(state_shape)).astype(f32)
    outputs = ["Y", "Y_h"]
    if op == "LSTM":
        feeds["initial_c"] = (0.5 * rng.standard_normal(state_shape)).astype(f32)
        outputs.append("Y_c")
    attrs = {"hidden_size": H, "direction": direction, "layout": layout}
    if op == "GRU":
        attrs["linear_before_reset"] = variant
    if op == "RNN":
        attrs["activations"] = list(variant) if isinstance(variant, tuple) else [variant] * D
    node = onnx.helper.make_node(op, list(feeds), outputs, **attrs)
    want = ort_node_outputs(node, feeds)
    for isa in _C.available_isas():
        got = run_fusedrnn(node, feeds, f32, isa)
        for name in outputs:
            assert_close(got[name], want[name], f32, what=f"{op} {name} ({isa})")


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("lens", [[0, 7, 3, 0, 1], [0, 0, 0, 0, 0]], ids=["some", "all"])
def test_onnxruntime_rows_of_length_zero(rng, op, direction, lens):
    """sequence_lens may hold 0 in ONNX Runtime: such a row is zeros in Y, Y_h and Y_c, whatever
    its initial state; the other rows are as without it."""
    T, B, I, H = 7, 5, 4, 6
    G, D, f32 = GATES[op], 2 if direction == "bidirectional" else 1, np.float32
    feeds = {"X": rng.standard_normal((T, B, I)).astype(f32),
             "W": (0.4 * rng.standard_normal((D, G * H, I))).astype(f32),
             "R": (0.4 * rng.standard_normal((D, G * H, H))).astype(f32),
             "B": (0.2 * rng.standard_normal((D, 2 * G * H))).astype(f32),
             "sequence_lens": np.array(lens, np.int32),
             "initial_h": rng.standard_normal((D, B, H)).astype(f32)}
    outputs = ["Y", "Y_h"]
    if op == "LSTM":
        feeds["initial_c"] = rng.standard_normal((D, B, H)).astype(f32)
        outputs.append("Y_c")
    node = onnx.helper.make_node(op, list(feeds), outputs, hidden_size=H, direction=direction)
    want = ort_node_outputs(node, feeds)
    got = run_fusedrnn(node, feeds, f32)
    for name in outputs:
        assert_close(got[name], want[name], f32, what=f"{op} {name}")
    empty = np.array(lens) == 0
    assert not got["Y"][:, :, empty].any() and not got["Y_h"][:, empty].any()


# ---- ONNX Runtime on its cell options: every function, alpha and beta, clip, peepholes ----

OPTION_CASES = [  # op, direction, attributes beyond the shapes', peepholes
    ("LSTM", "forward", {"activations": ["HardSigmoid", "Softsign", "Elu"],
                         "activation_alpha": [0.3, 0.9], "activation_beta": [0.4],
                         "clip": 2.0}, True),
    ("LSTM", "bidirectional", {"input_forget": 1}, True),
    ("LSTM", "reverse", {"activations": ["Sigmoid", "ScaledTanh", "Softplus"],
                         "activation_alpha": [1.2], "activation_beta": [0.7]}, False),
    ("LSTM", "bidirectional", {"activations": ["Sigmoid", "Tanh", "Tanh", "HardSigmoid",
                                               "LeakyRelu", "Affine"],
                               "activation_alpha": [0.25, 0.2, 0.6], "clip": 1.1}, True),
    ("GRU", "forward", {"activations": ["Sigmoid", "ThresholdedRelu"],
                        "activation_alpha": [0.35], "clip": 1.5}, False),
    ("GRU", "bidirectional", {"activations": ["HardSigmoid", "Relu", "Sigmoid", "Softsign"],
                              "linear_before_reset": 1}, False),
    ("RNN", "bidirectional", {"activations": ["Affine", "Elu"], "activation_alpha": [0.8, 0.5],
                              "activation_beta": [0.1], "clip": 0.9}, False),
    ("RNN", "forward", {"activations": ["Softplus"]}, False),
    # Tanh takes no alpha: Affine takes the first alpha and beta, as in ONNX Runtime 1.32 (onnx's
    # reference evaluator and older ONNX Runtimes index them by direction: Affine's 0.5 and 0.2)
    ("RNN", "bidirectional", {"activations": ["Tanh", "Affine"], "activation_alpha": [0.8, 0.5],
                              "activation_beta": [0.1, 0.2]}, False),
    ("RNN", "reverse", {"activations": ["LeakyRelu"]}, False),
]


def option_case(rng, op, direction, attrs, peepholes):
    """A node with ONNX's cell options and its float32 feeds: batch 5, ragged lengths, H = 37."""
    T, B, I, H = 7, 5, 6, 37
    G, D = GATES[op], 2 if direction == "bidirectional" else 1
    f32 = np.float32
    feeds = {"X": rng.standard_normal((T, B, I)).astype(f32),
             "W": (0.4 * rng.standard_normal((D, G * H, I))).astype(f32),
             "R": (0.4 * rng.standard_normal((D, G * H, H))).astype(f32),
             "B": (0.2 * rng.standard_normal((D, 2 * G * H))).astype(f32),
             "sequence_lens": np.array([7, 3, 7, 1, 5], np.int32),
             "initial_h": (0.5 * rng.standard_normal((D, B, H))).astype(f32)}
    outputs = ["Y", "Y_h"]
    if op == "LSTM":
        feeds["initial_c"] = (0.5 * rng.standard_normal((D, B, H))).astype(f32)
        if peepholes:
            feeds["P"] = (0.5 * rng.standard_normal((D, 3 * H))).astype(f32)
        outputs.append("Y_c")
    node = onnx.helper.make_node(op, list(feeds), outputs, hidden_size=H, direction=direction,
                                 **attrs)
    return node, feeds, outputs


def test_option_cases_name_every_function():
    named = {a.lower() for _, _, attrs, _ in OPTION_CASES for a in attrs.get("activations", ())}
    assert named == set(reference.ACTIVATIONS), named


@pytest.mark.parametrize("op,direction,attrs,peepholes", OPTION_CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(OPTION_CASES)])
def test_onnxruntime_cell_options(rng, monkeypatch, op, direction, attrs, peepholes):
    """The kernels on every ISA and the NumPy reference (float64, through the same node
    handling) against ONNX Runtime's operator with the node's options."""
    node, feeds, outputs = option_case(rng, op, direction, attrs, peepholes)
    want = ort_node_outputs(node, feeds)
    for isa in _C.available_isas():
        got = run_fusedrnn(node, feeds, np.float32, isa)
        for name in outputs:
            assert_close(got[name], want[name], np.float32, what=f"{op} {name} ({isa})")
    monkeypatch.setattr(onnx_ops.functional, "forward",  # (isa, keep_packed: the kernels' only)
                        lambda *args, isa=None, keep_packed=True, **kw:
                        reference.forward(*args, **kw))

    def reference_directions(cells, x, h0, c0, directions, *, isa=None, keep_packed=True,
                             onnx, **kw):  # (a bidirectional node's one call)
        return [reference.forward(cells[d], x, h0[d], c0[d], *directions[d], reverse=bool(d),
                                  onnx=onnx[d], **kw) for d in range(2)]
    monkeypatch.setattr(onnx_ops.functional, "forward_directions", reference_directions)
    got = run_fusedrnn(node, feeds, np.float64)
    for name in outputs:
        assert_close(got[name], want[name], np.float32, what=f"reference {op} {name}")


def test_onnxruntime_thresholded_relu_at_its_threshold():
    """ThresholdedRelu at x == alpha gives 0 as in ONNX Runtime (the RNN operators' text says
    x >= alpha keeps x; ONNX's ThresholdedRelu operator and ONNX Runtime keep x > alpha only).
    An RNN whose step is f(x): W = I, R = 0."""
    alpha = np.float32(0.3)
    x = np.array([alpha, np.nextafter(alpha, np.float32(1)), np.nextafter(alpha, np.float32(0)),
                  -1, 2], np.float32)
    H = len(x)
    node = onnx.helper.make_node("RNN", ["X", "W", "R"], ["Y"], hidden_size=H,
                                 activations=["ThresholdedRelu"], activation_alpha=[float(alpha)])
    feeds = {"X": x[None, None], "W": np.eye(H, dtype=np.float32)[None],
             "R": np.zeros((1, H, H), np.float32)}
    want = ort_node_outputs(node, feeds)["Y"]
    assert want[0, 0, 0, 0] == 0 and want[0, 0, 0, 1] == x[1]  # the tie as ONNX Runtime has it
    for isa in _C.available_isas():
        np.testing.assert_array_equal(run_fusedrnn(node, feeds, np.float32, isa)["Y"], want,
                                      err_msg=isa)


def test_onnxruntime_infinite_state_at_a_batch_of_32(rng):
    """An LSTM node whose g and h are Relu (unbounded): row 3's cell state overflows at step 0
    (c0 = 3e38 and g about 3e38), and its h with it; positive weights keep every sum of the
    steps after infinite, as ONNX Runtime's are. At 32 rows the amx build's steps take their
    products on AMX tiles, which split h into bfloat16 parts: an infinity split with a NaN part,
    and that row's outputs from step 2 on were NaN on the "amx" ISA alone."""
    T, B, I, H = 4, 32, 24, 40
    x = rng.uniform(0.5, 1, (T, B, I)).astype(np.float32)
    x[0, 3] = 1e37
    c0 = np.zeros((1, B, H), np.float32)
    c0[0, 3] = 3e38
    feeds = {"X": x, "W": (rng.uniform(0.5, 1, (1, 4 * H, I)) / I).astype(np.float32),
             "R": rng.uniform(0, 0.1, (1, 4 * H, H)).astype(np.float32), "initial_c": c0}
    node = onnx.helper.make_node("LSTM", ["X", "W", "R", "", "", "", "initial_c"],
                                 ["Y", "Y_h", "Y_c"], hidden_size=H,
                                 activations=["Sigmoid", "Relu", "Relu"])
    want = ort_node_outputs(node, feeds)
    assert np.isinf(want["Y"][1:, 0, 3]).all() and np.isfinite(want["Y"][:, 0, :3]).all()
    for isa in _C.available_isas():
        got = run_fusedrnn(node, feeds, np.float32, isa)
        for name, w in want.items():
            np.testing.assert_array_equal(np.isinf(got[name]), np.isinf(w), err_msg=f"{name} {isa}")
            finite = np.isfinite(w)
            assert_close(np.where(finite, got[name], 0), np.where(finite, w, 0), np.float32,
                         what=f"{name} ({isa})")


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_onnxruntime_empty_activations_are_the_defaults(rng, op, direction):
    """An activations attribute that lists no function: ONNX Runtime's LSTM and GRU run their
    defaults (ours refused it: "must name 3 function(s) per direction")."""
    node, feeds, outputs = option_case(rng, op, direction, {}, False)
    node.attribute.append(onnx.helper.make_attribute("activations", [],
                                                     attr_type=onnx.AttributeProto.STRINGS))
    want = ort_node_outputs(node, feeds)
    got = run_fusedrnn(node, feeds, np.float32)
    for name in outputs:
        assert_close(got[name], want[name], np.float32, what=f"{op} {name}")


# ---- float16 and bfloat16 (ONNX's type T takes both): the float32 kernels, rounded once ----


def _low_precision_case(rng, op, direction, attrs, peepholes, dtype):
    """option_case's node and feeds, the float inputs rounded to ``dtype``."""
    node, feeds, outputs = option_case(rng, op, direction, attrs, peepholes)
    return node, {k: (v.astype(dtype) if v.dtype.kind == "f" else v)
                  for k, v in feeds.items()}, outputs


@pytest.mark.parametrize("op,direction,attrs,peepholes", OPTION_CASES[:2] + [
    ("GRU", "bidirectional", {}, False), ("GRU", "reverse", {"linear_before_reset": 1}, False),
    ("RNN", "forward", {}, False), ("LSTM", "reverse", {}, False)],
    ids=lambda v: v if isinstance(v, str) else None)
def test_onnxruntime_float16(rng, op, direction, attrs, peepholes):
    """float16 nodes: ONNX Runtime's float16 kernels compute in float32 and round each output
    once, as ours do, so the two agree within two roundings; and ours are ONNX Runtime's
    float32 results on the same (float16) values, rounded once."""
    node, feeds, outputs = _low_precision_case(rng, op, direction, attrs, peepholes, np.float16)
    got = onnx_ops.run_node(node, feeds)
    want16 = ort_node_outputs(node, feeds)
    want32 = ort_node_outputs(node, {k: (v.astype(np.float32) if v.dtype == np.float16 else v)
                                     for k, v in feeds.items()})
    for name in outputs:
        assert got[name].dtype == want16[name].dtype == np.float16
        err = max_scaled_error(got[name], want16[name])
        assert err <= low_precision_tolerance("float16", roundings=2), (name, err)
        err = max_scaled_error(got[name], want32[name])
        assert err <= low_precision_tolerance("float16"), (name, err)


def test_bfloat16_nodes_round_the_float32_result_once(rng):
    """bfloat16 (ml_dtypes', as onnx's numpy_helper gives it; ONNX Runtime's CPU kernels have
    none): the outputs are ONNX Runtime's float32 results on the same values, rounded once."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    node, feeds, outputs = _low_precision_case(rng, *OPTION_CASES[1], ml_dtypes.bfloat16)
    got = onnx_ops.run_node(node, feeds)
    want = ort_node_outputs(node, {k: (v.astype(np.float32) if v.dtype.kind != "i" else v)
                                   for k, v in feeds.items()})
    for name in outputs:
        assert got[name].dtype == ml_dtypes.bfloat16
        err = max_scaled_error(got[name].astype(np.float64), want[name])
        assert err <= low_precision_tolerance("bfloat16"), (name, err)
    with pytest.raises(TypeError, match="W must have X's dtype bfloat16"):
        onnx_ops.run_node(node, dict(feeds, W=feeds["W"].astype(np.float32)))


# ---- onnx_layout: a layer's weights as ONNX nodes take them, and back ----

LAYERS = {"RNN": fusedrnn.RNN, "LSTM": fusedrnn.LSTM, "GRU": fusedrnn.GRU}


@pytest.mark.parametrize("op,lbr", [("RNN", None), ("LSTM", None), ("GRU", 0), ("GRU", 1)])
def test_layer_weights_run_in_onnxruntime(rng, op, lbr):
    """A two-layer bidirectional stack: each layer's onnx_weights in an ONNX Runtime node, the
    first node's Y (T, D, B, H) laid out as the second's input (T, B, D*H), gives the layer's
    y and hn; and the weights load back into a fresh layer unchanged."""
    kw = {} if lbr is None else {"linear_before_reset": bool(lbr)}
    T, B, I, H = 6, 3, 5, 7
    layer = LAYERS[op](I, H, num_layers=2, bidirectional=True, seed=3, **kw).eval()
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    y, hh = layer(x)
    hn = hh[0] if op == "LSTM" else hh
    inp, hns = x, []
    for k in range(2):
        W, R, Bias = onnx_weights(layer, k)
        attrs = {"hidden_size": H, "direction": "bidirectional"}
        if lbr is not None:
            attrs["linear_before_reset"] = lbr
        feeds = {"X": inp, "W": W, "R": R, "B": Bias}
        node = onnx.helper.make_node(op, list(feeds), ["Y", "Y_h"], **attrs)
        out = ort_node_outputs(node, feeds)
        inp = np.ascontiguousarray(out["Y"].transpose(0, 2, 1, 3).reshape(T, B, 2 * H))
        hns.append(out["Y_h"])
    assert_close(y, inp, np.float32, what="y")
    assert_close(hn, np.concatenate(hns), np.float32, what="hn")
    again = LAYERS[op](I, H, num_layers=2, bidirectional=True, seed=4, **kw)
    for k in range(2):
        load_onnx_weights(again, *onnx_weights(layer, k), layer_index=k, node=node)
    for name, p in layer.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name], p)


def test_onnx_layout_refuses_what_does_not_map(rng):
    lstm = fusedrnn.LSTM(3, 4)
    W, R, B = onnx_weights(lstm)
    assert (W.shape, R.shape, B.shape) == ((1, 16, 3), (1, 16, 4), (1, 32))
    with pytest.raises(ValueError, match=r"R must have shape \(1, 16, 4\)"):
        load_onnx_weights(lstm, W, R[:, :, :3], B)
    with pytest.raises(TypeError, match="W must have a float dtype"):
        load_onnx_weights(lstm, W.astype(np.int32), R, B)
    with pytest.raises(ValueError, match="layer_index must be an int in 0..0"):
        onnx_weights(lstm, 1)
    with pytest.raises(ValueError, match="projection"):
        onnx_weights(fusedrnn.LSTM(3, 4, proj_size=2))
    no_bias = fusedrnn.GRU(3, 4, bias=False)
    W, R, B = onnx_weights(no_bias)
    assert not B.any()
    load_onnx_weights(no_bias, W, R)
    with pytest.raises(ValueError, match="B must be zeros"):
        load_onnx_weights(no_bias, W, R, B + 1)
    with pytest.raises(TypeError, match="fusedrnn.RNN, LSTM or GRU, got builtins.object$"):
        onnx_weights(object())



def test_gate_reordering_names_an_array_without_whole_gate_blocks():
    """to_onnx_gates / from_onnx_gates raised NumPy's IndexError ("tuple index out of range")
    for a 0-d array or None, and "array split does not result in an equal division" for rows
    that are not whole gate blocks, naming neither the array nor the blocks."""
    from fusedrnn.onnx_layout import from_onnx_gates, to_onnx_gates
    for convert in (to_onnx_gates, from_onnx_gates):
        for a, got in ((np.float32(1), r"\(\)"), (None, r"\(\)"), (np.zeros((7, 3)), r"\(7, 3\)")):
            with pytest.raises(ValueError, match=r"a must have 4 gate blocks of equal rows along "
                                                 rf"its first axis for lstm, got shape {got}"):
                convert(a, "lstm")
    np.testing.assert_array_equal(from_onnx_gates(to_onnx_gates(np.arange(8), "lstm"), "lstm"),
                                  np.arange(8))
    with pytest.raises(ValueError, match="cell must be one of rnn, rnn_tanh, rnn_relu, lstm, "
                                         "gru; got 'transformer'"):
        to_onnx_gates(np.arange(8), "transformer")

@pytest.mark.torch
def test_onnx_layout_refuses_torch_modules_by_name():
    """fusedrnn.torch's modules (torch.nn's, whose _spec is a method): onnx_weights raised
    AttributeError "'function' object has no attribute 'num_layers'", though the adapter's own
    export error sends the GRU torch lacks to onnx_weights."""
    torch = pytest.importorskip("torch")
    import fusedrnn.torch as ft
    node = onnx.helper.make_node("GRU", ["X", "W", "R"], ["Y"], hidden_size=4)
    for module in (ft.GRU(3, 4, linear_before_reset=False), torch.nn.GRU(3, 4)):
        name = f"{type(module).__module__}.GRU"
        for call in (lambda: onnx_weights(module), lambda: check_node(module, node),
                     lambda: load_onnx_weights(module, *onnx_weights(fusedrnn.GRU(3, 4)))):
            with pytest.raises(TypeError, match=rf"got {re.escape(name)}; .* load its "
                                                r"state_dict\(\) into a fusedrnn layer"):
                call()


def test_load_onnx_weights_checks_the_node_it_is_given(rng):
    """With node=, load_onnx_weights refuses a node whose maths the layer does not compute, by
    the attribute: the weights loaded and the outputs differed (a torch-exported GRU node, with
    linear_before_reset=1, into a GRU(linear_before_reset=False): by up to 0.19)."""
    make = onnx.helper.make_node
    gru = fusedrnn.GRU(3, 4, linear_before_reset=False)
    weights = onnx_weights(gru)
    load_onnx_weights(gru, *weights, node=make("GRU", ["X", "W", "R"], ["Y"], hidden_size=4))
    refused = [
        (gru, make("GRU", ["X", "W", "R"], ["Y"], hidden_size=4, linear_before_reset=1),
         "linear_before_reset is 1"),
        (gru, make("GRU", ["X", "W", "R"], ["Y"], hidden_size=5), "hidden_size is 5"),
        (gru, make("GRU", ["X", "W", "R"], ["Y"], direction="reverse"), "direction is 'reverse'"),
        (gru, make("GRU", ["X", "W", "R"], ["Y"], clip=2.0), "clip is 2.0"),
        (gru, make("LSTM", ["X", "W", "R"], ["Y"]), "an ONNX GRU node"),
        (gru, make("GRU", ["X", "W", "R"], ["Y"], activations=["Sigmoid", "Relu"]),
         "activations are"),
        (fusedrnn.RNN(3, 4), make("RNN", ["X", "W", "R"], ["Y"], activations=["Relu"]),
         "activations are"),
        (fusedrnn.RNN(3, 4, nonlinearity="relu"), make("RNN", ["X", "W", "R"], ["Y"]),
         "computes ['relu']"),
        (fusedrnn.LSTM(3, 4), make("LSTM", ["X", "W", "R", "", "", "", "", "P"], ["Y"]),
         "peepholes"),
    ]
    for layer, node, match in refused:
        with pytest.raises(ValueError, match=re.escape(match)):
            load_onnx_weights(layer, *onnx_weights(layer), node=node)
    rnn = fusedrnn.RNN(3, 4, nonlinearity="relu")
    load_onnx_weights(rnn, *onnx_weights(rnn),
                      node=make("RNN", ["X", "W", "R"], ["Y"], activations=["Relu"]))
    # a forward node listing two, as the RNN schema's default does: ONNX Runtime takes the first
    tanh = fusedrnn.RNN(3, 4)
    load_onnx_weights(tanh, *onnx_weights(tanh),
                      node=make("RNN", ["X", "W", "R"], ["Y"], activations=["Tanh", "Relu"]))
    with pytest.raises(ValueError, match="layer_index must be an int"):
        onnx_weights(gru, True)
