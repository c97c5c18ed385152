"""The adaptive thread policy (csrc/team_policy.h): driven with made-up call times, and the
public switch. Results never depend on it: the threads and one thread give the same bits."""
import random

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _C, functional, reference

ALONE_NS = 1000.0


def drive(team_ns, calls=2000, alone_ns=ALONE_NS, seed=0, policy=None):
    """Runs a policy (a new one by default) for `calls` calls; team_ns(i, rnd) gives call i's
    time on the threads. Returns the mean time per call and which calls used the threads."""
    policy = _C.TeamPolicy() if policy is None else policy
    rnd = random.Random(seed)
    total, used = 0.0, []
    for i in range(calls):
        team = policy.choose_team()
        ns = team_ns(i, rnd) if team else alone_ns
        policy.report(team, ns)
        total += ns
        used.append(team)
    return total / calls, used


def test_quiet_machine_runs_alone_once_to_measure():
    mean, used = drive(lambda i, rnd: 600.0 + rnd.random())
    assert used.count(False) == 1 and not used[8]  # the 8th call's report sends the 9th alone
    assert mean < 602


def test_a_short_burst_changes_nothing():
    """Three slow calls in a row (another library's threads still spinning): the median of the
    window stays fast, so nothing runs alone but the one exploring call."""
    mean, used = drive(lambda i, rnd: 6000.0 if 100 <= i < 103 else 600.0)
    assert used.count(False) == 1


def test_a_long_burst_costs_a_few_calls_alone():
    mean, used = drive(lambda i, rnd: 6000.0 if 100 <= i < 108 else 600.0)
    assert 1 < used.count(False) <= 40
    assert all(used[300:])


def test_busy_core_bimodal_team_runs_alone_at_small_cost():
    """Beside a busy process most team calls are fast and some a time slice late: the mean of
    the threads (~5 us) is far worse than alone, though the median is better."""
    mean, used = drive(lambda i, rnd: 630.0 if rnd.random() < 0.7 else 15000.0)
    assert sum(used) < 0.05 * len(used)
    assert mean < 1.15 * ALONE_NS


def test_threads_slow_from_the_start_are_found():
    mean, used = drive(lambda i, rnd: 1270.0)
    assert mean < 1.1 * ALONE_NS
    assert sum(used[1000:]) < 0.25 * 1000


def test_threads_come_back_when_the_machine_quiets():
    policy = _C.TeamPolicy()
    assert not policy.alone
    drive(lambda i, rnd: 1270.0, calls=1000, policy=policy)
    assert policy.alone            # the threads' calls slower than alone: it runs alone
    mean, used = drive(lambda i, rnd: 630.0, calls=1000, policy=policy)
    assert all(used[100:]) and not policy.alone


def test_ties_never_flap_much():
    """Threads as fast as one thread, with noise: either choice is right, but few switches."""
    mean, used = drive(lambda i, rnd: ALONE_NS * (0.95 + 0.1 * rnd.random()))
    switches = sum(a != b for a, b in zip(used, used[1:]))
    assert mean < 1.05 * ALONE_NS and switches < 200


def test_public_switch():
    assert fusedrnn.get_thread_policy() == "fixed" and _C.get_team_mode() == "team"
    try:
        fusedrnn.set_thread_policy("adaptive")
        assert fusedrnn.get_thread_policy() == "adaptive" and _C.get_team_mode() == "adaptive"
        assert fusedrnn._config.config()["thread_policy"] == "adaptive"
        with pytest.raises(ValueError, match="thread policy must be one of"):
            fusedrnn.set_thread_policy("sometimes")
    finally:
        fusedrnn.set_thread_policy("fixed")
    with pytest.raises(ValueError, match="team mode must be"):
        _C.set_team_mode("often")


def test_a_thread_policy_that_is_not_a_name_is_refused_naming_it():
    """An unhashable policy (a list, a dict) met the names' dict first and raised Python's
    "unhashable type: 'list'", naming no argument; the policy stays as it was."""
    for policy in (["fixed"], {"fixed": 1}, None, 1):
        with pytest.raises(TypeError, match="thread policy must be a name"):
            fusedrnn.set_thread_policy(policy)
    assert fusedrnn.get_thread_policy() == "fixed"


def test_environment_variable_sets_the_policy_at_import():
    import subprocess
    import sys
    code = "import fusedrnn; print(fusedrnn.get_thread_policy())"
    for policy in ("adaptive", "fixed"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**__import__("os").environ, "FUSEDRNN_THREAD_POLICY": policy})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == policy


