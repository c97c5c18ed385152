"""fusedrnn.torch in bfloat16 and float16: modules of those dtypes, and calls under CPU autocast
(python/fusedrnn/_torch_precision.py). The dtypes that come out are torch.nn's, call by call; the
values are the float32 kernels' rounded once, held to torch.nn in float32 on the same values."""
import copy
import itertools
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fusedrnn.torch as ft  # noqa: E402
from fusedrnn.tolerances import (  # noqa: E402
    assert_close, low_precision_tolerance, max_scaled_error)

LOW = [torch.bfloat16, torch.float16]
CELLS = [("RNN", {}), ("RNN", {"nonlinearity": "relu"}), ("LSTM", {}), ("LSTM", {"proj_size": 3}),
         ("GRU", {})]
I, H, T, B = 6, 5, 7, 3


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _modules(kind, kwargs, **more):
    """torch.nn's module and ours on the same parameters."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(I, H, **kwargs, **more)
    return ref, getattr(ft, kind).from_module(copy.deepcopy(ref))


def _hx(kind, ref, dtypes, batch=B):
    """hx in `dtypes` (one dtype, or (h0's, c0's) for an LSTM), or None."""
    if dtypes is None:
        return None
    LD = ref.num_layers * (2 if ref.bidirectional else 1)
    h_dtype, c_dtype = dtypes if isinstance(dtypes, tuple) else (dtypes, dtypes)
    h = torch.randn(LD, batch, ref.proj_size or H).to(h_dtype)
    return (h, torch.randn(LD, batch, H).to(c_dtype)) if kind == "LSTM" else h


def _flat(result):
    """(output, hn[, cn]) of a call, as a list."""
    output, state = result
    return [output, *(state if isinstance(state, tuple) else (state,))]


def _cell_id(v):
    return v if isinstance(v, str) else "-".join(f"{k}={w}" for k, w in v.items()) or "plain"


def _dtypes(result):
    """The dtypes of a call's (output or its data, hn[, cn])."""
    output, *states = _flat(result)
    return [getattr(output, "data", output).dtype, *(t.dtype for t in states)]


def _torch_nn_dtypes(ref, args, autocast):
    """_dtypes of torch.nn's call, or autocast's dtype for each output where torch's float16
    oneDNN kernels are missing (this CPU's LSTM: "could not create a primitive descriptor")."""
    try:
        with warnings.catch_warnings():     # (torch's note on its own LSTM kernels)
            warnings.filterwarnings("ignore", "LSTM with projections is not supported")
            return _dtypes(ref(*args))
    except RuntimeError as e:
        assert "could not create a primitive descriptor" in str(e), e
        return [autocast] * (3 if isinstance(ref, torch.nn.LSTM) else 2)


def _assert_low_close(got, want, kind="forward", what="result"):
    """got (any dtype) against want (float32), with got's dtype's tolerance."""
    got_np = got.detach().double().numpy()
    want_np = want.detach().double().numpy()
    if got.dtype in LOW:
        tol = low_precision_tolerance(_name(got.dtype), kind)
        err = max_scaled_error(got_np, want_np)
        assert err <= tol, f"{what}: scaled error {err:.3g} over {tol:.3g} ({got.dtype})"
    else:
        assert got.dtype == torch.float32
        assert_close(got_np, want_np, np.float32, kind, what)


@pytest.mark.parametrize("autocast", LOW, ids=_name)
@pytest.mark.parametrize("kind, kwargs", CELLS, ids=_cell_id)
def test_under_autocast_the_dtypes_are_torch_nns_and_the_values_float32s(kind, kwargs, autocast):
    """Each mix of float32 and autocast-dtype input, h0 and c0, with and without grad: our
    outputs' dtypes are those torch.nn returns for the same call (autocast's where torch's
    kernels fail: its float16 LSTM on a float32 input, here), and their values torch.nn's
    float32 results rounded once."""
    ref, mod = _modules(kind, kwargs)
    x = torch.randn(T, B, I)
    cast_by_torch = 0
    dtypes = [torch.float32, autocast]
    hx_dtypes = [None, *(itertools.product(dtypes, dtypes) if kind == "LSTM" else dtypes)]
    for x_dtype, hx_dtype, grad in itertools.product(dtypes, hx_dtypes, [True, False]):
        xin, hx = x.to(x_dtype), _hx(kind, ref, hx_dtype)
        case = f"x {x_dtype}, hx {hx_dtype}, grad {grad}"
        with torch.autocast("cpu", dtype=autocast), torch.set_grad_enabled(grad):
            got = _flat(mod(xin, hx))
            want_dtypes = _torch_nn_dtypes(ref, (xin, hx), autocast)
        assert [t.dtype for t in got] == want_dtypes, case
        cast_by_torch += got[0].dtype == autocast
        hx32 = None if hx is None else (tuple(t.float() for t in hx) if kind == "LSTM"
                                        else hx.float())
        with torch.no_grad():
            want = _flat(ref(xin.float(), hx32))
        for g, w, what in zip(got, want, ["output", "hn", "cn"]):
            _assert_low_close(g, w, what=f"{what} ({case})")
    assert cast_by_torch > 0        # (every cell returns autocast's dtype for some mix)


