"""ONNX's RNN, LSTM and GRU operators on fusedrnn's kernels (inference): the node's inputs and
attributes as ONNX names them, its outputs as ONNX Runtime gives them.

    Y, Y_h, Y_c = fusedrnn.onnx_ops.lstm(X, W, R, B, sequence_lens, initial_h, initial_c,
                                         direction="bidirectional")
    Y, Y_h = fusedrnn.onnx_ops.gru(X, W, R, B, linear_before_reset=1, layout=1)
    Y, Y_h = fusedrnn.onnx_ops.rnn(X, W, R, activations=["Relu"])
    outputs = fusedrnn.onnx_ops.run_node(node, inputs)   # an onnx NodeProto; {output name: array}

Shapes, layout=0 (ONNX's default):

    X (T, B, I)   W (D, G*H, I)   R (D, G*H, H)   B (D, 2*G*H)   sequence_lens (B,)
    initial_h, initial_c (D, B, H)   P (D, 3*H)   ->   Y (T, D, B, H)   Y_h, Y_c (D, B, H)

D is 2 for direction "bidirectional", else 1; G is 4 (LSTM, gates i, o, f, c), 3 (GRU, z, r, h)
or 1 (RNN). layout=1 puts the batch first: X (B, T, I), Y (B, T, D, H), states (B, D, H).
Missing optional inputs are zeros; steps past a row's sequence_lens are zeros in Y, and Y_h / Y_c
hold each row's state after its last step (for "reverse", after its first time step). A row of
length 0 is zeros in Y, Y_h and Y_c, as ONNX Runtime gives it.

Every float input shares one dtype (ONNX's type T): float32 or float64, or float16 or bfloat16
(``ml_dtypes.bfloat16``, as onnx's ``numpy_helper`` gives it), which run the float32 kernels and
come out rounded once to T; sequence_lens are integers in 0..T. Every attribute of ONNX's
operators is computed: ``activations`` (any of ONNX's eleven functions, per direction, with
``activation_alpha`` / ``activation_beta`` read as ONNX Runtime reads them: each function that
takes an alpha, or a beta, takes the next one given, else its ONNX operator's default, where
ONNX Runtime's are 0 for Affine, ThresholdedRelu and ScaledTanh), ``clip``, the LSTM's
``input_forget`` and peepholes ``P``; as ONNX Runtime, peepholes come before clip, and clip
bounds each activation's input but not the cell state that h takes. A node with none of these
beyond the defaults runs torch.nn's cells, the benchmark's paths. ``isa`` runs one build of the
kernels (see :mod:`fusedrnn.functional`).
"""
import numpy as np

from . import functional
from ._layer_base import descending_order
from ._validate import FLOAT_DTYPES, as_array, as_dtype_array, as_lengths, check_shape
from .onnx_layout import ONNX_GATES, from_onnx_gates
from .reference import ACTIVATIONS

DIRECTIONS = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}
# ONNX's default activations per direction (f, g, h as each op takes them).
DEFAULT_ACTIVATIONS = {"lstm": ("sigmoid", "tanh", "tanh"), "gru": ("sigmoid", "tanh"),
                       "rnn": ("tanh",)}
RNN_CELLS = {"tanh": "rnn_tanh", "relu": "rnn_relu"}
# activation_alpha / activation_beta as ONNX Runtime reads them: the functions, in the order
# the node lists them, each take the next alpha (and beta) if they use one, else its default.
# The defaults are ONNX's: "the same as of corresponding ONNX operators" (Affine, ThresholdedRelu
# and ScaledTanh take 1 where ONNX Runtime 1.32 takes 0: Affine gave 0 for every x).
USES_ALPHA = {"affine", "leakyrelu", "thresholdedrelu", "scaledtanh", "hardsigmoid", "elu"}
USES_BETA = {"affine", "scaledtanh", "hardsigmoid"}
DEFAULT_ALPHA_BETA = {"affine": (1.0, 0.0), "leakyrelu": (0.01, 0.0),
                      "thresholdedrelu": (1.0, 0.0), "scaledtanh": (1.0, 1.0),
                      "hardsigmoid": (0.2, 0.5), "elu": (1.0, 0.0)}
# The node's inputs in ONNX's order, per op.
INPUTS = {
    "LSTM": ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"),
    "GRU": ("X", "W", "R", "B", "sequence_lens", "initial_h"),
    "RNN": ("X", "W", "R", "B", "sequence_lens", "initial_h"),
}
# Its outputs, in ONNX's order.
OUTPUTS = {"LSTM": ("Y", "Y_h", "Y_c"), "GRU": ("Y", "Y_h"), "RNN": ("Y", "Y_h")}
COMMON_ATTRIBUTES = ("direction", "layout", "hidden_size", "activations", "activation_alpha",
                     "activation_beta", "clip")
