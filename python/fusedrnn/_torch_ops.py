"""fusedrnn's stacked RNN as torch operators, for the tools that trace a model (torch.export,
torch.jit.trace, FakeTensorMode): the torch adapter (fusedrnn.torch) calls them there, where its
eager path, an autograd.Function around NumPy, has no data to run on or cannot be recorded.

    y, hn, cn = torch.ops.fusedrnn.rnn_stack(x, h0, c0, params, cell, input_size, hidden_size,
                                             num_layers, bias, bidirectional, proj_size,
                                             linear_before_reset, *, keep_packed=True)

x is (T, B, I), time first; h0 and c0 are (L*D, B, H_out) and (L*D, B, H), or None for zeros;
params are the module's ``_flat_weights`` in torch's order. cn is empty unless cell is "lstm".
``keep_packed=False``: params are casts made for the call (a bfloat16 or float16 module's, cast
to float32 before the op), of which the kernels keep no packed forms (functional.forward).
Inference kernels: the op keeps nothing. Its gradient is a second op, rnn_stack_backward, which
runs the forward again keeping what BPTT needs and then BPTT: an exported program carries no
Python state from its forward to its backward, so its training costs one forward more than the
adapter's eager path. Both ops are registered when fusedrnn.torch is imported (as loading an
exported or traced program that uses them needs).
"""
from typing import List, Optional, Tuple

import numpy as np
import torch

from . import _layer_base as _base
from ._torch_views import numpy_view
from ._validate import ShapeError

_Tensor = torch.Tensor




def _spec(cell, input_size, hidden_size, num_layers, bias, bidirectional, proj_size,
          linear_before_reset):
    return _base.Spec(cell, input_size, hidden_size, num_layers, bias, False, 0.0, bidirectional,
                      proj_size, linear_before_reset)


def _arrays(*tensors):
    """Contiguous NumPy views (copies where a tensor is strided); None stays None."""
    return [None if t is None else numpy_view(t.contiguous()) for t in tensors]


def _refuse_forward_ad():
    """The ops have no forward-mode AD, and torch's autograd for a custom op drops tangents
    silently (torch.func.jvp of an exported program gave zeros; a dual input with frozen
    parameters, an output without a tangent). Under torch.func.jvp the kernel sees no tangent on
    its inputs, so it refuses whenever a forward-AD level is open, as the eager adapter refuses
    dual tensors."""
    if torch.autograd.forward_ad._current_level >= 0:
        raise NotImplementedError(
            "fusedrnn.torch has no forward-mode AD (torch.func.jvp, jacfwd, dual tensors): its "
            "exported operator does not run while forward-mode AD is active; use torch.nn's "
            "module for those")


def _run_forward(spec, x, h0, c0, params, save, keep_packed=True):
    _refuse_forward_ad()
    if x.shape[0] < 1:   # (an exported program with a dynamic length skips the adapter's check)
        raise ShapeError(f"input must have at least one time step, got shape {tuple(x.shape)} "
                         f"(time first)")
    names = list(spec.param_shapes())
    x_np, h0_np, c0_np, *p_np = _arrays(x, h0, c0, *params)
    return _base.stack_forward(spec, dict(zip(names, p_np)), x_np, h0_np, c0_np, save=save,
                               keep_packed=keep_packed)


def _no_c(x):
    """The op's cn for the cells without one (an op returns a tensor, never None)."""
    return x.new_empty((0,))


@torch.library.custom_op("fusedrnn::rnn_stack", mutates_args=())
def rnn_stack(x: _Tensor, h0: Optional[_Tensor], c0: Optional[_Tensor], params: List[_Tensor],
              cell: str, input_size: int, hidden_size: int, num_layers: int, bias: bool,
              bidirectional: bool, proj_size: int, linear_before_reset: bool, *,
              keep_packed: bool = True) -> Tuple[_Tensor, _Tensor, _Tensor]:
    # (keep_packed has a default, as programs recorded before it call the op without it, and
    # is keyword-only: the dispatcher drops a default-valued argument, so a positional one
    # changed the inputs whose gradients _backward returns)
    spec = _spec(cell, input_size, hidden_size, num_layers, bias, bidirectional, proj_size,
                 linear_before_reset)
    y, hn, cn, _ = _run_forward(spec, x, h0, c0, params, save=False, keep_packed=keep_packed)
    # (a one-layer hn is a view of that layer's array: the op's outputs own their memory)
    return (torch.from_numpy(y), torch.from_numpy(np.array(hn)),
            _no_c(x) if cn is None else torch.from_numpy(np.array(cn)))