@pytest.mark.parametrize("dtype", LOW, ids=_name)
@pytest.mark.parametrize("kind, kwargs", CELLS, ids=_cell_id)
def test_a_low_precision_module_trains_as_torch_nn_in_float32(kind, kwargs, dtype):
    """A bfloat16/float16 module, 2 layers both ways: outputs and the gradients of the input, hx
    and every parameter come in the module's dtype, each torch.nn's float32 result on the same
    values rounded once."""
    ref, mod = _modules(kind, kwargs, num_layers=2, bidirectional=True)
    mod.to(dtype)
    ref.load_state_dict({k: v.to(dtype).float() for k, v in ref.state_dict().items()})
    x = torch.randn(T, B, I).to(dtype)
    hx = _hx(kind, ref, dtype)
    hx_list = list(hx) if kind == "LSTM" else [hx]
    leaves = [x, *hx_list]
    ours_in = [t.clone().requires_grad_() for t in leaves]
    ref_in = [t.float().requires_grad_() for t in leaves]
    got = _flat(mod(ours_in[0], tuple(ours_in[1:]) if kind == "LSTM" else ours_in[1]))
    want = _flat(ref(ref_in[0], tuple(ref_in[1:]) if kind == "LSTM" else ref_in[1]))
    # loss weights exact in the low dtype: the cast's backward rounds what reaches our outputs
    weights = [torch.randn(w.shape).to(dtype).float() for w in want]
    sum((g.float() * w).sum() for g, w in zip(got, weights)).backward()
    sum((o * w).sum() for o, w in zip(want, weights)).backward()
    for g, w, what in zip(got, want, ["output", "hn", "cn"]):
        assert g.dtype == dtype
        _assert_low_close(g, w, what=what)
    for name, g, w in zip(["dx", "dh0", "dc0"], ours_in, ref_in):
        assert g.grad.dtype == dtype
        _assert_low_close(g.grad, w.grad, "gradient", name)
    for name, p in mod.named_parameters():
        assert p.grad.dtype == dtype
        _assert_low_close(p.grad, getattr(ref, name).grad, "gradient", name)


