"""The torch adapter's frozen weights (``freeze()``): read-only copies of a module's parameters
that untracked calls hand to the kernels under a frozen id, as the NumPy layers' freeze() does,
so those calls neither compare every weight with the kernels' copy of its bytes nor read each
parameter as a NumPy view (GRU, I = H = 128, T = B = 1: ~15 of a call's ~60 us).

A torch module's parameters cannot be made read-only, so the copies follow what torch records:
a copy is taken again when a parameter is another object, its storage another (``.data``
assigned, ``.to()``) or its version counter moved (in-place ops, optimisers, load_state_dict).
An optimiser's step may move no version counter (``fused=True``; one writing ``p.data``): every
step, counted by a global optimiser hook, takes the copies again. Writes torch does not count
(``p.data.add_()``, NumPy views, ``.data`` assigned a view of the memory it has: the same
version, the same data_ptr) are not seen: that is the promise freeze() asks for."""
from typing import NamedTuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ._torch_checks import KERNEL_DTYPES, check_tensor
from ._torch_views import numpy_view
from .layers import _FROZEN_IDS, _immutable_copy


class FrozenWeights(NamedTuple):
    names: list         # the module's _flat_weights_names when taken
    params: list        # the Parameters, as getattr gives them
    marks: tuple        # per parameter: (version, a tensor holding its storage)
    arrays: dict        # name -> read-only copy, for the kernels
    dtype: torch.dtype
    frozen_id: int
    steps: int          # _STEPS[0] when taken


# Optimiser steps, counted by a global step hook registered at the first copy taken: fused
# optimisers' kernels (Adam, AdamW, SGD, Adagrad with fused=True) and optimisers writing p.data
# change the parameters without moving their version counters, and a frozen module ran on the
# weights from before the step. (Any step counts: one of another model's optimiser only makes
# the next frozen call copy again.)
_STEPS = [0]
_step_hook = None


def _count_step(optimizer, args, kwargs):
    _STEPS[0] += 1


def _watch_steps():
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_step)


def _mark(p):
    # p.data holds the storage: while it lives, no other storage can take its address, so a
    # data_ptr equal to its data_ptr now is this storage (an equal version alone misses
    # `p.data = other`). Now, not when taken: share_memory() moves a storage in place, and its
    # old memory (a NumPy array's, still held) could be assigned as .data again, unseen.
    return p._version, p.data


def current(module, names):
    """The module's FrozenWeights, taken again if its parameters changed as torch records, or
    None where they cannot be frozen: weights computed each call (parametrizations, pruning:
    not registered Parameters), a dtype the kernels do not compute in, inference tensors (no
    version counter)."""
    taken = module.__dict__.get("_fusedrnn_frozen_weights")
    registered = module._parameters
    if taken is not None and taken.names == names and taken.steps == _STEPS[0]:
        for n, p, (version, held) in zip(names, taken.params, taken.marks):
            if (registered.get(n) is not p or p._version != version
                    or p.data_ptr() != held.data_ptr()):
                break
        else:
            return taken
    params = [registered.get(n) for n in names]
    if any(type(p) is not torch.nn.Parameter or p.is_inference() for p in params):
        return None
    dtype = params[0].dtype
    if dtype not in KERNEL_DTYPES:
        return None
    for n, p in zip(names, params):
        check_tensor(n, p, dtype)
    _watch_steps()
    # (marked and counted before the copy: a change in between is then seen at the next call)
    steps, marks = _STEPS[0], tuple(_mark(p) for p in params)
    taken = FrozenWeights(list(names), params, marks,
                          {n: _immutable_copy(numpy_view(p)) for n, p in zip(names, params)},
                          dtype, next(_FROZEN_IDS), steps)
    module.__dict__["_fusedrnn_frozen_weights"] = taken
    return taken
