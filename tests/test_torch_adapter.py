"""fusedrnn.torch: torch.nn.Module drop-ins on our kernels, against torch.nn itself.

The random grid of test_layers_torch.py (cell, layers, directions, batch_first, bias, proj_size,
lengths, hx, dtype) runs through the adapter, with lengths as a PackedSequence (the output must
be a PackedSequence with the same batch_sizes and indices as torch's), comparing outputs, final
states and, through autograd, the gradients of the input, hx and every parameter. Then
gradcheck in float64, state dicts both ways, from_module and the one-line swap in a model,
dropout, no_grad, and the errors for what the adapter does not support.
"""
import abc
import contextlib
import copy
import gc
import io
import re
import sys
import threading
import typing
import warnings
import weakref

import numpy as np
import pytest

import fusedrnn
from fusedrnn.tolerances import assert_close

torch = pytest.importorskip("torch")
import fusedrnn.torch as ft  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402
from _torch_loss import backward_and_collect  # noqa: E402
from test_layers_torch import (CELLS, Case, make_cases, make_data, torch_module,  # noqa: E402
                               TORCH_DTYPE)

pytestmark = pytest.mark.torch

ADAPTER = {"lstm": ft.LSTM, "gru": ft.GRU, "rnn_tanh": ft.RNN, "rnn_relu": ft.RNN}


def adapter_for(case, m, how):
    """Our module with m's weights: shared (from_module on a copy) or loaded (state_dict)."""
    if how == "from_module" and case.dtype == "float64":
        return ADAPTER[case.cell].from_module(copy.deepcopy(m))
    kw = dict(num_layers=case.L, bias=case.bias, batch_first=case.batch_first,
              bidirectional=case.bidirectional, dtype=TORCH_DTYPE[np.dtype(case.dtype)])
    if case.cell == "lstm":
        kw["proj_size"] = case.proj
    if case.cell.startswith("rnn"):
        kw["nonlinearity"] = case.cell[4:]
    ours = ADAPTER[case.cell](case.I, case.H, **kw)
    ours.load_state_dict(m.state_dict())             # casts float64 -> float32 as torch does
    return ours


def run_module(m, case, d, dtype):
    """Forward (PackedSequence input when the case has lengths) and backward through autograd;
    returns NumPy results plus the packed output's metadata."""
    tdt = TORCH_DTYPE[np.dtype(dtype)]

    def leaf(a):
        return None if a is None else torch.tensor(a, dtype=tdt, requires_grad=True)

    x, h0, c0 = leaf(d["x"]), leaf(d["h0"]), leaf(d["c0"])
    hx = (h0, c0) if case.cell == "lstm" and h0 is not None else h0
    packed = d["lengths"] is not None
    inp = (pack_padded_sequence(x, torch.as_tensor(d["lengths"]), batch_first=case.batch_first,
                                enforce_sorted=False) if packed else x)
    out, h = m(inp, hx)
    meta = None
    if packed:
        assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
        meta = (out.batch_sizes, out.sorted_indices, out.unsorted_indices)
        out, _ = pad_packed_sequence(out, batch_first=case.batch_first, total_length=case.T)
    for t in (out, *(h if case.cell == "lstm" else (h,))):
        assert t.dtype == tdt
    return {**backward_and_collect(m, case.cell, d, out, h, x, h0, c0), "meta": meta}


GRID = make_cases(per_cell_dtype=12, seed=777)


@pytest.mark.parametrize("case", GRID, ids=Case.id)
def test_adapter_matches_torch(case):
    m = torch_module(case)
    d = make_data(case)
    ours = adapter_for(case, m, "from_module" if case.seed % 2 else "state_dict")
    assert isinstance(ours, type(m))
    got = run_module(ours, case, d, case.dtype)
    want = run_module(m, case, d, np.float64)
    if want["meta"] is not None:
        for a, b in zip(got["meta"], want["meta"]):
            assert torch.equal(a, b)
    for key in ("y", "hn", "cn"):
        if want[key] is not None:
            assert_close(got[key], want[key], case.dtype, "forward", what=key)
    for key in ("dx", "dh0", "dc0"):
        if want[key] is not None:
            assert_close(got[key], want[key], case.dtype, "gradient", what=key)
    assert list(got["grads"]) == list(want["grads"])
    for name, g in want["grads"].items():
        assert_close(got["grads"][name], g, case.dtype, "gradient", what=name)


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_float64(cell):
    """torch.autograd.gradcheck on a tiny stacked bidirectional case with hx and lengths:
    input, hx and every parameter."""
    torch.manual_seed(0)
    proj = 2 if cell == "lstm" else 0
    kw = dict(num_layers=2, bidirectional=True, dtype=torch.float64)
    if cell == "lstm":
        mod = ft.LSTM(3, 4, proj_size=proj, **kw)
    elif cell == "gru":
        mod = ft.GRU(3, 4, **kw)
    else:
        mod = ft.RNN(3, 4, nonlinearity=cell[4:], **kw)
    T, B = 3, 2
    x = torch.randn(T, B, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, B, proj or 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, B, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 2])
    params = list(mod.parameters())

    def fn(x, h0, c0, *ps):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, h = mod(packed, (h0, c0) if cell == "lstm" else h0)
        hs = h if cell == "lstm" else (h,)
        return (out.data, *hs)

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params))
    if cell == "gru":   # the variant torch lacks, through autograd too
        mod.linear_before_reset = False
        assert torch.autograd.gradcheck(fn, (x, h0, c0, *params))


def test_adapter_linear_before_reset_false_matches_numpy_layer():
    layer = fusedrnn.GRU(3, 5, num_layers=2, bidirectional=True, linear_before_reset=False,
                         dtype=np.float64, seed=0)
    mod = ft.GRU(3, 5, num_layers=2, bidirectional=True, linear_before_reset=False,
                 dtype=torch.float64)
    mod.load_state_dict(layer.state_dict())        # NumPy arrays accepted
    assert "linear_before_reset=False" in repr(mod)
    x = np.random.default_rng(0).standard_normal((4, 2, 3))
    dy = np.random.default_rng(1).standard_normal((4, 2, 10))
    y, hn = layer(x)
    dx, _ = layer.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt, hnt = mod(xt)
    (yt * torch.tensor(dy)).sum().backward()
    np.testing.assert_array_equal(yt.detach().numpy(), y)
    np.testing.assert_array_equal(hnt.detach().numpy(), hn)
    np.testing.assert_array_equal(xt.grad.numpy(), dx)
    for name, p in mod.named_parameters():
        np.testing.assert_array_equal(p.grad.numpy(), layer.grads[name])


