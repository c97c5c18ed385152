"""ONNX's RNN / LSTM / GRU weights to and from a layer's (torch.nn's) parameters.

ONNX keeps one node per layer, its weights stacked by direction and its gates in another order:

    W (D, G*H, input)   R (D, G*H, hidden)   B (D, 2*G*H) = [W_b, R_b]
    gates: LSTM i, o, f, c (torch i, f, g, o); GRU z, r, h (torch r, z, n); RNN one block

    W, R, B = fusedrnn.onnx_layout.onnx_weights(lstm, layer_index=0)   # to feed an ONNX node
    fusedrnn.onnx_layout.load_onnx_weights(lstm, W, R, B, layer_index=0, node=node)  # from one

The layer is fusedrnn's own (NumPy) RNN, LSTM or GRU; a torch module's weights (fusedrnn.torch's
or torch.nn's) go through ``load_state_dict`` into one.

The node's other attributes must agree with the layer (``node=``, an onnx NodeProto, has
load_onnx_weights check them): ``direction`` "forward" for one
direction or "bidirectional" for two (ONNX's "reverse" alone has no torch.nn layer;
:mod:`fusedrnn.onnx_ops` runs it, and whole nodes), its default activations (RNN: Tanh, or
Relu for ``nonlinearity="relu"``), no ``clip`` nor ``input_forget``, no peepholes (``P``), and
for the GRU ``linear_before_reset`` as the layer's (ONNX's default 0 is
``linear_before_reset=False``).
A projected LSTM (``proj_size``) has no ONNX form.
"""
import numpy as np

from .layers import _Layer, _to_numpy

# ONNX's gate blocks, as indices into torch's (gate j of ONNX is torch's block ONNX_GATES[j]).
ONNX_GATES = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn": (0,)}


def to_onnx_gates(a, cell):
    """The gate blocks along a's first axis, from torch's order to ONNX's. cell: "rnn", "lstm"
    or "gru" ("rnn_tanh" and "rnn_relu" too)."""
    kind = _kind(cell)
    return _gates_in(a, ONNX_GATES[kind], kind)


def from_onnx_gates(a, cell):
    """The gate blocks along a's first axis, from ONNX's order to torch's."""
    kind = _kind(cell)
    return _gates_in(a, np.argsort(ONNX_GATES[kind]), kind)


def _gates_in(a, order, kind):
    """a's gate blocks (along its first axis), block order[j] of a as block j (a ``kind``
    cell's: "rnn", "lstm" or "gru")."""
    a = np.asarray(a)
    if a.ndim == 0 or a.shape[0] % len(order):
        raise ValueError(f"a must have {len(order)} gate blocks of equal rows along its first "
                         f"axis for {kind}, got shape {a.shape}")
    blocks = np.split(a, len(order), axis=0)
    return np.concatenate([blocks[i] for i in order], axis=0)


def onnx_weights(layer, layer_index=0):
    """(W, R, B) of ONNX's node for layer ``layer_index`` of a fusedrnn RNN, LSTM or GRU, new
    arrays of the layer's dtype; B is zeros for a layer without biases."""
    cell, D = _check(layer, layer_index)
    params = layer.state_dict()
    W, R, B = [], [], []
    for d in range(D):
        name = f"_l{layer_index}" + ("_reverse" if d else "")
        W.append(to_onnx_gates(params["weight_ih" + name], cell))
        R.append(to_onnx_gates(params["weight_hh" + name], cell))
        GH = params["weight_hh" + name].shape[0]
        b_ih = params.get("bias_ih" + name, np.zeros(GH, layer.dtype))
        b_hh = params.get("bias_hh" + name, np.zeros(GH, layer.dtype))
        B.append(np.concatenate([to_onnx_gates(b_ih, cell), to_onnx_gates(b_hh, cell)]))
    return np.stack(W), np.stack(R), np.stack(B)


