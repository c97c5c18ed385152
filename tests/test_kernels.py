"""The C++ kernels against the NumPy reference: every ISA this machine runs, every cell and
option, float32 and float64, forward outputs, final states and every gradient."""
import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _C, functional, reference
from fusedrnn.tolerances import (BIAS_GRADIENT_FLOAT32, GEMM_PER_TERM, GRU_STEP_GRADIENT_FLOAT32,
                                  LONG_PRODUCT_FORWARD_FLOAT32, LONG_SUM_GRADIENT_FLOAT32,
                                  SMALL_INPUT_FORWARD_FLOAT32,
                                  STEP_PRODUCT_GRADIENT_FLOAT32, assert_close, max_scaled_error)

from _kernel_cases import (VARIANTS, assert_matches, hidden_past_l2, make_case, run_kernels,
                           run_reference, tile_rows, variant_id)

ISAS = list(_C.available_isas())
DTYPES = [np.float32, np.float64]


# H = 34: H's last unit block of 2 units, the compact tail (layout.h) on every ISA and dtype.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("bias,lengths,reverse", list(itertools.product([True, False], repeat=3)))
@pytest.mark.parametrize("H", [11, 34])
def test_options_grid(rng, isa, dtype, variant, bias, lengths, reverse, H):
    cell, lbr, proj = variant
    case = make_case(rng, cell, proj, H=H, bias=bias, lengths=lengths)
    assert_matches(case, dtype, isa, reverse=reverse, linear_before_reset=lbr)


# The weight and bias gradients of 64000 rows (T*B), summed in blocks (gemm.h's k_blocks_apart,
# column_sums): within LONG_SUM_GRADIENT_FLOAT32, which one chain over the rows exceeded 2-8x.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_weight_gradients_over_many_rows_keep_float32_accuracy(rng, isa, cell):
    case = make_case(rng, cell, T=1000, B=64, I=5, H=16)
    _, want = run_reference(case)
    _, got = run_kernels(case, np.float32, isa)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        err = max_scaled_error(got[name], want[name])
        assert err <= LONG_SUM_GRADIENT_FLOAT32, f"{name}: {err:.2g}"


# The bias gradients over 64-128 rows: column_sums' cascade (runs of 8 rows), where one chain
# over each block of 128 rows measured 2-3x torch.nn's error (found by the accuracy audit).
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("T,B,H", [(1, 128, 64), (2, 64, 64), (1, 64, 256)])
def test_bias_gradients_keep_float32_accuracy(isa, cell, T, B, H):
    for seed in range(3):
        case = make_case(np.random.default_rng(seed), cell, T=T, B=B, I=8, H=H)
        _, want = run_reference(case)
        _, got = run_kernels(case, np.float32, isa)
        for name in ("bias_ih", "bias_hh"):
            err = max_scaled_error(got[name], want[name])
            assert err <= BIAS_GRADIENT_FLOAT32, f"{name}, seed {seed}: {err:.2g}"


# The GRU's per-step d h_prev: its products summed apart from the z path they are added to.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("linear_before_reset", [True, False], ids=["lbr", "nolbr"])
@pytest.mark.parametrize("seed", range(3))
def test_gru_state_gradient_keeps_float32_accuracy(isa, linear_before_reset, seed):
    case = make_case(np.random.default_rng(seed), "gru", T=1, B=8, I=8, H=256)
    _, want = run_reference(case, linear_before_reset=linear_before_reset)
    _, got = run_kernels(case, np.float32, isa, linear_before_reset=linear_before_reset)
    err = max_scaled_error(got["dh0"], want["dh0"])
    assert err <= GRU_STEP_GRADIENT_FLOAT32, f"dh0: {err:.2g}"


# The Elman RNN's and LSTM's per-step d h_prev = dG W_hh over G*H = 2048-4096 rows of W_hh: each
# K block of the GEMM summed from zero and added after (backward.h, dg_blocks_apart).
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell,H", [("lstm", 1024), ("rnn_tanh", 2048)])
@pytest.mark.parametrize("seed", range(3))
def test_state_gradient_of_a_wide_layer_keeps_float32_accuracy(isa, cell, H, seed):
    case = make_case(np.random.default_rng(seed), cell, T=1, B=8, I=8, H=H)
    _, want = run_reference(case)
    _, got = run_kernels(case, np.float32, isa)
    err = max_scaled_error(got["dh0"], want["dh0"])
    assert err <= STEP_PRODUCT_GRADIENT_FLOAT32, f"dh0: {err:.2g}"


def rounded_to_float32(case):
    """The case's float64 arrays rounded to float32 values, so the reference meets the kernels'
    numbers and only their arithmetic differs."""
    r = lambda a: a.astype(np.float32).astype(np.float64) if isinstance(a, np.ndarray) else a
    return {**{k: r(v) for k, v in case.items()}, "w": {k: r(v) for k, v in case["w"].items()}}


def assert_float32_forward_within(case, isa, bound):
    """Every float32 output of `case` (rounded to float32 first) within `bound` of the reference."""
    case = rounded_to_float32(case)
    want, _ = run_reference(case)
    got, _ = run_kernels(case, np.float32, isa)
    for name in want:
        err = max_scaled_error(got[name], want[name])
        assert err <= bound, f"{name}: {err:.2g}"


# Inputs small beside the biases: each gate's I products summed from zero and the bias added
# after (micro_kernel's bias), not one chain from the bias. One step from h0 = 0, so the output
# is the projection through the cell. 1 row rides or runs one GEMM, 3 rows a GEMM tile that splits k, 9 and
# 16 rows the in-step projection; H = 33 a partial unit block; I = 1000 > the GEMM's K block.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("B,H", [(1, 40), (3, 40), (9, 33), (16, 40)])
@pytest.mark.parametrize("seed", range(2))
def test_small_inputs_beside_the_bias_keep_float32_accuracy(isa, cell, B, H, seed):
    rng = np.random.default_rng(seed)
    case = make_case(rng, cell, T=1, B=B, I=1000, H=H, h0_zero=True)
    w = case["w"]
    w["b_ih"] = rng.uniform(0.1, 0.3, w["b_ih"].shape) * rng.choice([-1, 1], w["b_ih"].shape)
    case["x"] = 1e-4 * case["x"]
    assert_float32_forward_within(case, isa, SMALL_INPUT_FORWARD_FLOAT32)


# Products over a long k: the input projection (I = 2048) and the step's (H = 1024-2048), summed
# in blocks of kSumBlock (microkernel.h), each from zero and added after. Relu RNN, so no
# activation's slope hides the sums' error.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("B,I,H", [(1, 2048, 40), (5, 2048, 40), (16, 2048, 33), (8, 16, 1024),
                                   (2, 16, 2048), (4, 16, 1024)])
@pytest.mark.parametrize("seed", range(2))
def test_long_products_keep_float32_accuracy(isa, B, I, H, seed):
    case = make_case(np.random.default_rng(seed), "rnn_relu", T=2, B=B, I=I, H=H)
    assert_float32_forward_within(case, isa, LONG_PRODUCT_FORWARD_FLOAT32)


# The input projection inside each step (projection_mode.h, in_step_projection): batches from 8 rows
# without lengths, H padded at most a quarter. 9 rows make one partial row tile; 13 make a full
# one and a single row (whose k is split), and H = 130 or 136 leaves a partial unit block, so the
# padded bias and panels are met; 16 make a full one and a 4-row one, which takes its gates two
# at a time on AVX-512.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("bias,reverse", list(itertools.product([True, False], repeat=2)))
@pytest.mark.parametrize("B,I,H", [(9, 6, 136), (13, 17, 130), (16, 21, 160)])
def test_input_projection_in_the_step(rng, isa, dtype, variant, bias, reverse, B, I, H):
    cell, lbr, proj = variant
    Hout = proj or H
    code = functional.CELL_CODES[cell]
    f64 = dtype == np.float64
    assert _C.projection_mode(code, B, I, H, Hout, f64, isa=isa) == "in_step"
    assert _C.projection_mode(code, B, I, H, Hout, f64, lengths=True, isa=isa) == "whole"
    case = make_case(rng, cell, proj, T=4, B=B, I=I, H=H, bias=bias)
    assert_matches(case, dtype, isa, reverse=reverse, linear_before_reset=lbr)


# The input projection riding along the steps of a single LSTM or GRU row (projection_mode.h,
# projection_rides): each step of a window (8 steps on AVX-512, 4 elsewhere) computes a slice
# of the next window's rows. T = 1, 3 are all first window; T = 5, 6, 9, 19 end in a partial
# window (zero rows), T = 16 in a whole one; I = 5 is longer than the row's k with H = 4 or the
# projection's 3 units, shorter elsewhere; H = 33 leaves a partial unit block, H = 70 three
# blocks (walked both ways).
# Whether a call rides or runs one GEMM is measured per shape (csrc/ride_policy.cpp); these tests
# impose the way they test.
RIDING = [v for v in VARIANTS if v[0] in ("lstm", "gru")]


@pytest.fixture
def ride_way():
    """Sets the way single-row forwards on one thread compute their projection ("ride", "whole"
    or "measured"), on one thread, and puts back the measured choice after."""
    before = fusedrnn.get_num_threads()
    fusedrnn.set_num_threads(1)
    yield _C.set_ride_override
    _C.set_ride_override("measured")
    fusedrnn.set_num_threads(before)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("variant", RIDING, ids=variant_id)
@pytest.mark.parametrize("bias,reverse", list(itertools.product([True, False], repeat=2)))
@pytest.mark.parametrize("T,I,H", [(1, 3, 11), (3, 5, 33), (5, 2, 33), (6, 5, 4), (9, 5, 70),
                                   (16, 4, 33), (19, 6, 40)])
def test_input_projection_riding_along(rng, ride_way, isa, dtype, variant, bias, reverse, T, I, H):
    ride_way("ride")
    cell, lbr, proj = variant
    code = functional.CELL_CODES[cell]
    f64 = dtype == np.float64
    # (the LSTM's row and tile need 16 accumulators: AVX-512's 32 registers, not AVX2's 16)
    rides = cell == "gru" or _C.vector_bytes(isa) == 64
    mode = _C.projection_mode(code, 1, I, H, proj or H, f64, isa=isa)
    assert mode == ("rides" if rides else "whole")
    case = make_case(rng, cell, proj, T=T, B=1, I=I, H=H, bias=bias)
    assert_matches(case, dtype, isa, reverse=reverse, linear_before_reset=lbr)
    # inference (its state lives in y) gives the training forward's bits
    w, c = case["w"], lambda a: None if a is None else a.astype(dtype)
    args = (cell, c(case["x"]), c(case["h0"]), c(case["c0"]), c(w["w_ih"]), c(w["w_hh"]),
            c(w["b_ih"]), c(w["b_hh"]), c(w["w_hr"]), None, reverse, lbr)
    trained = functional.forward(*args, True, isa=isa)
    inferred = functional.forward(*args, False, isa=isa)
    for one, two in zip(trained[:3], inferred[:3]):
        if one is not None:
            np.testing.assert_array_equal(one, two)


def rides(isa, dtype, variant, I, H):
    cell, _, proj = variant
    return _C.projection_mode(functional.CELL_CODES[cell], 1, I, H, proj or H,
                              dtype == np.float64, isa=isa) == "rides"


# (the AVX2 LSTM does not ride: see test_input_projection_riding_along). I = 260 and H = 200 sum
# the ride's and the row's k in several blocks (microkernel.h, kSumBlock), and pass AVX2's K block.
RIDING_WAYS = [(isa, dtype, variant, T, I, H)
               for isa, dtype, variant, (T, I, H) in itertools.product(
                   ISAS, DTYPES, RIDING, [(3, 5, 33), (9, 5, 70), (19, 6, 40), (9, 260, 200)])
               if rides(isa, dtype, variant, I, H)]


@pytest.mark.parametrize("isa,dtype,variant,T,I,H", RIDING_WAYS,
                         ids=[f"{c[0]}-{np.dtype(c[1]).name}-{variant_id(c[2])}-{c[3]}x{c[4]}x{c[5]}"
                              for c in RIDING_WAYS])
def test_riding_and_one_gemm_give_the_same_bits(rng, ride_way, isa, dtype, variant, T, I, H):
    """Either way of the projection, forward and backward, reversed or not: every output and
    gradient the same bits, so the measured choice between them never changes a result."""
    cell, lbr, proj = variant
    case = make_case(rng, cell, proj, T=T, B=1, I=I, H=H)
    for reverse in (False, True):
        results = []
        for way in ("ride", "whole"):
            ride_way(way)
            before = _C.ride_calls()[way]
            out, grad = run_kernels(case, dtype, isa, reverse=reverse, linear_before_reset=lbr)
            assert _C.ride_calls()[way] == before + 1
            results.append({**out, **grad})
        for k in results[0]:
            assert np.array_equal(results[0][k], results[1][k]), k


