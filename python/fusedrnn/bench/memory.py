"""Peak memory of one training call (forward, then backward of y with the upstream gradient dy:
no loss tensor on either side, torch's ``autograd.backward(y, dy)``), fusedrnn beside torch.nn,
and the analytic size of what BPTT has to keep.

    python -m fusedrnn.bench.memory [--configs fastrnns] [--sizes T,B,I,H,L ...]
        [--cells rnn,lstm,gru] [--peers torch|none] [--json FILE]

Method (Linux only; elsewhere every result says "not available on this OS"): each measurement
runs in a fresh Python process, so nothing another peer or an earlier case allocated is resident.
The child builds the case's arrays, prepares the peer's training runner (peers/ours.py,
peers/torch_nn.py), makes one training call on a tiny problem of the same cell (one-off library
initialisation is not the model's memory), returns free heap pages to the OS, reads VmRSS from
/proc/self/status, resets the high-water mark (``5`` into /proc/self/clear_refs), makes ONE
training call of the real problem and reads VmHWM. Peak extra = VmHWM - VmRSS(before): everything
the call had resident at its worst moment beyond the model, its input and dy. One thread.
Then the child drops the outputs and gradients, returns free heap to the OS and reads VmRSS
again: "kept" (``resident_after_bytes``), what the library holds between calls.

fusedrnn keeps a bounded cache of freed large blocks (csrc/workspace.cpp, up to 1 GiB) and of
the packed weights of inference and frozen calls (up to 256 MiB per thread), both resident
between calls; later calls reuse them instead of growing. A fresh process measures the first
call, which allocates all of it: the honest peak.

What BPTT needs (``needed_bytes``) is fusedrnn's saved state (csrc/kernel_api.h SavedState,
allocated in csrc/bindings/forward.cpp), per layer: h for T+1 steps (B x H), LSTM c for T+1 steps,
the activated gates T x B x G*H (LSTM, GRU; the Elman RNN's derivative comes from h itself), GRU
W_hn h + b_hn T x B x H, and the input of every layer after the first (dW_ih needs it). The input
x, and the outputs y, dx and the weight gradients, are reported apart: any implementation has them.
The child drops fusedrnn's gradient arrays before the call (the runner's ``drop_gradients``:
``zero_grad(set_to_none=True)`` and no spare arrays), so the backward makes new ones and they
count in the call's peak as torch's .grad tensors do, which its runner sets to None. (Earlier
the child made them with np.zeros before the call and the call zeroed them, but calloc could
hand back pages already resident, and the peak then left the gradients out: stacked LSTM
16.5 MiB without them, 20.5 with.)

What fusedrnn holds beyond that at its peak (accounts for the measured figures to a few MiB):
- x in each training context, packed as the backward's dW_ih = dG^T X reads it (csrc/gemm/gemm.h
  pack_b_gemm; the size of x, T x B x I, where I is near a multiple of the panels' width; else a
  plain copy): the caller may reuse x's buffer before backward, and the backward then packs
  nothing of x;
- the forward's input projection gx, T x B x G*H (csrc/sequence/forward.h), for reversed or
  variable-length runs (the RNN otherwise writes it into y, LSTM and GRU where their gates are
  saved, or compute it inside the steps);
- in the backward (csrc/sequence/backward.h) dGx, T x B x G*H, for the RNN, reversed runs,
  and callers that keep the context (the layers' backward consumes it: dGx then overwrites the
  saved gates step by step, and the torch-style GRU's recurrent dn, else apart, T x B x H, its
  saved W_hn h + b_hn), plus, for reversed runs, a dGh of that size in step order where the
  context is kept (consumed, it overwrites the saved gates, which lie in step order); the
  layers drop each layer direction's saved state once its backward has run; the
  whole-sequence products pack their B operand (h, W_ih) 4 MiB at a time
  (csrc/gemm/gemm.h gemm), or, on AMX tiles, split it a K block of 32 panels at a time (3 MiB
  at most, csrc/gemm/gemm_amx.h);
- the packed W_ih / W_hh panels of the call (a training call packs its own every call, freed
  as it ends: an optimiser changes the weights between calls; on AMX tiles the step's weights
  split into 6 bytes a weight, and the input projection splits W_ih as it lies), and the freed
  blocks that the kernels keep for the next call (csrc/workspace.cpp; a request takes a block
  of its size class, else the smallest of up to twice that).
"""
import argparse
import gc
import json
import os
import sys
from dataclasses import asdict

from . import cases