def load_onnx_weights(layer, W, R, B=None, layer_index=0, node=None):
    """Copies an ONNX node's W, R and B (None: zeros) into layer ``layer_index`` of a fusedrnn
    RNN, LSTM or GRU, checked as ``load_state_dict`` checks (shapes named, float dtypes, cast to
    the layer's dtype). A layer without biases takes only a B of zeros (or None). ``node``: the
    onnx NodeProto the weights come from, whose attributes must then agree with the layer
    (module docstring); without it that is the caller's to check."""
    cell, D = _check(layer, layer_index)
    if node is not None:
        check_node(layer, node)
    shapes = layer._spec.param_shapes()
    first = f"_l{layer_index}"
    GH, I = shapes["weight_ih" + first]
    H_out = shapes["weight_hh" + first][1]
    expected = {"W": (D, GH, I), "R": (D, GH, H_out), "B": (D, 2 * GH)}
    given = {"W": W, "R": R, "B": np.zeros(expected["B"]) if B is None else B}
    arrays = {}
    for key, value in given.items():
        a = _to_numpy(value, key)
        if a.dtype.kind != "f":
            raise TypeError(f"{key} must have a float dtype, got {a.dtype.name}")
        if a.shape != expected[key]:
            raise ValueError(f"{key} must have shape {expected[key]} (num_directions, ...) for "
                             f"layer {layer_index} of {layer!r}, got {a.shape}")
        arrays[key] = a
    values = {}
    for d in range(D):
        name = first + ("_reverse" if d else "")
        values["weight_ih" + name] = from_onnx_gates(arrays["W"][d], cell)
        values["weight_hh" + name] = from_onnx_gates(arrays["R"][d], cell)
        b_ih, b_hh = np.split(arrays["B"][d], 2)
        if "bias_ih" + name in shapes:
            values["bias_ih" + name] = from_onnx_gates(b_ih, cell)
            values["bias_hh" + name] = from_onnx_gates(b_hh, cell)
        elif np.any(b_ih) or np.any(b_hh):
            raise ValueError(f"B must be zeros for {layer!r}, which has no biases (bias=False)")
    layer._copy_into_params(values)


def check_node(layer, node):
    """Refuses (ValueError naming the attribute) an ONNX RNN / LSTM / GRU node whose maths a
    layer of ``layer``'s kind does not compute: its weights would load and give other results."""
    from .onnx_ops import DEFAULT_ACTIVATIONS, _text, node_attributes
    spec = _spec_of(layer)
    kind = _kind(spec.cell)
    if getattr(node, "op_type", None) != kind.upper():
        raise ValueError(f"node must be an ONNX {kind.upper()} node for {layer!r}, got "
                         f"{getattr(node, 'op_type', type(node).__name__)!r}")
    attrs = {k: _text(v) for k, v in node_attributes(node).items()}
    D = spec.num_directions
    absent = {"direction": "forward", "hidden_size": spec.hidden_size, "clip": None,
              "input_forget": 0, "linear_before_reset": 0}  # (ONNX's defaults)
    want = {"direction": "bidirectional" if D == 2 else "forward",
            "hidden_size": spec.hidden_size, "clip": None, "input_forget": 0,
            "linear_before_reset": int(spec.linear_before_reset) if kind == "gru" else 0}
    for name, value in want.items():
        got = attrs.get(name, absent[name])
        if got != value:
            raise ValueError(f"node's {name} is {got!r}, where {layer!r} computes {value!r}")
    computes = DEFAULT_ACTIVATIONS[kind] * D
    if spec.cell == "rnn_relu":
        computes = ("relu",) * D
    names = tuple(_text(a).lower() for a in attrs.get("activations", ())) or \
        DEFAULT_ACTIVATIONS[kind] * D
    if kind == "rnn" and D == 1 and len(names) == 2:
        names = names[:1]  # (the RNN schema's default lists two; ONNX Runtime takes the first)
    if names != computes:
        raise ValueError(f"node's activations are {list(names)}, where {layer!r} computes "
                         f"{list(computes)}")
    if kind == "lstm" and len(node.input) > 7 and node.input[7]:
        raise ValueError(f"node has peepholes (input P), which {layer!r} does not compute")


def _kind(cell):
    kind = str(cell).split("_")[0]
    if kind not in ONNX_GATES:
        raise ValueError(f"cell must be one of rnn, rnn_tanh, rnn_relu, lstm, gru; got {cell!r}")
    return kind


def _spec_of(layer):
    if not isinstance(layer, _Layer):
        # (fusedrnn.torch's modules are torch.nn's: an AttributeError came from within)
        kind = type(layer)
        hint = ("; for a torch module (fusedrnn.torch's or torch.nn's), load its state_dict() "
                "into a fusedrnn layer of its configuration" if hasattr(layer, "state_dict")
                else "")
        raise TypeError(f"layer must be a fusedrnn.RNN, LSTM or GRU, got "
                        f"{kind.__module__}.{kind.__qualname__}{hint}")
    return layer._spec


def _check(layer, layer_index):
    spec = _spec_of(layer)
    if (isinstance(layer_index, bool) or not isinstance(layer_index, (int, np.integer))
            or not 0 <= layer_index < spec.num_layers):
        raise ValueError(f"layer_index must be an int in 0..{spec.num_layers - 1}, "
                         f"got {layer_index!r}")
    if spec.proj_size:
        raise ValueError(f"{layer!r} has a projection (proj_size), which ONNX's LSTM has not")
    return spec.cell, spec.num_directions