# Every build whose single LSTM row rides at this shape: the trial's key names the build, and the
# layers take the process's build only (the amx build's trial ran here only while it was the
# default).
RIDE_TRIAL_ISAS = [isa for isa in ISAS if rides(isa, np.float32, ("lstm", False, None), 16, 64)]


def single_row_lstm_args(rng, H):
    """functional.forward's arguments for a float32 LSTM inference of one row, T = 40, I = 16."""
    case = make_case(rng, "lstm", T=40, B=1, I=16, H=H)
    c = lambda a: a.astype(np.float32)
    w = case["w"]
    return ("lstm", c(case["x"]), c(case["h0"]), c(case["c0"]), c(w["w_ih"]), c(w["w_hh"]),
            c(w["b_ih"]), c(w["b_hh"]), None, None, False, True, False)


def ride_ways(args, isa, calls):
    """(ways, outputs): how each of `calls` forwards ran its projection ("ride" or "whole", each
    call counted once by _C.ride_calls) and its y."""
    ways, outputs = [], []
    for _ in range(calls):
        before = _C.ride_calls()
        outputs.append(functional.forward(*args, isa=isa)[0])
        after = _C.ride_calls()
        ways.append("ride" if after["ride"] > before["ride"] else "whole")
        assert after["ride"] + after["whole"] == before["ride"] + before["whole"] + 1
    return ways, outputs


@pytest.mark.parametrize("isa", RIDE_TRIAL_ISAS)
def test_ride_trial_takes_turns_then_keeps_the_faster(rng, ride_way, isa):
    """The measured choice: a shape's first calls alternate, riding first, 4 each (RideTrial::kRuns),
    then every call goes one way; all of them give the same bits."""
    ride_way("measured")
    ways, outputs = ride_ways(single_row_lstm_args(rng, 64), isa, 12)
    assert ways[:8] == ["ride", "whole"] * 4
    assert len(set(ways[8:])) == 1
    for y in outputs[1:]:
        assert np.array_equal(y, outputs[0])


@pytest.mark.skipif(not _C.openmp, reason="built without OpenMP: one thread only")
@pytest.mark.parametrize("isa", RIDE_TRIAL_ISAS)
def test_a_step_team_rides_on_its_own_trial(rng, ride_way, fixed_threads, isa):
    """A single row's steps on a team of two ride too (each member its own units' share of
    every window), on a trial of their own: the shape's first team calls alternate, then keep
    one way, and the same shape on one thread then starts its trial afresh. The team's first
    call probes its cores (imposed here, far_team, and remembered for the next calls), timing
    steps alone and as a team: that call stays out of the trial (RideChoice). Every call gives
    the same bits."""
    ride_way("measured")
    args = single_row_lstm_args(rng, 128)
    assert _C.step_split(2, 1, 16, 128, 128, threads=2, isa=isa) == "units"
    recall = _C.set_probe_recall_ms(60000)
    try:
        _C.set_probe_override("far_team")
        outputs = []
        for threads in (2, 1):
            fusedrnn.set_num_threads(threads)
            ways, ys = ride_ways(args, isa, 11 if threads == 2 else 10)
            outputs += ys
            if threads == 2:
                assert ways[0] == "ride", ways  # the probing call: the trial's first way, again
                ways = ways[1:]
            assert ways[:8] == ["ride", "whole"] * 4, (threads, ways)
            assert len(set(ways[8:])) == 1, (threads, ways)
    finally:
        _C.set_probe_override("measured")
        _C.set_probe_recall_ms(recall)
    for y in outputs[1:]:
        assert np.array_equal(y, outputs[0])


def in_step_fits_l2(cell, B, I, Hout, f64=False, isa=None):
    """projection_mode.h's cache conditions: W_ih and W_hh take at most 2/3 of the L3, and a
    unit block's gate panels of them (NR units, two vectors wide) and the step's rows of x_t and
    h fit half of one core's L2."""
    size = 8 if f64 else 4
    nr = 2 * _C.vector_bytes(isa) // size
    gates = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[cell]
    weights_fit_l3 = 3 * gates * Hout * (I + Hout) * size <= 2 * _C.cache_bytes()["l3"]
    return weights_fit_l3 and 2 * (gates * nr + B) * (I + Hout) * size <= _C.cache_bytes()["l2"]


