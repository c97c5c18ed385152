"""fusedrnn.torch in bfloat16 and float16: modules of those dtypes, and calls under CPU autocast.

Our kernels compute in float32 and float64. torch.nn's modules also run as bfloat16 or float16
modules, and under ``torch.autocast("cpu")``. There the adapter reads its inputs, states and
weights as float32, runs the float32 kernels, and returns the dtypes torch.nn returns, each
output rounded once:
- a bfloat16 or float16 module (autocast off): that dtype; input and hx must have it too, as
  torch.nn requires;
- under autocast to A: float32 and A tensors are taken (a float64 module runs in float64, which
  autocast leaves alone), and each output comes in the dtype torch.nn's module returns for a
  call with the same dtypes. That depends on torch's kernel path, and so on the CPU and the
  grad mode (oneDNN's LSTM casts everything to A where the CPU has the instructions; torch's
  step-by-step cells return the state's dtype, or A after a projection), so it is asked of
  torch.nn itself: a one-step call of a small module, once per combination. Where torch.nn
  raises (its float16 LSTM on a float32 input, on some CPUs), the outputs come in A.
The casts are torch ops, so autograd takes each gradient back to its tensor's own dtype, and
torch.export and torch.jit.trace record them around the layer's op.
"""
import functools
import warnings

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from ._torch_checks import DtypeError, check_tensor, LOW_DTYPES as LOW

_COMPUTE = torch.float32
_TORCH_CLASS = {"RNN_TANH": (torch.nn.RNN, {}), "RNN_RELU": (torch.nn.RNN, {"nonlinearity": "relu"}),
                "LSTM": (torch.nn.LSTM, {}), "GRU": (torch.nn.GRU, {})}


def _tensors(input, hx):
    """(name, tensor) of the call's input and states, where they are tensors (others are left to
    the layer's own checks, which name what they must be)."""
    packed = isinstance(input, PackedSequence)
    named = [("input.data", input.data) if packed else ("input", input)]
    if isinstance(hx, (tuple, list)):
        named += [(f"hx[{i}]", t) for i, t in enumerate(hx)]
    elif hx is not None:
        named.append(("hx", hx))
    return named


@functools.lru_cache(maxsize=None)
def _torch_nn_dtypes(mode, projected, param_dtype, autocast, packed, x_dtype, hx_dtypes,
                     grad_enabled):
    """The dtypes of (output, hn[, cn]) from torch.nn's module for a call with these dtypes
    under CPU autocast to `autocast`, or None where torch.nn raises: a one-step call."""
    cls, kwargs = _TORCH_CLASS[mode]
    if projected:
        kwargs = dict(kwargs, proj_size=1)
    with torch.autocast("cpu", enabled=False):
        module = cls(1, 2, **kwargs).to(param_dtype)
        x = torch.zeros(1, 1, 1, dtype=x_dtype)
        if packed:
            x = pack_padded_sequence(x, [1])
        widths = [1 if projected else 2, 2]
        hx = None if hx_dtypes is None else tuple(
            torch.zeros(1, 1, w, dtype=d) for w, d in zip(widths, hx_dtypes))
        if hx is not None and mode != "LSTM":
            hx = hx[0]
    try:
        with torch.set_grad_enabled(grad_enabled), torch.autocast("cpu", dtype=autocast), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")     # (torch's notes on its kernel paths)
            output, state = module(x, hx)
    except RuntimeError:
        return None
    output = output.data if packed else output
    return tuple(t.dtype for t in (output, *(state if isinstance(state, tuple) else (state,))))


def plan(mode, proj_size, param_dtype, input, hx):
    """(compute dtype, dtypes of output, hn and cn) for a call that needs casts, or None for one
    that runs as it is (float32/float64 in and out). Raises for a dtype torch.nn would not take
    either."""
    if not torch.is_autocast_enabled("cpu"):
        if param_dtype not in LOW:
            return None
        for name, t in _tensors(input, hx):
            check_tensor(name, t, param_dtype)
        return _COMPUTE, (param_dtype,) * 3
    if param_dtype == torch.float64:      # autocast leaves float64 alone
        return None
    autocast = torch.get_autocast_dtype("cpu")
    named = _tensors(input, hx)
    for name, t in named:
        check_tensor(name, t)
        if t.dtype not in (torch.float32, autocast):
            raise DtypeError(f"{name} must have dtype torch.float32 or {autocast} under CPU "
                             f"autocast to {autocast}, got {t.dtype}")
    if param_dtype not in (torch.float32, autocast):
        raise DtypeError(f"under CPU autocast to {autocast}, the parameters must have dtype "
                         f"torch.float32 or {autocast}, got {param_dtype}")
    hx_dtypes = tuple(t.dtype for _, t in named[1:]) or None
    lstm = mode == "LSTM"
    if hx is not None and (isinstance(hx, (tuple, list)) != lstm or len(named) != 2 + lstm):
        return None                         # (the layer's own checks say what is wrong)
    outs = _torch_nn_dtypes(mode, proj_size > 0, param_dtype, autocast,
                            isinstance(input, PackedSequence), named[0][1].dtype, hx_dtypes,
                            torch.is_grad_enabled()) or (autocast,) * 3
    if all(d == torch.float32 for d in outs + (param_dtype,) + tuple(t.dtype for _, t in named)):
        return None
    return _COMPUTE, outs


def _cast(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) else t   # (others: the layer's checks)


def cast_inputs(input, hx, params, dtype):
    """The call's input, hx and parameters in `dtype` (autograd's casts, differentiable)."""
    if isinstance(input, PackedSequence):
        input = PackedSequence(_cast(input.data, dtype), input.batch_sizes,
                               input.sorted_indices, input.unsorted_indices)
    else:
        input = _cast(input, dtype)
    if isinstance(hx, (tuple, list)):
        hx = type(hx)(_cast(t, dtype) for t in hx)
    else:
        hx = _cast(hx, dtype)
    return input, hx, [p.to(dtype) for p in params]


def cast_outputs(result, dtypes):
    """(output, hn) or (output, (hn, cn)), as the layer returns them, in `dtypes` (of output,
    hn and cn)."""
    output, state = result
    if isinstance(output, PackedSequence):
        output = PackedSequence(output.data.to(dtypes[0]), output.batch_sizes,
                                output.sorted_indices, output.unsorted_indices)
    else:
        output = output.to(dtypes[0])
    if isinstance(state, tuple):
        return output, tuple(t.to(d) for t, d in zip(state, dtypes[1:]))
    return output, state.to(dtypes[1])
