"""Only the gradients the caller needs: dx skipped for data x, the weight gradients for a frozen
layer, the layers below the lowest that needs anything (functional.backward's need_dx and
need_weight_grads, stack_backward's, the layers' and the torch adapter's use of them). What is
computed has the bits of the full backward; what is skipped is None, or left as it was."""
import numpy as np
import pytest

import fusedrnn
from fusedrnn import _C, functional

from _kernel_cases import VARIANTS, _cast, make_case, variant_id

ISAS = list(_C.available_isas())


def _forward(case, dtype, isa, lbr):
    w = {k: _cast(v, dtype) for k, v in case["w"].items()}
    c = lambda a: _cast(a, dtype)  # noqa: E731
    _, _, _, ctx = functional.forward(case["cell"], c(case["x"]), c(case["h0"]), c(case["c0"]),
                                      w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], w["w_hr"],
                                      case["lengths"], linear_before_reset=lbr, isa=isa)
    return ctx, c(case["dy"]), c(case["dhn"]), c(case["dcn"])


# B = 1 at T = 40 takes the single row's chunked products, B = 3 the whole-sequence ones.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("T,B,lengths", [(5, 3, False), (5, 3, True), (40, 1, False)])
def test_skipped_gradients_leave_the_others_bit_for_bit(rng, isa, dtype, variant, T, B, lengths):
    cell, lbr, proj = variant
    case = make_case(rng, cell, proj, T=T, B=B, lengths=lengths)
    ctx, dy, dhn, dcn = _forward(case, dtype, isa, lbr)
    dx, dh0, dc0, grads = functional.backward(ctx, dy, dhn, dcn)

    no_dx = functional.backward(ctx, dy, dhn, dcn, need_dx=False)
    assert no_dx[0] is None
    np.testing.assert_array_equal(no_dx[1], dh0)
    assert set(no_dx[3]) == set(grads)
    for name, g in grads.items():
        np.testing.assert_array_equal(no_dx[3][name], g, err_msg=name)

    sentinels = {name: np.full_like(g, 7.0) for name, g in grads.items()}
    no_weights = functional.backward(ctx, dy, dhn, dcn, grads_into=sentinels,
                                     need_weight_grads=False)
    np.testing.assert_array_equal(no_weights[0], dx)
    np.testing.assert_array_equal(no_weights[1], dh0)
    if dc0 is not None:
        np.testing.assert_array_equal(no_weights[2], dc0)
    assert no_weights[3] == {}
    assert all((a == 7.0).all() for a in sentinels.values()), "grads_into was written"

    neither = functional.backward(ctx, dy, dhn, dcn, consume=True, need_dx=False,
                                  need_weight_grads=False)
    assert neither[0] is None and neither[3] == {}
    np.testing.assert_array_equal(neither[1], dh0)