def pads_little(H, f64=False, isa=None):
    """projection_mode.h's padding condition: H padded to whole unit blocks (NR units, two
    vectors wide) at most a quarter more."""
    nr = 2 * _C.vector_bytes(isa) // (8 if f64 else 4)
    return 4 * (-(-H // nr) * nr) <= 5 * H


def projection_apart(cell, B, I, H, Hout, f64=False, isa=None):
    """projection_mode.h's rule for one GEMM before the loop where the step's weights pass L2
    and 4 I >= Hout. The amx build's float32 (its split, 6 bytes a weight): W_ih's and W_hh's
    split past one core's L2, for the RNN at any batch, for LSTM and GRU under 48 rows. The FMA
    kernels: W_ih and W_hh past L2 together, W_hh within twice the L2, the RNN at any batch,
    LSTM and GRU under 40 rows."""
    gates = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[cell]
    l2 = _C.cache_bytes()["l2"]
    if (isa or _C.isa()) == "amx" and not f64:
        split = gates * H * (I + Hout) * 6
        return (gates == 1 or B < 48) and split > l2 and 4 * I >= Hout
    size = 8 if f64 else 4
    return ((gates == 1 or B < 40) and gates * H * (I + Hout) * size > l2
            and gates * H * Hout * size <= 2 * l2 and 4 * I >= Hout)


def test_projection_mode_rule():
    """In the step from 8 rows, without lengths, with an input, while W_ih and W_hh fit in L3
    (deepbench's LSTM, 32 MB of weights, does not), a unit block's tiles fit half of L2
    (fastrnns' do not on a 512 KB L2), H padded to whole unit blocks is at most a quarter more
    (H = 8 is not, H = 40 where unit blocks are 16 units or fewer, H = 136 is) and not
    projection_apart;
    riding along a single LSTM or GRU row without lengths while I <= G * Hout / 2 and W_hh fits
    in L2; else one GEMM over the whole sequence."""
    lstm, gru = functional.CELL_CODES["lstm"], functional.CELL_CODES["gru"]
    for isa in ISAS:
        for f64 in (False, True):
            for cell, I, H in (("lstm", 256, 256), ("gru", 256, 256), ("rnn_tanh", 256, 256),
                               ("lstm", 128, 320), ("lstm", 100, 900), ("lstm", 160, 160),
                               ("lstm", 100, 8), ("gru", 100, 40), ("rnn_tanh", 64, 136)):
                code = functional.CELL_CODES[cell]
                fits = in_step_fits_l2(cell, 16, I, H, f64, isa) and pads_little(H, f64, isa)
                want = "in_step" if fits and not projection_apart(cell, 16, I, H, H, f64, isa) else "whole"
                assert _C.projection_mode(code, 16, I, H, H, f64, isa=isa) == want, (isa, f64, cell, I, H)
    if "amx" in _C.available_isas() and _C.cache_bytes()["l2"] == 2 << 20:
        # This machine (2 MB L2): the stacked LSTM and GRU take the GEMM, the RNN stays in the step.
        assert _C.projection_mode(lstm, 16, 256, 256, 256, isa="amx") == "whole"
        assert _C.projection_mode(gru, 16, 256, 256, 256, isa="amx") == "whole"
        assert _C.projection_mode(lstm, 16, 256, 256, 256, isa="avx512") == "in_step"
        assert _C.projection_mode(lstm, 32, 256, 256, 256, isa="amx") == "whole"
        assert _C.projection_mode(lstm, 48, 256, 256, 256, isa="amx") == "in_step"
        rnn = functional.CELL_CODES["rnn_tanh"]
        assert _C.projection_mode(rnn, 64, 512, 512, 512, isa="amx") == "whole"
        assert _C.projection_mode(rnn, 64, 256, 256, 256, isa="amx") == "in_step"
    if _C.cache_bytes()["l2"] == 1 << 20:
        # A 1 MB L2 (Zen 5): the stacked LSTM and GRU take the GEMM under 40 rows, the RNN
        # stays in the step until its weights pass L2.
        for isa in set(ISAS) & {"avx2", "avx512"}:
            assert _C.projection_mode(lstm, 16, 256, 256, 256, isa=isa) == "whole"
            assert _C.projection_mode(gru, 32, 256, 256, 256, isa=isa) == "whole"
            assert _C.projection_mode(lstm, 40, 256, 256, 256, isa=isa) == "in_step"
            rnn = functional.CELL_CODES["rnn_tanh"]
            assert _C.projection_mode(rnn, 16, 256, 256, 256, isa=isa) == "in_step"
            assert _C.projection_mode(rnn, 16, 512, 512, 512, isa=isa) == "whole"
    fastrnns = "in_step" if in_step_fits_l2("lstm", 64, 512, 512) else "whole"
    assert _C.projection_mode(lstm, 64, 512, 512, 512) == fastrnns
    # Small weights, many rows: the L2 condition alone decides, up to the last row that fits.
    for isa in ISAS:
        for f64 in (False, True):
            for cell in ("lstm", "gru", "rnn_tanh"):
                rows = next(b for b in range(8, 1 << 16) if not in_step_fits_l2(cell, b + 1, 64, 64, f64, isa))
                code = functional.CELL_CODES[cell]
                assert _C.projection_mode(code, rows, 64, 64, 64, f64, isa=isa) == "in_step"
                assert _C.projection_mode(code, rows + 1, 64, 64, 64, f64, isa=isa) == "whole"
    assert _C.projection_mode(lstm, 7, 256, 256, 256) == "whole"
    assert _C.projection_mode(lstm, 16, 256, 256, 256, lengths=True) == "whole"
    assert _C.projection_mode(lstm, 16, 0, 256, 256) == "whole"
    assert _C.projection_mode(lstm, 64, 1024, 1024, 1024) == "whole"
    for isa in ISAS:
        lstm_rides = "rides" if _C.vector_bytes(isa) == 64 else "whole"
        assert _C.projection_mode(lstm, 1, 32, 64, 64, isa=isa) == lstm_rides
        assert _C.projection_mode(lstm, 1, 32, 64, 16, f64=True, isa=isa) == lstm_rides
        assert _C.projection_mode(gru, 1, 32, 64, 64, isa=isa) == "rides"
    assert _C.projection_mode(lstm, 1, 32, 64, 64, lengths=True) == "whole"
    assert _C.projection_mode(lstm, 1, 0, 64, 64) == "whole"
    assert _C.projection_mode(lstm, 2, 32, 64, 64) == "whole"
    assert _C.projection_mode(gru, 1, 32, 64, 64, lengths=True) == "whole"
    assert _C.projection_mode(gru, 1, 96, 64, 64) == "rides"
    assert _C.projection_mode(gru, 1, 97, 64, 64) == "whole"  # the tile's FMAs outlast the row
    assert _C.projection_mode(gru, 1, 32, 1024, 1024) == "whole"  # W_hh in L3
    assert _C.projection_mode(functional.CELL_CODES["rnn_tanh"], 1, 32, 64, 64) == "whole"
    with pytest.raises(ValueError, match="cell"):
        _C.projection_mode(7, 16, 1, 1, 1)


# Sizes around the edges: T=1, B=1, hidden sizes off the vector width and the tile width,
# inputs wider and narrower than the hidden state, batches that leave partial row tiles.
SHAPES = [
    dict(T=1, B=1, I=1, H=1),
    dict(T=1, B=5, I=3, H=8),
    dict(T=3, B=1, I=40, H=5),
    dict(T=4, B=7, I=2, H=33),
    dict(T=2, B=13, I=17, H=16),
    dict(T=6, B=2, I=9, H=70),
    # The fused step cuts K into blocks past ~96 (LSTM), ~120 (GRU), ~384 (RNN) and groups
    # 4 row tiles: these take several K blocks with a ragged last one, and two row groups.
    dict(T=3, B=29, I=7, H=130),
    dict(T=3, B=16, I=5, H=40),  # a 4-row tile (AVX-512: its gates two at a time)
    dict(T=2, B=3, I=4, H=401),
    dict(T=3, B=2, I=0, H=5),  # no input: the gate pre-activations are the biases alone
    # One row, one step: dX's product of that row sums G*H = 640 (LSTM) over several K blocks,
    # two panels of W_ih at a time (microkernel.h's row pair, its blocks summed apart).
    dict(T=1, B=1, I=64, H=160),
    # H's last unit block as the compact tail (layout.h: its gates side by side in one panel),
    # in one vector or two on each ISA and dtype: a single row (k over kTailChains chains) and
    # rows of a tile of 4 and one of 1.
    dict(T=4, B=1, I=9, H=100),
    dict(T=3, B=5, I=6, H=104),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{T}B{B}I{I}H{H}".format(**s))
def test_shapes(rng, isa, dtype, variant, shape):
    cell, lbr, proj = variant
    case = make_case(rng, cell, min(proj, shape["H"] - 1) if proj and shape["H"] > 1 else 0,
                     lengths=shape["B"] > 1, **shape)
    assert_matches(case, dtype, isa, linear_before_reset=lbr)


@pytest.mark.parametrize("isa", ISAS)
def test_long_sequence_float32(rng, isa):
    """T = 100 (the length DESIGN.md's float32 gradient tolerance is stated for)."""
    case = make_case(rng, "lstm", T=100, B=2, I=5, H=12)
    assert_matches(case, np.float32, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_bitwise_identical_across_thread_counts(rng, isa, variant, fixed_threads):
    """Both ways 2 threads share a forward step (forward_split.h, step_threads): batch rows with no
    barrier (small weights, B=96, or B=16 with W_ih small too, or a few rows a member: 4 + 4 on
    AVX-512, whose second tile starts inside the first 12-row panel, shared_a_panels; 5 + 5 on
    AVX2, 4 + 4 on SSE2) and hidden units with a barrier per step (B=12 or 26 with
    weights past L2), each with the input projection before the loop and in the step; and both
    ways of the backward: rows apart (backward_rows_apart: small weights, rows keeping their
    chains) and the team (batch rows of the pointwise maths, column panels of the GEMMs; B = 26
    would leave each member a 1-row tile)."""
    if not _C.openmp:
        pytest.skip("built without OpenMP: one thread only")
    cell, lbr, proj = variant
    before = fusedrnn.get_num_threads()
    # A step of 12 rows with W_ih and W_hh past L2, at least as wide as the work threshold asks
    # (the projection's narrow K needs a wider H). The projection's x is narrow (I = 5): with
    # weights past L2 and 4 I >= Hout its input projection runs apart (projection_apart).
    I = 5 if proj else 20
    few = {12: 8, 6: 10, 4: 8}[tile_rows(isa)]  # a few rows that split evenly, 4 or more a member
    wide = hidden_past_l2(cell, I, proj and 24, at_least=1000 if proj else 300)
    try:
        # with lengths: the whole sequence's input projection first; without: in the step
        for (B, H, split, back), lengths in itertools.product(
                ((96, 128, "rows", "rows"), (16, 128, "rows", None), (few, 128, "rows", None),
                 (12, wide, "units", None), (26, wide, None, "team")),
                (True, False)):
            Hout = proj and 24 or H
            code = functional.CELL_CODES[cell]
            forward = _C.step_split(code, B, I, H, Hout, threads=2, isa=isa)
            assert forward == split if split else forward in ("rows", "units")
            got = _C.step_split(code, B, I, H, Hout, threads=2, isa=isa, backward=True)
            assert got == back if back else got in ("rows", "team")
            in_step = _C.projection_mode(code, B, I, H, Hout, lengths=lengths, isa=isa)
            assert (in_step == "in_step") != lengths
            case = make_case(rng, cell, proj and 24, T=4, B=B, I=I, H=H, lengths=lengths)
            assert_same_bits_on_one_and_two_threads(case, isa, linear_before_reset=lbr)
    finally:
        fusedrnn.set_num_threads(before)


@pytest.fixture
def team_of_two(fixed_threads):
    """Calls on the threads set (fixed_threads), skipped without OpenMP; the count set back
    after."""
    if not _C.openmp:
        pytest.skip("built without OpenMP: one thread only")
    before = fusedrnn.get_num_threads()
    yield
    fusedrnn.set_num_threads(before)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_rows_of_two_or_three_a_thread_give_the_one_thread_bits(rng, isa, variant, team_of_two):
    """A forward of 4 (or 6) rows on two threads splits them 2 + 2 (3 + 3) where the step is big
    enough (layout.h, rows_k_whole), and so does the backward's rows apart, though one thread's
    tile of 4-6 rows keeps each row's k in one FMA chain where a tile of 2-3 rows splits it
    (KSplit): the members' tiles keep k whole (ForwardLoop::k_whole, BackwardLoop::k_whole), in
    the recurrent product, the in-step projection and the LSTM's projection, and in each step's
    products back. So do equal shares whose last tile has 2-3 rows: 28 rows on AVX-512 are
    14 + 14 (tiles of 12 and 2; one thread's 12, 12 and 4), 16 on AVX2 8 + 8, 12 on SSE2 6 + 6.
    With lengths and without; every cell and option. The bits of one thread."""
    cell, lbr, proj = variant
    code = functional.CELL_CODES[cell]
    # steps big enough for the backward's rows apart too (200 KFLOP at 4 rows)
    I, H = 20, (272 if proj else 160)
    Hout = proj and 24 or H
    mr = tile_rows(isa)
    # (SSE2's 4-row tiles: 6 rows are 4 + 2 on one thread)
    for B in ((4, 6) if mr > 4 else (4,)) + ({12: 28, 6: 16, 4: 12}[mr],):
        assert _C.step_split(code, B, I, H, Hout, threads=2, isa=isa) == "rows", B
        assert _C.step_split(code, B, I, H, Hout, threads=2, isa=isa, backward=True) == "rows", B
        for lengths in (True, False):
            case = make_case(rng, cell, proj and 24, T=5, B=B, I=I, H=H, lengths=lengths)
            assert_same_bits_on_one_and_two_threads(case, isa, linear_before_reset=lbr)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_team_sharing_a_unit_blocks_rows_gives_the_one_thread_bits(rng, isa, variant,
                                                                   team_of_two):
    """A forward team of two split by hidden units whose shares differ (an odd number of unit
    blocks, or a ragged last one) hands rows of the first member's last block to the second
    (share_boundary_block): at whole row tiles (B = 13), or inside one row panel where a panel
    holds the batch (B = 10 on AVX-512: rows 5-9; 10 rows split by rows instead where W_ih and
    W_hh fit L2, so H here outgrows it); the step's A and x read and packed there, with lengths
    (the projection before the loop) and without (in the step); every cell and option. The bits
    of one thread."""
    cell, lbr, proj = variant
    code = functional.CELL_CODES[cell]
    for B in (10, 13):
        past_l2 = hidden_past_l2(cell, 20, proj and 24)
        shared = [(H, _C.shared_block_rows(code, B, 20, H, proj and 24 or H, isa=isa))
                  for H in range(past_l2, past_l2 + 64)]
        H, row = next(((H, row) for H, row in shared if row), (None, 0))
        assert row, shared
        if isa == "avx512":  # 12-row panels: all 10 rows in one (split inside it), or 12 + 1
            assert row == (5 if B == 10 else 12), shared
        for lengths in (True, False):
            case = make_case(rng, cell, proj and 24, T=5, B=B, I=20, H=H, lengths=lengths)
            assert_same_bits_on_one_and_two_threads(case, isa, linear_before_reset=lbr)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 24), ("gru", 0)])
def test_team_sharing_a_unit_blocks_vectors_gives_the_one_thread_bits(rng, isa, cell, proj,
                                                                      team_of_two):
    """A single LSTM row on a team of two with an odd number of whole unit blocks (no rows to
    lend), or whose last block is the compact tail (AVX-512: H = 100, 104, 164), hands the
    second vector of the first member's last block to the second (share_boundary_vector): the
    row's pass over that block one vector a member, and so the riding projection's slices of it
    where a slice is one vector; riding and not, with lengths (the projection before the loop)
    and without, the LSTM's projection too. So does a GRU's row whose gates meet in one pass
    (torch.nn's GRU, riding or not, without lengths; with them, it keeps whole blocks). The bits
    of one thread."""
    code = functional.CELL_CODES[cell]
    shared = [H for H in (48, 80, 96, 100, 104, 160, 164, 176, 200, 224, 240)
              if _C.shared_block_vector(code, 1, 20, H, proj or H, isa=isa)]
    assert shared, isa
    if isa == "avx512" and not proj:
        assert {96, 100, 104, 164} <= set(shared), shared
    try:
        for ride in ("ride", "whole"):
            _C.set_ride_override(ride)
            for lengths, H in itertools.product((True, False), shared):
                case = make_case(rng, cell, proj, T=20, B=1, I=20, H=H, lengths=lengths)
                assert_same_bits_on_one_and_two_threads(case, isa)
    finally:
        _C.set_ride_override("measured")

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_team_sharing_a_unit_blocks_vector_over_rows_gives_the_one_thread_bits(rng, isa, variant,
                                                                               team_of_two):
    """Tiles of 2-3 rows on a team of two split by hidden units hand the second vector of the
    first member's last block across too (share_boundary_vector), the LSTM's and the GRU's
    with every option: each gate's panel of that block one vector a member (gate_products),
    with and without lengths. The Elman RNN's keep whole blocks (one gate: a vector more or
    less did not pay). The team imposed (the probe's far_team), so that this VM's core
    placement cannot walk the steps on one thread. The bits of one thread."""
    cell, lbr, proj = variant
    code = functional.CELL_CODES[cell]
    try:
        _C.set_probe_override("far_team")
        for B in (2, 3, 4):  # 4 rows: a 4-row tile takes two gates' vectors at once (AVX2: H = 48)
            shared = [H for H in (48, 80, 96, 100, 104, 112, 144, 160, 164, 176, 224)
                      if _C.shared_block_vector(code, B, 20, H, proj and 24 or H, isa=isa)]
            if cell.startswith("rnn"):
                assert not shared, shared
                continue
            if B < 4 or isa == "avx2":
                assert shared, (B, isa)
            if B < 4 and isa == "avx512" and not proj:  # 3 and 5 whole blocks; the LSTM's tail
                assert {96, 160} | ({100} if cell == "lstm" else set()) <= set(shared), shared
            for lengths, H in itertools.product((True, False), shared[:3]):
                case = make_case(rng, cell, proj and 24, T=12, B=B, I=20, H=H, lengths=lengths)
                assert_same_bits_on_one_and_two_threads(case, isa, linear_before_reset=lbr)
    finally:
        _C.set_probe_override("measured")


@pytest.mark.parametrize("isa", ISAS)
def test_backward_walks_rows_apart_wherever_the_weights_fit_half_of_l2_or_l3(rng, isa,
                                                                              fixed_threads):
    """The backward's rows apart (backward_rows_apart) where the recurrent weights fit half of
    one core's L2 or half of the L3 the cores share, the team past both; rows apart past L2
    (an LSTM of H = 256: 1 MiB) give the one-thread bits. B = 24: 12 rows a member, whole tiles
    on every ISA."""
    if not _C.openmp:
        pytest.skip("built without OpenMP: one thread only")
    lstm = functional.CELL_CODES["lstm"]
    caches = _C.cache_bytes()
    half = max(caches["l2"], caches["l3"]) // 2
    fits = math.isqrt(half // 16)  # the widest LSTM whose 4 H x H float32 gates fit
    for H in (256, fits, fits + 1):
        want = "rows" if 16 * H * H <= half else "team"
        assert _C.step_split(lstm, 24, 16, H, H, threads=2, isa=isa, backward=True) == want, H
    before = fusedrnn.get_num_threads()
    try:
        case = make_case(rng, "lstm", 0, T=3, B=24, I=16, H=256)
        assert_same_bits_on_one_and_two_threads(case, isa)
    finally:
        fusedrnn.set_num_threads(before)


def assert_same_bits_on_one_and_two_threads(case, isa, **kw):
    """Forward and backward of `case` (float32) on 1 and on 2 threads give the same bits."""
    results = []
    for n in (1, 2):
        fusedrnn.set_num_threads(n)
        results.append(run_kernels(case, np.float32, isa, **kw))
    (out1, grad1), (out2, grad2) = results
    for k in out1:
        assert np.array_equal(out1[k], out2[k]), k
    for k in grad1:
        assert np.array_equal(grad1[k], grad2[k]), k


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_single_row_backward_team_gives_the_one_thread_bits(rng, isa, variant, fixed_threads):
    """The backward's team with fewer batch rows than members: B = 1, in halves where the shape
    takes them (k_split_backward), else one member doing the row's pointwise maths and both the
    GEMMs' column panels (share_of); with and without lengths (a finished row passes its
    gradient through), both directions, every cell and option, the LSTM's projection
    included."""
    if not _C.openmp:
        pytest.skip("built without OpenMP: one thread only")
    cell, lbr, proj = variant
    code = functional.CELL_CODES[cell]
    before = fusedrnn.get_num_threads()
    try:
        # (backward.h, k_split_backward: without lengths the RNN's and the LSTM's steps of
        # 30-100 KFLOP go in halves; step_split tells the shape without lengths)
        halves = cell != "gru" and not proj
        H = 75 if halves and cell == "lstm" else 200
        assert _C.step_split(code, 1, 7, H, proj and 24 or H, threads=2, isa=isa,
                             backward=True) == ("halves" if halves else "team")
        for lengths, reverse in itertools.product((True, False), (False, True)):
            case = make_case(rng, cell, proj and 24, T=6, B=1, I=7, H=H, lengths=False)
            if lengths:
                case["lengths"] = np.array([4])
            assert_same_bits_on_one_and_two_threads(case, isa, linear_before_reset=lbr,
                                                    reverse=reverse)
    finally:
        fusedrnn.set_num_threads(before)


# The backward of a single row without lengths, RNN or LSTM (backward.h, k_split_backward): each
# half of the units takes its pointwise maths and its rows of dG W_hh, and the next step adds the
# two partial products. Steps of 30-100 KFLOP only (rnn: H = 123..223, lstm: H = 62..111); the
# sizes make halves of ragged unit blocks, unequal or equal in count.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("cell,H", [("rnn_tanh", 130), ("rnn_relu", 165), ("lstm", 75),
                                    ("lstm", 101)])
