"""A team's large forward steps hand their unit blocks to whoever is free, and its large backward
steps the column panels of dG W_hh (csrc/sequence/block_queue.h): a member that lags has its
blocks taken over by the others. Who computes a block never changes its bits, so every way must
give the one-thread result, and the reference's within tolerance."""
import numpy as np
import pytest

import fusedrnn
from fusedrnn import _C, functional, reference
from fusedrnn.tolerances import assert_close

needs_threads = pytest.mark.skipif(not _C.openmp, reason="built without OpenMP: one thread only")
# (cell, linear_before_reset, B, H): the one-phase cells, with steps of 1 MFLOP and up
# (B * G * H * H >= 5e5) whose teams split hidden units (B < 2 threads x 2 row tiles on every ISA),
# forward and backward (14 rows in two shares of 7 would end in a 2-row tile on every ISA, so
# the backward's members cannot walk back their rows apart: backward_rows_apart). H = 127 and
# 191: an even number of unit blocks on every ISA and dtype, the last one ragged but two vectors
# wide, so the two members' shares are equal and none hands rows of a block to the other
# (share_boundary_block, which a team with unequal shares takes instead of the queue).
SHARING = [("lstm", True, 14, 127), ("gru", True, 14, 127), ("rnn_tanh", True, 14, 191),
           ("rnn_relu", True, 14, 191)]


@pytest.fixture(autouse=True)
def no_lag_after():
    yield
    _C.set_team_lag_us(0)


def blocks_during(fn):
    before = _C.team_blocks()
    result = fn()
    after = _C.team_blocks()
    return result, {k: after[k] - before[k] for k in after}


def make_case(rng, cell, dtype, T, B, H, I=24):
    w = reference.init_weights(cell, I, H, dtype=dtype, rng=rng)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = rng.uniform(-0.5, 0.5, (B, H)).astype(dtype)
    c0 = rng.uniform(-0.5, 0.5, (B, H)).astype(dtype) if cell == "lstm" else None
    return (cell, x, h0, c0, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])


@needs_threads
@pytest.mark.parametrize("isa", _C.available_isas())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell,lbr,B,H", SHARING)
@pytest.mark.parametrize("lag_us", [0, 200])
@pytest.mark.parametrize("lengths", [False, True])
def test_shared_blocks_give_the_one_thread_bits(two_threads, rng, isa, dtype, cell, lbr, B, H,
                                                lag_us, lengths):
    code = functional.CELL_CODES[cell]
    assert _C.shared_block_rows(code, B, 24, H, H, dtype == np.float64, 2, isa) == 0
    args = make_case(rng, cell, dtype, T=9, B=B, H=H)
    kw = dict(training=True, isa=isa, reverse=lengths)
    if lengths:  # finished rows carry their state block by block, whoever runs the block
        kw["lengths"] = rng.integers(1, 10, B).astype(np.int64)
    fusedrnn.set_num_threads(1)
    alone = functional.forward(*args, **kw)
    fusedrnn.set_num_threads(2)
    _C.set_team_lag_us(lag_us)
    team, blocks = blocks_during(lambda: functional.forward(*args, **kw))
    for a, b in zip(alone[:3], team[:3]):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    unit_block = 2 * _C.vector_bytes(isa) // np.dtype(dtype).itemsize  # Tile::NR
    assert blocks["own"] + blocks["taken_over"] == 9 * -(-H // unit_block)
    if lag_us:  # the lagging member's blocks went to the other
        assert blocks["taken_over"] > 0
    wide = [a.astype(np.float64) if isinstance(a, np.ndarray) else a for a in args]
    want = reference.forward(*wide, lengths=kw.get("lengths"), reverse=lengths)[0]
    assert_close(team[0], want, dtype, "forward", what="y")
    # and backward through what each saved: the team's shares dG W_hh's panels (one product a
    # step: RNN and LSTM)
    dy = rng.standard_normal(team[0].shape).astype(dtype)
    fusedrnn.set_num_threads(1)
    grads_alone = functional.backward(alone[3], dy)
    fusedrnn.set_num_threads(2)
    grads_team, panels = blocks_during(lambda: functional.backward(team[3], dy))
    for a, b in zip(grads_alone[:3], grads_team[:3]):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    for name in grads_alone[3]:
        np.testing.assert_array_equal(grads_alone[3][name], grads_team[3][name], err_msg=name)
    if cell != "gru":
        assert panels["own"] + panels["taken_over"] == 9 * -(-H // unit_block)
        assert panels["taken_over"] > 0 or not lag_us
    else:
        assert panels == {"own": 0, "taken_over": 0}


@needs_threads
@pytest.mark.parametrize("case", ["small steps", "projection", "two-phase gru"])
def test_other_teams_keep_their_own_blocks(two_threads, rng, case):
    cell = "gru" if case == "two-phase gru" else "lstm"
    B, H = (12, 64) if case == "small steps" else (12, 112)  # the rest would share without it
    args = make_case(rng, cell, np.float32, T=6, B=B, H=H)
    kw = {}
    if case == "projection":
        kw["w_hr"] = rng.uniform(-0.3, 0.3, (H // 2, H)).astype(np.float32)
        args = args[:2] + (args[2][:, : H // 2].copy(),) + args[3:5] + (
            rng.uniform(-0.3, 0.3, (4 * H, H // 2)).astype(np.float32),) + args[6:]
    if case == "two-phase gru":
        kw["linear_before_reset"] = False
    _, blocks = blocks_during(lambda: functional.forward(*args, training=False, **kw))
    assert blocks == {"own": 0, "taken_over": 0}


def test_team_lag_is_checked():
    with pytest.raises(ValueError, match="team lag"):
        _C.set_team_lag_us(-1)


@needs_threads
@pytest.mark.parametrize("isa", _C.available_isas())
@pytest.mark.parametrize("I", [8, 1100])
def test_step_split_tells_the_split_a_forward_takes(two_threads, rng, isa, I):
    """_C.step_split counts W_ih in the step's weights (a rows split of this batch needs W_ih and
    W_hh within L2): an Elman RNN of H = 256 and B = 16 splits its rows with I = 8 and its units
    with I = 1100 on a 1 MB L2, and only a units split runs unit blocks (team_blocks). The
    diagnostic used to assume I = 1 and said "rows" for both."""
    H, B = 256, 16
    split = _C.step_split(0, B, I, H, H, threads=2, isa=isa)
    args = make_case(rng, "rnn_tanh", np.float32, T=6, B=B, H=H, I=I)
    _, blocks = blocks_during(lambda: functional.forward(*args, training=False, isa=isa))
    assert (blocks["own"] + blocks["taken_over"] > 0) == (split == "units"), (split, blocks)
    rows_fit = H * (H + I) * 4 <= _C.cache_bytes()["l2"]
    if _C.vector_bytes(isa) == 64 and _C.cache_bytes()["l2"] == 1 << 20:  # (this host)
        assert split == ("rows" if rows_fit else "units") == ("rows" if I == 8 else "units")