@rnn_stack.register_fake
def _(x, h0, c0, params, cell, input_size, hidden_size, num_layers, bias, bidirectional,
      proj_size, linear_before_reset, *, keep_packed=True):
    spec = _spec(cell, input_size, hidden_size, num_layers, bias, bidirectional, proj_size,
                 linear_before_reset)
    T, B = x.shape[0], x.shape[1]
    h_shape, c_shape = spec.state_shapes(B)
    y = x.new_empty((T, B, spec.num_directions * spec.output_size))
    return y, x.new_empty(h_shape), x.new_empty(c_shape) if cell == "lstm" else _no_c(x)


@torch.library.custom_op("fusedrnn::rnn_stack_backward", mutates_args=())
def rnn_stack_backward(dy: _Tensor, dhn: _Tensor, dcn: _Tensor, x: _Tensor,
                       h0: Optional[_Tensor], c0: Optional[_Tensor], params: List[_Tensor],
                       cell: str, input_size: int, hidden_size: int, num_layers: int,
                       bias: bool, bidirectional: bool, proj_size: int,
                       linear_before_reset: bool) -> List[_Tensor]:
    """[dx, dh0, dc0, *d params] (dc0 empty without a cell state): rnn_stack's forward again,
    keeping what BPTT needs, then BPTT."""
    spec = _spec(cell, input_size, hidden_size, num_layers, bias, bidirectional, proj_size,
                 linear_before_reset)
    _, _, _, saved = _run_forward(spec, x, h0, c0, params, save=True)
    lstm = cell == "lstm"
    dy_np, dhn_np, dcn_np = _arrays(dy, dhn, dcn if lstm else None)
    dx, dh0, dc0, grads = _base.stack_backward(spec, saved, dy_np, dhn_np, dcn_np, consume=True)
    out = [dx, dh0, dc0 if lstm else None] + [grads[n] for n in spec.param_shapes()]
    return [_no_c(x) if a is None else torch.from_numpy(a) for a in out]


@rnn_stack_backward.register_fake
def _(dy, dhn, dcn, x, h0, c0, params, cell, input_size, hidden_size, num_layers, bias,
      bidirectional, proj_size, linear_before_reset):
    spec = _spec(cell, input_size, hidden_size, num_layers, bias, bidirectional, proj_size,
                 linear_before_reset)
    h_shape, c_shape = spec.state_shapes(x.shape[1])
    return [x.new_empty(x.shape), x.new_empty(h_shape),  # (contiguous, as the kernels give them)
            x.new_empty(c_shape) if cell == "lstm" else _no_c(x),
            *(p.new_empty(p.shape) for p in params)]


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    # (keyword_only_inputs: keep_packed; the backward's forward keeps no packed forms)
    x, h0, c0, params, *config = inputs
    ctx.config = config
    ctx.has_h0, ctx.has_c0 = h0 is not None, c0 is not None
    ctx.save_for_backward(x, h0, c0, *params)


def _backward(ctx, dy, dhn, dcn):
    x, h0, c0, *params = ctx.saved_tensors
    dx, dh0, dc0, *grads = rnn_stack_backward(dy, dhn, dcn, x, h0, c0, params, *ctx.config)
    return (dx, dh0 if ctx.has_h0 else None, dc0 if ctx.has_c0 else None, grads,
            *(None,) * len(ctx.config))


rnn_stack.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fusedrnn.torch has no double backward: the gradients its RNN, LSTM and GRU computed "
        "cannot be differentiated again; use torch.nn's module for those")


def _nothing_to_keep(ctx, inputs, output):
    pass


rnn_stack_backward.register_autograd(_no_double_backward, setup_context=_nothing_to_keep)
