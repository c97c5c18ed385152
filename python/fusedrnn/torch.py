"""torch.nn.RNN / LSTM / GRU on fusedrnn's kernels: ``torch.nn.Module``s that drop in for torch's.

    import fusedrnn.torch
    model.rnn = fusedrnn.torch.LSTM.from_module(model.rnn)      # the whole migration
    model = fusedrnn.torch.convert(model)       # or: every RNN/LSTM/GRU of a model at once

The classes subclass ``torch.nn.RNN/LSTM/GRU``: same constructor, same parameters and names (so
``load_state_dict`` from torch works unchanged and ``isinstance(m, torch.nn.LSTM)`` holds), and a
``forward`` that takes a Tensor or a ``PackedSequence`` and returns exactly what torch returns.
Gradients for the input, ``hx`` and every parameter flow through ``torch.autograd`` by our
kernels (a ``torch.autograd.Function``; CPU tensors are read as zero-copy NumPy views).
Dropout between layers uses torch's random generator, so ``torch.manual_seed`` controls it.

Differences from torch: CPU only; no double backward (differentiating the gradients raises) and
no forward-mode AD. bfloat16 and float16 modules, and calls under CPU autocast, run the float32
kernels and return torch.nn's dtypes (``_torch_precision.py``), so they are more exact than
torch.nn's own low-precision kernels.
``torch.func.grad``, ``vjp`` and ``jacrev`` work; under ``torch.export``, ``torch.jit.trace``
and fake tensors the layer is one operator, ``torch.ops.fusedrnn.rnn_stack`` (``_torch_ops.py``);
``torch.onnx.export`` writes torch.nn's ONNX nodes. README lists what is refused. ``GRU`` takes
an extra keyword, ``linear_before_reset`` (True, torch's formulation, by default).
``load_state_dict`` also accepts NumPy arrays (e.g. a ``fusedrnn.LSTM(...).state_dict()``).
``freeze()`` serves inference from read-only copies of the parameters, taken again whenever
torch records a change (``_torch_frozen.py``).

Importing this module imports torch; ``import fusedrnn`` alone never does.
"""
import numbers
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

try:
    import torch as _torch
except ImportError as _e:
    raise ImportError(f"fusedrnn.torch needs PyTorch, which did not import ({_e}); "
                      "pip install torch (fusedrnn is tested with torch==2.13.0). fusedrnn's "
                      "NumPy layers (import fusedrnn) do not need it") from _e
import torch.autograd.forward_ad as _forward_ad
from torch._guards import active_fake_mode as _active_fake_mode
from torch._subclasses.fake_tensor import is_fake as _is_fake
from torch.fx import Proxy as _FxProxy
from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _is_fx_tracing
from torch._ops import _len_torch_dispatch_stack_pre_dispatch as _pre_dispatch_modes
from torch.fx.experimental.proxy_tensor import get_proxy_mode as _get_proxy_mode
from torch.nn.utils import parametrize as _parametrize
from torch.nn.utils.rnn import PackedSequence as _PackedSequence

from . import _layer_base as _base
from . import _torch_ops  # noqa: F401  (registers torch.ops.fusedrnn, which exported models use)
from . import _torch_frozen as _frozen
from . import _torch_precision as _precision
from ._torch_checks import KERNEL_DTYPES as _KERNEL_DTYPES, check_tensor as _check_tensor
from ._torch_checks import check_not_nested as _check_not_nested
from ._torch_checks import check_packed_sequence as _check_packed_sequence
from ._torch_checks import dispatches_itself as _dispatches_itself
from ._torch_checks import refuse_dispatching_subclass as _refuse_dispatching_subclass
from ._torch_convert import convert
from ._torch_ops import ShapeError as _ShapeError
from ._torch_views import numpy_view as _np
from ._validate import StateStructureError as _StateStructureError
from ._validate import as_lengths as _as_lengths

__all__ = ["RNN", "LSTM", "GRU", "convert"]

