"""Turn the run's records into something to read: a table, a summary, JSON, a plot, Markdown.

Everything here works from the JSON-shaped dict that ``cli.run`` builds, so a saved results file
can be rendered again without re-running:

    python -m fusedrnn.bench.report bench/results.json bench/RESULTS.md
"""
import argparse
import json
import math
import statistics
import sys

from . import check, timing
from .machine import BUSY_LOAD

PEER_ORDER = ("torch", "onnxruntime", "reference")
DASH = "-"
# An empty 2-thread meeting over this many ns means the machine had put the cores far apart
# (csrc/sequence/team_probe.h uses the same line): 25-60 ns otherwise.
FAR_BARRIER_NS = 100
SCALING_TARGET = 1.8   # issue 6: GEMM-bound cases on 2 threads at least 1.8x the 1-thread speed
GEMM_BOUND = ("fastrnns", "wide", "deepbench-train")


def fmt_ms(seconds):
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def peers_in(data):
    names = {n for rec in data["cases"] for n in rec["results"]} - {"fusedrnn"}
    return [p for p in PEER_ORDER if p in names] + sorted(names - set(PEER_ORDER))


def gemm_fraction(result):
    """A result's rate over our GEMM's in the same minutes (the %gemm column), or over the run's
    best GEMM call where the results file has no GEMM timed beside the case."""
    frac = result["fraction_of_peak"]
    return frac.get("fusedrnn_gemm_beside", frac["fusedrnn_gemm"])


def table_rows(data):
    """(header, rows): one row per case, all cells strings."""
    peers = peers_in(data)
    header = ["thr", "config", "cell", "mode", "fusedrnn ms", "GFLOP/s", "%gemm", "%numpy",
              "check"]
    for p in peers:
        header += [f"{p} ms", f"vs {p}"]
    rows = []
    for rec in data["cases"]:
        ours = rec["results"]["fusedrnn"]
        frac = ours["fraction_of_peak"]
        chk = rec["check"]
        err = max(chk["forward_error"], chk["gradient_error"] or 0.0)
        gemm = gemm_fraction(ours)
        row = [str(rec["threads"]), rec["config"], rec["cell"], rec["mode"],
               fmt_ms(ours["median_s"]), f"{ours['gflops']:.1f}",
               f"{100 * gemm:.0f}%" + ("*" if gemm > 1 else ""),    # over the GEMM: see notes
               f"{100 * frac['numpy_matmul']:.0f}%",
               f"{'ok' if chk['ok'] else 'FAIL'} {err:.0e}"]
        for p in peers:
            r = rec["results"].get(p)
            if r is None:
                row += [DASH, DASH]
                continue
            flag = "" if agrees(rec, p) else " (!)"
            row += [fmt_ms(r["median_s"]), f"x{r['speedup']:.2f}{flag}"]
        rows.append(row)
    return header, rows


def text_table(data):
    header, rows = table_rows(data)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {1, 2, 3}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(data):
    header, rows = table_rows(data)
    align = ["---:" if i not in (1, 2, 3) else ":---" for i in range(len(header))]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, align, *rows])


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def cores_far(rec):
    """The case's barrier_ns (before, after timing) when either shows the cores far apart."""
    ns = rec.get("barrier_ns")
    return ns if ns and max(ns) > FAR_BARRIER_NS else None


def far_note(rec):
    """" (cores far apart: barrier B / A ns)" for a case run so, else "" (also bench/targets.py)."""
    ns = cores_far(rec)
    return f" (cores far apart: barrier {ns[0]:.0f} / {ns[1]:.0f} ns)" if ns else ""


def agrees(rec, peer):
    """Whether the peer's full-size outputs agreed with fusedrnn's in this case."""
    return rec["agreement"].get(peer, {}).get("ok", True)