ATTRIBUTES = {"LSTM": COMMON_ATTRIBUTES + ("input_forget",),
              "GRU": COMMON_ATTRIBUTES + ("linear_before_reset",),
              "RNN": COMMON_ATTRIBUTES}


def lstm(X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None, *,
         direction="forward", layout=0, hidden_size=None, activations=None,
         activation_alpha=None, activation_beta=None, clip=None, input_forget=0, isa=None):
    """ONNX's LSTM: (Y, Y_h, Y_c)."""
    op = _Node("lstm", X, W, R, B, sequence_lens, initial_h, direction, layout, hidden_size)
    c0 = op.state("initial_c", initial_c)
    peepholes = [None] * op.D
    if P is not None:
        p = op.float_input("P", P)
        check_shape("P", p, (op.D, 3 * op.H))
        if p.any():  # ONNX's gates i, o, f to the kernels' i, f, o
            peepholes = [np.ascontiguousarray(p[d].reshape(3, op.H)[[0, 2, 1]])
                         for d in range(op.D)]
    if input_forget not in (0, 1):
        raise ValueError(f"input_forget must be 0 or 1, got {input_forget!r}")
    options = op.options(activations, activation_alpha, activation_beta, clip,
                         input_forget=bool(input_forget), peepholes=peepholes)
    return op.run(options, c0, linear_before_reset=True, isa=isa)


def gru(X, W, R, B=None, sequence_lens=None, initial_h=None, *, direction="forward", layout=0,
        hidden_size=None, activations=None, activation_alpha=None, activation_beta=None,
        clip=None, linear_before_reset=0, isa=None):
    """ONNX's GRU: (Y, Y_h). ``linear_before_reset`` 0 (ONNX's default) is the original GRU,
    1 torch.nn's."""
    if linear_before_reset not in (0, 1):  # True and False compare equal to 1 and 0
        raise ValueError(f"linear_before_reset must be 0 or 1, got {linear_before_reset!r}")
    op = _Node("gru", X, W, R, B, sequence_lens, initial_h, direction, layout, hidden_size)
    options = op.options(activations, activation_alpha, activation_beta, clip)
    return op.run(options, None, bool(linear_before_reset), isa)


def rnn(X, W, R, B=None, sequence_lens=None, initial_h=None, *, direction="forward", layout=0,
        hidden_size=None, activations=None, activation_alpha=None, activation_beta=None,
        clip=None, isa=None):
    """ONNX's RNN: (Y, Y_h)."""
    op = _Node("rnn", X, W, R, B, sequence_lens, initial_h, direction, layout, hidden_size)
    return op.run(op.options(activations, activation_alpha, activation_beta, clip), None, True,
                  isa)


def run_node(node, inputs, isa=None):
    """An ONNX ``NodeProto`` of op LSTM, GRU or RNN run on ``inputs``: a dict by input name, or
    a sequence in the node's input order (None or a missing name for an absent optional input).
    Returns {output name: array} for the outputs the node names."""
    op = getattr(node, "op_type", None)
    if op not in INPUTS:
        raise ValueError(f"node must be an ONNX LSTM, GRU or RNN node, got op_type {op!r}")
    domain = getattr(node, "domain", "")
    if domain not in ("", "ai.onnx"):
        raise ValueError(f"node must be in ONNX's own domain ('' or 'ai.onnx'), got {op} in "
                         f"domain {domain!r}, whose semantics may differ")
    if len(node.output) > len(OUTPUTS[op]):
        raise ValueError(f"{op} has at most {len(OUTPUTS[op])} outputs {list(OUTPUTS[op])}, the "
                         f"node names {len(node.output)}")
    named = [name for name in node.output if name]
    if len(set(named)) < len(named):
        # (ONNX names each value once; the dict returned would hold the last under the name)
        raise ValueError(f"node's outputs must have distinct names, got {list(node.output)}")
    if inputs is None or isinstance(inputs, (str, bytes)):
        raise TypeError(f"inputs must be a dict by input name or a sequence in the node's input "
                        f"order, got {type(inputs).__name__}")
    attrs = node_attributes(node)
    unknown = sorted(set(attrs) - set(ATTRIBUTES[op]))
    if unknown:
        raise ValueError(f"{op} has no attribute(s) {unknown}: ONNX's are {list(ATTRIBUTES[op])}")
    names = list(node.input)
    if len(names) > len(INPUTS[op]):
        raise ValueError(f"{op} takes at most {len(INPUTS[op])} inputs {INPUTS[op]}, "
                         f"the node names {len(names)}")
    # A value the node does not read raises, as ONNX Runtime refuses a feed it has no input
    # for: dropped, an initial state meant for the node would silently be zeros.
    if isinstance(inputs, dict):
        unread = sorted(str(k) for k in set(inputs) - {n for n in names if n})
        if unread:
            raise ValueError(f"inputs names {unread}, which the node does not take as input; "
                             f"its inputs are {names}")
        missing = [n for n in names if n and n not in inputs]
        values = [inputs.get(n) if n else None for n in names]
    else:
        values = list(inputs)
        if len(values) > len(names):
            raise ValueError(f"inputs has {len(values)} values for the node's {len(names)} inputs")
        unread = [INPUTS[op][i] for i, (n, v) in enumerate(zip(names, values))
                  if not n and v is not None]
        if unread:
            raise ValueError(f"inputs gives {unread}, which the node leaves out (an empty input "
                             f"name); its inputs are {names}")
        missing = [n for n in names[len(values):] if n]
        values = [v if n else None for n, v in zip(names, values)]
    if missing:
        raise ValueError(f"inputs has no value for the node's input(s) {missing}")
    args = dict(zip(INPUTS[op], values))
    outputs = {"LSTM": lstm, "GRU": gru, "RNN": rnn}[op](**args, **attrs, isa=isa)
    return {name: out for name, out in zip(node.output, outputs) if name}


