"""fusedrnn.torch under the tools that trace a model: torch.export (strict and not, dynamic
shapes, saved programs), torch.jit.trace (and torch.jit.save), FakeTensorMode, and the gradients
of the traced op; and under torch.onnx.export, which writes torch.nn's ONNX nodes (run here in
ONNX Runtime).

There the adapter is one op, torch.ops.fusedrnn.rnn_stack (fusedrnn/_torch_ops.py): its outputs
and gradients must be the eager adapter's, bit for bit (the same kernels, in the same calls), and
torch.nn's within the tolerances; before, torch.export and fake tensors raised.
"""
import io

import numpy as np
import pytest

from fusedrnn.tolerances import assert_close

torch = pytest.importorskip("torch")
import fusedrnn.torch as ft  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

pytestmark = pytest.mark.torch

# (class, keywords): every cell, layers, directions, batch_first, no bias, projections.
CONFIGS = [
    (ft.LSTM, dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True)),
    (ft.LSTM, dict(bias=False)),
    (ft.GRU, dict(num_layers=2)),
    (ft.GRU, dict(linear_before_reset=False, bidirectional=True)),
    (ft.RNN, dict(nonlinearity="relu", num_layers=2, batch_first=True)),
    (ft.RNN, dict(bidirectional=True)),
]
IDS = ["lstm-2-bi-proj-bf", "lstm-nobias", "gru-2", "gru-onnx-bi", "relu-2-bf", "tanh-bi"]
I, H, T, B = 4, 6, 5, 3


class Wraps(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, hx=None):
        return self.rnn(x, hx)


