"""Round-robin timing: one repetition of every runner in turn, until a time budget is spent.

Interleaving means a slow phase of the machine (another process, a frequency change) hits every
peer alike instead of whichever was being timed then. The starting runner rotates each round.
The garbage collector is paused while timing, as ``timeit`` does.
"""
import gc
import statistics
import time


def interleave(runners, budget_s, min_reps=3, max_reps=200):
    """Time each runner (name -> zero-argument callable). Returns name -> list of seconds.

    Runs at least ``min_reps`` rounds and stops once ``budget_s`` seconds of timed calls have
    passed (or after ``max_reps`` rounds).
    """
    names = list(runners)
    times = {name: [] for name in names}
    spent = 0.0
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(max_reps):
            if rep >= min_reps and spent >= budget_s:
                break
            k = rep % len(names) if names else 0
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                runners[name]()
                dt = time.perf_counter() - t0
                times[name].append(dt)
                spent += dt
    finally:
        if was_enabled:
            gc.enable()
    return times


def summary(seconds):
    """Median, min, max and count of a list of timings."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds),
            "max_s": max(seconds), "reps": len(seconds)}