@pytest.mark.parametrize("reverse", [False, True])
def test_single_row_backward_in_halves(rng, isa, dtype, cell, H, reverse):
    f64 = dtype == np.float64
    assert _C.step_split(functional.CELL_CODES[cell], 1, 5, H, H, f64, 2, isa, True) == "halves"
    case = make_case(rng, cell, T=7, B=1, I=5, H=H)
    assert_matches(case, dtype, isa, reverse=reverse)


# A single row's backward takes its whole-sequence products chunk by chunk of 128 steps
# (backward_products.h): from 129 steps, without lengths, forward, without projection; on two
# threads from 3 chunks a second thread takes each chunk's products beside the walk.
@pytest.mark.skipif(not _C.openmp, reason="built without OpenMP: one thread only")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("T", [128, 129, 300, 1000])
def test_single_row_products_chunk_by_chunk(rng, fixed_threads, isa, variant, T):
    """Against the reference in float64 and float32 on two threads, and the one thread's bits
    (the last chunk's weight gradients sum the first's onto what the others left)."""
    cell, lbr, proj = variant
    case = make_case(rng, cell, proj, T=T, B=1, I=9, H=40)
    before = fusedrnn.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            fusedrnn.set_num_threads(threads)
            counts = _C.beside_walk_calls()
            out, grad = run_kernels(case, np.float32, isa, linear_before_reset=lbr)
            runs.append({**out, **grad})
            way = "products_beside_walk" if threads == 2 and T >= 257 else "products_after_walk"
            chunked = T > 128 and not proj
            new = {k: v - counts[k] for k, v in _C.beside_walk_calls().items()}
            assert new["products_after_walk"] == int(chunked and way == "products_after_walk")
            assert new["products_beside_walk"] == int(chunked and way == "products_beside_walk")
        for dtype in DTYPES:
            assert_matches(case, dtype, isa, linear_before_reset=lbr)
    finally:
        fusedrnn.set_num_threads(before)
    for k in runs[0]:
        np.testing.assert_array_equal(runs[0][k], runs[1][k], err_msg=k)


@pytest.mark.skipif(not _C.openmp, reason="built without OpenMP: one thread only")
@pytest.mark.parametrize("cell,H", [("rnn_tanh", 130), ("lstm", 75)])
@pytest.mark.parametrize("T", [200, 300])
def test_chunked_products_with_steps_in_halves(rng, fixed_threads, cell, H, T):
    """Steps that split in halves (k_split_backward) do so over 2 chunks, on both thread counts
    (two threads walk as a team), and not from 3 chunks, on either (one walks, the other takes
    the products): the one thread's bits either way, and the reference's values."""
    case = make_case(rng, cell, T=T, B=1, I=7, H=H)
    before = fusedrnn.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            fusedrnn.set_num_threads(threads)
            out, grad = run_kernels(case, np.float32, ISAS[-1])
            runs.append({**out, **grad})
        assert_matches(case, np.float32, ISAS[-1])
    finally:
        fusedrnn.set_num_threads(before)
    for k in runs[0]:
        np.testing.assert_array_equal(runs[0][k], runs[1][k], err_msg=k)


def test_chunked_products_add_into_the_gradients(rng):
    """The layers add a call's weight and bias gradients into theirs: chunk by chunk, the first
    chunk done adds into them and the others onto it; twice the same call gives twice the
    gradients."""
    lstm = fusedrnn.LSTM(6, 20)
    x = rng.standard_normal((400, 1, 6)).astype(np.float32)
    counts = _C.beside_walk_calls()
    grads = []
    for _ in range(2):
        y, _ = lstm(x)
        lstm.backward(np.ones_like(y))
        grads.append({k: v.copy() for k, v in lstm.grads.items()})
    after = _C.beside_walk_calls()
    assert sum(after[k] - counts[k] for k in ("products_after_walk", "products_beside_walk")) == 2
    for k in grads[0]:
        np.testing.assert_allclose(grads[1][k], 2 * grads[0][k], rtol=1e-5, atol=1e-5,
                                   err_msg=k)


@pytest.mark.skipif(not _C.openmp, reason="built without OpenMP: one thread only")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
# B = 22: shares of 11 rows, the second from row 11, off the 6- and 12-row tile grids (AVX2 and
# AVX-512 pack their own panels then; no such share keeps the 4-row tiles' chains).
@pytest.mark.parametrize("B,lengths", [(64, False), (64, True), (48, False), (28, False),
                                      (22, False)])
def test_row_shares_give_the_one_thread_bits(rng, two_threads, isa, variant, B, lengths):
    """Two threads split a step's rows in equal shares where each share's tiles keep the one
    thread's chains (forward_split.h, rows_in_equal_shares): 64 rows as 32 + 32 (tiles of 12, 12, 8,
    the second share off the whole-tile grid of the packed state). Forward and backward, with
    and without lengths: the one thread's bits."""
    cell, lbr, proj = variant
    case = make_case(rng, cell, proj, T=7, B=B, I=9, H=40, lengths=lengths)
    if B >= 48 and not proj and _C.vector_bytes(isa) == 64:  # (AVX2: see test_step_split_rule)
        code = functional.CELL_CODES[cell]
        assert _C.step_split(code, B, 9, 40, 40, threads=2, isa=isa) == "rows"
    runs = []
    for threads in (1, 2):
        fusedrnn.set_num_threads(threads)
        out, grad = run_kernels(case, np.float32, isa, linear_before_reset=lbr)
        runs.append({**out, **grad})
    for k in runs[0]:
        assert np.array_equal(runs[0][k], runs[1][k]), k


def test_step_split_rule():
    """Tiny steps stay on one thread; a batch of one splits by units (each core streams half of
    W_hh); big weights split by units even for a big batch."""
    lstm = functional.CELL_CODES["lstm"]
    assert _C.step_split(lstm, 1, 1, 32, 32, threads=2) == "one"
    assert _C.step_split(lstm, 1, 1, 128, 128, threads=2) == "units"
    assert _C.step_split(lstm, 96, 1, 128, 128, threads=2) == "rows"
    assert _C.step_split(lstm, 64, 1, 512, 512, threads=2) == "units"
    # 98 rows: one thread's tiles end in 2 rows (12- or 6-row tiles), whose k splits, so equal
    # shares cannot keep the chains; whole row tiles split them 60 + 38 (54 + 44), and the step
    # is big: hidden units instead (rows_split_evenly). 100 rows: equal shares of 50 end in a
    # 2-row tile, which keeps k whole (rows_k_whole), so rows; 64 rows: 32 + 32 (tiles of 12,
    # 12 and 8, or of 6 ending in 2 rows that keep k whole). 96 rows split evenly either way.
    # Rows also need W_hh within half of one core's L2: H = 512 on a 2 MB L2, 352 on a 1 MB one
    # (a step of 64 rows still over kUnevenRowsMaxStepFlops).
    rnn = functional.CELL_CODES["rnn_tanh"]
    H = 512 if 512 * 512 * 4 <= _C.cache_bytes()["l2"] // 2 else 352
    assert H * H * 4 <= _C.cache_bytes()["l2"] // 2 and 2 * 64 * H * H > 1e7
    for isa in ("avx2", "avx512"):
        if isa in _C.available_isas():
            assert _C.step_split(rnn, 98, 1, H, H, threads=2, isa=isa) == "units"
            assert _C.step_split(rnn, 100, 1, H, H, threads=2, isa=isa) == "rows"
            assert _C.step_split(rnn, 64, 1, H, H, threads=2, isa=isa) == "rows"
            assert _C.step_split(rnn, 96, 1, 128, 128, threads=2, isa=isa) == "rows"
    assert _C.step_split(lstm, 96, 1, 128, 128, threads=1) == "one"
    assert _C.step_split(lstm, 1, 1, 32, 32, threads=2, backward=True) == "one"
    assert _C.step_split(functional.CELL_CODES["rnn_tanh"], 1, 1, 64, 64, threads=2,
                         backward=True) == "one"  # a step too small for a team: not in halves
    # a single row's units in two halves (one unit block of 32 is too few), alone or on two,
    # where the step has 30-100 KFLOP
    assert _C.step_split(lstm, 1, 1, 64, 64, threads=2, backward=True) == "halves"
    assert _C.step_split(lstm, 1, 1, 64, 64, threads=1, backward=True) == "halves"
    assert _C.step_split(lstm, 1, 1, 128, 128, threads=2, backward=True) == "team"
    assert _C.step_split(lstm, 1, 1, 96, 64, threads=2, backward=True) == "team"  # projection
    assert _C.step_split(functional.CELL_CODES["gru"], 1, 1, 80, 80, threads=2,
                         backward=True) == "team"
    assert _C.step_split(lstm, 2, 1, 64, 64, threads=2, backward=True) == "team"
    with pytest.raises(ValueError, match="cell"):
        _C.step_split(7, 1, 1, 1, 1)


@pytest.mark.parametrize("kwargs,match", [
    ({"threads": 0}, r"threads must lie in 1\.\.1024, got 0"),     # was SIGFPE: the process died
    ({"threads": -1}, r"threads must lie in 1\.\.1024, got -1"),
    ({"threads": 2 ** 31 - 1}, "threads must lie in"),
    ({"B": 2 ** 62}, r"B must be at most 2\^32 rows"),             # walked 2^58 row tiles: a hang
])
@pytest.mark.parametrize("backward", [False, True])
def test_step_split_refuses_what_no_call_can_have(kwargs, match, backward):
    args = {"cell": functional.CELL_CODES["lstm"], "B": 4, "I": 5, "H": 6, "Hout": 6, "threads": 2,
            **kwargs}
    with pytest.raises(ValueError, match=match):
        _C.step_split(**args, backward=backward)


@pytest.mark.parametrize("args,match", [
    ((7, 4, 5, 6, 6), "cell must be 0..3"),
    ((2, 0, 5, 6, 6), "B, H and Hout must be >= 1 and I >= 0"),   # each gave a mode
    ((2, -1, 5, 6, 6), "B, H and Hout must be >= 1"),
    ((2, 4, -5, 6, 6), "I >= 0"),
    ((2, 4, 5, 0, 6), "B, H and Hout must be >= 1"),
    ((2, 4, 5, 6, -6), "B, H and Hout must be >= 1"),
    ((2, 2 ** 62, 5, 6, 6), r"B must be at most 2\^32 rows"),
])
def test_projection_mode_refuses_what_no_call_can_have(args, match):
    """As step_split does (the same check): it read a batch of -1 rows as a shape and named a
    mode for it."""
    with pytest.raises(ValueError, match=match):
        _C.projection_mode(*args)


@pytest.mark.parametrize("isa", ISAS)
def test_nan_propagates(rng, isa):
    case = make_case(rng, "lstm", T=3, B=2)
    case["x"][1, 0, 2] = np.nan
    out, grad = run_kernels(case, np.float32, isa)
    assert np.isnan(out["y"][1:, 0]).all() and not np.isnan(out["y"][:, 1]).any()
    assert np.isnan(grad["weight_ih"]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_relu_backward_keeps_nan(rng, isa, dtype):
    """relu's derivative at a NaN is 1, as torch's: the NaN reaches the gradients, not a 0."""
    case = make_case(rng, "rnn_relu", T=4, B=2)
    case["x"][1, 0, 2] = np.nan
    case["w"]["w_hh"][3, 5] = np.nan          # and NaN states from a weight, in both rows
    _, grad = run_kernels(case, dtype, isa)
    assert np.isnan(grad["dx"][:2, 0]).any() and np.isnan(grad["weight_ih"]).any()
    assert_matches(case, dtype, isa)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ISAS)
