"""The amx build's own paths (csrc/gemm/amx.h): float32 products on AMX tiles, the forward step
for batches from 32 rows and the whole-sequence GEMMs. Every other test runs the amx build too
(it is one of _C.available_isas()); these make sure its tiles ran, on the shapes that reach
them, and that what they must not take (non-finite operands, float64, small batches) runs the
FMA kernels bit for bit. Skipped where the CPU or the OS does not offer AMX."""
import numpy as np
import pytest

import fusedrnn
from fusedrnn import _C, functional, reference
from fusedrnn.tolerances import GEMM_PER_TERM, assert_close
from _kernel_cases import VARIANTS, assert_matches, make_case, run_kernels, variant_id

pytestmark = pytest.mark.skipif("amx" not in _C.available_isas(),
                                reason="no AMX here (CPU or OS)")

AMX_ROWS = 16  # csrc/sequence/amx_step.h: kAmxSmallStepRows (small weights), T*B from
AMX_WORK = 512  # kAmxStepWorkRows


def forward_y(case, isa, dtype=np.float32, **kw):
    out, _ = run_kernels(case, dtype, isa, **kw)
    return out


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("lengths,reverse", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("B", [40, 16])
def test_step_on_tiles_matches_the_reference(rng, variant, lengths, reverse, B):
    """B = 40: two 16-row groups and an 8-row one; B = 16, one group (small weights); H = 33 a
    partial unit block; without lengths the projection runs in the step, with them before the
    loop (both on tiles; T*B from 520 takes them in training too). Forward and every gradient
    within the float32 tolerances, and the forward's bits differ from the FMA build's: the
    tiles ran."""
    cell, lbr, proj = variant
    case = make_case(rng, cell, proj, T=-(-520 // B), B=B, I=20, H=33, lengths=lengths)
    assert_matches(case, np.float32, "amx", reverse=reverse, linear_before_reset=lbr)
    tiles = forward_y(case, "amx", reverse=reverse, linear_before_reset=lbr)
    fma = forward_y(case, "avx512", reverse=reverse, linear_before_reset=lbr)
    assert not np.array_equal(tiles["y"], fma["y"])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_projection_apart_with_the_step_on_tiles(rng, cell):
    """A 16-row batch whose W_ih and W_hh split past L2 (the stacked config's layer) takes its
    projection as one GEMM before the loop (projection_mode.h projection_apart) and its
    steps on tiles: forward and every gradient match the reference."""
    if _C.cache_bytes()["l2"] >= 3 << 20:
        pytest.skip("an L2 this size holds the stacked layer's split weights")
    code = functional.CELL_CODES[cell]
    assert _C.projection_mode(code, 16, 256, 256, 256, isa="amx") == "whole"
    case = make_case(rng, cell, 0, T=AMX_WORK // 16 + 2, B=16, I=256, H=256)
    assert_matches(case, np.float32, "amx")


def test_a_frozen_call_keeps_whether_its_weights_split(rng):
    """A frozen call scans its weights for what does not split once and keeps the verdict
    (sequence/layout.h weight_splits): weights that split take the tiles on every call, and a
    W_hh or W_ih with an infinity gives the FMA kernels' bits on every call. (Weights that fit
    L2 split: the projection is in the step, so it too is on tiles or not with them.)"""
    T, B, I, H = 40, 16, 128, 128
    w = reference.init_weights("lstm", I, H, 0, True, np.float32, rng)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = 0.5 * rng.standard_normal((B, H)).astype(np.float32)
    c0 = 0.5 * rng.standard_normal((B, H)).astype(np.float32)
    assert _C.projection_mode(functional.CELL_CODES["lstm"], B, I, H, H, isa="amx") == "in_step"
    cases = [(w, True)]
    for name in ("w_hh", "w_ih"):
        bad = {k: None if v is None else v.copy() for k, v in w.items()}
        bad[name][5, 7] = np.inf
        cases.append((bad, False))
    for frozen_id, (weights, tiles) in enumerate(cases, start=7001):
        for v in weights.values():
            if v is not None:
                v.flags.writeable = False  # a frozen layer's parameters are read-only
        args = ("lstm", x, h0, c0, weights["w_ih"], weights["w_hh"], weights["b_ih"],
                weights["b_hh"], None, None, False, True, False)
        fma = functional.forward_checked(*args, isa="avx512", frozen=frozen_id)[0]
        for _ in range(2):
            y = functional.forward_checked(*args, isa="amx", frozen=frozen_id)[0]
            assert np.array_equal(y, fma, equal_nan=True) != tiles, (frozen_id, tiles)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_what_tiles_do_not_take_runs_the_fma_kernels(rng, variant):
    """float64, a batch under 16 rows, one under 32 with weights too big to split for it, a
    training call of too few steps and an input with an infinity (which does not split into
    bfloat16 parts) give the FMA build's bits exactly. (The wide case's W_ih is small beside
    W_hh, 4 I < Hout, so its projection stays in the FMA step: projection_mode.h
    projection_apart; a projection of 320 keeps it so. The infinity's case has H = 32, which
    pads little, so its projection runs in the step, on tiles with x's rows split: with H = 20
    the projection went apart to the FMA GEMM and the steps, on h alone, kept the tiles.)"""
    cell, lbr, proj = variant
    small = make_case(rng, cell, proj, T=40, B=AMX_ROWS - 1, I=9, H=20)
    wide = make_case(rng, cell, 320 if proj else 0, T=20, B=31, I=70, H=900)
    short = make_case(rng, cell, proj, T=AMX_WORK // 48 - 1, B=48, I=9, H=20)
    big = make_case(rng, cell, proj, T=12, B=48, I=9, H=20)
    infinite = make_case(rng, cell, proj, T=12, B=48, I=9, H=32)
    infinite["x"][2, 5, 3] = np.inf
    assert _C.projection_mode(functional.CELL_CODES[cell], 48, 9, 32, proj or 32,
                              isa="amx") == "in_step"
    for case, dtype in ((small, np.float32), (wide, np.float32), (short, np.float32),
                        (big, np.float64), (infinite, np.float32)):
        tiles = forward_y(case, "amx", dtype, linear_before_reset=lbr)
        fma = forward_y(case, "avx512", dtype, linear_before_reset=lbr)
        for k in fma:
            np.testing.assert_array_equal(tiles[k], fma[k], err_msg=k)


def test_step_on_tiles_with_onnx_options(rng):
    """ONNX's cell options (epilogues of their own) over the tiles' products."""
    w = reference.init_weights("lstm", 6, 17, 0, True, np.float64, rng)
    x = rng.standard_normal((4, 36, 6))
    h0, c0 = rng.standard_normal((36, 17)), rng.standard_normal((36, 17))
    onnx = {"activations": [("hardsigmoid", 0.2, 0.5), ("softsign", 0, 0), ("elu", 0.7, 0)],
            "clip": 1.5, "peepholes": rng.standard_normal((3, 17))}
    args = (x, h0, c0, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    want = reference.forward("lstm", *args, training=False, onnx=onnx)[0]
    f32 = [a.astype(np.float32) for a in args]
    got = functional.forward("lstm", *f32, training=False, isa="amx",
                             onnx=dict(onnx, peepholes=onnx["peepholes"].astype(np.float32)))[0]
    assert_close(got, want, np.float32)


@pytest.mark.parametrize("M,N,K", [(128, 256, 64), (145, 270, 600), (300, 290, 1100), (130, 1100, 520)])
@pytest.mark.parametrize("layout", ["NN", "TN"])
def test_gemm_on_tiles(rng, M, N, K, layout):
    """The smallest product the tiles take either way, partial row groups and panels, K past
    one K block, N past one chunk of panels, A transposed (gathered): within the GEMM's
    per-term tolerance, and not the FMA kernels' bits."""
    A = rng.standard_normal((M, K) if layout == "NN" else (K, M)).astype(np.float32)
    A = A if layout == "NN" else A.T
    B = rng.standard_normal((K, N)).astype(np.float32)
    want = A.astype(np.float64) @ B
    got = _C.gemm(A, B, isa="amx")
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err <= GEMM_PER_TERM[np.dtype(np.float32)] * K
    assert not np.array_equal(got, _C.gemm(A, B, isa="avx512"))
    # B split as it lies (gemm_amx.h AmxB): a transposed B, as W_ih in the input projection,
    # gives the same bits.
    np.testing.assert_array_equal(_C.gemm(A, np.ascontiguousarray(B.T).T, isa="amx"), got)


@pytest.mark.parametrize("layout", ["NN", "TN"])
@pytest.mark.parametrize("M,N,K,tiles", [
    (128, 128, 64, "NN"), (128, 256, 64, "NN TN"), (127, 256, 64, ""), (128, 127, 64, ""),
    (128, 255, 64, "NN"), (128, 256, 63, "")])
def test_which_products_the_tiles_take(rng, layout, M, N, K, tiles):
    """The tiles take a product from 128 rows and 64 k, with 128 columns where A's rows are
    contiguous and 256 where A is gathered from columns (csrc/gemm/gemm_amx.h: below that the
    FMA kernels are faster); one short of each gives the FMA kernels' bits."""
    A = rng.standard_normal((M, K) if layout == "NN" else (K, M)).astype(np.float32)
    A = A if layout == "NN" else A.T
    B = rng.standard_normal((K, N)).astype(np.float32)
    same = np.array_equal(_C.gemm(A, B, isa="amx"), _C.gemm(A, B, isa="avx512"))
    assert same != (layout in tiles.split())


def test_gemm_with_an_infinity_runs_the_fma_kernels(rng):
    A = rng.standard_normal((128, 100)).astype(np.float32)
    B = rng.standard_normal((100, 128)).astype(np.float32)
    assert not np.array_equal(_C.gemm(A, B, isa="amx"), _C.gemm(A, B, isa="avx512"))
    A[3, 7] = np.inf
    B[9, 2] = -np.inf
    for a, b in ((A, np.nan_to_num(B)), (np.nan_to_num(A), B)):
        np.testing.assert_array_equal(_C.gemm(a, b, isa="amx"), _C.gemm(a, b, isa="avx512"))


def test_gemm_with_a_value_under_2_to_the_minus_100_runs_the_fma_kernels(rng):
    """A nonzero value under 2^-100 leaves a denormal low part, which the tiles take as 0: such
    products run the FMA kernels (weights ~1e-33 against x ~1e33 lost 3 digits on the tiles)."""
    A = rng.standard_normal((128, 100)).astype(np.float32)
    B = rng.standard_normal((100, 128)).astype(np.float32)
    for a, b in ((A * np.float32(1e-33), B * np.float32(1e33)),
                 (A * np.float32(1e33), B * np.float32(1e-33))):
        np.testing.assert_array_equal(_C.gemm(a, b, isa="amx"), _C.gemm(a, b, isa="avx512"))
    tiny_only_at_the_bound = A.copy()
    tiny_only_at_the_bound[0, 0] = np.float32(2.0 ** -100)   # splits exactly
    assert not np.array_equal(_C.gemm(tiny_only_at_the_bound, B, isa="amx"),
                              _C.gemm(tiny_only_at_the_bound, B, isa="avx512"))


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm"])
def test_a_layer_with_tiny_weights_runs_the_fma_kernels(rng, cell):
    case = make_case(rng, cell, T=16, B=32, I=64, H=64, bias=False)   # T*B: the training bound
    assert not np.array_equal(forward_y(case, "amx")["y"], forward_y(case, "avx512")["y"])
    case["w"] = {k: None if v is None else v * 1e-33 for k, v in case["w"].items()}
    case["x"] = case["x"] * 1e33
    for k, v in forward_y(case, "amx").items():
        np.testing.assert_array_equal(v, forward_y(case, "avx512")[k])


@pytest.mark.parametrize("layout", ["NN", "TN"])
def test_big_operands_with_an_infinity_run_the_fma_kernels(rng, two_threads, layout):
    """Operands of over half a million values are scanned for what does not split on the
    threads (csrc/gemm/amx.h): an infinity in A's first or last run, or in B's, still sends the
    product to the FMA kernels, while the same operands finite take the tiles."""
    if not _C.openmp:
        pytest.skip("built without OpenMP: one thread only")
    M, K, N = 700, 1000, 600
    A = rng.standard_normal((M, K) if layout == "NN" else (K, M)).astype(np.float32)
    A = A if layout == "NN" else A.T
    B = rng.standard_normal((K, N)).astype(np.float32)
    assert not np.array_equal(_C.gemm(A, B, isa="amx"), _C.gemm(A, B, isa="avx512"))
    for where in ((0, 0), (M - 1, K - 1)):
        a = A.copy(order="K")
        a[where] = np.inf
        np.testing.assert_array_equal(_C.gemm(a, B, isa="amx"), _C.gemm(a, B, isa="avx512"))
    b = B.copy()
    b[K - 1, N - 1] = -np.inf
    np.testing.assert_array_equal(_C.gemm(A, b, isa="amx"), _C.gemm(A, b, isa="avx512"))


def test_a_product_past_one_chunk_with_an_infinity_runs_the_fma_kernels(rng):
    """_C.gemm packs B a chunk of K at a time where the tiles decline the product (csrc/gemm/
    gemm.h, 4 MiB: 8192 rows of 128 columns). An infinity in the first chunk of A or of B sends
    every chunk to the FMA kernels, not just its own."""
    M, K, N = 128, 20000, 128
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((K, N)).astype(np.float32)
    assert not np.array_equal(_C.gemm(A, B, isa="amx"), _C.gemm(A, B, isa="avx512"))
    a, b = A.copy(), B.copy()
    a[5, 3] = np.inf
    b[2, 7] = -np.inf
    for x, y in ((a, B), (A, b)):
        np.testing.assert_array_equal(_C.gemm(x, y, isa="amx"), _C.gemm(x, y, isa="avx512"))


def test_a_gradient_that_does_not_split_runs_the_fma_kernels(rng, two_threads):
    """The backward scans dG once for its three whole-sequence products (backward.h): with an
    infinity in dy, dW_ih, dW_hh and dx are the FMA kernels' bits; finite, they are not. (One
    row: the forward takes no tiles, so both ISAs' saved states are the same. I = H = 256: the
    tiles take all three, dW_ih's and dW_hh's dG gathered from columns.)"""
    case = make_case(rng, "lstm", T=130, B=1, I=256, H=256)
    fma = run_kernels(case, np.float32, "avx512")[1]
    tiles = run_kernels(case, np.float32, "amx")[1]
    for k in ("dx", "weight_ih", "weight_hh"):
        assert not np.array_equal(tiles[k], fma[k]), k
    case["dy"][65, 0, 7] = np.inf
    tiles, fma = run_kernels(case, np.float32, "amx")[1], run_kernels(case, np.float32, "avx512")[1]
    for k in ("dx", "weight_ih", "weight_hh"):
        np.testing.assert_array_equal(tiles[k], fma[k], err_msg=k)


def test_two_threads_give_the_one_thread_bits(rng, fixed_threads):
    """The tiles with 2 threads: steps split by rows (B = 96) and by units (B = 32, H = 300),
    and the whole-sequence GEMMs of the backward (dx on tiles with I = 130, dW_hh with H = 300,
    dW_ih with I = 256)."""
    if not _C.openmp:
        pytest.skip("built without OpenMP: one thread only")
    before = fusedrnn.get_num_threads()
    try:
        for B, H, I in ((96, 64, 130), (32, 300, 256)):
            case = make_case(rng, "lstm", 0, T=AMX_WORK // B + 1, B=B, I=I, H=H, lengths=True)
            results = []
            for n in (1, 2):
                fusedrnn.set_num_threads(n)
                results.append(run_kernels(case, np.float32, "amx"))
            for one, two in zip(*results):
                for k in one:
                    np.testing.assert_array_equal(one[k], two[k], err_msg=k)
    finally:
        fusedrnn.set_num_threads(before)


@pytest.mark.parametrize("M,N,K", [(128, 128, 1024), (144, 160, 3000), (128, 128, 4096)])
def test_gemm_on_tiles_is_as_exact_as_the_fma_kernels(rng, M, N, K):
    """The split keeps float32's precision and the tiles sum k in blocks as the FMA kernels do
    (csrc/gemm/amx.h amx_panels_summed): the tiles' RMS error against float64 is under 0.8 of
    the FMA kernels' (measured 0.67-0.70 over 25 draws of these and other shapes; the RMS, not
    the largest error, which one element decides: its ratio ranged 0.7-1.2). One sum over all
    of K in the tiles gave 1.2x at K = 1024 and 2.2x at 4096; any part product left out (even
    mid*mid, 2^-18 of a product at most) makes it larger, which the float32 tolerances alone
    would not see."""
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((K, N)).astype(np.float32)
    want = A.astype(np.float64) @ B
    rms = lambda got: np.sqrt(np.mean((got - want) ** 2))
    tiles, fma = rms(_C.gemm(A, B, isa="amx")), rms(_C.gemm(A, B, isa="avx512"))
    assert tiles <= 0.8 * fma, (tiles, fma)


@pytest.mark.parametrize("bits", [0x7FFF8000, 0xFFFFFFFF], ids=hex)
@pytest.mark.parametrize("cell,lbr,where,shape", [
    ("rnn_tanh", True, "x", (32, 24, 40)), ("rnn_relu", True, "b_ih", (32, 24, 40)),
    ("rnn_tanh", True, "b_hh", (48, 9, 32)), ("gru", False, "b_ih", (48, 9, 32)),
    ("gru", True, "b_hh", (32, 24, 40)), ("lstm", True, "b_hh", (48, 9, 32))])
def test_a_nan_reaching_a_steps_state_stays_nan(rng, cell, lbr, where, shape, bits):
    """The steps split each step's h for the tiles without scanning it (only x, h0 and the
    weights are scanned), so a NaN from x's projection (apart, before the loop: B = 32, I = 24,
    H = 40) or from a bias (either projection) reaches the split. A NaN whose payload fills the
    high mantissa bits (0x7FFF8000, 0xFFFFFFFF: memory filled with 0xFF) rounded to a bfloat16
    zero (csrc/gemm/amx.h amx_split), so the next step's products dropped it: an Elman RNN's row
    came back finite and the other units of an LSTM or GRU never turned NaN, where torch's and
    the reference's do. The NaNs lie where the reference's lie."""
    T, (B, I, H) = 16, shape
    w = reference.init_weights(cell, I, H, 0, True, np.float32, rng)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = 0.5 * rng.standard_normal((B, H)).astype(np.float32)
    c0 = 0.5 * rng.standard_normal((B, H)).astype(np.float32) if cell == "lstm" else None
    mode = _C.projection_mode(functional.CELL_CODES[cell], B, I, H, H, isa="amx")
    assert mode == ("whole" if B == 32 else "in_step")

    def args(w, x):
        return (x, h0, c0, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])

    def y(isa, w, x):
        return functional.forward(cell, *args(w, x), linear_before_reset=lbr, training=False,
                                  isa=isa)[0]

    assert not np.array_equal(y("amx", w, x), y("avx512", w, x))   # the steps take the tiles
    nan = np.array([bits], np.uint32).view(np.float32)[0]
    if where == "x":
        x = x.copy()
        x[4, 3, 2] = nan
    else:
        w = dict(w, **{where: w[where].copy()})
        w[where][5] = nan
    want = reference.forward(cell, *(None if a is None else a.astype(np.float64)
                                     for a in args(w, x)),
                             linear_before_reset=lbr, training=False)[0]
    assert np.isnan(want).any()
    for isa in ("amx", "avx512"):
        np.testing.assert_array_equal(np.isnan(y(isa, w, x)), np.isnan(want), err_msg=isa)


@pytest.mark.parametrize("big", [np.inf, 3.39e38], ids=["infinite", "past_bfloat16"])
def test_a_state_the_tiles_cannot_take_runs_the_fma_kernels(rng, big):
    """A step's h is split for the tiles unscanned, and an infinite state (a relu RNN's, or an
    ONNX cell's unbounded function's), or a finite one past bfloat16's largest, split with a NaN
    part: the next step's products were NaN where the FMA kernels', torch's and ONNX Runtime's
    are infinite (or finite: 3.39e38 against weights of 1e-3). Such a call runs the FMA kernels
    again: their bits. Row 3's state is `big` after step 1 (W_ih's column 0 is 1, x's others 0)."""
    T, B, I, H = 4, 32, 24, 40
    assert _C.projection_mode(functional.CELL_CODES["rnn_relu"], B, I, H, H, isa="amx") == "whole"
    x = rng.uniform(0.5, 1, (T, B, I)).astype(np.float32)
    w_ih = rng.uniform(0.5, 1, (H, I)).astype(np.float32)
    w_ih[:, 0] = 1
    w_hh = rng.uniform(0.5e-3, 1e-3, (H, H)).astype(np.float32)
    h0 = np.zeros((B, H), np.float32)

    def y(isa, x):
        return functional.forward("rnn_relu", x, h0, None, w_ih, w_hh, None, None,
                                  training=False, isa=isa)[0]

    assert not np.array_equal(y("amx", x), y("avx512", x))   # the steps take the tiles
    x[1, 3] = 0
    x[1, 3, 0] = big
    tiles, fma = y("amx", x), y("avx512", x)
    assert np.all(fma[1:, 3] == big) if big == np.inf else np.isfinite(fma).all()
    np.testing.assert_array_equal(tiles, fma)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_stack_saved_from_a_layer_gives_the_bits_of_a_whole_one(rng, cell, bidirectional):
    """The layers below save_from (the torch adapter fine-tuning the top of a stack) keep no
    state, yet take the steps a training call takes: at T*B = 128 an inference call's steps run
    on tiles (from AMX_WORK / 8) and a training call's do not (from AMX_WORK), and the trained
    layers above read their output, so the outputs and gradients of a stack that froze its
    lower layers differed in their last bits from those of one that kept all. One kernel call
    for the unidirectional stack (forward_stack), one per layer and direction otherwise."""
    from fusedrnn import _layer_base as base
    layer = fusedrnn.LSTM if cell == "lstm" else fusedrnn.GRU if cell == "gru" else fusedrnn.RNN
    layer = layer(16, 32, num_layers=3, bidirectional=bidirectional, seed=4)
    spec, params = layer._spec, dict(layer.named_parameters())
    x = rng.standard_normal((4, 32, 16)).astype(np.float32)
    inference = base.stack_forward(spec, params, x, isa="amx")
    whole = base.stack_forward(spec, params, x, save=True, isa="amx")
    assert not np.array_equal(inference[0], whole[0])  # (the shape is in the band)
    part = base.stack_forward(spec, params, x, save=True, save_from=2, isa="amx")
    assert [all(c is None for c in ctxs) for ctxs in part[3].ctxs] == [True, True, False]
    for got, want in zip(part[:2], whole[:2]):
        np.testing.assert_array_equal(got, want)
    dy = rng.standard_normal(whole[0].shape).astype(np.float32)
    top = {n for n in params if "_l2" in n}
    got, want = (base.stack_backward(spec, saved, dy, need_dx=False, need_dh0=False,
                                     weight_grads=top)[3] for saved in (part[3], whole[3]))
    for name in top:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("big,other", [(3e38, 1000.0), (1.0039e30, 1e12)])
def test_a_product_past_float32s_largest_is_infinite_not_nan(rng, big, other):
    """The three bfloat16 parts of a value may differ in sign (3e38 = 3.004e38 - 4.05e35 - ...,
    1.0039e30 = 1.0052e30 - 1.3e27 - ...): where one product passes float32's largest by 2^8 or
    more, its high parts' product and a lower one overflow to infinities of opposite signs, and
    the tiles summed them to NaN where the FMA kernels and torch give the infinity. (Operands
    past 2^63 now run the FMA kernels: no part product of two smaller ones overflows.)"""
    A = rng.standard_normal((128, 64)).astype(np.float32)
    B = rng.standard_normal((64, 128)).astype(np.float32)
    A[:, 5], B[5, :] = 0, 0
    A[3, 5], B[5, 7] = big, other   # the one large product, in C[3, 7]
    fma = _C.gemm(A, B, isa="avx512")
    assert np.isposinf(fma[3, 7]) and np.isfinite(fma).sum() == fma.size - 1
    np.testing.assert_array_equal(_C.gemm(A, B, isa="amx"), fma)
    A[3, 5], B[5, 7] = 2.0 ** 63, -(2.0 ** 63)   # the largest that split: 2^126 on the tiles
    tiles = _C.gemm(A, B, isa="amx")
    assert tiles[3, 7] == -(2.0 ** 126) and not np.array_equal(tiles, _C.gemm(A, B, isa="avx512"))
    B[5, 7] = np.nextafter(np.float32(B[5, 7]), np.float32(-np.inf))
    np.testing.assert_array_equal(_C.gemm(A, B, isa="amx"), _C.gemm(A, B, isa="avx512"))


def test_a_last_steps_overflowing_pre_activation_is_not_nan(rng):
    """A tanh RNN's pre-activation past float32's largest (a weight of 3e38 meets an input of
    1000) is tanh(inf) = 1, as the reference's tanh(3e41) and the FMA kernels'. On the tiles its
    split parts' products summed to NaN (see above): at an earlier step the next step's scan of
    the state sent the call to the FMA kernels, but the last step's state is never scanned, so
    its NaN was the output."""
    T, B, I, H = 12, 48, 9, 32
    assert _C.projection_mode(functional.CELL_CODES["rnn_tanh"], B, I, H, H, isa="amx") == "in_step"
    w = reference.init_weights("rnn_tanh", I, H, 0, True, np.float32, rng)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = np.zeros((B, H), np.float32)

    def y(isa, w_ih, x):
        return functional.forward("rnn_tanh", x, h0, None, w_ih, w["w_hh"], w["b_ih"],
                                  w["b_hh"], training=False, isa=isa)[0]

    assert not np.array_equal(y("amx", w["w_ih"], x), y("avx512", w["w_ih"], x))  # tiles ran
    w_ih, x = w["w_ih"].copy(), x.copy()
    w_ih[3, 2], x[T - 1, 5, 2] = 3e38, 1000
    tiles = y("amx", w_ih, x)
    assert tiles[T - 1, 5, 3] == 1.0
    np.testing.assert_array_equal(tiles, y("avx512", w_ih, x))


def test_an_overflowing_weight_gradient_is_infinite_not_nan(rng):
    """dW_ih = dG^T X on the tiles (one row: the forward takes none; I = H = 256) where the
    products of input 7 (x ~ 1e30 at one step, its W_ih column 0, so the gates stay unsaturated)
    with that step's dG (dy ~ 1e15) pass float32's largest: infinities, as the FMA kernels and
    torch give, where the tiles gave NaN."""
    case = make_case(rng, "lstm", T=130, B=1, I=256, H=256)
    case["w"]["w_ih"][:, 7] = 0
    case["x"][65, 0, 7] = 1e30
    case["dy"][65] *= 1e15
    tiles = run_kernels(case, np.float32, "amx")[1]["weight_ih"]
    fma = run_kernels(case, np.float32, "avx512")[1]["weight_ih"]
    assert np.isinf(fma[:, 7]).all() and not np.isnan(fma).any()
    np.testing.assert_array_equal(tiles, fma)
