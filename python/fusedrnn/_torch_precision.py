"""fusedrnn.torch in bfloat16 and float16: modules of those dtypes, and calls under CPU autocast.

Our kernels compute in float32 and float64. torch.nn's modules also run as bfloat16 or float16
modules, and under ``torch.autocast("cpu")``. There the adapter reads its inputs, states and
weights as float32, runs the float32 kernels, and returns the dtypes torch.nn returns, each
output rounded once:
- a bfloat16 or float16 module (autocast off): that dtype; input and hx must have it too, as
  torch.nn requires;
- under autocast to A: float32, bfloat16 and float16 tensors are taken, in any mix (a float64
  module runs in float64, which autocast leaves alone), and each output comes in the dtype
  torch.nn's module returns for a call with the same dtypes. That follows torch's kernel path
  (torch 2.13, aten's RNN.cpp and autocast_mode.cpp): its LSTM runs on oneDNN where the input's
  dtype, the CPU and the grad mode allow, and autocast casts that op's every tensor to A; its
  other paths are step-by-step cells whose matrix products autocast casts to A, so a GRU and an
  LSTM without projections return their state's dtype promoted with A (h0's, c0's, or the
  input's without hx), and the Elman RNN, and an LSTM's projected outputs, A.
The casts are torch ops, so autograd takes each gradient back to its tensor's own dtype, and
torch.export and torch.jit.trace record them around the layer's op.
"""
import functools

import torch
from torch.nn.utils.rnn import PackedSequence

from ._torch_checks import DtypeError, check_tensor, LOW_DTYPES as LOW

COMPUTE = torch.float32                     # what a low-precision call runs in
_UNDER_AUTOCAST = (torch.float32, *LOW)     # what torch.nn takes under CPU autocast


def _tensors(input, hx):
    """(name, value) of the call's input (its data, if packed) and states, for the checks."""
    packed = isinstance(input, PackedSequence)
    named = [("input.data", input.data) if packed else ("input", input)]
    if isinstance(hx, (tuple, list)):
        named += [(f"hx[{i}]", t) for i, t in enumerate(hx)]
    elif hx is not None:
        named.append(("hx", hx))
    return named


@functools.lru_cache(maxsize=None)
def _onednn_runs(dtype):
    """Whether this torch and CPU have oneDNN kernels for `dtype` (aten's device checks)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported",
             torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    supported = getattr(torch.ops.mkldnn, check, None)
    return supported is not None and bool(supported())


def _onednn_lstm(x):
    """Whether torch.nn.LSTM (unpacked, no projections) runs on oneDNN: aten's use_mkldnn, on
    the input as given (before autocast's casts). On this path a float16 autocast fails inside
    torch where the CPU has no float16 oneDNN kernels."""
    return (torch.backends.mkldnn.enabled and x.numel() != 0 and _onednn_runs(x.dtype)
            and (x.dtype != torch.float16 or not torch.is_grad_enabled()))


def _runs_unpacked(input):
    """Whether torch's LSTM takes `input` as a padded tensor: it is one, or a PackedSequence
    whose rows all have every step (torch unpacks one with uniform batch sizes)."""
    if not isinstance(input, PackedSequence):
        return True
    sizes = input.batch_sizes
    return bool((sizes == sizes[0]).all()) if sizes.numel() else False


def _autocast_dtypes(mode, projected, autocast, input, x, h_dtype, c_dtype):
    """The dtypes of (output, hn, cn) that torch.nn's module returns under CPU autocast to
    `autocast`, given the input, its tensor x (the data, if packed) and the states' dtypes
    (None: no hx, zeros in the input's)."""
    if mode.startswith("RNN"):
        return (autocast,) * 3
    if mode == "LSTM" and not projected and _runs_unpacked(input) and _onednn_lstm(x):
        return (autocast,) * 3
    state = (c_dtype if mode == "LSTM" else h_dtype) or x.dtype
    state = torch.promote_types(state, autocast)
    return (autocast if projected else state,) * 2 + (state,)


def plan(mode, proj_size, param_dtype, input, hx):
    """The dtypes of (output, hn, cn) for a call that runs the float32 kernels on casts, or None
    for one that runs as it is (float32/float64 in and out). Raises for a dtype torch.nn does
    not take either (float64 mixed in under autocast). hx has the cell's structure (a pair for
    an LSTM, else one tensor) or is None."""
    if not torch.is_autocast_enabled("cpu"):
        if param_dtype not in LOW:
            return None
        for name, t in _tensors(input, hx):
            check_tensor(name, t, param_dtype)
        return (param_dtype,) * 3
    if param_dtype == torch.float64:      # autocast leaves float64 alone
        return None
    if torch.compiler.is_exporting():
        # (non-strict export dropped the output casts inside its autocast region: a silently
        # float32 result where torch.nn's is bfloat16)
        raise RuntimeError(
            "torch.export of fusedrnn.torch under CPU autocast is not supported: export the "
            "model without autocast, or convert it (model.bfloat16()) and export that")
    autocast = torch.get_autocast_dtype("cpu")
    named = _tensors(input, hx)
    for name, t in named:
        check_tensor(name, t)
        if t.dtype not in _UNDER_AUTOCAST:
            raise DtypeError(f"{name} must have dtype torch.float32, torch.bfloat16 or "
                             f"torch.float16 under CPU autocast (the parameters': "
                             f"{param_dtype}), got {t.dtype}")
    (_, x), states = named[0], [t.dtype for _, t in named[1:]]
    h0_dtype, c0_dtype = (states + [None, None])[:2] if mode == "LSTM" else (
        (states or [None])[0], None)
    outs = _autocast_dtypes(mode, proj_size > 0, autocast, input, x, h0_dtype, c0_dtype)
    if all(d == torch.float32 for d in outs + (param_dtype,) + tuple(t.dtype for _, t in named)):
        return None
    return outs


def _cast(t, dtype):
    if isinstance(t, torch.Tensor) and t.dtype != dtype:
        return t.to(dtype)
    return t                # (the same dtype; or not a tensor, for the layer's checks)


def _cast_sequence(input, dtype):
    """A Tensor, or a PackedSequence's data, in `dtype`."""
    if isinstance(input, PackedSequence):
        return PackedSequence(_cast(input.data, dtype), input.batch_sizes,
                              input.sorted_indices, input.unsorted_indices)
    return _cast(input, dtype)


def tensors_cast(input, hx, params, dtype):
    """The call's tensors that cast_inputs copies to `dtype` (outside torch.func's transforms,
    whose tensors are saved by their own levels)."""
    if torch._C._are_functorch_transforms_active():
        return ()
    return tuple(t for t in [*(t for _, t in _tensors(input, hx)), *params]
                 if isinstance(t, torch.Tensor) and t.dtype != dtype)


def cast_inputs(input, hx, params, dtype):
    """The call's input, hx and parameters in `dtype` (autograd's casts, differentiable)."""
    if isinstance(hx, (tuple, list)):
        hx = type(hx)(_cast(t, dtype) for t in hx)
    else:
        hx = _cast(hx, dtype)
    return _cast_sequence(input, dtype), hx, [_cast(p, dtype) for p in params]


def cast_outputs(result, dtypes):
    """(output, hn) or (output, (hn, cn)), as the layer returns them, in `dtypes` (of output,
    hn and cn)."""
    output, state = result
    output = _cast_sequence(output, dtypes[0])
    if isinstance(state, tuple):
        return output, tuple(_cast(t, d) for t, d in zip(state, dtypes[1:]))
    return output, _cast(state, dtypes[1])
