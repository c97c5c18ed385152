"""fusedrnn.torch.convert: swap every torch.nn.RNN/LSTM/GRU of a model for fusedrnn's at once,
as torch.nn.SyncBatchNorm.convert_sync_batchnorm swaps batch norms."""
import warnings

import torch


def _references(model):
    """(parent, attribute name, child) for every reference to a child module, a module held at
    two places once for each."""
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None:
                yield parent, name, child


def _scripted_rnn(m):
    """Whether m is TorchScript of torch.nn's RNN, LSTM or GRU (not of fusedrnn's, traced, nor
    a class of the same name)."""
    if not isinstance(m, torch.jit.ScriptModule):
        return False
    try:
        name = m._c._type().qualified_name()
    except (AttributeError, RuntimeError):
        return False
    # (a second scripted LSTM of another configuration is "...rnn.___torch_mangle_0.LSTM")
    return (name.startswith("__torch__.torch.nn.modules.rnn.")
            and name.rsplit(".", 1)[-1] in ("RNN", "LSTM", "GRU"))


def _compile_wrapper(m):
    """Whether m is torch.compile's wrapper (torch._dynamo's OptimizedModule)."""
    return type(m).__name__ == "OptimizedModule" and type(m).__module__.startswith("torch._dynamo")


def _path(parent_paths, parent, name):
    prefix = parent_paths[id(parent)]
    return f"model.{prefix}.{name}" if prefix else f"model.{name}"


def convert(model, *, strict=True):
    """Replace every ``torch.nn.RNN``, ``LSTM`` and ``GRU`` in ``model`` (at any depth, in any
    container) by ``fusedrnn.torch``'s, made by ``from_module``: the same Parameters (no copy,
    so an optimiser built on the model keeps working), the same training flag and state_dict.
    ``model`` is changed in place and returned; a model that is itself one of those layers
    cannot be changed in place, so its replacement is returned. A module held at several
    places gets one replacement, held at all of them; fusedrnn's own modules are left as they
    are, so converting twice changes nothing more.

    What ``from_module`` refuses (a subclass overriding torch's methods or adding its own,
    computed weights, hooks on the layer) raises TypeError naming every such module by its
    path, before anything is replaced; with ``strict=False`` those modules stay as they are,
    with a warning naming them, and the others are replaced. A TorchScript torch.nn RNN, LSTM
    or GRU inside is refused the same way (it has no Python module to swap), and so is one that
    torch.compile wraps (its wrapper would keep calling it): convert before compiling."""
    from .torch import GRU, LSTM, RNN
    ours_for = {torch.nn.RNN: RNN, torch.nn.LSTM: LSTM, torch.nn.GRU: GRU}
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fusedrnn.torch.convert needs a torch.nn.Module, got "
                        f"{type(model).__name__}")
    parent_paths = {id(m): path for path, m in model.named_modules(remove_duplicate=False)}

    def target_class(m):
        if isinstance(m, (RNN, LSTM, GRU)):
            return None
        return next((ours for base, ours in ours_for.items() if isinstance(m, base)), None)

    slots = [(model, None, model)] + list(_references(model))   # (the model itself: no parent)
    replaced, refused = {}, {}
    for parent, name, child in slots:
        cls = target_class(child)
        if id(child) in replaced or id(child) in refused:
            continue
        path = "model" if name is None else _path(parent_paths, parent, name)
        if cls is not None and name == "_orig_mod" and _compile_wrapper(parent):
            # torch.compile's wrapper keeps calling the module it compiled
            refused[id(child)] = (f"{path}: compiled by torch.compile, whose wrapper would keep "
                                  f"calling torch.nn's module (convert before compiling: "
                                  f"torch.compile(convert(model)))")
        elif cls is not None:
            try:
                replaced[id(child)] = cls.from_module(child)
            except TypeError as e:
                refused[id(child)] = f"{path}: {e}"
        elif _scripted_rnn(child):
            refused[id(child)] = (f"{path}: a TorchScript {child.original_name}, which has no "
                                  f"Python module to swap (convert the Python model, then "
                                  f"torch.jit.trace it: fusedrnn.torch works under trace)")
    if refused and strict:
        raise TypeError("fusedrnn.torch.convert replaced nothing: it cannot convert "
                        + "; ".join(refused.values())
                        + " (convert(model, strict=False) leaves these as they are and "
                          "replaces the rest)")
    if refused:
        warnings.warn("fusedrnn.torch.convert left these as they are: "
                      + "; ".join(refused.values()), stacklevel=2)
    for parent, name, child in slots[1:]:
        if id(child) in replaced:   # (into the parent's replacement: an RNN held by an RNN)
            setattr(replaced.get(id(parent), parent), name, replaced[id(child)])
    return replaced.get(id(model), model)
