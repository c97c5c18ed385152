"""One layer, one direction, on the C++ kernels.

Same signature and results as :mod:`fusedrnn.reference` (the NumPy oracle):

    y, hn, cn, ctx = forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr=None, lengths=None,
                             reverse=False, linear_before_reset=True, training=True)
    dx, dh0, dc0, grads = backward(ctx, dy, dhn=None, dcn=None, consume=False)
    (need_dx=False / need_weight_grads=False skip dx / the weight gradients: None / {})

Shapes: x (T, B, I); h0 (B, H_out), None for zeros; c0 (B, H) for "lstm" (None for zeros), else
None; w_ih (G*H, I); w_hh (G*H, H_out); b_ih, b_hh (G*H,) or None; w_hr (H_out, H) or None;
lengths (B,) in 1..T or None. ``ctx`` is None when ``training`` is False; ``consume=True`` marks
the last backward through it (the kernels then reuse its saved state; a later backward raises).
``grads`` has the keys "weight_ih", "weight_hh" and, where they exist, "bias_ih", "bias_hh",
"weight_hr".

Arrays must share one float dtype (float32 or float64); other layouts are copied to C order only
when needed and inputs are never modified. ``isa`` ("generic", "avx2", "avx512", "amx") runs one
build of the kernels instead of the one chosen at import (tests use it to cover every path; the
amx build, float32 products on AMX tiles, runs only where named: README, "Development").
"""
import numpy as np

from . import _C
from ._validate import check_layer_args, check_layer_params, check_shape, made_here

# Raised by backward where the weights it reads (w_ih, w_hh, w_hr; the forward's arrays, or
# ``weights``) are not the values its training forward read: changed in place in between, the
# gradients would be of neither model (torch.nn's autograd raises there too). A RuntimeError;
# ``weight`` names the weight ("weight_hh"), ``direction`` the pair's direction (0 or 1).
WeightsChangedError = _C.WeightsChangedError

CELL_CODES = {"rnn_tanh": 0, "rnn_relu": 1, "lstm": 2, "gru": 3}
# ONNX's activation functions by the kernels' codes (csrc/kernel_api.h, Activation).
ACTIVATION_CODES = {name: code for code, name in enumerate(
    ("sigmoid", "tanh", "relu", "affine", "leakyrelu", "thresholdedrelu", "scaledtanh",
     "hardsigmoid", "elu", "softsign", "softplus"))}
# Functions each cell takes under ONNX's options: f (RNN); f, g (GRU); f, g, h (LSTM).
ONNX_FUNCTIONS = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 2, "lstm": 3}


def forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr=None, lengths=None, reverse=False,
            linear_before_reset=True, training=True, isa=None, *, keep_x=False, onnx=None,
            keep_packed=True, training_bits=False):
    """``keep_x=True``: the training context keeps ``x`` itself rather than a copy of its own,
    for callers that never write to it before backward (the layers' own inner-layer inputs).
    ``onnx``: ONNX's cell options, as :func:`fusedrnn.reference.forward` takes them (inference
    only; fusedrnn.onnx_ops builds them from a node's attributes). ``keep_packed=False``: the
    weights are arrays made for this call alone (fusedrnn.onnx_ops's gates reordered, a
    low-precision module's casts): an inference call packs them for itself and keeps nothing in
    the calling thread's packed-weight cache, where forms of freed arrays would sit until that
    cache's budget pushed them out (see _C.forward). ``training_bits=True``: an inference call
    gives the bits a training call would (the kernels may take other steps in inference): a
    stack's layer below the ones a backward runs through, whose output they read."""
    args = check_layer_args(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
    _check_isa(isa)
    return forward_checked(cell, *args, reverse=reverse, linear_before_reset=linear_before_reset,
                           training=training, isa=isa, keep_x=keep_x or made_here(args[0], x),
                           onnx=_onnx_options(cell, onnx, args[0].dtype, args[3].shape[0]),
                           keep_packed=keep_packed, training_bits=training_bits)


def _check_isa(isa):
    if isa is not None and not isinstance(isa, str):
        raise TypeError(f"isa must be None or a name (\"generic\", \"avx2\", \"avx512\", "
                        f"\"amx\"), got {type(isa).__name__}")


def _onnx_options(cell, onnx, dtype, gate_rows):
    """ONNX's cell options as the kernels take them (see _C.forward), checked; or None."""
    if onnx is None:
        return None
    fns = list(onnx["activations"])
    if len(fns) != ONNX_FUNCTIONS[cell]:
        raise ValueError(f"onnx activations: {cell} takes {ONNX_FUNCTIONS[cell]} (f, g, h in "
                         f"order), got {len(fns)}")
    for name, _, _ in fns:
        if name not in ACTIVATION_CODES:
            raise ValueError(f"onnx activation {name!r} is not one of {list(ACTIVATION_CODES)}")
    codes = [(ACTIVATION_CODES[n], float(a), float(b)) for n, a, b in fns]
    codes += [(ACTIVATION_CODES["tanh"], 0.0, 0.0)] * (3 - len(codes))  # slots the cell leaves
    clip = onnx.get("clip")
    if clip is not None and not float(clip) > 0:
        raise ValueError(f"onnx clip must be positive, got {clip}")
    peepholes = onnx.get("peepholes")
    if peepholes is not None:
        peepholes = np.asarray(peepholes)
        if peepholes.dtype != dtype:
            raise TypeError(f"onnx peepholes must have x's dtype {dtype}, got {peepholes.dtype}")
        H = gate_rows // 4
        if cell != "lstm" or peepholes.shape != (3, H):
            raise ValueError(f"onnx peepholes must be (3, hidden_size={H}) for lstm (gates i, f, "
                             f"o), got shape {peepholes.shape} for {cell}")
        peepholes = np.ascontiguousarray(peepholes)
    return (codes, np.inf if clip is None else float(clip), bool(onnx.get("input_forget")),
            peepholes)


def forward_checked(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                    linear_before_reset, training, isa=None, keep_x=False, frozen=0, onnx=None,
                    keep_packed=True, training_bits=False):
    """forward() for arguments already as check_layer_args returns them (C-contiguous, one
    dtype, shapes checked): the layers, which check their inputs once and own their weights.
    The kernels check the shapes again, so nothing can read out of bounds. Unless ``keep_x``, a
    training context keeps a private copy of x, packed as the backward reads it: the caller may
    reuse its buffer between forward and backward (weights are the layer's own and are kept by
    reference). ``frozen``: 0, or the id of a frozen layer's read-only parameters (the layers'
    freeze(); see _C.forward). ``onnx``: ONNX's cell options as _onnx_options gives them.
    ``keep_packed``, ``training_bits``: as forward's."""
    # Every argument by position: pybind11 matches a keyword by name each call, 3 us of a
    # small call's ~20 (_C.pyi names them: isa, frozen, keep_x, onnx, keep_packed,
    # training_bits).
    y, hn, cn, ctx = _C.forward(CELL_CODES[cell], bool(linear_before_reset), bool(reverse),
                                bool(training), x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                isa, frozen, bool(keep_x), onnx, bool(keep_packed),
                                bool(training_bits))
    return y, hn, cn, (ctx if training else None)


def forward_stack(cell, x, h0, c0, layers, linear_before_reset=True, training=True, isa=None,
                  checked=False, frozen=0, keep_packed=True, train_from=0):
    """A unidirectional stack without lengths, bottom layer first, in one kernel call: layer k's
    input is layer k - 1's output, so on as many threads as layers the kernels run the layers
    side by side, each a step behind the one below (csrc/sequence/layer_pipeline.h); else layer
    by layer. Same results either way.

    h0, c0: per layer (c0 entries None except for "lstm"); layers: per layer (w_ih, w_hh, b_ih,
    b_hh, w_hr), as forward takes them. ``checked``: the arguments are already as
    check_layer_args / check_layer_params return them; ``frozen``, ``keep_packed``: as
    forward_checked's; ``train_from``: in training, the layers below it run as in inference
    (ctx None: no backward will run through them), with a training call's bits (forward's
    training_bits). Returns forward's (y, hn, cn, ctx) per layer; a y whose layer above keeps a
    context is read-only, since that context keeps it as its input x, which the backward
    reads."""
    L = len(layers)
    if not (len(h0) == len(c0) == L) or L == 0:
        raise ValueError(f"h0 and c0 need one entry per layer ({L}), got {len(h0)} and {len(c0)}")
    h0, c0, layers = list(h0), list(c0), _weight_tuples(layers, "layers")
    _check_isa(isa)
    given = x
    if not checked:
        x, h0[0], c0[0], *weights, _ = check_layer_args(cell, x, h0[0], c0[0], *layers[0], None)
        layers[0] = tuple(weights)
        for k in range(1, L):
            H_out = layers[k - 1][1].shape[1]
            h0[k], c0[k], *weights = check_layer_params(cell, x.dtype, x.shape[1], H_out, h0[k],
                                                        c0[k], *layers[k])
            layers[k] = tuple(weights)
    # The caller may reuse x's buffer before backward: the context keeps its own copy (see
    # forward_checked), unless checking made one already (a view of x's memory is none).
    # (by position, as forward_checked's: isa, frozen, keep_x, keep_packed, train_from)
    outs = _C.forward_stack(CELL_CODES[cell], bool(linear_before_reset), bool(training), x, h0,
                            c0, *(list(w) for w in zip(*layers)), isa, frozen, made_here(x, given),
                            bool(keep_packed), int(train_from))
    for below, (_, _, _, ctx) in zip(outs, outs[1:]):
        if ctx is not None:  # (written into, it silently changed the layer above's gradients)
            below[0].flags.writeable = False
    return [(y, hn, cn, ctx if training else None) for y, hn, cn, ctx in outs]


def directions_may_pair():
    """Whether a bidirectional layer's two directions take one pair call (forward_directions,
    backward_directions): where they may run side by side, on exactly two threads. Elsewhere
    the pair would run them in turn, and its calls cost a small bidirectional layer's Python a
    few microseconds more than a call per direction (1x8x32x32 LSTM training on 1 thread, the
    layers: 3-5 us of 30-50 in forward, 5-10 in backward)."""
    return _C.get_num_threads() == 2


def _weight_tuples(entries, name):
    """Each entry of a stack's ``layers`` (a pair's ``directions``) as a tuple (w_ih, w_hh,
    b_ih, b_hh, w_hr), checked to have five items."""
    tuples = [tuple(w) for w in entries]
    for k, w in enumerate(tuples):
        if len(w) != 5:
            raise ValueError(f"{name}[{k}] must be (w_ih, w_hh, b_ih, b_hh, w_hr) (None for the "
                             f"ones it lacks), got {len(w)} items")
    return tuples


def forward_directions(cell, x, h0, c0, directions, lengths=None, linear_before_reset=True,
                       training=True, isa=None, checked=False, frozen=0, keep_x=False,
                       keep_packed=True, training_bits=False, onnx=(None, None)):
    """A bidirectional layer in one kernel call: direction 0 forward, 1 reverse, both on x. On
    two threads the kernels run the directions side by side, one thread each
    (csrc/sequence/direction_pair.h); else one after the other. Same results either way.

    cell: one cell for both, or a pair (an ONNX node's directions may be "rnn_tanh" and
    "rnn_relu"); h0, c0: per direction (c0 entries None except for "lstm"); directions: per
    direction (w_ih, w_hh, b_ih, b_hh, w_hr), as forward takes them; onnx: per direction, None
    or ONNX's cell options as forward takes them (inference only). ``checked``, ``frozen``,
    ``keep_x``, ``keep_packed``, ``training_bits``: as forward_checked's. Returns forward's
    (y, hn, cn, ctx) per direction."""
    # (a small call's Python counts: the layers' path, checked, with no ONNX options, makes
    # no more than it needs; 5x1x4x4 GRU inference, 1 thread: 9.3 us a call before, 7.1 as two
    # one-direction calls)
    cells = (cell, cell) if isinstance(cell, str) else tuple(cell)
    if not (len(h0) == len(c0) == len(directions) == len(cells) == len(onnx) == 2):
        raise ValueError(f"cell (a pair), h0, c0, directions and onnx need one entry per "
                         f"direction (2), got {len(h0)} h0, {len(c0)} c0, {len(directions)} "
                         f"directions")
    h0, c0, directions = list(h0), list(c0), _weight_tuples(directions, "directions")
    if isa is not None:
        _check_isa(isa)
    given = x
    if not checked:
        for d in range(2):
            x, h0[d], c0[d], *weights, lengths = check_layer_args(cells[d], given, h0[d], c0[d],
                                                                  *directions[d], lengths)
            directions[d] = tuple(weights)
    options = onnx if onnx[0] is None and onnx[1] is None else [
        _onnx_options(cells[d], onnx[d], x.dtype, directions[d][1].shape[0]) for d in range(2)]
    (w_ih0, w_hh0, b_ih0, b_hh0, w_hr0), (w_ih1, w_hh1, b_ih1, b_hh1, w_hr1) = directions
    # (by position, as forward_checked's: lengths, isa, frozen, keep_x, onnx, keep_packed,
    # training_bits)
    outs = _C.forward_directions((CELL_CODES[cells[0]], CELL_CODES[cells[1]]),
                                 bool(linear_before_reset), bool(training), x, h0, c0,
                                 [w_ih0, w_ih1], [w_hh0, w_hh1], [b_ih0, b_ih1], [b_hh0, b_hh1],
                                 [w_hr0, w_hr1], lengths, isa, frozen,
                                 bool(keep_x) or (not checked and made_here(x, given)), options,
                                 bool(keep_packed), bool(training_bits))
    if not training:
        return [(y, hn, cn, None) for y, hn, cn, _ in outs]
    return outs


def backward(ctx, dy, dhn=None, dcn=None, consume=False, grads_into=None, add_into=True,
             weights=None, *, need_dx=True, need_weight_grads=True):
    """``consume=True``: this is the last backward through ``ctx`` (a later one raises), so the
    kernels may keep their gradients where the forward saved its gates instead of in a buffer as
    large (the layers pass it: they forget the forward after its backward). ``grads_into``: None,
    or a dict with grads' keys (those only: another key raises) whose arrays (writeable,
    C-contiguous, of the layer's dtype and the gradients' shapes, sharing no memory with the
    weights or inputs) the weight and bias gradients are added into, as the layers accumulate
    theirs, or, with ``add_into=False``, written over whatever they held (a layer's gradients
    reset to None, as torch's ``zero_grad(set_to_none=True)``: no pass of zeros first);
    ``grads`` then holds those arrays. ``weights``: None, or (w_ih, w_hh, w_hr or None) holding
    the forward's values, read instead of the arrays the forward read (made C-contiguous here;
    their shapes and dtype must be the forward's): the torch adapter's parameters may have moved
    since (see _C.backward). Either way they must hold the forward's values: weights changed in
    place since raise WeightsChangedError (biases, which backward does not read, may change).
    ``need_dx=False``: dx is None, its product (as large as dW_ih's) skipped, as torch's autograd
    skips an input that needs no gradient; ``need_weight_grads=False``: grads is {} (grads_into
    untouched), the weight products and bias sums skipped (a frozen layer)."""
    dy, dhn, dcn, weights = _backward_inputs(ctx, dy, dhn, dcn, weights)
    return _C.backward(ctx, dy, dhn, dcn, bool(consume), grads_into, bool(add_into), weights,
                       bool(need_dx), bool(need_weight_grads))


def _backward_inputs(ctx, dy, dhn, dcn, weights):
    """One backward's context checked and its dy, dhn, dcn and weights as the kernels take
    them (C-contiguous, each shape checked before a copy is made)."""
    if ctx is None:
        raise RuntimeError("backward needs the context of a forward run with training=True")
    if not isinstance(ctx, _C.Context):
        raise TypeError(f"ctx must be the context a forward with training=True returned, got "
                        f"{type(ctx).__name__}")
    if dy is None:
        raise TypeError("dy must be an array shaped as the forward's y (the gradient of the "
                        "loss with respect to y), got None")
    _check_grad_shapes(ctx, dy, dhn, dcn, weights)
    dy = np.ascontiguousarray(dy)
    dhn = None if dhn is None else np.ascontiguousarray(dhn)
    dcn = None if dcn is None else np.ascontiguousarray(dcn)
    return dy, dhn, dcn, _contiguous(weights)


def _contiguous(weights):
    """backward's ``weights`` (None, or a tuple of arrays and Nones) in C order."""
    if weights is None:
        return None
    return tuple(None if w is None else np.ascontiguousarray(w) for w in weights)


def check_weights(ctx, weights=None):
    """Raises WeightsChangedError where backward(ctx, ..., weights=weights) would refuse its
    weights (not the values its forward read), before any backward runs: a stack checks every
    layer first."""
    ctx.check_weights(_contiguous(weights))


def backward_directions(ctxs, dy, dhn, dcn, consume=False, grads_into=(None, None),
                        add_into=True, weights=(None, None), *, need_dx=True,
                        need_weight_grads=True):
    """backward() through both directions of a bidirectional layer in one kernel call: ctxs
    (forward's, reverse's), as forward_directions returns them; dy, dhn, dcn, grads_into,
    weights: per direction what backward takes. On two threads the kernels run the directions
    side by side (csrc/sequence/direction_pair.h); same results either way. Returns backward's
    (dx, dh0, dc0, grads) per direction (the layer's dx is the sum of the two)."""
    if not (len(ctxs) == len(dy) == len(dhn) == len(dcn) == len(grads_into) == len(weights)
            == 2):
        raise ValueError("ctxs, dy, dhn, dcn, grads_into and weights need one entry per "
                         "direction (2)")
    dy0, dhn0, dcn0, w0 = _backward_inputs(ctxs[0], dy[0], dhn[0], dcn[0], weights[0])
    dy1, dhn1, dcn1, w1 = _backward_inputs(ctxs[1], dy[1], dhn[1], dcn[1], weights[1])
    return _C.backward_directions(ctxs[0], ctxs[1], [dy0, dy1], [dhn0, dhn1], [dcn0, dcn1],
                                  bool(consume), grads_into, bool(add_into), [w0, w1],
                                  bool(need_dx), bool(need_weight_grads))


def _check_grad_shapes(ctx, dy, dhn, dcn, weights):
    """Each argument np.ascontiguousarray would copy, against the shape the context expects of
    it (ctx.shapes), before any copy is made: a broadcast one of the wrong shape may not fit in
    memory, and would fail for that instead of for its shape. Arguments already in C order
    are left to the kernels' own checks (this runs every call: no dict is built for them)."""
    given = [("dy", dy, "dy"), ("dhn", dhn, "dhn"), ("dcn", dcn, "dcn")]
    if isinstance(weights, tuple) and len(weights) == 3:
        given += [(f"weights[{i}] ({key})", w, key)
                  for i, (w, key) in enumerate(zip(weights, ("w_ih", "w_hh", "w_hr")))]
    to_copy = [(name, a, key) for name, a, key in given
               if isinstance(a, np.ndarray) and not a.flags.c_contiguous]
    if not to_copy:
        return
    shapes = ctx.shapes
    for name, a, key in to_copy:
        if shapes[key] is None:
            raise ValueError(f"{name} is only for LSTM" if key == "dcn" else
                             f"{name} must be None: the forward had none")
        check_shape(name, a, shapes[key])
