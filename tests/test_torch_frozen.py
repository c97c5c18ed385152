"""fusedrnn.torch's freeze(): untracked calls on read-only copies of the parameters, taken again
whenever torch records a change (python/fusedrnn/_torch_frozen.py).

Each test compares a frozen module with an unfrozen one on the same Parameters: the same bits,
whatever happened to the parameters in between, except for the writes freeze() documents as
unseen. Whether a call ran frozen shows in the kernels' packed-weight cache of the calling
thread: an unfrozen inference call keeps a copy of each weight's bytes to compare with, a
frozen one keeps none."""
import copy
import pickle

import pytest

from fusedrnn import _C
from _threads import results_from_threads

torch = pytest.importorskip("torch")
import fusedrnn.torch as ft  # noqa: E402

pytestmark = pytest.mark.torch

MODULES = {
    "rnn_tanh": lambda **kw: ft.RNN(5, 7, **kw),
    "rnn_relu": lambda **kw: ft.RNN(5, 7, nonlinearity="relu", **kw),
    "lstm": lambda **kw: ft.LSTM(5, 7, **kw),
    "lstm_proj": lambda **kw: ft.LSTM(5, 7, proj_size=3, **kw),
    "gru": lambda **kw: ft.GRU(5, 7, **kw),
    "gru_onnx": lambda **kw: ft.GRU(5, 7, linear_before_reset=False, **kw),
}