@pytest.mark.parametrize("cell", CELLS)
def test_unbatched_and_batch_first_like_torch(cell):
    case = Case(cell=cell, dtype="float64", T=4, B=3, I=3, H=5, L=2, bidirectional=True,
                batch_first=True, bias=True, proj=2 if cell == "lstm" else 0, lengths=False,
                hx=True, seed=3)
    m = torch_module(case)
    ours = ADAPTER[cell].from_module(m)
    x = torch.randn(case.T, case.I, dtype=torch.float64)
    h0 = torch.randn(4, case.H_out, dtype=torch.float64)
    c0 = torch.randn(4, case.H, dtype=torch.float64)
    hx = (h0, c0) if cell == "lstm" else h0
    with torch.no_grad():
        for inp, h in ((x, hx), (x[None].expand(3, -1, -1), None)):
            want, got = m(inp, h), ours(inp, h)
            assert got[0].shape == want[0].shape
            assert_close(got[0].numpy(), want[0].numpy(), np.float64)
            for a, b in zip(got[1] if cell == "lstm" else [got[1]],
                            want[1] if cell == "lstm" else [want[1]]):
                assert a.shape == b.shape
                assert_close(a.numpy(), b.numpy(), np.float64)


def test_packed_sequence_sorted_input():
    """enforce_sorted=True packing (no sorted_indices) works too."""
    m = torch.nn.GRU(3, 4, bidirectional=True, dtype=torch.float64)
    ours = ft.GRU.from_module(m)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([5, 3, 1]))
    assert packed.sorted_indices is None
    with torch.no_grad():
        (po, ph), (wo, wh) = ours(packed), m(packed)
    assert po.sorted_indices is None and torch.equal(po.batch_sizes, wo.batch_sizes)
    assert_close(po.data.numpy(), wo.data.numpy(), np.float64)
    assert_close(ph.numpy(), wh.numpy(), np.float64)


def test_a_hand_built_packed_sequence_that_disagrees_is_named():
    """A PackedSequence built by hand whose fields disagree (pack_padded_sequence never makes
    one) gave IndexError naming no field (batch sizes that grow, indices past the batch) or
    torch's indexing message (data rows past sum(batch_sizes)); a sorted_indices that is no
    permutation ran, reading the rows in a wrong order."""
    from torch.nn.utils.rnn import PackedSequence
    ours = ft.LSTM(4, 3)
    data = torch.randn(5, 4)
    for packed, error, match in [
            (PackedSequence(torch.randn(5, 3), torch.tensor([3, 2])), ValueError,
             r"input.data must have shape \(N, 4\), got \(5, 3\)"),
            (PackedSequence(torch.randn(5, 1, 4), torch.tensor([3, 2])), ValueError,
             r"input.data must have shape \(N, 4\), got \(5, 1, 4\)"),
            (PackedSequence(data, torch.tensor([2, 3])), ValueError,
             r"input.batch_sizes must start positive and never grow .*got \[2, 3\]"),
            (PackedSequence(torch.randn(6, 4), torch.tensor([3, 2])), ValueError,
             r"input.data must have sum\(input.batch_sizes\) = 5 rows, got 6"),
            (PackedSequence(data, torch.tensor([3.0, 2.0])), TypeError,
             r"input.batch_sizes must be a 1-D integer tensor"),
            (PackedSequence(data, torch.tensor([[3, 2]])), TypeError,
             r"input.batch_sizes must be a 1-D integer tensor"),
            (PackedSequence(torch.randn(0, 4), torch.tensor([], dtype=torch.int64)), ValueError,
             r"input.batch_sizes must start positive .*got \[\]"),
            (PackedSequence(data, torch.tensor([3, 2]), torch.tensor([0, 1, 5]),
                            torch.tensor([0, 1, 2])), ValueError,
             r"input.sorted_indices must be a permutation of 0..2 .*got \[0, 1, 5\]"),
            (PackedSequence(data, torch.tensor([3, 2]), torch.tensor([0, 0, 1]),
                            torch.tensor([0, 1, 2])), ValueError,
             r"input.sorted_indices must be a permutation of 0..2"),
            (PackedSequence(data, torch.tensor([3, 2]), torch.tensor([2, 0, 1]),
                            torch.tensor([0, 1])), ValueError,
             r"input.unsorted_indices must be a permutation of 0..2")]:
        with pytest.raises(error, match=match):
            ours(packed)
    # one pack_padded_sequence makes, with a trailing step of no rows as torch.nn takes it, runs
    ref = torch.nn.LSTM(4, 3)
    ours.load_state_dict(ref.state_dict())
    packed = PackedSequence(data, torch.tensor([3, 2, 0]))
    with torch.no_grad():
        assert_close(ours(packed)[0].data.numpy(), ref(packed)[0].data.numpy(), np.float32)


def test_state_dicts_round_trip_both_ways():
    layer = fusedrnn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3, dtype=np.float64,
                          seed=0)
    # fusedrnn (NumPy) -> adapter -> torch.nn
    mod = ft.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3, dtype=torch.float64)
    mod.load_state_dict(layer.state_dict())
    ref = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3,
                        dtype=torch.float64)
    ref.load_state_dict(mod.state_dict())
    x = np.random.default_rng(0).standard_normal((3, 2, 4))
    y, _ = layer.eval()(x)
    with torch.no_grad():
        np.testing.assert_array_equal(mod(torch.tensor(x))[0].numpy(), y)
        assert_close(ref(torch.tensor(x))[0].numpy(), y, np.float64)
    # torch.nn -> fusedrnn (NumPy), unchanged
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.5)
    back = fusedrnn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3, dtype=np.float64)
    back.load_state_dict(ref.state_dict())
    for name, p in ref.named_parameters():
        np.testing.assert_array_equal(back.state_dict()[name], p.detach().numpy())


def test_a_frozen_layer_s_state_dict_is_copied_not_shared():
    """A frozen fusedrnn layer's parameters are read-only arrays: load_state_dict viewed them as
    tensors (torch warned of undefined behaviour), assign=True made them the module's
    parameters, and a step of its optimiser then changed the frozen layer's weights behind the
    packed copies it keeps (its outputs no longer those of its weights)."""
    layer = fusedrnn.GRU(3, 4, seed=0).freeze()
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    m = ft.GRU(3, 4)
    m.load_state_dict(layer.state_dict(), assign=True)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    # A writable array is shared under assign=True, as a tensor would be
    live = fusedrnn.GRU(3, 4, seed=0)
    m.load_state_dict(live.state_dict(), assign=True)
    assert np.shares_memory(m.weight_hh_l0.detach().numpy(), live.state_dict()["weight_hh_l0"])


