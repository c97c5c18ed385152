"""Timing in interleaved blocks: every runner in turn runs a short block of consecutive calls,
round after round, until a time budget is spent.

Why blocks and not one call each in turn: the peers keep thread pools that spin for a while after
a call (OpenMP in torch and in fusedrnn, ONNX Runtime's own pool). A call made right after another
library's call shares the two cores with that library's spinning workers, which measured up to 2x
slower on this machine for sub-millisecond cases, and hurts whoever is timed second. So each block
starts with one untimed call that absorbs the previous runner's spin, then times consecutive calls,
as an application calling one library in a loop sees it. One call is not always enough: ONNX
Runtime's pool keeps a whole core busy for ~60 ms after its last call (process CPU time over
20 ms windows while sleeping: 1.0, 1.2, 1.0, then 0.0 cores), which made the next runner's first
three or four 15 ms calls twice as slow (stacked LSTM, 2 threads: 28-32 ms, against 15 alone). So
before a runner's block the process first waits, untimed, until no thread of it is busy
(wait_until_idle). Rounds still interleave, so a slow phase of the machine (another process, a
frequency change) hits every peer alike; the starting runner rotates each round. The garbage
collector is paused while timing, as ``timeit`` does.
"""
import gc
import statistics
import time

BLOCK_S = 0.05   # timed seconds per runner per block

IDLE_WINDOW_S = 0.005   # the process counts as idle after a window of this
IDLE_CORES = 0.2        # ... in which its threads used under this many cores of CPU time
IDLE_WAIT_MAX_S = 0.5   # a process that never idles (a peer's pool spinning for good) times anyway


def wait_until_idle(window_s=IDLE_WINDOW_S, idle_cores=IDLE_CORES, max_s=IDLE_WAIT_MAX_S):
    """Sleeps until this process's threads (other libraries' pools spinning after their last
    call) have been idle for a window, or max_s has passed. Returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_s:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        time.sleep(window_s)
        if time.process_time() - cpu0 < idle_cores * (time.perf_counter() - wall0):
            break
    return time.perf_counter() - start


# Untimed calls each runner makes before the first timed round: a library's first calls in a
# process run slow for a while (torch's fastrnns RNN, 1 thread, in the benchmark: its first
# three timed calls 59-63 ms, then 53-55, after one untimed call each; in one full run the first
# three were 92-95 ms, which made its median 92 and our speed-up x1.95 instead of about x1.1).
WARMUP_S = 0.2      # calls go on until this much time has passed ...
WARMUP_CALLS = 2    # ... and at least this many calls were made


def warm_up(runners, warmup_s=WARMUP_S, min_calls=WARMUP_CALLS):
    """Runs each runner untimed, one after the other (waiting for the previous one's threads
    to idle), until ``warmup_s`` seconds and ``min_calls`` calls. Returns name -> calls made."""
    made = {}
    for name, call in runners.items():
        if len(runners) > 1:
            wait_until_idle()
        start, n = time.perf_counter(), 0
        while n < min_calls or time.perf_counter() - start < warmup_s:
            call()
            n += 1
        made[name] = n
    return made


def interleave(runners, budget_s, min_reps=3, max_reps=200, block_s=BLOCK_S, beside=None):
    """Time each runner (name -> zero-argument callable). Returns name -> list of seconds.

    Each runner gets at least ``min_reps`` timed calls and at most ``max_reps``; timing stops once
    ``budget_s`` seconds of timed calls have passed and every runner has ``min_reps``.
    ``beside`` (name -> callable): timed once at the start of every round, after one untimed
    call, outside the budget (the GEMM whose rate in the same minutes the case's rate is
    compared with).
    """
    names = list(runners)
    beside = beside or {}
    times = {name: [] for name in [*names, *beside]}
    spent = 0.0
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rnd in range(max_reps):
            done = all(len(times[n]) >= max_reps for n in names)
            enough = all(len(times[n]) >= min_reps for n in names) and spent >= budget_s
            if done or enough or not names:
                break
            for name, call in beside.items():
                wait_until_idle()
                # One untimed call first, as every runner's block begins: timed cold, right
                # after a big case's calls, the GEMM ran 15-37% slow, which inflated %gemm.
                # Not the best of a few calls: the cases' figure is a median, so is this one's.
                call()
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
            k = rnd % len(names)
            for name in names[k:] + names[:k]:
                if len(times[name]) >= max_reps:
                    continue
                if len(names) > 1:
                    wait_until_idle()    # the previous runner's threads stop spinning
                runners[name]()          # untimed: wakes this runner's threads, warms its caches
                last = min(times[name][-3:]) if times[name] else block_s
                count = max(1, min(int(block_s / max(last, 1e-9)), max_reps - len(times[name])))
                for _ in range(count):
                    t0 = time.perf_counter()
                    runners[name]()
                    dt = time.perf_counter() - t0
                    times[name].append(dt)
                    spent += dt
    finally:
        if was_enabled:
            gc.enable()
    return times


# A peer within 5% of fusedrnn's median, either way, is a close call. On the 3 reps the budget
# gives the biggest cases its sign is noise (deepbench LSTM training, the same kernels in three
# runs: 793, 893 and 857 ms against torch's 789-831), so such a case is timed on, interleaved as
# before, until every runner has CLOSE_REPS calls. Both sides get the same extra calls.
CLOSE_RATIO = 1.05
CLOSE_REPS = 9


def is_close_call(times, ours="fusedrnn"):
    base = statistics.median(times[ours])
    return any(1 / CLOSE_RATIO <= statistics.median(v) / base <= CLOSE_RATIO
               for name, v in times.items() if name != ours)


def settle_close_calls(runners, times, ours="fusedrnn", beside=None):
    """``times`` with more interleaved calls of every runner (and of ``beside``, as in
    interleave) when a peer is a close call and some runner has fewer than CLOSE_REPS; else
    ``times`` itself."""
    timed = {name: times[name] for name in runners}
    short = CLOSE_REPS - min(len(v) for v in timed.values())
    if short <= 0 or len(timed) < 2 or not is_close_call(timed, ours):
        return times
    more = interleave(runners, 0.0, min_reps=short, max_reps=short, beside=beside)
    return {name: times.get(name, []) + more[name] for name in more}


def team_barrier_ns():
    """ns per empty meeting of fusedrnn's step team at its current thread count (0 on one
    thread): the least of three runs of 1000 meetings, after a warm-up that wakes the team.
    About 25-60 ns when this VM keeps its two vCPUs close, 165-600 ns when it puts them far
    apart, which slows every 2-thread case that shares data between cores (see report.py)."""
    from .. import _C
    _C.team_barrier_ns(100)
    return min(_C.team_barrier_ns(1000) for _ in range(3))


def summary(seconds):
    """Median, min, max and count of a list of timings."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds),
            "max_s": max(seconds), "reps": len(seconds)}
