"""Packed sequences (a batch of several lengths) against torch.nn: what a PyTorch user who feeds
``pack_padded_sequence`` batches gets from the adapter (fusedrnn.torch) and from the NumPy layers
(``lengths=``). The benchmark's matrix (python -m fusedrnn.bench) runs every row to T; here each
row's length is drawn from T/2..T (the longest T), in random batch order, packed with
``enforce_sorted=False`` as torch.nn users usually do. The three run the same weights and inputs,
timed in interleaved blocks (fusedrnn.bench.timing); inference under torch.inference_mode (the
NumPy layers frozen), training as forward plus the backward of sum(y * dy) over the rows'
outputs. Every output and gradient is checked against torch.nn's first. torch.nn's and the
adapter's times include torch's pack_padded_sequence and pad_packed_sequence (and, training,
their backward: tens of ms at fastrnns' size), which the NumPy layers' lengths= needs none of.
Needs torch. Not a test: run it and read it.

    python bench/packed_vs_torch.py [--configs stacked,fastrnns] [--cells lstm,gru]
                                    [--modes infer,train] [--threads 1] [--budget 2]
"""
import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedrnn
import fusedrnn.torch as ft
from fusedrnn.bench import cases, timing
from fusedrnn.tolerances import max_scaled_error

from adapter_vs_torch import case_arguments  # (bench/, beside this script)

MODULES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
# Agreement with torch.nn: float32 outputs and gradients, scaled by each array's largest value
# (the benchmark's own check holds both libraries to its tolerances against float64; here the
# two float32 libraries only need to agree as two correct ones do).
AGREE = 1e-4


def make_case(config, cell, rng):
    T, B, I, H, L = config.T, config.B, config.I, config.H, config.L
    module = getattr(torch.nn, MODULES[cell])(I, H, num_layers=L)
    x = torch.from_numpy(rng.standard_normal((T, B, I)).astype(np.float32))
    lengths = rng.integers(max(1, T // 2), T + 1, size=B)
    lengths[rng.integers(B)] = T
    dy = torch.from_numpy(rng.standard_normal((T, B, H)).astype(np.float32))
    mask = torch.from_numpy(np.arange(T)[:, None] < lengths[None, :]).unsqueeze(-1)
    return module, x, torch.from_numpy(lengths), dy * mask


def runners(config, cell, mode, rng):
    """name -> zero-argument call returning (y padded, gradients or None)."""
    module, x, lengths, dy = make_case(config, cell, rng)
    adapter = getattr(ft, MODULES[cell]).from_module(module)
    layer = getattr(fusedrnn, MODULES[cell])(config.I, config.H, num_layers=config.L)
    layer.load_state_dict({k: v.detach().numpy() for k, v in module.state_dict().items()})
    T = config.T

    def torch_side(m):
        def call():
            if mode == "infer":
                with torch.inference_mode():
                    out = m(pack_padded_sequence(x, lengths, enforce_sorted=False))[0]
                return pad_packed_sequence(out, total_length=T)[0].numpy(), None
            m.zero_grad(set_to_none=True)
            xg = x.clone().requires_grad_(True)
            out = m(pack_padded_sequence(xg, lengths, enforce_sorted=False))[0]
            y = pad_packed_sequence(out, total_length=T)[0]
            (y * dy).sum().backward()
            grads = [xg.grad.numpy()] + [p.grad.numpy() for p in m.parameters()]
            return y.detach().numpy(), grads
        return call

    x_np, lengths_np, dy_np = x.numpy(), lengths.numpy(), dy.numpy()
    if mode == "infer":
        layer.freeze()

        def numpy_side():
            return layer(x_np, lengths=lengths_np)[0], None
    else:
        def numpy_side():
            layer.zero_grad()
            y = layer(x_np, lengths=lengths_np)[0]
            dx = layer.backward(dy_np)[0]
            return y, [dx] + [layer.grads[name] for name, _ in module.named_parameters()]
    return {"torch": torch_side(module), "fusedrnn.torch": torch_side(adapter),
            "fusedrnn": numpy_side}


def check(results, where):
    y_ref, g_ref = results["torch"]
    for name in ("fusedrnn.torch", "fusedrnn"):
        y, g = results[name]
        errors = [max_scaled_error(y, y_ref)] + [max_scaled_error(a, b)
                                                 for a, b in zip(g or [], g_ref or [])]
        if max(errors) > AGREE:
            raise AssertionError(f"{name} differs from torch.nn on {where}: {max(errors):.2e}")


def main(argv=None):
    args = case_arguments(__doc__.split("\n\n")[0], "stacked,fastrnns").parse_args(argv)
    torch.set_num_threads(args.threads)
    fusedrnn.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{args.threads} thread(s); torch {torch.__version__}, fusedrnn {fusedrnn.__version__}; "
          f"lengths from T/2..T, shuffled; vs torch: torch ms / that ms", flush=True)
    print(f"{'config':14s} {'cell':5s} {'mode':6s} {'torch ms':>9s} {'adapter ms':>10s} "
          f"{'numpy ms':>9s} {'adapter vs torch':>16s} {'numpy vs torch':>14s}", flush=True)
    for name in args.configs.split(","):
        config = cases.CONFIGS[name]
        for cell in args.cells.split(","):
            for mode in args.modes.split(","):
                calls = runners(config, cell, mode, rng)
                check({k: f() for k, f in calls.items()}, f"{name} {cell} {mode}")
                timing.warm_up(calls)
                times = timing.interleave(calls, args.budget, min_reps=5, max_reps=400)
                th, a, n = (float(np.median(times[k])) for k in ("torch", "fusedrnn.torch",
                                                                  "fusedrnn"))
                print(f"{name:14s} {cell:5s} {mode:6s} {th * 1e3:9.3f} {a * 1e3:10.3f} "
                      f"{n * 1e3:9.3f} {'x%.2f' % (th / a):>16s} {'x%.2f' % (th / n):>14s}",
                      flush=True)


if __name__ == "__main__":
    main()
