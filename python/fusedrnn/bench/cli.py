"""``python -m fusedrnn.bench``: arguments, then the run.

    python -m fusedrnn.bench [--quick] [--cells rnn,lstm,gru] [--configs NAMES]
        [--sizes T,B,I,H,L ...] [--bidirectional] [--threads 1,2] [--mode infer,train]
        [--peers torch,onnxruntime,reference] [--json FILE] [--plot FILE] [--memory]

Without options: the full matrix of DESIGN.md (every config x cell x mode x 1 and 2 threads)
against every installed peer. ``--quick``: a subset that shows each regime once, one thread and
shorter timing (with ``--configs`` or ``--sizes``: those cases, with the shorter timing).
``--sizes``: your own shapes (instead of the matrix, or in addition to ``--configs``).
``--bidirectional``: every config with both directions in each layer (named ``<config>-bidir``).
``--memory``: after the timing, the peak memory of one training call (memory.py) for every
config and cell of the plan that runs in train mode.
Exit status 1 when fusedrnn fails its check against the reference in any case, a peer's
full-size outputs disagree with fusedrnn's, a case raises an error (the others still run), or
the --plot file cannot be written.
"""
import argparse
import datetime
import os
import re
import shlex
import sys
import textwrap
import time
import traceback

from .. import _C
from . import cases, machine, memory, outputs, peak, peers, report, targets
from .peers.reference import REFERENCE_MAX_FLOP
from .runner import add_fractions, describe, run_case, say

# Timing per case (timing.interleave): stop after budget_s seconds of timed calls, but time each
# runner at least min_reps and at most max_reps calls.
FULL = {"budget_s": 1.0, "min_reps": 3, "max_reps": 200, "peak_budget_s": 1.0}
QUICK = {"budget_s": 0.15, "min_reps": 3, "max_reps": 50, "peak_budget_s": 0.25}


THREAD_SETTINGS = (
    "per case: fusedrnn.set_num_threads(n); torch.set_num_threads(n); onnxruntime "
    "intra_op_num_threads=n, inter_op_num_threads=1; NumPy's BLAS n threads through "
    "threadpoolctl when installed, else its default")


def _list(kind, choices):
    """argparse type: a comma-separated list of names from ``choices`` (duplicates dropped)."""
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list")
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(map(repr, bad))}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(items))
    parse.__name__ = kind          # argparse names the type in its messages
    return parse


def _threads(text):
    out = []
    for s in text.split(","):
        try:
            n = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"thread counts must be integers, got {s!r}")
        if n < 1:
            raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {n}")
        if n > _C.max_num_threads:
            raise argparse.ArgumentTypeError(
                f"thread counts must be <= {_C.max_num_threads} (fusedrnn's limit), got {n}")
        out.append(n)
    return list(dict.fromkeys(out))


def _sizes(text):
    parts = text.split(",")
    if len(parts) != 5:
        raise argparse.ArgumentTypeError(
            f"sizes must be five integers T,B,I,H,L (steps, batch, input, hidden, layers), "
            f"got {text!r}")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must be integers T,B,I,H,L, got {text!r}")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"every size must be >= 1, got {text!r}")
    return cases.custom_config(*values)


def refuse_negative_sizes(ap, argv):
    """A --sizes value that starts with a minus ("-1,2,3,4,5") reads to argparse as an unknown
    option, and its message named none of it: name the size instead. (Only the values after
    --sizes: another option's "-1" is argparse's to read, and its own message names it.)"""
    in_sizes = False
    for token in argv:
        if token.startswith("--"):
            in_sizes = token == "--sizes"
        elif in_sizes and re.fullmatch(r"-\d[\d,-]*", token):
            ap.error(f"argument --sizes: every size must be >= 1, got {token!r}")


