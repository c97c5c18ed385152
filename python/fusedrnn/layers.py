"""torch.nn-shaped RNN, LSTM and GRU layers on NumPy arrays, with training (backward).

    rnn = fusedrnn.LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                        dropout=0.0, bidirectional=False, proj_size=0, device=None,
                        dtype=np.float32, seed=None)
    y, (hn, cn) = rnn(x, hx=None, lengths=None)     # RNN and GRU: y, hn = rnn(x, hx)
    dx, (dh0, dc0) = rnn.backward(dy, dhn=None)     # RNN and GRU: dx, dh0 = rnn.backward(dy, dhn)

Shapes, parameter names, gate order, lengths and initialisation follow torch.nn (see
shared/DESIGN.md, "Conventions"). Each layer and direction is one call of the C++ kernels
(``fusedrnn.functional``; a one-way stack without lengths or dropout, one call for every
layer), which run the whole time loop with the GIL released.

Semantics chosen where NumPy and torch differ:

- Parameters are plain arrays. ``named_parameters()``, ``parameters()`` and ``state_dict()``
  return the live arrays (as torch's ``state_dict()`` returns tensors sharing storage), so an
  in-place update (``p -= lr * g``) changes the layer; copy them (``copy.deepcopy``) to keep a
  snapshot. ``load_state_dict`` copies values into those same arrays, cast to the layer's dtype
  as torch's does, and ``reset_parameters()`` draws new ones into them (torch's init, from the
  layer's ``seed``).
- ``grads`` holds one array per parameter (same keys as ``state_dict()``), allocated once;
  ``backward`` adds into them in place and ``zero_grad()`` sets them to zero.
  ``zero_grad(set_to_none=True)`` (torch's default) sets every entry to None instead, as torch's
  ``.grad``; the next backward writes the gradients into new arrays, as torch's does: an array
  taken from ``grads`` before keeps its values. (Arrays nothing else holds are written over in
  place, with no pass of zeros first: the same result, without new memory.)
- ``backward`` uses the most recent forward run in training mode and then frees what it kept
  (as torch frees the graph): a second backward needs a new forward, and a copy of the layer
  (``copy.deepcopy``, pickle) has none to run backward through. Update parameters only after
  backward: the kernels read them again in backward (torch raises an error for such in-place
  changes; NumPy cannot detect them). ``x`` may be overwritten: the forward keeps a copy.
- ``dtype`` takes NumPy's and torch's float32 and float64; None means float32, torch's default.
  ``device`` takes torch's None or the CPU and refuses any other device. ``double()``,
  ``float()`` and ``to(dtype)`` cast the parameters and gradients into new arrays (torch swaps
  a parameter's data; a NumPy array keeps its dtype): take ``named_parameters()`` again after.
- Inputs must have the layer's dtype exactly; nothing is cast silently. Outputs for
  ``batch_first=True`` are transposed views of time-major arrays, as in torch.
- A layer object keeps the state of its last training forward, so in training one layer must
  not be called from several threads at once (a training forward or backward that meets
  another thread's raises RuntimeError, as does a backward whose thread's forward another
  thread's replaced); separate layers may be (the kernels release the GIL).
  In eval mode (frozen or not) one layer may serve calls from several threads at once, as a
  server shares one model: such calls keep nothing on the layer.
"""
import collections
import collections.abc
import itertools
import sys
import threading

import numpy as np

from . import _layer_base as base
from ._validate import (ShapeError, StateStructureError, TorchValueTypeError, as_array,
                        as_dtype_array, as_lengths, check_shape)

__all__ = ["RNN", "LSTM", "GRU"]


def _reference_count(array):
    # Where Python counts no references (not CPython), every array counts as held elsewhere.
    return sys.getrefcount(array) if hasattr(sys, "getrefcount") else sys.maxsize


def _references_of_an_unheld_local():
    # What _reference_count reports for a function's local that nothing else holds, in the call
    # shape zero_grad uses (how many references a call adds differs between Python versions).
    g = np.empty(0)
    return _reference_count(g)


class IncompatibleKeys(collections.namedtuple("IncompatibleKeys",
                                              ["missing_keys", "unexpected_keys"])):
    """What load_state_dict returns, as torch's (its _IncompatibleKeys): the layer's names the
    state dict lacked and the state dict's names the layer has not."""
    __slots__ = ()

    def __repr__(self):
        # torch's words where every key matched, which a notebook shows after a load
        if not self.missing_keys and not self.unexpected_keys:
            return "<All keys matched successfully>"
        return super().__repr__()

    __str__ = __repr__


class _MismatchError(ValueError, RuntimeError):
    """Values that do not fit the layer's parameters (names, shapes): a ValueError, as fusedrnn
    raises for bad values, and a RuntimeError, as torch.nn's load_state_dict raises, so
    ``except RuntimeError`` written for torch still catches it."""


# Ids of frozen parameter sets (freeze()), never reused in a process: the kernels' cache of
# packed weights trusts an id for the memory it first compared under it.
_FROZEN_IDS = itertools.count(1)


class _FrozenParams(dict):
    """A frozen layer's parameters (read-only copies, freeze()) and the id the kernels may trust
    for them, in one object: a call reads the layer's parameters once and gets the id that goes
    with them, whatever another thread freezes or unfreezes meanwhile (a separate id read a
    moment later could belong to the next parameter set: about once in 18k calls racing
    freeze(), the kernels refused writable weights under a frozen id). frozen_id drops to 0,
    for good, once a writable array is found among them."""

    def __init__(self, params, frozen_id):
        super().__init__(params)
        self.frozen_id = frozen_id


