"""The torch adapter (fusedrnn.torch) against torch.nn and against fusedrnn's NumPy layers on
the benchmark's configs: what a PyTorch user who swaps the adapter in gets, and what its glue
(autograd's graph and gradient accumulation, the Python around the kernels) costs over the NumPy
API that the main benchmark (python -m fusedrnn.bench) times. The three run the same weights
and inputs, as the benchmark's peers do (inference under torch.inference_mode, training as
forward plus autograd.backward(y, dy) with gradients set to None first; the NumPy layers frozen
in inference), timed in interleaved blocks (fusedrnn.bench.timing). Needs torch. Not a test:
run it and read it.

    python bench/adapter_vs_torch.py [--configs online-small,long-seq,stacked,fastrnns]
                                     [--cells lstm,gru] [--modes infer,train] [--threads 1]
"""
import argparse

import numpy as np
import torch

import fusedrnn
import fusedrnn.torch as ft
from fusedrnn.bench import cases, check, timing
from fusedrnn.bench.peers.ours import FusedrnnPeer
from fusedrnn.bench.peers.torch_nn import TorchRunner

ADAPTER = {"LSTM": ft.LSTM, "GRU": ft.GRU, "RNN_TANH": ft.RNN, "RNN_RELU": ft.RNN}


def adapter_runner(problem, mode):
    """torch's peer with its module swapped for the adapter (from_module: the same weights)."""
    runner = TorchRunner(torch, problem, mode)
    runner.module = ADAPTER[runner.module.mode].from_module(runner.module)
    return runner


def time_case(config, cell, mode, budget_s):
    problem = cases.make_problem(config, cell)
    runners = {"torch": TorchRunner(torch, problem, mode),
               "fusedrnn.torch": adapter_runner(problem, mode),
               "fusedrnn": FusedrnnPeer().prepare(problem, mode)}
    outs = {name: r.outputs(r()) for name, r in runners.items()}
    for name in ("fusedrnn.torch", "torch"):   # the benchmark's check of a peer's outputs
        agree = check.agreement(outs[name], outs["fusedrnn"])
        if not agree["ok"]:
            raise AssertionError(f"{name} differs from fusedrnn on {config.name} {cell} {mode}: "
                                 f"{agree}")
    timing.warm_up(runners)
    times = timing.interleave(runners, budget_s, min_reps=5, max_reps=400)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="online-small,long-seq,stacked,fastrnns")
    p.add_argument("--cells", default="lstm,gru")
    p.add_argument("--modes", default="infer,train")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=float, default=2.0, help="timed seconds a case (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fusedrnn.set_num_threads(args.threads)
    head = (f"{'config':14s} {'cell':5s} {'mode':6s} {'torch ms':>9s} {'adapter ms':>10s} "
            f"{'numpy ms':>9s} {'adapter vs torch':>16s} {'numpy vs torch':>14s} "
            f"{'glue ms':>8s}")
    print(f"{args.threads} thread(s); torch {torch.__version__}, fusedrnn {fusedrnn.__version__}"
          f"; vs torch: torch ms / that ms; glue: adapter ms - numpy ms", flush=True)
    print(head, flush=True)
    for name in args.configs.split(","):
        for cell in args.cells.split(","):
            for mode in args.modes.split(","):
                t = time_case(cases.CONFIGS[name], cell, mode, args.budget)
                a, n, th = t["fusedrnn.torch"], t["fusedrnn"], t["torch"]
                print(f"{name:14s} {cell:5s} {mode:6s} {th * 1e3:9.3f} {a * 1e3:10.3f} "
                      f"{n * 1e3:9.3f} {'x%.2f' % (th / a):>16s} {'x%.2f' % (th / n):>14s} "
                      f"{(a - n) * 1e3:8.3f}", flush=True)


if __name__ == "__main__":
    main()