@pytest.mark.parametrize("isa", _C.available_isas())
def test_adaptive_policy_runs_the_kernels_correctly(rng, isa):
    """The whole path with the policy on: many calls of one threaded shape (past the exploring
    call, which runs alone) give the same bits every time. Every build (each compiles
    step_barrier.h: the amx build's ran here only while it was the default)."""
    if not _C.openmp:
        pytest.skip("built without OpenMP: one thread only")
    T, B, I, H = 3, 1, 8, 128
    args = ("lstm", rng.standard_normal((T, B, I)).astype(np.float32),
            np.zeros((B, H), np.float32), np.zeros((B, H), np.float32),
            rng.uniform(-0.1, 0.1, (4 * H, I)).astype(np.float32),
            rng.uniform(-0.1, 0.1, (4 * H, H)).astype(np.float32), None, None)
    before = fusedrnn.get_num_threads()
    try:
        fusedrnn.set_num_threads(2)
        fusedrnn.set_thread_policy("adaptive")
        team0, alone0 = _C.team_policy_calls()
        ys = [functional.forward(*args, training=False, isa=isa)[0] for _ in range(20)]
        team1, alone1 = _C.team_policy_calls()
    finally:
        fusedrnn.set_thread_policy("fixed")
        fusedrnn.set_num_threads(before)
    assert all(np.array_equal(y, ys[0]) for y in ys)
    assert team1 - team0 + alone1 - alone0 == 20 and alone1 - alone0 >= 1  # the exploring call