def test_load_state_dict_passes_on_the_metadata_and_refuses_what_is_no_mapping():
    """The NumPy-accepting load_state_dict rebuilt the dict and lost its _metadata, so
    version-aware loading (a subclass's _load_from_state_dict, a hook) saw every checkpoint as
    versionless; and it raised AttributeError ('list' object has no attribute 'items') where
    torch.nn raises TypeError naming what it expects."""
    versions = {}

    def record(module, state_dict, prefix, local_metadata, *args):
        versions[type(module).__module__] = local_metadata.get("version")

    ref = torch.nn.GRU(3, 4)
    ours = ft.GRU(3, 4)
    state = ref.state_dict()
    for mod in (ref, ours):
        mod.register_load_state_dict_pre_hook(record)
        mod.load_state_dict(state)
        with pytest.raises(TypeError, match="Expected state_dict to be dict-like"):
            mod.load_state_dict([("weight_ih_l0", state["weight_ih_l0"])])
    assert versions == {"torch.nn.modules.rnn": 1, "fusedrnn.torch": 1}
    arrays = type(state)((k, v.numpy()) for k, v in state.items())
    arrays._metadata = state._metadata
    versions.clear()
    ours.load_state_dict(arrays)                        # (NumPy values: converted, kept)
    assert versions == {"fusedrnn.torch": 1}


