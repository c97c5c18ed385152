"""What the NumPy layers (``layers.py``) and the torch adapter (``torch.py``) share.

- ``Spec``: the architecture of a stacked RNN (cell, sizes, layers, directions, options) and
  the torch.nn parameter names and shapes it implies.
- ``check_config``: the constructor checks, with errors that name the argument.
- ``stack_forward`` / ``stack_backward``: every layer and direction, one call of
  ``fusedrnn.functional`` each (the kernels loop over time), with dropout between layers; a
  unidirectional stack without lengths or dropout runs forward as one ``forward_stack`` call.

Everything here is NumPy; nothing imports torch.
"""
import numbers
import warnings

import numpy as np

from . import functional as F
from ._validate import FLOAT_DTYPES, GATES, ShapeError, TorchValueTypeError, made_here

CELLS = tuple(GATES)          # "rnn_tanh", "rnn_relu", "lstm", "gru"
_PARAM_KEYS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")   # torch's order


class Spec:
    """Architecture of a stacked (and possibly bidirectional) RNN, as torch.nn.RNNBase holds it."""

    __slots__ = ("cell", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                 "dropout", "bidirectional", "proj_size", "linear_before_reset", "_names")

    def __init__(self, cell, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, linear_before_reset=True):
        self.cell = cell
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.linear_before_reset = linear_before_reset
        # Every layer's and direction's parameter names, made once: the per-call f-strings were
        # a tenth of a small call's Python time.
        self._names = tuple(tuple(self.param_name(key, k, d) for key in _PARAM_KEYS)
                            for k in range(num_layers) for d in range(self.num_directions))

    def replaced(self, **changes):
        """A copy with the given fields changed."""
        fields = {k: getattr(self, k) for k in self.__slots__[:-1]}
        fields.update(changes)
        return Spec(**fields)

    def __repr__(self):
        # Stable across calls: torch.jit.trace compares the graphs of two runs, and the torch
        # adapter's op shows its Spec there.
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__[:-1])
        return f"Spec({fields})"

    # Pickle protocols 0 and 1 (copyreg) refuse a class with __slots__ and no __getstate__ of its
    # own: a layer, which holds a Spec, would not pickle there, where torch.nn's modules do.
    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    @property
    def output_size(self):
        """H_out: the width of h (proj_size with projections, else hidden_size)."""
        return self.proj_size or self.hidden_size

    @property
    def gates(self):
        return GATES[self.cell]

    def layer_input_size(self, k):
        return self.input_size if k == 0 else self.num_directions * self.output_size

    def param_name(self, key, k, d):
        return f"{key}_l{k}{'_reverse' if d else ''}"

    def layer_param_names(self, k, d):
        """Names of (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr) of layer k, direction d."""
        return self._names[k * self.num_directions + d]

    def param_shapes(self):
        """{name: shape} in torch's order (layer, direction, then w_ih, w_hh, b_ih, b_hh, w_hr)."""
        G, H, H_out = self.gates, self.hidden_size, self.output_size
        shapes = {}
        for k in range(self.num_layers):
            for d in range(self.num_directions):
                full = {"weight_ih": (G * H, self.layer_input_size(k)),
                        "weight_hh": (G * H, H_out),
                        "bias_ih": (G * H,), "bias_hh": (G * H,), "weight_hr": (H_out, H)}
                for key in _PARAM_KEYS:
                    if key.startswith("bias") and not self.bias:
                        continue
                    if key == "weight_hr" and not self.proj_size:
                        continue
                    shapes[self.param_name(key, k, d)] = full[key]
        return shapes

    def state_shapes(self, B):
        """Shapes of (h, c) for a batch of B: ((L*D, B, H_out), (L*D, B, H))."""
        LD = self.num_layers * self.num_directions
        return (LD, B, self.output_size), (LD, B, self.hidden_size)


# ----------------------------------------------------------------------------------------------
# Constructor checks

def check_param_shapes(spec, params):
    """Raises ShapeError naming the first parameter of {torch name: array} whose shape is not the
    one ``spec`` implies."""
    for name, shape in spec.param_shapes().items():
        p = params.get(name)
        if p is not None and tuple(p.shape) != shape:
            raise ShapeError(f"{name} must have shape {shape}, got {tuple(p.shape)}")


