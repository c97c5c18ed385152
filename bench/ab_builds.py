#!/usr/bin/env python
"""A/B two or more builds of the extension in one process, interleaved, for changes under ~10%.

This VM's speed drifts by 10-15% over minutes, so separate runs of two builds cannot settle a
small gain. Here every build's ``_C`` module is loaded side by side (each ``.so`` under its own
module name) and the builds take turns on the same arrays, block after block; min and median
per build come from the same minutes of the machine.

Usage (each folder holds a built fusedrnn package, e.g. a copy of python/fusedrnn with its _C*.so;
fusedrnn itself must be importable, installed or with PYTHONPATH=python):
    python bench/ab_builds.py OLD=/tmp/old/fusedrnn NEW=python/fusedrnn \\
        --configs stacked,fastrnns --cells lstm,gru --threads 1 --mode infer --reps 7
"""
import argparse
import atexit
import glob
import importlib.util
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from fusedrnn.bench.cases import CONFIGS, custom_config  # the DESIGN.md matrix, by name


def config_of(name):
    """A matrix config by name, or a TxBxIxH shape (one layer)."""
    if name in CONFIGS:
        return CONFIGS[name]
    T, B, I, H = (int(v) for v in name.split("x"))
    return custom_config(T, B, I, H, 1)

CELL_CODES = {"rnn_tanh": 0, "rnn_relu": 1, "lstm": 2, "gru": 3}
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def load_extension(package_dir, name):
    found = glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd"))
    if not found:
        sys.exit(f"{package_dir}: no built _C extension there")
    # A private copy: the loader hands out one library per file, and pybind11 refuses to
    # register its types twice (the same build named twice, or the one fusedrnn itself imports).
    folder = tempfile.mkdtemp(prefix=f"ab_{name}_")
    atexit.register(shutil.rmtree, folder, True)
    private = os.path.join(folder, os.path.basename(found[0]))
    shutil.copy(found[0], private)
    spec = importlib.util.spec_from_file_location(f"ab_{name}._C", private)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_layer_problem(config, cell, rng):
    T, B, I, H = config.T, config.B, config.I, config.H
    G = GATES[cell]

    def normal(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    return dict(x=normal(T, B, I), h0=normal(B, H), c0=normal(B, H) if cell == "lstm" else None,
                w_ih=normal(G * H, I), w_hh=normal(G * H, H), b_ih=normal(G * H), b_hh=normal(G * H),
                dy=normal(T, B, H))


def call(ext, cell, p, train, isa, edit=False, reverse=False):
    if edit:  # an optimiser step's in-place change of the weights (negation: exact, cheap)
        for name in ("w_ih", "w_hh"):
            np.negative(p[name], out=p[name])
    # linear_before_reset = True: torch.nn's GRU, as the layers and the benchmark run it (False,
    # ONNX's default, is the two-phase GRU)
    y, hn, cn, ctx = ext.forward(CELL_CODES[cell], True, reverse, train, p["x"], p["h0"], p["c0"],
                                 p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], None, None, isa)
    if train:  # as the layers do (consume=True), where the build has it
        try:
            ext.backward(ctx, p["dy"], None, None, consume=True)
        except TypeError:
            ext.backward(ctx, p["dy"], None, None)


def stack_problem(config, cell, rng):
    """Per-layer lists for a stack of config.L layers (layer k > 0 takes H inputs)."""
    layers = [one_layer_problem(config, cell, rng)]
    above = custom_config(config.T, config.B, config.H, config.H, 1)
    layers += [one_layer_problem(above, cell, rng) for _ in range(config.L - 1)]
    return layers


def call_stack(ext, cell, layers, train, isa):
    """The stack in one forward_stack call (the layers' path), and BPTT down it when training."""
    lists = [[p[name] for p in layers] for name in ("h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")]
    outs = ext.forward_stack(CELL_CODES[cell], True, train, layers[0]["x"], *lists,
                             [None] * len(layers), isa)
    if train:
        d_out = layers[-1]["dy"]
        for _, _, _, ctx in reversed(outs):
            d_out = ext.backward(ctx, d_out, None, None, consume=True)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("builds", nargs="+", help="NAME=PACKAGE_DIR, two or more")
    ap.add_argument("--configs", default="stacked,fastrnns",
                    help="names from DESIGN.md's matrix, or TxBxIxH shapes (e.g. 50x8x256x256)")
    ap.add_argument("--cells", default="lstm,gru",
                    help="from rnn_tanh (or rnn, as python -m fusedrnn.bench names it), "
                         "rnn_relu, lstm, gru")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", choices=["infer", "train"], default="infer")
    ap.add_argument("--reps", type=int, default=7, help="blocks per build (each ~0.2 s)")
    ap.add_argument("--isa", default=None,
                    help="kernels to run (default: the build chosen at import)")
    ap.add_argument("--edit-weights", action="store_true",
                    help="change the weights in place before every call, as a training loop's "
                         "optimiser does (the edit's time counts for every build alike)")
    ap.add_argument("--stack", action="store_true",
                    help="run a config's layers as one stack call (forward_stack), as the layers "
                         "do with num_layers > 1")
    ap.add_argument("--reverse", action="store_true",
                    help="run the layer backwards in time (a bidirectional layer's second half)")
    ap.add_argument("--probe", default=None,
                    help="impose the step team probe's verdict on every build (far_team: a "
                         "team of small steps runs as a team; far_alone: one thread walks), so "
                         "that this VM's core placement does not pick the path; default: "
                         "measured")
    args = ap.parse_args()
    cells = [{"rnn": "rnn_tanh"}.get(c, c) for c in args.cells.split(",")]
    unknown = [c for c in cells if c not in CELL_CODES]
    if unknown:
        ap.error(f"--cells: unknown {', '.join(unknown)} (from {', '.join(CELL_CODES)} or rnn)")
    if args.stack and (args.edit_weights or args.reverse):
        ap.error("--edit-weights and --reverse run one layer (not with --stack)")
    builds = {}
    for spec in args.builds:
        name, _, path = spec.partition("=")
        builds[name] = load_extension(path, name)
        builds[name].set_num_threads(args.threads)
        if args.probe:
            builds[name].set_probe_override(args.probe)
    train = args.mode == "train"
    rng = np.random.default_rng(0)
    for config_name in args.configs.split(","):
        for cell in cells:
            config = config_of(config_name)
            if args.stack:
                layers = stack_problem(config, cell, rng)
                run = lambda ext, edit=False: call_stack(ext, cell, layers, train, args.isa)
            else:
                p = one_layer_problem(config, cell, rng)
                run = lambda ext, edit=False: call(ext, cell, p, train, args.isa, edit,
                                                  args.reverse)
            for ext in builds.values():  # warm-up: packing caches, page faults
                run(ext)
            first = next(iter(builds.values()))
            t0 = time.perf_counter()
            run(first)
            inner = max(1, int(0.2 / (time.perf_counter() - t0)))
            times = {name: [] for name in builds}
            for _ in range(args.reps):
                for name, ext in builds.items():
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        run(ext, args.edit_weights)
                    times[name].append((time.perf_counter() - t0) / inner * 1e3)
            edited = ", weights edited" if args.edit_weights else ""
            stack = f", stack of {config.L}" if args.stack else ""
            print(f"{config_name} {cell} {args.mode}{edited}{stack} t={args.threads}: " + "  ".join(
                f"{name} min {min(t):.3f} med {np.median(t):.3f} ms" for name, t in times.items()),
                flush=True)


if __name__ == "__main__":
    main()