def disagreements(data):
    """"config cell mode t=N vs peer" of every case where a peer's outputs and fusedrnn's
    differed beyond the check's tolerance or in which outputs they had: one of the two computed
    something else, so its speed-up means nothing (summary() leaves it out, and the run exits
    1)."""
    return [f"{rec['config']} {rec['cell']} {rec['mode']} t={rec['threads']} vs {p}"
            for rec in data["cases"] for p in rec["agreement"] if not agrees(rec, p)]


def comparisons(data):
    """(speed-up, description) of every comparison with a peer that agreed, closest first."""
    return sorted((rec["results"][p]["speedup"],
                   f"{rec['config']} {rec['cell']} {rec['mode']} t={rec['threads']} vs {p}"
                   + far_note(rec))
                  for rec in data["cases"] for p in peers_in(data)
                  if p in rec["results"] and agrees(rec, p))


def slower(data):
    """(speed-up, description) of every comparison fusedrnn loses, worst first."""
    return [c for c in comparisons(data) if c[0] < 1.0]


def scaling(data):
    """(config, cell, mode, 1-thread time / 2-thread time, record at 2 threads, the same ratio
    from the separate 1-thread case or None) of every case run on 2 threads that has a 1-thread
    time, in the run's order. The ratio uses the 1-thread calls timed in the same rounds as the
    2-thread ones (record["one_thread"]) where the run has them, else the separate case's."""
    one = {(r["config"], r["cell"], r["mode"]): r for r in data["cases"] if r["threads"] == 1}
    out = []
    for rec in data["cases"]:
        if rec["threads"] != 2:
            continue
        ours = rec["results"]["fusedrnn"]["median_s"]
        base = one.get((rec["config"], rec["cell"], rec["mode"]))
        separate = base["results"]["fusedrnn"]["median_s"] / ours if base else None
        same_rounds = rec["one_thread"]["median_s"] / ours if "one_thread" in rec else None
        up = same_rounds if same_rounds is not None else separate
        if up is not None:
            out.append((rec["config"], rec["cell"], rec["mode"], up, rec, separate))
    return out


def _measured_how(rows):
    same = sum("one_thread" in r[4] for r in rows)
    if same == len(rows):
        return "1-thread calls timed in the same rounds"
    if same == 0:
        return "from the separate 1-thread cases"
    return f"{same} of {len(rows)} from 1-thread calls in the same rounds, the rest from separate cases"


def scaling_line(data):
    """The 2-thread scaling of the GEMM-bound configs, which issue 6 asks to reach 1.8x."""
    rows = [r for r in scaling(data) if r[0] in GEMM_BOUND]
    if not rows:
        return None
    under = [r for r in rows if r[3] < SCALING_TARGET]
    line = (f"2 threads against 1 (fusedrnn, {_measured_how(rows)}), GEMM-bound configs "
            f"({', '.join(GEMM_BOUND)}): x{min(r[3] for r in rows):.2f} .. "
            f"x{max(r[3] for r in rows):.2f} over {len(rows)} cases; under x{SCALING_TARGET} in "
            f"{len(under)}")
    if under:
        line += ": " + ", ".join(f"{c} {cell} {m} x{up:.2f}{far_note(rec)}"
                                 for c, cell, m, up, rec, _ in under)
    return line


def scaling_markdown(data):
    rows = scaling(data)
    if not rows:
        return []
    out = ["## 2-thread scaling", "",
           "1-thread time / 2-thread time of fusedrnn: \"same rounds\" times fusedrnn on 1 "
           "thread inside the 2-thread case, its blocks taking turns with the 2-thread ones (this "
           "VM's speed drifts by 10-40% over minutes, which the separate cases, minutes apart, "
           "also measure); \"separate cases\" divides the two cases' medians. Barrier ns: how "
           "far apart the cores were during the 2-thread case (an empty meeting, before / after).",
           "", "| config | cell | mode | same rounds | separate cases | barrier ns |",
           "| :--- | :--- | :--- | ---: | ---: | ---: |"]
    for c, cell, m, up, rec, separate in rows:
        ns = rec.get("barrier_ns")
        far = f"{ns[0]:.0f} / {ns[1]:.0f}" + (" far" if cores_far(rec) else "") if ns else DASH
        same = f"x{up:.2f}" if "one_thread" in rec else DASH
        sep = DASH if separate is None else f"x{separate:.2f}"
        out.append(f"| {c} | {cell} | {m} | {same} | {sep} | {far} |")
    return out + [""]