def _frozen_id_of(params):
    """The frozen id the kernels may trust for this parameter set (0: none)."""
    frozen_id = getattr(params, "frozen_id", 0)
    if frozen_id and any(p.flags.writeable for p in params.values()):
        params.frozen_id = frozen_id = 0
    return frozen_id


def _torch_init(spec, rng, dtype):
    """torch.nn's init: every parameter U(-1/sqrt(H), 1/sqrt(H)), drawn from ``rng`` in torch's
    order (so one seed gives one set of values)."""
    bound = 1.0 / np.sqrt(spec.hidden_size)
    return {name: rng.uniform(-bound, bound, size=shape).astype(dtype)
            for name, shape in spec.param_shapes().items()}


def _is_torch_dtype(a):
    """Whether ``a`` is a torch.dtype (torch.float64), without importing torch."""
    return type(a).__module__ == "torch" and type(a).__name__ == "dtype"


def _is_torch_tensor(a):
    """Whether ``a`` is a torch.Tensor (a Parameter too), without importing torch."""
    return type(a).__module__.startswith("torch") and all(
        hasattr(a, k) for k in ("dtype", "device", "detach"))


def _immutable_copy(a):
    """A read-only copy of ``a`` that NumPy refuses to make writable: its memory is a bytes
    object's."""
    return np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape)


def _as_array(name, a, dtype):
    """``a`` as an ndarray of exactly the layer's ``dtype`` (no copy, no cast)."""
    return as_dtype_array(name, a, dtype, whose=" (the layer's dtype)")


