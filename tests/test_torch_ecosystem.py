"""fusedrnn.torch inside torch's training machinery, against torch.nn in the same place: saved
tensors changed in place under allow_mutation_on_saved_tensors, storages that FSDP frees and
refills (and a caller resizes), FSDP2 and DDP themselves, quantize_dynamic beside it,
parametrized weights and torch.func.functional_call."""
import contextlib
import copy
import warnings

import numpy as np
import pytest

import fusedrnn.functional as F
from fusedrnn.tolerances import assert_close

torch = pytest.importorskip("torch")
import fusedrnn.torch as ft  # noqa: E402

pytestmark = pytest.mark.torch

CONFIGS = {
    "lstm": (torch.nn.LSTM, ft.LSTM, {}),
    "lstm-proj-bi-2": (torch.nn.LSTM, ft.LSTM, dict(proj_size=2, num_layers=2,
                                                    bidirectional=True)),
    "gru": (torch.nn.GRU, ft.GRU, {}),
    "rnn-relu-2": (torch.nn.RNN, ft.RNN, dict(nonlinearity="relu", num_layers=2)),
}


def _pair(config, seed=0):
    """torch.nn's module in float64 and ours with a copy of its weights."""
    base, ours, kw = CONFIGS[config]
    torch.manual_seed(seed)
    want = base(3, 4, **kw).double()
    return want, ours.from_module(copy.deepcopy(want))


def _all_grads(m, x):
    return [x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("config", CONFIGS)
def test_weights_changed_in_place_under_allow_mutation_on_saved_tensors(config):
    """torch keeps the forward's values of a saved tensor changed in place; the kernels read
    the weights' memory in backward, and gave the gradients of the changed weights."""
    want, got = _pair(config)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    grads = []
    for m in (want, got):
        xx = x.clone().requires_grad_()
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            out = m(xx)[0]
            with torch.no_grad():
                for p in m.parameters():     # as an optimiser's step between the two would
                    p.mul_(3.0)
            (out ** 2).sum().backward()
        grads.append(_all_grads(m, xx))
    for g, w in zip(*grads):
        assert_close(g.numpy(), w.numpy(), np.float64, kind="gradient")


@pytest.mark.parametrize("config", CONFIGS)
def test_storages_stay_resizable_and_backward_reads_what_autograd_saved(config):
    """Tensor.numpy() had marked every storage the adapter read (parameters, x, hx) never
    resizable again; torch.nn leaves them resizable. FSDP frees a parameter's storage after the
    forward and refills it, at another address, before the backward."""
    want, got = _pair(config)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    grads = []
    for m in (want, got):
        xx = x.clone().requires_grad_()
        out = m(xx)[0]
        for p in m.parameters():
            keep = p.detach().clone()
            p.untyped_storage().resize_(0)                     # freed ...
            p.untyped_storage().resize_(keep.numel() * keep.element_size())
            p.data.copy_(keep)            # ... and refilled, autograd unaware (as FSDP's)
        (out ** 2).sum().backward()
        grads.append(_all_grads(m, xx))
        buffer = torch.zeros(5, 2, 3, dtype=torch.float64)
        m(buffer)
        buffer.resize_(7, 2, 3)                                # a reused input buffer
    for g, w in zip(*grads):
        assert_close(g.numpy(), w.numpy(), np.float64, kind="gradient")


@contextlib.contextmanager
def _one_rank_gloo_group(tmp_path):
    """torch.distributed's default group, one rank on gloo, for the duration."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _train_three_sgd_steps(model, x):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (model(x)[0] ** 2).sum().backward()
        opt.step()


def test_fsdp2_trains_as_torch_nn(tmp_path):
    want, got = _pair("lstm-proj-bi-2")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with _one_rank_gloo_group(tmp_path):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (1,))
        models = []
        for m in (want, got):
            model = torch.nn.Sequential()
            model.add_module("rnn", m)
            fully_shard(model.rnn, mesh=mesh)
            fully_shard(model, mesh=mesh)
            _train_three_sgd_steps(model, x)
            models.append([p.full_tensor().detach() for p in model.parameters()])
    for g, w in zip(*models):
        assert_close(g.numpy(), w.numpy(), np.float64, kind="gradient")


def test_ddp_trains_as_torch_nn(tmp_path):
    """README: DistributedDataParallel trains the adapter as it trains torch.nn's."""
    want, got = _pair("lstm-proj-bi-2")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with _one_rank_gloo_group(tmp_path):
        trained = []
        for m in (want, got):
            _train_three_sgd_steps(torch.nn.parallel.DistributedDataParallel(m), x)
            trained.append([p.detach() for p in m.parameters()])
    for g, w in zip(*trained):
        assert_close(g.numpy(), w.numpy(), np.float64, kind="gradient")


def test_outputs_shrink_in_place_but_do_not_grow():
    """README: the outputs are NumPy memory; resize_ to more elements raises, shrinking works."""
    with torch.no_grad():
        y, _ = ft.GRU(3, 4)(torch.randn(5, 2, 3))
    with pytest.raises(RuntimeError, match="not resizable"):
        y.resize_(100)
    assert y.resize_(2).shape == (2,)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch.ao.quantization's,
@pytest.mark.filterwarnings("ignore::UserWarning")   # and its quantized tensors'
def test_dynamic_quantization_leaves_the_adapter_as_it_is():
    """README: torch.ao.quantization matches torch.nn's exact classes, so quantize_dynamic leaves
    the adapter in float32 (and torch.nn's module beside it quantized)."""
    model = torch.nn.Sequential(ft.LSTM(3, 4), torch.nn.LSTM(4, 4))
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.LSTM}, dtype=torch.qint8)
    assert type(q[0]) is ft.LSTM and q[0].weight_hh_l0.dtype == torch.float32
    assert type(q[1]) is not torch.nn.LSTM