MiB = 1 << 20
PEERS = ("fusedrnn", "torch")
DEFAULT_CONFIGS = ("fastrnns",)
THREADS = 1
TIMEOUT_S = 600
WARM_UP = dict(T=3, B=2, I=8, H=8)      # the tiny problem that pays for library initialisation
NOT_ON_THIS_OS = "not available on this OS (needs Linux's /proc/self/status and clear_refs)"
METHOD = ("peak extra resident memory (VmHWM - VmRSS before) of one training call, forward + "
          "backward of y with gradient dy, in a fresh process after a warm-up call on a tiny "
          "problem; 1 thread. kept: extra resident memory after the call, its outputs and "
          "gradients freed and free heap returned to the OS")


# -- what BPTT needs, analytically

def needed_bytes(config, cell, itemsize=4):
    """Bytes of the training call's buffers: "saved" is what BPTT must keep (see the module
    docstring); "x" is the input, "y", "dx" and "weight_grads" the outputs. A bidirectional
    config's directions each keep their states and gates; a layer's input, kept for dW_ih, is
    one for both."""
    c, G, D = config, cases.GATES[cell], config.D
    T, B, H = c.T, c.B, c.H
    saved = weight_grads = 0
    for k in range(c.L):
        I_k = c.I if k == 0 else D * H
        per_direction = (T + 1) * B * H                    # h, with h0
        if cell == "lstm":
            per_direction += (T + 1) * B * H               # c, with c0
        if G > 1:
            per_direction += T * B * G * H                 # activated gates
        if cell == "gru":
            per_direction += T * B * H                     # W_hn h + b_hn
        saved += D * per_direction
        if k > 0:
            saved += T * B * I_k                           # this layer's input, for dW_ih
        weight_grads += D * (G * H * (I_k + H) + 2 * G * H)
    sizes = {"saved": saved, "x": T * B * c.I, "y": T * B * D * H, "dx": T * B * c.I,
             "weight_grads": weight_grads}
    return {k: v * itemsize for k, v in sizes.items()}


# -- the measurement, parent side

def unavailable_reason():
    """None where the method works, else why not."""
    if not sys.platform.startswith("linux"):
        return NOT_ON_THIS_OS
    readable = os.access("/proc/self/status", os.R_OK)
    if not (readable and os.access("/proc/self/clear_refs", os.W_OK)):
        return NOT_ON_THIS_OS
    return None