def test_team_and_alone_give_the_same_bits(rng):
    """An LSTM at B = 1 (a team split by hidden units) forward and backward, on 2 threads and on
    one, as the policy may switch between them."""
    if not _C.openmp:
        pytest.skip("built without OpenMP: one thread only")
    T, B, I, H = 5, 1, 16, 128
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0, c0 = (rng.standard_normal((B, H)).astype(np.float32) for _ in range(2))
    w_ih, w_hh = (rng.uniform(-0.1, 0.1, s).astype(np.float32) for s in ((4 * H, I), (4 * H, H)))
    b_ih, b_hh = (rng.uniform(-0.1, 0.1, 4 * H).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    assert _C.step_split(2, B, I, H, H, threads=2) == "units"
    before = fusedrnn.get_num_threads()
    results = []
    try:
        fusedrnn.set_num_threads(2)
        for mode in ("team", "alone"):
            _C.set_team_mode(mode)
            y, hn, cn, ctx = functional.forward("lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh)
            dx, dh0, dc0, grads = functional.backward(ctx, dy)
            results.append([y, hn, cn, dx, dh0, dc0, *grads.values()])
    finally:
        _C.set_team_mode("team")
        fusedrnn.set_num_threads(before)
    for got, want in zip(results[1], results[0]):
        assert np.array_equal(got, want)


# ----------------------------------------------------------------------------------------------
# The step teams' in-call probe (csrc/sequence/team_probe.h), forward and backward: teams with
# small steps check how far apart the cores are and, if far, time a few steps alone and a few as
# a team before going on the faster way. Every way must give the one thread's bits.

# (cell, linear_before_reset, H): a step of 30-200 KFLOP at B = 1, so it runs on a team and probes.
PROBED = [("rnn_tanh", True, 128), ("rnn_relu", True, 128), ("lstm", True, 64),
          ("gru", True, 80), ("gru", False, 80)]


@pytest.fixture
def probe_verdict():
    """Imposes a probe verdict; a remembered one lasts a minute here, not 500 ms (a loaded
    machine took longer for a test's 17 calls)."""
    before = _C.set_probe_recall_ms(60000)
    yield lambda verdict: _C.set_probe_override(verdict)
    _C.set_probe_override("measured")
    _C.set_probe_recall_ms(before)


@pytest.fixture
def single_rows_ride():
    """A single row rides, on one thread or on a team (csrc/ride_policy.cpp would measure which
    way runs)."""
    _C.set_ride_override("ride")
    yield
    _C.set_ride_override("measured")


@pytest.mark.skipif(not _C.openmp, reason="built without OpenMP: one thread only")
@pytest.mark.parametrize("isa", _C.available_isas())
@pytest.mark.parametrize("verdict", ["far_team", "far_alone", "measured"])
@pytest.mark.parametrize("cell,lbr,H", PROBED)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_probed_team_gives_the_one_thread_bits(fixed_threads, probe_verdict, single_rows_ride,
                                               verdict, cell, lbr, H, dtype, isa):
    code = functional.CELL_CODES[cell]
    assert _C.step_split(code, 1, 8, H, H, dtype == np.float64, 2, isa) == "units"
    rng = np.random.default_rng(7)
    T, I = 73, 8  # T = 1 (mod 12, 6 and 4): the input projection GEMM ends in a 1-row tile
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    w_ih = (0.3 * rng.standard_normal((G * H, I))).astype(dtype)
    w_hh = (0.3 * rng.standard_normal((G * H, H))).astype(dtype)
    b_ih, b_hh = (0.1 * rng.standard_normal((2, G * H))).astype(dtype)
    probe_verdict(verdict)
    # (B = 1 without lengths: on one thread the projection rides along the steps, on the team
    # it is one GEMM; the bits must not tell)
    for B, lengths, training in [(1, None, False), (1, None, True), (1, np.array([53]), True),
                                 (3, np.array([70, 41, 66]), False)]:
        x = rng.standard_normal((T, B, I)).astype(dtype)
        h0 = (0.5 * rng.standard_normal((B, H))).astype(dtype)
        c0 = (0.5 * rng.standard_normal((B, H))).astype(dtype) if cell == "lstm" else None
        dy = rng.standard_normal((T, B, H)).astype(dtype)
        runs = []
        for threads in (1, 2):
            fusedrnn.set_num_threads(threads)
            before = _C.probe_calls()
            y, hn, cn, ctx = functional.forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                lengths=lengths, linear_before_reset=lbr,
                                                training=training, isa=isa)
            after = _C.probe_calls()
            grads = functional.backward(ctx, dy) if training else (None,)
            after_backward = _C.probe_calls()
            runs.append((y, hn, cn, *grads[:3], *(grads[3].values() if training else ())))
        fusedrnn.set_num_threads(2)
        probes = [(before, after)] + ([(after, after_backward)] if training else [])
        for b, a in probes:
            if verdict != "measured":  # the probe ran and took the verdict imposed, or an
                # earlier call's probe of the shape did (a training forward after inference)
                recalled = verdict.replace("far", "recalled")
                assert a[verdict] + a[recalled] == b[verdict] + b[recalled] + 1, (b, a)
            else:
                assert sum(a.values()) == sum(b.values()) + 1, (b, a)
        for one, two in zip(*runs):
            if one is not None:
                np.testing.assert_array_equal(one, two)


@pytest.mark.skipif(not _C.openmp, reason="built without OpenMP: one thread only")
@pytest.mark.parametrize("isa", _C.available_isas())
@pytest.mark.parametrize("cell,lbr,H", PROBED)
@pytest.mark.parametrize("reverse", [False, True])
def test_projection_beside_a_walk_alone_gives_the_one_thread_bits(
        fixed_threads, probe_verdict, single_rows_ride, cell, lbr, H, reverse, isa):
    """A single row's long sequence whose step team was found slower than one thread (the
    probe's verdict, recalled by the next call of the shape) walks alone while the other thread
    computes the input projection 32 steps ahead (csrc/sequence/forward.h
    projection_beside_walk): in inference and in training (Gx in the saved gates; an Elman
    RNN's in y), either direction, the one thread's bits; the probing call does not."""
    rng = np.random.default_rng(11)
    T, I = 130, 8  # 4 chunks of 32 steps and 2
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    w_ih, w_hh = 0.3 * rng.standard_normal((G * H, I)), 0.3 * rng.standard_normal((G * H, H))
    b_ih, b_hh = 0.1 * rng.standard_normal((2, G * H))
    x, dy = rng.standard_normal((T, 1, I)), rng.standard_normal((T, 1, H))
    h0 = 0.5 * rng.standard_normal((1, H))
    c0 = 0.5 * rng.standard_normal((1, H)) if cell == "lstm" else None
    args = [a if a is None else a.astype(np.float32) for a in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)]
    for training in (False, True):
        probe_verdict("far_alone")  # (and forget the verdict inference left for the shape)
        runs = []
        for threads, calls in ((1, 1), (2, 2)):
            fusedrnn.set_num_threads(threads)
            # one thread rides, the team takes one GEMM, which a walk alone can have beside it
            _C.set_ride_override("ride" if threads == 1 else "whole")
            for call in range(calls):
                before = _C.beside_walk_calls()["projection_beside_walk"]
                y, hn, cn, ctx = functional.forward(cell, *args, reverse=reverse,
                                                    linear_before_reset=lbr, training=training,
                                                    isa=isa)
                beside = _C.beside_walk_calls()["projection_beside_walk"] - before
                assert beside == (threads == 2 and call == 1), (threads, call)
            grads = functional.backward(ctx, dy.astype(np.float32)) if training else (None,)
            runs.append((y, hn, cn, *grads[:3], *(grads[3].values() if training else ())))
        for one, two in zip(*runs):
            if one is not None:
                np.testing.assert_array_equal(one, two)