_PLAIN = (_torch.Tensor, _torch.nn.Parameter, type(None))
_NP_DTYPE = {_torch.float32: np.dtype(np.float32), _torch.float64: np.dtype(np.float64)}
_CELL_OF_MODE = {"RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "LSTM": "lstm", "GRU": "gru"}


def _onnx_flags():
    """torch's ONNX exporters' flags (torch.onnx.is_in_onnx_export() reads them), or None
    where torch keeps them elsewhere."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return None
    return _flags, GLOBALS


_ONNX_FLAGS = _onnx_flags()


def _in_onnx_export():
    """torch.onnx.is_in_onnx_export() without its imports on every call (0.9 us of a 28 us
    call), and under Dynamo too, which takes torch's function for False: the default
    exporter's second capture (strict, after a refusal of _forward_for_onnx's) recorded the op
    and failed on "No ONNX function found for fusedrnn.rnn_stack", the refusal unseen."""
    if _ONNX_FLAGS is None:
        return _torch.onnx.is_in_onnx_export()
    flags, state = _ONNX_FLAGS
    if _torch.compiler.is_compiling():  # (Dynamo refuses to trace the TorchScript exporter's
        return flags._is_onnx_exporting  # flag, a property; that exporter never runs Dynamo)
    return state.in_onnx_export or flags._is_onnx_exporting


def _fx_proxy_in(values):
    """The first torch.fx Proxy among values (tensors, or tuples of them as LSTM's hx), or
    None."""
    for v in values:
        for t in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(t, _FxProxy):
                return t
    return None


def _fx_leaf_call(module, tracer, args, kwargs):
    """The module's call as one call_module node of the torch.fx graph being traced, made
    through the tracer's call_module (its scope, module stack and overrides: torchvision's
    feature extractor names nodes there), whichever way its is_leaf_module answers."""
    path = tracer.path_of_module(module)
    if not path:
        raise RuntimeError(
            f"torch.fx.symbolic_trace cannot trace a fusedrnn.torch.{type(module).__name__} "
            f"itself (its forward is Python around C++ kernels): trace a model that holds it, "
            f"where it becomes one call_module node")

    def leaf(*args, **kwargs):
        return tracer.create_proxy("call_module", path, args, kwargs)

    return tracer.call_module(module, leaf, args, kwargs)


def _tracing_mode_active():
    """Whether a mode that traces torch's ops is active: a FakeTensorMode (one that allows real
    inputs makes them fake as torch's ops take them: the eager path would read them as NumPy
    and fail), or make_fx's proxy mode, pre_dispatch's too (the eager path's outputs would be
    recorded as constants, which the graph returned for any later input)."""
    if _torch._C._len_torch_dispatch_stack():               # (mostly empty)
        return _active_fake_mode() is not None or _get_proxy_mode() is not None
    return bool(_pre_dispatch_modes()) and _get_proxy_mode() is not None


def _has_fake_tensors(input, hx, names, params):
    """Whether any of the call's tensors is fake (FakeTensorMode, or a tool that traces with
    it). Raises, naming it, for a tensor of a subclass that runs torch's operators itself and
    is not fake, which the eager kernels cannot read."""
    packed = isinstance(input, _PackedSequence)
    states = list(hx) if isinstance(hx, (tuple, list)) else [hx]
    tensors = [input.data if packed else input, *states, *params]
    # (is_fake costs a microsecond a tensor: plain tensors and parameters are not fake)
    unusual = [t for t in tensors if type(t) not in _PLAIN and isinstance(t, _torch.Tensor)]
    if not unusual or any(_is_fake(t) for t in unusual):
        return bool(unusual)
    if any(map(_dispatches_itself, unusual)):
        state_names = ([f"hx[{i}]" + {0: " (h0)", 1: " (c0)"}.get(i, "")
                        for i in range(len(states))] if isinstance(hx, (tuple, list)) else ["hx"])
        for name, t in zip(["input.data" if packed else "input", *state_names, *names],
                           tensors):
            if isinstance(t, _torch.Tensor):
                _refuse_dispatching_subclass(name, t)
    return False


def _refuse_for_export(packed, dropout):
    """What the traced op cannot take: a PackedSequence's lengths are data (an exported graph
    would keep them as constants), dropout's masks are drawn where the kernels run, and
    torch.func's transforms find no autograd rule for it."""
    where = "fusedrnn.torch under torch.export, torch.jit.trace, make_fx or fake tensors"
    if packed:
        raise RuntimeError(f"{where} takes a padded Tensor input, not a PackedSequence (its "
                           f"lengths would become constants of the graph)")
    if dropout:
        raise RuntimeError(f"{where} runs without dropout: call model.eval() first (dropout is "
                           f"only active in training)")
    if _torch._C._are_functorch_transforms_active():  # (the op's autograd has no rule there)
        raise RuntimeError(f"{where} does not run inside torch.func transforms (grad, vjp, "
                           f"jacrev): trace torch.autograd.grad instead, or use torch.func "
                           f"eagerly, where it works")


_NO_FORWARD_AD = ("fusedrnn.torch has no forward-mode AD (dual tensors, torch.func.jvp, jacfwd, "
                  "hessian): use torch.nn's module for those")