def make(cls, kw, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return cls(I, H, dtype=dtype, **kw).eval()


def inputs(m, dtype, t=T, b=B, unbatched=False, requires_grad=False):
    """x and a random hx for m, as torch.nn takes them."""
    D = 2 if m.bidirectional else 1
    lead = (m.num_layers * D,) if unbatched else (m.num_layers * D, b)
    x_shape = (t, I) if unbatched else ((b, t, I) if m.batch_first else (t, b, I))
    x = torch.randn(x_shape, dtype=dtype, requires_grad=requires_grad)
    h0 = torch.randn(lead + (m.proj_size or H,), dtype=dtype, requires_grad=requires_grad)
    if m.mode != "LSTM":
        return x, h0
    return x, (h0, torch.randn(lead + (H,), dtype=dtype, requires_grad=requires_grad))


def torch_twin(m):
    """torch.nn's module with m's weights (the GRU without reset-first: None, torch has none)."""
    if getattr(m, "linear_before_reset", True) is False:
        return None
    kw = dict(num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
              bidirectional=m.bidirectional, dtype=m.weight_hh_l0.dtype)
    if m.mode == "LSTM":
        kw["proj_size"] = m.proj_size
    if m.mode.startswith("RNN"):
        kw["nonlinearity"] = m.nonlinearity
    twin = m._torch_base(m.input_size, m.hidden_size, **kw)
    twin.load_state_dict(m.state_dict())
    return twin.eval()


def assert_same(got, want):
    got, want = tree_leaves(got), tree_leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.equal(g, w)


# (torch.nn's own LSTM with projections, the twin, warns that oneDNN does not take it)
@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("cls, kw", CONFIGS, ids=IDS)
def test_an_exported_program_gives_the_adapters_outputs(cls, kw, strict, dtype):
    m = make(cls, kw, dtype)
    x, hx = inputs(m, dtype)
    ep = torch.export.export(Wraps(m), (x, hx), strict=strict)
    assert "torch.ops.fusedrnn.rnn_stack" in ep.graph_module.code
    got = ep.module()(x, hx)
    assert_same(got, m(x, hx))
    twin = torch_twin(m)
    if twin is not None:
        for g, w in zip(tree_leaves(got), tree_leaves(twin(x, hx))):
            assert_close(g.detach().numpy(), w.detach().numpy(), np.dtype(str(dtype)[6:]))


@pytest.mark.parametrize("cls, kw", CONFIGS, ids=IDS)
def test_exported_without_hx_and_unbatched(cls, kw):
    m = make(cls, kw)
    x, _ = inputs(m, torch.float32)
    assert_same(torch.export.export(Wraps(m), (x,)).module()(x), m(x))
    xu, hxu = inputs(m, torch.float32, unbatched=True)
    assert_same(torch.export.export(Wraps(m), (xu, hxu)).module()(xu, hxu), m(xu, hxu))


def test_an_exported_program_takes_other_lengths_and_batches():
    m = make(ft.LSTM, dict(num_layers=2, batch_first=True))
    x, hx = inputs(m, torch.float32)
    t, b = torch.export.Dim("t", min=2, max=64), torch.export.Dim("b", min=2, max=64)
    ep = torch.export.export(Wraps(m), (x, hx),
                             dynamic_shapes=({0: b, 1: t}, ({1: b}, {1: b})))
    run = ep.module()
    for steps, batch in ((9, 2), (3, 7), (64, 5)):
        x2, hx2 = inputs(m, torch.float32, t=steps, b=batch)
        assert_same(run(x2, hx2), m(x2, hx2))


def test_an_exported_program_refuses_no_steps_as_the_adapter_does():
    """A dynamic length lets an exported program take T = 0, which the adapter's own check
    (traced at export) never sees: the op refuses it as the adapter does, an error that is a
    ValueError and, as torch.nn's, a RuntimeError."""
    m = make(ft.GRU, {})
    x, hx = inputs(m, torch.float32)
    run = torch.export.export(Wraps(m), (x, hx),
                              dynamic_shapes=({0: torch.export.Dim("t", min=0)}, None)).module()
    for error in (ValueError, RuntimeError):
        with pytest.raises(error, match="at least one time step"):
            run(torch.randn(0, B, I), hx)
        with pytest.raises(error, match="at least one time step"):
            m(torch.randn(0, B, I), hx)


@pytest.mark.filterwarnings("ignore:`isinstance.treespec, LeafSpec.` is deprecated")  # torch's
def test_a_saved_or_decomposed_program_runs():
    """torch.export.save / load (the op is found again where fusedrnn.torch is imported), and
    run_decompositions (the op stays one node: it is no composite of torch's)."""
    m = make(ft.GRU, dict(num_layers=2, bidirectional=True))
    x, hx = inputs(m, torch.float32)
    ep = torch.export.export(Wraps(m), (x, hx))
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    assert_same(torch.export.load(buffer).module()(x, hx), m(x, hx))
    decomposed = ep.run_decompositions()
    assert "torch.ops.fusedrnn.rnn_stack" in decomposed.graph_module.code
    assert_same(decomposed.module()(x, hx), m(x, hx))


@pytest.mark.filterwarnings("ignore")  # torch.jit.trace is deprecated, and warns of its checks
@pytest.mark.parametrize("cls, kw", CONFIGS, ids=IDS)
def test_a_trace_saves_loads_and_trains_as_the_adapter(cls, kw):
    """torch.jit.trace records the op (it recorded a Python op, which torch.jit.save could not
    store); the loaded module runs other lengths and batches, and a traced module's gradients
    are the eager adapter's."""
    m = make(cls, kw, torch.float64)
    x, hx = inputs(m, torch.float64)
    with torch.no_grad():
        traced = torch.jit.trace(Wraps(m), (x, hx))
    assert "fusedrnn::rnn_stack" in str(traced.inlined_graph)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x2, hx2 = inputs(m, torch.float64, t=T + 3, b=B + 2)
    with torch.no_grad():
        assert_same(loaded(x2, hx2), m(x2, hx2))
    xg, hxg = inputs(m, torch.float64, requires_grad=True)
    leaves = [xg, *tree_leaves(hxg), *m.parameters()]

    def grads(f):
        return torch.autograd.grad(sum((o * o).sum() for o in tree_leaves(f(xg, hxg))), leaves)

    for g, w in zip(grads(traced), grads(m)):    # (the trace keeps m's parameters)
        assert torch.equal(g, w)


@pytest.mark.parametrize("cls, kw", CONFIGS, ids=IDS)
def test_fake_tensors_get_torchs_shapes(cls, kw):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    m = make(cls, kw)
    x, hx = inputs(m, torch.float32)
    want = m(x, hx)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(x)
        fhx = tuple(map(mode.from_tensor, hx)) if isinstance(hx, tuple) else mode.from_tensor(hx)
        got = m(fx, fhx)
    for g, w in zip(tree_leaves(got), tree_leaves(want)):
        assert isinstance(g, FakeTensor) and g.shape == w.shape and g.dtype == w.dtype
    with FakeTensorMode() as mode:   # a module made under the mode: its parameters are fake
        fake_module = cls(I, H, **kw).eval()
        got = fake_module(mode.from_tensor(x))
    assert [g.shape for g in tree_leaves(got)] == [w.shape for w in tree_leaves(m(x))]


@pytest.mark.parametrize("cls, kw", CONFIGS, ids=IDS)
def test_the_exported_op_has_the_adapters_gradients(cls, kw):
    """An exported program trained: the op's backward runs the forward again, then BPTT, and
    gives the eager adapter's gradients for x, hx and every parameter, bit for bit."""
    m = make(cls, kw, torch.float64)
    x, hx = inputs(m, torch.float64, requires_grad=True)
    run = torch.export.export(Wraps(m), (x, hx)).module()
    leaves = [x, *tree_leaves(hx), *m.parameters()]

    def grads(f):
        loss = sum((o * o.detach().sin()).sum() for o in tree_leaves(f(x, hx)))
        return torch.autograd.grad(loss, leaves)

    for g, w in zip(grads(run), grads(m)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("cls, kw", CONFIGS, ids=IDS)
def test_the_ops_pass_torchs_opcheck(cls, kw):
    """Schema, fake kernel against the real one, autograd registration, and AOT dispatch."""
    m = make(cls, kw, torch.float64)
    x, hx = inputs(m, torch.float64, requires_grad=True)
    x = x.detach().transpose(0, 1).requires_grad_() if m.batch_first else x  # (time first)
    h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
    cell = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}[m.mode]
    args = (x, h0, c0, list(m._flat_weights), cell, I, H, m.num_layers, m.bias,
            m.bidirectional, m.proj_size, getattr(m, "linear_before_reset", True))
    torch.library.opcheck(torch.ops.fusedrnn.rnn_stack.default, args)
    y, hn, cn = torch.ops.fusedrnn.rnn_stack(*args)
    dy, dhn, dcn = torch.randn_like(y), torch.randn_like(hn), torch.randn_like(cn)
    plain = [a.detach() if torch.is_tensor(a) else a for a in args[:3]]  # (no second order)
    torch.library.opcheck(torch.ops.fusedrnn.rnn_stack_backward.default,
                          (dy, dhn, dcn, *plain, [p.detach() for p in args[3]], *args[4:]))


def test_the_op_names_a_misshaped_state_or_weight():
    """Called directly (an exported program skips the adapter's checks), the op names what is
    misshaped: a weight by torch's name, else the state."""
    m = make(ft.GRU, dict(num_layers=2))
    x = torch.randn(5, 2, I)
    w = list(m._flat_weights)

    def op(h0, weights):
        return torch.ops.fusedrnn.rnn_stack(x, h0, None, weights, "gru", I, H, 2, True, False, 0,
                                            True)

    with pytest.raises(ValueError, match=rf"^h0 must have shape \(2, {H}\), got \(3, {H}\)"):
        op(torch.zeros(2, 3, H), w)
    with pytest.raises(ValueError, match=rf"^weight_hh_l1 must have shape \({3 * H}, {H}\), got "
                                         rf"\({H}, {H}\)"):
        op(torch.zeros(2, 2, H), [*w[:5], w[5][:H], *w[6:]])


def test_what_export_cannot_take_is_refused_by_name():
    """A PackedSequence's lengths would be constants of the graph, and dropout's masks are
    drawn where the kernels run; the exported op's gradients cannot be differentiated again."""
    m = make(ft.LSTM, dict(num_layers=2))

    class Packs(torch.nn.Module):
        def forward(self, x):
            return m(pack_padded_sequence(x, torch.tensor([5, 3])))[0].data

    x = torch.randn(5, 2, I)
    with pytest.raises(RuntimeError, match="not a PackedSequence"):
        torch.export.export(Packs(), (x,))
    dropping = ft.GRU(I, H, num_layers=2, dropout=0.5)
    with pytest.raises(RuntimeError, match="model.eval"):
        torch.export.export(Wraps(dropping.train()), (x,))
    torch.export.export(Wraps(dropping.eval()), (x,))   # eval: no dropout, exports
    m64 = make(ft.GRU, {}, torch.float64)
    xg = torch.randn(5, 2, I, dtype=torch.float64, requires_grad=True)
    run = torch.export.export(Wraps(m64), (xg,)).module()
    g, = torch.autograd.grad(run(xg)[0].sum(), xg, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        g.sum().backward()


# torch.onnx.export writes torch.nn's nodes: every config that torch.nn's exporter takes (not
# LSTM projections, which it refuses as it does torch's; not the GRU torch lacks).
ONNX_CONFIGS = [(c, kw) for c, kw in CONFIGS
                if not kw.get("proj_size") and kw.get("linear_before_reset", True)]


# (the TorchScript-based exporter is deprecated, and its trace of torch.nn's forward warns)
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("cls, kw", ONNX_CONFIGS,
                         ids=[i for i, c in zip(IDS, CONFIGS) if c in ONNX_CONFIGS])
def test_torch_onnx_export_writes_onnx_rnn_nodes_that_onnxruntime_runs(cls, kw, dynamo):
    """Both of torch's exporters (torch.export-based, torch 2.13's default, needs onnxscript)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    m = make(cls, kw)
    x, hx = inputs(m, torch.float32)
    h_names = ["h0", "c0"] if isinstance(hx, tuple) else ["h0"]
    buffer = io.BytesIO()
    torch.onnx.export(Wraps(m), (x, hx), buffer, dynamo=dynamo, input_names=["x"] + h_names)
    ops = {n.op_type for n in onnx.load_from_string(buffer.getvalue()).graph.node}
    # (torch's exporters write LSTM and GRU nodes, and the Elman RNN as MatMuls)
    assert {"LSTM": "LSTM", "GRU": "GRU"}.get(m.mode, "MatMul" if dynamo else "RNN") in ops
    assert not any(op.startswith("rnn_stack") for op in ops)
    feeds = dict(zip(["x"] + h_names, [t.numpy() for t in tree_leaves((x, hx))]))
    got = ort.InferenceSession(buffer.getvalue()).run(None, feeds)
    want = tree_leaves(m(x, hx))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_close(g, w.detach().numpy(), np.float32)


@pytest.mark.filterwarnings("ignore")  # the TorchScript-based exporter is deprecated
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("cls, kw, match", [
    (ft.GRU, dict(linear_before_reset=False), "linear_before_reset=True"),
    (ft.LSTM, dict(proj_size=3), "cannot write an LSTM with projections")],
    ids=["gru-onnx", "lstm-proj"])
def test_torch_onnx_export_refuses_what_torch_cannot_write(cls, kw, match, dynamo):
    """The GRU torch lacks, and projections, which ONNX's LSTM has not (torch's default
    exporter wrote torch.nn's LSTM with proj_size as an LSTM node of hidden_size proj_size, no
    W_hr, whose initial_c ONNX Runtime refused at every call). Under the default exporter the
    refusal was lost: its second capture (strict), where Dynamo takes
    torch.onnx.is_in_onnx_export() for False, recorded fusedrnn's op and failed on "No ONNX
    function found for fusedrnn.rnn_stack"."""
    if dynamo:
        pytest.importorskip("onnxscript")
    m = make(cls, kw)
    with pytest.raises(RuntimeError, match=match):
        torch.onnx.export(Wraps(m), (torch.randn(T, B, I),), io.BytesIO(), dynamo=dynamo)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's, at forward AD's import
def test_forward_mode_ad_through_an_exported_program_is_refused():
    """A custom op's generated autograd ignores tangents: torch.func.jvp of an exported program
    gave a tangent of zeros, and a dual input with frozen parameters an output without one,
    where the eager adapter refuses forward-mode AD by name (and torch.nn computes it)."""
    import torch.autograd.forward_ad as fwad
    m = make(ft.GRU, dict(num_layers=2), torch.float64).requires_grad_(False)
    x, _ = inputs(m, torch.float64)
    run = torch.export.export(Wraps(m), (x,)).module()
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda a: run(a)[0], (x,), (torch.ones_like(x),))
    with fwad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        run(fwad.make_dual(x, torch.ones_like(x)))
    assert_same(run(x), m(x))   # (and outside forward-mode AD it runs)


@pytest.mark.parametrize("cls, kw", CONFIGS, ids=IDS)
def test_fake_mode_takes_real_inputs_as_torch_does(cls, kw):
    """Under a FakeTensorMode that allows real inputs, torch.nn's modules return fake tensors;
    the adapter ran its eager path on them and raised about forward-mode AD instead."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    m = make(cls, kw)
    x, hx = inputs(m, torch.float32)
    want = m(x, hx)
    with FakeTensorMode(allow_non_fake_inputs=True):
        got = m(x, hx)
    for g, w in zip(tree_leaves(got), tree_leaves(want)):
        assert isinstance(g, FakeTensor) and g.shape == w.shape and g.dtype == w.dtype