def _recording_backward(monkeypatch):
    """Records (need_dx, need_weight_grads) of every one-layer backward the stack runs (each
    direction's, where one call runs both)."""
    calls = []
    for name, directions in (("backward", 1), ("backward_directions", 2)):
        def recording(*args, need_dx=True, need_weight_grads=True, _inner=getattr(functional, name),
                      _directions=directions, **kw):
            calls.extend([(need_dx, need_weight_grads)] * _directions)
            return _inner(*args, need_dx=need_dx, need_weight_grads=need_weight_grads, **kw)

        monkeypatch.setattr(functional, name, recording)
    return calls


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_numpy_layer_backward_skips_dx_or_its_weight_gradients(rng, monkeypatch, cell):
    cls = {"rnn": fusedrnn.RNN, "lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU}[cell]
    layer = cls(4, 5, num_layers=2, bidirectional=True, dtype=np.float64, seed=1)
    x = rng.standard_normal((6, 3, 4))
    dy = rng.standard_normal((6, 3, 10))
    layer(x)
    dx, dh0 = layer.backward(dy)
    full = {name: g.copy() for name, g in layer.grads.items()}
    calls = _recording_backward(monkeypatch)

    layer.zero_grad(set_to_none=True)
    layer(x)
    no_dx, dh0_no_dx = layer.backward(dy, need_dx=False)
    assert no_dx is None
    assert calls == [(True, True)] * 2 + [(False, True)] * 2   # layer 1, then layer 0
    for name, g in full.items():
        np.testing.assert_array_equal(layer.grads[name], g, err_msg=name)
    for a, b in zip(*(h if isinstance(h, tuple) else (h,) for h in (dh0_no_dx, dh0))):
        np.testing.assert_array_equal(a, b)

    before = {name: g.copy() for name, g in layer.grads.items()}
    layer(x)
    dx_frozen, _ = layer.backward(dy, need_weight_grads=False)
    np.testing.assert_array_equal(dx_frozen, dx)
    for name, g in before.items():
        np.testing.assert_array_equal(layer.grads[name], g, err_msg=f"{name} changed")


torch = pytest.importorskip("torch")
import fusedrnn.torch as ft  # noqa: E402


def _pair(cell, dtype=torch.float64):
    """A 2-layer bidirectional torch.nn module and the adapter's, with the same weights."""
    cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
    torch.manual_seed(0)
    theirs = cls(4, 5, num_layers=2, bidirectional=True, dtype=dtype)
    ours = getattr(ft, cls.__name__)(4, 5, num_layers=2, bidirectional=True, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _train_step(module, x, h0, frozen):
    for name, p in module.named_parameters():
        p.requires_grad_(not any(name.endswith(s) for s in frozen))
    y, _ = module(x, h0)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    return {name: p.grad for name, p in module.named_parameters()}


# (x needs grad, which parameters are frozen, the one-layer backwards the adapter runs:
# (need_dx, need_weight_grads), layer 1's two directions, then layer 0's)
SCENARIOS = {
    "data_x": (False, (), [(True, True)] * 2 + [(False, True)] * 2),
    "frozen_layer_0": (False, ("_l0", "_l0_reverse"), [(False, True)] * 2),
    "frozen_model_saliency": (True, ("_l0", "_l0_reverse", "_l1", "_l1_reverse"),
                              [(True, False)] * 4),
    "one_direction_frozen": (False, ("_l1_reverse",), [(True, True), (True, False)]
                             + [(False, True)] * 2),
    "one_direction_trained": (False, ("_l0", "_l0_reverse", "_l1_reverse"), [(False, True)]),
}


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_adapter_computes_what_autograd_needs_as_torch_does(rng, monkeypatch, cell, scenario):
    x_grad, frozen, want_calls = SCENARIOS[scenario]
    theirs, ours = _pair(cell)
    x_np = rng.standard_normal((6, 3, 4))
    h0_np = rng.standard_normal((4, 3, 5))
    results = []
    for module in (theirs, ours):
        x = torch.tensor(x_np, requires_grad=x_grad)
        h0 = torch.tensor(h0_np)
        h0 = (h0, torch.zeros(4, 3, 5, dtype=torch.float64)) if cell == "lstm" else h0
        calls = _recording_backward(monkeypatch) if module is ours else None
        grads = _train_step(module, x, h0, frozen)
        results.append((x.grad, grads, calls))
    (x_want, want, _), (x_got, got, calls) = results
    assert calls == want_calls
    assert (x_got is None) == (x_want is None)
    if x_want is not None:
        torch.testing.assert_close(x_got, x_want)
    for name, g in want.items():
        assert (got[name] is None) == (g is None), name
        if g is not None:
            torch.testing.assert_close(got[name], g, msg=name)


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("batch_first,unbatched", [(False, False), (True, False), (False, True)])
def test_adapter_gives_no_gradient_to_a_projection_its_loss_never_reached(rng, T, batch_first,
                                                                          unbatched):
    """A loss on the LSTM's c_n alone, over one step: the top layer's projections (weight_hr of
    both directions) only make its h, so torch.nn's graph leaves their .grad None (an optimiser
    then skips them, weight decay and momentum too), where the adapter gave zeros. Found by a
    differential fuzz of requires_grad and the outputs a loss uses; over two steps h feeds c."""
    kw = dict(num_layers=2, bidirectional=True, proj_size=2, batch_first=batch_first,
              dtype=torch.float64)
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(3, 4, **kw)
    ours = ft.LSTM(3, 4, **kw)
    ours.load_state_dict(theirs.state_dict())
    shape = (T, 3) if unbatched else ((2, T, 3) if batch_first else (T, 2, 3))
    x_np = rng.standard_normal(shape)
    h0_np = rng.standard_normal((4, 2) if unbatched else (4, 2, 2))
    results = []
    for module in (theirs, ours):
        x = torch.tensor(x_np, requires_grad=True)
        h0 = torch.tensor(h0_np, requires_grad=True)
        _, (_, cn) = module(x, (h0, torch.zeros(h0.shape[:-1] + (4,), dtype=torch.float64)))
        (cn * 0.5).sum().backward()
        results.append((x.grad, h0.grad, {n: p.grad for n, p in module.named_parameters()}))
    (x_want, h0_want, want), (x_got, h0_got, got) = results
    torch.testing.assert_close(x_got, x_want)
    torch.testing.assert_close(h0_got, h0_want)
    assert [n for n, g in got.items() if g is None] == [n for n, g in want.items() if g is None]
    assert (want["weight_hr_l1"] is None) == (T == 1)
    for name, g in want.items():
        if g is not None:
            torch.testing.assert_close(got[name], g, msg=name)