def _refuse_forward_ad(tensors):
    """Dual tensors (torch.autograd.forward_ad) carry tangents that no kernel computes: the
    NumPy path would drop them silently."""
    if getattr(_forward_ad, "_current_level", -1) < 0:
        return
    if any(t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(_NO_FORWARD_AD)


class _DropoutError(ValueError, RuntimeError):
    """A dropout probability outside [0, 1] where it applies: torch.nn raises RuntimeError."""


def _check_dropout_applied(spec, training):
    """torch.nn's forward refuses a dropout probability outside [0, 1] where it applies it
    (training, between layers), and only there. The constructor checks its own; set on the
    built module, 1.5 ran here as p = 1 and -0.1 as no dropout."""
    p = spec.dropout
    if training and p != 0 and spec.num_layers > 1 and not 0 <= p <= 1:
        raise _DropoutError(f"dropout must be a probability between 0 and 1, got {p} (set on "
                            f"the module after it was built; torch.nn's forward refuses it too)")


def _refuse_functionalize(tensors):
    """A functional tensor (torch.func.functionalize) has no memory for the kernels to read: an
    untracked call blamed FSDP for it, a tracked one raised torch's NYI for custom Functions."""
    if any(t is not None and _torch._is_functional_tensor(t) for t in tensors):
        raise RuntimeError(
            "fusedrnn.torch does not run under torch.func.functionalize (its kernels read the "
            "tensors' memory, which a functional tensor has none of): trace the model with "
            "torch.export or make_fx instead, where the layer is one operator, or functionalize "
            "torch.nn's module")


def _torch_mask_maker(p, dtype):
    """Inverted-dropout masks drawn with torch's generator (torch.manual_seed applies)."""
    def make(shape):
        if p >= 1:
            return np.zeros(shape, _NP_DTYPE[dtype])
        return _np(_torch.empty(shape, dtype=dtype).bernoulli_(1.0 - p).div_(1.0 - p))
    return make


def _packed_mask_maker(make, t_idx, b_idx, np_dtype):
    """torch draws a PackedSequence's masks over its data, (N, features) in packed order: the
    same draws, put where those rows sit in the padded (T, B, features) buffer, give its masks
    (and leave torch's generator where torch.nn leaves it)."""
    def make_padded(shape):
        padded = np.zeros(shape, dtype=np_dtype)
        padded[t_idx, b_idx] = make((len(t_idx), shape[2]))
        return padded
    return make_padded


# Where _FusedStack.forward leaves its token (the kernels' saved state on an empty tensor) for
# setup_context, which torch.func calls apart from forward (once a level): per thread, since
# several threads may call the layer at once (an input slot for it was one object for every
# call of a torch.jit.trace, when traces recorded this Function).
_handoff = threading.local()


class _PositionalApply:
    """torch's Function.apply without its per-call inspect.signature binding, which only fills
    in default arguments (ours have none and take every argument by position): it cost 12-30 us
    a call, 60 us of a small LSTM's 200 us training call through the adapter. Under torch.func's
    transforms, and on a torch without the hooks used here, torch's own apply runs."""

    @classmethod
    def apply(cls, *args):
        if _FAST_APPLY and not _torch._C._are_functorch_transforms_active():
            # what torch's apply then runs, after binding
            return super(_torch.autograd.Function, cls).apply(*_unwrap_dead_wrappers(args))
        return super().apply(*args)


try:
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
    _FAST_APPLY = hasattr(_torch._C, "_are_functorch_transforms_active")
except ImportError:
    _FAST_APPLY = False


class _Run(NamedTuple):
    """What _FusedStack needs besides tensors: the layer, its parameters' names, the rows'
    lengths, the dropout masks' maker, the tensors to watch for in-place changes (a
    low-precision call's own, whose float32 copies the kernels read; not kept past setup), and
    the lowest layer whose saved state a backward may need (see _FusedMixin._run)."""
    spec: object
    names: list
    lengths: object
    make_mask: object
    watched: tuple = ()
    save_from: int = 0


class _FusedStack(_PositionalApply, _torch.autograd.Function):
    """(x, h0, c0, *params) -> (y, hn[, cn]) through every layer and direction, and back;
    forward and setup_context apart, as torch.func's transforms (grad, vjp, jacrev) need."""

    @staticmethod
    def forward(run, x, h0, c0, *params):
        y, hn, cn, saved = _base.stack_forward(
            run.spec, dict(zip(run.names, map(_np, params))), _np(x), _np(h0), _np(c0),
            run.lengths, save=True, make_mask=run.make_mask, checked=True,
            save_from=run.save_from)
        _handoff.token = _torch.empty(0)
        _handoff.token.fusedrnn_saved = saved
        out = (_torch.from_numpy(y), _torch.from_numpy(hn))
        return out + (_torch.from_numpy(cn),) if cn is not None else out

    @staticmethod
    def setup_context(ctx, inputs, output):
        run, x, h0, c0, *params = inputs
        # (the watched tensors are held by save_for_backward alone, below)
        ctx.run = run._replace(watched=()) if run.watched else run
        ctx.n_watched = len(run.watched)
        ctx.has_h0, ctx.has_c0 = h0 is not None, c0 is not None
        # The kernels' saved state rides on a token tensor kept by save_for_backward, so torch
        # frees it exactly when it frees the graph's saved tensors (after a backward without
        # retain_graph=True) rather than when the outputs die. Saving x and the weights too
        # makes autograd raise if any is modified in place before backward (the kernels read
        # them again in backward). The watched tensors are a low-precision call's own, whose
        # float32 copies the kernels read: changed in place, torch.nn would raise too.
        ctx.save_for_backward(_handoff.token, x, h0, c0, *params, *run.watched)
        ctx.y_shape, ctx.y_dtype = tuple(output[0].shape), _NP_DTYPE[output[0].dtype]
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx, *tangents):
        # (reached by torch.func transforms, which unwrap the dual tensors before forward)
        raise NotImplementedError(_NO_FORWARD_AD)

    @staticmethod
    def vmap(vmap_info, in_dims, run, *tensors):
        # (torch's own message named this private class and asked to implement this method)
        raise RuntimeError(
            "fusedrnn.torch: vmap of an RNN, LSTM or GRU's forward is not supported "
            "(torch.func.vmap over its input, hx or parameters, or ensembles through "
            "stack_module_state); torch.func.grad, vjp and jacrev work, or use torch.nn's module")

    @staticmethod
    def backward(ctx, dy, dhn, dcn=None):
        # Raises if an input changed in place since forward, or if the graph was freed by an
        # earlier backward without retain_graph=True (as torch does). The kernels run inside
        # another Function: torch.func hands it plain tensors, and it refuses a second order.
        saved_tensors = ctx.saved_tensors       # (once: checkpointing unpacks each once)
        token, *inputs = saved_tensors[:len(saved_tensors) - ctx.n_watched]
        if getattr(_handoff, "token", None) is token:
            _handoff.token = None  # (a traced module's call, whose caller could not drop it)
        saved = getattr(token, "fusedrnn_saved", None)
        if saved is None:
            raise RuntimeError(
                "fusedrnn.torch: the saved state of this RNN/LSTM/GRU call came back without "
                "the kernels' state: saved_tensors_hooks that replace the saved tensors (clone, "
                "detach, save to disk) are not supported; torch.autograd.graph.save_on_cpu and "
                "checkpointing are")
        # What autograd needs, (x, h0, c0, *params): the kernels skip the rest (dx's product
        # for data x, the weight products of frozen layers, the layers below them).
        needs = ctx.needs_input_grad[1:]
        info = (ctx.run, ctx.has_h0, ctx.has_c0, ctx.y_shape, ctx.y_dtype, saved, needs,
                _graph_freed_after())
        grads = _FusedStackBackward.apply(info, dy, dhn, dcn, *inputs)
        spec = ctx.run.spec
        if dy is None and dhn is None and spec.proj_size and ctx.y_shape[0] == 1:
            # A loss on c_n alone over one step never reaches the top layer's projections
            # (they only make its h): torch.nn's graph leaves their .grad None, not zeros.
            top = {f"weight_hr_l{spec.num_layers - 1}{s}" for s in ("", "_reverse")}
            grads = grads[:3] + tuple(None if name in top else g
                                      for name, g in zip(ctx.run.names, grads[3:]))
        return (None,) + grads