def _functions(activations, alphas, betas, default):
    """[(name, alpha, beta)] for the node's activations (``default`` when None or empty)."""
    if isinstance(activations, (str, bytes)):
        raise TypeError(f"activations must be a list of function names, got the string "
                        f"{_text(activations)!r}")
    if activations is not None:
        activations = list(activations)  # (an iterator, read once here, then read as none)
        bad = [a for a in activations if not isinstance(a, (str, bytes))]
        if bad:
            raise TypeError(f"activations must be function names, got {bad!r} among them")
    # An empty list names none: ONNX's defaults, as ONNX Runtime's LSTM and GRU read it (its
    # RNN refuses it; onnx_layout.check_node reads it so too).
    names = [_text(a).lower() for a in activations] if activations is not None else []
    names = names or default
    unknown = sorted(set(names) - set(ACTIVATIONS))
    if unknown:
        raise ValueError(f"activations {unknown} are not ONNX's: it has {list(ACTIVATIONS)} "
                         "(any case)")
    alphas, betas = _floats("activation_alpha", alphas), _floats("activation_beta", betas)
    out = []
    for name in names:
        alpha, beta = DEFAULT_ALPHA_BETA.get(name, (0.0, 0.0))
        if name in USES_ALPHA and alphas:
            alpha = float(alphas.pop(0))
        if name in USES_BETA and betas:
            beta = float(betas.pop(0))
        out.append((name, alpha, beta))
    return out


def _floats(name, values):
    """activation_alpha / activation_beta as a list of floats (ONNX: a list attribute)."""
    if values is None:
        return []
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a list of floats, got {type(values).__name__}")
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a list of floats, got {list(values)!r}") from None


def _is_low_precision(dtype):
    """float16, or ml_dtypes' bfloat16 (NumPy has none of its own)."""
    return dtype == np.float16 or dtype.name == "bfloat16"


def node_attributes(node):
    """{name: value} of an onnx NodeProto's attributes (strings as bytes, as onnx gives them)."""
    from onnx import helper  # the caller has a NodeProto, so onnx is installed

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _text(value):
    # (bytes that are not UTF-8 shown escaped, so that the error about them names the attribute)
    return value.decode(errors="backslashreplace") if isinstance(value, bytes) else value