@pytest.mark.parametrize("dtype", LOW, ids=_name)
def test_a_packed_sequence_in_low_precision(dtype):
    ref, mod = _modules("LSTM", {}, batch_first=True)
    mod.to(dtype)
    ref.load_state_dict({k: v.to(dtype).float() for k, v in ref.state_dict().items()})
    x = torch.randn(B, T, I).to(dtype)
    lengths = [T, 2, 5]
    pack = torch.nn.utils.rnn.pack_padded_sequence
    got_y, (got_h, got_c) = mod(pack(x, lengths, batch_first=True, enforce_sorted=False))
    with torch.no_grad():
        want_y, (want_h, want_c) = ref(pack(x.float(), lengths, batch_first=True,
                                            enforce_sorted=False))
    assert isinstance(got_y, torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(got_y.batch_sizes, want_y.batch_sizes)
    assert torch.equal(got_y.unsorted_indices, want_y.unsorted_indices)
    for g, w in [(got_y.data, want_y.data), (got_h, want_h), (got_c, want_c)]:
        assert g.dtype == dtype
        _assert_low_close(g, w)
    ref, mod = _modules("GRU", {})     # under autocast, torch.nn's dtypes
    packed = pack(torch.randn(T, B, I), lengths, enforce_sorted=False)
    for h0 in (None, torch.zeros(1, B, H, dtype=dtype)):
        with torch.autocast("cpu", dtype=dtype):
            assert _dtypes(mod(packed, h0)) == _dtypes(ref(packed, h0))


def test_a_float64_module_under_autocast_runs_in_float64_unchanged():
    """Autocast leaves float64 alone, in torch.nn as here: the same bits as outside it."""
    _, mod = _modules("GRU", {})
    mod.double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    outside = _flat(mod(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = _flat(mod(x))
    assert all(i.dtype == torch.float64 and torch.equal(i, o) for i, o in zip(inside, outside))


def test_low_precision_dtypes_torch_refuses_are_refused_by_name():
    _, mod = _modules("LSTM", {})
    mod.bfloat16()
    with pytest.raises(ValueError, match=r"input must have dtype torch.bfloat16 \(the "
                                         r"parameters' dtype\), got torch.float32"):
        mod(torch.randn(T, B, I))
    with pytest.raises(ValueError, match=r"hx\[1\] must have dtype torch.bfloat16"):
        mod(torch.randn(T, B, I).bfloat16(), (torch.zeros(1, B, H).bfloat16(),
                                              torch.zeros(1, B, H)))
    _, mod = _modules("RNN", {})
    with torch.autocast("cpu", dtype=torch.bfloat16):   # (torch: "mat1 and mat2 must have ...")
        with pytest.raises(ValueError, match=r"input must have dtype torch.float32, "
                                             r"torch.bfloat16 or torch.float16 under CPU "
                                             r"autocast \(the parameters': torch.float32\), "
                                             r"got torch.float64"):
            mod(torch.randn(T, B, I, dtype=torch.float64))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")     # torch.jit.trace is deprecated
def test_a_bfloat16_module_exports_and_traces_with_its_casts():
    """torch.export and torch.jit.trace record the casts around the layer's op: the programs
    give the eager module's bits."""
    _, mod = _modules("LSTM", {})
    mod.bfloat16().eval()
    x = torch.randn(T, B, I).bfloat16()
    want = _flat(mod(x))
    programs = [torch.export.export(mod, (x,)).module(), torch.jit.trace(mod, (x,))]
    for program in programs:
        got = _flat(program(x))
        assert all(g.dtype == torch.bfloat16 and torch.equal(g, w) for g, w in zip(got, want))


class _UnderAutocast(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.layer(x)[0]


@pytest.mark.parametrize("strict", [False, True])
def test_export_under_autocast_is_refused_by_name(strict):
    """Non-strict export dropped the output casts in its autocast region (a float32 result
    where torch.nn's is bfloat16): refused, in both modes."""
    _, mod = _modules("LSTM", {})
    with pytest.raises(Exception, match="torch.export of fusedrnn.torch under CPU autocast"):
        torch.export.export(_UnderAutocast(mod.eval()), (torch.randn(T, B, I),), strict=strict)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")     # torch.jit.trace is deprecated
def test_traces_and_fake_tensors_under_autocast_give_the_eager_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    ref, mod = _modules("LSTM", {"proj_size": 3})
    model = _UnderAutocast(mod.eval())
    x = torch.randn(T, B, I)
    want = model(x)
    assert want.dtype == _UnderAutocast(ref.eval())(x).dtype == torch.bfloat16
    assert torch.equal(torch.jit.trace(model, (x,))(x), want)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        assert model(mode.from_tensor(x)).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_name)
def test_checkpointing_and_save_on_cpu_give_the_plain_gradients(dtype):
    """Both checkpoint modes and save_on_cpu (which the README promises) give the gradients of
    a plain call, bit for bit: non-reentrant checkpointing unpacks each saved tensor once, so
    the adapter's backward must read ctx.saved_tensors once."""
    from torch.utils.checkpoint import checkpoint
    _, mod = _modules("LSTM", {}, num_layers=2)
    mod.to(dtype)
    x = torch.randn(T, B, I).to(dtype)

    def grads(call):
        mod.zero_grad()
        xin = x.clone().requires_grad_()
        call(xin).float().sum().backward()
        return [xin.grad] + [p.grad for p in mod.parameters()]

    want = grads(lambda a: mod(a)[0])
    ways = [lambda a: checkpoint(lambda b: mod(b)[0], a, use_reentrant=False),
            lambda a: checkpoint(lambda b: mod(b)[0], a, use_reentrant=True)]
    for way in ways:
        assert all(torch.equal(g, w) for g, w in zip(grads(way), want))
    with torch.autograd.graph.save_on_cpu():
        got = grads(lambda a: mod(a)[0])
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_a_low_precision_tensor_changed_in_place_before_backward_raises_as_in_torch():
    """The kernels saw float32 copies, so the gradients would be the old values' (torch.nn
    raises there): an optimizer step between forward and backward is caught."""
    _, mod = _modules("GRU", {})
    mod.bfloat16()
    for change in (lambda x: mod.weight_hh_l0.add_(1), lambda x: x.add_(1)):
        x = torch.randn(T, B, I).bfloat16()
        y = mod(x)[0].float().sum()
        with torch.no_grad():
            change(x)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


@pytest.mark.parametrize("autocast", LOW, ids=_name)
def test_a_packed_batch_of_full_rows_under_autocast_takes_torchs_unpacked_dtypes(autocast):
    """torch runs a PackedSequence whose rows all have every step as a padded batch (oneDNN's
    LSTM, which casts all to autocast's dtype); with ragged rows, its step-by-step cells."""
    ref, mod = _modules("LSTM", {})
    pack = torch.nn.utils.rnn.pack_padded_sequence
    for lengths in ([T, T, T], [T, 4, 2]):
        packed = pack(torch.randn(T, B, I), lengths)
        with torch.autocast("cpu", dtype=autocast):
            assert _dtypes(mod(packed)) == _torch_nn_dtypes(ref, (packed,), autocast), lengths


def test_a_malformed_hx_in_low_precision_is_named_before_the_dtypes():
    h = torch.zeros(1, B, H).bfloat16()
    x = torch.randn(T, B, I).bfloat16()
    _, gru = _modules("GRU", {})
    _, lstm = _modules("LSTM", {})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"hx for GRU must be one tensor, got a tuple"):
            gru(x, (h, h))
        with pytest.raises(TypeError, match=r"hx for LSTM must be a tuple \(h0, c0\) of "
                                            r"tensors, got tuple of 3"):
            lstm(x, (h, h, h))
    lstm.bfloat16()
    with pytest.raises(TypeError, match=r"hx for LSTM must be a tuple \(h0, c0\) of tensors, "
                                        r"got Tensor"):
        lstm(x, h)


@pytest.mark.parametrize("autocast", LOW, ids=_name)
@pytest.mark.parametrize("kind, kwargs", CELLS, ids=_cell_id)
def test_the_other_low_dtype_under_autocast_gives_torch_nns_dtypes(kind, kwargs, autocast):
    """Under autocast torch.nn also takes float16 tensors with bfloat16 autocast (and the
    reverse), in the input, hx or the module, and promotes: the adapter's dtypes are its."""
    other = torch.float16 if autocast == torch.bfloat16 else torch.bfloat16
    ref, mod = _modules(kind, kwargs)
    x = torch.randn(T, B, I)
    for module_dtype, x_dtype, hx_dtype in [(torch.float32, other, None),
                                            (torch.float32, torch.float32, other),
                                            (other, torch.float32, None)]:
        ref.to(module_dtype), mod.to(module_dtype)
        xin, hx = x.to(x_dtype), _hx(kind, ref, hx_dtype)
        case = f"module {module_dtype}, x {x_dtype}, hx {hx_dtype}"
        with torch.autocast("cpu", dtype=autocast):
            assert _dtypes(mod(xin, hx)) == _torch_nn_dtypes(ref, (xin, hx), autocast), case


def test_a_low_precision_call_frees_its_input_as_torch_does():
    """The tensors watched for in-place changes are held by save_for_backward alone, so they go
    when autograd frees the graph (and checkpointing can drop them): the graph held them past
    backward before."""
    import gc
    import weakref
    _, mod = _modules("LSTM", {})
    mod.bfloat16()
    source = torch.randn(T, B, I).bfloat16().requires_grad_()
    x = source * 2                      # an activation the graph alone should keep
    seen = weakref.ref(x)
    y = mod(x)[0]
    del x
    y.float().sum().backward()
    gc.collect()
    assert seen() is None


def test_a_low_precision_module_in_inference_keeps_no_packed_forms_of_its_casts():
    """A bfloat16 or float16 module's inference call hands the kernels float32 casts of its
    parameters, new tensors every call: the kernels kept their packed forms, one set a call,
    until the thread's cache was full (256 MiB; two modules filled it in 1000 calls). They keep
    none now; a float32 module's parameters are kept as before."""
    from fusedrnn import _C
    _, mod = _modules("LSTM", {}, num_layers=2)
    x = torch.randn(T, B, I)
    _C.packed_cache(clear=True)
    with torch.no_grad():
        for dtype in LOW:
            mod.to(dtype)
            for _ in range(3):
                mod(x.to(dtype))
        assert _C.packed_cache()["forms"] == 0
        with torch.autocast("cpu", dtype=torch.bfloat16):   # float32 parameters: not cast
            mod.float()(x)
        assert _C.packed_cache()["forms"] > 0
    _C.packed_cache(clear=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")     # torch.jit.trace is deprecated
def test_a_low_precision_program_keeps_no_packed_forms_of_its_casts():
    """The same through the layer's op, which torch.export and torch.jit.trace record after the
    parameters' casts: the op kept the packed forms of each call's casts (an exported bfloat16
    model served call after call filled the thread's cache). A float32 module's op still keeps
    the forms of its parameters."""
    from fusedrnn import _C
    _, mod = _modules("LSTM", {}, num_layers=2)
    mod.eval()
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float32):
            mod.to(dtype)
            x = torch.randn(T, B, I).to(dtype)
            for program in (torch.export.export(mod, (x,)).module(), torch.jit.trace(mod, (x,))):
                _C.packed_cache(clear=True)
                program(x)
                assert (_C.packed_cache()["forms"] > 0) == (dtype == torch.float32), program
    _C.packed_cache(clear=True)