def _check_int(name, value, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


# torch's float dtypes by name, so a drop-in call with ``dtype=torch.float64`` works without
# importing torch here.
_TORCH_DTYPES = {"torch.float32": np.dtype(np.float32), "torch.float64": np.dtype(np.float64)}


def check_dtype(dtype):
    """The layer dtype as np.dtype: float32 or float64, anything else refused. None is float32,
    torch's default dtype (np.dtype(None) would be float64: a drop-in call passing torch's
    ``dtype=None`` would get a float64 layer), and torch.float32 / torch.float64 are theirs."""
    if dtype is None:
        return np.dtype(np.float32)
    if type(dtype).__module__ == "torch" and str(dtype) in _TORCH_DTYPES:
        return _TORCH_DTYPES[str(dtype)]
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        # (a big-endian float32's name is "float32": "must be float32, got float32" otherwise)
        got = dt.name if dt.isnative else f"{dt.str} (not native byte order)"
        raise TypeError(f"dtype must be float32 or float64, got {got}")
    return dt


def check_device(device):
    """torch.nn's ``device`` argument: None or the CPU (``"cpu"``, ``"cpu:0"``,
    ``torch.device("cpu")``), the only device fusedrnn runs on; any other is refused."""
    if device is None:
        return
    if isinstance(device, str) or type(device).__module__ == "torch":
        if str(device).split(":")[0] == "cpu":
            return
        raise ValueError(f"device must be None or 'cpu' (fusedrnn runs on the CPU), got "
                         f"{str(device)!r}")
    raise TypeError(f"device must be None, 'cpu' or torch.device('cpu'), got "
                    f"{type(device).__name__}")


def check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None or an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed)


def check_dropout(dropout):
    if isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, numbers.Real):
        raise TorchValueTypeError(f"dropout must be a number in [0, 1], "
                                  f"got {type(dropout).__name__}")
    if not 0 <= dropout <= 1:
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout}")
    return float(dropout)


def check_config(cell, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, linear_before_reset=True):
    """Validate constructor arguments as torch.nn does (errors name the argument); a Spec."""
    input_size = _check_int("input_size", input_size, 1)
    hidden_size = _check_int("hidden_size", hidden_size, 1)
    num_layers = _check_int("num_layers", num_layers, 1)
    bias = check_bool("bias", bias)
    batch_first = check_bool("batch_first", batch_first)
    bidirectional = check_bool("bidirectional", bidirectional)
    linear_before_reset = check_bool("linear_before_reset", linear_before_reset)
    dropout = check_dropout(dropout)
    proj_size = _check_int("proj_size", proj_size, 0)
    if proj_size >= hidden_size:
        raise ValueError(f"proj_size must be smaller than hidden_size ({hidden_size}), "
                         f"got {proj_size}")
    if dropout > 0 and num_layers == 1:
        # torch.nn warns the same way (and with the same words).
        warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                      "non-zero dropout expects num_layers greater than 1, but got "
                      f"dropout={dropout} and num_layers={num_layers}", UserWarning, stacklevel=3)
    return Spec(cell, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                bidirectional, proj_size, linear_before_reset)


# ----------------------------------------------------------------------------------------------
# The stack: layers x directions, one kernel call each

def dropout_active(spec, training):
    return training and spec.dropout > 0 and spec.num_layers > 1


def numpy_mask_maker(rng, p, dtype):
    """Inverted-dropout masks (0 or 1/(1-p)) drawn from the Generator ``rng``."""
    def make(shape):
        if p >= 1:
            return np.zeros(shape, dtype)
        keep = rng.random(shape, dtype=dtype) >= p
        return keep.astype(dtype) * dtype.type(1.0 / (1.0 - p))
    return make


class Saved:
    """What a training forward of the whole stack keeps for backward: per layer, the kernel
    contexts of each direction and the dropout mask applied to that layer's output (or None)."""

    __slots__ = ("ctxs", "masks", "order", "__weakref__")

    def __init__(self):
        self.ctxs = []
        self.masks = []
        self.order = None  # the batch's rows as the kernels ran them (descending_order), or None

    def __reduce__(self):
        # Reached through the torch adapter's token when saved-tensor hooks save to disk.
        raise TypeError("fusedrnn's saved training state (the kernels' contexts) cannot be "
                        "pickled or saved: saved_tensors_hooks that move the saved tensors to "
                        "disk are not supported by fusedrnn.torch")