def far_line(data):
    """How many multi-thread cases ran with the cores far apart, or None without such cases."""
    threaded = [rec for rec in data["cases"] if rec.get("barrier_ns")]
    if not threaded:
        return None
    far = [rec for rec in threaded if cores_far(rec)]
    line = (f"cores far apart (an empty {threaded[0]['threads']}-thread barrier over "
            f"{FAR_BARRIER_NS} ns before or after timing, against 25-60 ns otherwise) in "
            f"{len(far)} of {len(threaded)} multi-thread cases")
    if far:
        line += ": " + ", ".join(f"{r['config']} {r['cell']} {r['mode']}" for r in far)
    return line


def isa_line(data):
    """Which kernels fusedrnn ran against the peers' float32 FMA GEMMs: on AMX tiles much of a
    GEMM-bound speed-up is the tiles', which a CPU without AMX does not get."""
    isa = data["machine"]["isa"]
    if isa != "amx":
        line = (f"kernels: fusedrnn ran its {isa} kernels, float32 FMA like the peers' "
                f"(torch's oneDNN/MKL, ONNX Runtime's MLAS, NumPy's BLAS).")
        if "amx" in data["machine"].get("available_isas", ()):
            line += (" This CPU has AMX: FUSEDRNN_ISA=amx runs float32 products on its tiles "
                     "instead (exact, not a bfloat16 mode): faster where a core's tiles are "
                     "its own, not on a VM whose neighbours share them (bench/ISA_AB.md).")
        return line
    return ("kernels: fusedrnn ran its amx kernels, float32 products on AMX tiles via an exact "
            "3-way bfloat16 split of each float (six part products summed in float32: "
            "float32's accuracy, not a bfloat16 mode); torch, ONNX Runtime and NumPy run "
            "AVX-512 float32 FMA. Much of the GEMM-bound configs' speed-up comes from the "
            "tiles and does not carry over to CPUs without AMX; without FUSEDRNN_ISA=amx (the "
            "default kernels) fusedrnn runs AVX-512 FMA too.")


def _by_regime(recs, peer):
    """The geomean per regime: one mean over all pools the GEMM-bound sizes with small-batch
    ones where a peer's per-step overhead (torch's unfused RNN/GRU autograd at B=1: x15-x86)
    dominates, which says little about either."""
    parts = []
    for label, inside in (("GEMM-bound configs", True), ("the other configs", False)):
        ups = [r["results"][peer]["speedup"] for r in recs if (r["config"] in GEMM_BOUND) == inside]
        if ups:
            parts.append(f"{label} x{geomean(ups):.2f} over {len(ups)}")
    return "; " + ", ".join(parts) if len(parts) > 1 else ""


