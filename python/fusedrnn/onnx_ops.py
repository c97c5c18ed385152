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
hold each row's state after its last step (for "reverse", after its first time step).

Every float input shares one dtype, float32 or float64 (ONNX's type T); sequence_lens are
integers in 1..T. What the kernels do not compute is refused with a reason, never approximated:
activations other than ONNX's defaults (the RNN takes Tanh or Relu, per direction), activation
alpha or beta, ``clip``, ``input_forget=1`` and peepholes ``P`` other than zeros. ``isa`` runs one
build of the kernels (see :mod:`fusedrnn.functional`).
"""
import numpy as np

from . import functional
from ._validate import FLOAT_DTYPES, as_lengths, check_shape
from .onnx_layout import ONNX_GATES, from_onnx_gates

DIRECTIONS = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}
# ONNX's default activations per direction; the LSTM and GRU kernels compute only these.
DEFAULT_ACTIVATIONS = {"lstm": ("sigmoid", "tanh", "tanh"), "gru": ("sigmoid", "tanh")}
RNN_CELLS = {"tanh": "rnn_tanh", "relu": "rnn_relu"}
# The node's inputs in ONNX's order, per op.
INPUTS = {
    "LSTM": ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"),
    "GRU": ("X", "W", "R", "B", "sequence_lens", "initial_h"),
    "RNN": ("X", "W", "R", "B", "sequence_lens", "initial_h"),
}
COMMON_ATTRIBUTES = ("direction", "layout", "hidden_size", "activations", "activation_alpha",
                     "activation_beta", "clip")
ATTRIBUTES = {"LSTM": COMMON_ATTRIBUTES + ("input_forget",),
              "GRU": COMMON_ATTRIBUTES + ("linear_before_reset",),
              "RNN": COMMON_ATTRIBUTES}


def lstm(X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None, *,
         direction="forward", layout=0, hidden_size=None, activations=None,
         activation_alpha=None, activation_beta=None, clip=None, input_forget=0, isa=None):
    """ONNX's LSTM: (Y, Y_h, Y_c)."""
    if input_forget:
        raise ValueError("input_forget=1 (coupled input and forget gates) is not computed by "
                         "fusedrnn's LSTM, which is torch.nn's")
    _refuse_unmapped(activation_alpha, activation_beta, clip)
    op = _Node("lstm", X, W, R, B, sequence_lens, initial_h, direction, layout, hidden_size)
    cells = op.cells(activations)
    c0 = op.state("initial_c", initial_c)
    if P is not None:
        p = op.float_input("P", P)
        check_shape("P", p, (op.D, 3 * op.H))
        if p.any():
            raise ValueError("P (peepholes) must be zeros or absent: fusedrnn's LSTM, torch.nn's, "
                             "has no peepholes")
    return op.run(cells, c0, linear_before_reset=True, isa=isa)


def gru(X, W, R, B=None, sequence_lens=None, initial_h=None, *, direction="forward", layout=0,
        hidden_size=None, activations=None, activation_alpha=None, activation_beta=None,
        clip=None, linear_before_reset=0, isa=None):
    """ONNX's GRU: (Y, Y_h). ``linear_before_reset`` 0 (ONNX's default) is the original GRU,
    1 torch.nn's."""
    _refuse_unmapped(activation_alpha, activation_beta, clip)
    if linear_before_reset not in (0, 1):  # True and False compare equal to 1 and 0
        raise ValueError(f"linear_before_reset must be 0 or 1, got {linear_before_reset!r}")
    op = _Node("gru", X, W, R, B, sequence_lens, initial_h, direction, layout, hidden_size)
    return op.run(op.cells(activations), None, bool(linear_before_reset), isa)


def rnn(X, W, R, B=None, sequence_lens=None, initial_h=None, *, direction="forward", layout=0,
        hidden_size=None, activations=None, activation_alpha=None, activation_beta=None,
        clip=None, isa=None):
    """ONNX's RNN: (Y, Y_h). ``activations``: "Tanh" (the default) or "Relu" per direction."""
    _refuse_unmapped(activation_alpha, activation_beta, clip)
    op = _Node("rnn", X, W, R, B, sequence_lens, initial_h, direction, layout, hidden_size)
    return op.run(op.cells(activations), None, True, isa)


def run_node(node, inputs, isa=None):
    """An ONNX ``NodeProto`` of op LSTM, GRU or RNN run on ``inputs``: a dict by input name, or
    a sequence in the node's input order (None or a missing name for an absent optional input).
    Returns {output name: array} for the outputs the node names."""
    op = getattr(node, "op_type", None)
    if op not in INPUTS or getattr(node, "domain", "") not in ("", "ai.onnx"):
        raise ValueError(f"node must be an ONNX LSTM, GRU or RNN node, got op_type {op!r}")
    from onnx import helper  # the caller has a NodeProto, so onnx is installed

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    unknown = sorted(set(attrs) - set(ATTRIBUTES[op]))
    if unknown:
        raise ValueError(f"{op} has no attribute(s) {unknown}: ONNX's are {list(ATTRIBUTES[op])}")
    names = list(node.input)
    if len(names) > len(INPUTS[op]):
        raise ValueError(f"{op} takes at most {len(INPUTS[op])} inputs {INPUTS[op]}, "
                         f"the node names {len(names)}")
    if isinstance(inputs, dict):
        missing = [n for n in names if n and n not in inputs]
        values = [inputs.get(n) if n else None for n in names]
    else:
        values = list(inputs)
        if len(values) > len(names):
            raise ValueError(f"inputs has {len(values)} values for the node's {len(names)} inputs")
        missing = [n for n in names[len(values):] if n]
        values = [v if n else None for n, v in zip(names, values)]
    if missing:
        raise ValueError(f"inputs has no value for the node's input(s) {missing}")
    args = dict(zip(INPUTS[op], values))
    outputs = {"LSTM": lstm, "GRU": gru, "RNN": rnn}[op](**args, **attrs, isa=isa)
    return {name: out for name, out in zip(node.output, outputs) if name}


def _refuse_unmapped(activation_alpha, activation_beta, clip):
    if any(v is not None and len(v) for v in (activation_alpha, activation_beta)):
        raise ValueError("activation_alpha and activation_beta are not supported: the kernels "
                         "compute ONNX's default activations (and the RNN's Relu), which take none")
    if clip is not None:
        raise ValueError(f"clip={clip!r} is not supported: the kernels do not clip the gates' "
                         "inputs (torch.nn's cells have no clip)")


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


class _Node:
    """One node's inputs checked against each other, in the kernels' layout: x (T, B, I) and the
    states (D, B, H) whatever the node's layout."""

    def __init__(self, kind, X, W, R, B, sequence_lens, initial_h, direction, layout,
                 hidden_size):
        self.kind, self.G = kind, len(ONNX_GATES[kind])
        direction = _text(direction)
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
        self.reverses = DIRECTIONS[direction]
        self.D = len(self.reverses)
        if layout not in (0, 1):
            raise ValueError(f"layout must be 0 (sequence first) or 1 (batch first), got "
                             f"{layout!r}")
        self.layout = layout
        x = np.asarray(X) if X is not None else None
        if x is None or x.dtype not in FLOAT_DTYPES:
            raise TypeError("X must be a float32 or float64 array, got "
                            f"{'None' if x is None else x.dtype.name}")
        self.dtype = x.dtype
        axes = "(B, T, input_size)" if layout else "(T, B, input_size)"
        if x.ndim != 3:
            raise ValueError(f"X must have 3 dimensions {axes}, got shape {x.shape}")
        self.x = np.ascontiguousarray(np.swapaxes(x, 0, 1) if layout else x)
        self.T, self.B, I = self.x.shape
        if self.T == 0:
            raise ValueError(f"X must have at least one time step, got shape {x.shape} {axes}")
        r = self.float_input("R", R)
        if r.ndim != 3 or r.shape[0] != self.D:
            raise ValueError(f"R must have shape (num_directions={self.D}, {self.G}*hidden_size, "
                             f"hidden_size), got {r.shape}")
        self.H = H = r.shape[2]
        if hidden_size is not None and hidden_size != H:
            raise ValueError(f"hidden_size={hidden_size} disagrees with R's shape {r.shape}")
        check_shape("R", r, (self.D, self.G * H, H))
        w = self.float_input("W", W)
        check_shape("W", w, (self.D, self.G * H, I))
        if B is None:
            b = np.zeros((self.D, 2 * self.G * H), self.dtype)
        else:
            b = self.float_input("B", B)
            check_shape("B", b, (self.D, 2 * self.G * H))
        self.w, self.r, self.b = w, r, b
        self.h0 = self.state("initial_h", initial_h)
        lens = None
        if sequence_lens is not None:
            lens = as_lengths(sequence_lens, self.T, self.B, name="sequence_lens")
            if np.all(lens == self.T):
                lens = None  # every row the whole sequence: the kernels' path without lengths
        self.lengths = lens

    def float_input(self, name, value):
        if value is None:
            raise TypeError(f"{name} is required: an array of X's dtype {self.dtype.name}")
        a = np.asarray(value)
        if a.dtype != self.dtype:
            raise TypeError(f"{name} must have X's dtype {self.dtype.name} (ONNX's type T), got "
                            f"{a.dtype.name}")
        return a

    def state(self, name, value):
        """initial_h or initial_c as (D, B, H), zeros when absent."""
        if value is None:
            return np.zeros((self.D, self.B, self.H), self.dtype)
        a = self.float_input(name, value)
        check_shape(name, a, (self.B, self.D, self.H) if self.layout else (self.D, self.B, self.H))
        return np.swapaxes(a, 0, 1) if self.layout else a

    def cells(self, activations):
        """The kernels' cell per direction, from ONNX's activations (None: the defaults)."""
        if self.kind == "rnn":
            names = ("tanh",) * self.D if activations is None else \
                tuple(_text(a).lower() for a in activations)
            if len(names) == 1 and self.D == 2:
                names = names * 2  # one given for both directions, as ONNX Runtime reads it
            if len(names) != self.D or not set(names) <= set(RNN_CELLS):
                raise ValueError(f"activations must be Tanh or Relu, one per direction ({self.D}),"
                                 f" got {list(activations)}")
            return [RNN_CELLS[n] for n in names]
        if activations is not None:
            names = tuple(_text(a).lower() for a in activations)
            default = DEFAULT_ACTIVATIONS[self.kind]
            if names not in (default, default * self.D):
                raise ValueError(f"activations must be ONNX's defaults {list(default)} per "
                                 f"direction: the {self.kind.upper()} kernels compute only those, "
                                 f"got {list(activations)}")
        return [self.kind] * self.D

    def run(self, cells, c0, linear_before_reset, isa):
        ys, hns, cns = [], [], []
        for d, (cell, reverse) in enumerate(zip(cells, self.reverses)):
            b_ih, b_hh = np.split(self.b[d], 2)
            y, hn, cn, _ = functional.forward(
                cell, self.x, np.ascontiguousarray(self.h0[d]),
                None if c0 is None else np.ascontiguousarray(c0[d]),
                from_onnx_gates(self.w[d], cell), from_onnx_gates(self.r[d], cell),
                from_onnx_gates(b_ih, cell), from_onnx_gates(b_hh, cell),
                lengths=self.lengths, reverse=reverse, linear_before_reset=linear_before_reset,
                training=False, isa=isa)
            ys.append(y)
            hns.append(hn)
            cns.append(cn)
        Y, Y_h = np.stack(ys, axis=1), np.stack(hns)  # (T, D, B, H), (D, B, H)
        Y_c = np.stack(cns) if c0 is not None else None
        if self.layout:
            Y, Y_h = Y.transpose(2, 0, 1, 3), Y_h.transpose(1, 0, 2)
            Y_c = None if Y_c is None else Y_c.transpose(1, 0, 2)
        outs = (Y, Y_h) if Y_c is None else (Y, Y_h, Y_c)
        return tuple(np.ascontiguousarray(o) for o in outs)