def stack_forward(spec, params, x, h0=None, c0=None, lengths=None, save=False, make_mask=None,
                  isa=None, checked=False, frozen=0, keep_packed=True, save_from=0):
    """Run every layer and direction.

    x (T, B, I) of the parameters' dtype; h0 (L*D, B, H_out) or None (zeros); c0 (L*D, B, H) or
    None (zeros, LSTM only); params {torch name: array}; lengths (B,) int64 or None;
    ``save``: keep the kernels' contexts (training); ``make_mask(shape)``: dropout masks between
    layers, or None for no dropout; ``checked``: x, h0, c0, lengths and params are already as
    functional.check_layer_args would make them (the NumPy layers), or at least of one dtype
    with x's, h0's and the lengths' shapes checked (the torch adapter: the kernels check every
    shape again and copy an array that is not C-contiguous), so each layer call skips those
    checks (a fifth of a small call's Python time); ``frozen``: 0, or the id of a frozen
    layer's read-only parameters (with ``checked`` only; see functional.forward_checked);
    ``keep_packed=False``: params are copies made for this call (see functional.forward);
    ``save_from``: with ``save``, the layers below it keep no context (None in the Saved), as
    the backward will not run through them (the torch adapter: nothing below that layer needs a
    gradient), yet give a training call's bits, which the layers above read. Returns y (T, B,
    D*H_out), hn (L*D, B, H_out), cn (L*D, B, H) or None, and a ``Saved`` (None unless
    ``save``).
    """
    order = descending_order(lengths, x.shape[1] if getattr(x, "ndim", 0) == 3 else 0)
    if order is not None:
        x, lengths = x[:, order], lengths[order]
        h0, c0 = (None if a is None else a[:, order] for a in (h0, c0))
    try:
        y, hn, cn, saved = _stack_forward(spec, params, x, h0, c0, lengths, save, make_mask, isa,
                                          checked, frozen, keep_packed, save_from)
    except ValueError:  # (ShapeError, or the kernels' own shape checks under ``checked``)
        # Each layer's call names its weights w_ih, w_hh, ... and may blame h0 for a weight
        # whose rows are wrong (a torch module's weight swapped through .data): where a
        # parameter is at fault, the error names it as torch does.
        check_param_shapes(spec, params)
        raise
    if order is None:
        return y, hn, cn, saved
    back = np.argsort(order)
    if saved is not None:
        saved.order = order
    return y[:, back], hn[:, back], None if cn is None else cn[:, back], saved


def descending_order(lengths, B):
    """The batch's B rows by length, longest first (stable), or None where they are so already
    (or there are no lengths, or lengths the kernels will refuse, naming what is wrong). The
    kernels skip a step's products for rows past their length where those lie together at the
    batch's end (csrc/sequence/forward.h, cell_phase), as torch.nn runs a PackedSequence sorted:
    so the stack runs its rows in this order, and gives every output back in the caller's.
    100x64x256x256, lengths 50..100 shuffled, 1 thread, inference, frozen, medians: LSTM 62.0 ms
    in the caller's order, 53.4 so; GRU 47.7, 41.1."""
    if lengths is None or B < 2:
        return None
    lengths = np.asarray(lengths)
    if lengths.shape != (B,) or lengths.dtype.kind not in "iu":
        return None
    if np.all(lengths[:-1] >= lengths[1:]):
        return None
    return np.argsort(-lengths, kind="stable")


