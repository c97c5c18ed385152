"""fusedrnn.RNN / LSTM / GRU against torch.nn over a random grid of every option.

Each case draws cell, layers, directions, batch_first, bias, proj_size, lengths, whether hx is
given, dtype and small sizes (H not a multiple of 8, I both above and below H), builds a
torch.nn module in float64, loads its state_dict into our layer and compares outputs, final
states and every gradient (input, hx, each parameter) through ``(y*dy).sum() + (hn*dhn).sum()
[+ (cn*dcn).sum()]``. A float32 layer runs on the float32-rounded weights and inputs against
torch in float64, at the float32 tolerances. Helpers here are reused by test_torch_adapter.py.
A second, smaller grid takes the sizes where the kernels change their ways (KERNEL_GRID).
"""
import dataclasses

import numpy as np
import pytest

import fusedrnn
from fusedrnn.tolerances import assert_close

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402
from _torch_loss import backward_and_collect  # noqa: E402

pytestmark = pytest.mark.torch

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


@dataclasses.dataclass(frozen=True)
class Case:
    cell: str
    dtype: str
    T: int
    B: int
    I: int
    H: int
    L: int
    bidirectional: bool
    batch_first: bool
    bias: bool
    proj: int
    lengths: bool
    hx: bool
    seed: int
    threads: int = 1

    @property
    def D(self):
        return 2 if self.bidirectional else 1

    @property
    def H_out(self):
        return self.proj or self.H

    def id(self):
        opts = [self.cell, self.dtype[5:], f"T{self.T}B{self.B}I{self.I}H{self.H}L{self.L}"]
        opts += [name for name, on in [("bi", self.bidirectional), ("bf", self.batch_first),
                                       ("nobias", not self.bias), ("len", self.lengths),
                                       ("hx", self.hx)] if on]
        if self.proj:
            opts.append(f"proj{self.proj}")
        if self.threads > 1:
            opts.append(f"t{self.threads}")
        return "-".join(opts)


def make_cases(per_cell_dtype, seed):
    """A reproducible random grid: ``per_cell_dtype`` cases for each cell and dtype."""
    rng = np.random.default_rng(seed)
    cases = []
    for cell in CELLS:
        for dtype in ("float64", "float32"):
            for i in range(per_cell_dtype):
                H = int(rng.choice([1, 3, 5, 7, 9]))
                # alternate I < H and I > H (I = H now and then)
                I = int(rng.integers(1, H + 1)) if i % 2 else int(rng.integers(H, 10))
                proj = (int(rng.integers(1, H)) if cell == "lstm" and H > 1 and rng.random() < 0.5
                        else 0)
                cases.append(Case(
                    cell=cell, dtype=dtype, T=int(rng.integers(1, 7)), B=int(rng.integers(1, 5)),
                    I=I, H=H, L=int(rng.integers(1, 4)), bidirectional=bool(rng.random() < 0.5),
                    batch_first=bool(rng.random() < 0.5), bias=bool(rng.random() < 0.75),
                    proj=proj, lengths=bool(rng.random() < 0.5), hx=bool(rng.random() < 0.5),
                    seed=int(rng.integers(2**31))))
    return cases


def torch_module(case):
    """A float64 torch.nn module for ``case``; for float32 cases its weights are rounded to
    float32 so both sides use the same weights."""
    torch.manual_seed(case.seed)
    kw = dict(num_layers=case.L, bias=case.bias, batch_first=case.batch_first,
              bidirectional=case.bidirectional, dtype=torch.float64)
    if case.cell == "lstm":
        m = torch.nn.LSTM(case.I, case.H, proj_size=case.proj, **kw)
    elif case.cell == "gru":
        m = torch.nn.GRU(case.I, case.H, **kw)
    else:
        m = torch.nn.RNN(case.I, case.H, nonlinearity=case.cell[4:], **kw)
    if case.dtype == "float32":
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.float().double())
    return m