def summary(data):
    """Lines: which kernels ran, geometric-mean speed-up per peer and mode, failed checks,
    errors, busy machine."""
    lines = []
    wrong = disagreements(data)
    if wrong:
        lines.append(f"OUTPUTS DISAGREE (fusedrnn vs a peer at full size, beyond "
                     f"{check.PEER_FACTOR}x the float32 tolerance, or an output one side has "
                     f"and the other has not) in {len(wrong)} comparisons, "
                     f"left out of every figure below: {'; '.join(wrong)}")
    lines.append(isa_line(data))
    load = data["machine"].get("load_average")
    if load and load[0] > BUSY_LOAD:
        several = any(rec["threads"] > 1 for rec in data["cases"])
        lines.append(f"CAUTION: the 1-minute load average was {load[0]:.2f} when the run "
                     f"started: other processes shared the machine or just ran, so these timings"
                     f"{' (with several threads most of all)' if several else ''} may be noisy. "
                     f"Rerun on an idle machine.")
    for p in peers_in(data):
        for mode in ("infer", "train"):
            recs = [rec for rec in data["cases"]
                    if rec["mode"] == mode and p in rec["results"] and agrees(rec, p)]
            ups = [rec["results"][p]["speedup"] for rec in recs]
            if ups:
                lines.append(f"fusedrnn vs {p}, {mode}: geometric-mean speed-up "
                             f"x{geomean(ups):.2f} over {len(ups)} cases, median "
                             f"x{statistics.median(ups):.2f} (range x{min(ups):.2f} .. "
                             f"x{max(ups):.2f}){_by_regime(recs, p)}")
    n = len(comparisons(data))
    lost = slower(data)
    if lost:
        lines.append(f"fusedrnn is slower in {len(lost)} of {n} comparisons; the worst: "
                     + ", ".join(f"{what} x{up:.2f}" for up, what in lost[:8]))
    elif n:
        lines.append(f"fusedrnn is at least as fast as the peer in all {n} comparisons; the "
                     "closest: " + ", ".join(f"{what} x{up:.3f}"
                                            for up, what in comparisons(data)[:4]))
    for extra in (scaling_line(data), far_line(data)):
        if extra:
            lines.append(extra)
    failed = [f"{rec['config']} {rec['cell']} {rec['mode']} t={rec['threads']}"
              for rec in data["cases"] if not rec["check"]["ok"]]
    if failed:
        lines.append(f"CHECK FAILED (fusedrnn vs reference) in: {'; '.join(failed)}")
    crashed = [f"{name} in {rec['config']} {rec['cell']} {rec['mode']} t={rec['threads']}"
               for rec in data["cases"] for name, why in rec.get("skipped", {}).items()
               if why.startswith("failed to run")]
    if crashed:
        lines.append(f"PEER FAILED TO RUN (its traceback is above; not compared, not timed): "
                     f"{'; '.join(crashed)}")
    unbuilt = [f"{name} in {rec['config']} {rec['cell']} {rec['mode']} t={rec['threads']}: "
               f"{why.removeprefix('failed to build: ')}"
               for rec in data["cases"] for name, why in rec.get("skipped", {}).items()
               if why.startswith("failed to build")]
    if unbuilt:
        lines.append(f"PEER FAILED TO BUILD (not compared, not timed): {'; '.join(unbuilt)}")
    for error in data.get("errors", []):
        lines.append(f"ERROR, case not timed: {error}")
    return lines


def shape_label(figure):
    """'MxKxN' of a reference GEMM figure (peak.product_shape), or 'n^3' for results written
    before it had a shape (square then)."""
    if "shape" in figure:
        return "x".join(str(d) for d in figure["shape"])
    return f"{figure['size']}^3"


def peak_lines(data):
    """The GEMM rates the fractions are over. Best call at one size: a reference rate, not the
    machine's peak (on 2 threads the 1024 x 1024 x 1056 product is too small for it, and a case
    beat it)."""
    lines = []
    for n, peak in data["gemm_peak"].items():
        ours, np_ = peak["fusedrnn_gemm"], peak["numpy_matmul"]
        lines.append(f"{n} thread(s), best call at one size (a reference rate, not the "
                     f"machine's peak): fusedrnn GEMM {ours['gflops']:.1f} GFLOP/s "
                     f"({shape_label(ours)}), numpy matmul {np_['gflops']:.1f} GFLOP/s "
                     f"({shape_label(np_)}, threads: {np_.get('threads', '?')}"
                     f"{', in a fresh process' if np_.get('process') == 'fresh' else ''})")
    return lines


