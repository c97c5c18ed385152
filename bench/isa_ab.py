#!/usr/bin/env python
"""Two ISAs of this build against torch.nn over the whole benchmark matrix, interleaved.

Which build a CPU with AMX should run by default (csrc/dispatch.cpp) is settled here: the tiles
and the AVX-512 kernels are timed in turns with torch.nn on the same arrays, so every round sees
the same minutes of the machine, and the matrix is swept again and again, so the cases see its
quiet and its busy minutes. Each case run is a JSON line (--out, appended); --summary reads one
such file and prints, per case, how often and by how much the first ISA beat the second and each
one's speed-up on torch.nn, split into rounds where torch ran within 15% of its best ("quiet")
and the others ("busy").

    PYTHONPATH=python python bench/isa_ab.py --out /tmp/isa.jsonl --sweeps 5
    python bench/isa_ab.py --summary /tmp/isa.jsonl
"""
import argparse
import collections
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ab_builds  # noqa: E402  (the kernel calls of the build A/B)

CELLS = ("rnn", "lstm", "gru")   # the benchmark's names ("rnn": tanh)
THREADS = (1, 2)
ROUNDS = 5


def kernel_layers(problem):
    """The benchmark's Problem as bench/ab_builds.py's per-layer dicts: each layer's weights and
    initial states, x on the first, dy on the last."""
    layers = [dict(w, h0=problem.h0[k], c0=None if problem.c0 is None else problem.c0[k])
              for k, w in enumerate(problem.layers)]
    layers[0]["x"], layers[-1]["dy"] = problem.x, problem.dy
    return layers


def sweep(ext, torch_peer, isas, configs, out, index):
    """One pass over the configs: per case, ROUNDS rounds of each ISA's and torch's block."""
    from fusedrnn.bench.cases import make_problem
    for config in configs:
        for cell in CELLS:
            problem = make_problem(config, cell, seed=index)
            kernel_cell, layers = problem.kernel_cell, kernel_layers(problem)
            for mode in ("infer", "train"):
                train = mode == "train"
                for threads in THREADS:
                    ext.set_num_threads(threads)
                    torch_peer.set_threads(threads)
                    if config.L > 1:
                        def ours(isa):
                            ab_builds.call_stack(ext, kernel_cell, layers, train, isa)
                    else:
                        def ours(isa):
                            ab_builds.call(ext, kernel_cell, layers[0], train, isa)
                    runs = {isa: (lambda isa=isa: ours(isa)) for isa in isas}
                    runs["torch"] = torch_peer.prepare(problem, mode)
                    for run in runs.values():   # warm-up: packing caches, page faults
                        run()
                    t0 = time.perf_counter()
                    runs["torch"]()
                    inner = max(1, int(0.1 / (time.perf_counter() - t0)))
                    names, rows = list(runs), []
                    for r in range(ROUNDS):   # each round in another order
                        row = {}
                        for name in names[r % 3:] + names[:r % 3]:
                            t0 = time.perf_counter()
                            for _ in range(inner):
                                runs[name]()
                            row[name] = (time.perf_counter() - t0) / inner * 1e3
                        rows.append(row)
                    rec = dict(sweep=index, time=time.time(), config=config.name, cell=kernel_cell,
                               mode=mode, threads=threads, rows=rows)
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    med = {n: np.median([row[n] for row in rows]) for n in names}
                    print(f"sweep {index} {config.name} {kernel_cell} {mode} t={threads}: "
                          + "  ".join(f"{n} {med[n]:.3f} ms" for n in names), flush=True)


def geomean(values):
    return float(np.exp(np.mean(np.log(values))))