@pytest.mark.skipif(not _C.openmp, reason="built without OpenMP: one thread only")
@pytest.mark.parametrize("isa", _C.available_isas())
@pytest.mark.parametrize("verdict", ["far_team", "far_alone"])
def test_probe_verdicts_are_remembered_for_the_next_calls_of_a_shape(two_threads, probe_verdict,
                                                                       rng, verdict, isa):
    """After a probe finds the cores far apart, the next 15 calls of the shape (forward and
    backward apart) take its verdict without probing, with the same bits; the 16th probes
    again. Another shape probes for itself, and setting the override forgets every verdict.
    Every build (each compiles team_probe.h): the amx build's recalled verdicts ran here only
    while it was the default."""
    cell, lbr, H = PROBED[2]
    T, I = 73, 8  # 16 probe steps: T >= 64
    args = [rng.standard_normal((T, 1, I)), np.zeros((1, H)), np.zeros((1, H)),
            0.3 * rng.standard_normal((4 * H, I)), 0.3 * rng.standard_normal((4 * H, H)),
            None, None]
    other = [a if a is None or a.ndim != 3 else a[:, :, :4] for a in args]
    other[3] = args[3][:, :4]
    recalled = verdict.replace("far", "recalled")
    probe_verdict(verdict)

    def counts(call):
        before = _C.probe_calls()
        out = call()
        after = _C.probe_calls()
        return out, (after[verdict] - before[verdict], after[recalled] - before[recalled])

    def train(a):
        y, hn, cn, ctx = functional.forward(cell, *a, training=True, isa=isa)
        return [y, hn, cn, *functional.backward(ctx, np.ones_like(y))[:3]]

    first, probed = counts(lambda: train(args))
    assert probed == (2, 0)  # forward and backward each probed
    for _ in range(15):
        again, taken = counts(lambda: train(args))
        assert taken == (0, 2)
        for got, want in zip(again, first):
            np.testing.assert_array_equal(got, want)
    assert counts(lambda: train(args))[1] == (2, 0)   # 16th: probes again
    assert counts(lambda: train(other))[1] == (2, 0)  # another shape (I = 4): its own probe
    assert counts(lambda: train(args))[1] == (0, 2)
    probe_verdict(verdict)                             # forgets
    assert counts(lambda: train(args))[1] == (2, 0)
    # and a verdict lasts its time: remembered for no time, the next call probes again
    _C.set_probe_recall_ms(0)
    probe_verdict(verdict)
    assert counts(lambda: train(args))[1] == (2, 0)
    assert counts(lambda: train(args))[1] == (2, 0)


def float32_layer_args(rng, cell, T, B, I, H):
    """functional.forward's arguments for a float32 layer without biases: x, h0, c0 (the
    LSTM's, else None), W_ih, W_hh, b_ih, b_hh."""
    G = reference.gate_count(cell)
    c0 = 0.5 * rng.standard_normal((B, H)) if cell == "lstm" else None
    return [a if a is None else a.astype(np.float32) for a in (
        rng.standard_normal((T, B, I)), 0.5 * rng.standard_normal((B, H)), c0,
        0.3 * rng.standard_normal((G * H, I)), 0.3 * rng.standard_normal((G * H, H)), None, None)]


