"""One case from start to finish: check, warm up, compare, time, summarise.

``run_case`` prints its progress (flushed) and returns the case's record for the JSON:
the check against the reference, each peer's agreement with fusedrnn, the timings, GFLOP/s,
the speed-ups (peer time / fusedrnn time) and, with threads, how far apart the cores were
before and after timing (``barrier_ns``), and the rate of our GEMM timed beside the case in the
same minutes (``gemm_beside``). A case on several threads also times fusedrnn on one thread
in the same rounds (``one_thread``): this VM's speed drifts by 10-40% over minutes, so the
2-thread scaling taken from the separate 1-thread case measures the minutes as much as the
threads (fastrnns GRU inference: x1.64 from separate cases, x2.03 interleaved, the same build).
``add_fractions`` adds the fractions of the GEMM peaks once the run has measured them, and of
``gemm_beside``.
"""
import sys
import traceback

from . import check, timing
from .machine import blas_threads
from .report import fmt_ms


def say(*parts):
    print(*parts, flush=True)


def _errors(verdict):
    """"fwd 1.2e-06, grad 3.4e-05" of a check's verdict (no gradients in inference), and the
    outputs only one side had."""
    grad = verdict["gradient_error"]
    unmatched = verdict.get("unmatched")
    return (f"fwd {verdict['forward_error']:.1e}" + ("" if grad is None else f", grad {grad:.1e}")
            + (f"; outputs on one side only: {', '.join(unmatched)}" if unmatched else ""))


def _prepare(peer, problem, case):
    """A runner, or (None, reason) when the peer sits this case out or fails to build it."""
    if case.mode not in peer.modes:
        return None, f"{case.mode} not supported"
    reason = peer.skip_reason(case)
    if reason:
        return None, reason
    try:
        return peer.prepare(problem, case.mode), None
    except Exception as e:          # a peer that cannot run this case must not stop the rest
        return None, f"failed to build: {type(e).__name__}: {e}"


GEMM_BESIDE = "gemm beside"
ONE_THREAD = "fusedrnn on 1 thread"


def on_one_thread(runner, set_threads, threads):
    """The runner on one thread, the case's thread count restored after each call."""
    def call():
        set_threads(1)
        try:
            return runner()
        finally:
            set_threads(threads)
    return call


def run_case(case, problem, ours, peers, budget_s, min_reps, max_reps, gemm=None):
    """gemm: (call, flops) of our GEMM (peak.gemm_beside), timed once a round beside the case."""
    c = case.config
    record = {"config": c.name, "cell": case.cell, "mode": case.mode, "threads": case.threads,
              "T": c.T, "B": c.B, "I": c.I, "H": c.H, "L": c.L, "flops": case.flops,
              "fusedrnn_path": ours.path(problem, case.mode),
              "results": {}, "skipped": {}, "agreement": {}}
    for peer in [ours, *peers]:
        peer.set_threads(case.threads)
    with blas_threads(case.threads):
        record["check"] = chk = check.against_reference(ours, problem, case.mode)
        full = chk["full_rows"]
        say(f"    check vs {chk['against']} at T={chk['T']} B={chk['B']}: {_errors(chk)}; at "
            f"full size on rows {full['rows']}: {_errors(full)} (tolerance "
            f"x{check.PEER_FACTOR}) -> {'ok' if chk['ok'] else 'FAILED'}")

        runners = {"fusedrnn": ours.prepare(problem, case.mode)}
        for peer in peers:
            runner, reason = _prepare(peer, problem, case)
            if runner is None:
                record["skipped"][peer.name] = reason
            else:
                runners[peer.name] = runner

        # Warm-up: one call each, whose outputs are compared with fusedrnn's.
        ours_out = runners["fusedrnn"].outputs(runners["fusedrnn"]())
        for name in list(runners)[1:]:
            try:
                out = runners[name].outputs(runners[name]())
            except Exception as e:
                traceback.print_exc(file=sys.stdout)
                record["skipped"][name] = f"failed to run: {type(e).__name__}: {e}"
                del runners[name]
                continue
            agree = record["agreement"][name] = check.agreement(out, ours_out)
            if not agree["ok"]:
                say(f"    DISAGREE: {name} differs from fusedrnn: {_errors(agree)} (timed, "
                    f"but left out of the summary; the run will exit 1)")

        far_before = timing.team_barrier_ns() if case.threads > 1 else None
        beside = {GEMM_BESIDE: gemm[0]} if gemm else None
        timed = dict(runners)
        if case.threads > 1:   # the budget grows with it: the peers keep their share
            timed[ONE_THREAD] = on_one_thread(ours.prepare(problem, case.mode), ours.set_threads,
                                              case.threads)
            budget_s *= len(timed) / len(runners)
        timing.warm_up(timed)
        times = timing.interleave(timed, budget_s, min_reps, max_reps, beside=beside)
        one_thread_s = times.pop(ONE_THREAD, None)
        times = timing.settle_close_calls(runners, times, beside=beside)
        gemm_s = times.pop(GEMM_BESIDE, None)
        if case.threads > 1:
            record["barrier_ns"] = [far_before, timing.team_barrier_ns()]

    if one_thread_s:
        record["one_thread"] = dict(timing.summary(one_thread_s), times_s=one_thread_s)
    if gemm_s:
        beside_summary = timing.summary(gemm_s)
        record["gemm_beside"] = dict(beside_summary,
                                     gflops=gemm[1] / beside_summary["median_s"] / 1e9)
    base = timing.summary(times["fusedrnn"])["median_s"]
    for name, seconds in times.items():
        r = timing.summary(seconds)
        r["gflops"] = case.flops / r["median_s"] / 1e9
        if name != "fusedrnn":
            r["speedup"] = r["median_s"] / base
        r["times_s"] = seconds
        record["results"][name] = r
    return record


def add_fractions(record, peaks):
    """r["fraction_of_peak"]: GFLOP/s over each GEMM peak at the case's thread count, and over
    the median rate of our GEMM beside the case ("fusedrnn_gemm_beside") where it was timed."""
    for r in record["results"].values():
        r["fraction_of_peak"] = {k: r["gflops"] / v["gflops"] for k, v in peaks.items()}
        if "gemm_beside" in record:
            r["fraction_of_peak"]["fusedrnn_gemm_beside"] = (
                r["gflops"] / record["gemm_beside"]["gflops"])


def describe(record):
    """One progress line with the figures of a finished case."""
    res = record["results"]
    ours = res["fusedrnn"]
    parts = [f"fusedrnn {fmt_ms(ours['median_s'])} ms ({ours['gflops']:.3g} GFLOP/s, "
             f"{ours['reps']} reps)"]
    for name, r in res.items():
        if name != "fusedrnn":
            parts.append(f"{name} {fmt_ms(r['median_s'])} ms (x{r['speedup']:.2f})")
    for name, reason in record["skipped"].items():
        parts.append(f"{name} skipped: {reason}")
    if "one_thread" in record:
        one = record["one_thread"]["median_s"]
        parts.append(f"fusedrnn on 1 thread {fmt_ms(one)} ms "
                     f"({record['threads']} threads x{one / ours['median_s']:.2f})")
    if "gemm_beside" in record:
        parts.append(f"our GEMM beside {record['gemm_beside']['gflops']:.3g} GFLOP/s")
    return "    " + "; ".join(parts)