def _child_env():
    """The parent's environment, with this very fusedrnn first on the path and one thread."""
    import fusedrnn
    root = os.path.dirname(os.path.dirname(os.path.abspath(fusedrnn.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    env["OMP_NUM_THREADS"] = str(THREADS)       # no thread pool wider than the run uses
    return env


def measure(config, cell, peer, timeout_s=TIMEOUT_S):
    """One peer, one (config, cell), in a fresh process. Returns {"peak_extra_bytes",
    "resident_after_bytes", "rss_before_bytes", "version"} or {"unavailable": reason}."""
    import subprocess
    reason = unavailable_reason()
    if reason:
        return {"unavailable": reason}
    spec = json.dumps({"peer": peer, "cell": cell, "config": asdict(config)})
    code = ("import sys; from fusedrnn.bench.memory import child_main; "
            "sys.exit(child_main(sys.argv[1]))")
    try:
        done = subprocess.run([sys.executable, "-c", code, spec], env=_child_env(),
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"unavailable": f"failed: no result within {timeout_s} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"unavailable": f"failed (exit status {done.returncode}): {last}"}
    return json.loads(lines[-1])


def measure_all(pairs, peers=PEERS, say=print):
    """Every (config, cell) of ``pairs`` for every peer; returns the JSON-shaped results."""
    reason = unavailable_reason()
    out = {"method": METHOD, "threads": THREADS, "available": reason is None,
           "reason": reason, "records": []}
    if reason:
        say(f"memory: {reason}")
        return out
    for config, cell in pairs:
        rec = {"config": config.name, "cell": cell, "T": config.T, "B": config.B,
               "I": config.I, "H": config.H, "L": config.L,
               "needed_bytes": needed_bytes(config, cell), "peak_extra_bytes": {},
               "resident_after_bytes": {}, "not_measured": {}, "versions": {}}
        for peer in peers:
            got = measure(config, cell, peer)
            if "unavailable" in got:
                rec["not_measured"][peer] = got["unavailable"]
                say(f"memory {config.name} {cell} {peer}: not measured, {got['unavailable']}")
                continue
            rec["peak_extra_bytes"][peer] = got["peak_extra_bytes"]
            rec["resident_after_bytes"][peer] = got["resident_after_bytes"]
            rec["versions"][peer] = got["version"]
            say(f"memory {config.name} {cell} {peer}: peak extra "
                f"{got['peak_extra_bytes'] / MiB:.1f} MiB, kept after the call "
                f"{got['resident_after_bytes'] / MiB:.1f} MiB")
        out["records"].append(rec)
    return out


# -- the measurement, child side

def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                value, unit = line.split(":", 1)[1].split()
                if unit != "kB":
                    raise RuntimeError(f"unexpected unit in /proc/self/status: {line!r}")
                return int(value) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _release_free_heap():
    """Free memory glibc still holds is resident yet reusable: give it back, or the call
    could reuse it unseen."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):     # not glibc: its free pages stay, slightly under-counting
        pass


def _load_peer(name):
    from . import peers
    if name == "fusedrnn":
        return peers.fusedrnn_peer(), None
    loaded, skipped = peers.load([name])
    return (loaded[0], None) if loaded else (None, skipped[name])


def child_main(spec_json):
    """Runs in the fresh process: prints one line of JSON (the result) and returns 0."""
    spec = json.loads(spec_json)
    config, cell = cases.Config(**spec["config"]), spec["cell"]
    peer, why_not = _load_peer(spec["peer"])
    if peer is None:
        print(json.dumps({"unavailable": why_not}))
        return 0
    peer.set_threads(THREADS)
    problem = cases.make_problem(config, cell)
    run = peer.prepare(problem, "train")
    tiny = cases.Config("warm-up", L=config.L, D=config.D, **WARM_UP)
    warm = peer.prepare(cases.make_problem(tiny, cell), "train")
    warm()
    del warm
    if hasattr(run, "drop_gradients"):  # the call's gradients count, as torch's .grad = None
        run.drop_gradients()
    _release_free_heap()
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                      # VmHWM := VmRSS now
    result = run()
    peak = _status_bytes("VmHWM")
    # What stays resident once the caller drops the outputs and gradients: fusedrnn keeps its
    # freed blocks for the next call (csrc/workspace.cpp), torch gives its memory back, so the
    # peak is fusedrnn's footprint between calls too, not torch's.
    del result
    if hasattr(run, "drop_gradients"):    # (peers/stack.py's gradients went with the result)
        run.drop_gradients()
    _release_free_heap()
    kept = _status_bytes("VmRSS") - before
    print(json.dumps({"peak_extra_bytes": peak - before, "resident_after_bytes": kept,
                      "rss_before_bytes": before, "version": peer.version}))
    return 0


# -- the command line

def parser():
    from .cli import HelpFormatter, _list, _sizes      # the benchmark's own argument types
    ap = argparse.ArgumentParser(
        prog="python -m fusedrnn.bench.memory", formatter_class=HelpFormatter,
        description="Peak extra memory of one training call, fusedrnn beside torch.nn, each "
                    "in a fresh process, with what BPTT needs (Linux).")
    ap.add_argument("--configs", type=_list("config", list(cases.CONFIGS)),
                    help=f"configs of the matrix: {', '.join(cases.CONFIGS)} "
                         f"(default: {','.join(DEFAULT_CONFIGS)} unless --sizes is given)")
    ap.add_argument("--sizes", nargs="+", action="extend", type=_sizes, metavar="T,B,I,H,L",
                    help="your own shapes: steps, batch, input, hidden, layers (repeatable)")
    ap.add_argument("--cells", type=_list("cell", cases.CELLS),
                    help=f"cells from {', '.join(cases.CELLS)} (default: rnn,lstm,gru)")
    ap.add_argument("--peers", choices=("torch", "none"), default="torch",
                    help="measure torch.nn beside fusedrnn (default), or fusedrnn alone")
    ap.add_argument("--json", metavar="FILE", help="write the results to FILE")
    return ap


def main(argv=None):
    from . import outputs, report
    from .cli import refuse_negative_sizes
    ap = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    refuse_negative_sizes(ap, argv)
    args = ap.parse_args(argv)
    if args.json:
        outputs.check_writable(ap, "--json", args.json)
    configs = [cases.CONFIGS[n] for n in (args.configs or
                                          ([] if args.sizes else DEFAULT_CONFIGS))]
    configs += args.sizes or []
    cells = args.cells or list(cases.DEFAULT_CELLS)
    peers = ("fusedrnn",) if args.peers == "none" else PEERS
    data = measure_all([(c, cell) for c in configs for cell in cells], peers)
    print()
    print(report.memory_text(data))
    if args.json:
        report.write_json(data, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