def notes(data):
    blas = data["machine"]["numpy_blas"]
    limit = data["settings"]["reference_max_flop"]
    multi_thread = any(rec["threads"] > 1 for rec in data["cases"])
    # (results files from before the full-shape check have no "full_rows")
    full_shape = all("full_rows" in rec["check"] for rec in data["cases"])
    lines = [
        "ms: median wall time of one call (training: forward + backward of y with the "
        "upstream gradient dy, computing dx, dh0 (dc0) and the weight gradients; "
        "fusedrnn's inference runs the layer frozen, freeze(), as ONNX Runtime holds its weights "
        "as constants), "
        "libraries taking turns in blocks; a case where a peer is within 5% of fusedrnn is "
        f"timed on to {timing.CLOSE_REPS} calls each.",
        "GFLOP/s: forward 2*T*B*G*H*(I+H) per layer, training 3x that. %gemm: "
        "that rate as a fraction of our GEMM's median rate in the same minutes (the GEMM of the "
        "peak lines below, at the case's thread count, timed once per round between the case's "
        "blocks, after one untimed call as every library's block: this VM's speed drifts by "
        "10-40% over minutes, and a case against the run's best GEMM minute measures the "
        "minute; * marks a case faster than that GEMM, which says the GEMM's calls were slowed, "
        "by the machine or by the case's calls before them, more than the case's: a measurement "
        "artefact, not a rate over 100%). %numpy: that rate as a fraction of this run's "
        "float32 GEMM rate with numpy's matmul at the same thread count (its BLAS's FMA "
        "sgemm, not a machine peak where fusedrnn runs on AMX tiles) "
        f"(numpy's BLAS: {blas.get('name')} {blas.get('version') or ''}; thread control: "
        f"{blas['thread_control']}).",
        "check: fusedrnn against the float64 NumPy reference on the first "
        "steps and batch rows, with the worst scaled error (forward and gradients)"
        + (f", and at the case's full shape on its first and last batch rows "
           f"({check.PEER_FACTOR}x the tolerance)." if full_shape else "."),
        "vs PEER: peer time / fusedrnn time (above 1: fusedrnn is faster). (!) marks a peer whose "
        "outputs did not agree with fusedrnn's (left out of the summary; the run exits 1).",
        f"{DASH}: not run (onnxruntime is inference only; the NumPy reference, a Python loop "
        f"over time, only runs cases under {limit / 1e9:g} GFLOP; or the peer is not installed).",
    ]
    if multi_thread:
        lines.append(
            "cores far apart: this VM sometimes places its two vCPUs far from each other (a round "
            "trip between them then takes ~300 ns instead of ~50); each core alone runs as fast, "
            "but every exchange between them slows, so 2-thread times of every library get "
            "noisier and fusedrnn's step teams, which meet every step, slow most.")
    return lines


# -- training peak memory (memory.py): data["memory"], or python -m fusedrnn.bench.memory's JSON

def mib(n):
    """Bytes as MiB with one decimal, or the dash for None."""
    return DASH if n is None else f"{n / 2 ** 20:.1f}"


def memory_rows(mem):
    """(header, rows) of the training-memory table, all cells strings."""
    header = ["config", "cell", "needs MiB", "outputs MiB", "fusedrnn MiB", "torch MiB",
              "torch/fusedrnn", "fusedrnn kept MiB", "torch kept MiB"]
    rows = []
    for rec in mem["records"]:
        need = rec["needed_bytes"]
        peak = rec["peak_extra_bytes"]
        kept = rec.get("resident_after_bytes", {})      # absent from older results files
        ours, torch = peak.get("fusedrnn"), peak.get("torch")
        ratio = f"x{torch / ours:.2f}" if ours and torch is not None else DASH
        rows.append([rec["config"], rec["cell"], mib(need["saved"]),
                     mib(need["y"] + need["dx"] + need["weight_grads"]), mib(ours),
                     mib(torch), ratio, mib(kept.get("fusedrnn")), mib(kept.get("torch"))])
    return header, rows