def test_backward_reads_the_weights_it_is_given_and_checks_them():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 2, 3))
    w_ih, w_hh = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    y, _, _, ctx = F.forward("gru", x, np.zeros((2, 2)), None, w_ih, w_hh, None, None,
                             training=True)
    dy = np.ones_like(y)
    forward_ones = F.backward(ctx, dy)
    # The forward's arrays changed (FSDP refills a parameter's storage), the values it read
    # given elsewhere: the backward reads those, and gives the forward's results.
    forward_values = (w_ih.copy(), w_hh.copy(), None)
    w_hh *= 2
    same_values_elsewhere = F.backward(ctx, dy, weights=forward_values)
    for a, b in zip(forward_ones[:2], same_values_elsewhere[:2]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(F.WeightsChangedError, match="^weight_hh changed"):
        F.backward(ctx, dy)  # (the forward's arrays, now other values)
    with pytest.raises(F.WeightsChangedError, match="^weight_hh changed"):
        F.backward(ctx, dy, weights=(w_ih, 3 * forward_values[1], None))
    with pytest.raises(ValueError, match=r"weights\[1\] \(w_hh\) must have shape \(6, 2\), "
                                         r"got \(8, 2\)"):
        F.backward(ctx, dy, weights=(w_ih, np.zeros((8, 2)), None))
    with pytest.raises(ValueError, match=r"weights\[2\] \(w_hr\) must be None"):
        F.backward(ctx, dy, weights=(w_ih, w_hh, w_hh))
    with pytest.raises(TypeError, match=r"weights\[0\] \(w_ih\) must have dtype float64"):
        F.backward(ctx, dy, weights=(w_ih.astype(np.float32), w_hh, None))
    with pytest.raises(TypeError, match="weights must be None or a tuple"):
        F.backward(ctx, dy, weights=[w_ih, w_hh])


class _Tagger(torch.nn.Module):
    """A learned initial state passed as hx: hx is traced too."""

    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True)
        self.h0 = torch.nn.Parameter(torch.randn(2, 1, 4))
        self.gru = torch.nn.GRU(4, 2)
        self.head = torch.nn.Linear(2, 1)

    def forward(self, x):
        h0 = self.h0.expand(-1, x.shape[0], -1).contiguous()
        y, _ = self.rnn(x, (h0, torch.zeros_like(h0)))
        z, hn = self.gru(y.transpose(0, 1))
        return self.head(z).sum() + hn.sum()