class _Layer:
    """The machinery common to RNN, LSTM and GRU; see the module docstring."""

    _name = None            # class name shown in messages

    def __init__(self, spec, device, dtype, seed):
        base.check_device(device)
        self._spec = spec
        self.dtype = base.check_dtype(dtype)
        seed = base.check_seed(seed)
        init_seq, dropout_seq = np.random.SeedSequence(seed).spawn(2)
        self._init_rng = np.random.default_rng(init_seq)   # kept for reset_parameters()
        self._dropout_rng = np.random.default_rng(dropout_seq)
        self._params = _torch_init(spec, self._init_rng, self.dtype)
        self.grads = {name: np.zeros_like(p) for name, p in self._params.items()}
        self._spare_grads = {}  # the arrays of grads entries set to None (zero_grad)
        self.training = True
        self._saved = None
        self._why_no_saved = "no forward has run yet"
        # (__dict__["_training_owner"]: the thread in a training forward or backward, absent
        # between them; _claim_training_call)

    # -- torch.nn-style attributes (read-only where the parameter shapes depend on them)
    input_size = property(lambda self: self._spec.input_size, doc="Features of each input step.")
    hidden_size = property(lambda self: self._spec.hidden_size,
                           doc="Features of the hidden state (and of the LSTM's cell state).")
    num_layers = property(lambda self: self._spec.num_layers, doc="Stacked recurrent layers.")
    bias = property(lambda self: self._spec.bias,
                    doc="Whether the layers have bias_ih and bias_hh.")
    bidirectional = property(lambda self: self._spec.bidirectional,
                             doc="Whether each layer also runs backwards in time (2 directions).")

    # batch_first and dropout may be set, as on a torch.nn module: the next forward uses them.
    @property
    def batch_first(self):
        """x, y and dy batch first, (B, T, ...), rather than (T, B, ...). Settable, as on a
        torch.nn module: the next forward uses it (a change drops a pending backward)."""
        return self._spec.batch_first

    @batch_first.setter
    def batch_first(self, value):
        value = base.check_bool("batch_first", value)
        if value != self._spec.batch_first:
            self._spec = self._spec.replaced(batch_first=value)
            # dy would be read in the other layout: the pending backward goes
            self._forget("batch_first changed after the last training forward; run forward again")

    @property
    def dropout(self):
        """Dropout probability on every layer's output but the last's, in training. Settable, as
        on a torch.nn module: the next forward uses it."""
        return self._spec.dropout

    @dropout.setter
    def dropout(self, value):
        self._spec = self._spec.replaced(dropout=base.check_dropout(value))

    proj_size = property(lambda self: self._spec.proj_size,
                         doc="The LSTM's projection size; 0 for none (always, for RNN and GRU).")
    mode = property(lambda self: self._spec.cell.upper(),
                    doc="torch's mode string: 'RNN_TANH', 'RNN_RELU', 'LSTM' or 'GRU'.")

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self):
        """What goes between the repr's parentheses, as torch.nn's: the sizes and the options
        not at their defaults, in torch's order, then those torch has not (nonlinearity,
        linear_before_reset, dtype: a torch module's repr does not show them)."""
        s = self._spec
        parts = [str(s.input_size), str(s.hidden_size)]
        defaults = dict(proj_size=0, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                        bidirectional=False)
        parts += [f"{k}={getattr(s, k)}" for k, v in defaults.items() if getattr(s, k) != v]
        parts += self._extra_repr()
        if self.dtype != np.float32:
            parts.append(f"dtype={self.dtype.name}")
        return ", ".join(parts)

    def _extra_repr(self):
        return []

    # -- modes
    def train(self, mode=True):
        """Training mode (the default): dropout on, forward keeps what backward needs."""
        if not isinstance(mode, (bool, np.bool_)):
            raise TorchValueTypeError(f"mode must be a bool, got {type(mode).__name__}")
        self.training = bool(mode)
        return self

    def eval(self):
        """Inference mode: no dropout, forward keeps nothing (no backward)."""
        return self.train(False)

    def reset_parameters(self):
        """Draw every parameter again as the constructor does (torch.nn's
        U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)), in torch's order), from the layer's own
        generator (``seed``), which goes on from its last draws: two layers of one seed reset
        alike. The values go into the same arrays, so references to them (an optimiser's) stay
        the layer's. ``grads`` are kept, as torch keeps ``.grad``; a pending backward is
        dropped. A frozen layer refuses (its promise covers the values): ``unfreeze()`` it
        first."""
        params = self._writable_params("resetting its parameters")
        for name, value in _torch_init(self._spec, self._init_rng, self.dtype).items():
            np.copyto(params[name], value)
        self._forget("the parameters were reset (reset_parameters()) since the last forward")

    def flatten_parameters(self):
        """torch.nn's call to lay the weights out for cuDNN, which models make before forward:
        nothing to do here (the kernels pack the weights themselves), so code that calls it
        runs unchanged."""

    # -- dtype and device (torch.nn.Module's casts)
    def to(self, *args, device=None, dtype=None, non_blocking=False):
        """torch.nn.Module.to on the CPU: ``to(dtype)``, ``to(device)``, ``to(device, dtype)``,
        ``to(tensor)`` (its dtype and device) or the keywords. The device must be the CPU; the
        dtype float32 or float64, NumPy's or torch's (a str is a device, as torch reads it).
        Returns the layer; a new dtype gives new arrays for the parameters and gradients: take
        ``named_parameters()`` again."""
        if len(args) == 1 and _is_torch_tensor(args[0]):
            args = (args[0].device, args[0].dtype)
        for a in args:
            if isinstance(a, (np.dtype, type)) or _is_torch_dtype(a):
                if dtype is not None:
                    raise TypeError(f"to() got a dtype twice: {dtype!r} and {a!r}")
                dtype = a
            else:
                if device is not None:
                    raise TypeError(f"to() got a device twice: {device!r} and {a!r}")
                device = a
        base.check_device(device)
        base.check_bool("non_blocking", non_blocking)
        return self if dtype is None else self._cast(base.check_dtype(dtype))

    def float(self):
        """float32 parameters and gradients, as torch.nn.Module.float(); returns the layer. A new
        dtype gives new arrays: take ``named_parameters()`` again."""
        return self._cast(np.dtype(np.float32))

    def double(self):
        """float64 parameters and gradients, as torch.nn.Module.double(); returns the layer. A
        new dtype gives new arrays: take ``named_parameters()`` again."""
        return self._cast(np.dtype(np.float64))

    def cpu(self):
        """torch.nn.Module.cpu(): the layer is on the CPU already."""
        return self

    def _cast(self, dtype):
        """The layer in ``dtype``. A new dtype gives the parameters and gradients as new arrays
        (NumPy cannot change an array's dtype in place, where torch swaps a parameter's data):
        arrays taken before, an optimiser's among them, are no longer the layer's, so take
        ``named_parameters()`` again (torch asks the same of optimisers built before a move
        to another device). A frozen layer stays frozen, under a new id; a pending backward is
        dropped. Not while other threads call the layer (theirs may meet the other dtype)."""
        if dtype == self.dtype:
            return self
        old = self._params   # read once: its values and whether frozen go together
        params = {name: p.astype(dtype) for name, p in old.items()}
        if _frozen_id_of(old):
            params = _FrozenParams({name: _immutable_copy(p) for name, p in params.items()},
                                   next(_FROZEN_IDS))
        self.grads = {name: None if g is None else g.astype(dtype)
                      for name, g in self.grads.items()}
        self._spare_grads.clear()       # of the old dtype: no use to backward now
        self._params = params
        self.dtype = dtype
        self._forget(f"the layer was cast to {dtype.name} since the last forward")
        return self

    # -- parameters
    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        """(name, array) pairs in torch's order; the arrays are the layer's own (live). As
        torch's, a ``prefix`` goes before each name with a dot (``"rnn"``: ``"rnn.weight_ih_l0"``);
        ``recurse`` and ``remove_duplicate`` change nothing (no submodules, no shared arrays)."""
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        base.check_bool("recurse", recurse)
        base.check_bool("remove_duplicate", remove_duplicate)
        dotted = prefix + "." if prefix else ""
        return ((dotted + name, p) for name, p in self._params.items())

    def parameters(self, recurse=True):
        """The live parameter arrays in torch's order; ``recurse`` as torch's (no submodules)."""
        base.check_bool("recurse", recurse)
        return iter(self._params.values())

    def state_dict(self, destination=None, prefix="", keep_vars=False):
        """{prefix + torch name: array}: the live parameter arrays (copy them to keep a
        snapshot). As torch's: ``prefix`` goes before every name as it is (``"rnn."``), and a
        ``destination`` mapping is filled and returned; ``keep_vars`` changes nothing here (the
        arrays are the parameters either way)."""
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        base.check_bool("keep_vars", keep_vars)
        if destination is None:
            destination = collections.OrderedDict()  # torch's type, which code may test for
        elif not isinstance(destination, collections.abc.MutableMapping):
            raise TypeError(f"destination must be None or a mutable mapping (a dict) to fill, "
                            f"got {type(destination).__name__}")
        for name, p in self._params.items():
            destination[prefix + name] = p
        return destination

    # torch.nn's parameter attributes (rnn.weight_ih_l0, ...): the live arrays, as
    # named_parameters() gives them. Assigning one copies into that array, checked as
    # load_state_dict checks: a plain attribute of that name would shadow the parameter and be
    # ignored by forward, a silent wrong answer.
    def __getattr__(self, name):
        params = self.__dict__.get("_params")
        if params is not None and name in params:
            return params[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        params = self.__dict__.get("_params")
        if params is not None and name in params:
            self._copy_into_params({name: value})
            return
        object.__setattr__(self, name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self.__dict__.get("_params", ())))

    @property
    def _flat_weights_names(self):
        """torch.nn.RNNBase's list of parameter names in its order (private there, yet read by
        code that rewraps an RNN's weights, as weight drop does)."""
        return list(self._params)

    @property
    def _flat_weights(self):
        """The live parameter arrays in _flat_weights_names' order, as torch.nn.RNNBase's list
        of its Parameters (read beside the names by the same code)."""
        return list(self._params.values())

    @property
    def all_weights(self):
        """Per layer and direction, its parameters in torch's order (as torch's all_weights)."""
        s, groups = self._spec, []
        for k in range(s.num_layers):
            for d in range(s.num_directions):
                suffix = f"_l{k}" + ("_reverse" if d else "")
                groups.append([p for name, p in self._params.items() if name.endswith(suffix)])
        return groups

    # -- frozen parameters (deployment)
    def freeze(self):
        """Promise that the parameters will not change, for faster calls: the layer keeps
        read-only copies of its parameters (named_parameters(), state_dict() and the attributes
        give those from now on; arrays taken before no longer belong to the layer), and each
        call reuses the kernels' packed weights without comparing the parameters with the
        copies of their bytes that the kernels keep (a memcmp of every weight; frozen, 1 thread:
        2-10% less time at the benchmark's sizes, a one-step LSTM call 34 -> 16 us), as ONNX
        Runtime takes its weights as constants. Loading or assigning parameters needs
        ``unfreeze()`` first; training still works (gradients into ``grads``), but not updating
        the parameters in place. The copies cannot be made writable again
        (``flags.writeable = True`` raises): a parameter made writable, changed and made
        read-only again between two calls would have gone unseen. Returns the layer."""
        if not self._frozen_now():
            self._params = _FrozenParams(
                {name: _immutable_copy(p) for name, p in self._params.items()}, next(_FROZEN_IDS))
            self._forget("the layer was frozen since the last forward")
        return self

    def unfreeze(self):
        """Writable parameters again (copies of the read-only ones); returns the layer."""
        if any(not p.flags.writeable for p in self._params.values()):
            self._params = {name: p if p.flags.writeable else p.copy()
                            for name, p in self._params.items()}
            self._forget("the layer was unfrozen since the last forward")
        return self

    @property
    def frozen(self):
        """Whether the layer is frozen (freeze())."""
        return bool(self._frozen_now())

    def _writable_params(self, doing):
        """The parameters, read once, for writing into; refused while any of them is read-only
        (frozen, or one frozen copy left among writable ones), before anything is written: a
        write stopped halfway would leave the layer half changed."""
        params = self._params
        if any(not p.flags.writeable for p in params.values()):
            raise RuntimeError(f"{type(self).__name__} is frozen (freeze()): unfreeze() it before "
                               f"{doing}")
        return params

    def _frozen_now(self):
        """The frozen id the kernels may trust (0: none). The frozen copies cannot be made
        writable; a writable array put in their place (by reaching into the layer) ends the
        promise all the same."""
        return _frozen_id_of(self._params)

    def __getstate__(self):
        # The kernels' saved state of a pending training forward (a _C.Context) stays with this
        # layer: a copy starts with no forward to run backward through, as torch's modules keep
        # no graph.
        state = self.__dict__.copy()
        state.pop("_training_owner", None)   # (another thread's claim: not the copy's)
        state.pop("_replaced_threads", None)  # (threads of the original's forwards)
        if state.get("_saved") is not None:
            state["_saved"] = None
            state["_why_no_saved"] = ("this layer is a copy (copy.deepcopy or pickle) made after "
                                      "the original's training forward, which only the original "
                                      "can run backward through")
        return state

    def __setstate__(self, state):
        # A copy (copy.deepcopy, pickle) has parameters at other addresses, or in another process
        # where this id may be taken: it freezes again under a new id.
        self.__dict__.update(state)
        # (pickled by earlier versions: a lock's owner, None between calls, which would claim)
        self.__dict__.pop("_training_owner", None)
        self.__dict__.pop("_training_call", None)
        self.__dict__.pop("_grads_verdict", None)  # another copy's arrays: checked afresh
        self.__dict__.setdefault("_spare_grads", {})  # pickled before zero_grad(set_to_none)
        self.__dict__.setdefault("_init_rng", np.random.default_rng())  # before reset_parameters
        params = self.__dict__["_params"]
        if getattr(params, "frozen_id", 0):   # (the copied arrays may have come back writable)
            self.__dict__["_params"] = dict(params)
            self.freeze()
            self.__dict__["_why_no_saved"] = state.get("_why_no_saved",  # (not freeze()'s)
                                                       self._why_no_saved)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Copy parameters from a mapping of torch names to arrays (NumPy arrays, a torch
        ``state_dict()``, anything ``np.asarray`` accepts). Every name and shape is checked
        before anything is copied; values of another float dtype are cast as torch does.
        As torch's: ``strict=False`` loads the names the layer has and leaves the rest of its
        parameters as they are, and the result names the keys each side lacked
        (``missing_keys``, ``unexpected_keys``); keys that do not match (strict) or a misshaped
        value raise an error that is a ValueError and, as torch's, a RuntimeError (torch's
        raises after copying what fits; ours copies nothing). ``assign=True`` (torch: keep the
        state dict's tensors as the parameters) is refused: the layer's parameters are its own
        arrays."""
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping of names to arrays, "
                            f"got {type(state_dict).__name__}")
        strict = base.check_bool("strict", strict)
        if base.check_bool("assign", assign):
            raise ValueError("assign=True is not supported: the layer keeps its own parameter "
                             "arrays and load_state_dict copies the values into them")
        expected = self._spec.param_shapes()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict.keys() if k not in expected]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected}")
            raise _MismatchError(f"state_dict does not match {self!r}: {' and '.join(parts)}")
        self._copy_into_params({name: state_dict[name] for name in expected if name in state_dict},
                               label="state_dict[{!r}]")
        return IncompatibleKeys(missing, unexpected)

    def _copy_into_params(self, values, label="{}"):
        """Copies {name: array-like} into the live parameter arrays once every value has the
        parameter's shape and a float dtype (cast as torch does); nothing is copied otherwise."""
        params = self._writable_params("loading or assigning parameters")
        expected = self._spec.param_shapes()
        checked = {}
        for name, value in values.items():
            what = label.format(name)
            if value is None:  # (torch takes it, and its next forward fails)
                raise TypeError(f"{what} must be an array of shape {expected[name]}, got None: "
                                f"a layer's parameters stay (bias=False leaves out the biases)")
            v = _to_numpy(value, what)
            if v.dtype.kind != "f":
                raise TypeError(f"{what} must have a float dtype, got {v.dtype.name}")
            if v.shape != expected[name]:
                raise _MismatchError(f"{what} must have shape {expected[name]}, got {v.shape}")
            checked[name] = v
        for name, v in checked.items():
            np.copyto(params[name], v, casting="same_kind")
        self._forget("the parameters were reloaded since the last forward")

    def zero_grad(self, set_to_none=False):
        """Set every gradient in ``grads`` to zero, in place; or, with ``set_to_none=True``
        (what torch's ``zero_grad()`` does by default), every entry to None, as torch's
        ``.grad``: the next backward then gives new gradient arrays, and arrays taken from
        ``grads`` before keep their values. The layer writes over an array of its own that
        nothing else holds (no pass of zeros first: stacked LSTM training, 1 thread: 37.0 ->
        36.2 ms)."""
        # Counted at each call, not once: a tracer reading frames' locals (a debugger's) adds a
        # reference to every local while it runs, and one running at import made arrays the
        # caller held look unheld.
        unheld = _references_of_an_unheld_local() if set_to_none else 0
        for name in list(self.grads):
            g = self.grads[name]
            if set_to_none:
                self.grads[name] = None
                # Held by nothing but g and perhaps the verdict on the arrays (which keeps their
                # ids theirs): no name, view or container of the caller's, which a later
                # backward must not write over. Only an array owning its memory: a view's own
                # views (the caller's) name its base, not it (NumPy collapses chains of views),
                # so its count misses them. (g stays a plain local, as in the baseline's count.)
                if (isinstance(g, np.ndarray) and g.flags.owndata and _reference_count(g)
                        <= unheld + (id(g) in self._grads_verdict[0])):
                    self._spare_grads[name] = g
            elif g is None:
                self.grads[name] = self._zeroed_gradient(name)
            else:
                g.fill(0)

    def _zeroed_gradient(self, name):
        """A zero gradient for a None entry: its spare array zeroed, or a new one."""
        spare = self._spare_grads.pop(name, None)
        p = self._params[name]
        if isinstance(spare, np.ndarray) and spare.shape == p.shape and spare.dtype == p.dtype:
            spare.fill(0)
            return spare
        return np.zeros_like(p)

    # -- forward
    def __call__(self, input, hx=None, lengths=None):
        """``layer(input, hx=None, lengths=None)``: forward()."""
        return self.forward(input, hx, lengths)

    def forward(self, input, hx=None, lengths=None):
        """``y, hn = layer(input, hx=None, lengths=None)`` (LSTM: ``y, (hn, cn)``, hx ``(h0, c0)``),
        as torch.nn's, whose argument names these are (``layer(input=x, hx=h)`` works alike).
        input: (T, B, input_size), (B, T, input_size) with ``batch_first``, or unbatched
        (T, input_size); h0 and hn: (num_layers * num_directions, B, proj_size or hidden_size),
        c0 and cn: (num_layers * num_directions, B, hidden_size), without B for an unbatched
        input; hx None: zeros. y: (T, B, num_directions * (proj_size or hidden_size)) in the
        input's layout.
        ``lengths`` (one int per batch row, 1..T): as a PackedSequence padded back, y is 0 past
        a row's length and hn its state there. In training mode (the default) the call keeps
        what ``backward`` needs."""
        s = self._spec
        x = _as_array("input", input, self.dtype)
        if x.ndim not in (2, 3) or x.shape[-1] != s.input_size:
            raise ShapeError(f"input must have shape {self._x_desc()} or (T, {s.input_size}) "
                             f"unbatched, got {x.shape}")
        unbatched = x.ndim == 2
        if unbatched:
            x_tm = x[:, None, :]
        elif s.batch_first:
            x_tm = x.transpose(1, 0, 2)
        else:
            x_tm = x
        T, B = x_tm.shape[:2]
        if T < 1:
            raise ShapeError(f"input must have at least one time step, got shape {x.shape}")
        h0, c0 = self._check_hx(hx, B, unbatched)
        if lengths is not None and unbatched:
            raise ValueError("lengths is for batched input; for an unbatched input (T, I) "
                             "pass input[:length] instead")
        lengths = _as_lengths(lengths, T, B)
        make_mask = None
        if base.dropout_active(s, self.training):
            make_mask = base.numpy_mask_maker(self._dropout_rng, s.dropout, self.dtype)
        params = self._params   # read once: its frozen id goes with it (_FrozenParams)
        training = self.training
        if training:
            self._claim_training_call("forward")
        try:
            y, hn, cn, saved = base.stack_forward(s, params, x_tm, h0, c0, lengths,
                                                  save=training, make_mask=make_mask,
                                                  checked=True, frozen=_frozen_id_of(params))
            if training:
                self._keep_for_backward(saved, T, B, unbatched)
            else:
                self._forget("the last forward ran in eval mode (call layer.train() first)")
        finally:
            if training:
                self.__dict__.pop("_training_owner", None)
        return self._user_layout(y, unbatched), self._pack_state(hn, cn, unbatched)

    def _claim_training_call(self, what):
        """A training forward or a backward runs alone on the layer (pop
        __dict__["_training_owner"] after): another thread's, meeting it, would take or replace
        the state this one saves, silently (its backward then runs through the other's forward).
        Such a call raises instead; eval calls share the layer freely. (Not a context manager:
        that cost 1 us a call, against 0.15.) A claim held by the calling thread itself is stale:
        its call was interrupted (a KeyboardInterrupt between the claim and the release), and is
        taken over; else such a layer would refuse every training call for good. The claim and
        its owner are one dict.setdefault, atomic: a lock taken and then the owner written after
        it left the last owner's name standing between the two, and that thread, calling again
        there, took the other's fresh claim for its own stale one and ran beside it."""
        me = threading.get_ident()
        if self.__dict__.setdefault("_training_owner", me) != me:
            raise RuntimeError(f"{type(self).__name__}.{what}: another thread is in a training "
                               f"forward or backward of this layer; in training one layer object "
                               f"serves one thread at a time (give each thread its own copy, "
                               f"copy.deepcopy, or call it in eval mode)")

    def _keep_for_backward(self, saved, T, B, unbatched):
        """Keep a training forward's saved state for the next backward, with the calling
        thread's name. A pending forward of another thread that this one replaces leaves that
        thread's name in _replaced_threads: its backward would run through this forward, which
        _claim_training_call does not see where the calls did not overlap (thread A's forward,
        B's, then A's backward), so that backward raises instead. A backward from a thread with
        no forward replaced (a forward handed over to another thread) still runs."""
        me = threading.get_ident()
        d = self.__dict__
        pending = d["_saved"]
        replaced = d.get("_replaced_threads", frozenset()) - {me}
        if pending is not None and pending[4] != me:
            replaced |= {pending[4]}
        d["_replaced_threads"] = replaced
        d["_saved"] = (saved, T, B, unbatched, me)

    def _x_desc(self):
        s = self._spec
        return f"({'B, T' if s.batch_first else 'T, B'}, {s.input_size})"

    def _check_state(self, name, a, B, unbatched, width, width_name):
        s = self._spec
        a = _as_array(name, a, self.dtype)
        LD = s.num_layers * s.num_directions
        want = (LD, width) if unbatched else (LD, B, width)
        if a.shape != want:
            what = ("(num_layers*num_directions" + ("" if unbatched else ", batch")
                    + f", {width_name})")
            raise ShapeError(f"{name} must have shape {want} {what}, got {a.shape}")
        return np.ascontiguousarray(a[:, None, :] if unbatched else a)

    def _check_hx(self, hx, B, unbatched):
        """hx for RNN / GRU: one array, or None. Returns (h0, None)."""
        if hx is None:
            return None, None
        if isinstance(hx, (tuple, list)):
            raise StateStructureError(f"hx for {type(self).__name__} must be one array "
                                      f"(num_layers*num_directions, batch, hidden_size), got a "
                                      f"{type(hx).__name__} (only LSTM takes (h0, c0))")
        return self._check_state("hx", hx, B, unbatched, self.hidden_size, "hidden_size"), None

    def _pack_state(self, hn, cn, unbatched):
        return hn[:, 0] if unbatched else hn

    def _user_layout(self, a, unbatched):
        """(T, B, N) time-major -> the caller's layout (a view)."""
        if unbatched:
            return a[:, 0]
        return a.transpose(1, 0, 2) if self._spec.batch_first else a

    def _forget(self, why):
        # (into __dict__: neither is a parameter, and every eval call comes here, where
        # __setattr__'s parameter check cost two Python calls)
        d = self.__dict__
        d["_saved"] = None
        d["_why_no_saved"] = why

    # -- backward
    def backward(self, dy, dhn=None, *, need_dx=True, need_weight_grads=True):
        """BPTT through the most recent training forward.

        dy: gradient of the loss with respect to y (y's shape), or None for zero; dhn: with
        respect to hn (LSTM: (dhn, dcn), either may be None), or None. Adds the parameter
        gradients into ``grads``; returns (dx, dh0) (LSTM: (dx, (dh0, dc0))), dh0 being the
        gradient at the zero state where the forward had no hx.
        ``need_dx=False`` (x is data, not an upstream layer's output) returns None for dx and
        ``need_weight_grads=False`` (the layer is not trained) leaves ``grads`` as it is; both
        skip their share of the work, as torch's autograd skips what needs no gradient.
        """
        self._claim_training_call("backward")
        try:
            return self._backward(dy, dhn, need_dx, need_weight_grads)
        finally:
            self.__dict__.pop("_training_owner", None)

    def _backward(self, dy, dhn, need_dx=True, need_weight_grads=True):
        if self._saved is None:
            raise RuntimeError(f"backward needs a forward in training mode first: "
                               f"{self._why_no_saved}")
        saved, T, B, unbatched, forward_thread = self._saved
        me = threading.get_ident()
        if forward_thread != me and me in self.__dict__.get("_replaced_threads", ()):
            raise RuntimeError(f"{type(self).__name__}.backward: this thread's training forward "
                               f"was replaced by another thread's forward before this backward; "
                               f"in training one layer object serves one thread at a time (give "
                               f"each thread its own copy, copy.deepcopy)")
        s = self._spec
        y_shape_tm = (T, B, s.num_directions * s.output_size)
        # (the layout's shape from a broadcast view: np.empty of y's shape allocated T*B*N bytes)
        y_shape = self._user_layout(np.broadcast_to(False, y_shape_tm), unbatched).shape
        if dy is None:
            dy_tm = np.zeros(y_shape_tm, self.dtype)
        else:
            dy = _as_array("dy", dy, self.dtype)
            check_shape("dy", dy, y_shape)
            if unbatched:
                dy_tm = dy[:, None, :]
            elif s.batch_first:
                dy_tm = dy.transpose(1, 0, 2)
            else:
                dy_tm = dy
        dh, dc = self._split_dhn(dhn, B, unbatched)
        if not need_weight_grads:
            dx, dh0, dc0, _ = base.stack_backward(s, saved, dy_tm, dh, dc, consume=True,
                                                  need_dx=need_dx, weight_grads=())
            return self._finish_backward(dx, dh0, dc0, unbatched)
        # The saved state is forgotten below, so the kernels may reuse it (consume). The kernels
        # add into grads themselves where its arrays allow (see _grads_to_add_into); gradients
        # all set to None (zero_grad(set_to_none=True)) they write over their spare arrays.
        reset = all(g is None for g in self.grads.values())
        if reset:
            spare = {name: self._spare_grads.get(name) for name in self._params}
            into = self._grads_to_add_into(spare) or {
                name: np.empty_like(p) for name, p in self._params.items()}
        else:
            for name, g in self.grads.items():
                if g is None:  # some set to None, not all: those start from zero
                    self.grads[name] = self._zeroed_gradient(name)
            into = self._grads_to_add_into(self.grads)
        dx, dh0, dc0, grads = base.stack_backward(s, saved, dy_tm, dh, dc, consume=True,
                                                  grads_into=into, add_into=not reset,
                                                  need_dx=need_dx)
        if reset:
            self.grads.update(grads)
            self._spare_grads.clear()
        elif into is None:
            for name, g in grads.items():
                self.grads[name] += g
        return self._finish_backward(dx, dh0, dc0, unbatched)

    def _finish_backward(self, dx, dh0, dc0, unbatched):
        self._forget("backward already ran for the last forward (its saved state is freed; "
                     "run forward again)")
        dx = None if dx is None else self._user_layout(dx, unbatched)
        return dx, self._pack_state(dh0, dc0, unbatched)

    def _grads_to_add_into(self, grads):
        """``grads`` (``self.grads``, or the spare arrays) for the kernels to write into in place
        (saving an array per gradient and a pass over it), or None where an array was swapped
        for one they cannot write so (another dtype or shape, not C-contiguous or writeable, or
        sharing memory with a parameter or another gradient, or misaligned): those are added into
        by NumPy.
        The verdict is kept while the same arrays are in place (checking them was 10 us of a
        40 us one-step training call)."""
        arrays = (*grads.values(), *self._params.values())
        key = tuple(map(id, arrays))
        if key != self._grads_verdict[0]:
            self._grads_verdict = (key, arrays, self._grads_take_adds(grads))
        return grads if self._grads_verdict[2] else None

    _grads_verdict = ((), (), False)  # (ids, the arrays, which keeps those ids theirs, verdict)

    def _grads_take_adds(self, grads):
        """Whether every gradient array can take the kernels' writes in place (see above)."""
        arrays = list(grads.values())
        for name, p in self._params.items():
            g = grads.get(name)
            # (aligned too: the kernels refuse a misaligned array, np.frombuffer at an offset)
            if not (isinstance(g, np.ndarray) and g.dtype == self.dtype and g.shape == p.shape
                    and g.flags.c_contiguous and g.flags.writeable and g.flags.aligned):
                return False
            if any(np.may_share_memory(g, other) for other in self._params.values()):
                return False
            if sum(np.may_share_memory(g, other) for other in arrays) > 1:
                return False
        return True

    def _split_dhn(self, dhn, B, unbatched):
        if dhn is None:
            return None, None
        if isinstance(dhn, (tuple, list)):
            raise StateStructureError(f"dhn for {type(self).__name__} must be one array "
                                      f"(hn's shape), got a {type(dhn).__name__}")
        return self._check_state("dhn", dhn, B, unbatched, self._spec.output_size,
                                 "hidden_size"), None


def _as_lengths(lengths, T, B):
    """_validate.as_lengths, also taking an empty list (float64 to NumPy) for a batch of 0."""
    if isinstance(lengths, (list, tuple)) and len(lengths) == 0:
        lengths = np.zeros(0, np.int64)
    return as_lengths(lengths, T, B)


def _to_numpy(v, what="value"):
    """An array from a state-dict value, without importing torch (tensors: detach, cpu).
    ``what`` names the value in the error for one NumPy cannot read (a ragged list)."""
    if not isinstance(v, np.ndarray) and hasattr(v, "detach") and hasattr(v, "cpu"):
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":  # no NumPy dtype: float32 holds it exactly
            v = v.float()
        v = v.numpy()
    return as_array(what, v)


def _refuse_proj_size(proj_size):
    """RNN and GRU take no projections. torch.nn's accept ``proj_size`` as a keyword only to
    refuse it (any value, 0 too) with this ValueError, and so do these: a TypeError instead
    would slip past code that catches torch's."""
    if proj_size is not None:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")


class RNN(_Layer):
    """Elman RNN, ``h' = tanh(W_ih x + b_ih + W_hh h + b_hh)`` (or relu), as torch.nn.RNN.

    Its constructor's arguments are torch.nn.RNN's, and ``seed``: None draws the parameters
    (torch's init) and the dropout masks from fresh entropy, an int draws them reproducibly.
    ``dtype``: float32 (the default; None too) or float64, NumPy's or torch's; ``device``: None
    or the CPU. How parameters, gradients, backward and threads behave: ``fusedrnn.layers``."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None,
                 dtype=np.float32, seed=None, *, proj_size=None):
        _refuse_proj_size(proj_size)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        spec = base.check_config(f"rnn_{nonlinearity}", input_size, hidden_size, num_layers,
                                 bias, batch_first, dropout, bidirectional)
        super().__init__(spec, device, dtype, seed)

    nonlinearity = property(lambda self: self._spec.cell[4:], doc="'tanh' or 'relu'.")

    def _extra_repr(self):
        return [] if self.nonlinearity == "tanh" else [f"nonlinearity='{self.nonlinearity}'"]


class GRU(_Layer):
    """GRU as torch.nn.GRU; ``linear_before_reset=False`` gives the original formulation
    (ONNX's default, Keras ``reset_after=False``), which torch does not have. It is keyword-only,
    as on the adapter's GRU: positions 8 and 9 are torch's device and dtype.

    ``seed``, ``dtype`` and ``device`` as RNN's (``help(fusedrnn.RNN)``)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=np.float32, seed=None,
                 *, linear_before_reset=True, proj_size=None):
        _refuse_proj_size(proj_size)
        spec = base.check_config("gru", input_size, hidden_size, num_layers, bias, batch_first,
                                 dropout, bidirectional, linear_before_reset=linear_before_reset)
        super().__init__(spec, device, dtype, seed)

    linear_before_reset = property(
        lambda self: self._spec.linear_before_reset,
        doc="True: torch.nn's GRU, n = tanh(W_in x + b_in + r*(W_hn h + b_hn)); False: the "
            "original, n = tanh(W_in x + b_in + W_hn (r*h) + b_hn).")

    def _extra_repr(self):
        return [] if self.linear_before_reset else ["linear_before_reset=False"]


class LSTM(_Layer):
    """LSTM as torch.nn.LSTM, with optional projections (``proj_size``).

    ``seed``, ``dtype`` and ``device`` as RNN's (``help(fusedrnn.RNN)``)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=np.float32,
                 seed=None):
        spec = base.check_config("lstm", input_size, hidden_size, num_layers, bias, batch_first,
                                 dropout, bidirectional, proj_size=proj_size)
        super().__init__(spec, device, dtype, seed)

    def _check_hx(self, hx, B, unbatched):
        if hx is None:
            return None, None
        if not isinstance(hx, (tuple, list)):
            raise StateStructureError(f"hx for LSTM must be a tuple (h0, c0) of arrays, "
                                      f"got {type(hx).__name__}")
        if len(hx) != 2:
            raise StateStructureError(f"hx for LSTM must be a tuple (h0, c0) of two arrays, "
                                      f"got {len(hx)} items")
        out_name = "proj_size" if self.proj_size else "hidden_size"
        h0 = self._check_state("hx[0] (h0)", hx[0], B, unbatched, self._spec.output_size,
                               out_name)
        c0 = self._check_state("hx[1] (c0)", hx[1], B, unbatched, self.hidden_size,
                               "hidden_size")
        return h0, c0

    def _pack_state(self, hn, cn, unbatched):
        return (hn[:, 0], cn[:, 0]) if unbatched else (hn, cn)

    def _split_dhn(self, dhn, B, unbatched):
        if dhn is None:
            return None, None
        if not isinstance(dhn, (tuple, list)) or len(dhn) != 2:
            got = type(dhn).__name__  # (a tuple of another length: say so, not just "tuple")
            if isinstance(dhn, (tuple, list)):
                got = f"a {got} of {len(dhn)} items"
            raise StateStructureError(f"dhn for LSTM must be None or a tuple (dhn, dcn) "
                                      f"(either may be None), got {got}")
        out_name = "proj_size" if self.proj_size else "hidden_size"
        dh = None if dhn[0] is None else self._check_state(
            "dhn[0] (dhn)", dhn[0], B, unbatched, self._spec.output_size, out_name)
        dc = None if dhn[1] is None else self._check_state(
            "dhn[1] (dcn)", dhn[1], B, unbatched, self.hidden_size, "hidden_size")
        return dh, dc