@pytest.mark.skipif(not _C.openmp, reason="built without OpenMP: one thread only")
@pytest.mark.parametrize("cell,B,H,probes", [
    ("lstm", 3, 100, True),    # 80 KFLOP a row, 240 a step
    ("gru", 13, 100, True),    # 60 KFLOP a row, 780 a step
    ("lstm", 13, 100, False),  # 1.04 MFLOP a step: large teams share their blocks instead
    ("lstm", 1, 256, False),   # 524 KFLOP a row
])
def test_a_team_probes_where_a_rows_step_is_small(two_threads, probe_verdict, rng, cell, B, H,
                                                  probes):
    """A team split by hidden units probes its cores (team_probe.h, probe_steps) where a row's
    step is under 200 KFLOP and the whole step under 1 MFLOP, whatever the batch: each row's
    state crosses between the cores every step. Its verdict (imposed here) gives the one-thread
    bits."""
    T, I = 40, 16
    assert _C.step_split(functional.CELL_CODES[cell], B, I, H, H) == "units"
    args = float32_layer_args(rng, cell, T, B, I, H)
    fusedrnn.set_num_threads(1)
    want = functional.forward(cell, *args)[0]
    fusedrnn.set_num_threads(2)
    probe_verdict("far_alone")
    before = _C.probe_calls()
    got = functional.forward(cell, *args)[0]
    after = _C.probe_calls()
    assert after["far_alone"] - before["far_alone"] == int(probes), (before, after)
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not _C.openmp, reason="built without OpenMP: one thread only")
@pytest.mark.parametrize("verdict", ["far_team", "far_alone"])
def test_riding_trials_take_only_the_calls_that_ran_as_their_key_says(two_threads, probe_verdict,
                                                                       rng, verdict):
    """The riding trial of a single row's team (ride_policy.cpp, RideChoice) takes neither a
    call whose probe timed steps alone and as a team, nor one that walked alone by a recalled
    verdict: that one goes to the shape's one-thread trial. Before, a process's first calls
    often walked alone so, and the team's trial chose from them."""
    cell, lbr, H = PROBED[2]
    T, I = 73, 8
    assert _C.projection_mode(functional.CELL_CODES[cell], 1, I, H, H) == "rides"
    args = float32_layer_args(rng, cell, T, 1, I, H)
    try:
        _C.set_ride_override("measured")  # forgets every trial
        probe_verdict(verdict)
        for _ in range(12):  # the first probes; with far_alone the next 11 walk alone
            functional.forward(cell, *args)
        trials = _C.ride_trials()
        if verdict == "far_alone":  # 11 calls alone: 4 each way decide the one-thread trial
            assert trials == {"alone_on_trial": 0, "team_on_trial": 1, "alone_decided": 1,
                              "team_decided": 0}, trials
        else:  # the 11 recalled calls ran as a team: its trial decided
            assert trials == {"alone_on_trial": 0, "team_on_trial": 0, "alone_decided": 0,
                              "team_decided": 1}, trials
        probe_verdict(verdict)  # forgets the verdict: every call now probes, and none reports
        _C.set_probe_recall_ms(0)
        _C.set_ride_override("measured")
        for _ in range(12):
            functional.forward(cell, *args)
        assert _C.ride_trials() == {"alone_on_trial": 0, "team_on_trial": 1, "alone_decided": 0,
                                    "team_decided": 0}
    finally:
        _C.set_ride_override("measured")


def test_probe_recall_time_is_checked_and_restored():
    before = _C.set_probe_recall_ms(-1)   # the default
    try:
        assert _C.set_probe_recall_ms(1234) == 500
        assert _C.set_probe_recall_ms(-1) == 1234
        with pytest.raises(ValueError, match="at most 3600000 ms"):
            _C.set_probe_recall_ms(3600001)
    finally:
        _C.set_probe_recall_ms(before)


@pytest.mark.parametrize("setter,match", [
    (_C.set_probe_override, "probe verdict must be 'measured', 'far_team' or 'far_alone', got 'close'"),
    (_C.set_ride_override, "ride override must be 'measured', 'whole' or 'ride', got 'close'")])
def test_overrides_refuse_a_name_they_do_not_know(setter, match):
    with pytest.raises(ValueError, match=match):
        setter("close")


def test_team_barrier_ns_times_a_team_only():
    """The benchmark's gauge of how far apart the cores are (_C.team_barrier_ns): zero for one
    thread, which meets nobody; a positive time per meeting for two, and no hang however many
    meetings are asked for."""
    before = fusedrnn.get_num_threads()
    try:
        fusedrnn.set_num_threads(1)
        assert _C.team_barrier_ns() == 0
        fusedrnn.set_num_threads(2)
        assert _C.team_barrier_ns(0) == 0
        ns = _C.team_barrier_ns(2000)
    finally:
        fusedrnn.set_num_threads(before)
    if _C.openmp:
        assert 0 < ns < 1e6  # a meeting, not a stall (25-600 ns on this machine)
    else:
        assert ns == 0