def test_fx_symbolic_trace_keeps_the_layers_as_call_module_nodes():
    """FX keeps torch.nn's RNNs as leaves by their __module__ and traced into ours, which
    failed ("weight_ih_l0 must be a torch.Tensor, got Proxy")."""
    torch.manual_seed(0)
    model = ft.convert(_Tagger().double())
    graph_module = torch.fx.symbolic_trace(model)
    called = [n.target for n in graph_module.graph.nodes if n.op == "call_module"]
    assert called == ["rnn", "gru", "head"]
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = graph_module(x)
    got.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = model(x)
    want.backward()
    assert_close(got.detach().numpy(), want.detach().numpy(), np.float64)
    for g, p in zip(grads, model.parameters()):
        assert_close(g.numpy(), p.grad.numpy(), np.float64, kind="gradient")
    with pytest.raises(RuntimeError, match="cannot trace a fusedrnn.torch.GRU itself"):
        torch.fx.symbolic_trace(ft.GRU(2, 3))


def test_vmap_and_hessian_are_refused_in_the_adapters_words():
    """torch's own message named a private class and asked to implement its vmap method."""
    gru = ft.GRU(3, 4).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="fusedrnn.torch: vmap of an RNN, LSTM or GRU's "
                                           "forward is not supported"):
        torch.func.vmap(lambda xx: gru(xx)[0])(torch.stack([x, x]))
    params = {k: v.detach() for k, v in gru.named_parameters()}
    with pytest.raises(NotImplementedError, match="no forward-mode AD .*hessian"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # (torch.jit.script inside torch)
        torch.func.hessian(
            lambda p: (torch.func.functional_call(gru, p, (x,))[0] ** 2).sum())(params)


@pytest.mark.parametrize("grad", [False, True])
def test_functionalize_is_refused_in_the_adapters_words(grad):
    """Under torch.func.functionalize an untracked call blamed FSDP ("storage was resized to 0
    (as FSDP frees parameters...)": a functional tensor has no memory to read), a tracked one
    raised torch's "NYI: Functionalize rule for custom_function_call"."""
    gru = ft.GRU(3, 4).requires_grad_(grad)
    x = torch.randn(5, 2, 3)
    with pytest.raises(RuntimeError, match="^fusedrnn.torch does not run under "
                                           "torch.func.functionalize"):
        torch.func.functionalize(lambda xx: gru(xx)[0])(x)


@pytest.mark.parametrize("config", CONFIGS)
def test_a_module_on_the_meta_device_gives_torch_nn_s_meta_outputs(config):
    """A shape-only dry run of a model built on the meta device (it was refused as not CPU)."""
    base, ours, kw = CONFIGS[config]
    want, got = base(3, 4, device="meta", **kw), ours(3, 4, device="meta", **kw)
    for x in (torch.empty(5, 2, 3, device="meta"), torch.empty(5, 3, device="meta")):
        shapes = [[tuple(t.shape) for t in torch.utils._pytree.tree_leaves(m(x))]
                  for m in (want, got)]
        assert shapes[0] == shapes[1]
        assert all(t.is_meta for t in torch.utils._pytree.tree_leaves(got(x)))
    with pytest.raises(RuntimeError, match="not at the same device"):   # as torch.nn's
        got(torch.empty(5, 2, 3))


@pytest.mark.parametrize("mistake", ["lstm hx of 3", "hx float64", "hx int64", "sparse input",
                                     "hx on meta"])
def test_errors_are_runtime_errors_where_torch_nn_s_are(mistake):
    """Code that catches torch.nn's RuntimeError still catches ours (and torch's
    documented ValueError/TypeError classes stay)."""
    x = torch.randn(5, 2, 3)
    kind, x, hx = {
        "lstm hx of 3": ("LSTM", x, (torch.zeros(1, 2, 4),) * 3),
        "hx float64": ("GRU", x, torch.zeros(1, 2, 4, dtype=torch.float64)),
        "hx int64": ("GRU", x, torch.zeros(1, 2, 4, dtype=torch.int64)),
        "sparse input": ("GRU", x.to_sparse(), None),
        "hx on meta": ("GRU", x, torch.empty(1, 2, 4, device="meta")),
    }[mistake]
    for module in (getattr(torch.nn, kind)(3, 4), getattr(ft, kind)(3, 4)):
        with pytest.raises(RuntimeError):
            module(x, hx)


def test_a_storage_freed_and_not_refilled_raises_in_forward_and_backward():
    """A tensor whose storage was resized to 0 has a null (or offset-from-null) pointer: the
    forward read garbage (pybind11 allocates for a null pointer) or crashed, the backward
    returned garbage gradients. torch.nn's ops raise RuntimeError."""
    gru = ft.GRU(4, 3)
    gru.weight_hh_l0.data.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match=r"shape \(9, 3\) has no memory"):
        gru(torch.randn(5, 2, 4))
    big = torch.randn(1 + 5 * 2 * 4)
    offset_view = big[1:].view(5, 2, 4)
    big.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match=r"shape \(5, 2, 4\) has no memory"):
        ft.GRU(4, 3)(offset_view)
    lstm = ft.LSTM(4, 3)
    y, _ = lstm(torch.randn(5, 2, 4))
    lstm.weight_ih_l0.data.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match=r"shape \(12, 4\) has no memory"):
        y.sum().backward()
    assert ft.GRU(4, 3)(torch.empty(5, 0, 4))[0].shape == (5, 0, 3)  # no memory, none needed