def _stack_forward(spec, params, x, h0, c0, lengths, save, make_mask, isa, checked, frozen,
                   keep_packed, save_from):
    dtype = x.dtype
    T, B, _ = x.shape
    D = spec.num_directions
    h_shape, c_shape = spec.state_shapes(B)
    lstm = spec.cell == "lstm"
    if h0 is None:
        h0 = np.zeros(h_shape, dtype)
    if lstm and c0 is None:
        c0 = np.zeros(c_shape, dtype)
    single = spec.num_layers * D == 1       # hn, cn: views of the one layer's own arrays
    hn = None if single else np.empty(h_shape, dtype)
    cn = np.empty(c_shape, dtype) if lstm and not single else None
    saved = Saved() if save else None
    layer_in = np.ascontiguousarray(x)      # one copy here rather than one per direction
    # Training keeps each layer's input for the backward's dW_ih. Layers above the first read
    # arrays of ours, which the contexts keep as they are (keep_x); the first reads the caller's
    # x, whose buffer may be reused before backward, so a context keeps x packed. Both
    # directions would each keep one: there the stack keeps one copy of x for both.
    own_input = save and D == 2 and save_from == 0
    if own_input and not made_here(layer_in, x):  # (an ndarray subclass's is a view of x)
        layer_in = layer_in.copy()
    if D == 1 and spec.num_layers > 1 and make_mask is None and lengths is None:
        return _one_way_stack(spec, params, layer_in, h0, c0, hn, cn, saved, isa, checked, frozen,
                              keep_packed, save_from)
    pair = D == 2 and F.directions_may_pair()
    for k in range(spec.num_layers):
        outs, ctxs = [], []
        if pair:
            i = 2 * k
            runs = F.forward_directions(
                spec.cell, layer_in, h0[i:i + 2], c0[i:i + 2] if lstm else [None, None],
                [tuple(map(params.get, spec.layer_param_names(k, d))) for d in range(2)],
                lengths=lengths, linear_before_reset=spec.linear_before_reset,
                training=save and k >= save_from, isa=isa, checked=checked, frozen=frozen,
                keep_x=k > 0 or own_input, keep_packed=keep_packed, training_bits=save)
        else:
            run = F.forward_checked if checked else F.forward
            extra = {"frozen": frozen} if frozen else {}  # F.forward (unchecked) takes none
            runs = []
            for d in range(D):
                w_ih, w_hh, b_ih, b_hh, w_hr = map(params.get, spec.layer_param_names(k, d))
                runs.append(run(spec.cell, layer_in, h0[k * D + d],
                                c0[k * D + d] if lstm else None, w_ih, w_hh, b_ih, b_hh, w_hr,
                                lengths=lengths, reverse=bool(d),
                                linear_before_reset=spec.linear_before_reset,
                                training=save and k >= save_from, training_bits=save,
                                isa=isa, keep_x=k > 0 or own_input, keep_packed=keep_packed,
                                **extra))  # y: ours
        for d, (y, h, c, ctx) in enumerate(runs):
            i = k * D + d
            if single:
                hn, cn = h[None], (c[None] if lstm else None)
            else:
                hn[i] = h
                if lstm:
                    cn[i] = c
            outs.append(y)
            ctxs.append(ctx)
        y = outs[0] if D == 1 else np.concatenate(outs, axis=-1)
        mask = None
        if make_mask is not None and k < spec.num_layers - 1:
            mask = make_mask(y.shape)
            y = y * mask
        if save:
            saved.ctxs.append(ctxs)
            saved.masks.append(mask)
        layer_in = y
    return layer_in, hn, cn, saved


def _one_way_stack(spec, params, x, h0, c0, hn, cn, saved, isa, checked, frozen, keep_packed,
                   save_from):
    """stack_forward of a unidirectional stack without lengths or dropout: one kernel call for
    every layer (F.forward_stack), which may run the layers side by side."""
    L, lstm = spec.num_layers, spec.cell == "lstm"
    layers = [tuple(map(params.get, spec.layer_param_names(k, 0))) for k in range(L)]
    outs = F.forward_stack(spec.cell, x, list(h0), list(c0) if lstm else [None] * L, layers,
                           linear_before_reset=spec.linear_before_reset,
                           training=saved is not None, isa=isa, checked=checked, frozen=frozen,
                           keep_packed=keep_packed, train_from=save_from)
    for k, (_, h, c, ctx) in enumerate(outs):
        hn[k] = h
        if lstm:
            cn[k] = c
        if saved is not None:
            saved.ctxs.append([ctx])
            saved.masks.append(None)
    return outs[-1][0], hn, cn, saved


def _weights_needed(spec, weight_grads, k, d):
    """Whether layer k, direction d has a parameter among ``weight_grads`` (None: all)."""
    return weight_grads is None or any(
        name in weight_grads for name in spec.layer_param_names(k, d))


def lowest_layer_backward_runs(spec, need_input, weight_grads):
    """The lowest layer a backward runs through: every one where dx or dh0 is needed
    (``need_input``), else the lowest with a parameter among ``weight_grads`` (None: all), as
    dx flows into the layer below; num_layers where none is needed."""
    if need_input:
        return 0
    return next((k for k in range(spec.num_layers) for d in range(spec.num_directions)
                 if _weights_needed(spec, weight_grads, k, d)), spec.num_layers)


