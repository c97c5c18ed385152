"""Shapes at the kernels' tile and dispatch edges, one below, at and one above each, for every
ISA this machine runs: the forward and every gradient against the NumPy reference, and the same
bits on one and two threads. The edges are the build's own (a vector's lanes W, a panel's NR = 2W
columns, a row tile's MR rows), so each ISA meets its own: a last unit block of one vector or
less (microkernel.h, first_half), a partial panel, a partial row tile and a 1-3 row one (KSplit);
and the training context's x packed or kept plain (bindings/forward.cpp: packed where that pads
x by a quarter or less)."""
import itertools

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _C

from _kernel_cases import (VARIANTS, assert_matches, make_case, run_kernels, tile_rows,
                           variant_id)

ISAS = list(_C.available_isas())
DTYPES = [np.float32, np.float64]


def lanes(isa, dtype):
    return _C.vector_bytes(isa) // np.dtype(dtype).itemsize


def edges(n):
    return sorted({n - 1, n, n + 1} - {0})


def assert_one_and_two_threads_agree(case, dtype, isa, **kw):
    results = []
    before = fusedrnn.get_num_threads()
    try:
        for n in (1, 2):
            fusedrnn.set_num_threads(n)
            out, grad = run_kernels(case, dtype, isa, **kw)
            results.append({**out, **grad})
    finally:
        fusedrnn.set_num_threads(before)
    for k in results[0]:
        assert np.array_equal(results[0][k], results[1][k]), k


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_hidden_sizes_at_the_vector_and_panel_edges(rng, fixed_threads, isa, dtype, variant):
    """H = W - 1 .. W + 1 and NR - 1 .. NR + 1 (a last unit block of a vector or less, a panel
    short of one unit, one unit past it), B = 13 with lengths (whole and partial row tiles)."""
    cell, lbr, proj = variant
    W = lanes(isa, dtype)
    for H in sorted(set(edges(W) + edges(2 * W))):
        p = min(proj, H - 1)
        if proj and p < 1:
            continue
        case = make_case(rng, cell, p, T=3, B=13, I=6, H=H, lengths=True)
        assert_matches(case, dtype, isa, linear_before_reset=lbr)
        assert_one_and_two_threads_agree(case, dtype, isa, linear_before_reset=lbr)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_batches_at_the_row_tile_edges(rng, fixed_threads, isa, dtype, variant):
    """B = MR - 1 .. MR + 1 and 2 MR - 1 .. 2 MR + 1 (a row tile short of one row, whole tiles,
    a 1-row tile after them), with the projection in the step (H = 32 pads little) and, with
    lengths, before the loop."""
    cell, lbr, proj = variant
    mr = tile_rows(isa)
    for B, lengths in itertools.product(sorted(set(edges(mr) + edges(2 * mr))), (False, True)):
        case = make_case(rng, cell, proj, T=3, B=B, I=9, H=32, lengths=lengths)
        assert_matches(case, dtype, isa, linear_before_reset=lbr)
        assert_one_and_two_threads_agree(case, dtype, isa, linear_before_reset=lbr)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru"])
def test_training_context_x_packed_or_plain_at_its_edge(rng, isa, dtype, cell):
    """The training context keeps x packed for dW_ih where its panels pad x's rows (I values) by
    a quarter or less, else a plain copy: I one below and at each such edge under 2 NR, with and
    without lengths (whose zeroed copy is what is kept), reversed or not."""
    nr = 2 * lanes(isa, dtype)
    first = [I for I in range(2, 2 * nr) if 4 * -(-I // nr) * nr <= 5 * I
             and not 4 * -(-(I - 1) // nr) * nr <= 5 * (I - 1)]
    assert first, nr
    for I, lengths, reverse in itertools.product([i for f in first for i in (f - 1, f)],
                                                 (False, True), (False, True)):
        case = make_case(rng, cell, T=4, B=3, I=I, H=20, lengths=lengths)
        assert_matches(case, dtype, isa, reverse=reverse)


@pytest.mark.skipif("amx" not in ISAS, reason="no AMX here (CPU or OS)")
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("B", [15, 16, 31, 32])
def test_amx_steps_at_their_row_and_work_edges(rng, fixed_threads, variant, B):
    """The amx build's steps take the tiles from 16 rows (small weights) and from T*B = 64 in
    inference, 512 in training (csrc/sequence/amx_step.h): a step fewer, the least steps that
    reach each and a step more, forward and every gradient, on one and two threads."""
    cell, lbr, proj = variant
    for work in (64, 512):
        for T in edges(-(-work // B)):
            case = make_case(rng, cell, proj, T=T, B=B, I=9, H=33)
            assert_matches(case, np.float32, "amx", linear_before_reset=lbr)
            assert_one_and_two_threads_agree(case, np.float32, "amx", linear_before_reset=lbr)