def make(kind, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return MODULES[kind](num_layers=2, bidirectional=True, dtype=dtype, **kw).eval()


def twin(m):
    """An unfrozen module on m's Parameters as they are now."""
    return type(m).from_module(m).unfreeze()


def inputs(m, T=4, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    dtype = m.weight_ih_l0.dtype
    x = torch.randn(T, B, m.input_size, generator=g, dtype=dtype)
    h0 = torch.randn(m.num_layers * 2, B, m.proj_size or m.hidden_size, generator=g, dtype=dtype)
    if isinstance(m, torch.nn.LSTM):
        return x, (h0, torch.randn(m.num_layers * 2, B, m.hidden_size, generator=g, dtype=dtype))
    return x, h0


def outputs(m, x, hx=None):
    with torch.no_grad():
        y, hn = m(x, hx)
    return [y, *(hn if isinstance(hn, tuple) else (hn,))]


def same_bits(a, b):
    return all(torch.equal(p, q) for p, q in zip(a, b))


def byte_copies_kept(m, x, hx=None):
    """The kernels' copies of weight bytes after one call of m from an empty cache: 0 for a
    frozen call."""
    _C.packed_cache(clear=True)
    outputs(m, x, hx)
    return _C.packed_cache()["copies"]


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frozen_calls_give_the_unfrozen_bits(kind, dtype):
    m = make(kind, dtype)
    other = twin(m)
    assert not m.frozen and m.freeze() is m and m.frozen
    x, hx = inputs(m)
    for args in [(x, hx), (x, None), (x[:, 0], None)]:          # (unbatched too)
        assert same_bits(outputs(m, *args), outputs(other, *args))
    with torch.inference_mode():
        assert same_bits(m(x, hx)[0][None], other(x, hx)[0][None])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [4, 2, 1])
    assert torch.equal(outputs(m, packed)[0].data, outputs(other, packed)[0].data)
    assert byte_copies_kept(m, x, hx) == 0 and byte_copies_kept(other, x, hx) > 0
    assert m.unfreeze() is m and not m.frozen and byte_copies_kept(m, x, hx) > 0


def _sgd_step(m):
    m.train()
    y = m(inputs(m)[0])[0]
    y.square().sum().backward()
    torch.optim.SGD(m.parameters(), lr=0.5).step()
    m.eval()


def _step_of(optimizer, **kw):
    """One training step of `optimizer` (a class) on a module, writing the parameters without
    moving their version counters: fused=True (one kernel for all of them), or through .data."""
    def step(m):
        m.train()
        m(inputs(m)[0])[0].square().sum().backward()
        optimizer(m.parameters(), lr=0.1, **kw).step()
        m.eval()
    return step


class _DataSGD(torch.optim.Optimizer):
    """An optimiser written as many outside torch are: it writes p.data, no version moves."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-group["lr"])


def _vector_to_parameters(m):
    vector = torch.nn.utils.parameters_to_vector(m.parameters())
    torch.nn.utils.vector_to_parameters(vector * 0.5, m.parameters())   # (assigns p.data)


def _data_assigned_after_share_memory(m):
    """share_memory() moves each storage in place, out of memory a NumPy array keeps: .data
    assigned that array's memory again is another storage at the address the copy was taken at."""
    arrays = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    m.load_state_dict(arrays, assign=True)          # (the parameters share the arrays' memory)
    outputs(m, *inputs(m))                          # (copies taken of them)
    m.share_memory()
    for name, a in arrays.items():
        a *= 0.5
        getattr(m, name).data = torch.from_numpy(a)


CHANGES = {  # what torch records: each must be seen by the next frozen call
    "optimizer step": _sgd_step,
    "fused Adam step": _step_of(torch.optim.Adam, fused=True),
    "fused SGD step": _step_of(torch.optim.SGD, fused=True),
    "step of an optimiser writing .data": _step_of(_DataSGD),
    "load_state_dict": lambda m: m.load_state_dict(
        {k: v * 0.5 for k, v in m.state_dict().items()}),
    "load_state_dict assign": lambda m: m.load_state_dict(
        {k: v * 0.5 for k, v in m.state_dict().items()}, assign=True),
    "in-place under no_grad": lambda m: torch.no_grad()(m.weight_hh_l1.mul_)(0.5),
    "in-place under inference_mode": lambda m: torch.inference_mode()(m.bias_ih_l0.add_)(1.0),
    "assigned .data": lambda m: setattr(m.weight_ih_l0, "data", m.weight_ih_l0.data * 0.5),
    "assigned parameter": lambda m: setattr(
        m, "weight_hh_l0_reverse", torch.nn.Parameter(m.weight_hh_l0_reverse.detach() * 0.5)),
    "vector_to_parameters": _vector_to_parameters,
    ".data assigned after share_memory()": _data_assigned_after_share_memory,
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("kind", ["lstm_proj", "gru"])
def test_changes_torch_records_are_seen(kind, change):
    m = make(kind).freeze()
    x, hx = inputs(m)
    before = outputs(m, x, hx)
    CHANGES[change](m)
    after = outputs(m, x, hx)
    assert same_bits(after, outputs(twin(m), x, hx))
    assert not same_bits(after, before)         # (the change changed the results)
    assert byte_copies_kept(m, x, hx) == 0      # frozen again, on the new values


def test_a_module_converted_to_float64_runs_frozen_in_float64():
    m = make("gru").freeze()
    outputs(m, *inputs(m))
    m.double()
    x, hx = inputs(m)
    assert x.dtype == torch.float64 and same_bits(outputs(m, x, hx), outputs(twin(m), x, hx))
    assert byte_copies_kept(m, x, hx) == 0


def test_writes_torch_does_not_record_are_seen_after_unfreeze():
    """freeze()'s promise: writes through .data or a NumPy view are not seen while frozen."""
    m = make("lstm").freeze()
    x, hx = inputs(m)
    before = outputs(m, x, hx)
    m.weight_hh_l0.data.mul_(0.5)
    m.bias_hh_l1.detach().numpy()[:] = 1.0
    assert same_bits(outputs(m, x, hx), before)
    assert same_bits(outputs(m.unfreeze(), x, hx), outputs(twin(m), x, hx))
    assert not same_bits(outputs(m, x, hx), before)


@pytest.mark.parametrize("kind", ["lstm_proj", "gru"])
def test_training_calls_run_on_the_parameters(kind):
    m = make(kind).train().freeze()
    other = twin(m).train()
    x, hx = inputs(m)
    grads = []
    for module in (m, other):
        xi = x.clone().requires_grad_()
        y = module(xi, hx)[0]
        y.square().sum().backward()
        grads.append([xi.grad, *(p.grad.clone() for p in module.parameters())])
        module.zero_grad()
    assert same_bits(*grads)
    assert "_fusedrnn_frozen_weights" not in m.__dict__   # (training took no copy to run on)
    m.eval().requires_grad_(False)                         # (a saliency map: only x tracked)
    m(x.clone().requires_grad_(), hx)[0].sum().backward()
    assert "_fusedrnn_frozen_weights" not in m.__dict__


def test_computed_weights_run_unfrozen():
    """A parametrized weight is made each call, from tensors a write through .data changes
    unseen by version counters: the frozen module reads it every call, as unfrozen."""
    m = make("gru")

    class Scale(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(m, "weight_hh_l0", Scale())
    m.freeze()
    x, hx = inputs(m)
    before = outputs(m, x, hx)
    m.parametrizations.weight_hh_l0.original.data.mul_(0.5)
    after = outputs(m, x, hx)
    assert not same_bits(after, before)
    unfrozen = copy.deepcopy(m).unfreeze()      # (from_module refuses computed weights)
    assert same_bits(after, outputs(unfrozen, x, hx)) and byte_copies_kept(m, x, hx) > 0


def test_low_precision_and_inference_tensor_modules_run_unfrozen():
    m = make("lstm", torch.bfloat16).freeze()
    x, hx = inputs(m)
    assert same_bits(outputs(m, x, hx), outputs(twin(m), x, hx))
    with torch.inference_mode():
        m = make("gru").freeze()          # (its parameters: inference tensors, no versions)
        x, hx = inputs(m)
        assert same_bits(outputs(m, x, hx), outputs(twin(m), x, hx))


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_copies_stay_frozen_on_their_own_parameters(copier):
    m = make("lstm").freeze()
    x, hx = inputs(m)
    want = outputs(m, x, hx)
    c = copier(m)
    assert c.frozen and same_bits(outputs(c, x, hx), want) and byte_copies_kept(c, x, hx) == 0
    with torch.no_grad():
        c.weight_hh_l0.mul_(0.5)
    assert same_bits(outputs(m, x, hx), want)
    assert same_bits(outputs(c, x, hx), outputs(twin(c), x, hx))


def test_threads_share_a_frozen_module():
    m = make("gru").freeze()
    x, hx = inputs(m, T=6, B=5)
    want = outputs(twin(m), x, hx)
    results = results_from_threads(lambda: outputs(m, x, hx), threads=4, calls_each=20)
    assert len(results) == 80 and all(same_bits(r, want) for r in results)