# A context a consuming backward has run through (stack_backward drops it there).
_CONSUMED = "consumed"


def stack_backward(spec, saved, dy, dhn=None, dcn=None, consume=False, grads_into=None,
                   add_into=True, params=None, *, need_dx=True, need_dh0=True, weight_grads=None):
    """BPTT through the stack saved by ``stack_forward``; ``consume``: the last backward through
    ``saved`` (see functional.backward), which drops each context as its backward ends (a layer's
    saved state is not held through the backward of the layers below, as torch's autograd frees
    a node's); ``grads_into``: None, or {torch name: array} that the
    kernels add every layer's gradients into, or write them over with ``add_into=False`` (see
    functional.backward), returned as the grads; ``params``: None (the weights the forward
    read), or {torch name: array} with the forward's weight values (functional.backward's
    ``weights``).

    What the caller needs, as torch's autograd knows it: ``need_dx``, ``need_dh0`` (dh0 and
    dc0), ``weight_grads`` (None: every parameter's; else the names of those needed). A layer
    direction whose parameters are none of them skips its weight products, layer 0 skips dx's
    without need_dx, a direction that gives none of them is not run, nor are the layers below
    the lowest one that needs anything.

    dy (T, B, D*H_out); dhn (L*D, B, H_out) or None; dcn (L*D, B, H) or None. Returns
    dx (T, B, I) (None without need_dx), dh0 (L*D, B, H_out), dc0 (L*D, B, H) or None (both
    None without need_dh0), and {torch name: gradient} of the parameters computed.
    """
    if saved.order is not None:   # (the rows as the forward ran them: stack_forward)
        order = saved.order
        dy, dhn, dcn = (None if a is None else a[:, order] for a in (dy, dhn, dcn))
        dx, dh0, dc0, grads = _stack_backward(spec, saved, dy, dhn, dcn, consume, grads_into,
                                              add_into, params, need_dx, need_dh0, weight_grads)
        back = np.argsort(order)
        return tuple(None if a is None else a[:, back] for a in (dx, dh0, dc0)) + (grads,)
    return _stack_backward(spec, saved, dy, dhn, dcn, consume, grads_into, add_into, params,
                           need_dx, need_dh0, weight_grads)


def _named_as_torch(error, names):
    """The kernels' WeightsChangedError again, naming the layer's parameter as torch does
    (weight_hh_l1_reverse, not weight_hh)."""
    name = names[error.weight]
    named = type(error)(name + str(error)[len(error.weight):])
    named.weight, named.direction = name, error.direction
    return named


def _directions_run(spec, weight_grads, k, dx_needed, need_dh0, pair):
    """Layer k's backward: whether each direction's weights need gradients, the directions
    that run (not a frozen direction above frozen layers) and whether they run as one pair
    call (both, one kind of call)."""
    D = spec.num_directions
    needed = [_weights_needed(spec, weight_grads, k, d) for d in range(D)]
    runs = [d for d in range(D) if dx_needed or need_dh0 or needed[d]]
    return needed, runs, pair and len(runs) == 2 and needed[0] == needed[1]


def _direction_weights(spec, params, k, d):
    """Layer k, direction d: its parameters' names by the kernels' keys ("weight_ih":
    "weight_ih_l0", ...), and the weights its backward reads: None (the forward's arrays) or
    params' (functional.backward's ``weights``)."""
    names = dict(zip(_PARAM_KEYS, spec.layer_param_names(k, d)))
    return names, None if params is None else tuple(
        params.get(names[key]) for key in ("weight_ih", "weight_hh", "weight_hr"))


def _check_weights_first(spec, saved, params, lowest):
    """Every layer direction's weights from ``lowest`` up against what its forward read, before
    any of their backwards runs: each kernel call checks its own, but where one of several
    refused, those that ran before it would have added their gradients already and consumed
    their saved state."""
    for k in range(lowest, spec.num_layers):
        for d in range(spec.num_directions):
            ctx = saved.ctxs[k][d]
            if ctx is None or ctx is _CONSUMED:
                continue  # (the layer's own call says why)
            names, weights = _direction_weights(spec, params, k, d)
            try:
                F.check_weights(ctx, weights)
            except F.WeightsChangedError as error:
                raise _named_as_torch(error, names) from None