def test_fx_symbolic_trace_of_a_call_on_a_constant_input():
    """The input is no Proxy (a plain tensor attribute), but the weights are: it failed."""
    class FromConstant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(4, 3)
            self.start = torch.ones(5, 2, 4)

        def forward(self, x):
            return x + self.gru(self.start)[0]

    model = ft.convert(FromConstant())
    graph_module = torch.fx.symbolic_trace(model)
    assert [n.target for n in graph_module.graph.nodes if n.op == "call_module"] == ["gru"]
    x = torch.randn(5, 2, 3)
    assert torch.equal(graph_module(x), model(x))


def test_make_fx_in_real_mode_records_the_layer_as_an_op():
    """make_fx recorded the layer's outputs as constants: the graph returned the traced
    input's outputs for any later input."""
    from torch.fx.experimental.proxy_tensor import make_fx

    want, got = _pair("lstm-proj-bi-2")
    x, later = (torch.randn(5, 2, 3, dtype=torch.float64) for _ in range(2))

    def outputs_and_grads(m):
        def run(x):
            y = m(x)[0]
            return (y,) + torch.autograd.grad((y ** 2).sum(), list(m.parameters()))
        return run

    graph = make_fx(outputs_and_grads(got))(x)
    assert any(n.target is torch.ops.fusedrnn.rnn_stack.default for n in graph.graph.nodes)
    for g, w in zip(graph(later), outputs_and_grads(want)(later)):
        assert_close(g.detach().numpy(), w.detach().numpy(), np.float64, kind="gradient")


def test_fx_symbolic_trace_leaves_hooks_to_the_graph_s_call():
    """The layer became a leaf inside its forward, so FX had run its hooks while tracing and
    recorded them into the graph: they then ran twice (torch.nn's: once, at the graph's call)."""
    model = ft.convert(_Tagger().double())
    calls = []
    model.rnn.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    model.rnn.register_forward_hook(lambda m, args, out: (2 * out[0], out[1]))
    graph_module = torch.fx.symbolic_trace(model)
    assert calls == []
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    assert_close(graph_module(x).detach().numpy(), model(x).detach().numpy(), np.float64)
    assert calls == ["pre", "pre"]


def test_make_fx_refusals_name_make_fx():
    from torch.fx.experimental.proxy_tensor import make_fx

    gru = ft.GRU(3, 4, num_layers=2, dropout=0.5).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="make_fx or fake tensors runs without dropout"):
        make_fx(lambda x: gru(x)[0])(x)
    gru.eval()
    params = {k: v.detach() for k, v in gru.named_parameters()}

    def loss_grad(p, x):     # (its error was torch's, about a missing setup_context)
        return torch.func.grad(
            lambda p: (torch.func.functional_call(gru, p, (x,))[0] ** 2).sum())(p)

    with pytest.raises(RuntimeError, match="make_fx or fake tensors does not run inside "
                                           "torch.func transforms"):
        make_fx(loss_grad)(params, x)