def our_layer(case, **extra):
    kw = dict(num_layers=case.L, bias=case.bias, batch_first=case.batch_first,
              bidirectional=case.bidirectional, dtype=np.dtype(case.dtype), seed=case.seed,
              **extra)
    if case.cell == "lstm":
        return fusedrnn.LSTM(case.I, case.H, proj_size=case.proj, **kw)
    if case.cell == "gru":
        return fusedrnn.GRU(case.I, case.H, **kw)
    return fusedrnn.RNN(case.I, case.H, nonlinearity=case.cell[4:], **kw)


def make_data(case):
    """Inputs and upstream gradients as float64 arrays (float32-representable for float32
    cases), in the caller's layout (batch_first or not)."""
    rng = np.random.default_rng(case.seed + 1)
    T, B, LD = case.T, case.B, case.L * case.D

    def draw(*shape):
        a = rng.standard_normal(shape)
        return a.astype(np.float32).astype(np.float64) if case.dtype == "float32" else a

    x = draw(B, T, case.I) if case.batch_first else draw(T, B, case.I)
    d = {"x": x,
         "dy": draw(*x.shape[:2], case.D * case.H_out),
         "dhn": draw(LD, B, case.H_out),
         "dcn": draw(LD, B, case.H) if case.cell == "lstm" else None,
         "h0": draw(LD, B, case.H_out) if case.hx else None,
         "c0": draw(LD, B, case.H) if case.hx and case.cell == "lstm" else None,
         "lengths": None}
    if case.lengths:
        lens = rng.integers(1, T + 1, size=B)
        lens[rng.integers(B)] = T
        d["lengths"] = lens
    return d


def run_torch(m, case, d, packed_out=False):
    """Forward and backward of torch module ``m`` (float64) on ``d``; NumPy results."""
    tdt = torch.float64
    x = torch.tensor(d["x"], dtype=tdt, requires_grad=True)
    h0 = None if d["h0"] is None else torch.tensor(d["h0"], dtype=tdt, requires_grad=True)
    c0 = None if d["c0"] is None else torch.tensor(d["c0"], dtype=tdt, requires_grad=True)
    hx = (h0, c0) if case.cell == "lstm" and h0 is not None else h0
    inp = x
    if d["lengths"] is not None:
        inp = pack_padded_sequence(x, torch.as_tensor(d["lengths"]), batch_first=case.batch_first,
                                   enforce_sorted=False)
    out, h = m(inp, hx)
    if d["lengths"] is not None:
        out, _ = pad_packed_sequence(out, batch_first=case.batch_first, total_length=case.T)
    return backward_and_collect(m, case.cell, d, out, h, x, h0, c0)


def compare(got, want, dtype, what=""):
    """Compare result dicts as produced by run_torch (keys missing in ``got`` are skipped)."""
    for key in ("y", "hn", "cn"):
        if want.get(key) is not None:
            assert_close(got[key], want[key], dtype, "forward", what=f"{what}{key}")
    for key in ("dx", "dh0", "dc0"):
        if want.get(key) is not None and key in got:
            assert_close(got[key], want[key], dtype, "gradient", what=f"{what}{key}")
    if "grads" in got:
        assert sorted(got["grads"]) == sorted(want["grads"])
        for name, g in want["grads"].items():
            assert_close(got["grads"][name], g, dtype, "gradient", what=f"{what}{name}")


def run_ours(case, d, layer=None):
    dt = np.dtype(case.dtype)
    layer = layer if layer is not None else our_layer(case)

    def cast(a):
        return None if a is None else a.astype(dt)

    hx = cast(d["h0"])
    if case.cell == "lstm" and hx is not None:
        hx = (hx, cast(d["c0"]))
    y, h = layer(cast(d["x"]), hx, lengths=d["lengths"])
    hn, cn = h if case.cell == "lstm" else (h, None)
    dhn = (cast(d["dhn"]), cast(d["dcn"])) if case.cell == "lstm" else cast(d["dhn"])
    dx, dh = layer.backward(cast(d["dy"]), dhn)
    dh0, dc0 = dh if case.cell == "lstm" else (dh, None)
    for a in (y, hn, dx, dh0):
        assert a.dtype == dt
    return {"y": y, "hn": hn, "cn": cn, "dx": dx, "dh0": dh0, "dc0": dc0,
            "grads": dict(layer.grads)}