def summary(path):
    recs = [json.loads(line) for line in open(path)]
    a, b = [k for k in recs[0]["rows"][0] if k != "torch"]
    cases = collections.defaultdict(list)
    for rec in recs:
        cases[(rec["config"], rec["cell"], rec["mode"], rec["threads"])].extend(rec["rows"])
    print(f"{len(recs)} case runs of {len(cases)} cases, {path}")
    print(f"{'case':34s} {'rounds':>6s} {a + ' faster':>11s} {b + '/' + a:>11s} "
          f"{'torch/' + a:>11s} {'torch/' + b:>11s} {'quiet ' + b + '/' + a:>17s} "
          f"{'busy ' + b + '/' + a:>17s}")
    per_case = []
    for key, rows in cases.items():
        t = np.array([[row[a], row[b], row["torch"]] for row in rows])
        ratio = t[:, 1] / t[:, 0]
        quiet = t[:, 2] <= 1.15 * t[:, 2].min()
        ta, tb = np.median(t[:, 2] / t[:, 0]), np.median(t[:, 2] / t[:, 1])
        per_case.append((np.median(ratio), ta, tb))
        q = f"x{np.median(ratio[quiet]):.2f} ({quiet.sum()})"
        busy = f"x{np.median(ratio[~quiet]):.2f} ({(~quiet).sum()})" if (~quiet).any() else "-"
        print(f"{' '.join(map(str, key)):34s} {len(rows):6d} {np.mean(ratio > 1):11.0%} "
              f"{'x%.2f' % np.median(ratio):>11s} {'x%.2f' % ta:>11s} {'x%.2f' % tb:>11s} "
              f"{q:>17s} {busy:>17s}")
    r, ta, tb = (np.array(v) for v in zip(*per_case))
    print(f"geomean over cases: {b}/{a} x{geomean(r):.3f}; torch/{a} x{geomean(ta):.3f}, "
          f"torch/{b} x{geomean(tb):.3f}")
    print(f"cases {a} beats {b} (median): {int((r > 1).sum())} of {len(r)}; slower than torch.nn "
          f"(median): {a} {int((ta < 1).sum())}, {b} {int((tb < 1).sum())}")
    for index in sorted({rec["sweep"] for rec in recs}):
        these = [rec for rec in recs if rec["sweep"] == index]
        med = lambda x, y: [np.median([row[x] / row[y] for row in rec["rows"]]) for rec in these]
        span = "-".join(time.strftime("%H:%M", time.gmtime(these[i]["time"])) for i in (0, -1))
        print(f"  sweep {index} ({span} UTC, {len(these)} cases): {b}/{a} "
              f"x{geomean(med(b, a)):.3f}; slower than torch.nn: {a} "
              f"{sum(v < 1 for v in med('torch', a))}, {b} {sum(v < 1 for v in med('torch', b))}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--isas", default="amx,avx512", help="the two ISAs to compare, a,b")
    ap.add_argument("--sweeps", type=int, default=1, help="passes over the matrix (~5 min each)")
    ap.add_argument("--configs", help="matrix configs to run, a,b (default: all of DESIGN.md's)")
    ap.add_argument("--out", help="JSON lines to append the case runs to")
    ap.add_argument("--summary", metavar="JSONL", help="summarise a file of case runs instead")
    args = ap.parse_args()
    if args.summary:
        return summary(args.summary)
    if not args.out:
        ap.error("--out is needed to run (or --summary to read a run)")
    from fusedrnn import _C
    from fusedrnn.bench.peers.torch_nn import TorchPeer
    from fusedrnn.bench.cases import CONFIGS, MATRIX
    configs = MATRIX if not args.configs else [CONFIGS[c] for c in args.configs.split(",")]
    isas = args.isas.split(",")
    missing = [i for i in isas if i not in _C.available_isas()]
    if len(isas) != 2 or missing:
        ap.error(f"--isas takes two of {', '.join(_C.available_isas())}, got {args.isas}")
    with open(args.out, "a") as out:
        for index in range(args.sweeps):
            sweep(_C, TorchPeer(), isas, configs, out, index)


if __name__ == "__main__":
    main()
