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
                                     [--autocast bfloat16|float16]
                                     [--needs all|data-x|frozen-below|saliency]
                                     [--steps T] [--frozen]

--autocast runs torch.nn and the adapter under ``torch.autocast("cpu", dtype)`` (the NumPy layers
stay float32): torch.nn's low-precision kernels against the adapter's float32 kernels with
rounded outputs. The adapter's outputs are then held to its low-precision tolerance
(tolerances.low_precision_tolerance) against the NumPy layers' float32 ones, and torch.nn's
scaled error beside the adapter's is printed instead of checked: torch.nn rounds every step.
Where torch.nn's kernels fail (its float16 LSTM on a CPU without float16 oneDNN kernels), the
line says so and its row times the other two.

--needs (training) sets which gradients autograd needs, for torch.nn and the adapter alike (the
NumPy layers still compute all): "all" (the benchmark's: the parameters, x and the states),
"data-x" (the parameters only: x and the states are data), "frozen-below" (data x, and only the
last layer trained), "saliency" (x only: every parameter frozen). torch's autograd skips what
is not needed, and so does the adapter (functional.backward's need_dx, need_weight_grads).

--steps T gives every config T time steps (--steps 1: a model served one step a call), and
--frozen runs the adapter frozen in inference (its freeze(): read-only copies of the parameters,
as the NumPy layers run there) instead of reading and comparing its parameters every call.
"""
import dataclasses
import argparse

import numpy as np
import torch

import fusedrnn
import fusedrnn.torch as ft
from fusedrnn.bench import cases, check, timing
from fusedrnn.bench.peers.ours import FusedrnnPeer
from fusedrnn.bench.peers.torch_nn import TorchRunner
from fusedrnn.tolerances import low_precision_tolerance

ADAPTER = {"LSTM": ft.LSTM, "GRU": ft.GRU, "RNN_TANH": ft.RNN, "RNN_RELU": ft.RNN}


# --needs: (x needs grad, which layers are trained: all, the last, none)
NEEDS = {"all": (True, "all"), "data-x": (False, "all"), "frozen-below": (False, "last"),
         "saliency": (True, "none")}


def apply_needs(runner, needs, layers):
    """Sets requires_grad on a torch-side training runner's x, states and parameters."""
    if needs == "all":
        return runner
    x_grad, trained = NEEDS[needs]
    runner.x.requires_grad_(x_grad)
    for t in runner.states:
        t.requires_grad_(False)
    last = f"_l{layers - 1}"
    for name, p in runner.module.named_parameters():
        p.requires_grad_(trained == "all" or (trained == "last" and name.endswith(last)))
    return runner


def adapter_runner(problem, mode, frozen=False):
    """torch's peer with its module swapped for the adapter (from_module: the same weights),
    frozen in inference if asked."""
    runner = TorchRunner(torch, problem, mode)
    runner.module = ADAPTER[runner.module.mode].from_module(runner.module)
    if frozen and mode == "infer":
        runner.module.freeze()
    return runner


class UnderAutocast:
    """A torch runner whose calls run under CPU autocast to `dtype`; its outputs read as float32
    (NumPy has no bfloat16)."""

    def __init__(self, runner, dtype):
        self.runner, self.dtype = runner, dtype

    def __call__(self):
        with torch.autocast("cpu", dtype=self.dtype):
            return self.runner()

    def outputs(self, result):
        y, hn = result
        hn = tuple(h.float() for h in hn) if isinstance(hn, tuple) else hn.float()
        return self.runner.outputs((y.float(), hn))


def check_outputs(outs, autocast, where, partial=False):
    """The benchmark's check of each torch-side runner's outputs against the NumPy layers';
    under autocast the adapter's at its rounding, and torch.nn's errors returned. ``partial``:
    the torch side computes only some gradients (--needs)."""
    if autocast is None:
        for name in ("fusedrnn.torch", "torch"):
            agree = check.agreement(outs[name], outs["fusedrnn"], partial)
            if not agree["ok"]:
                raise AssertionError(f"{name} differs from fusedrnn on {where}: {agree}")
        return None
    dtype_name = str(autocast).replace("torch.", "")
    fwd, grad = check.largest_errors(outs["fusedrnn.torch"], outs["fusedrnn"])
    if not (fwd <= low_precision_tolerance(dtype_name)
            and (grad is None or grad <= low_precision_tolerance(dtype_name, "gradient"))):
        raise AssertionError(f"fusedrnn.torch under autocast differs from fusedrnn on {where}: "
                             f"forward {fwd:.3g}, gradient {grad}")
    torch_errors = None
    if "torch" in outs:
        torch_errors = check.largest_errors(outs["torch"], outs["fusedrnn"])
    return {"adapter": (fwd, grad), "torch": torch_errors}


def time_case(config, cell, mode, budget_s, autocast=None, needs="all", frozen=False):
    problem = cases.make_problem(config, cell)
    runners = {"torch": apply_needs(TorchRunner(torch, problem, mode), needs, config.L),
               "fusedrnn.torch": apply_needs(adapter_runner(problem, mode, frozen), needs,
                                             config.L),
               "fusedrnn": FusedrnnPeer().prepare(problem, mode)}
    outs = {}
    if autocast is not None:
        for name in ("torch", "fusedrnn.torch"):
            runners[name] = UnderAutocast(runners[name], autocast)
        try:
            outs["torch"] = runners["torch"].outputs(runners["torch"]())
        except RuntimeError as e:   # (torch's float16 oneDNN LSTM where the CPU has none)
            print(f"  torch.nn fails on {config.name} {cell} {mode} under autocast: "
                  f"{str(e).splitlines()[0][:90]}", flush=True)
            del runners["torch"]
    outs.update({name: r.outputs(r()) for name, r in runners.items() if name not in outs})
    errors = check_outputs(outs, autocast, f"{config.name} {cell} {mode}", needs != "all")
    timing.warm_up(runners)
    times = timing.interleave(runners, budget_s, min_reps=5, max_reps=400)
    return {name: float(np.median(t)) for name, t in times.items()}, errors


def case_arguments(description, configs):
    """The options this script and bench/packed_vs_torch.py share: which cases, on how many
    threads, timed how long."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--configs", default=configs)
    p.add_argument("--cells", default="lstm,gru")
    p.add_argument("--modes", default="infer,train")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=float, default=2.0, help="timed seconds a case (default 2)")
    return p


def main(argv=None):
    p = case_arguments(__doc__.split("\n\n")[0], "online-small,long-seq,stacked,fastrnns")
    p.add_argument("--autocast", choices=["bfloat16", "float16"], default=None,
                   help="torch.nn and the adapter under CPU autocast to this dtype")
    p.add_argument("--needs", choices=list(NEEDS), default="all",
                   help="training: which gradients autograd needs (default all)")
    p.add_argument("--steps", type=int, default=None,
                   help="time steps T of every config (default: each config's own)")
    p.add_argument("--frozen", action="store_true",
                   help="inference: the adapter frozen (freeze()), as the NumPy layers are")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    if args.needs != "all" and args.modes != "train":
        p.error("--needs is for training: give --modes train")
    autocast = getattr(torch, args.autocast) if args.autocast else None
    torch.set_num_threads(args.threads)
    fusedrnn.set_num_threads(args.threads)
    head = (f"{'config':14s} {'cell':5s} {'mode':6s} {'torch ms':>9s} {'adapter ms':>10s} "
            f"{'numpy ms':>9s} {'adapter vs torch':>16s} {'numpy vs torch':>14s} "
            f"{'glue ms':>8s}")
    if autocast is not None:
        head += f" {'torch err':>15s} {'adapter err':>15s}"
    print(f"{args.threads} thread(s); torch {torch.__version__}, fusedrnn {fusedrnn.__version__}"
          f"; vs torch: torch ms / that ms; glue: adapter ms - numpy ms"
          + (f"; needs {args.needs} (numpy: all)" if args.needs != "all" else "")
          + (f"; T = {args.steps}" if args.steps else "")
          + ("; the adapter frozen in inference" if args.frozen else "")
          + (f"; under autocast to {args.autocast} (numpy: float32); err: largest scaled "
             f"error against numpy's, forward/gradient" if autocast else ""), flush=True)
    print(head, flush=True)
    for name in args.configs.split(","):
        config = cases.CONFIGS[name]
        if args.steps:
            config = dataclasses.replace(config, T=args.steps)
        for cell in args.cells.split(","):
            for mode in args.modes.split(","):
                t, errors = time_case(config, cell, mode, args.budget, autocast, args.needs,
                                      args.frozen)
                a, n, th = t["fusedrnn.torch"], t["fusedrnn"], t.get("torch")
                ratio = (lambda ms: "-" if th is None else "x%.2f" % (th / ms))
                line = (f"{name:14s} {cell:5s} {mode:6s} "
                        f"{'-' if th is None else '%.3f' % (th * 1e3):>9s} {a * 1e3:10.3f} "
                        f"{n * 1e3:9.3f} {ratio(a):>16s} {ratio(n):>14s} {(a - n) * 1e3:8.3f}")
                if errors is not None:
                    line += f" {_pair(errors['torch']):>15s} {_pair(errors['adapter']):>15s}"
                print(line, flush=True)


def _pair(errors):
    if errors is None:
        return "-"
    fwd, grad = errors
    return f"{fwd:.1e}" + ("" if grad is None else f"/{grad:.1e}")


if __name__ == "__main__":
    main()