def _peers(text):
    if text.strip() == "none":
        return []
    return _list("peer", peers.PEERS)(text)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, without breaking lines at hyphens (a config name, "online-small", was cut in
    two)."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def parser():
    ap = argparse.ArgumentParser(
        prog="python -m fusedrnn.bench", formatter_class=HelpFormatter,
        description="Time fusedrnn against torch.nn, ONNX Runtime and the NumPy reference on "
                    "its benchmark matrix (or your sizes), checking every case "
                    "against the reference first.")
    ap.add_argument("--quick", action="store_true",
                    help="a representative subset (1 thread, shorter timing): under a minute; with "
                         "--configs or --sizes, those cases with the shorter timing")
    ap.add_argument("--cells", type=_list("cell", cases.CELLS),
                    help=f"cells, comma-separated, from {', '.join(cases.CELLS)} "
                         f"(rnn is the tanh Elman RNN; default: rnn,lstm,gru)")
    ap.add_argument("--configs", type=_list("config", list(cases.CONFIGS)),
                    help=f"configs of the matrix: {', '.join(cases.CONFIGS)} (default: all)")
    ap.add_argument("--sizes", nargs="+", action="extend", type=_sizes, metavar="T,B,I,H,L",
                    help="your own shapes: steps, batch, input, hidden, layers (repeatable)")
    ap.add_argument("--bidirectional", action="store_true",
                    help="every config with both directions in each layer (torch.nn's "
                         "bidirectional=True; named <config>-bidir, outside issue 6's targets)")
    ap.add_argument("--threads", type=_threads,
                    help="thread counts, comma-separated (default: 1,2; --quick: 1)")
    ap.add_argument("--mode", type=_list("mode", cases.MODES),
                    help="infer and/or train (default: both)")
    ap.add_argument("--peers", type=_peers,
                    help=f"peers to time beside fusedrnn, from {', '.join(peers.PEERS)}, or "
                         f"'none' (default: all that are installed)")
    ap.add_argument("--json", metavar="FILE", help="write every figure and the machine to FILE")
    ap.add_argument("--plot", metavar="FILE",
                    help="write a chart of the speed-ups (matplotlib; FILE's extension picks the "
                         "format, .png where it has none)")
    ap.add_argument("--memory", action="store_true",
                    help="after the timing, measure the peak memory of one training call, "
                         "fusedrnn and torch (when selected) each in a fresh process, 1 thread, "
                         "for every config and cell the plan runs in train mode (a few seconds "
                         "each; Linux only). Only the plan's configs: the full matrix measures "
                         "all six, --quick its training subset. python -m fusedrnn.bench.memory "
                         "measures fastrnns alone, or the configs you name")
    return ap


def plan(args):
    """The list of cases the arguments ask for."""
    configs = []
    if args.configs or not args.sizes:
        names = args.configs or list(cases.CONFIGS)
        configs += [cases.CONFIGS[n] for n in names]
    configs += args.sizes or []
    if args.bidirectional:
        configs = [cases.bidirectional(c) for c in configs]
    # --quick alone runs the QUICK subset; with --configs or --sizes it only shortens timing.
    quick_subset = args.quick and not args.sizes and not args.configs
    cells = args.cells or list(cases.DEFAULT_CELLS)
    modes = args.mode or list(cases.MODES)
    threads = args.threads or list(cases.QUICK_THREADS if args.quick else cases.DEFAULT_THREADS)
    return cases.plan(configs, cells, modes, threads, quick_subset=quick_subset)


def runnable(plan_):
    """The cases of ``plan_`` this build runs: a build without OpenMP runs on one thread only, so
    its "t=2" would time t=1."""
    return plan_ if _C.openmp else [c for c in plan_ if c.threads == 1]


def memory_pairs(plan_):
    """(config, cell) of every training case of the plan, once each, in plan order."""
    return list(dict.fromkeys((c.config, c.cell) for c in plan_ if c.mode == "train"))