def memory_notes(mem):
    if not mem["available"]:
        return [f"training peak memory: {mem['reason']}"]
    if not mem["records"]:
        return ["training peak memory: the plan has no training case to measure"]
    lines = [
        f"fusedrnn MiB, torch MiB: {mem['method']}.",
        "So the MiB columns are each library's peak during one call, in a fresh process; they "
        "are not its footprint between calls: fusedrnn keeps its freed blocks resident for the "
        "next call (its workspace cache, up to 1 GiB; a second call adds next to nothing), "
        "while torch returns most of its memory (\"kept\" columns).",
        "needs: what BPTT must keep (h and, for LSTM, c for T+1 steps; LSTM/GRU activated "
        "gates; GRU W_hn h + b_hn; the inputs of layers after the first); outputs: y, dx and "
        "the weight gradients. The input x is resident before the call and not counted. What "
        "fusedrnn holds beyond needs + outputs is listed in fusedrnn/bench/memory.py.",
    ]
    for rec in mem["records"]:
        for peer, why in rec["not_measured"].items():
            lines.append(f"{rec['config']} {rec['cell']}: {peer} not measured ({why})")
    return lines


def memory_text(mem):
    """The training-memory table and its notes, as plain text."""
    if not mem["records"]:
        return "\n".join(memory_notes(mem))
    header, rows = memory_rows(mem)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    table = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    return "\n".join(table + [""] + memory_notes(mem))


def memory_markdown(mem):
    """Lines of the "Training peak memory" section of RESULTS.md."""
    out = ["## Training peak memory", ""]
    if mem["records"]:
        header, rows = memory_rows(mem)
        align = [":---" if i < 2 else "---:" for i in range(len(header))]
        out += ["| " + " | ".join(r) + " |" for r in [header, align, *rows]]
        out += [""]
    out += [f"- {line}" for line in memory_notes(mem)]
    return out + [""]