def _stack_backward(spec, saved, dy, dhn, dcn, consume, grads_into, add_into, params, need_dx,
                    need_dh0, weight_grads):
    D, H_out = spec.num_directions, spec.output_size
    lstm = spec.cell == "lstm"
    T, B, _ = dy.shape
    h_shape, c_shape = spec.state_shapes(B)
    dh0 = np.empty(h_shape, dy.dtype) if need_dh0 else None
    dc0 = np.empty(c_shape, dy.dtype) if lstm and need_dh0 else None
    lowest = lowest_layer_backward_runs(spec, need_dx or need_dh0, weight_grads)
    pair = D == 2 and F.directions_may_pair()
    # One kernel call (one layer, one direction or both paired) checks its weights before it
    # runs anything; several are checked first, all of them.
    top = _directions_run(spec, weight_grads, lowest, need_dx, need_dh0, pair)
    if spec.num_layers - lowest > 1 or len(top[1]) > 1 and not top[2]:
        _check_weights_first(spec, saved, params, lowest)
    grads = {}
    d_out = dy
    for k in reversed(range(lowest, spec.num_layers)):
        if saved.masks[k] is not None:
            d_out = d_out * saved.masks[k]
        dx_needed = k > lowest or need_dx  # (into layer k - 1, which runs)
        needed, runs, paired = _directions_run(spec, weight_grads, k, dx_needed, need_dh0, pair)
        dx = None

        def arguments(d):
            """Direction d's backward arguments: (names, ctx, dy, dhn, dcn, into, weights)."""
            i = k * D + d
            if saved.ctxs[k][d] is _CONSUMED:
                raise RuntimeError("backward already ran through this saved state with "
                                   "consume=True, which frees it: run the forward again")
            if saved.ctxs[k][d] is None:  # (save_from above k: the forward said none would run)
                raise RuntimeError(
                    f"backward needs layer {k}'s saved state, which its forward did not keep: "
                    f"then neither the input, the initial state nor that layer's parameters "
                    f"needed a gradient")
            names, weights = _direction_weights(spec, params, k, d)
            return (names, saved.ctxs[k][d],
                    d_out if D == 1 else d_out[..., d * H_out:(d + 1) * H_out],
                    None if dhn is None else dhn[i], None if dcn is None else dcn[i],
                    None if grads_into is None else {
                        key: grads_into[name] for key, name in names.items()
                        if name in grads_into},
                    weights)

        def take(d, names, result, dx):
            """Direction d's results into dh0, dc0 and grads; returns the layer's dx so far."""
            dx_d, dh, dc, g = result
            i = k * D + d
            if consume:  # its saved state goes now, not after the layers below have run theirs
                saved.ctxs[k][d] = _CONSUMED
            if need_dh0:
                dh0[i] = dh
                if lstm:
                    dc0[i] = dc
            for key, value in g.items():
                grads[names[key]] = value
            if dx is None:
                return dx_d
            dx += dx_d  # (both directions give dx or neither: dx_needed is the layer's; dx_d are
            return dx   # fresh arrays from the kernel)

        if paired:
            (names0, *a0), (names1, *a1) = arguments(0), arguments(1)
            try:
                results = F.backward_directions(*([u, v] for u, v in zip(a0[:4], a1[:4])),
                                                consume=consume, grads_into=[a0[4], a1[4]],
                                                add_into=add_into, weights=[a0[5], a1[5]],
                                                need_dx=dx_needed, need_weight_grads=needed[0])
            except F.WeightsChangedError as error:
                raise _named_as_torch(error, (names0, names1)[error.direction]) from None
            del a0, a1  # (the contexts: a consumed state goes with them)
            for d, names, result in zip(runs, (names0, names1), results):
                dx = take(d, names, result, dx)
        else:
            for d in runs:
                names, ctx, dy_d, dhn_d, dcn_d, into, weights = arguments(d)
                try:
                    result = F.backward(ctx, dy_d, dhn_d, dcn_d, consume=consume,
                                        grads_into=into, add_into=add_into, weights=weights,
                                        need_dx=dx_needed, need_weight_grads=needed[d])
                except F.WeightsChangedError as error:
                    raise _named_as_torch(error, names) from None
                del ctx  # (its saved state goes before the other direction's backward)
                dx = take(d, names, result, dx)
        d_out = dx
    return (d_out if need_dx else None), dh0, dc0, grads