GRID = make_cases(per_cell_dtype=20, seed=20240601)


def test_grid_covers_every_option():
    for cell in CELLS:
        cases = [c for c in GRID if c.cell == cell]
        for field in ("bidirectional", "batch_first", "bias", "lengths", "hx"):
            assert {getattr(c, field) for c in cases} == {False, True}, (cell, field)
        assert {c.L for c in cases} == {1, 2, 3}, cell
        assert {c.dtype for c in cases} == {"float32", "float64"}
        assert any(c.I > c.H for c in cases) and any(c.I < c.H for c in cases)
        assert any(c.H % 8 for c in cases)
    assert any(c.proj for c in GRID) and any(c.proj and c.L > 1 and c.bidirectional
                                             for c in GRID)


def make_kernel_sized_cases(seed):
    """Sizes past GRID's, where the kernels take other ways: several unit blocks and a ragged
    last one (H = 33, 65, 100), a state past one sum block (H = 129: kSumBlock), a single row
    (riding, the halves, the products by chunks of 128 steps at T = 150), a row tile and one
    more row (B = 13), and 2 threads (step teams). Three cases for each cell and dtype."""
    rng = np.random.default_rng(seed)
    cases = []
    for cell in CELLS:
        for dtype in ("float64", "float32"):
            for i in range(3):
                H = int(rng.choice([33, 65, 100, 129]))
                proj = (int(rng.integers(1, H)) if cell == "lstm" and rng.random() < 0.4 else 0)
                steps = [37, 150] if i == 0 else [1, 37, 150]  # (a single row's team: T > 1)
                cases.append(Case(
                    cell=cell, dtype=dtype, T=int(rng.choice(steps)),
                    B=(1, 13, 20)[i], I=int(rng.choice([1, 33, 130])),
                    H=H, L=int(rng.integers(1, 3)), bidirectional=bool(rng.random() < 0.5),
                    batch_first=bool(rng.random() < 0.5), bias=bool(rng.random() < 0.75),
                    proj=proj, lengths=bool(rng.random() < 0.4), hx=bool(rng.random() < 0.5),
                    seed=int(rng.integers(2**31)), threads=1 + len(cases) % 2))
    return cases


KERNEL_GRID = make_kernel_sized_cases(seed=20261206)


def test_kernel_grid_covers_the_kernels_ways():
    assert {c.B for c in KERNEL_GRID} == {1, 13, 20}
    assert {c.threads for c in KERNEL_GRID} == {1, 2}
    assert any(c.H > 128 for c in KERNEL_GRID) and any(c.H % 32 for c in KERNEL_GRID)
    assert any(c.B == 1 and c.T > 128 and not c.lengths for c in KERNEL_GRID)
    assert any(c.B == 1 and c.threads == 2 and c.T > 1 and c.cell == "lstm" for c in KERNEL_GRID)


@pytest.mark.parametrize("case", GRID + KERNEL_GRID, ids=Case.id)
def test_layer_matches_torch(case):
    m = torch_module(case)
    d = make_data(case)
    want = run_torch(m, case, d)
    layer = our_layer(case)
    layer.load_state_dict(m.state_dict())
    threads = fusedrnn.get_num_threads()
    fusedrnn.set_num_threads(case.threads)
    try:
        got = run_ours(case, d, layer)
    finally:
        fusedrnn.set_num_threads(threads)
    compare(got, want, case.dtype)