def write_json(data, path):
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def plot(data, path):
    """Bar chart of the speed-ups (one group per case, one bar per peer, log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    peers = peers_in(data)
    threads = sorted({rec["threads"] for rec in data["cases"]})
    if not peers:
        return False
    ncases = max(sum(rec["threads"] == n for rec in data["cases"]) for n in threads)
    fig, axes = plt.subplots(len(threads), 1, squeeze=False,
                             figsize=(max(8.0, 0.45 * ncases + 2), 3.6 * len(threads)))
    width = 0.8 / len(peers)
    for ax, n in zip(axes[:, 0], threads):
        recs = [rec for rec in data["cases"] if rec["threads"] == n]
        for j, p in enumerate(peers):
            shown = [(i, rec) for i, rec in enumerate(recs) if p in rec["results"]]
            xs = [i + (j - (len(peers) - 1) / 2) * width for i, _ in shown]
            ys = [rec["results"][p]["speedup"] for _, rec in shown]
            # bars grow from 1.0: up where fusedrnn is faster, down where it is slower
            bars = ax.bar(xs, [y - 1.0 for y in ys], width, bottom=1.0, label=f"vs {p}")
            for bar, (_, rec) in zip(bars, shown):
                if not agrees(rec, p):   # one of the two computed something else
                    bar.set_hatch("xx")
                    bar.set_edgecolor("red")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        # Labelled at 1-2-5 steps, as speed-ups ("x2"), and always reaching below x1, so that a
        # case where fusedrnn is slower shows as such (only 10^0 and 10^1 were labelled).
        lowest = min((rec["results"][p]["speedup"] for rec in recs for p in peers
                      if p in rec["results"]), default=1.0)
        ax.set_ylim(bottom=min(0.8, 0.8 * lowest))
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"x{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(recs)))
        ax.set_xticklabels([f"{r['config']}\n{r['cell']} {r['mode']}" for r in recs],
                           rotation=90, fontsize=7)
        ax.set_xlim(-0.6, len(recs) - 0.4)
        ax.set_ylabel("speed-up (peer time / fusedrnn time)")
        wrong = any(not agrees(rec, p) for rec in recs for p in rec["results"])
        ax.set_title(f"fusedrnn speed-up, {n} thread{'s' if n != 1 else ''} "
                     f"({data['machine']['cpu']}, {data['machine']['isa']})"
                     + ("; red hatched: outputs disagreed, not a speed-up" if wrong else ""),
                     fontsize=9)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _load(load):
    return "unknown" if not load else f"{load[0]:.2f}"


def markdown(data, plot_name="speedups.png"):
    m = data["machine"]
    v = m["versions"]
    blas = m["numpy_blas"]
    out = ["# fusedrnn benchmark results", "",
           "Regenerate with `bash bench/run_full.sh` (it runs the command below and renders this "
           "file from `bench/results.json` with `python -m fusedrnn.bench.report`).", "",
           "```", data["command"], "```", "",
           f"Run on {data['started']} in {data['elapsed_s'] / 60:.1f} min; load average "
           f"(1 min) {_load(m.get('load_average'))} before and "
           f"{_load(data.get('load_average_at_end'))} after (the run itself adds about "
           f"1; more means other processes shared the {m['logical_cpus']} logical CPUs).", "",
           "## Machine", "",
           f"- CPU: {m['cpu']}, {m['logical_cpus']} logical CPUs; kernels: {m['isa']} "
           f"(available: {', '.join(m['available_isas'])}), {m['compiler']}, "
           f"OpenMP {'on' if m['openmp'] else 'off'}, thread policy "
           f"{m.get('thread_policy', 'fixed')}",
           f"- versions: fusedrnn {v['fusedrnn']}, numpy {v['numpy']}, torch {v['torch']}, "
           f"onnxruntime {v['onnxruntime']}, onnx {v['onnx']}, python {v['python']}",
           f"- numpy's BLAS: {blas.get('name')} {blas.get('version') or ''} "
           f"({blas.get('configuration', '')}); thread control: {blas['thread_control']}",
           f"- environment: {m['env'] or 'no thread or BLAS variables set'}", "",
           "## Reference GEMM rates (float32, one size, best call, measured in this run)", ""]
    out += [f"- {line}" for line in peak_lines(data)]
    out += ["", "## Summary", ""]
    out += [f"- {line}" for line in summary(data)]
    skipped = data.get("peers_skipped", {})
    out += [f"- {name}: skipped ({reason})" for name, reason in skipped.items()]
    from . import targets   # (here: targets reads this module's helpers)
    out += ["", "## Targets (issue 6)", ""]
    out += [f"- {line}" for line in targets.target_lines(data)]
    out += ["", "## Speed-ups", "", f"![speed-ups]({plot_name})", ""]
    lost = slower(data)
    if lost:
        out += ["## Where fusedrnn is slower (worst first)", ""]
        out += [f"- {what}: x{up:.2f}" for up, what in lost]
        out += [""]
    out += scaling_markdown(data)
    if data.get("memory"):
        out += memory_markdown(data["memory"])
    out += ["## All cases", "", markdown_table(data), ""]
    out += [f"- {line}" for line in notes(data)]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fusedrnn.bench.report",
                                 description="Render a benchmark JSON file as Markdown.")
    ap.add_argument("json", help="results file written by python -m fusedrnn.bench --json")
    ap.add_argument("out", nargs="?", help="Markdown file to write (default: stdout)")
    ap.add_argument("--plot-name", default="speedups.png",
                    help="image the Markdown embeds (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        with open(args.json) as f:
            data = json.load(f)
    except OSError as e:
        ap.error(f"cannot read {args.json!r}: {e.strerror or e}")
    except ValueError as e:
        ap.error(f"{args.json!r} is not JSON: {e}")
    if not isinstance(data, dict) or not {"machine", "cases"} <= set(data):
        ap.error(f"{args.json!r} is not a results file of python -m fusedrnn.bench --json (it "
                 f"has no 'machine' and 'cases')")
    text = markdown(data, args.plot_name)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
