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
import ab_builds  # noqa: E402  (the problems and calls of the build A/B)

CELLS = ("rnn_tanh", "lstm", "gru")
THREADS = (1, 2)
ROUNDS = 5


def torch_runner(torch, config, cell, layers, train):
    """torch.nn's module with the same weights: inference_mode, or forward and backward(dy)."""
    cls = {"rnn_tanh": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
    m = cls(config.I, config.H, num_layers=config.L)
    with torch.no_grad():
        for k, p in enumerate(layers):
            for ours, theirs in (("w_ih", "weight_ih"), ("w_hh", "weight_hh"),
                                 ("b_ih", "bias_ih"), ("b_hh", "bias_hh")):
                getattr(m, f"{theirs}_l{k}").copy_(torch.from_numpy(p[ours]))
    x, dy = torch.from_numpy(layers[0]["x"]), torch.from_numpy(layers[-1]["dy"])
    if not train:
        m.eval()

        def run():
            with torch.inference_mode():
                m(x)
        return run
    x = x.clone().requires_grad_(True)

    def run():
        m.zero_grad(set_to_none=True)
        x.grad = None
        m(x)[0].backward(dy)
    return run


def sweep(ext, torch, isas, configs, out, index):
    rng = np.random.default_rng(index)
    for config in configs:
        for cell in CELLS:
            layers = ab_builds.stack_problem(config, cell, rng)
            for train in (False, True):
                for threads in THREADS:
                    ext.set_num_threads(threads)
                    torch.set_num_threads(threads)
                    if config.L > 1:
                        def ours(isa):
                            ab_builds.call_stack(ext, cell, layers, train, isa)
                    else:
                        def ours(isa):
                            ab_builds.call(ext, cell, layers[0], train, isa)
                    runs = {isa: (lambda isa=isa: ours(isa)) for isa in isas}
                    runs["torch"] = torch_runner(torch, config, cell, layers, train)
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
                    rec = dict(sweep=index, time=time.time(), config=config.name, cell=cell,
                               mode="train" if train else "infer", threads=threads, rows=rows)
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    med = {n: np.median([row[n] for row in rows]) for n in names}
                    print(f"sweep {index} {config.name} {cell} {rec['mode']} t={threads}: "
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
    import torch
    from fusedrnn import _C
    from fusedrnn.bench.cases import CONFIGS, MATRIX
    configs = MATRIX if not args.configs else [CONFIGS[c] for c in args.configs.split(",")]
    isas = args.isas.split(",")
    missing = [i for i in isas if i not in _C.available_isas()]
    if len(isas) != 2 or missing:
        ap.error(f"--isas takes two of {', '.join(_C.available_isas())}, got {args.isas}")
    with open(args.out, "a") as out:
        for index in range(args.sweeps):
            sweep(_C, torch, isas, configs, out, index)


if __name__ == "__main__":
    main()