def test_a_module_saved_whole_loads_with_weights_only_as_torch_s_does():
    """torch.save(model) of a module that had run pickled the adapter's cache of its Spec:
    torch.load's default (weights_only=True) then refused fusedrnn._layer_base.Spec, which had
    to be allowlisted besides the module's class (torch.nn's needs its class alone)."""
    m = ft.GRU(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        y, _ = m(x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    with torch.serialization.safe_globals([ft.GRU]):
        loaded = torch.load(buf, weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], y, rtol=0, atol=0)


def test_from_module_shares_parameters_and_swaps_in_a_model():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(4, 8, num_layers=2, batch_first=True)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(y[:, -1])

    torch.manual_seed(0)
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(5, 7, 4), torch.randn(5, 1)
    want = model(x)
    old = model.rnn
    model.rnn = ft.LSTM.from_module(model.rnn)
    assert isinstance(model.rnn, ft.LSTM) and isinstance(model.rnn, torch.nn.LSTM)
    assert all(a is b for a, b in zip(model.rnn.parameters(), old.parameters()))
    got = model(x)
    assert_close(got.detach().numpy(), want.detach().numpy(), np.float32)
    before = model.rnn.weight_hh_l1.detach().clone()
    loss = ((got - target) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()                     # the optimiser built before the swap still trains the rnn
    assert not torch.equal(before, model.rnn.weight_hh_l1)
    assert ((model(x) - target) ** 2).mean() < loss
    with pytest.raises(TypeError, match="needs a torch.nn.LSTM, got GRU"):
        ft.LSTM.from_module(torch.nn.GRU(2, 3))
    relu = ft.RNN.from_module(torch.nn.RNN(2, 3, nonlinearity="relu").eval())
    assert relu.nonlinearity == "relu" and not relu.training


def test_from_module_carries_what_else_the_module_holds():
    """A learned h0 kept on the LSTM, a buffer, a submodule and an attribute were dropped,
    silently: an optimiser built after the swap skipped h0, checkpoints lost it."""
    class WithState(torch.nn.LSTM):
        def __init__(self):
            super().__init__(3, 4)
            self.h0 = torch.nn.Parameter(torch.randn(1, 1, 4))
            self.register_buffer("steps", torch.zeros(()))
            self.register_buffer("scratch", torch.zeros(2), persistent=False)
            self.norm = torch.nn.LayerNorm(4)
            self.tag = "encoder"

    torch.manual_seed(0)
    old = WithState()
    new = ft.LSTM.from_module(old)
    assert [(n, id(p)) for n, p in new.named_parameters()] == \
        [(n, id(p)) for n, p in old.named_parameters()]
    assert list(new.state_dict()) == list(old.state_dict())        # (scratch not persistent)
    assert new.steps is old.steps and new.scratch is old.scratch and new.norm is old.norm
    assert new.tag == "encoder"
    opt = torch.optim.SGD(new.parameters(), lr=0.1)                 # built after the swap
    h0 = new.h0.detach().clone()
    x = torch.randn(5, 2, 3)
    hx = (new.h0.expand(1, 2, 4), torch.zeros(1, 2, 4))
    new.norm(new(x, hx)[0]).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(h0, new.h0)


def test_from_module_carries_no_state_of_torch_or_the_adapter():
    """A compiled call (module.compile()) was carried and ran torch.nn's forward, with the old
    module's flag and hooks; an attribute named as an adapter method hid it; train() of the new
    module switched a carried, deliberately frozen submodule to training."""
    torch.manual_seed(0)
    old = torch.nn.LSTM(3, 4, num_layers=2, dropout=0.5)
    reference = copy.deepcopy(old).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # (torch's own imports)
        old.compile(backend="eager")
    old._spec = {"unit": "ms"}
    old.norm = torch.nn.BatchNorm1d(4).eval()
    new = ft.LSTM.from_module(old).eval()
    assert "_compiled_call_impl" not in vars(new) and callable(new._spec)
    assert not new.norm.training
    fired = []
    new.register_forward_hook(lambda *args: fired.append(1))
    x = torch.randn(5, 2, 3)
    assert torch.equal(new(x)[0], new(x)[0]) and fired == [1, 1]    # eval: no dropout
    assert_close(new(x)[0].detach().numpy(), reference(x)[0].detach().numpy(), np.float32)


def test_from_module_names_a_parametrized_extra_parameter():
    """It was refused as overriding __getstate__ (what parametrize's subclass defines)."""
    class Double(torch.nn.Module):
        def forward(self, t):
            return 2 * t

    gru = torch.nn.GRU(3, 4)
    gru.h0 = torch.nn.Parameter(torch.zeros(1, 1, 4))
    torch.nn.utils.parametrize.register_parametrization(gru, "h0", Double())
    with pytest.raises(TypeError, match="cannot convert h0: computed from other tensors"):
        ft.GRU.from_module(gru)


def test_from_module_refuses_a_subclass_that_overrides_behaviour():
    """The fusedrnn module runs torch.nn's forward: a subclass's own was dropped silently."""
    class Scaled(torch.nn.LSTM):
        def forward(self, x, hx=None):
            out, h = super().forward(x, hx)
            return out * 2, h

    class Mixin:
        def _apply(self, fn, recurse=True):
            return super()._apply(fn, recurse)

    class Moved(Mixin, torch.nn.GRU):
        pass

    with pytest.raises(TypeError, match="cannot convert a .*Scaled: it overrides forward"):
        ft.LSTM.from_module(Scaled(3, 4))
    with pytest.raises(TypeError, match="overrides _apply of torch.nn.GRU"):
        ft.GRU.from_module(Moved(3, 4))
    patched = torch.nn.RNN(3, 4)
    patched.forward = lambda x, hx=None: None
    with pytest.raises(TypeError, match="overrides forward"):
        ft.RNN.from_module(patched)

    class Ours(ft.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x * 2, hx)

    with pytest.raises(TypeError, match="overrides forward of fusedrnn.torch.LSTM"):
        ft.LSTM.from_module(Ours(3, 4))
    again = ft.GRU.from_module(ft.GRU(3, 4, linear_before_reset=False))   # a shared copy
    assert again.linear_before_reset is False

    class Tagged(torch.nn.LSTM):        # a constructor only: converts, its attribute too
        def __init__(self, n):
            super().__init__(n, 4, batch_first=True)
            self.tag = "enc"

    m = Tagged(3)
    x = torch.randn(2, 5, 3)
    got = ft.LSTM.from_module(m)
    assert type(got) is ft.LSTM and got.batch_first and got.tag == "enc"
    assert_close(got(x)[0].detach().numpy(), m(x)[0].detach().numpy(), np.float32)

    class Typed(torch.nn.LSTM, typing.Generic[typing.TypeVar("T")], abc.ABC):
        pass                            # (typing's and abc's bookkeeping: nothing of its own)

    assert type(ft.LSTM.from_module(Typed(3, 4))) is ft.LSTM

    class Marker(typing.Protocol):
        pass

    class Marked(torch.nn.LSTM, Marker):
        pass                            # (typing.Protocol's bookkeeping)

    assert type(ft.LSTM.from_module(Marked(3, 4))) is ft.LSTM

    class Described(Tagged):            # a method the model may call: it would be lost
        scale = 2.0

        def describe(self):
            return self.tag

    with pytest.raises(TypeError, match=r"Described: it defines describe, scale, which the "
                                        r"fusedrnn module would lack"):
        ft.LSTM.from_module(Described(3))


@pytest.mark.filterwarnings("ignore::FutureWarning")   # torch.nn.utils.weight_norm's
def test_from_module_refuses_computed_weights_by_name():
    """Parametrized or pruned weights are not Parameters to share: torch's error named no cause.
    Registered on the fusedrnn module after conversion, they work."""
    from torch.nn.utils import parametrizations, prune
    for apply in (lambda m: parametrizations.weight_norm(m, "weight_hh_l0"),
                  lambda m: torch.nn.utils.weight_norm(m, "weight_hh_l0"),
                  lambda m: prune.l1_unstructured(m, "weight_hh_l0", amount=0.3),
                  lambda m: torch.nn.utils.spectral_norm(m, "weight_hh_l0")):
        m = torch.nn.LSTM(3, 4)
        apply(m)
        with pytest.raises(TypeError, match="cannot convert weight_hh_l0: computed .* remove"):
            ft.LSTM.from_module(m)
    torch.manual_seed(0)
    m = torch.nn.GRU(3, 4)
    got = ft.GRU.from_module(m)
    parametrizations.weight_norm(m, "weight_hh_l0")
    parametrizations.weight_norm(got, "weight_hh_l0")
    got.load_state_dict(m.state_dict())
    x = torch.randn(5, 2, 3)
    assert_close(got(x)[0].detach().numpy(), m(x)[0].detach().numpy(), np.float32)


def test_from_module_refuses_hooks_by_name():
    """Hooks on the original would silently stop firing after the swap."""
    def grab(mod, inp, out):
        pass

    for register in (lambda m: m.register_forward_hook(grab),
                     lambda m: m.register_forward_pre_hook(lambda mod, inp: None),
                     lambda m: m.register_full_backward_hook(lambda mod, gi, go: None),
                     lambda m: m.register_state_dict_post_hook(lambda *a: None)):
        m = torch.nn.GRU(3, 4)
        handle = register(m)
        with pytest.raises(TypeError, match="with hooks, .* hook .*register them again"):
            ft.GRU.from_module(m)
        handle.remove()
        ft.GRU.from_module(m)
    m = torch.nn.GRU(3, 4)
    m.register_forward_hook(grab)
    with pytest.raises(TypeError, match="forward hook .*grab"):
        ft.GRU.from_module(m)


def test_no_grad_path_matches_autograd_path():
    torch.manual_seed(0)
    mod = ft.GRU(3, 5, num_layers=2)
    x = torch.randn(4, 2, 3)
    with torch.no_grad():
        y0, h0 = mod(x)
    assert y0.grad_fn is None
    y1, h1 = mod(x)
    assert y1.grad_fn is not None
    assert torch.equal(y0, y1) and torch.equal(h0, h1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_tensors_that_are_not_contiguous_give_torchs_results(cell):
    """hx transposed, x expanded and a weight that is a transposed view (through .data), on a
    stack of layers (one kernel call): torch.nn's outputs and gradients. The kernels copy such
    memory, and the stack's copies of hx were freed before it ran (outputs 0.04-0.36 off)."""
    torch.manual_seed(3)
    ref = getattr(torch.nn, cell.upper())(6, 5, num_layers=3)
    ours = ADAPTER[cell](6, 5, num_layers=3)
    ours.load_state_dict(ref.state_dict())
    for m in (ref, ours):
        m.weight_ih_l1.data = m.weight_ih_l1.detach().t().contiguous().t()
        assert not m.weight_ih_l1.is_contiguous()
    x = torch.randn(3, 1, 6).expand(3, 4, 6).requires_grad_(False)
    h0 = torch.randn(4, 3, 5).transpose(0, 1).requires_grad_()
    hx = (h0, torch.randn(4, 3, 5).transpose(0, 1)) if cell == "lstm" else h0
    results = []
    for m in (ref, ours):
        y, _ = m(x, hx)
        results.append((y, *torch.autograd.grad(y.square().sum(), [h0, m.weight_ih_l1])))
    for (what, kind), a, b in zip((("y", "forward"), ("dh0", "gradient"),
                                   ("dW_ih_l1", "gradient")), *results):
        assert_close(b.detach().numpy(), a.detach().numpy(), np.float32, kind, what)


def test_attributes_changed_between_calls_take_effect_as_in_torch():
    """The adapter keeps its layer description between calls (_spec): torch.nn reads its
    attributes at every call, so a change after the first call must take effect."""
    torch.manual_seed(0)
    m = torch.nn.LSTM(3, 5, num_layers=2).double()
    ours = ft.LSTM.from_module(copy.deepcopy(m))
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        ours(x)
        for name, value in (("batch_first", True), ("dropout", 0.5)):
            setattr(m, name, value)
            setattr(ours, name, value)
            m.eval(), ours.eval()
            assert_close(ours(x)[0].numpy(), m(x)[0].numpy(), np.float64)
            assert ours._spec().batch_first and ours._spec().dropout == getattr(m, "dropout")


def test_a_dropout_set_out_of_range_is_refused_where_torch_nn_refuses_it():
    """dropout set on a built module (the constructor checks its own) to 1.5 ran as p = 1, to
    -0.1 as no dropout, and "0.3" as 0.3, silently: torch.nn's forward raises where it would
    apply it (training, between layers), and runs where it would not."""
    torch.manual_seed(0)
    x = torch.randn(4, 2, 3)
    for value in (1.5, -0.1):
        for cls in (torch.nn.GRU, ft.GRU):
            mod = cls(3, 5, num_layers=2)
            mod.dropout = value
            with pytest.raises(RuntimeError, match=rf"dropout.* between 0 and 1, .*got {value}"):
                mod(x)
            mod.eval()(x)                           # not applied: no error
            single = cls(3, 5)
            single.dropout = value
            single(x)                               # (nor in a single layer)
        with pytest.raises(ValueError, match=r"^dropout must be a probability between 0 and 1"):
            mod.train()(x)                          # (ours is a ValueError too)
    ours = ft.LSTM(3, 5, num_layers=2).eval()
    ours.dropout = "0.3"
    with pytest.raises(TypeError, match=r"^dropout must be a number in \[0, 1\], got str$"):
        ours(x)


def test_autograd_calls_skip_torchs_signature_binding(monkeypatch):
    """Function.apply binds every call's arguments with inspect.signature (12-30 us: a small
    LSTM's training call through the adapter spent 60 of its 200 us there); ours take no
    defaults, and _PositionalApply calls torch's C apply directly."""
    import inspect
    torch.manual_seed(0)
    mod = ft.GRU(3, 5)
    x = torch.randn(4, 2, 3, requires_grad=True)
    want = torch.autograd.grad(mod(x)[0].sum(), x)[0]

    def refuse(*args, **kwargs):
        raise AssertionError("inspect.signature was called")

    monkeypatch.setattr(inspect, "signature", refuse)
    assert torch.equal(torch.autograd.grad(mod(x)[0].sum(), x)[0], want)


def test_dropout_uses_torch_rng_and_is_off_in_eval():
    mod = ft.LSTM(3, 5, num_layers=3, dropout=0.5)
    plain = ft.LSTM.from_module(mod)
    plain.dropout = 0.0
    x = torch.randn(4, 2, 3)
    torch.manual_seed(1)
    a = mod(x)[0]
    torch.manual_seed(1)
    b = mod(x)[0]
    assert torch.equal(a, b) and not torch.equal(a, mod(x)[0])
    assert not torch.equal(a, plain(x)[0])
    mod.eval()
    assert torch.equal(mod(x)[0], plain(x)[0])


def test_dropout_of_one_zeroes_the_layers_above_as_torch_nn():
    """dropout=1.0 in training: every mask is zero (no draw, as torch's), so the layers above
    the first see zeros; outputs, gradients and the generator's state after are torch.nn's."""
    ref = torch.nn.LSTM(3, 5, num_layers=2, dropout=1.0, dtype=torch.float64)
    ours = ft.LSTM.from_module(copy.deepcopy(ref))
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    outs = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        y, (hn, cn) = m(xi)
        (y.sin().sum() + hn.sum() + cn.sum()).backward()
        outs.append([y, hn, cn, xi.grad, *(p.grad for p in m.parameters()),
                     torch.randn(3, dtype=torch.float64)])   # (the generator after)
    for got, want in zip(*outs):
        assert_close(got.detach().numpy(), want.detach().numpy(), np.float64)
    assert outs[1][3].abs().sum() > 0   # (dx through the first layer still flows)


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_dropout_on_a_packed_sequence_draws_torch_s_masks(enforce_sorted):
    """torch draws a PackedSequence's masks over its packed data: the same seed gives torch's
    outputs, gradients and generator state after (the masks were drawn over the padded
    buffer)."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 4, num_layers=3, dropout=0.4, bidirectional=True, dtype=torch.float64)
    ours = ft.LSTM.from_module(copy.deepcopy(ref))
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4]) if not enforce_sorted else torch.tensor([6, 4, 2])
    got = {}
    for name, mod in (("torch", ref), ("ours", ours)):
        xs = x.clone().requires_grad_(True)
        packed = pack_padded_sequence(xs, lengths, enforce_sorted=enforce_sorted)
        torch.manual_seed(3)
        y = mod(packed)[0].data
        after = torch.rand(4)
        y.pow(2).sum().backward()
        got[name] = (y.detach(), after, xs.grad, mod.weight_ih_l1.grad)
    for a, b in zip(got["ours"], got["torch"]):
        assert_close(a.numpy(), b.numpy(), np.float64)
    assert torch.equal(got["ours"][1], got["torch"][1])


def test_bad_calls_raise_what_torch_raises_too():
    """Code written for torch.nn catches our errors: shapes are RuntimeError there, a dtype
    mismatch ValueError (ours stay ValueError / TypeError as well, for the layers' users)."""
    ref = torch.nn.LSTM(4, 5)
    ours = ft.LSTM.from_module(copy.deepcopy(ref))
    shape_cases = [(torch.randn(6, 3, 7), None),
                   (torch.randn(6, 3, 4), (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5))),
                   (torch.randn(6, 4), (torch.zeros(1, 1, 5), torch.zeros(1, 1, 5))),
                   (torch.randn(0, 3, 4), None)]
    for x, hx in shape_cases:
        for mod in (ref, ours):
            with pytest.raises(RuntimeError):
                mod(x, hx)
        with pytest.raises(ValueError):
            ours(x, hx)
    for mod in (ref, ours):
        with pytest.raises(ValueError):
            mod(torch.randn(6, 3, 4, dtype=torch.float64))
    with pytest.raises(TypeError):
        ours(torch.randn(6, 3, 4, dtype=torch.float64))


def test_dropout_gradient_uses_the_forward_mask():
    torch.manual_seed(0)
    mod = ft.GRU(3, 4, num_layers=2, dropout=0.5, dtype=torch.float64)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)

    def fn(x):
        torch.manual_seed(5)       # the same mask for every evaluation
        return mod(x)[0]

    assert torch.autograd.gradcheck(fn, (x,))


def test_inplace_change_before_backward_is_detected_and_retain_graph_works():
    mod = ft.RNN(3, 4)
    x = torch.randn(2, 1, 3, requires_grad=True)
    y, _ = mod(x)
    y.sum().backward(retain_graph=True)
    g = x.grad.clone()
    y.sum().backward()                                  # retained: a second backward works
    assert torch.allclose(x.grad, 2 * g)
    with pytest.raises(RuntimeError, match="second time|freed"):
        y.sum().backward()
    y, _ = mod(x)
    with torch.no_grad():
        mod.weight_hh_l0.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_import_does_not_shadow_torch():
    from fusedrnn import torch as fused_torch
    assert fused_torch is ft and fusedrnn.torch is ft
    assert sys.modules["torch"] is torch and torch.nn.LSTM is not ft.LSTM


# ----------------------------------------------------------------------------------------------
# What the adapter does not support, and bad input

def test_non_cpu_tensors_are_refused():
    mod = ft.GRU(3, 4)
    with pytest.raises(ValueError, match="CPU tensors only; input is on meta"):
        mod(torch.empty(2, 1, 3, device="meta"))
    with pytest.raises(RuntimeError, match=r"hx is on meta"):      # (a RuntimeError too)
        mod(torch.zeros(2, 1, 3), torch.empty(1, 1, 4, device="meta"))
    meta = ft.GRU(3, 4, device="meta")      # (on meta inputs: torch.nn's meta outputs)
    with pytest.raises(RuntimeError, match="not at the same device"):   # torch.nn's error
        meta(torch.zeros(2, 1, 3))


def test_unsupported_and_mismatched_dtypes_are_refused():
    with pytest.raises(TypeError, match="supports float32, float64, bfloat16, float16; "
                                        "weight_ih_l0 has dtype torch.complex64"):
        ft.LSTM(3, 4, dtype=torch.complex64)(torch.zeros(2, 1, 3, dtype=torch.complex64))
    mod = ft.LSTM(3, 4)
    with pytest.raises(TypeError, match="input must have dtype torch.float32 .*got torch.float64"):
        mod(torch.zeros(2, 1, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"hx\[1\] \(c0\) must have dtype torch.float32"):
        mod(torch.zeros(2, 1, 3), (torch.zeros(1, 1, 4), torch.zeros(1, 1, 4, dtype=torch.float64)))
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got ndarray"):
        mod(np.zeros((2, 1, 3), np.float32))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")   # (prototype)
def test_nested_tensors_and_dispatching_subclasses_are_refused_by_name():
    """A nested tensor failed with "Internal error: NestedTensorImpl doesn't support sizes",
    and a tensor subclass that runs torch's operators itself (a wrapper subclass, as DTensor,
    MaskedTensor) with "storage was resized to 0 (as FSDP frees parameters...)": neither
    named the argument, the second blamed FSDP."""
    from torch.testing._internal.two_tensor import TwoTensor
    mod = ft.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    h, c = torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)
    nested = torch.nested.nested_tensor([torch.randn(5, 3), torch.randn(2, 3)])
    with pytest.raises(ValueError, match="input is a nested tensor.*pack_sequence"):
        mod(nested)
    with pytest.raises(RuntimeError, match=r"hx\[1\] \(c0\) is a nested tensor"):
        mod(x, (h, torch.nested.nested_tensor([torch.zeros(1, 4), torch.zeros(1, 4)])))
    for call, name in [(lambda: mod(TwoTensor(x, x.clone())), "input"),
                       (lambda: mod(x, (h, TwoTensor(c, c.clone()))), r"hx\[1\] \(c0\)"),
                       (lambda: mod(pack_padded_sequence(TwoTensor(x, x.clone()),
                                                         torch.tensor([5, 3]))), "input.data")]:
        with pytest.raises(ValueError, match=rf"^{name} is of the tensor subclass TwoTensor, "
                                             rf"which runs torch's operators itself"):
            call()
    w = mod.weight_hh_l0.detach()
    mod.weight_hh_l0 = torch.nn.Parameter(TwoTensor(w, w.clone()))
    with pytest.raises(RuntimeError, match="^weight_hh_l0 is of the tensor subclass TwoTensor"):
        mod(x)


def test_a_tensor_subclass_of_torch_s_own_dispatch_and_a_negative_view_run_as_their_values():
    """A subclass that leaves torch's operators to torch (no __torch_dispatch__) holds plain
    memory, which the kernels read; a negative-bit view (torch._neg_view) holds its values'
    negation, which they must not read as they are."""
    class Tagged(torch.Tensor):
        pass

    mod = ft.GRU(3, 4, num_layers=2)
    x, h = torch.randn(5, 2, 3), torch.randn(2, 2, 4)
    y, hn = mod(x, h)
    for got in (mod(x.as_subclass(Tagged), h.as_subclass(Tagged)),
                mod(torch._neg_view(-x), torch._neg_view(-h))):
        torch.testing.assert_close(got[0], y, rtol=0, atol=0)
        torch.testing.assert_close(got[1], hn, rtol=0, atol=0)


def test_adapter_bad_shapes_and_hx_kinds():
    lstm, gru = ft.LSTM(3, 4, num_layers=2), ft.GRU(3, 4, batch_first=True)
    x = torch.zeros(5, 2, 3)
    with pytest.raises(ValueError, match=r"input must have shape \(T, B, 3\) .*got \(5, 2, 4\)"):
        lstm(torch.zeros(5, 2, 4))
    with pytest.raises(ValueError, match=r"input must have shape \(B, T, 3\)"):
        gru(torch.zeros(5, 2, 3, 1))
    with pytest.raises(ValueError, match=r"hx\[0\] \(h0\) must have shape \(2, 2, 4\), got \(1, 2, 4\)"):
        lstm(x, (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(TypeError, match=r"hx for LSTM must be a tuple \(h0, c0\)"):
        lstm(x, torch.zeros(2, 2, 4))
    with pytest.raises(TypeError, match="hx for GRU must be one tensor"):
        gru(torch.zeros(2, 5, 3), (torch.zeros(1, 2, 4),))
    with pytest.raises(ValueError, match=r"hx must have shape \(1, 4\)"):
        gru(torch.zeros(5, 3), torch.zeros(1, 2, 4))       # unbatched input, batched hx
    with pytest.raises(TypeError, match="linear_before_reset must be a bool"):
        ft.GRU(3, 4, linear_before_reset="no")


@pytest.mark.parametrize("name,shape", [("weight_hh_l1", (16, 5)), ("weight_hh_l1", (20, 4)),
                                        ("weight_ih_l1_reverse", (16, 3)), ("bias_ih_l0", (15,))])
@pytest.mark.parametrize("grad", [False, True])
def test_a_weight_swapped_for_another_shape_is_named(name, shape, grad):
    """A parameter given another shape through .data: the layer calls named it w_hh or w_ih,
    of no layer, and rows of another count made h0 look wrong."""
    lstm = ft.LSTM(3, 4, num_layers=2, bidirectional=True)
    getattr(lstm, name).data = torch.zeros(shape)
    want = {"weight_hh_l1": (16, 4), "weight_ih_l1_reverse": (16, 8), "bias_ih_l0": (16,)}[name]
    with torch.set_grad_enabled(grad), pytest.raises(
            ValueError, match=rf"^{name} must have shape {re.escape(str(want))}, got "
                              rf"{re.escape(str(shape))}$"):
        lstm(torch.zeros(5, 2, 3, requires_grad=grad))


@contextlib.contextmanager
def saved_states_made():
    """Weak references to every kernels' saved state (_layer_base.Saved) made in the block."""
    from fusedrnn import _layer_base

    made = []
    real = _layer_base.Saved

    class Tracked(real):
        __slots__ = ()

        def __init__(self):
            super().__init__()
            made.append(weakref.ref(self))

    _layer_base.Saved = Tracked
    try:
        yield made
    finally:
        _layer_base.Saved = real


@pytest.mark.parametrize("cell,bidirectional", [("LSTM", False), ("LSTM", True), ("GRU", False)])
def test_frozen_lower_layers_keep_no_saved_state(cell, bidirectional):
    """Fine-tuning the top of a stack: the layers below the lowest one whose parameters need a
    gradient (x and hx needing none) kept their gates and states for a backward that never runs
    through them. They keep none now, and the gradients are the bits of a call that kept all."""
    torch.manual_seed(0)
    layer = getattr(ft, cell)(5, 8, num_layers=4, bidirectional=bidirectional)
    x = torch.randn(7, 3, 5)
    dy = torch.randn(7, 3, 16 if bidirectional else 8)

    def trained(frozen_below):
        for name, p in layer.named_parameters():
            p.requires_grad_(int(name.split("_l")[1][0]) >= frozen_below)
            p.grad = None
        with saved_states_made() as made:
            y = layer(x)[0]
        kept = [[ctx is not None for ctx in ctxs] for ctxs in made[0]().ctxs]
        y.backward(dy)
        return kept, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}

    kept, grads = trained(frozen_below=2)
    assert kept == [[False] * (1 + bidirectional)] * 2 + [[True] * (1 + bidirectional)] * 2
    kept_all, grads_all = trained(frozen_below=0)
    assert all(map(all, kept_all))
    assert sorted(grads) == sorted(n for n in grads_all if int(n.split("_l")[1][0]) >= 2)
    for name, g in grads.items():
        assert torch.equal(g, grads_all[name]), name
    # x needing a gradient: every layer's state is kept, and dx is the full call's
    x_grad = x.clone().requires_grad_(True)
    layer.weight_hh_l0.requires_grad_(False)
    with saved_states_made() as made:
        y = layer(x_grad)[0]
    assert all(ctx is not None for ctxs in made[0]().ctxs for ctx in ctxs)
    y.backward(dy)
    assert x_grad.grad is not None


@pytest.mark.parametrize("cell,bidirectional", [("LSTM", False), ("GRU", True), ("RNN", False)])
def test_which_tensors_need_a_gradient_does_not_change_the_bits(cell, bidirectional):
    """The layers below the lowest one trained keep no saved state, but take a training call's
    steps: on the amx build, T*B = 128 runs an inference call's steps on tiles and a training
    call's not, so fine-tuning the top of a stack gave other outputs and gradients (in their
    last bits) than the same call with every parameter trained."""
    torch.manual_seed(0)
    layer = getattr(ft, cell)(16, 32, num_layers=3, bidirectional=bidirectional)
    x = torch.randn(4, 32, 16)

    def trained(frozen_below):
        for name, p in layer.named_parameters():
            p.requires_grad_(int(name.split("_l")[1][0]) >= frozen_below)
            p.grad = None
        y, h = layer(x)
        hn = h[0] if cell == "LSTM" else h
        (y.square().sum() + hn.sum()).backward()
        return y, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}

    y, grads = trained(frozen_below=2)
    y_all, grads_all = trained(frozen_below=0)
    assert torch.equal(y, y_all)
    for name, g in grads.items():
        assert torch.equal(g, grads_all[name]), name


def test_saved_state_is_freed_by_backward_not_kept_with_the_outputs():
    """Like torch's own saved tensors, the kernels' saved state goes at backward (without
    retain_graph) even while the outputs, and so the graph, are still alive."""
    mod = ft.LSTM(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3, requires_grad=True)
    with saved_states_made() as made:
        y, (hn, cn) = mod(x)
    gc.collect()
    assert len(made) == 1 and made[0]() is not None
    y.sum().backward()
    gc.collect()
    assert made[0]() is None and y.grad_fn is not None


def test_differentiating_a_gradient_raises_instead_of_dropping_the_term():
    """A gradient penalty needs the gradient's own graph; the kernels' backward has none, so
    differentiating it raises (before, the gradient came back as a constant and the penalty
    silently added nothing). create_graph=True alone still gives first-order gradients."""
    torch.manual_seed(0)
    m = torch.nn.LSTM(3, 4).double()
    ours = ft.LSTM.from_module(copy.deepcopy(m))
    x0 = torch.randn(5, 2, 3, dtype=torch.float64)
    grads = []
    for mod in (m, ours):
        x = x0.clone().requires_grad_()
        y, _ = mod(x)
        g, = torch.autograd.grad(y.sum(), x, create_graph=True)
        assert g.requires_grad
        grads.append(g.detach())
        if mod is ours:
            with pytest.raises(RuntimeError, match="no double backward"):
                ((g.norm() - 1) ** 2).backward()
    assert_close(grads[1].numpy(), grads[0].numpy(), np.float64)


@pytest.mark.filterwarnings("ignore")  # torch.jit.trace is deprecated, and warns of its checks
def test_a_trace_under_no_grad_runs_the_kernels_on_new_input():
    """torch.jit.trace records the adapter as one op (it used to enter the example's outputs as
    constants: the traced module returned them for any input)."""
    torch.manual_seed(0)
    mod = ft.LSTM(4, 6, num_layers=2).eval()
    example, new = torch.randn(5, 2, 4), torch.randn(5, 2, 4)
    with torch.no_grad():
        traced = torch.jit.trace(mod, (example,), check_trace=True)
        got, (hn, cn) = traced(new)
        want, (want_hn, want_cn) = mod(new)
    assert torch.equal(got, want) and torch.equal(hn, want_hn) and torch.equal(cn, want_cn)
    assert not torch.equal(got, mod(example)[0].detach())


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_torch_func_grad_and_jacrev_give_torchs_gradients(cell):
    """torch.func's transforms call a Function's forward and setup_context apart, and its
    backward on their own tensors; the gradients are torch.nn's."""
    torch.manual_seed(0)
    base = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN}[cell]
    m = base(3, 4, num_layers=2).double()
    ours = ADAPTER[cell].from_module(copy.deepcopy(m))
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    got = {}
    for name, mod in (("torch", m), ("ours", ours)):
        params = {k: v.detach() for k, v in mod.named_parameters()}
        loss = lambda p, mod=mod: torch.func.functional_call(mod, p, (x,))[0].pow(2).sum()
        got[name] = torch.func.grad(loss)(params)
        # jacrev maps the vjp over a batch of cotangents (_FusedStackBackward.vmap)
        got[name]["x"] = torch.func.jacrev(lambda x, mod=mod: mod(x)[0].sum(0))(x)
    assert got["ours"].keys() == got["torch"].keys()
    for k in got["torch"]:
        assert_close(got["ours"][k].detach().numpy(), got["torch"][k].detach().numpy(), np.float64)


@pytest.mark.filterwarnings("ignore")  # dynamo's notes on the graph break at the kernels
def test_torch_compile_runs_and_trains_as_eager():
    """torch.compile breaks the graph at the adapter and runs it eagerly, backward included
    (whose saved state must come back as it was left: a token made in setup_context once came
    back from torch's compiled autograd without it)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.rnn = ft.GRU(4, 6, num_layers=2)
    eager = copy.deepcopy(model)
    compiled = torch.compile(lambda x: model.rnn(x)[0].sum(), backend="aot_eager")
    x = torch.randn(5, 3, 4)
    compiled(x).backward()
    eager.rnn(x)[0].sum().backward()
    for (name, p), q in zip(model.rnn.named_parameters(), eager.rnn.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_torch_compile_does_not_trace_into_the_adapter():
    """Dynamo stops at the layer: tracing its NumPy glue took seconds a first call and
    recompiled for each new sequence length (100 frames for these four calls)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    m = ft.GRU(8, 16, num_layers=2)
    compiled = torch.compile(lambda x: m(x)[0].sum(), backend="aot_eager")
    for T in (5, 6, 7, 8):
        x = torch.randn(T, 2, 8)
        assert torch.equal(compiled(x), m(x)[0].sum())
    assert counters["frames"]["total"] <= 4


@pytest.mark.filterwarnings("ignore")  # torch.jit.trace is deprecated
def test_a_traced_module_trains_from_two_threads_and_keeps_no_saved_state():
    """A trace keeps an op's non-tensor inputs as constants, one object for every call. When
    traces recorded the autograd.Function, a slot for the kernels' saved state among its inputs
    was shared (1-2% of the gradients wrong with two threads, and the last call's state stayed
    alive); now they record the stateless torch.ops.fusedrnn.rnn_stack, whose backward keeps
    nothing past the call either."""
    torch.manual_seed(0)
    m = torch.nn.GRU(3, 8).double()
    ours = ft.GRU.from_module(copy.deepcopy(m))
    traced = torch.jit.trace(ours, (torch.randn(6, 2, 3, dtype=torch.float64),))
    xs = [torch.randn(6, 2, 3, dtype=torch.float64) for _ in range(2)]
    want = [torch.autograd.grad(m(x.clone().requires_grad_())[0].pow(2).sum(), m.weight_hh_l0)[0]
            for x in xs]
    with saved_states_made() as made:
        y, h = traced(xs[0].clone().requires_grad_())
        y.sum().backward()
        del y, h
        gc.collect()
        assert made and all(r() is None for r in made)
    wrong = []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def work(k):
        for _ in range(100):
            y = traced(xs[k].clone().requires_grad_())[0]
            g, = torch.autograd.grad(y.pow(2).sum(), ours.weight_hh_l0)
            if not torch.allclose(g, want[k], rtol=1e-10, atol=1e-12):
                wrong.append(k)

    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert not wrong


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's, at forward AD's import
def test_what_the_adapter_refuses_it_refuses_by_name():
    """Forward-mode AD (its tangents were dropped silently where no parameter needed grad),
    a trace of a PackedSequence (its lengths were constants of the trace), saved-tensor hooks
    that replace the saved tensors or save them to disk, torch.jit.script, and the
    batched gradients of torch's older vmap."""
    import torch.autograd.forward_ad as fwad
    torch.manual_seed(0)
    mod = ft.LSTM(3, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with fwad.dual_level(), torch.no_grad():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            mod(fwad.make_dual(x, torch.randn_like(x)))

    lengths = torch.tensor([5, 3])  # (made in the trace, it warned: an error under -W error)

    class PacksItsInput(torch.nn.Module):
        def forward(self, x):
            return mod(pack_padded_sequence(x, lengths))[0].data

    with pytest.raises(RuntimeError, match="PackedSequence"):
        torch.jit.trace(PacksItsInput(), (x,))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        y = mod(x.clone().requires_grad_())[0]
    with pytest.raises(RuntimeError, match="saved_tensors_hooks"):
        y.sum().backward()

    def to_disk(t):   # (torch.save pickles the saved tensors, the kernels' state with them)
        torch.save(t, io.BytesIO())
        return t

    with torch.autograd.graph.saved_tensors_hooks(to_disk, lambda t: t):
        with pytest.raises(TypeError, match="fusedrnn's saved training state .* cannot be pickled "
                                            "or saved: saved_tensors_hooks that move the saved "
                                            "tensors to disk are not supported"):
            mod(x.clone().requires_grad_())

    class Wraps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = mod

        def forward(self, x):
            return self.rnn(x)[0]

    # Scripting: the error spoke of a generator. (Fake tensors and torch.export, once refused
    # here, run: test_torch_export.py.)
    for scripted in (mod, Wraps()):
        with pytest.raises(RuntimeError, match="torch.jit.script does not support .*jit.trace"):
            torch.jit.script(scripted)
    xg = x.clone().requires_grad_()
    y = mod(xg)[0]
    with pytest.raises(RuntimeError, match="is_grads_batched"):
        torch.autograd.grad(y, xg, torch.randn((3,) + y.shape, dtype=y.dtype),
                            is_grads_batched=True)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_last_backward_writes_its_gradients_over_the_saved_gates(cell, bidirectional):
    """Without retain_graph autograd frees the graph after the backward, so that backward is the
    last through the kernels' saved state and consumes it: the pre-activation gradients go over
    the saved gates (and the GRU's recurrent n gradients over its saved W_hn h + b_hn), T*B*4*H
    floats a direction fewer at the backward's peak than under retain_graph=True (a
    bidirectional layer's: at least that; on two threads its directions run side by side,
    whose peaks need not meet), with the same bits."""
    from fusedrnn import _C
    T, B, H = 16, 8, 32
    torch.manual_seed(0)
    m = getattr(ft, cell)(24, H, bidirectional=bidirectional)
    x = torch.randn(T, B, 24, requires_grad=True)
    peaks, grads = [], []
    for retain in (True, False, True, False):  # (the first two: the threads' lasting buffers)
        m.zero_grad()
        x.grad = None
        y, _ = m(x)
        before = _C.workspace_bytes(reset_peak=True)["in_use"]
        y.backward(torch.ones_like(y), retain_graph=retain)
        peaks.append(_C.workspace_bytes()["peak"] - before)
        grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    gates_bytes = T * B * 4 * H * 4
    if bidirectional:
        assert peaks[2] - peaks[3] >= gates_bytes, (peaks, gates_bytes)
    else:
        assert peaks[2] - peaks[3] == gates_bytes
    for kept, consumed in zip(grads[2], grads[3]):
        assert torch.equal(kept, consumed)