def assert_same_nonfinite_and_close(got, want, dtype, what):
    """NaN and +-inf at the same elements as ``want``, the finite elements within tolerance."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN")
    np.testing.assert_array_equal(np.where(np.isinf(got), got, 0), np.where(np.isinf(want), want, 0),
                                  err_msg=f"{what}: inf")
    finite = np.isfinite(want)
    assert_close(np.where(finite, got, 0), np.where(finite, want, 0), dtype, "gradient", what)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["plain", "bi-lengths"])
@pytest.mark.parametrize("where", ["dy", "dhn"])
@pytest.mark.parametrize("cell", CELLS)
def test_infinite_upstream_gradients_give_torchs_nan_and_inf(cell, where, layout, dtype):
    """Infinities in dy or dhn reach every gradient as NaN or +-inf where torch.nn's autograd puts
    them. The GRU's d n = dh (1 - z) is dh - dh z, as autograd takes it from h' = n + z (h - n):
    NaN for an infinite dh (dh * (1 - z), as before, kept +-inf: dx had -inf where torch.nn has
    NaN)."""
    bi = layout == "bi-lengths"
    case = Case(cell=cell, dtype=dtype, T=6, B=3, I=4, H=5, L=1, bidirectional=bi,
                batch_first=False, bias=True, proj=0, lengths=bi, hx=True, seed=11)
    m = torch_module(case)
    d = make_data(case)
    if where == "dy":
        d["dy"][3, 0, 1], d["dy"][1, 2, 3], d["dy"][4, 1, 0] = np.inf, -np.inf, np.inf
        if bi:
            d["dy"][np.arange(case.T)[:, None] >= d["lengths"][None, :]] = 0  # padding
    else:
        d["dhn"][0, 2, 0], d["dhn"][-1, 1, 4], d["dhn"][0, 0, 2] = np.inf, -np.inf, np.inf
    want = run_torch(m, case, d)
    layer = our_layer(case)
    layer.load_state_dict(m.state_dict())
    got = run_ours(case, d, layer)
    assert not all(np.isfinite(g).all() for g in want["grads"].values())  # they reach them
    for key in ("dx", "dh0", "dc0"):
        if want[key] is not None:
            assert_same_nonfinite_and_close(got[key], want[key], case.dtype, key)
    for name, g in want["grads"].items():
        assert_same_nonfinite_and_close(got["grads"][name], g, case.dtype, name)


@pytest.mark.parametrize("cell", CELLS)
def test_unbatched_matches_torch(cell):
    case = Case(cell=cell, dtype="float64", T=4, B=1, I=3, H=5, L=2, bidirectional=True,
                batch_first=False, bias=True, proj=2 if cell == "lstm" else 0, lengths=False,
                hx=True, seed=7)
    m = torch_module(case)
    layer = our_layer(case)
    layer.load_state_dict(m.state_dict())
    rng = np.random.default_rng(3)
    x = rng.standard_normal((case.T, case.I))
    h0 = rng.standard_normal((case.L * case.D, case.H_out))
    c0 = rng.standard_normal((case.L * case.D, case.H))
    hx = (h0, c0) if cell == "lstm" else h0
    thx = tuple(map(torch.tensor, hx)) if cell == "lstm" else torch.tensor(hx)
    ty, th = m(torch.tensor(x), thx)
    y, h = layer(x, hx)
    assert y.shape == tuple(ty.shape) == (case.T, case.D * case.H_out)
    assert_close(y, ty.detach().numpy(), np.float64)
    if cell == "lstm":
        assert h[0].shape == tuple(th[0].shape) and h[1].shape == tuple(th[1].shape)
        assert_close(h[0], th[0].detach().numpy(), np.float64)
        assert_close(h[1], th[1].detach().numpy(), np.float64)
    else:
        assert h.shape == tuple(th.shape)
        assert_close(h, th.detach().numpy(), np.float64)


@pytest.mark.parametrize("cell", CELLS)
def test_eval_mode_with_dropout_matches_torch(cell):
    """In eval mode dropout is off on both sides; the result is the plain stacked network."""
    case = Case(cell=cell, dtype="float64", T=5, B=3, I=4, H=6, L=3, bidirectional=True,
                batch_first=True, bias=True, proj=0, lengths=True, hx=False, seed=11)
    m = torch_module(case)
    m.dropout = 0.5
    m.eval()
    layer = our_layer(case, dropout=0.5).eval()
    layer.load_state_dict(m.state_dict())
    d = make_data(case)
    with torch.no_grad():
        inp = pack_padded_sequence(torch.tensor(d["x"]), torch.as_tensor(d["lengths"]),
                                   batch_first=True, enforce_sorted=False)
        out, h = m(inp)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=case.T)
    y, hh = layer(d["x"], lengths=d["lengths"])
    assert_close(y, out.numpy(), np.float64)
    hn = hh[0] if cell == "lstm" else hh
    assert_close(hn, (h[0] if cell == "lstm" else h).numpy(), np.float64)


@pytest.mark.parametrize("cell", CELLS)
def test_state_dict_to_torch_round_trip(cell):
    """fusedrnn -> torch.nn: our initial weights load into torch and give the same outputs;
    and back again, unchanged."""
    case = Case(cell=cell, dtype="float64", T=4, B=2, I=3, H=5, L=2, bidirectional=True,
                batch_first=False, bias=True, proj=3 if cell == "lstm" else 0, lengths=False,
                hx=False, seed=5)
    layer = our_layer(case)
    m = torch_module(case)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((case.T, case.B, case.I))
    y, _ = layer(x)
    with torch.no_grad():
        ty, _ = m(torch.tensor(x))
    assert_close(y, ty.numpy(), np.float64)
    again = our_layer(dataclasses.replace(case, seed=6))
    again.load_state_dict(m.state_dict())
    for name, v in layer.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name], v)


def test_a_bfloat16_state_dict_loads_cast_as_torch_casts_it():
    """bfloat16 has no NumPy dtype: the values go through float32, which holds them exactly."""
    m = torch.nn.LSTM(3, 5).bfloat16()
    layer = fusedrnn.LSTM(3, 5, dtype=np.float64)
    layer.load_state_dict(m.state_dict())
    want = torch.nn.LSTM(3, 5).double()
    want.load_state_dict(m.state_dict())
    for name, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, want.state_dict()[name].numpy())


def test_init_matches_torch_distribution():
    """Every parameter is U(-1/sqrt(H), 1/sqrt(H)) as torch initialises it."""
    layer = fusedrnn.LSTM(30, 40, num_layers=2, bidirectional=True, seed=0)
    m = torch.nn.LSTM(30, 40, num_layers=2, bidirectional=True)
    bound = 1 / np.sqrt(40)
    for (name, p), (tname, tp) in zip(layer.named_parameters(), m.named_parameters()):
        assert name == tname and p.shape == tuple(tp.shape)
        assert np.abs(p).max() <= bound
        assert abs(p.std() - bound / np.sqrt(3)) < 0.1 * bound  # std of U(-b, b)


@pytest.mark.parametrize("cell", CELLS)
def test_parameter_attributes_and_all_weights_as_torch(cell):
    """The same attribute names as torch.nn's modules (parameters, mode, proj_size), and
    all_weights grouped as torch groups it (per layer and direction, in order); its names, in
    _flat_weights_names, and the weights themselves, in _flat_weights, which code that rewraps
    an RNN's weights (weight drop) reads. (_flat_weights was missing: found by a differential
    probe of torch.nn's attributes.)"""
    kw = dict(num_layers=2, bidirectional=True)
    kw.update({"lstm": {"proj_size": 2}, "rnn_relu": {"nonlinearity": "relu"}}.get(cell, {}))
    kind = cell.split("_")[0]
    m = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](3, 4, **kw)
    layer = {"rnn": fusedrnn.RNN, "lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU}[kind](3, 4, **kw)
    layer.load_state_dict(m.state_dict())
    assert (layer.mode, layer.proj_size) == (m.mode, m.proj_size)
    assert layer._flat_weights_names == m._flat_weights_names
    assert len(layer._flat_weights) == len(m._flat_weights)
    for name, w, tw in zip(m._flat_weights_names, layer._flat_weights, m._flat_weights):
        assert w is getattr(layer, name)        # the live arrays, as torch's are its Parameters
        np.testing.assert_array_equal(w, tw.detach().numpy())
    for name, p in m.named_parameters():
        np.testing.assert_array_equal(getattr(layer, name), p.detach().numpy())
    assert [[tuple(w.shape) for w in g] for g in m.all_weights] == \
        [[w.shape for w in g] for g in layer.all_weights]
    for g, tg in zip(layer.all_weights, m.all_weights):
        for w, tw in zip(g, tg):
            np.testing.assert_array_equal(w, tw.detach().numpy())


def test_load_state_dict_takes_parameters_and_other_float_dtypes():
    """named_parameters() (tensors that require grad) and a float32 state_dict load too."""
    m = torch.nn.GRU(3, 4, num_layers=2)
    layer = fusedrnn.GRU(3, 4, num_layers=2, dtype=np.float64)
    layer.load_state_dict(dict(m.named_parameters()))
    for name, p in m.named_parameters():
        np.testing.assert_array_equal(layer.state_dict()[name], p.detach().numpy())
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        want = m(x)[0].numpy()
    assert_close(layer(x.numpy().astype(np.float64))[0], want, np.float32)


@pytest.mark.parametrize("cell", CELLS)
def test_torch_constructor_keywords_are_taken_as_torch_takes_them(cell):
    """A constructor call written for torch.nn works unchanged, meaning the same: its device
    (the CPU) and dtype (torch's; NumPy's too, tested elsewhere), and dtype=None as torch's default float32, not
    NumPy's float64 (np.dtype(None)). flatten_parameters(), which models call, is there."""
    kind = cell.split("_")[0]
    kw = {"rnn_relu": {"nonlinearity": "relu"}}.get(cell, {})
    make = {"rnn": fusedrnn.RNN, "lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU}[kind]
    make_torch = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    for device in (None, "cpu", torch.device("cpu"), torch.device("cpu", 0)):
        for dtype in (None, torch.float32, torch.float64):
            m = make_torch(3, 4, device=device, dtype=dtype, **kw)
            layer = make(3, 4, device=device, dtype=dtype, **kw)
            assert layer.dtype == np.dtype(str(m.weight_ih_l0.dtype).replace("torch.", ""))
            layer.load_state_dict(m.state_dict())
            layer.flatten_parameters()
            m.flatten_parameters()
            x = torch.randn(5, 2, 3, dtype=m.weight_ih_l0.dtype)
            with torch.no_grad():
                want = m(x)[0].numpy()
            assert_close(layer(x.numpy())[0], want, layer.dtype)


@pytest.mark.parametrize("cell", CELLS)
def test_torch_constructor_positional_arguments_mean_what_they_mean_for_torch(cell):
    """torch.nn's documented signatures, positionally: (input_size, hidden_size, num_layers, [RNN:
    nonlinearity,] bias, batch_first, dropout, bidirectional, [LSTM: proj_size,] device, dtype).
    GRU's linear_before_reset is keyword-only, so a torch call's device never lands on it."""
    kind = cell.split("_")[0]
    make = {"rnn": fusedrnn.RNN, "lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU}[kind]
    make_torch = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    args = [3, 4, 2] + ([cell[4:]] if kind == "rnn" else []) + [False, True, 0.0, True]
    args += [2] if kind == "lstm" else []
    m = make_torch(*args, device="cpu", dtype=torch.float64)
    layer = make(*args, "cpu", torch.float64)
    assert layer.dtype == np.float64 and dict(layer.state_dict()).keys() == m.state_dict().keys()
    layer.load_state_dict(m.state_dict())
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    with torch.no_grad():
        want = m(x)[0].numpy()
    assert_close(layer(x.numpy())[0], want, np.float64)


@pytest.mark.parametrize("cell", CELLS)
def test_forward_takes_torchs_argument_names(cell):
    """``layer(input=x, hx=h)``, as torch.nn's forward(input, hx=None) is called by name."""
    kind = cell.split("_")[0]
    kw = {"rnn_relu": {"nonlinearity": "relu"}}.get(cell, {})
    m = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](3, 4, **kw)
    layer = {"rnn": fusedrnn.RNN, "lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU}[kind](3, 4, **kw)
    layer.load_state_dict(m.state_dict())
    x, h = torch.randn(5, 2, 3), torch.randn(1, 2, 4)
    hx = (h, torch.randn(1, 2, 4)) if kind == "lstm" else h
    with torch.no_grad():
        want = m(input=x, hx=hx)[0].numpy()
    np_hx = tuple(t.numpy() for t in hx) if kind == "lstm" else hx.numpy()
    assert_close(layer(input=x.numpy(), hx=np_hx)[0], want, np.float32)
    assert_close(layer.forward(input=x.numpy(), hx=np_hx)[0], want, np.float32)


def test_state_dict_not_strict_names_the_keys_torch_names():
    """load_state_dict(strict=False) reports the same missing and unexpected keys as torch's."""
    m = torch.nn.LSTM(4, 3, num_layers=2, proj_size=2)
    layer = fusedrnn.LSTM(4, 3, num_layers=2, proj_size=2)
    sd = {k: v for k, v in m.state_dict().items() if "l1" not in k}
    sd["weight_hr_l2"] = torch.zeros(2, 3)
    want = torch.nn.LSTM(4, 3, num_layers=2, proj_size=2).load_state_dict(sd, strict=False)
    got = layer.load_state_dict(sd, strict=False)
    assert (got.missing_keys, got.unexpected_keys) == (want.missing_keys, want.unexpected_keys)


def test_load_state_dict_result_prints_as_torchs():
    """torch's result of a load where every key matched prints "<All keys matched
    successfully>" (repr and str), as a notebook shows it."""
    m = torch.nn.GRU(4, 3)
    want = m.load_state_dict(m.state_dict())
    got = fusedrnn.GRU(4, 3).load_state_dict(m.state_dict())
    assert repr(want) == "<All keys matched successfully>"
    assert (repr(got), str(got)) == (repr(want), str(want))
    assert got == ([], []) and got.missing_keys == []


@pytest.mark.parametrize("cell", CELLS)
def test_reset_parameters_draws_as_torch_into_the_same_arrays(cell):
    """torch's reset_parameters() returns None and draws every parameter (weight_hr too) from
    U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)) into the tensors it had; ours into the arrays
    it had, from the same range (the draws differ: torch's generator is not ours)."""
    kind = cell.split("_")[0]
    kw = {"rnn_relu": {"nonlinearity": "relu"}, "lstm": {"proj_size": 3}}.get(cell, {})
    make = {"rnn": fusedrnn.RNN, "lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU}[kind]
    make_torch = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    H = 25
    torch.manual_seed(0)
    for m in (make_torch(40, H, num_layers=2, **kw), make(40, H, num_layers=2, seed=0, **kw)):
        held = dict(m.named_parameters())
        with torch.no_grad():
            for p in held.values():
                p[...] = 1                      # outside the range: every value drawn again
        assert m.reset_parameters() is None
        for name, p in m.named_parameters():
            assert p is held[name]
            a = np.abs(p.detach().numpy() if isinstance(p, torch.Tensor) else p)
            assert a.max() <= 1 / np.sqrt(H) and a.max() > 0.8 / np.sqrt(H), (type(m), name)


def test_state_dict_prefix_and_destination_give_torch_keys():
    """A parent's call, state_dict(destination=..., prefix="rnn."), gives torch's keys; loading
    the prefixed dict into the layer itself names the same missing and unexpected keys."""
    m = torch.nn.GRU(3, 4, num_layers=2, bidirectional=True)
    layer = fusedrnn.GRU(3, 4, num_layers=2, bidirectional=True)
    want, got = {"x": 0}, {"x": 0}
    assert m.state_dict(destination=want, prefix="rnn.") is want
    assert layer.state_dict(destination=got, prefix="rnn.") is got
    assert list(got) == list(want)
    want_keys = m.load_state_dict(m.state_dict(prefix="rnn."), strict=False)
    got_keys = layer.load_state_dict(layer.state_dict(prefix="rnn."), strict=False)
    assert tuple(got_keys) == tuple(want_keys)
    assert type(layer.state_dict()) is type(m.state_dict())   # an OrderedDict (it was a dict)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("change", ["missing", "unexpected", "misshaped"])
def test_load_state_dict_raises_where_torch_raises_and_what_it_raises(change, strict):
    """Where torch's load_state_dict raises (keys that do not match with strict, a size mismatch
    either way) ours raises too, a RuntimeError as torch's is; where torch's loads, ours does."""
    m = torch.nn.LSTM(4, 3, proj_size=2)
    layer = fusedrnn.LSTM(4, 3, proj_size=2)
    sd = dict(m.state_dict())
    if change == "missing":
        del sd["weight_hr_l0"]
    elif change == "unexpected":
        sd["weight_hr_l1"] = torch.zeros(2, 3)
    else:
        sd["weight_hr_l0"] = torch.zeros(3, 3)
    raised = []
    for module in (m, layer):
        try:
            module.load_state_dict(sd, strict=strict)
            raised.append(None)
        except RuntimeError:
            raised.append(RuntimeError)
    assert raised[1] == raised[0], raised


@pytest.mark.parametrize("prefix", ["", "rnn", "encoder.rnn"])
@pytest.mark.parametrize("recurse", [True, False])
def test_named_parameters_and_parameters_take_torchs_arguments(prefix, recurse):
    """named_parameters(prefix, recurse, remove_duplicate) names as torch's (the prefix joined
    with a dot) and parameters(recurse) gives the layer's own either way, as torch's: an RNN
    module's parameters are its own, not a submodule's."""
    m = torch.nn.LSTM(3, 4, num_layers=2, proj_size=2)
    layer = fusedrnn.LSTM(3, 4, num_layers=2, proj_size=2)
    want = [name for name, _ in m.named_parameters(prefix=prefix, recurse=recurse,
                                                   remove_duplicate=False)]
    got = layer.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=False)
    assert [name for name, _ in got] == want
    assert len(list(layer.parameters(recurse=recurse))) == len(list(m.parameters(recurse=recurse)))
    assert [id(p) for p in layer.parameters(recurse)] == [id(p) for _, p in
                                                         layer.named_parameters(prefix)]


@pytest.mark.parametrize("kw", [{}, {"proj_size": 2, "num_layers": 2, "dropout": 0.25},
                                {"bias": False, "batch_first": True, "bidirectional": True},
                                {"proj_size": 1, "bidirectional": True, "dropout": 1,
                                 "num_layers": 3}])
def test_repr_and_extra_repr_are_torchs(kw):
    """Options torch shows, in its order (proj_size second); float32 and the tanh RNN or
    torch's GRU add nothing torch lacks."""
    for name in ("RNN", "GRU", "LSTM"):
        if name != "LSTM" and "proj_size" in kw:
            continue
        m = getattr(torch.nn, name)(3, 4, **kw)
        layer = getattr(fusedrnn, name)(3, 4, **kw)
        assert (repr(layer), layer.extra_repr()) == (repr(m), m.extra_repr())


CASTS = {"double": lambda m: m.double(), "float": lambda m: m.float(),
         "to(float64)": lambda m: m.to(torch.float64),
         "to(cpu, float64)": lambda m: m.to("cpu", torch.float64),
         "to(dtype=float64)": lambda m: m.to(dtype=torch.float64),
         "to(cpu)": lambda m: m.to("cpu"), "cpu": lambda m: m.cpu(),
         # torch's to(tensor): that tensor's dtype and device (ours refused it as a device)
         "to(tensor)": lambda m: m.to(torch.zeros(1, dtype=torch.float64))}


@pytest.mark.parametrize("cast", CASTS)
def test_casts_give_torchs_dtype_and_outputs(cast):
    """double(), float(), to(...) and cpu() as a torch module takes them: the layer returned,
    its parameters in torch's dtype after, its outputs torch's."""
    m = torch.nn.GRU(3, 4, num_layers=2)
    layer = fusedrnn.GRU(3, 4, num_layers=2)
    layer.load_state_dict(m.state_dict())
    for module in (m, layer):
        assert CASTS[cast](module) is module
    dtype = m.weight_ih_l0.dtype
    assert layer.dtype == np.dtype(str(dtype)[6:]) and layer.weight_hh_l1.dtype == layer.dtype
    x = torch.randn(5, 2, 3, dtype=dtype)
    with torch.no_grad():
        want = m(x)[0].numpy()
    assert_close(layer(x.numpy())[0], want, np.float32)
    with pytest.raises(TypeError):
        m.to(torch.int32)
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got torch.int32"):
        layer.to(torch.int32)