class _Node:
    """One node's inputs checked against each other, in the kernels' layout: x (T, B, I) and the
    states (D, B, H) whatever the node's layout."""

    def __init__(self, kind, X, W, R, B, sequence_lens, initial_h, direction, layout,
                 hidden_size):
        self.kind, self.G = kind, len(ONNX_GATES[kind])
        direction = _text(direction)
        if not isinstance(direction, str) or direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
        self.reverses = DIRECTIONS[direction]
        self.D = len(self.reverses)
        if layout not in (0, 1):
            raise ValueError(f"layout must be 0 (sequence first) or 1 (batch first), got "
                             f"{layout!r}")
        self.layout = layout
        x = as_array("X", X) if X is not None else None
        native = None if x is None else x.dtype.newbyteorder("=")
        if x is None or not (native in FLOAT_DTYPES or _is_low_precision(native)):
            raise TypeError("X must be a float16, bfloat16, float32 or float64 array, got "
                            f"{'None' if x is None else x.dtype.name}")
        x = as_dtype_array("X", x, native)  # (refuses another byte order)
        # ONNX's type T, of every float input and output; float16 and bfloat16 (ml_dtypes, as
        # onnx's numpy_helper makes it) run the float32 kernels, and each output is rounded once
        self.dtype = x.dtype
        self.compute_dtype = np.dtype(np.float32) if _is_low_precision(x.dtype) else x.dtype
        axes = "(B, T, input_size)" if layout else "(T, B, input_size)"
        if x.ndim != 3:
            raise ValueError(f"X must have 3 dimensions {axes}, got shape {x.shape}")
        if x.shape[1 if layout else 0] == 0:
            raise ValueError(f"X must have at least one time step, got shape {x.shape} {axes}")
        x = np.swapaxes(x, 0, 1) if layout else x  # (a view: copied once every input is checked)
        self.T, self.B, I = x.shape
        r = self.float_input("R", R)
        if r.ndim != 3 or r.shape[0] != self.D:
            raise ValueError(f"R must have shape (num_directions={self.D}, {self.G}*hidden_size, "
                             f"hidden_size), got {r.shape}")
        self.H = H = r.shape[2]
        if hidden_size is not None and (isinstance(hidden_size, bool) or
                                        not isinstance(hidden_size, (int, np.integer))):
            raise TypeError(f"hidden_size must be an int, got {type(hidden_size).__name__} "
                            f"{hidden_size!r}")
        if hidden_size is not None and hidden_size != H:
            raise ValueError(f"hidden_size={hidden_size} disagrees with R's shape {r.shape}")
        check_shape("R", r, (self.D, self.G * H, H))
        w = self.float_input("W", W)
        check_shape("W", w, (self.D, self.G * H, I))
        if B is None:
            b = np.zeros((self.D, 2 * self.G * H), self.compute_dtype)
        else:
            b = self.float_input("B", B)
            check_shape("B", b, (self.D, 2 * self.G * H))
        self.w, self.r, self.b = w, r, b
        self.h0 = self.state("initial_h", initial_h)
        lens, self.rows = None, None
        if sequence_lens is not None:
            lens = as_lengths(sequence_lens, self.T, self.B, name="sequence_lens", least=0)
            # The kernels run the rows with steps (the others stay zeros), longest first: rows
            # past their length then lie together and leave the steps' products, as the layers'
            # (_layer_base.descending_order).
            running = np.flatnonzero(lens)
            order = descending_order(lens[running], len(running))
            if order is not None or len(running) < self.B:
                self.rows = running if order is None else running[order]
                lens = lens[self.rows]
            if np.all(lens == self.T):
                lens = None  # every row the whole sequence: the kernels' path without lengths
        self.lengths = lens
        # Cast and C order only now: a strided or broadcast X may be far larger as a copy (a
        # MemoryError, or gigabytes written) than the mistake the checks above would name.
        self.x = np.ascontiguousarray(x, dtype=self.compute_dtype)

    def float_input(self, name, value):
        if value is None:
            raise TypeError(f"{name} is required: an array of X's dtype {self.dtype.name}")
        a = as_array(name, value)
        if a.dtype != self.dtype:
            if a.dtype.newbyteorder("=") == self.dtype:
                as_dtype_array(name, a, self.dtype, " (X's dtype)")   # (raises: byte order)
            raise TypeError(f"{name} must have X's dtype {self.dtype.name} (ONNX's type T), got "
                            f"{a.dtype.name}")
        return a.astype(self.compute_dtype, copy=False)

    def all_rows(self, out, axis):
        """``out`` of the rows with steps placed among zeros for every row."""
        shape = list(out.shape)
        shape[axis] = self.B
        full = np.zeros(shape, out.dtype)
        index = [slice(None)] * len(shape)
        index[axis] = self.rows
        full[tuple(index)] = out
        return full

    def state(self, name, value):
        """initial_h or initial_c as (D, B, H), zeros when absent."""
        if value is None:
            return np.zeros((self.D, self.B, self.H), self.compute_dtype)
        a = self.float_input(name, value)
        check_shape(name, a, (self.B, self.D, self.H) if self.layout else (self.D, self.B, self.H))
        return np.swapaxes(a, 0, 1) if self.layout else a

    def options(self, activations, alphas, betas, clip, input_forget=False, peepholes=None):
        """Per direction, (cell, ONNX cell options or None): None where the node asks for
        nothing beyond torch.nn's cells, which then run as they are (the RNN's Relu included)."""
        k = len(DEFAULT_ACTIVATIONS[self.kind])
        fns = _functions(activations, alphas, betas, DEFAULT_ACTIVATIONS[self.kind] * self.D)
        if self.kind == "rnn" and self.D == 1 and len(fns) == 2:
            # The RNN's schema default lists two functions, (Tanh, Tanh), for either direction
            # count; with one direction ONNX Runtime takes the first, and so do we.
            fns = fns[:1]
        if len(fns) == k and self.D == 2:
            # One direction's functions for both. (ONNX Runtime refuses such a node; this
            # reading is the only one it can have.)
            fns = fns * 2
        if len(fns) != k * self.D:
            raise ValueError(f"activations must name {k} function(s) per direction ({self.D}), "
                             f"got {[_text(a) for a in activations]}")
        if clip is not None and (isinstance(clip, (bool, str, bytes)) or
                                 not isinstance(clip, (int, float, np.number))):
            raise TypeError(f"clip must be a number, got {type(clip).__name__} {clip!r}")
        if clip is not None and not float(clip) > 0:
            raise ValueError(f"clip must be positive (it bounds the activations' inputs to "
                             f"[-clip, clip]), got {clip!r}")
        peepholes = peepholes or [None] * self.D
        out = []
        for d in range(self.D):
            mine = fns[d * k:(d + 1) * k]
            names = tuple(name for name, _, _ in mine)
            plain = clip is None and not input_forget and peepholes[d] is None
            if plain and self.kind == "rnn" and names[0] in RNN_CELLS:
                out.append((RNN_CELLS[names[0]], None))
            elif plain and names == DEFAULT_ACTIVATIONS[self.kind]:
                out.append((self.kind, None))
            else:
                out.append(("rnn_tanh" if self.kind == "rnn" else self.kind,
                            {"activations": mine, "clip": clip, "input_forget": input_forget,
                             "peepholes": peepholes[d]}))
        return out

    def run(self, options, c0, linear_before_reset, isa):
        # The weights reach the kernels as new arrays every call (ONNX's gate order to torch's):
        # keep_packed=False, else the calling thread's packed-weight cache kept their dead forms,
        # up to its 256 MiB (50 nodes: full within 4000 calls).
        rows = slice(None) if self.rows is None else self.rows
        x = self.x if self.rows is None else np.ascontiguousarray(self.x[:, rows])
        h0 = [np.ascontiguousarray(self.h0[d][rows]) for d in range(self.D)]
        c0s = [None if c0 is None else np.ascontiguousarray(c0[d][rows]) for d in range(self.D)]
        weights = []
        for d, (cell, _) in enumerate(options):
            b_ih, b_hh = np.split(self.b[d], 2)
            weights.append(tuple(from_onnx_gates(a, cell) for a in
                                 (self.w[d], self.r[d], b_ih, b_hh)) + (None,))
        cells, onnx = [cell for cell, _ in options], [o for _, o in options]
        if self.D == 2 and functional.directions_may_pair():  # (on two threads, side by side)
            outs = functional.forward_directions(
                cells, x, h0, c0s, weights, lengths=self.lengths,
                linear_before_reset=linear_before_reset, training=False, isa=isa,
                keep_packed=False, onnx=onnx)
        else:
            outs = [functional.forward(
                cells[d], x, h0[d], c0s[d], *weights[d], lengths=self.lengths,
                reverse=self.reverses[d], linear_before_reset=linear_before_reset,
                training=False, isa=isa, onnx=onnx[d], keep_packed=False)
                for d in range(self.D)]
        ys, hns, cns = ([out[i] for out in outs] for i in range(3))
        Y, Y_h = np.stack(ys, axis=1), np.stack(hns)  # (T, D, B, H), (D, B, H)
        Y_c = np.stack(cns) if c0 is not None else None
        if self.rows is not None:  # rows of length 0: zeros everywhere
            Y, Y_h, Y_c = (None if o is None else self.all_rows(o, axis)
                           for o, axis in ((Y, 2), (Y_h, 1), (Y_c, 1)))
        if self.layout:
            Y, Y_h = Y.transpose(2, 0, 1, 3), Y_h.transpose(1, 0, 2)
            Y_c = None if Y_c is None else Y_c.transpose(1, 0, 2)
        outs = (Y, Y_h) if Y_c is None else (Y, Y_h, Y_c)
        return tuple(np.ascontiguousarray(o).astype(self.dtype, copy=False) for o in outs)