def test_relu_derivative_at_an_exact_zero_is_zero(rng, isa, dtype):
    """relu's derivative where its pre-activation is exactly 0 is 0, as torch's (its
    threshold_backward passes the gradient only where h > 0) and the reference's. With x_0 = 0,
    h0 = 0 and b_hh = -b_ih every unit's first pre-activation is exactly 0, so no gradient reaches
    x_0 (a derivative of 1 there would give it one of O(1))."""
    case = make_case(rng, "rnn_relu", T=4, B=3, I=2, H=5)
    case["x"][0] = 0
    case["h0"][:] = 0
    case["w"]["b_hh"] = -case["w"]["b_ih"]
    _, grad = run_kernels(case, dtype, isa)
    assert not grad["dx"][0].any() and grad["dx"][1:].any()
    assert_matches(case, dtype, isa)


@pytest.mark.parametrize("isa", ISAS)
def test_empty_batch(rng, isa):
    case = make_case(rng, "gru", B=0)
    out, grad = run_kernels(case, np.float32, isa)
    assert out["y"].shape == (5, 0, 11) and grad["dx"].shape == (5, 0, 6)
    assert not grad["weight_hh"].any() and not grad["bias_ih"].any()


def test_caller_floating_point_mode_restored(rng):
    """Kernels flush denormals internally but must give the caller its own mode back."""
    tiny = np.array([1e-38], dtype=np.float32)
    assert (tiny * np.float32(1e-3))[0] != 0  # denormals work here before the call
    run_kernels(make_case(rng, "lstm"), np.float32, None)
    assert (tiny * np.float32(1e-3))[0] != 0


def test_inputs_not_modified(rng):
    case = make_case(rng, "lstm", proj=4, lengths=True)
    copies = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in case.items()}
    run_kernels(case, np.float64, None, reverse=True)
    for k, v in copies.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(case[k], v), k


# I = 5: a plain copy (packed panels would pad each row to 16-32 values); I = 64: packed.
@pytest.mark.parametrize("I", [5, 64])
@pytest.mark.parametrize("keep_x", [False, True])
def test_training_context_and_the_callers_x(rng, keep_x, I):
    """By default the context keeps its own copy of x, so the caller may reuse its buffer before
    backward; keep_x=True (the layers' inner inputs) keeps x itself, which then must not change."""
    case = make_case(rng, "gru", T=4, B=3, I=I, H=6)
    w = case["w"]

    def weight_ih_grad(overwrite):
        x = case["x"].copy()
        *_, ctx = functional.forward("gru", x, case["h0"], None, w["w_ih"], w["w_hh"], w["b_ih"],
                                     w["b_hh"], keep_x=keep_x)
        if overwrite:
            x[...] = 0.0
        return functional.backward(ctx, case["dy"])[3]["weight_ih"]

    same = np.array_equal(weight_ih_grad(False), weight_ih_grad(True))
    assert same == (not keep_x)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("training", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_rows_past_their_length_leave_the_running_rows_bits(rng, isa, dtype, variant, training,
                                                            order):
    """The step's tiles and the input projection leave out rows past their length (a tile
    shrinks to its rows still running, a tile of ended rows computes nothing; forward.h,
    cell_phase; layout.h, input_projection), and so do the backward's step products (whole
    tiles; backward.h, live_product_rows): each row's outputs and final states, and in training
    its dh0 and dc0, are, bit for bit, those of the same batch run for just its length with
    every row running. (Not dx: one product over all T * B rows, whose last row tile, and so
    its k-split, depends on T.) B = two row tiles and 5 rows, the second tile's last rows and the 5
    ending early, so that tiles shrink to fewer than 4 rows (whose chains must stay those of
    the whole tile's)."""
    cell, lbr, proj = variant
    mr = tile_rows(isa)
    T, B = 9, 2 * mr + 5
    lengths = np.full(B, T)
    lengths[mr + 2:2 * mr] = T - 2
    lengths[2 * mr:] = [6, 1, 4, 6, 3]
    if order == "shuffled":
        lengths = rng.permutation(lengths)
    case = make_case(rng, cell, proj, T=T, B=B, I=7, H=40)
    w, c = case["w"], lambda a: None if a is None else a.astype(dtype)

    def forward(steps, lens):
        y, hn, cn, ctx = functional.forward(
            cell, c(case["x"][:steps]), c(case["h0"]), c(case["c0"]), c(w["w_ih"]),
            c(w["w_hh"]), c(w["b_ih"]), c(w["b_hh"]), c(w["w_hr"]), lens, False, lbr, training,
            isa=isa)
        out = {"y": y, "hn": hn, "cn": cn}
        if training:
            _, dh0, dc0, _ = functional.backward(ctx, c(case["dy"][:steps]), c(case["dhn"]),
                                                 c(case["dcn"]))
            out.update(dh0=dh0, dc0=dc0)
        return out

    got = forward(T, lengths)
    for L in np.unique(lengths):
        rows = lengths == L
        want = forward(L, np.full(B, L))
        for name, value in got.items():
            if value is None:
                continue
            if name == "y":
                assert np.array_equal(value[:L, rows], want[name][:, rows]), (name, L)
            else:
                assert np.array_equal(value[rows], want[name][rows]), (name, L)


# B = 1: a single row (dW_ih may be taken chunk by chunk of steps); 3: whole-sequence products;
# 13: the projection in the step. I = 5: x copied plain; I = 64: packed for the backward.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("B,I", [(1, 5), (3, 5), (3, 64), (13, 5)])
@pytest.mark.parametrize("keep_x", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_padding_past_lengths_never_reaches_the_gradients(rng, isa, cell, B, I, keep_x, reverse):
    """Steps past a row's length are padding (torch's PackedSequence never holds them): NaN and
    infinities there leave every output and gradient as zeros there do. They met dW_ih = dG^T X,
    where dG is 0 and 0 * NaN is NaN."""
    T = 6
    case = make_case(rng, cell, T=T, B=B, I=I, H=7)
    lengths = np.full(B, T)
    lengths[-1] = 2 if B > 1 else 4
    lengths[0] = 3 if B > 2 else lengths[0]
    padding = np.arange(T)[:, None] >= lengths[None, :]          # (T, B)
    w = case["w"]

    def run(fill):
        x = case["x"].copy()
        x[padding] = fill
        y, hn, cn, ctx = functional.forward(cell, x, case["h0"], case["c0"], w["w_ih"],
                                            w["w_hh"], w["b_ih"], w["b_hh"], None, lengths,
                                            reverse, isa=isa, keep_x=keep_x)
        dx, dh0, dc0, grads = functional.backward(ctx, case["dy"], case["dhn"], case["dcn"])
        return {"y": y, "hn": hn, "cn": cn, "dx": dx, "dh0": dh0, "dc0": dc0, **grads}

    want = run(0.0)
    for fill in (np.nan, np.inf, -np.inf):
        got = run(fill)
        for k, v in want.items():
            if v is not None:
                # (keep_x with zeros keeps x itself; with NaN it takes a copy, maybe packed)
                assert np.isfinite(got[k]).all(), (fill, k)
                assert_close(got[k], v, np.float64, what=f"{k} ({fill} in the padding)")


# The products over the rows that ran (csrc/sequence/live_products.h) gather them ~8 MB at a
# time: in float64 with H = I = 128 (the RNN's one gate: 256), 512 or 1024 rows a chunk, and
# these lengths leave ~1200 of the 1920 rows running, so every variant's weight gradients are
# summed over several chunks.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("reverse", [False, True])
def test_products_over_the_rows_that_ran_sum_every_chunk(rng, isa, variant, reverse):
    """With lengths, the whole-sequence products (dX, dW_ih, dW_hh, dW_hr, the bias sums) run
    on the rows that ran only, gathered chunk by chunk; dX's other rows are zeros."""
    cell, lbr, proj = variant
    size = 256 if cell.startswith("rnn") else 128
    case = make_case(rng, cell, proj, T=40, B=48, I=size, H=size)
    case["lengths"] = rng.integers(10, 41, case["B"])
    assert case["lengths"].sum() > 1024
    chunks = _C.gathered_product_chunks()
    assert_matches(case, np.float64, isa, reverse=reverse, linear_before_reset=lbr)
    assert _C.gathered_product_chunks() - chunks >= 2


# Products of G*H*(I + Hout) = 2^16 FMAs a row and more gather; a 64th of the rows idle (2 of
# 128) is enough.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell,size,gathers", [("rnn_tanh", 256, True), ("lstm", 128, True),
                                               ("gru", 128, True), ("lstm", 64, False)])
def test_products_gather_the_rows_that_ran_where_it_pays(rng, isa, cell, size, gathers):
    """Gathering copies every row's operands once: it pays where lengths leave rows idle and the
    products are big beside the copies; elsewhere the products run over all T*B rows."""
    case = make_case(rng, cell, T=16, B=8, I=size, H=size)
    for lengths, idle in ((np.full(8, 16), 0), ([16] * 7 + [15], 1), ([16] * 6 + [15, 15], 2)):
        case["lengths"] = np.array(lengths)
        chunks = _C.gathered_product_chunks()
        assert_matches(case, np.float32, isa)
        gathered = _C.gathered_product_chunks() - chunks
        assert gathered == int(gathers and idle * 64 >= 16 * 8), lengths


# T * B = 1024 and I = H = 128: on amx the tiles' shapes, in inference and training alike.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell", ["rnn_relu", "lstm", "gru"])
@pytest.mark.parametrize("training", [False, True])
def test_what_the_padding_holds_leaves_every_bit(rng, isa, cell, training):
    """Steps past a row's length are never read into a result, whatever they hold: not even the
    bits. A value the AMX tiles cannot split there (NaN, inf, past bfloat16's largest, nonzero
    under 2^-100) sent the whole call to the FMA kernels, whose results are others by an ulp
    (GRU, T = 16, B = 64: 4.6e-7)."""
    T, B = 16, 64
    case = make_case(rng, cell, T=T, B=B, I=128, H=128)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0] = T
    padding = np.arange(T)[:, None] >= lengths[None, :]
    f32 = {k: None if v is None else np.float32(v) for k, v in {**case, **case["w"]}.items()
           if k in ("h0", "c0", "dy", "dhn", "dcn", "w_ih", "w_hh", "b_ih", "b_hh")}

    def run(fill):
        x = np.float32(case["x"])
        x[padding] = fill
        y, hn, cn, ctx = functional.forward(cell, x, f32["h0"], f32["c0"], f32["w_ih"],
                                            f32["w_hh"], f32["b_ih"], f32["b_hh"], None, lengths,
                                            training=training, isa=isa)
        got = [y, hn, cn]
        if training:
            dx, dh0, dc0, grads = functional.backward(ctx, f32["dy"], f32["dhn"], f32["dcn"])
            got += [dx, dh0, dc0, *grads.values()]
        return got

    want = run(0.0)
    for fill in (np.nan, np.inf, 3.39e38, 1e-36):
        for got, v in zip(run(fill), want):
            assert (got is None and v is None) or np.array_equal(got, v), fill


def test_the_context_keeps_its_own_lengths(rng):
    """The caller may change its lengths array (the next batch's) between forward and backward,
    to other lengths or to values no call would take: the backward reads the forward's. It read
    the caller's array: other gradients, or a crash out of bounds."""
    case = make_case(rng, "gru", T=6, B=3, I=4, H=5)
    w = case["w"]

    def grads(overwrite):
        lengths = np.array([6, 2, 4], np.int64)
        *_, ctx = functional.forward("gru", case["x"], case["h0"], None, w["w_ih"], w["w_hh"],
                                     w["b_ih"], w["b_hh"], None, lengths, True)
        if overwrite is not None:
            lengths[:] = overwrite
        dx, dh0, _, g = functional.backward(ctx, case["dy"], case["dhn"])
        return {"dx": dx, "dh0": dh0, **g}

    want = grads(None)
    for overwrite in ([1, 6, 6], [10 ** 6] * 3, [-5] * 3):
        got = grads(overwrite)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} after {overwrite}")