def _graph_freed_after():
    """Whether autograd frees the graph after the backward now running (no retain_graph or
    create_graph, no torch.func transform, which may replay it): then that backward is the last
    through the kernels' saved state, which it may consume (functional.backward: the
    pre-activation gradients overwrite the saved gates, fastrnns LSTM ~50 MiB less). A torch
    without the query keeps the state."""
    keep_graph = getattr(_torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return (keep_graph is not None and not keep_graph()
            and not _torch._C._are_functorch_transforms_active())


def _weights_only(names, params):
    """{name: NumPy view} of the weights among the parameters (a backward reads no bias)."""
    return {n: _np(p) for n, p in zip(names, params) if n.startswith("weight")}


class _FusedStackBackward(_PositionalApply, _torch.autograd.Function):
    """_FusedStack's backward: (dy, dhn, dcn, x, h0, c0, *params) -> (dx, dh0, dc0,
    *param grads). x, h0, c0 and the parameters come in so that gradients taken with
    create_graph=True depend on them, and differentiating those gradients raises (before, they
    came out as constants: a gradient penalty's term was silently dropped)."""

    @staticmethod
    def forward(info, dy, dhn, dcn, x, h0, c0, *params):
        run, has_h0, has_c0, y_shape, y_dtype, saved, needs, consume = info
        dy_np = np.zeros(y_shape, y_dtype) if dy is None else _np(dy)
        # The weights as autograd saved them, not the memory the forward read: under
        # allow_mutation_on_saved_tensors that holds the values after an in-place change, and
        # FSDP frees a parameter's storage between forward and backward.
        need_x, need_h0, need_c0, *need_params = needs
        dx, dh0, dc0, grads = _base.stack_backward(
            run.spec, saved, dy_np, _np(dhn), _np(dcn), consume=consume,
            params=_weights_only(run.names, params), need_dx=need_x, need_dh0=need_h0 or need_c0,
            weight_grads={n for n, need in zip(run.names, need_params) if need})
        return (None if dx is None else _torch.from_numpy(dx),
                _torch.from_numpy(dh0) if has_h0 and dh0 is not None else None,
                _torch.from_numpy(dc0) if has_c0 and dc0 is not None else None,
                *(_torch.from_numpy(grads[n]) if n in grads else None for n in run.names))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(vmap_info, in_dims, info, *tensors):
        """Batched cotangents (torch.func.jacrev, vmap over a vjp): one backward per cotangent,
        stacked; the kernels' saved state serves them all (stack_backward does not consume it).
        x, hx and the parameters come from the forward, which is not batched."""
        if any(d is not None for d in in_dims[4:]):
            raise RuntimeError("fusedrnn.torch: vmap over the inputs or parameters of an RNN, "
                               "LSTM or GRU is not supported (torch.nn's are not either)")

        info = info[:-1] + (False,)  # (every cotangent's backward reads the saved state)

        def one(i):
            return _FusedStackBackward.apply(info, *(
                t if t is None or d is None else t.select(d, i)
                for t, d in zip(tensors, in_dims[1:])))

        outs = [one(i) for i in range(vmap_info.batch_size)]
        stacked = tuple(None if o is None else _torch.stack([r[j] for r in outs])
                        for j, o in enumerate(outs[0]))
        return stacked, tuple(None if o is None else 0 for o in stacked)

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(
            "fusedrnn.torch has no double backward: the gradients its RNN, LSTM and GRU "
            "computed cannot be differentiated again (gradient penalties, Hessian-vector "
            "products, torch.func.grad of a gradient); use torch.nn's module for those")


# What a subclass may define over torch's class and still convert: its constructor (it has run;
# the parameters it made are shared) and the class's bookkeeping.
_HARMLESS = {"__init__", "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__",
             "__annotations__", "__annotate__", "__firstlineno__", "__static_attributes__",
             "__orig_bases__", "__parameters__", "__slots__", "__init_subclass__",
             # typing.Generic's and abc.ABC's bookkeeping, in a mixin or the class itself
             "__class_getitem__", "_is_protocol", "__abstractmethods__", "_abc_impl",
             "__subclasshook__", "_is_runtime_protocol", "__protocol_attrs__",
             "__non_callable_proto_members__"}


def _refuse_computed_weights(module, cls):
    """A weight computed from others (a parametrization, or the forward pre-hook of pruning or
    the old weight_norm) is no Parameter to share: torch's own error named no cause. (Before
    _refuse_overrides: parametrize makes the module's class a subclass.)"""
    computed = [n for n in module._flat_weights_names if _parametrize.is_parametrized(module, n)
                or not isinstance(getattr(module, n), _torch.nn.Parameter)]
    if _parametrize.is_parametrized(module):    # (a learned h0's parametrization, say)
        computed += [n for n in module.parametrizations if n not in computed]
    if computed:
        raise TypeError(
            f"{cls.__name__}.from_module cannot convert {', '.join(computed)}: computed from "
            f"other tensors (torch.nn.utils.parametrize, parametrizations.weight_norm, "
            f"spectral_norm, prune or weight_norm), not a Parameter it could share. Remove that "
            f"first (parametrize.remove_parametrizations, prune.remove, remove_weight_norm, "
            f"remove_spectral_norm), convert, and register it again on the fusedrnn module")


def _a(word):
    return "an" if word[:1].lower() in "aeiou" else "a"


def _refuse_overrides(module, cls):
    """from_module builds a plain fusedrnn module: a subclass's forward (or any other method it
    overrides) would be dropped silently, and what it adds (a method, a class attribute) lost,
    so such a module is refused."""
    base = cls if isinstance(module, cls) else cls._torch_base   # (a copy of one of ours)
    where = "fusedrnn.torch" if base is cls else "torch.nn"
    extra = [c for c in type(module).__mro__ if c not in base.__mro__]
    defined = {n for c in extra for n in vars(c) if n not in _HARMLESS}
    overrides = sorted({n for n in defined if hasattr(base, n)}
                       | ({"forward"} & vars(module).keys()))  # (m.forward = f)
    additions = sorted(n for n in defined if not hasattr(base, n))
    if overrides or additions:
        name = type(module).__qualname__
        what = "; ".join(
            ([f"it overrides {', '.join(overrides)} of {where}.{base.__name__}, and the fusedrnn "
              f"module would run {where}.{base.__name__}'s behaviour instead"] if overrides else [])
            + ([f"it defines {', '.join(additions)}, which the fusedrnn module would lack (and "
                f"it would not be {_a(name)} {name})"] if additions else []))
        raise TypeError(
            f"{cls.__name__}.from_module cannot convert {_a(name)} {name}: {what}. "
            f"Convert a plain torch.nn.{base.__name__} (load_state_dict into one), or subclass "
            f"fusedrnn.torch.{cls.__name__} with your changes")


_HOOKS = {"_forward_pre_hooks": "forward pre", "_forward_hooks": "forward",
          "_backward_pre_hooks": "backward pre", "_backward_hooks": "backward",
          "_state_dict_pre_hooks": "state_dict pre", "_state_dict_hooks": "state_dict",
          "_load_state_dict_pre_hooks": "load_state_dict pre",
          "_load_state_dict_post_hooks": "load_state_dict post"}


def _refuse_hooks(module, cls):
    """The module's hooks would not fire on the new one (a feature extractor's hook simply
    stopped); carrying them over would also copy handles that no longer remove them."""
    found = [f"{kind} hook {getattr(h, '__qualname__', repr(h))}"
             for attr, kind in _HOOKS.items() for h in getattr(module, attr, {}).values()]
    if found:
        raise TypeError(
            f"{cls.__name__}.from_module cannot convert a module with hooks, which the fusedrnn "
            f"module would not run: {', '.join(found)}. Remove them (their handles' .remove()), "
            f"convert, and register them again on the fusedrnn module")


def _carry_extra_state(module, new):
    """What the torch.nn module holds besides its weights (a learned initial state kept on it as
    a Parameter, a buffer, a submodule, an attribute its constructor set), held by the new one
    too: parameters(), state_dict() and the model's code see them as before (they were dropped,
    silently: an optimiser built after the swap skipped a learned h0)."""
    for name, p in module._parameters.items():
        if name not in new._parameters:
            new.register_parameter(name, p)
    for name, b in module._buffers.items():
        new.register_buffer(name, b, persistent=name not in module._non_persistent_buffers_set)
    for name, m in module._modules.items():
        new.add_module(name, m)
    for name, value in vars(module).items():
        if not hasattr(new, name):   # (not torch's or the adapter's own: a compiled call, _spec)
            new.__dict__[name] = value


class _FusedMixin:
    """forward() and from_module() shared by RNN, LSTM and GRU."""

    _torch_base = None          # the torch.nn class this one replaces

    def _spec(self):
        # Made again only when an attribute changed: a Spec costs 3 us, a tenth of a small
        # inference call's Python time.
        key = (self.mode, self.input_size, self.hidden_size, self.num_layers, self.bias,
               self.batch_first, self.dropout, self.bidirectional, self.proj_size,
               getattr(self, "linear_before_reset", True))
        cached = self.__dict__.get("_fusedrnn_spec")
        if cached is not None and cached[0] == key:
            return cached[1]
        if not isinstance(self.dropout, numbers.Real):   # (set on the built module)
            raise TypeError(f"dropout must be a number in [0, 1], got "
                            f"{type(self.dropout).__name__}")
        spec = _base.Spec(_CELL_OF_MODE[key[0]], *key[1:])
        if not _torch.compiler.is_exporting():  # (strict export refuses the cache's side effect)
            self.__dict__["_fusedrnn_spec"] = (key, spec)
        return spec

    def __getstate__(self):
        # Not the Spec cache (made again at the next call): pickled, torch.save(model) made
        # torch.load's default weights_only=True ask to allowlist fusedrnn._layer_base.Spec as
        # well as the class, and tied the file to how this version lays a Spec out.
        state = super().__getstate__()
        state.pop("_fusedrnn_spec", None)
        # (the frozen copies too: a copy's parameters are others, which it freezes again)
        state.pop("_fusedrnn_frozen_weights", None)
        return state

    # -- frozen weights (deployment; _torch_frozen.py)
    def freeze(self):
        """Promise that the parameters change only in ways torch records (an optimiser's step,
        ``load_state_dict``, in-place ops on them, ``.to()``, assigning a parameter, or its
        ``.data`` a tensor in other memory), for faster inference: calls that autograd does not
        track (under ``torch.no_grad()`` or ``torch.inference_mode()``, or with no tensor
        requiring grad) then run on a read-only copy of the parameters, taken again after each
        such change, and skip comparing every weight with the kernels' copy of its bytes, as the
        NumPy layers' ``freeze()`` does (GRU, I = H = 128, one step: ~15 us of ~60 us a call). A
        write torch does not record (``p.data.add_()``, a NumPy view of a parameter, ``.data``
        assigned a view of the memory it already has: ``vector_to_parameters`` from the same
        vector again, ``p.data = p.data.t()``) is not seen until the next recorded change or
        ``unfreeze()``. Weights computed each call (parametrizations, pruning) and low-precision
        modules run as unfrozen. Training calls run on the parameters themselves, as before.
        Each new copy is packed anew, and the packed forms of the copies it replaced stay in the
        kernels' cache until evicted: for serving, not for a module trained between calls.
        Returns the module."""
        self.__dict__["_fusedrnn_frozen"] = True
        return self

    def unfreeze(self):
        """Ends freeze(): every call reads the parameters again. Returns the module."""
        self.__dict__.pop("_fusedrnn_frozen", None)
        self.__dict__.pop("_fusedrnn_frozen_weights", None)
        return self

    @property
    def frozen(self):
        """Whether freeze() is in force."""
        return bool(self.__dict__.get("_fusedrnn_frozen"))

    def _frozen_weights(self, input, hx):
        """The FrozenWeights an eager call of (input, hx) may run on, or None (not frozen,
        under autocast, a call autograd tracks, or parameters that cannot be frozen)."""
        if not self.__dict__.get("_fusedrnn_frozen") or _torch._C._is_any_autocast_enabled():
            return None
        if _torch.is_grad_enabled():
            # (a tracked call runs on the parameters: no copy to take for it)
            data = input.data if isinstance(input, _PackedSequence) else input
            states = hx if isinstance(hx, (tuple, list)) else (hx,)
            if any(isinstance(t, _torch.Tensor) and t.requires_grad
                   for t in (data, *states, *self._parameters.values())):
                return None
        return _frozen.current(self, self._flat_weights_names)

    def _refresh_flat_weights(self):
        """torch.nn's forward's _update_flat_weights(), so the weights are those torch.nn's
        forward takes: refreshed where one was swapped without __setattr__
        (torch.func.functional_call: meta ones were refused, CPU ones on a meta module ran
        torch.nn's forward), and a parametrized one evaluated as often as torch.nn evaluates it
        (twice: spectral_norm's power iteration, which runs at each evaluation in training, ran
        once a call here, and its outputs drifted from torch.nn's). Skipped where it would
        change nothing, every weight the Parameter it last saw: its two attribute lookups a
        weight cost more than the rest of this (a one-layer LSTM 13 us against 1 on this VM)."""
        params = self._parameters
        for name, ref in zip(self._flat_weights_names, self._flat_weight_refs):
            if ref is None or params.get(name) is not ref():
                self._update_flat_weights()
                return

    def _fused_params(self):
        """(names, weights, their dtype) as torch.nn's forward reads them: _flat_weights, which
        _forward_eager refreshed first; under export, those export swapped in (it refuses
        attributes assigned while it runs, so _flat_weights is not refreshed there)."""
        names = list(self._flat_weights_names)
        params = ([getattr(self, n) for n in names] if _torch.compiler.is_exporting()
                  else list(self._flat_weights))
        dtype = None
        for n, p in zip(names, params):
            _check_tensor(n, p, dtype)
            dtype = p.dtype
        return names, params, dtype

    def __call__(self, *args, **kwargs):
        # torch.fx.symbolic_trace keeps torch.nn's RNNs as leaves (call_module nodes) by their
        # __module__ and would trace into this one, its hooks too (recorded into the graph,
        # they then ran twice): while it traces, the call is one call_module node here.
        if _is_fx_tracing():
            proxy = _fx_proxy_in((*args, *kwargs.values()))
            if proxy is None:   # (a constant input: the weights are Proxies while it traces)
                proxy = getattr(self, self._flat_weights_names[0])
            if isinstance(proxy, _FxProxy):
                return _fx_leaf_call(self, proxy.tracer, args, kwargs)
        return super().__call__(*args, **kwargs)

    def forward(self, input, hx=None):
        """``output, h_n = module(input, hx=None)`` (LSTM: ``output, (h_n, c_n)``), as torch.nn's
        forward, on fusedrnn's kernels: ``input`` a Tensor (T, B, input_size), (B, T,
        input_size) with batch_first, unbatched (T, input_size), or a PackedSequence (``output``
        is then one too); ``hx`` None for zeros. Gradients flow through torch.autograd."""
        if _is_fx_tracing():     # (forward itself traced: the root of a trace)
            proxy = _fx_proxy_in((input, hx))
            if proxy is not None:
                return _fx_leaf_call(self, proxy.tracer, (input, hx), {})
        # torch.onnx.export (either exporter) writes what torch.nn's module would: ONNX's
        # RNN, LSTM and GRU nodes, which ONNX Runtime runs.
        if _in_onnx_export():
            return self._forward_for_onnx(input, hx)
        # torch.export and fake tensors trace the layer by its shapes: there it is one op of
        # the graph (_torch_ops), whose fake kernel gives the shapes. (Strict export runs
        # Dynamo through this method, which must not be compiler.disable'd.)
        if _torch.compiler.is_exporting():
            return self._forward(input, hx, as_op=True)
        return self._forward_eager(input, hx)

    def _forward_for_onnx(self, input, hx):
        """torch.nn's own forward (the same parameters), for torch's ONNX exporters."""
        if not getattr(self, "linear_before_reset", True):
            raise RuntimeError(
                "torch.onnx.export takes a fusedrnn.torch.GRU with linear_before_reset=True "
                "only: it writes what torch.nn.GRU would, and torch has no other GRU. For "
                "ONNX's default GRU (linear_before_reset=0), fusedrnn.onnx_layout.onnx_weights "
                "gives the node's W, R and B from a fusedrnn.GRU with these weights")
        if getattr(self, "proj_size", 0):
            # (torch 2.13's default exporter wrote torch.nn's: an LSTM node of hidden_size
            # proj_size, on the first rows of the weights, that ONNX Runtime refuses to run)
            raise RuntimeError(
                "torch.onnx.export cannot write an LSTM with projections (proj_size): ONNX's "
                "LSTM has none; torch's TorchScript-based exporter refuses torch.nn's too")
        return self._torch_base.forward(self, input, hx)

    # torch.compile breaks the graph here and runs the layer as it is: Dynamo tracing into the
    # NumPy glue took seconds a first call and recompiled for every new sequence length. (The
    # wrapper costs 0.7 us a call; called only while Dynamo traces, it would not stop Dynamo
    # from compiling this method's frame when the layer runs eagerly inside a compiled call.)
    @_torch.compiler.disable
    def _forward_eager(self, input, hx):
        self._refresh_flat_weights()
        # Fake tensors and make_fx trace the layer as one op (_torch_ops), by its fake kernel
        # or by running it
        if _tracing_mode_active() or _has_fake_tensors(input, hx, self._flat_weights_names,
                                                       self._flat_weights):
            return self._forward(input, hx, as_op=True)
        if self._flat_weights and getattr(self._flat_weights[0], "is_meta", False):
            # A shape-only dry run (a model built on the meta device): torch.nn's forward gives
            # its meta outputs, and its errors (an input on another device).
            return self._torch_base.forward(self, input, hx)
        if not _torch.jit.is_tracing():
            return self._forward(input, hx)
        if isinstance(input, _PackedSequence):
            raise RuntimeError("torch.jit.trace through fusedrnn.torch takes a Tensor input, not "
                               "a PackedSequence: its lengths would become constants of the "
                               "trace")
        # The trace records the layer as one op, torch.ops.fusedrnn.rnn_stack (_torch_ops), so
        # torch.jit.save stores it; the tracer's notes on the Python it runs around the op
        # (shapes read as ints) would only hide warnings that matter.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _torch.jit.TracerWarning)
            return self._forward(input, hx, as_op=True)


    def _forward(self, input, hx, as_op=False):
        spec = self._spec()
        frozen = self._frozen_weights(input, hx) if not as_op else None
        if frozen is not None:
            return self._run(spec, frozen.names, frozen.params, frozen.dtype, input, hx, as_op,
                             frozen=frozen)
        names, params, dtype = self._fused_params()
        if dtype in _KERNEL_DTYPES and not _torch._C._is_any_autocast_enabled():
            return self._run(spec, names, params, dtype, input, hx, as_op)
        # bfloat16/float16 modules and CPU autocast: the float32 kernels, torch.nn's dtypes out
        self._check_hx_structure(hx, spec)
        out_dtypes = _precision.plan(self.mode, self.proj_size, dtype, input, hx)
        if out_dtypes is None:
            return self._run(spec, names, params, dtype, input, hx, as_op)
        compute = _precision.COMPUTE
        watched = _precision.tensors_cast(input, hx, params, compute)
        # Parameters cast to float32 are new tensors every call: the kernels keep no packed
        # forms of them (their memory is freed after the call; see functional.forward).
        keep_packed = not any(isinstance(p, _torch.Tensor) and p.dtype != compute for p in params)
        input, hx, params = _precision.cast_inputs(input, hx, params, compute)
        # (autocast stays on: _run's torch ops, and the op under export, are none it casts)
        result = self._run(spec, names, params, compute, input, hx, as_op, watched, keep_packed)
        return _precision.cast_outputs(result, out_dtypes)

    def _run(self, spec, names, params, dtype, input, hx, as_op, watched=(), keep_packed=True,
             frozen=None):
        """The layer on the kernels, all of its tensors in `dtype` (float32 or float64).
        `watched`: tensors whose in-place change before backward must raise (a low-precision
        call's own, of which the kernels saw copies). `keep_packed=False`: params are this
        call's casts (an inference call keeps no packed forms of them). `frozen`: the
        parameters' FrozenWeights, which an untracked call runs on."""
        lstm = spec.cell == "lstm"
        packed = isinstance(input, _PackedSequence)
        _check_dropout_applied(spec, self.training)
        if as_op:
            _refuse_for_export(packed, _base.dropout_active(spec, self.training))
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            _check_tensor("input.data", data, dtype)
            bs = _check_packed_sequence(data, batch_sizes, sorted_indices, unsorted_indices,
                                        spec.input_size)
            T, B = len(bs), int(bs[0])
            offsets = np.repeat(np.cumsum(bs) - bs, bs)
            t_idx = np.repeat(np.arange(T), bs)
            # Rows in the sorted batch's order, as torch.nn runs a PackedSequence (hx taken into
            # it, h_n back below): lengths descending, so rows past their length end the step's
            # tiles together and leave its products (csrc/sequence/forward.h). In the caller's
            # order they lay among running rows: 100x64x256x256 LSTM, lengths from 50..100, 1
            # thread, inference, 60.7 ms against 50.3 sorted.
            b_idx = np.arange(len(t_idx)) - offsets
            lengths = np.bincount(b_idx, minlength=B).astype(np.int64)
            index = (_torch.from_numpy(t_idx), _torch.from_numpy(b_idx))
            x = data.new_zeros((T, B, spec.input_size)).index_put(index, data)
            unbatched = False
        else:
            _check_tensor("input", input, dtype)
            _check_not_nested("input", input)
            if input.dim() not in (2, 3) or input.shape[-1] != spec.input_size:
                layout = "B, T" if spec.batch_first else "T, B"
                raise _ShapeError(f"input must have shape ({layout}, {spec.input_size}) or "
                                  f"(T, {spec.input_size}) unbatched, got {tuple(input.shape)}")
            unbatched = input.dim() == 2
            if unbatched:
                x = input.unsqueeze(1)
            else:
                x = input.transpose(0, 1) if spec.batch_first else input
            T, B = x.shape[:2]
            if T < 1:
                raise _ShapeError(f"input must have at least one time step, got shape "
                                  f"{tuple(input.shape)}")
            lengths = None
        h0, c0 = self._check_hx(hx, spec, B, unbatched, dtype)
        reorder = packed and sorted_indices is not None
        if reorder:   # hx in the sorted batch's order (see b_idx above)
            h0, c0 = (None if s is None else s.index_select(1, sorted_indices) for s in (h0, c0))
        lengths = _as_lengths(lengths, T, B)
        make_mask = None
        if _base.dropout_active(spec, self.training):
            make_mask = _torch_mask_maker(spec.dropout, dtype)
            if packed:
                make_mask = _packed_mask_maker(make_mask, t_idx, b_idx, _NP_DTYPE[dtype])
        # Checked: every tensor's dtype (_fused_params, _check_tensor), x's and hx's shapes and
        # the lengths, so stack_forward skips the NumPy layers' checks (checked=True: 6 of a
        # small call's ~30 us); the kernels check every shape again, and stack_forward names a
        # parameter of the wrong shape as torch does.
        tensors = [x, h0, c0, *params]
        if as_op:
            y, hn, cn = _torch.ops.fusedrnn.rnn_stack(
                x, h0, c0, params, spec.cell, spec.input_size, spec.hidden_size, spec.num_layers,
                spec.bias, spec.bidirectional, spec.proj_size, spec.linear_before_reset,
                keep_packed=keep_packed)
            return self._shaped_outputs(y, hn, cn if lstm else None, spec, unbatched)
        _refuse_forward_ad(tensors)
        if _torch._C._are_functorch_transforms_active():
            _refuse_functionalize(tensors)
        tracked = _torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                   for t in tensors)
        if tracked:
            # The layers below the lowest one the backward will run through, as autograd will
            # ask it (needs_input_grad: the tensors' requires_grad), keep no saved state: a
            # frozen lower part of the stack (fine-tuning the top) kept as much as the rest.
            save_from = _base.lowest_layer_backward_runs(
                spec, any(t is not None and t.requires_grad for t in (x, h0, c0)),
                {n for n, p in zip(names, params) if p.requires_grad})
            out = _FusedStack.apply(_Run(spec, names, lengths, make_mask, watched, save_from),
                                    x, h0, c0, *params)
            _handoff.token = None  # (held by the graph now, if it needs it)
            y, hn = out[0], out[1]
            cn = out[2] if lstm else None
        else:
            weights = frozen.arrays if frozen else dict(zip(names, map(_np, params)))
            y, hn, cn, _ = _base.stack_forward(
                spec, weights, _np(x), _np(h0), _np(c0), lengths, save=False,
                make_mask=make_mask, checked=True, keep_packed=keep_packed,
                frozen=frozen.frozen_id if frozen else 0)
            y, hn = _torch.from_numpy(y), _torch.from_numpy(hn)
            cn = _torch.from_numpy(cn) if lstm else None
        if packed:
            output = _PackedSequence(y[index], batch_sizes, sorted_indices, unsorted_indices)
            if reorder:   # h_n (c_n) back in the caller's order, as torch.nn gives them
                hn = hn.index_select(1, unsorted_indices)
                cn = None if cn is None else cn.index_select(1, unsorted_indices)
            return (output, (hn, cn)) if lstm else (output, hn)
        return self._shaped_outputs(y, hn, cn, spec, unbatched)

    @staticmethod
    def _shaped_outputs(y, hn, cn, spec, unbatched):
        """(output, hn) or (output, (hn, cn)) as torch returns them, from the (T, B, ...) y."""
        if unbatched:
            output, hn = y.squeeze(1), hn.squeeze(1)
            cn = None if cn is None else cn.squeeze(1)
        else:
            output = y.transpose(0, 1) if spec.batch_first else y
        return (output, (hn, cn)) if spec.cell == "lstm" else (output, hn)

    def _check_state(self, name, t, spec, B, unbatched, width, dtype):
        _check_tensor(name, t, dtype)
        _check_not_nested(name, t)
        LD = spec.num_layers * spec.num_directions
        want = (LD, width) if unbatched else (LD, B, width)
        if tuple(t.shape) != want:
            raise _ShapeError(f"{name} must have shape {want}, got {tuple(t.shape)}")
        return t.unsqueeze(1) if unbatched else t

    def _check_hx_structure(self, hx, spec):
        """hx is None, (h0, c0) for an LSTM, or one tensor for the others."""
        if hx is None:
            return
        if spec.cell == "lstm":
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise _StateStructureError(
                    f"hx for LSTM must be a tuple (h0, c0) of tensors, got {type(hx).__name__}"
                    + (f" of {len(hx)}" if isinstance(hx, (tuple, list)) else ""))
        elif isinstance(hx, (tuple, list)):
            raise _StateStructureError(f"hx for {type(self).__name__} must be one tensor, got a "
                                       f"{type(hx).__name__} (only LSTM takes (h0, c0))")

    def _check_hx(self, hx, spec, B, unbatched, dtype):
        self._check_hx_structure(hx, spec)
        if hx is None:
            return None, None
        if spec.cell == "lstm":
            return (self._check_state("hx[0] (h0)", hx[0], spec, B, unbatched,
                                      spec.output_size, dtype),
                    self._check_state("hx[1] (c0)", hx[1], spec, B, unbatched,
                                      spec.hidden_size, dtype))
        return self._check_state("hx", hx, spec, B, unbatched, spec.hidden_size, dtype), None

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule first; the compiler's own error
        # pointed at a generator expression inside fusedrnn.
        raise RuntimeError(
            f"torch.jit.script does not support fusedrnn.torch.{type(self).__name__} (its "
            f"forward is Python around C++ kernels): use torch.jit.trace with Tensor inputs, "
            f"or script the torch.nn model")

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """torch's load_state_dict, also accepting NumPy arrays as values: with assign=True the
        parameters share a writable array's memory, as they would a tensor's. A read-only
        array (a frozen fusedrnn layer's) is copied: a tensor cannot be kept from writing it."""
        if isinstance(state_dict, Mapping):   # (else torch's TypeError names what it expects)
            metadata = getattr(state_dict, "_metadata", None)
            state_dict = OrderedDict(
                (k, _torch.from_numpy(v if v.flags.writeable else v.copy())
                 if isinstance(v, np.ndarray) else v) for k, v in state_dict.items())
            if metadata is not None:    # (the modules' versions, which their loading reads)
                state_dict._metadata = metadata
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_module(cls, module):
        """The fusedrnn version of a ``torch.nn`` module, sharing its parameters (no copy), so
        an optimiser built on the original keeps working; its other Parameters, buffers,
        submodules and attributes, and the training flag, are carried over too. What the copy
        would silently lose is refused: a subclass's overrides and additions, computed weights
        (parametrizations, pruning) and hooks."""
        if not isinstance(module, cls._torch_base):
            raise TypeError(f"{cls.__module__}.{cls.__name__}.from_module needs a "
                            f"torch.nn.{cls._torch_base.__name__}, got {type(module).__name__}")
        _refuse_computed_weights(module, cls)
        _refuse_overrides(module, cls)
        _refuse_hooks(module, cls)
        kwargs = dict(num_layers=module.num_layers, bias=module.bias,
                      batch_first=module.batch_first, dropout=module.dropout,
                      bidirectional=module.bidirectional, device="meta")
        if cls._torch_base is _torch.nn.LSTM:
            kwargs["proj_size"] = module.proj_size
        if cls._torch_base is _torch.nn.RNN:
            kwargs["nonlinearity"] = module.nonlinearity
        if cls._torch_base is _torch.nn.GRU:    # (from one of ours)
            kwargs["linear_before_reset"] = getattr(module, "linear_before_reset", True)
        with warnings.catch_warnings():     # torch already warned about dropout for `module`
            warnings.simplefilter("ignore")
            new = cls(module.input_size, module.hidden_size, **kwargs)
        for name in module._flat_weights_names:
            setattr(new, name, getattr(module, name))
        # (and torch's weak references to them, as torch.nn's own module holds: they named the
        # meta weights, so the first call took every weight as changed and evaluated a
        # parametrization registered since once fewer than torch.nn does)
        new._init_flat_weights()
        _carry_extra_state(module, new)
        new.training = module.training   # (not train(): carried submodules keep their modes)
        return new


class RNN(_FusedMixin, _torch.nn.RNN):
    """torch.nn.RNN on fusedrnn's kernels (tanh or relu)."""

    _torch_base = _torch.nn.RNN


class LSTM(_FusedMixin, _torch.nn.LSTM):
    """torch.nn.LSTM on fusedrnn's kernels (with projections)."""

    _torch_base = _torch.nn.LSTM


class GRU(_FusedMixin, _torch.nn.GRU):
    """torch.nn.GRU on fusedrnn's kernels; ``linear_before_reset=False`` selects the original
    GRU formulation (ONNX's default), which torch does not have."""

    _torch_base = _torch.nn.GRU

    def __init__(self, *args, linear_before_reset=True, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(linear_before_reset, bool):
            raise TypeError(f"linear_before_reset must be a bool, "
                            f"got {type(linear_before_reset).__name__}")
        self.linear_before_reset = linear_before_reset

    def extra_repr(self):
        s = super().extra_repr()
        return s if self.linear_before_reset else s + ", linear_before_reset=False"