def run(args, argv):
    """Run the cases; returns the JSON-shaped results."""
    t_start = time.perf_counter()
    settings = QUICK if args.quick else FULL
    plan_ = runnable(plan(args))
    names = list(peers.PEERS) if args.peers is None else args.peers
    ours = peers.fusedrnn_peer()
    others, skipped = peers.load(names)
    data = {
        "schema": 1,
        "command": "python -m fusedrnn.bench" + "".join(f" {shlex.quote(a)}" for a in argv),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "settings": dict(settings, quick=bool(args.quick), threads=THREAD_SETTINGS,
                         reference_max_flop=REFERENCE_MAX_FLOP),
        "peers": {"fusedrnn": ours.version, **{p.name: p.version for p in others}},
        "peers_skipped": skipped,
    }
    data["machine"] = m = machine.facts()
    say(f"fusedrnn {ours.version} on {m['cpu']} ({m['logical_cpus']} CPUs), kernels: {m['isa']}")
    for p in others:
        say(f"peer {p.name}: {p.version}")
    for name, reason in skipped.items():
        say(f"peer {name}: skipped, {reason}")
    if skipped:
        say("(pip install torch==2.13.0 onnx onnxruntime matplotlib threadpoolctl installs every "
            "peer and the plot; in fusedrnn's source tree, pip install \".[bench]\")")
    if not _C.openmp:
        say("fusedrnn was built without OpenMP: every case runs on 1 thread")
    if not names:
        say("peers: none selected (fusedrnn alone)")
    load = m["load_average"]
    threads = sorted({c.threads for c in plan_})
    if load and load[0] > machine.BUSY_LOAD:
        say(f"note: load average {load[0]:.2f} before starting (a 1-minute average: processes "
            f"that ran or still run), so timings may be noisy"
            + (", with several threads most of all" if threads[-1] > 1 else ""))
    if any(n > (os.cpu_count() or 1) for n in threads):
        say(f"note: more threads than the {os.cpu_count()} logical CPUs of this machine")

    peaks = {}
    for n in threads:
        peaks[n] = pk = peak.measure(n, ours.set_threads, settings["peak_budget_s"])
        say(f"GEMM reference rate (best call, one size), {n} thread(s): fusedrnn "
            f"{pk['fusedrnn_gemm']['gflops']:.1f} GFLOP/s, numpy "
            f"{pk['numpy_matmul']['gflops']:.1f} GFLOP/s (measured again at the end)")

    gemm_beside = peak.gemm_beside(min(pk["fusedrnn_gemm"]["size"] for pk in peaks.values()))
    say(f"{len(plan_)} cases")
    records, errors, problem, problem_key = [], [], None, None
    for i, case in enumerate(plan_, 1):
        say(f"[{i}/{len(plan_)}] {case.label}  ({case.config.shape}, "
            f"{case.flops / 1e9:.3g} GFLOP)")
        try:
            key = (case.config, case.cell)
            if key != problem_key:
                problem, problem_key = None, None
                problem, problem_key = cases.make_problem(case.config, case.cell), key
            rec = run_case(case, problem, ours, others, settings["budget_s"],
                           settings["min_reps"], settings["max_reps"], gemm_beside)
        except Exception as e:        # report it and go on with the other cases
            traceback.print_exc(file=sys.stdout)
            errors.append(f"{case.label}: {type(e).__name__}: {e}")
            continue
        say(describe(rec))
        records.append(rec)
    data["gemm_peak"] = {}
    for n in threads:
        data["gemm_peak"][str(n)] = peak.best_of(
            peaks[n], peak.measure(n, ours.set_threads, settings["peak_budget_s"]))
    for rec in records:
        add_fractions(rec, data["gemm_peak"][str(rec["threads"])])
    data["cases"] = records
    if args.memory:
        pairs = memory_pairs(plan_)
        say(f"training peak memory: {len(pairs)} config/cell pairs, one process per peer each")
        data["memory"] = memory.measure_all(
            pairs, [p for p in memory.PEERS if p == "fusedrnn" or p in names], say=say)
    data["errors"] = errors
    data["load_average_at_end"] = machine.load_average()
    data["elapsed_s"] = time.perf_counter() - t_start
    return data


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser()
    refuse_negative_sizes(ap, argv)
    args = ap.parse_args(argv)
    if args.json:
        outputs.check_writable(ap, "--json", args.json)
    plot_file = outputs.plot_path(ap, args.plot, say) if args.plot else None
    if plot_file and args.peers == []:
        say("note: --plot with --peers none: there will be no speed-ups to plot")
    planned = plan(args)
    if planned and not runnable(planned):
        ap.error(f"--threads {','.join(map(str, args.threads))}: this fusedrnn was built without "
                 "OpenMP (show_config(): openmp False) and runs on one thread only; use "
                 "--threads 1")
    if not planned:
        ap.error("no case matches these options (--quick's subset: "
                 + "; ".join(f"{n}: {','.join(c)} {','.join(m)}" for n, c, m in cases.QUICK) + ")")
    data = run(args, argv)
    say("")
    say(report.text_table(data))
    say("")
    if data.get("memory"):
        say(report.memory_text(data["memory"]))
        say("")
    for line in report.summary(data) + report.peak_lines(data):
        say(line)
    for line in targets.target_lines(data):
        say(f"target: {line}")
    for line in report.notes(data):
        say(line)
    if args.json:
        report.write_json(data, args.json)
        say(f"wrote {args.json}")
    plotted = True
    if plot_file:
        try:
            if report.plot(data, plot_file):
                say(f"wrote {plot_file}")
            else:
                say("plot: skipped, no peer was timed")
        except Exception as e:  # (a format whose backend needs more, .pgf's LaTeX, say)
            plotted = False
            say(f"PLOT NOT WRITTEN: {plot_file}: {type(e).__name__}: {e}")
    say(f"done in {data['elapsed_s']:.1f} s")
    ok = (plotted and not data["errors"] and all(rec["check"]["ok"] for rec in data["cases"])
          and not report.disagreements(data))
    return 0 if ok else 1