@pytest.mark.parametrize("I", [5, 64])
@pytest.mark.parametrize("keep_x", [False, True])
def test_a_stacks_context_and_the_callers_x(rng, keep_x, I):
    """forward_stack's bottom layer: its own copy of x unless keep_x (_C.forward_stack), and the
    layer above keeps its input (the output below, the call's own) either way."""
    case = make_case(rng, "lstm", T=4, B=3, I=I, H=6)
    w = case["w"]
    layers = [tuple(w[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh")) + (None,),
              (rng.standard_normal((24, 6)), rng.standard_normal((24, 6)), None, None, None)]

    def weight_ih_grads(overwrite):
        x = case["x"].copy()
        outs = _C.forward_stack(2, True, True, x, [case["h0"]] * 2, [case["c0"]] * 2,
                                *(list(p) for p in zip(*layers)), keep_x=keep_x)
        if overwrite:
            x[...] = 0.0
        dx1 = _C.backward(outs[1][3], case["dy"], None, None, False)[0]
        return _C.backward(outs[0][3], dx1, None, None, False)[3]["weight_ih"]

    same = np.array_equal(weight_ih_grads(False), weight_ih_grads(True))
    assert same == (not keep_x)


@pytest.mark.parametrize("train_from", [0, 1, 2])
def test_a_stacks_outputs_kept_as_the_input_above_are_read_only(rng, train_from):
    """functional.forward_stack returns each layer's y, which the layer above's training context
    keeps as its x: written into before backward, it silently changed that layer's gradients.
    Those are read-only; the others (the top's, those under layers without a context, inference)
    stay writeable."""
    case = make_case(rng, "rnn_tanh", T=4, B=2, I=3, H=4)
    w = case["w"]
    upper = (rng.standard_normal((4, 4)), rng.standard_normal((4, 4)), None, None, None)
    layers = [(w["w_ih"], w["w_hh"], None, None, None), upper, upper]
    for training in (False, True):
        outs = functional.forward_stack("rnn_tanh", case["x"], [None] * 3, [None] * 3, layers,
                                        training=training, train_from=train_from)
        kept = [training and k + 1 >= train_from and k < 2 for k in range(3)]
        assert [y.flags.writeable for y, *_ in outs] == [not k for k in kept]
        for (y, *_), k in zip(outs, kept):
            if k:
                with pytest.raises(ValueError, match="read-only"):
                    y[...] = 0.0


class _Subclass(np.ndarray):
    pass


@pytest.mark.parametrize("kind", ["subclass", "memmap", "__array__"])
@pytest.mark.parametrize("stack", [False, True])
def test_an_x_whose_checked_array_is_a_view_of_it_is_copied_for_backward(rng, tmp_path, kind,
                                                                         stack):
    """functional.forward / forward_stack keep their own copy of x unless the checks made one;
    np.ascontiguousarray of an ndarray subclass (np.memmap) is a new object viewing the caller's
    memory, as np.asarray of an object's own array is, and was taken for such a copy: the context
    kept the caller's memory and overwriting it changed the gradients (119 off)."""
    case = make_case(rng, "gru", T=4, B=3, I=5, H=6)
    w = case["w"]
    layers = [tuple(w[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh")) + (None,)]

    def weight_ih_grad(x, overwrite):
        if stack:
            ctx = functional.forward_stack("gru", x, [case["h0"]], [None], layers)[0][3]
        else:
            *_, ctx = functional.forward("gru", x, case["h0"], None, w["w_ih"], w["w_hh"],
                                         w["b_ih"], w["b_hh"])
        if overwrite is not None:
            overwrite[...] = 0.0
        return functional.backward(ctx, case["dy"])[3]["weight_ih"]

    want = weight_ih_grad(case["x"].copy(), None)
    if kind == "subclass":
        x = case["x"].copy().view(_Subclass)
        mem = x
    elif kind == "memmap":
        x = np.memmap(tmp_path / "x.bin", case["x"].dtype, "w+", shape=case["x"].shape)
        x[...] = case["x"]
        mem = x
    else:
        mem = case["x"].copy()
        x = type("Holder", (), {"__array__": lambda self, dtype=None, copy=None: mem})()
    np.testing.assert_array_equal(weight_ih_grad(x, mem), want)


def test_backward_needs_training_context():
    with pytest.raises(RuntimeError, match="training=True"):
        functional.backward(None, np.zeros((1, 1, 1), np.float32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
# (1100, 3, 2000): a transposed A is gathered 512 rows at a time, so three blocks, one ragged;
# (5, 4100, 1300): B is packed a chunk of K at a time (gemm.h), here one KC block a chunk.
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (7, 33, 5), (64, 48, 300), (13, 129, 257),
                                   (1100, 3, 2000), (5, 4100, 1300)])
# S: a strided view, neither stride 1 (A packed element by element, gemm.h's pack_a)
@pytest.mark.parametrize("layout", ["NN", "TN", "NT", "TT", "SS"])
def test_gemm_against_numpy(rng, isa, dtype, M, N, K, layout):
    A = rng.standard_normal((M, K) if layout[0] != "T" else (K, M)).astype(dtype)
    B = rng.standard_normal((K, N) if layout[1] != "T" else (N, K)).astype(dtype)
    A = A if layout[0] == "N" else A.T if layout[0] == "T" else np.repeat(A, 2, axis=1)[:, ::2]
    B = B if layout[1] == "N" else B.T if layout[1] == "T" else np.repeat(B, 2, axis=1)[:, ::2]
    want = A.astype(np.float64) @ B.astype(np.float64)
    got = _C.gemm(A, B, isa=isa)
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err <= GEMM_PER_TERM[np.dtype(dtype)] * K


@pytest.mark.parametrize("b_dtype", [np.complex64, np.float64, np.int32])
def test_gemm_refuses_a_b_of_another_dtype(b_dtype):
    """B is not cast to A's dtype (a complex B would lose its imaginary part)."""
    A = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="gemm needs B of A's dtype, float32, got"):
        _C.gemm(A, np.ones((3, 2), b_dtype))


@pytest.mark.parametrize("a_dtype", [">f4", ">f8", np.float16, np.int32])
def test_gemm_names_a_of_another_dtype(a_dtype):
    """An A of no kernel's dtype (a byte-swapped one included) is named as A (the error said
    "x must be float32 or float64")."""
    A = np.ones((2, 3), a_dtype)
    with pytest.raises(TypeError, match=f"gemm needs A of float32 or float64, got {A.dtype}"):
        _C.gemm(A, A.T.copy())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,N,K", [(1301, 70, 300), (40, 200, 700)], ids=["rows", "panels"])
def test_gemm_bitwise_identical_across_thread_counts(rng, isa, M, N, K):
    """2 threads split a tall product's rows (each packing its own A blocks), a short one's
    column panels; either way every element is the same FMA chain as on one thread."""
    if not _C.openmp:
        pytest.skip("built without OpenMP: one thread only")
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((K, N)).astype(np.float32)
    before = fusedrnn.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            fusedrnn.set_num_threads(n)
            results.append(_C.gemm(A, B, isa=isa))
    finally:
        fusedrnn.set_num_threads(before)
    assert np.array_equal(results[0], results[1])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("N,K", [(128, 300), (80, 1300), (3, 9)])
def test_a_single_row_gives_every_column_the_one_panel_bits(rng, isa, dtype, threads, N, K):
    """A single row takes B's full panels two at a time (the backward's B = 1 products,
    micro_kernel_row_pair); each column must come out as the same product column by column
    (one partial panel each, the single-panel kernel): the chains are the same. K = 1300 runs
    three KC blocks, N = 80 ends in a partial panel."""
    a = rng.standard_normal((1, K)).astype(dtype)
    B = rng.standard_normal((K, N)).astype(dtype)
    before = fusedrnn.get_num_threads()
    try:
        fusedrnn.set_num_threads(threads)
        whole = _C.gemm(a, B, isa=isa)
        by_column = np.hstack([_C.gemm(a, np.ascontiguousarray(B[:, j:j + 1]), isa=isa)
                               for j in range(N)])
    finally:
        fusedrnn.set_num_threads(before)
    np.testing.assert_array_equal(whole, by_column)


def test_big_weights_edited_in_place_are_repacked_with_two_threads(rng, fixed_threads):
    """Weights of 256 KB and up are compared with the cached copy by the call's threads, each a
    slice (workspace.cpp, same_bytes): an edit in the last slice alone must still show."""
    T, B, I, H = 3, 2, 8, 256  # w_hh: 4H x H float32 = 1 MB
    x, h0, c0 = (rng.standard_normal(s).astype(np.float32) for s in ((T, B, I), (B, H), (B, H)))
    w_ih, w_hh = (rng.uniform(-0.06, 0.06, s).astype(np.float32) for s in ((4 * H, I), (4 * H, H)))
    b_ih, b_hh = (rng.uniform(-0.06, 0.06, 4 * H).astype(np.float32) for _ in range(2))
    args = ("lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    before = fusedrnn.get_num_threads()
    try:
        fusedrnn.set_num_threads(2)
        functional.forward(*args, training=False)  # packs and caches w_hh
        w_hh[-1, -1] += 1.0                          # the last byte range only, same address
        got = functional.forward(*args, training=False)
    finally:
        fusedrnn.set_num_threads(before)
    want = reference.forward(*args)
    assert_close(got[0], want[0], np.float32, "forward", what="y after an edit of w_hh's end")
    assert_close(got[1], want[1], np.float32, "forward", what="hn after an edit of w_hh's end")


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_weights_edited_in_place_are_repacked(rng, variant):
    """Packed weights are cached per thread; an in-place edit (an optimiser step) must show."""
    cell, lbr, proj = variant
    case = make_case(rng, cell, proj, lengths=True)
    w = case["w"]
    args = (cell, case["x"], case["h0"], case["c0"], w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"],
            w["w_hr"], case["lengths"], False, lbr)
    functional.forward(*args)  # packs and caches these very buffers
    for v in w.values():
        if v is not None:
            v *= 0.5  # same addresses, new values
    got = functional.forward(*args)
    want = reference.forward(*args)
    assert_close(got[0], want[0], np.float64, "forward", what="y after an in-place edit")
    assert_close(got[1], want[1], np.float64, "forward", what="hn after an in-place edit")


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_a_weight_edited_between_its_forms_is_repacked_in_each(rng, variant):
    """A weight's packed forms (the forward's gate panels, the backward's GEMM panels) share one
    copy of its bytes (workspace.cpp): after an in-place edit that an inference forward has
    already compared and taken in, the backward's own form must still be repacked."""
    cell, lbr, proj = variant
    case = make_case(rng, cell, proj, T=4, B=3, I=6, H=20)
    w = case["w"]
    args = (cell, case["x"], case["h0"], case["c0"], w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"],
            w["w_hr"], None, False, lbr)
    grads_of = lambda runner: runner.backward(runner.forward(*args, True)[3], case["dy"],
                                              case["dhn"], case["dcn"])
    grads_of(functional)       # packs every form of every weight
    w["w_hh"][...] *= 0.5      # same address, new bytes
    functional.forward(*args, False)  # compares w_hh, repacks its forward form
    got, want = grads_of(functional), grads_of(reference)
    for name, g, r in zip(("dx", "dh0", "dc0"), got[:3], want[:3]):
        if r is not None:
            assert_close(g, r, np.float64, "gradient", what=name + " after an edit of w_hh")
    for name in want[3]:
        assert_close(got[3][name], want[3][name], np.float64, "gradient", what=name)


def test_training_calls_keep_no_packed_weights_and_inference_keeps_one_copy(rng):
    """A training call's weights change between calls (an optimiser step): it packs its own and
    keeps nothing (PanelReuse). An inference call keeps each weight's packed form and one copy of
    its bytes, to compare the next call's with; the next calls reuse them, training ones too
    leaving them as they are (B = 2: W_ih's form is the whole-sequence projection's)."""
    x, dy = rng.standard_normal((3, 2, 5)), rng.standard_normal((3, 2, 7))
    h0, c0 = np.zeros((2, 7)), np.zeros((2, 7))
    w_ih, w_hh = rng.standard_normal((28, 5)), rng.standard_normal((28, 7))

    def forward(training):
        return functional.forward("lstm", x, h0, c0, w_ih, w_hh, None, None, training=training)

    empty = {"forms": 0, "copies": 0, "bytes": 0}
    assert _C.packed_cache(clear=True) == empty
    functional.backward(forward(True)[3], dy)
    assert _C.packed_cache() == empty
    forward(False)
    held = _C.packed_cache()
    assert (held["forms"], held["copies"]) == (2, 2)
    assert held["bytes"] > w_ih.nbytes + w_hh.nbytes  # the copies and the panels
    forward(False)
    functional.backward(forward(True)[3], dy)
    assert _C.packed_cache() == held


_PACKING_WITHOUT_MEMORY = """
import resource, sys
import numpy as np
import fusedrnn
from fusedrnn import _C
fusedrnn.set_num_threads(1)
layer = fusedrnn.LSTM(2048, 2048, seed=0).eval()   # W_hh 64 MiB, its packed form as much
x = np.ones((1, 1, 2048), np.float32)
with open("/proc/self/statm") as f:
    in_use = int(f.read().split()[0]) * resource.getpagesize()
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (in_use + (16 << 20), hard))
try:
    layer(x)
    sys.exit("the call ran within 16 MiB more")
except MemoryError:
    pass
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
print(_C.packed_cache()["forms"], end=" ")
layer(x)
held = _C.packed_cache()
print(held["forms"], held["bytes"] >= 2 * (8192 * 2048 * 4))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_a_packed_form_whose_memory_failed_leaves_no_entry():
    """cached_packed made a form's cache entry before it allocated the form's memory: where the
    allocation failed (MemoryError), an entry with no memory stayed, and every later call with
    that weight packed for itself beside it, until the entry was evicted. Run apart, under an
    address-space limit that the 64 MiB form passes."""
    out = subprocess.run([sys.executable, "-c", _PACKING_WITHOUT_MEMORY], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "2", "True"]  # then W_ih's and W_hh's forms, with memory


# The subprocesses' layer call: "CELL I H B T MODE" -> a function giving its outputs (and in
# training its gradients), fresh copies.
_LAYER_CALL = """
import sys
import numpy as np
import fusedrnn
from fusedrnn import _C
def layer_call(case):
    cell, I, H, B, T, mode = case.split()
    layer = getattr(fusedrnn, cell)(int(I), int(H), seed=0)
    layer = layer.eval() if mode == "infer" else layer
    x = np.random.default_rng(0).standard_normal((int(T), int(B), int(I))).astype(np.float32)
    def call():
        y = layer(x)[0].copy()
        if mode == "infer":
            return [y]
        layer.zero_grad()
        return [y, layer.backward(np.ones_like(y))[0], *layer.grads.values()]
    return call
fusedrnn.set_thread_policy("fixed")
"""

_THREADS_WITHOUT_MEMORY = _LAYER_CALL + """
import resource
call = layer_call(" ".join(sys.argv[1:]) + " train")
fusedrnn.set_num_threads(1)
want = call()
call()   # (its blocks kept: the calling thread's buffers need no new memory)
fusedrnn.set_num_threads(2)
fusedrnn.RNN(2, 2).eval()(np.ones((1, 1, 2), np.float32))   # the worker started, on no buffer
with open("/proc/self/statm") as f:
    in_use = int(f.read().split()[0]) * resource.getpagesize()
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (in_use + (256 << 10), hard))
try:
    call()
    print("ran", end=" ")
except MemoryError:
    print("MemoryError", end=" ")
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
print(all(np.array_equal(a, b) for a, b in zip(call(), want)))
"""


# A worker's first buffers are allocated inside the OpenMP region: there the step team of a
# backward (B = 26: column panels), the walk beside the products (a single row, T = 300) and,
# in the amx build, the GEMM on tiles.
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
@pytest.mark.skipif(not _C.openmp, reason="built without OpenMP: one thread only")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", ["LSTM 32 300 26 6", "GRU 32 300 26 6", "GRU 8 64 1 300",
                                  "LSTM 256 256 64 50"])
def test_memory_running_out_on_a_worker_thread_raises_memory_error(isa, case):
    """An allocation that failed on an OpenMP worker (its first buffers, under an address-space
    limit) threw out of the parallel region, and the process ended (std::terminate, SIGABRT);
    the member's error now stops the team and the call raises MemoryError, or runs where its
    memory was enough. Run apart; after the limit is lifted the call gives the one-thread bits."""
    out = subprocess.run([sys.executable, "-c", _THREADS_WITHOUT_MEMORY, *case.split()],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FUSEDRNN_ISA": isa})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "True", out.stdout


_WORKER_ALLOCATION_FAILS = _LAYER_CALL + """
_C.set_ride_override("whole")  # (a single row's team riding allocates nothing on its worker)
for case in sys.argv[1:]:
    call = layer_call(case)
    fusedrnn.set_num_threads(1)
    want = call()
    fusedrnn.set_num_threads(2)
    _C.fail_worker_allocations(1)
    try:
        call()
        outcome = "ran"
    except MemoryError:
        outcome = "MemoryError"
    _C.fail_worker_allocations(0)
    print(case, outcome, all(np.array_equal(a, b) for a, b in zip(call(), want)))
"""

# Cases whose worker allocates inside a parallel region: a forward team on one row (first: the
# worker keeps what it allocates there, so only its first such team allocates), a backward's
# step team (B = 26), the walk beside the products (one row, T = 300), the GEMMs and step teams
# of batch 64.
_WORKER_CASES = ["LSTM 128 128 1 100 infer", "LSTM 32 300 26 6 train", "GRU 32 300 26 6 train",
                 "GRU 8 64 1 300 train", "LSTM 256 256 64 50 train", "LSTM 256 256 64 50 infer",
                 "GRU 256 256 64 50 infer"]


@pytest.mark.skipif(not _C.openmp, reason="built without OpenMP: one thread only")
@pytest.mark.parametrize("isa", ISAS)
def test_an_allocation_failing_on_a_worker_thread_raises_memory_error(isa):
    """The address-space test above cannot choose the thread that runs out: there the caller's
    allocations usually fail first, and the workers' (RegionError, the step barrier's abort) went
    untested (gcov). _C.fail_worker_allocations makes a worker's next allocation throw: every
    call raises MemoryError (no std::terminate, no teammate left waiting at a barrier), and the
    next call gives the one-thread bits. Run apart: a regression would hang or end the process."""
    out = subprocess.run([sys.executable, "-c", _WORKER_ALLOCATION_FAILS, *_WORKER_CASES],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FUSEDRNN_ISA": isa})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines == [f"{case} MemoryError True" for case in _WORKER_CASES], out.stdout


# csrc/workspace.cpp, kPackCacheMaxForms: the packed forms a thread keeps at most.
PACKED_FORMS_MAX = 4096


def test_the_packed_weight_cache_keeps_a_bounded_number_of_forms(rng):
    """A process meeting many small weights (layers made and dropped, a service's many small
    models) kept every form until the thread's 256 MiB were full: tens of thousands of forms,
    and every call that met a new weight scanned them all for the oldest (0.07 -> 0.9 ms a
    call). Now at most PACKED_FORMS_MAX stay, the least recently used leaving first; a weight
    whose forms left is packed again, to the same bits."""
    x, h0 = rng.standard_normal((2, 1, 3)), np.zeros((1, 2))
    weights = [(rng.standard_normal((2, 3)), rng.standard_normal((2, 2)))
               for _ in range(PACKED_FORMS_MAX // 2 + 300)]   # two forms each (B = 1)

    def run(w_ih, w_hh):
        return functional.forward("rnn_tanh", x, h0, None, w_ih, w_hh, None, None,
                                  training=False)[0]

    _C.packed_cache(clear=True)
    try:
        first = run(*weights[0])
        for w in weights[1:]:
            run(*w)
        held = _C.packed_cache()
        assert held["forms"] == PACKED_FORMS_MAX and held["copies"] <= PACKED_FORMS_MAX
        np.testing.assert_array_equal(run(*weights[0]), first)   # evicted, packed again
        assert _C.packed_cache()["forms"] == PACKED_FORMS_MAX
    finally:
        _C.packed_cache(clear=True)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("B", [1, 9])
def test_weights_made_for_one_call_leave_no_packed_forms(rng, cell, B):
    """keep_packed=False, for weights copied for the call alone (fusedrnn.onnx_ops reorders the
    gates, a bfloat16 module's parameters are cast): packed for that call, the same bits, and
    nothing kept in the thread's cache, where forms of freed arrays stayed until it was full."""
    case = make_case(rng, cell, 0, T=5, B=B, I=6, H=10)
    w = case["w"]
    args = (cell, case["x"], case["h0"], case["c0"], w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    layers = [(w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], None),
              (w["w_hh"].copy(), w["w_hh"], w["b_ih"], w["b_hh"], None)]
    for f32 in (False, True):
        cast = (lambda a: a if a is None else a.astype(np.float32)) if f32 else (lambda a: a)
        one = tuple(cast(a) for a in args[1:])
        stack = [tuple(cast(a) for a in layer) for layer in layers]
        h0s, c0s = [one[1]] * 2, [one[2]] * 2
        _C.packed_cache(clear=True)
        got = functional.forward(cell, *one, training=False, keep_packed=False)
        got_stack = functional.forward_stack(cell, one[0], h0s, c0s, stack, training=False,
                                             keep_packed=False)
        assert _C.packed_cache()["forms"] == 0
        want = functional.forward(cell, *one, training=False)
        want_stack = functional.forward_stack(cell, one[0], h0s, c0s, stack, training=False)
        assert _C.packed_cache()["forms"] > 0
        for g, r in zip(got[:3] + tuple(got_stack[1][:3]), want[:3] + tuple(want_stack[1][:3])):
            if r is not None:
                np.testing.assert_array_equal(g, r)
    _C.packed_cache(clear=True)


@pytest.mark.parametrize("lbr", [True, False])
def test_an_edit_of_one_gru_row_range_reaches_every_form(rng, lbr):
    """The GRU's backward packs row ranges of W_hh, which its forward packed whole: an in-place
    edit of one range's rows alone reaches every form that reads them, the inference forward's
    kept one (compared with its copy) and the training calls' own (packed every call)."""
    T, B, I, H = 3, 2, 5, 7
    x, dy = rng.standard_normal((T, B, I)), rng.standard_normal((T, B, H))
    h0 = rng.standard_normal((B, H))
    w_ih, w_hh = rng.standard_normal((3 * H, I)), rng.standard_normal((3 * H, H))
    b_ih, b_hh = rng.standard_normal(3 * H), rng.standard_normal(3 * H)
    args = ("gru", x, h0, None, w_ih, w_hh, b_ih, b_hh, None, None, False, lbr)

    def grads(runner):
        return runner.backward(runner.forward(*args, True)[3], dy)

    assert _C.packed_cache(clear=True)["copies"] == 0
    grads(functional)
    for rows in (slice(2 * H, 3 * H), slice(0, H)):  # the new gate's rows, then the reset's
        functional.forward(*args, False)              # keeps W_ih's and W_hh's forms and copies
        w_hh[rows] *= 0.5                             # same addresses, new bytes in one range
        assert_close(functional.forward(*args, False)[0], reference.forward(*args, False)[0],
                     np.float64, "forward", what="y after a range's edit")
        got, want = grads(functional), grads(reference)
        assert _C.packed_cache()["copies"] == 2
        assert_close(got[0], want[0], np.float64, "gradient", what="dx after a range's edit")
        assert_close(got[1], want[1], np.float64, "gradient", what="dh0 after a range's edit")
        for name in want[3]:
            assert_close(got[3][name], want[3][name], np.float64, "gradient", what=name)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_gradients_added_into_the_callers_arrays(rng, isa, variant):
    """grads_into: the weight and bias gradients are added into the caller's arrays in place.
    Into zeros they are the bits a fresh backward returns; into other values, those values plus
    the gradients (one rounding apart); the returned grads are the caller's arrays."""
    cell, lbr, proj = variant
    case = make_case(rng, cell, proj, T=4, B=3, I=20, H=35, lengths=True)
    w = case["w"]

    def grads(into):
        ctx = functional.forward(cell, case["x"], case["h0"], case["c0"], w["w_ih"], w["w_hh"],
                                 w["b_ih"], w["b_hh"], w["w_hr"], case["lengths"],
                                 linear_before_reset=lbr, isa=isa)[3]
        return functional.backward(ctx, case["dy"], case["dhn"], case["dcn"], grads_into=into)

    fresh = grads(None)[3]
    zeros = {k: np.zeros_like(v) for k, v in fresh.items()}
    got = grads(zeros)[3]
    assert all(got[k] is zeros[k] for k in fresh)
    for k in fresh:
        assert np.array_equal(zeros[k], fresh[k]), k
    start = {k: rng.standard_normal(v.shape) for k, v in fresh.items()}
    into = {k: v.copy() for k, v in start.items()}
    grads(into)
    for k in fresh:
        assert_close(into[k], start[k] + fresh[k], np.float64, "gradient", what=k + " added")


def unaligned(a):
    """A writeable copy of ``a`` one byte off its dtype's alignment (np.frombuffer at an odd
    offset; a packed record's field is another such array)."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    out = np.frombuffer(raw.data, np.uint8, a.nbytes, offset=1).view(a.dtype).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned and out.flags.c_contiguous
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_unaligned_arrays_are_read_as_aligned_copies(rng, isa, dtype, variant):
    """Every input one byte off alignment gives the aligned inputs' bits (the kernels read T
    aligned: the bindings copy such an array, as a non-contiguous one)."""
    cell, lbr, proj = variant
    case = make_case(rng, cell, proj, lengths=True)
    moved = {k: None if v is None else unaligned(v.astype(dtype)) for k, v in case.items()
             if k in ("x", "h0", "c0", "dy", "dhn", "dcn")}
    moved = dict(case, **moved, w={k: None if v is None else unaligned(v.astype(dtype))
                                   for k, v in case["w"].items()})
    want = run_kernels(case, dtype, isa, linear_before_reset=lbr)
    got = run_kernels(moved, dtype, isa, linear_before_reset=lbr)
    for have, expect in zip(got, want):
        assert have.keys() == expect.keys()
        for k in expect:
            np.testing.assert_array_equal(have[k], expect[k], err_msg=k)


def test_gradients_to_add_into_are_checked(rng):
    case = make_case(rng, "lstm", T=3, B=2, I=5, H=6)
    w = case["w"]
    shapes = {"weight_ih": (24, 5), "weight_hh": (24, 6), "bias_ih": (24,), "bias_hh": (24,)}

    def backward(**change):
        ctx = functional.forward("lstm", case["x"], case["h0"], case["c0"], w["w_ih"], w["w_hh"],
                                 w["b_ih"], w["b_hh"])[3]
        into = {k: np.zeros(s) for k, s in shapes.items()}
        into.update(change)
        into = {k: v for k, v in into.items() if v is not None}
        return functional.backward(ctx, case["dy"], grads_into=into)

    with pytest.raises(ValueError, match=r'grads_into\["bias_hh"\] is missing'):
        backward(bias_hh=None)
    with pytest.raises(TypeError, match=r'grads_into\["weight_ih"\] must have dtype float64'):
        backward(weight_ih=np.zeros((24, 5), np.float32))
    with pytest.raises(ValueError, match=r'grads_into\["weight_hh"\] must have shape \(24, 6\)'):
        backward(weight_hh=np.zeros((24, 7)))
    with pytest.raises(ValueError, match=r'grads_into\["weight_hh"\] must be a writeable, '
                                         r'aligned C-cont'):
        backward(weight_hh=np.zeros((6, 24)).T)
    with pytest.raises(ValueError, match=r'grads_into\["weight_hh"\] must be a writeable, aligned'):
        backward(weight_hh=unaligned(np.zeros((24, 6))))
    read_only = np.zeros(24)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=r'grads_into\["bias_ih"\] must be a writeable'):
        backward(bias_ih=read_only)
    shared = np.zeros(24)
    with pytest.raises(ValueError, match="an array of its own"):
        backward(bias_ih=shared, bias_hh=shared)
    with pytest.raises(ValueError, match="must not share memory with the weights"):
        backward(weight_hh=w["w_hh"])
    # a key the backward writes no gradient for would keep its values, taken for a gradient
    with pytest.raises(ValueError, match=r'grads_into\["weight_hr"\]: this backward has no such '
                                         r'gradient \(it writes weight_ih, weight_hh, bias_ih, '
                                         r'bias_hh\); drop the key'):
        backward(weight_hr=np.zeros((6, 6)))
    with pytest.raises(ValueError, match=r'grads_into\["weight_ih_l0"\]: this backward has no'):
        backward(weight_ih_l0=np.zeros((24, 5)))
    ctx = functional.forward("lstm", case["x"], case["h0"], case["c0"], w["w_ih"], w["w_hh"],
                             None, None)[3]
    into = {k: np.full(s, 7.0) for k, s in shapes.items()}
    with pytest.raises(ValueError, match=r'grads_into\["bias_ih"\]: this backward has no such '
                                         r'gradient \(it writes weight_ih, weight_hh\)'):
        functional.backward(ctx, case["dy"], grads_into=into)
    assert all((a == 7.0).all() for a in into.values()), "refused, yet written"
    with pytest.raises(TypeError, match="grads_into must be a dict"):
        ctx = functional.forward("lstm", case["x"], case["h0"], case["c0"], w["w_ih"], w["w_hh"],
                                 w["b_ih"], w["b_hh"])[3]
        functional.backward(ctx, case["dy"], grads_into=[np.zeros(1)])


def test_a_narrow_x_is_kept_as_a_plain_copy(rng):
    """A training context keeps x packed only where that is about x's size: with I = 1 the panels
    would pad every row to a whole panel (16-32 values), so it keeps a plain copy instead."""
    def saved_x_bytes(I):
        case = make_case(rng, "rnn_tanh", T=50, B=40, I=I, H=8)
        w = case["w"]
        ctx = functional.forward("rnn_tanh", case["x"], case["h0"], None, w["w_ih"], w["w_hh"],
                                 w["b_ih"], w["b_hh"])[3]
        return ctx.x_bytes
    assert saved_x_bytes(1) == 50 * 40 * 1 * 8
    assert saved_x_bytes(64) == 50 * 40 * 64 * 8


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_missing_initial_states_are_zeros(rng, cell):
    """functional.forward takes h0 = None (and the LSTM's c0 = None) as zeros, as
    reference.forward and torch.nn do; it refused them."""
    case = make_case(rng, cell, h0_zero=True)
    w = case["w"]
    weights = (w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    c0 = np.zeros_like(case["c0"]) if cell == "lstm" else None
    want = functional.forward(cell, case["x"], case["h0"], c0, *weights, training=False)
    got = functional.forward(cell, case["x"], None, None, *weights, training=False)
    ref = reference.forward(cell, case["x"], None, None, *weights, training=False)
    for g, w_, r in zip(got[:3], want[:3], ref[:3]):
        if w_ is not None:
            np.testing.assert_array_equal(g, w_)
            assert_close(g, r, np.float64)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("reverse", [False, True])
def test_an_infinite_state_carried_past_a_rows_length_leaves_dw_hh_alone(isa, dtype, B, reverse):
    """A relu RNN whose state overflows to inf at a row's last step carries it through the
    steps past the row's length, where dW_hh = dG^T H_prev multiplied it by a dG of 0: NaN, where
    the row alone (torch's PackedSequence) gives inf, and the reference too."""
    T, big = 4, {np.float32: 1e30, np.float64: 1e300}[dtype]
    x = np.zeros((T, B, 1), dtype)
    x[:, -1] = 1e10          # the last row: length 2, its state inf from its second step
    lengths = np.array([T, 2][-B:])
    w_ih, w_hh = np.ones((1, 1), dtype), np.full((1, 1), big, dtype)
    dy = np.ones((T, B, 1), dtype)
    h0 = np.zeros((B, 1), dtype)

    *_, ctx = functional.forward("rnn_relu", x, h0, None, w_ih, w_hh, None, None, None, lengths,
                                 reverse, isa=isa)
    got = functional.backward(ctx, dy)[3]["weight_hh"]
    with np.errstate(over="ignore"):  # (the overflow is the case)
        *_, ctx = reference.forward("rnn_relu", x, h0, None, w_ih, w_hh, None, None, None,
                                    lengths, reverse)
        want = reference.backward(ctx, dy)[3]["weight_hh"]
    *_, ctx = functional.forward("rnn_relu", x[:2, -1:], h0[:1], None, w_ih, w_hh, None, None,
                                 None, None, reverse, isa=isa)
    alone = functional.backward(ctx, dy[:2, -1:])[3]["weight_hh"]
    assert not np.isnan(want).any()
    np.testing.assert_array_equal(got, want)
    if B == 1:
        np.testing.assert_array_equal(got, alone)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("B", [1, 3])
def test_padding_keeps_non_finite_gradients_where_torch_has_them(rng, isa, reverse, B):
    """Past a row's length dG is 0, so dx there is 0 even where W_ih holds an infinity (it was
    0 * inf = NaN), and an infinite dhn of a row that finished early reaches dW_hr as inf, not
    NaN (its carried gradient met the zeros saved for the projection). As the reference, and
    torch's PackedSequence."""
    T, I, H, P = 4, 3, 5, 2
    case = make_case(rng, "lstm", proj=P, T=T, B=B, I=I, H=H)
    lengths = np.full(B, T)
    lengths[-1] = 1  # (one step: its dhn's infinity reaches dW_hr as one product, inf not NaN)
    padding = np.arange(T)[:, None] >= lengths[None, :]

    def both(w, dhn):
        args = (case["x"], case["h0"], case["c0"], w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"],
                w["w_hr"], lengths, reverse)
        *_, ctx = functional.forward("lstm", *args, isa=isa)
        got = functional.backward(ctx, case["dy"], dhn, case["dcn"])
        with np.errstate(invalid="ignore", over="ignore"):  # (non-finite values are the case)
            *_, ctx = reference.forward("lstm", *args)
            want = reference.backward(ctx, case["dy"], dhn, case["dcn"])
        return got, want

    def assert_same_pattern(g, r, name):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(r), err_msg=f"{name} NaN")
        np.testing.assert_array_equal(np.isinf(g), np.isinf(r), err_msg=f"{name} inf")

    w = dict(case["w"], w_ih=case["w"]["w_ih"].copy())
    w["w_ih"][0, 0] = np.inf
    got, want = both(w, case["dhn"])
    assert not got[0][padding].any()
    assert_same_pattern(got[0], want[0], "dx")
    dhn = case["dhn"].copy()
    dhn[-1, 0] = np.inf
    got, want = both(case["w"], dhn)
    assert np.isinf(want[3]["weight_hr"]).any()
    assert_same_pattern(got[3]["weight_hr"], want[3]["weight_hr"], "weight_hr")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("lbr", [True, False], ids=["lbr", "nolbr"])
def test_an_infinite_dh_makes_the_grus_gate_gradients_nan_as_torchs(isa, dtype, lbr):
    """The GRU's d n = dh (1 - z) is dh - dh z, as torch's autograd takes it from h' = n + z (h -
    n): where dh is infinite it is NaN, and so are d r and every element of that row's dx, as in
    torch.nn (dh * (1 - z) kept +-inf, and dx had +-inf wherever the gates' infinities, through
    W_ih, shared a sign)."""
    # (seed 11: there dh * (1 - z) gave dx[2, 0] some -inf, in both GRU variants)
    case = make_case(np.random.default_rng(11), "gru", T=4, B=2, I=3, H=4)
    case["dy"] = case["dy"].copy()
    case["dy"][2, 0, 1] = np.inf
    with np.errstate(invalid="ignore", over="ignore"):  # (the infinity is the case)
        _, want = run_reference(case, linear_before_reset=lbr)
    _, got = run_kernels(case, dtype, isa, linear_before_reset=lbr)
    assert np.isnan(got["dx"][2, 0]).all() and np.isfinite(got["dx"][3]).all()
    for name, r in want.items():
        np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(r), err_msg=f"{name} NaN")
        np.testing.assert_array_equal(np.isinf(got[name]), np.isinf(r), err_msg=f"{name} inf")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cell,lbr", [("rnn_tanh", True), ("lstm", True), ("gru", True),
                                      ("gru", False)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("B,threads", [(1, 1), (2, 1), (2, 2), (13, 2)])
def test_a_finished_rows_gradient_passes_an_infinite_w_hh_untouched(fixed_threads, isa, cell,
                                                                     lbr, reverse, B, threads):
    """A row that finished early passes its gradient through the steps past its length, where
    the step's product added 0 W_hh to it: NaN from an infinity in W_hh, which then reached the
    row's valid steps (its dx, dh0 and every weight's gradient). The reference, as torch's
    PackedSequence, never runs those steps. Team paths included (2 threads)."""
    rng = np.random.default_rng(3)
    T, I, H = 3, 2, 3
    case = make_case(rng, cell, T=T, B=B, I=I, H=H)
    w = dict(case["w"], w_hh=case["w"]["w_hh"].copy())
    w["w_hh"][0, 0] = np.inf
    h0 = np.abs(case["h0"]) + 0.1  # (no h of 0: 0 * inf in the forward too)
    lengths = np.full(B, T)
    lengths[0] = 1
    args = (case["x"], h0, case["c0"], w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], None,
            lengths, reverse, lbr)
    before = fusedrnn.get_num_threads()
    fusedrnn.set_num_threads(threads)
    try:
        *_, ctx = functional.forward(cell, *args, isa=isa)
        dx, dh0, dc0, grads = functional.backward(ctx, case["dy"], case["dhn"], case["dcn"])
    finally:
        fusedrnn.set_num_threads(before)
    with np.errstate(invalid="ignore", over="ignore"):  # (the infinity is the case)
        *_, ctx = reference.forward(cell, *args)
        want = reference.backward(ctx, case["dy"], case["dhn"], case["dcn"])
    got = [dx, dh0, dc0, *grads.values()]
    names = ["dx", "dh0", "dc0", *grads]
    assert np.isfinite(want[0][:, 0]).all()  # the finished row's dx: finite in the reference
    for name, g, r in zip(names, got, [*want[:3], *want[3].values()]):
        if r is None:
            continue
        np.testing.assert_array_equal(np.isnan(g), np.isnan(r), err_msg=f"{name} NaN")
        finite = np.isfinite(r)
        assert_close(np.where(finite, g, 0), np.where(finite, r, 0), np.float64, what=name)