def test_make_fx_pre_dispatch_records_the_layer_as_an_op():
    """With pre_dispatch=True the proxy mode is on the pre-dispatch stack: the outputs were
    baked in as constants again."""
    from torch.fx.experimental.proxy_tensor import make_fx

    want, got = _pair("gru")
    x, later = (torch.randn(5, 2, 3, dtype=torch.float64) for _ in range(2))
    graph = make_fx(lambda x: got(x)[0], pre_dispatch=True)(x)
    assert any(n.target is torch.ops.fusedrnn.rnn_stack.default for n in graph.graph.nodes)
    assert_close(graph(later).detach().numpy(), want(later)[0].detach().numpy(), np.float64)


def test_fx_leaf_goes_through_the_tracer_s_call_module():
    """Its scope and module stack (nodes' nn_module_stack), and a tracer overriding
    call_module (torchvision's feature extractor names nodes there), saw no layer."""
    seen = []

    class Watching(torch.fx.Tracer):
        def call_module(self, m, forward, args, kwargs):
            seen.append(type(m))
            return super().call_module(m, forward, args, kwargs)

    model = ft.convert(_Tagger().double())
    graph = Watching().trace(model)
    assert seen == [ft.LSTM, ft.GRU, torch.nn.Linear]
    rnn_node = next(n for n in graph.nodes if n.op == "call_module" and n.target == "rnn")
    assert list(rnn_node.meta["nn_module_stack"]) == ["rnn"]


@pytest.mark.parametrize("config", CONFIGS)
def test_spectral_norm_on_a_weight_trains_as_on_torch_nn(config):
    """torch.nn's forward evaluates a parametrized weight twice (_update_flat_weights: once to
    see it changed, once to refresh _flat_weights), so spectral_norm's power iteration, which
    runs at each evaluation in training, runs twice a call; the adapter evaluated it once (and
    a module from from_module, whose weak references named the meta weights it was built with,
    once in its first call too), so its sigma, outputs and gradients drifted from torch.nn's
    (float64: outputs 3e-10 to 8e-7 off at the first step, all 4 configs failing)."""
    from torch.nn.utils import parametrizations
    want, got = _pair(config)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for m in (want, got):
        torch.manual_seed(1)                    # (the same initial u and v)
        parametrizations.spectral_norm(m, "weight_hh_l0")
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (want, got)]
    for step in range(3):
        results = []
        for m, opt in zip((want, got), opts):
            opt.zero_grad()
            out = m(x)[0]
            (out ** 2).sum().backward()
            opt.step()
            values = [out] + list(m.parametrizations.weight_hh_l0[0]._buffers.values())
            results.append((values, [p.grad for p in m.parameters()]))
        (got_values, got_grads), (want_values, want_grads) = results[1], results[0]
        for g, w in zip(got_values, want_values):     # (the output, u and v)
            assert_close(g.detach().numpy(), w.detach().numpy(), np.float64, what=f"step {step}")
        for g, w in zip(got_grads, want_grads):
            assert_close(g.numpy(), w.numpy(), np.float64, kind="gradient", what=f"step {step}")


def test_functional_call_with_meta_or_real_tensors_as_torch_nn():
    """torch.func.functional_call swaps the module's parameters without its __setattr__, so
    _flat_weights kept the module's own: meta tensors on a CPU module were refused as not on
    the CPU (torch.nn gives meta outputs), and a meta module called with CPU tensors ran
    torch.nn's forward, not the kernels."""
    torch.manual_seed(0)
    cpu = ft.LSTM(3, 4, num_layers=2)
    meta = {k: torch.empty_like(v, device="meta") for k, v in cpu.named_parameters()}
    y, (hn, cn) = torch.func.functional_call(cpu, meta, (torch.empty(5, 2, 3, device="meta"),))
    assert y.is_meta and hn.is_meta and cn.is_meta and y.shape == (5, 2, 4)
    x = torch.randn(5, 2, 3)
    y = torch.func.functional_call(copy.deepcopy(cpu).to("meta"), dict(cpu.named_parameters()),
                                   (x,))[0]
    assert type(y.grad_fn).__name__ == "_FusedStackBackward"
    assert torch.equal(y, cpu(x)[0])
