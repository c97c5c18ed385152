"""Tests of ``python -m fusedrnn.bench``: argument handling, the plan of cases, and the JSON's
structure on tiny sizes (never timings). They pass with and without torch / onnxruntime /
matplotlib installed; the absence of the optional peers is also simulated."""
import json
import math
import os
import re
import sys

import numpy as np
import pytest

import fusedrnn
from fusedrnn.bench import cases, check, cli, machine, memory, peak, report

TINY = ["--quick", "--sizes", "3,2,4,5,1", "--threads", "1"]
needs_openmp = pytest.mark.skipif(not fusedrnn._C.openmp, reason="built without OpenMP: the "
                                  "benchmark runs every case on one thread")


@pytest.fixture(autouse=True)
def short_timing(monkeypatch):
    """These tests look at structure, not speed: time as little as possible."""
    monkeypatch.setattr(peak, "SIZES", (64,))
    monkeypatch.setitem(cli.QUICK, "peak_budget_s", 0.0)
    monkeypatch.setitem(cli.QUICK, "budget_s", 0.0)


def parse(*argv):
    return cli.parser().parse_args(list(argv))


def run_json(tmp_path, capsys, *argv):
    path = tmp_path / "out.json"
    status = cli.main([*argv, "--json", str(path)])
    out = capsys.readouterr().out
    return status, json.loads(path.read_text()), out


# -- arguments

@pytest.mark.parametrize("argv, message", [
    (["--cells", "lstm,foo"], "unknown cell 'foo'"),
    (["--cells", ""], "empty cell list"),
    (["--configs", "nope"], "unknown config 'nope'"),
    (["--mode", "eval"], "unknown mode 'eval'"),
    (["--peers", "tensorflow"], "unknown peer 'tensorflow'"),
    (["--threads", "0"], "thread counts must be >= 1"),
    (["--threads", "1,x"], "thread counts must be integers"),
    (["--threads", "1025"], "thread counts must be <= 1024"),  # (a traceback after parsing)
    (["--threads", "-1"], "argument --threads: thread counts must be >= 1"),  # (named --sizes)
    (["--sizes", "1,2,3,4"], "five integers T,B,I,H,L"),
    (["--sizes", "1,2,3,4,x"], "must be integers"),
    (["--sizes", "1,2,0,4,1"], "every size must be >= 1"),
    (["--sizes"], "expected at least one argument"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("main", [cli.main, memory.main], ids=["bench", "memory"])
def test_help_renders_every_option(main, capsys):
    """--help renders (argparse formats every help text and default only here: a stray % in one
    raises) and names each option the parser has."""
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    options = {o for a in (cli.parser() if main is cli.main else memory.parser())._actions
               for o in a.option_strings if o.startswith("--")}
    assert options and all(o in out for o in options), sorted(o for o in options if o not in out)


def test_lists_parse_and_drop_duplicates():
    args = parse("--cells", "gru,rnn,gru", "--threads", "2,1,2", "--mode", "train",
                 "--peers", "reference,torch", "--configs", "wide,stacked")
    assert args.cells == ["gru", "rnn"]
    assert args.threads == [2, 1]
    assert args.mode == ["train"]
    assert args.peers == ["reference", "torch"]
    assert args.configs == ["wide", "stacked"]
    assert parse("--peers", "none").peers == []


def test_sizes_parse_to_configs():
    args = parse("--sizes", "3,2,4,5,1", "10,1,8,16,2")
    a, b = args.sizes
    assert (a.T, a.B, a.I, a.H, a.L) == (3, 2, 4, 5, 1)
    assert (b.T, b.B, b.I, b.H, b.L) == (10, 1, 8, 16, 2)
    assert a.name == "T3-B2-I4-H5-L1"


def test_a_case_s_data_is_drawn_in_float32():
    """A huge --sizes case must fit when its float32 arrays do: no float64 copy of x on the way."""
    import tracemalloc
    config = cases.Config("big-x", T=400, B=50, I=500, H=2, L=1)     # x is 40 MB, the rest tiny
    x_bytes = config.T * config.B * config.I * 4
    tracemalloc.start()
    try:
        problem = cases.make_problem(config, "rnn")
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert problem.x.dtype == np.float32 and problem.x.nbytes == x_bytes
    assert peak_bytes < 1.2 * x_bytes


# -- the plan

def test_default_plan_is_the_design_matrix():
    plan = cli.plan(parse())
    assert len(plan) == 6 * 3 * 2 * 2
    assert {c.config.name for c in plan} == set(cases.CONFIGS)
    assert {c.cell for c in plan} == {"rnn", "lstm", "gru"}
    assert {c.mode for c in plan} == {"infer", "train"}
    assert {c.threads for c in plan} == {1, 2}
    assert cases.CONFIGS["fastrnns"].shape == "T=100 B=64 I=512 H=512 L=1"


def test_quick_plan_is_a_one_thread_subset():
    quick = cli.plan(parse("--quick"))
    full = cli.plan(parse())
    assert 0 < len(quick) < len(full) / 4
    assert {c.threads for c in quick} == {1}
    assert {c.cell for c in quick} == {"rnn", "lstm", "gru"}
    assert {c.mode for c in quick} == {"infer", "train"}
    lstm = cli.plan(parse("--quick", "--cells", "lstm", "--mode", "infer", "--threads", "2"))
    assert lstm and all(c.cell == "lstm" and c.mode == "infer" and c.threads == 2 for c in lstm)


def test_configs_and_sizes_select_cases():
    plan = cli.plan(parse("--configs", "long-seq", "--cells", "gru", "--threads", "1"))
    assert [(c.config.name, c.mode) for c in plan] == [("long-seq", "infer"), ("long-seq", "train")]
    plan = cli.plan(parse("--sizes", "3,2,4,5,1", "--cells", "rnn", "--threads", "1"))
    assert [c.config.name for c in plan] == ["T3-B2-I4-H5-L1"] * 2
    both = cli.plan(parse("--sizes", "3,2,4,5,1", "--configs", "wide", "--mode", "infer",
                          "--cells", "rnn", "--threads", "1"))
    assert [c.config.name for c in both] == ["wide", "T3-B2-I4-H5-L1"]
    repeated = cli.plan(parse("--sizes", "3,2,4,5,1", "--sizes", "6,1,2,3,1", "--mode", "infer",
                              "--cells", "rnn", "--threads", "1"))
    assert [c.config.name for c in repeated] == ["T3-B2-I4-H5-L1", "T6-B1-I2-H3-L1"]


def test_flops_follow_design():
    c = cases.CONFIGS["stacked"]     # T=50 B=16 I=256 H=256 L=2; layer 2's input is H
    forward = 2 * 50 * 16 * 4 * 256 * (256 + 256) * 2
    assert cases.flops(c, "lstm", "infer") == forward
    assert cases.flops(c, "lstm", "train") == 3 * forward
    assert cases.flops(c, "gru", "infer") == forward * 3 // 4


# -- runs on a tiny size: the JSON's structure

def test_json_structure_with_the_reference_peer(tmp_path, capsys):
    status, data, out = run_json(tmp_path, capsys, *TINY, "--peers", "reference")
    assert status == 0
    assert "T3-B2-I4-H5-L1" in out and "vs reference" in out
    for key in ("schema", "command", "started", "elapsed_s", "settings", "machine", "peers",
                "peers_skipped", "gemm_peak", "cases"):
        assert key in data
    assert data["command"].startswith("python -m fusedrnn.bench --quick")
    m = data["machine"]
    for key in ("cpu", "isa", "available_isas", "logical_cpus", "versions", "numpy_blas", "env"):
        assert key in m
    assert m["isa"] in m["available_isas"]
    assert m["versions"]["fusedrnn"] == fusedrnn.__version__
    assert m["versions"]["numpy"] == np.__version__
    assert "thread_control" in m["numpy_blas"]
    peak = data["gemm_peak"]["1"]
    for name in ("fusedrnn_gemm", "numpy_matmul"):
        assert peak[name]["gflops"] > 0 and peak[name]["size"] == 64
        assert len(peak[name]["measured_gflops"]) == 2
    assert set(data["peers"]) == {"fusedrnn", "reference"}
    assert len(data["cases"]) == 6
    assert {(r["cell"], r["mode"]) for r in data["cases"]} == {
        (c, m) for c in ("rnn", "lstm", "gru") for m in ("infer", "train")}
    for rec in data["cases"]:
        sizes = (rec["T"], rec["B"], rec["I"], rec["H"], rec["L"], rec["threads"])
        assert sizes == (3, 2, 4, 5, 1, 1)
        assert rec["flops"] == cases.flops(cases.custom_config(3, 2, 4, 5, 1), rec["cell"],
                                           rec["mode"])
        chk = rec["check"]
        assert chk["ok"] and chk["forward_error"] <= chk["forward_tol"]
        assert (chk["gradient_error"] is None) == (rec["mode"] == "infer")
        ours, ref = rec["results"]["fusedrnn"], rec["results"]["reference"]
        for r in (ours, ref):
            assert r["reps"] == len(r["times_s"]) >= 3
            assert r["min_s"] <= r["median_s"] <= r["max_s"]
            assert set(r["fraction_of_peak"]) == {"fusedrnn_gemm", "numpy_matmul",
                                                  "fusedrnn_gemm_beside"}
            assert r["fraction_of_peak"]["fusedrnn_gemm_beside"] == pytest.approx(
                r["gflops"] / rec["gemm_beside"]["gflops"])
        beside = rec["gemm_beside"]
        assert beside["reps"] >= 1 and beside["min_s"] <= beside["median_s"]
        flops = 2 * math.prod(cli.peak.product_shape(64))  # (peak is the figures here)
        assert beside["gflops"] == pytest.approx(flops / beside["median_s"] / 1e9)
        assert "speedup" not in ours
        assert ref["speedup"] == pytest.approx(ref["median_s"] / ours["median_s"])
        assert rec["agreement"]["reference"]["ok"]
        if rec["mode"] == "train":
            assert "dx" in rec["agreement"]["reference"]["compared"]
            assert "weight_hh_l0" in rec["agreement"]["reference"]["compared"]


@needs_openmp
def test_threaded_cases_record_the_cores_and_one_thread_in_the_same_rounds(tmp_path, capsys):
    """A 2-thread case records how far apart the cores were, and fusedrnn's 1-thread calls timed
    in its rounds (not a peer); a 1-thread case neither."""
    status, data, out = run_json(tmp_path, capsys, "--sizes", "3,2,4,5,1", "--threads", "1,2",
                                 "--cells", "rnn", "--mode", "train", "--peers", "reference")
    assert status == 0
    by_threads = {rec["threads"]: rec for rec in data["cases"]}
    assert "barrier_ns" not in by_threads[1] and "one_thread" not in by_threads[1]
    before, after = by_threads[2]["barrier_ns"]
    assert before >= 0 and after >= 0
    one = by_threads[2]["one_thread"]
    assert one["reps"] == len(one["times_s"]) >= 3 and one["min_s"] <= one["median_s"]
    assert set(by_threads[2]["results"]) == {"fusedrnn", "reference"}
    assert "fusedrnn on 1 thread" in out and "(2 threads x" in out


@needs_openmp
def test_report_marks_cases_timed_with_the_cores_far_apart(tmp_path, capsys):
    status, data, _ = run_json(tmp_path, capsys, "--sizes", "3,2,4,5,1", "--threads", "2",
                               "--cells", "rnn,gru", "--mode", "infer", "--peers", "reference")
    assert status == 0
    rnn, gru = sorted(data["cases"], key=lambda rec: rec["cell"] != "rnn")
    rnn["barrier_ns"], gru["barrier_ns"] = [30.0, 40.0], [35.0, 310.0]
    for rec in data["cases"]:  # fusedrnn loses both comparisons
        rec["results"]["reference"]["speedup"] = 0.9
    lines = report.summary(data)
    assert any("in 1 of 2 multi-thread cases: T3-B2-I4-H5-L1 gru infer" in line for line in lines)
    lost = dict((what, up) for up, what in report.slower(data))
    assert "T3-B2-I4-H5-L1 gru infer t=2 vs reference (cores far apart: barrier 35 / 310 ns)" in lost
    assert "T3-B2-I4-H5-L1 rnn infer t=2 vs reference" in lost
    assert any(line.startswith("fusedrnn is slower in 2 of 2 comparisons") for line in lines)
    rnn["results"]["reference"]["speedup"] = 1.0   # level counts as not slower
    gru["results"]["reference"]["speedup"] = 1.5
    lines = report.summary(data)
    assert not any("is slower" in line for line in lines)
    assert any(line.startswith("fusedrnn is at least as fast as the peer in all 2 comparisons; "
                               "the closest: T3-B2-I4-H5-L1 rnn infer t=2 vs reference x1.000")
               for line in lines)
    for rec in data["cases"]:
        del rec["barrier_ns"]  # one-thread runs and files from before the gauge: no line
    assert not any("cores far apart (" in line for line in report.summary(data))


def test_one_thread_runner_runs_on_one_thread_and_restores_the_count():
    from fusedrnn.bench.runner import on_one_thread
    seen = []
    before = fusedrnn.get_num_threads()
    try:
        fusedrnn.set_num_threads(2)
        call = on_one_thread(lambda: seen.append(fusedrnn.get_num_threads()) or "out",
                             fusedrnn.set_num_threads, 2)
        two = 2 if fusedrnn._C.openmp else 1   # a build without OpenMP runs on one
        assert call() == "out" and seen == [1] and fusedrnn.get_num_threads() == two

        def fails():
            raise RuntimeError("boom")
        with pytest.raises(RuntimeError):
            on_one_thread(fails, fusedrnn.set_num_threads, 2)()
        assert fusedrnn.get_num_threads() == two
    finally:
        fusedrnn.set_num_threads(before)


def test_a_build_without_openmp_plans_one_thread_and_says_so(tmp_path, capsys, monkeypatch):
    """Its kernels run on the caller's thread alone: a "t=2" case would time one thread."""
    monkeypatch.setattr(cli._C, "openmp", False)
    _, data, out = run_json(tmp_path, capsys, "--quick", "--sizes", "3,2,4,5,1", "--threads",
                            "1,2", "--cells", "rnn", "--mode", "infer", "--peers", "none")
    assert "built without OpenMP: every case runs on 1 thread" in out
    assert [rec["threads"] for rec in data["cases"]] == [1]


@pytest.mark.parametrize("threads", ["2", "2,4"])
def test_a_build_without_openmp_refuses_only_threaded_cases_up_front(threads, capsys,
                                                                     monkeypatch):
    """Every case asked for has more than one thread, so such a build has none to run: an
    argument error naming why, before anything is timed (it ran no case, then raised
    IndexError, or printed an empty table and exited 0)."""
    monkeypatch.setattr(cli._C, "openmp", False)
    monkeypatch.setattr(cli.machine, "load_average", lambda: (99.0, 99.0, 99.0))  # a busy host
    with pytest.raises(SystemExit) as e:
        cli.main(["--quick", "--sizes", "3,2,4,5,1", "--threads", threads, "--peers", "none"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--threads {threads}: this fusedrnn was built without OpenMP" in err
    assert "--threads 1" in err


@needs_openmp
def test_report_shows_two_thread_scaling(tmp_path, capsys):
    status, data, _ = run_json(tmp_path, capsys, "--sizes", "3,2,4,5,1", "--threads", "1,2",
                               "--cells", "rnn,gru", "--mode", "infer", "--peers", "none")
    assert status == 0
    times = {(1, "rnn"): 1.0, (2, "rnn"): 0.5, (1, "gru"): 1.0, (2, "gru"): 0.8}
    same_rounds = {"rnn": 0.95, "gru": 1.2}   # 1-thread calls in the 2-thread case's rounds
    for rec in data["cases"]:
        rec["results"]["fusedrnn"]["median_s"] = times[rec["threads"], rec["cell"]]
        if rec["threads"] == 2:
            rec["barrier_ns"] = [30.0, 40.0] if rec["cell"] == "rnn" else [35.0, 310.0]
            rec["one_thread"]["median_s"] = same_rounds[rec["cell"]]
    got = {(c, cell, m): (up, sep) for c, cell, m, up, _, sep in report.scaling(data)}
    assert got == {("T3-B2-I4-H5-L1", "rnn", "infer"): (pytest.approx(1.9), 2.0),
                   ("T3-B2-I4-H5-L1", "gru", "infer"): (pytest.approx(1.5), 1.25)}
    assert report.scaling_line(data) is None  # the target is for the GEMM-bound configs
    for rec in data["cases"]:
        rec["config"] = "wide"
    line = report.scaling_line(data)
    assert "1-thread calls timed in the same rounds" in line
    assert "x1.50 .. x1.90 over 2 cases; under x1.8 in 1: wide gru infer x1.50 " \
           "(cores far apart: barrier 35 / 310 ns)" in line
    text = report.markdown(data)
    assert "| wide | rnn | infer | x1.90 | x2.00 | 30 / 40 |" in text
    assert "| wide | gru | infer | x1.50 | x1.25 | 35 / 310 far |" in text
    for rec in data["cases"]:   # files from before the same-rounds timing: the separate cases
        rec.pop("one_thread", None)
    line = report.scaling_line(data)
    assert "from the separate 1-thread cases" in line and "x1.25 .. x2.00 over 2" in line
    assert "| wide | gru | infer | - | x1.25 | 35 / 310 far |" in report.markdown(data)
    data["cases"] = [rec for rec in data["cases"] if rec["threads"] == 2]
    assert report.scaling(data) == []   # no 1-thread time at all: no row


def test_missing_peers_are_skipped_with_a_line(tmp_path, capsys, monkeypatch):
    for name in ("torch", "onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)      # import raises ImportError
    status, data, out = run_json(tmp_path, capsys, *TINY, "--cells", "gru", "--mode", "infer",
                                 "--peers", "torch,onnxruntime")
    assert status == 0
    assert "peer torch: skipped, not installed" in out
    assert "peer onnxruntime: skipped, " in out
    assert set(data["peers_skipped"]) == {"torch", "onnxruntime"}
    assert list(data["cases"][0]["results"]) == ["fusedrnn"]
    assert 'pip install ".[bench]"' in out


_WITHOUT_OPTIONAL_PACKAGES = """if True:
    import runpy, sys
    for name in ("torch", "onnx", "onnxruntime", "matplotlib", "threadpoolctl"):
        sys.modules[name] = None   # import raises ImportError, as where none is installed
    sys.argv = ["fusedrnn.bench", *sys.argv[1:]]
    runpy.run_module("fusedrnn.bench", run_name="__main__", alter_sys=True)
"""


def test_python_m_fusedrnn_bench_runs_without_its_optional_packages(tmp_path):
    """`python -m fusedrnn.bench` in a fresh process with none of torch, onnx, onnxruntime,
    matplotlib and threadpoolctl: it times fusedrnn against the NumPy reference, says what it
    skipped and why, writes the JSON and no plot, and exits 0."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", _WITHOUT_OPTIONAL_PACKAGES, *TINY,
                          "--cells", "gru", "--json", str(tmp_path / "out.json"),
                          "--plot", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (f"note: --plot: matplotlib is not installed, so {tmp_path / 'out.png'} will not be "
            f"written (pip install matplotlib)") in out.stdout
    assert "peer torch: skipped, not installed" in out.stdout
    assert "peer onnxruntime: skipped, " in out.stdout
    assert "threadpoolctl not installed" in out.stdout
    assert not (tmp_path / "out.png").exists()
    data = json.loads((tmp_path / "out.json").read_text())
    assert set(data["peers_skipped"]) == {"torch", "onnxruntime"}
    assert [set(rec["results"]) for rec in data["cases"]] == [{"fusedrnn", "reference"}] * 2
    assert all(rec["check"]["ok"] for rec in data["cases"])
    assert "threadpools" not in data["machine"]["numpy_blas"]


def test_a_peer_whose_helper_package_is_missing_says_which(tmp_path, capsys, monkeypatch):
    """onnxruntime installed without onnx (which builds its models) was reported as "not
    installed"."""
    monkeypatch.setitem(sys.modules, "onnx", None)
    status, data, out = run_json(tmp_path, capsys, *TINY, "--cells", "gru", "--mode", "infer",
                                 "--peers", "onnxruntime")
    assert status == 0
    assert "peer onnxruntime: skipped, it needs the onnx package, which is not installed" in out


def test_fusedrnn_without_layers_chains_functional(tmp_path, capsys, monkeypatch):
    monkeypatch.delattr(fusedrnn, "LSTM", raising=False)
    status, data, _ = run_json(tmp_path, capsys, "--quick", "--sizes", "4,3,5,6,2",
                               "--threads", "1", "--cells", "lstm", "--peers", "reference")
    assert status == 0
    for rec in data["cases"]:
        assert rec["fusedrnn_path"] == "functional"
        assert rec["check"]["ok"] and rec["agreement"]["reference"]["ok"]


@pytest.mark.skipif(not hasattr(fusedrnn, "LSTM"), reason="fusedrnn has no layers yet")
def test_bidirectional_configs_are_named_apart_and_count_both_directions(tmp_path, capsys):
    """--bidirectional: every config with both directions (its own name, outside issue 6's
    targets, which are the one-way matrix's), twice the FLOPs of one direction in a layer and
    the layers above reading both directions' outputs; --quick still picks its subset; the
    fusedrnn layers and the NumPy reference agree, every gradient named as torch's."""
    plan = cli.plan(parse("--bidirectional"))
    assert {c.config.name for c in plan} == {f"{n}-bidir" for n in cases.CONFIGS}
    quick = cli.plan(parse("--quick", "--bidirectional"))
    assert [(c.config.base_name, c.cell, c.mode) for c in quick] == [
        (c.config.name, c.cell, c.mode) for c in cli.plan(parse("--quick"))]
    one_way, both = cases.custom_config(4, 3, 5, 6, 2), cases.bidirectional(
        cases.custom_config(4, 3, 5, 6, 2))
    G, T, B, I, H = 4, 4, 3, 5, 6
    assert cases.flops(both, "lstm", "infer") == 2 * 2 * T * B * G * H * (I + H) + \
        2 * 2 * T * B * G * H * (2 * H + H)
    assert cases.flops(both, "lstm", "train") == 3 * cases.flops(both, "lstm", "infer")
    assert cases.flops(one_way, "lstm", "infer") == 2 * T * B * G * H * (I + H + H + H)
    problem = cases.make_problem(both, "lstm")
    assert problem.D == 2 and problem.h0.shape == (4, 3, 6) and problem.dy.shape == (4, 3, 12)
    assert problem.reverse[1]["w_ih"].shape == (24, 12)
    status, data, out = run_json(tmp_path, capsys, "--quick", "--sizes", "4,3,5,6,2",
                                 "--threads", "1", "--peers", "reference", "--bidirectional")
    assert status == 0 and "overhead-bound (online-small, long-seq) infer" in out
    for rec in data["cases"]:
        assert rec["check"]["ok"] and rec["agreement"]["reference"]["ok"], rec
        if rec["mode"] == "train":
            assert "weight_hh_l1_reverse" in rec["agreement"]["reference"]["compared"]


def test_fusedrnn_layers_path(tmp_path, capsys):
    status, data, _ = run_json(tmp_path, capsys, "--quick", "--sizes", "4,3,5,6,2",
                               "--threads", "1", "--peers", "reference")
    assert status == 0
    assert {rec["mode"] for rec in data["cases"]} == {"infer", "train"}
    for rec in data["cases"]:  # inference frozen (freeze()), as ONNX Runtime's constant weights
        assert rec["fusedrnn_path"] == ("layers, frozen" if rec["mode"] == "infer" else "layers")
        assert rec["check"]["ok"] and rec["agreement"]["reference"]["ok"]


def cases_against(peer, tmp_path, capsys, bidirectional=False):
    """Every cell, a 2-layer tiny size, fusedrnn beside one peer: the run's case records."""
    status, data, _ = run_json(tmp_path, capsys, "--quick", "--sizes", "4,3,5,6,2",
                               "--threads", "1", "--cells", "rnn,rnn_relu,lstm,gru",
                               "--peers", peer, *(["--bidirectional"] if bidirectional else []))
    assert status == 0
    assert all(rec["config"].endswith("-bidir") == bidirectional for rec in data["cases"])
    return data["cases"]


@pytest.mark.torch
@pytest.mark.parametrize("bidirectional", [False, True])
def test_torch_agrees(tmp_path, capsys, bidirectional):
    pytest.importorskip("torch")
    for rec in cases_against("torch", tmp_path, capsys, bidirectional):
        agree = rec["agreement"]["torch"]
        assert agree["ok"], agree
        if rec["mode"] == "train":       # dx, dh0 (dc0) and every parameter's gradient
            states = {"dh0", "dc0"} if rec["cell"] == "lstm" else {"dh0"}
            names = {"dx", "weight_ih_l1", "bias_hh_l0"} | states
            if bidirectional:
                names |= {"weight_ih_l1_reverse", "bias_hh_l0_reverse"}
            assert names <= set(agree["compared"])


@pytest.mark.torch
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_torch_training_backpropagates_dy_itself_into_the_initial_states(cell, monkeypatch):
    """torch does fusedrnn's training work: autograd.backward(y, dy), no loss tensor (its
    product and sum are work fusedrnn does not do), and dh0 (dc0) computed as fusedrnn's
    backward always does."""
    torch = pytest.importorskip("torch")
    from fusedrnn.bench.peers import torch_nn
    seen = []
    real = torch.autograd.backward

    def spy(tensors, grad_tensors=None, *a, **k):
        seen.append((tensors, grad_tensors))
        return real(tensors, grad_tensors, *a, **k)

    monkeypatch.setattr(torch.autograd, "backward", spy)
    problem = cases.make_problem(cases.custom_config(4, 3, 5, 6, 2), cell)
    run = torch_nn.TorchPeer().prepare(problem, "train")
    y, _ = run()
    (tensors, grads), = seen
    assert tensors is y and grads is run.dy          # not a scalar loss built from y * dy
    assert all(t.grad is not None for t in run.states)
    assert len(run.states) == (2 if cell == "lstm" else 1)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_onnxruntime_agrees(tmp_path, capsys, bidirectional):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    for rec in cases_against("onnxruntime", tmp_path, capsys, bidirectional):
        if rec["mode"] == "train":
            assert rec["skipped"]["onnxruntime"] == "train not supported"
            continue
        agree = rec["agreement"]["onnxruntime"]
        assert agree["ok"], agree
        assert set(agree["compared"]) == ({"y", "hn", "cn"} if rec["cell"] == "lstm"
                                          else {"y", "hn"})


def test_agreement_flags_a_wrong_peer():
    want = {"y": np.ones((2, 1, 3)), "hn": np.ones((1, 1, 3))}
    got = {"y": np.ones((2, 1, 3)) + 1e-3, "hn": np.ones((1, 1, 3))}
    assert check.agreement(want, want)["ok"]
    assert not check.agreement(got, want)["ok"]


def test_agreement_fails_an_output_only_one_side_has():
    """It compared the outputs both sides had: a peer that computed fewer (no weight gradients:
    less work, a faster time) agreed, and so did one with an output fusedrnn had not."""
    want = {"y": np.ones((2, 1, 3)), "dx": np.ones((2, 1, 4)), "weight_hh_l0": np.ones((3, 3))}
    fewer = {k: v for k, v in want.items() if k != "weight_hh_l0"}
    for got, unmatched in ((fewer, ["weight_hh_l0"]), ({**want, "dh0": np.ones((1, 1, 3))},
                                                         ["dh0"])):
        result = check.agreement(got, want)
        assert not result["ok"] and result["unmatched"] == unmatched
    assert check.agreement(want, want)["ok"] and check.agreement(want, want)["unmatched"] == []
    assert check.agreement(fewer, want, partial=True)["ok"]   # (adapter_vs_torch --needs)
    assert not check.agreement(want, fewer, partial=True)["ok"]


@pytest.mark.torch
def test_a_peer_that_skips_the_weight_gradients_disagrees(tmp_path, capsys, monkeypatch):
    """torch with its parameters not requiring grad computes dx, dh0 (dc0) only: the run
    agreed and timed it against fusedrnn's full training step."""
    pytest.importorskip("torch")
    from fusedrnn.bench.peers import torch_nn
    real = torch_nn.TorchRunner.__init__

    def no_weight_gradients(self, *args):
        real(self, *args)
        for p in self.module.parameters():
            p.requires_grad_(False)
    monkeypatch.setattr(torch_nn.TorchRunner, "__init__", no_weight_gradients)
    status, data, out = run_json(tmp_path, capsys, *TINY, "--cells", "lstm", "--mode", "train",
                                 "--peers", "torch")
    assert status == 1
    agree = data["cases"][0]["agreement"]["torch"]
    assert not agree["ok"] and "weight_ih_l0" in agree["unmatched"]
    assert "outputs on one side only: bias_hh_l0" in out


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_the_initial_states_gradients_are_checked_against_the_reference(tmp_path, capsys,
                                                                        monkeypatch, cell):
    """The reference (peers/stack.py) dropped dh0 and dc0, and the check compared the outputs
    both had: fusedrnn's dh0 off by 1 passed, and without torch the run exited 0."""
    from fusedrnn.bench.peers import ours
    real = ours.LayerRunner.outputs

    def wrong(self, result):
        out = real(self, result)
        if "dh0" in out:
            out["dh0"] = out["dh0"] + 1.0
        return out
    monkeypatch.setattr(ours.LayerRunner, "outputs", wrong)
    status, data, out = run_json(tmp_path, capsys, "--quick", "--sizes", "4,3,5,6,2",
                                 "--threads", "1", "--cells", cell, "--mode", "train",
                                 "--peers", "reference")
    assert status == 1 and "CHECK FAILED" in out
    rec, = data["cases"]
    assert not rec["check"]["ok"] and rec["check"]["gradient_error"] > 0.1  # (1 over |dh0| ~2)
    assert not rec["check"]["full_rows"]["ok"] and not rec["agreement"]["reference"]["ok"]
    states = {"dh0", "dc0"} if cell == "lstm" else {"dh0"}
    assert states <= set(rec["agreement"]["reference"]["compared"])


def test_a_peer_that_disagrees_fails_the_run_and_leaves_the_summary(tmp_path, capsys,
                                                                      monkeypatch):
    """A full-size disagreement with a peer is flagged first in the summary, its speed-up is
    left out of the summary's figures, and the run exits 1 (fusedrnn's own check still ok)."""
    real = check.agreement

    def wrong_for_train(got, want):
        result = real(got, want)
        return dict(result, ok=result["ok"] and "dx" not in result["compared"])

    monkeypatch.setattr(check, "agreement", wrong_for_train)
    status, data, out = run_json(tmp_path, capsys, *TINY, "--cells", "rnn", "--peers",
                                 "reference")
    assert status == 1
    assert all(rec["check"]["ok"] for rec in data["cases"])
    assert "DISAGREE: reference differs from fusedrnn" in out
    assert re.search(r"DISAGREE: reference differs from fusedrnn: "
                     r"fwd \d\.\de-\d\d, grad \d\.\de-\d\d \(timed", out)
    lines = report.summary(data)
    assert lines[0].startswith("OUTPUTS DISAGREE") and "rnn train t=1 vs reference" in lines[0]
    assert any("vs reference, infer: geometric-mean" in line for line in lines)
    assert not any("vs reference, train" in line for line in lines)
    assert [what for _, what in report.comparisons(data)] == [
        "T3-B2-I4-H5-L1 rnn infer t=1 vs reference"]


def test_the_plot_marks_a_peer_that_disagreed(tmp_path, capsys, monkeypatch):
    """Its bar is drawn (timed), but red and hatched, and the title says what that means."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    real = check.agreement
    monkeypatch.setattr(check, "agreement", lambda got, want: dict(
        real(got, want), ok="dx" not in real(got, want)["compared"]))
    _, data, _ = run_json(tmp_path, capsys, *TINY, "--cells", "rnn", "--peers", "reference")
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    assert report.plot(data, tmp_path / "speedups.png")
    ax = drawn[0].axes[0]
    hatches = [bar.get_hatch() for bar in ax.patches]
    assert hatches == [None, "xx"]         # infer agreed, train did not
    assert "red hatched: outputs disagreed" in ax.get_title()


def test_notes_claim_the_full_shape_check_only_where_the_file_has_it(tmp_path, capsys):
    """The notes describe the check as the code makes it now: bench/results_avx512.json, run
    before the full-shape check existed, rendered as checked at full shape."""
    _, data, _ = run_json(tmp_path, capsys, *TINY, "--cells", "rnn", "--mode", "infer",
                          "--peers", "none")
    full = "at the case's full shape on its first and last batch rows"
    assert any(full in line for line in report.notes(data))
    for rec in data["cases"]:
        del rec["check"]["full_rows"]
    check_line, = [line for line in report.notes(data) if line.startswith("check:")]
    assert full not in check_line and "(forward and gradients)." in check_line


def test_plot_and_markdown(tmp_path, capsys):
    status, data, out = run_json(tmp_path, capsys, *TINY, "--cells", "rnn", "--mode", "infer",
                                 "--peers", "reference")
    assert "\ntarget: GEMM-bound on 2 threads at least x1.8 the 1-thread speed: not measured" \
        in out
    text = report.markdown(data)
    assert "```\npython -m fusedrnn.bench" in text and "![speed-ups](speedups.png)" in text
    # issue 6's targets, each judged or said to be unmeasured (bench/targets.py)
    assert "## Targets (issue 6)\n\n- at least as fast as torch.nn" in text
    assert "- overhead-bound (online-small, long-seq) infer at least x3 torch.nn: not measured" \
        in text
    assert "| 1 | T3-B2-I4-H5-L1 | rnn | infer |" in text
    json_path = tmp_path / "out.json"
    md_path = tmp_path / "RESULTS.md"
    assert report.main([str(json_path), str(md_path)]) == 0
    assert md_path.read_text() == text
    capsys.readouterr()
    assert report.main([str(json_path)]) == 0   # (no file: to stdout)
    assert capsys.readouterr().out == text
    assert "slower" not in text
    data["cases"][0]["results"]["reference"]["speedup"] = 0.5   # (a peer faster than fusedrnn)
    assert ("## Where fusedrnn is slower (worst first)\n\n"
            "- T3-B2-I4-H5-L1 rnn infer t=1 vs reference: x0.50\n") in report.markdown(data)
    pytest.importorskip("matplotlib")
    png = tmp_path / "speedups.png"
    assert cli.main([*TINY, "--cells", "rnn", "--mode", "infer", "--peers", "reference",
                     "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_openmp
def test_a_plot_with_no_peer_and_more_threads_than_cpus_are_noted(tmp_path, capsys, monkeypatch):
    """--plot with --peers none says up front there is nothing to plot, and after the run that
    it skipped the plot; thread counts past the machine's CPUs are noted."""
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 1)
    png = tmp_path / "speedups.png"
    status, _, out = run_json(tmp_path, capsys, "--quick", "--sizes", "3,2,4,5,1", "--threads",
                              "2", "--cells", "rnn", "--mode", "infer", "--peers", "none",
                              "--plot", str(png))
    assert status == 0 and not png.exists()
    assert "note: --plot with --peers none: there will be no speed-ups to plot" in out
    assert "plot: skipped, no peer was timed" in out
    assert "note: more threads than the 1 logical CPUs of this machine" in out


def test_report_says_which_kernels_ran_against_the_peers_fma():
    """On AMX tiles the summary says so, and that the peers run AVX-512 FMA: much of a
    GEMM-bound speed-up is the tiles'."""
    data = {"machine": {"isa": "amx", "load_average": None}, "cases": []}
    line = report.summary(data)[0]
    assert "AMX tiles" in line and "3-way bfloat16 split" in line
    assert "AVX-512 float32 FMA" in line and "without FUSEDRNN_ISA=amx" in line
    data["machine"]["isa"] = "avx512"
    assert report.summary(data)[0].startswith("kernels: fusedrnn ran its avx512 kernels")
    assert "AMX" not in report.summary(data)[0]
    data["machine"]["available_isas"] = ["generic", "avx2", "avx512", "amx"]
    assert "This CPU has AMX: FUSEDRNN_ISA=amx runs" in report.summary(data)[0]


def test_numpy_peak_without_threadpoolctl_runs_at_the_thread_count_in_a_fresh_process(
        monkeypatch):
    # Without threadpoolctl this process's BLAS keeps every core; a 1-thread run's %numpy was
    # then over NumPy on all of them (52% on 2 cores, where NumPy on one ran as fast as our GEMM).
    monkeypatch.setattr(machine, "_threadpoolctl", lambda: None)
    monkeypatch.setattr(peak, "SIZES", (64,))
    got = peak.measure(1, fusedrnn.set_num_threads, budget_s=0.01)["numpy_matmul"]
    assert got["threads"] == 1 and got["process"] == "fresh" and got["size"] == 64
    assert got["gflops"] > 0
    assert got["blas_threads"] == [1]     # as the child's BLAS reports it (threadpoolctl there)
    line = report.peak_lines({"gemm_peak": {"1": {
        "fusedrnn_gemm": {"gflops": 1.0, "size": 64}, "numpy_matmul": got}}})[0]
    assert "threads: 1, in a fresh process" in line


@pytest.mark.parametrize("n", (1024, 512, 256, 64))
def test_reference_gemm_rows_of_c_do_not_lie_4_kb_apart(monkeypatch, n):
    """At 1024^3 C's rows lay 4 KB apart and shared L1 sets, which cost our GEMM 3-4% against
    the layers' own products (bench/HOSTS.md, session 54): the reference is a panel wider. Its
    figures say the shape they timed, and results written before keep their square label."""
    M, K, N = peak.product_shape(n)
    assert (M, K) == (n, n) and N > n
    assert (N * 4) % 4096 != 0                      # float32 rows of C
    monkeypatch.setattr(peak, "SIZES", (n,))
    monkeypatch.setattr(peak, "MAX_CALL_S", float("inf"))
    calls = []
    figure = peak.gemm_peak(lambda A, B: calls.append((A.shape, B.shape)) or A @ B, budget_s=0.0)
    assert set(calls) == {((M, K), (K, N))}
    assert figure["shape"] == [M, K, N] and figure["size"] == n
    assert figure["gflops"] == pytest.approx(2 * M * K * N / figure["best_s"] / 1e9)
    call, flops = peak.gemm_beside(n)
    assert call().shape == (M, N) and flops == 2 * M * K * N
    line = report.peak_lines({"gemm_peak": {"1": {"fusedrnn_gemm": figure,
                                                  "numpy_matmul": {"gflops": 1.0, "size": n}}}})[0]
    assert f"({M}x{K}x{N})" in line and f"({n}^3, threads" in line


def test_numpy_peak_falls_back_to_numpys_default_where_no_process_can_be_started(monkeypatch):
    monkeypatch.setattr(machine, "_threadpoolctl", lambda: None)
    monkeypatch.setattr(peak, "SIZES", (64,))
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    assert peak.numpy_peak_apart(1) is None
    got = peak.measure(1, fusedrnn.set_num_threads, budget_s=0.01)["numpy_matmul"]
    assert got["threads"] == "numpy's default" and "process" not in got and got["gflops"] > 0


def test_summary_gives_each_regime_its_own_mean_and_the_peak_is_called_a_reference_rate():
    """The GEMM-bound configs and the small-batch rest get their own geomeans, beside the
    median; the 2-thread GEMM "peak" (one size, best call) is not called a peak."""
    def rec(config, up):
        return {"config": config, "cell": "gru", "mode": "train", "threads": 1, "agreement": {},
                "check": {"ok": True},
                "results": {"fusedrnn": {"median_s": 1.0}, "torch": {"speedup": up}}}
    data = {"machine": {"isa": "avx512", "load_average": None},
            "cases": [rec("fastrnns", 1.5), rec("wide", 1.5), rec("online-small", 24.0)],
            "gemm_peak": {"2": {"fusedrnn_gemm": {"gflops": 500.0, "size": 1024},
                                "numpy_matmul": {"gflops": 300.0, "size": 1024}}}}
    (line,) = [x for x in report.summary(data) if x.startswith("fusedrnn vs torch, train")]
    assert "geometric-mean speed-up x3.78 over 3 cases, median x1.50" in line
    assert "GEMM-bound configs x1.50 over 2, the other configs x24.00 over 1" in line
    (peak_line,) = report.peak_lines(data)
    assert "best call at one size (a reference rate, not the machine's peak)" in peak_line


def test_recorded_results_md_is_the_report_of_its_json():
    """bench/RESULTS.md is rendered from bench/results.json (bench/run_full.sh): the report's
    text changed (the targets' FLOP ceilings) while the recorded file kept the old one."""
    bench_dir = os.path.join(os.path.dirname(__file__), "..", "bench")
    with open(os.path.join(bench_dir, "results.json")) as f:
        data = json.load(f)
    with open(os.path.join(bench_dir, "RESULTS.md")) as f:
        recorded = f.read()
    assert recorded == report.markdown(data), (
        "bench/RESULTS.md differs from its JSON's report: python -m fusedrnn.bench.report "
        "bench/results.json bench/RESULTS.md")


def test_an_empty_selection_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--quick", "--cells", "rnn_relu"])
    assert e.value.code == 2
    assert "no case matches" in capsys.readouterr().err


@pytest.mark.parametrize("option,path,says", [
    ("--json", "missing/out.json", "does not exist"),
    ("--json", ".", "is a folder"),
    ("--json", "a_file/out.json", "is not a folder"),
    ("--plot", "missing/out.png", "does not exist"),
    ("--plot", "out.foo", "matplotlib cannot write '.foo' files"),
    ("--sizes", "-1,2,3,4,5", "every size must be >= 1"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_outputs_and_sizes_stop_the_run_before_it_starts(tmp_path, capsys, monkeypatch,
                                                             option, path, says):
    """A path that could not be written failed after the whole run (its results lost), and a
    size starting with a minus read as an unknown option."""
    if option == "--plot":
        pytest.importorskip("matplotlib")
    (tmp_path / "a_file").write_text("")
    monkeypatch.chdir(tmp_path)
    argv = ["--quick", "--threads", "1", option, path]
    if option != "--sizes":
        argv += ["--sizes", "3,2,4,5,1"]
    timed = []
    monkeypatch.setattr(cli, "run", lambda *a: timed.append(a))
    for main in (cli.main, memory.main) if option in ("--json", "--sizes") else (cli.main,):
        with pytest.raises(SystemExit) as e:
            main([a for a in argv if main is cli.main or a not in ("--quick", "--threads", "1")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert option in err and says in err, err
    assert not timed and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_plot_path_without_an_extension_gets_png_and_says_so(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    status = cli.main([*TINY, "--cells", "rnn", "--mode", "infer", "--peers", "reference",
                       "--plot", str(tmp_path / "speedups")])
    assert status == 0
    assert f"wrote {tmp_path / 'speedups.png'}" in capsys.readouterr().out
    assert (tmp_path / "speedups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_case_is_reported_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    real = cases.make_problem

    def broken(config, cell, seed=0):
        if cell == "gru":
            raise RuntimeError("boom")
        return real(config, cell, seed)
    monkeypatch.setattr(cases, "make_problem", broken)
    status, data, out = run_json(tmp_path, capsys, *TINY, "--cells", "gru,rnn", "--mode",
                                 "infer", "--peers", "none")
    assert status == 1
    assert [rec["cell"] for rec in data["cases"]] == ["rnn"]
    assert len(data["errors"]) == 1 and "gru" in data["errors"][0] and "boom" in data["errors"][0]
    assert "ERROR, case not timed" in out


def test_close_calls_get_more_reps():
    """A peer within 5% of fusedrnn, either way, gets both timed on to CLOSE_REPS calls; a clear
    gap, reps enough already, or no peer leaves the timings alone."""
    from fusedrnn.bench import timing

    calls = {"fusedrnn": 0, "peer": 0}

    def counter(name):
        def run():
            calls[name] += 1
        return run

    runners = {name: counter(name) for name in calls}
    for ratio in (1.04, 1 / 1.04):
        times = {"fusedrnn": [1.0, 1.1, 0.9], "peer": [ratio] * 3}
        assert timing.is_close_call(times)
        settled = timing.settle_close_calls(runners, times)
        assert [len(v) for v in settled.values()] == [timing.CLOSE_REPS] * 2
        assert settled["fusedrnn"][:3] == times["fusedrnn"] and settled["peer"][:3] == times["peer"]
    assert calls["fusedrnn"] >= 2 * (timing.CLOSE_REPS - 3)  # (plus each block's untimed call)
    before = dict(calls)
    for ratio in (1.06, 1 / 1.06):
        apart = {"fusedrnn": [1.0] * 3, "peer": [ratio] * 3}
        assert not timing.is_close_call(apart)
        assert timing.settle_close_calls(runners, apart) is apart
    many = {"fusedrnn": [1.0] * timing.CLOSE_REPS, "peer": [1.0] * timing.CLOSE_REPS}
    assert timing.settle_close_calls(runners, many) is many
    alone = {"fusedrnn": [1.0] * 3}
    assert timing.settle_close_calls({"fusedrnn": runners["fusedrnn"]}, alone) is alone
    assert calls == before


def test_gemm_beside_is_timed_once_a_round_outside_the_budget():
    """The GEMM timed beside a case: once at the start of every round, its own wait and one
    untimed call first (as every runner's block), its time kept apart and not spent from the
    budget; the extra rounds of a close call time it too; the case's %gemm column is over its
    median."""
    from fusedrnn.bench import report, runner, timing

    events = []
    runners = {"a": lambda: events.append("a"), "b": lambda: events.append("b")}
    beside = {"gemm": lambda: events.append("gemm")}
    original = timing.wait_until_idle
    try:
        timing.wait_until_idle = lambda: events.append("wait")
        times = timing.interleave(runners, 0.0, min_reps=2, max_reps=2, block_s=1e-9,
                                  beside=beside)
        block = lambda name: ["wait", name, name]  # noqa: E731 (untimed call, then one timed)
        one = ["wait", "gemm", "gemm"]                # untimed warm-up call, then one timed
        assert events == one + block("a") + block("b") + one + block("b") + block("a")
        assert [len(times[n]) for n in ("a", "b", "gemm")] == [2, 2, 2]
        close = {"a": [1.0] * 3, "b": [1.01] * 3, "gemm": [0.5]}
        settled = timing.settle_close_calls(runners, close, ours="a", beside=beside)
        assert len(settled["a"]) == timing.CLOSE_REPS and len(settled["gemm"]) > 1
        assert settled["gemm"][0] == 0.5
    finally:
        timing.wait_until_idle = original

    rec = {"threads": 1, "config": "c", "cell": "lstm", "mode": "infer",
           "check": {"ok": True, "forward_error": 0.0, "gradient_error": None},
           "results": {"fusedrnn": {"median_s": 1.0, "gflops": 80.0}}, "agreement": {},
           "gemm_beside": {"gflops": 100.0}}
    runner.add_fractions(rec, {"fusedrnn_gemm": {"gflops": 160.0},
                               "numpy_matmul": {"gflops": 200.0}})
    _, rows = report.table_rows({"cases": [rec]})
    assert rows[0][6:8] == ["80%", "40%"]  # %gemm over the GEMM beside, %numpy over the peak
    rec["gemm_beside"]["gflops"] = 64.0
    runner.add_fractions(rec, {"fusedrnn_gemm": {"gflops": 160.0},
                               "numpy_matmul": {"gflops": 200.0}})
    assert report.table_rows({"cases": [rec]})[1][0][6] == "125%*"    # flagged as an artefact


def test_ab_builds_times_two_builds_side_by_side():
    """bench/ab_builds.py loads the same build twice under two names (the case that needs its
    private copies) and prints one line per case with both."""
    import os
    import subprocess
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "ab_builds.py")
    package = os.path.dirname(fusedrnn._C.__file__)   # (an editable install's is not the tree's)
    out = subprocess.run([sys.executable, script, f"OLD={package}", f"NEW={package}",
                          "--configs", "online-small", "--cells", "rnn_tanh,gru", "--reps", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["online-small rnn_tanh infer t=1",
                                                      "online-small gru infer t=1"]
    assert all("OLD min" in line and "NEW min" in line for line in lines)
    # --stack: the config's layers as one forward_stack call, and BPTT down them when training
    out = subprocess.run([sys.executable, script, f"OLD={package}", f"NEW={package}", "--stack",
                          "--configs", "stacked", "--cells", "gru", "--mode", "train", "--reps", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("stacked gru train, stack of 2 t=1: OLD min"), out.stdout
    # --cells takes the benchmark's name rnn for rnn_tanh, and names an unknown cell
    out = subprocess.run([sys.executable, script, f"OLD={package}", "--configs", "online-small",
                          "--cells", "rnn", "--reps", "1"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("online-small rnn_tanh infer t=1: OLD min"), out.stdout
    out = subprocess.run([sys.executable, script, f"OLD={package}", "--cells", "lstm,gur"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--cells: unknown gur" in out.stderr, out.stderr


def _times_the_three_ways(script_name, config):
    """Runs bench/<script_name> on config's GRU, briefly: torch.nn, the adapter and the NumPy
    layers timed (positive ms), one line per mode. Returns the script's path."""
    import os
    import subprocess
    pytest.importorskip("torch")
    script = os.path.join(os.path.dirname(__file__), "..", "bench", script_name)
    out = subprocess.run([sys.executable, script, "--configs", config, "--cells", "gru",
                          "--budget", "0.05"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "adapter vs torch" in lines[1]
    rows = [line.split() for line in lines[2:]]
    assert [r[:3] for r in rows] == [[config, "gru", "infer"], [config, "gru", "train"]]
    assert all(float(v) > 0 for r in rows for v in r[3:6])
    return script


def test_packed_vs_torch_checks_then_times_batches_of_several_lengths(monkeypatch):
    """bench/packed_vs_torch.py: torch.nn, the adapter and the NumPy layers on packed batches of
    several lengths, every output and gradient checked against torch.nn's first (a disagreement
    stops it), one line per case."""
    import importlib.util
    import os
    script = _times_the_three_ways("packed_vs_torch.py", "stacked")
    monkeypatch.syspath_prepend(os.path.dirname(script))   # (it imports adapter_vs_torch)
    spec = importlib.util.spec_from_file_location("packed_vs_torch", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = cases.custom_config(6, 5, 4, 8, 2)
    calls = bench.runners(config, "lstm", "train", np.random.default_rng(1))
    results = {name: call() for name, call in calls.items()}
    bench.check(results, "small")
    y, grads = results["fusedrnn"]
    assert np.any(y[:, :, 0] == 0)   # (rows past their length: zeros, as torch.nn pads them)
    for wrong in ("y", "dx", "weight"):
        y2, g2 = y.copy(), [g.copy() for g in grads]
        target = y2 if wrong == "y" else g2[0] if wrong == "dx" else g2[-1]
        target.flat[0] += 1e-2 * max(1.0, float(np.abs(target).max()))
        with pytest.raises(AssertionError, match="fusedrnn differs from torch.nn on small"):
            bench.check({**results, "fusedrnn": (y2, g2)}, "small")


def test_adapter_vs_torch_times_the_three_ways_to_run_a_layer():
    """bench/adapter_vs_torch.py: torch.nn, the adapter and the NumPy layers on the same weights
    (checked to agree first), one line per case."""
    import subprocess
    script = _times_the_three_ways("adapter_vs_torch.py", "online-small")
    # --autocast: torch.nn and the adapter under CPU autocast, with their errors against numpy's
    out = subprocess.run([sys.executable, script, "--configs", "online-small", "--cells", "lstm",
                          "--modes", "train", "--budget", "0.05", "--autocast", "bfloat16"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "under autocast to bfloat16" in lines[0] and lines[1].split()[-4:] == ["torch", "err", "adapter", "err"]
    row = lines[2].split()
    assert row[:3] == ["online-small", "lstm", "train"] and len(row) == 11
    adapter_fwd, adapter_grad = map(float, row[10].split("/"))
    assert 0 < adapter_fwd <= 2 ** -8 + 1e-5    # (the output rounded once to bfloat16)
    # where torch.nn's kernels fail (its float16 oneDNN LSTM, on a CPU without them), the row
    # says so and times the adapter and the NumPy layers alone
    out = subprocess.run([sys.executable, script, "--configs", "online-small", "--cells", "lstm",
                          "--modes", "infer", "--budget", "0.05", "--autocast", "float16"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    row = out.stdout.strip().splitlines()[-1].split()
    assert row[:3] == ["online-small", "lstm", "infer"] and float(row[4]) > 0
    torch_fails = "torch.nn fails on online-small lstm infer" in out.stdout
    assert (row[3] == "-") == torch_fails
    # --needs: torch.nn and the adapter train what autograd needs (checked against numpy's)
    out = subprocess.run([sys.executable, script, "--configs", "stacked", "--cells", "gru",
                          "--modes", "train", "--budget", "0.05", "--needs", "frozen-below"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "needs frozen-below" in lines[0]
    assert lines[2].split()[:3] == ["stacked", "gru", "train"]
    # --steps and --frozen: one step a call, the adapter frozen in inference (checked first)
    out = subprocess.run([sys.executable, script, "--configs", "online-small", "--cells", "lstm",
                          "--modes", "infer", "--budget", "0.05", "--steps", "1", "--frozen"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "; T = 1; the adapter frozen in inference" in lines[0]
    assert lines[2].split()[:3] == ["online-small", "lstm", "infer"]


class ScriptedClocks:
    """The clocks fusedrnn.bench.timing reads, scripted: sleep() moves the wall clock on at
    once, and the process's CPU clock as far while another thread spins on a whole core (until
    `spin_s` of wall time, or for good)."""

    def __init__(self, spin_s):
        self.wall = self.cpu = 0.0
        self.spin_s = spin_s

    def perf_counter(self):
        return self.wall

    def process_time(self):
        return self.cpu

    def sleep(self, s):
        self.cpu += max(0.0, min(self.wall + s, self.spin_s) - self.wall)
        self.wall += s


def test_blocks_wait_for_the_previous_runners_threads_to_idle(monkeypatch):
    """A thread left spinning (as ONNX Runtime's pool does for ~60 ms after a call) holds the
    next block back until it stops, an idle process waits one window, one that never idles
    max_s; in an interleaving every block waits first, a runner timed alone never. The clocks
    are scripted: a real spinner on a loaded machine can miss a whole 5 ms window (it did, and
    the wait ended after 27 ms); that the real process clock counts another thread's spin is
    checked apart."""
    import threading
    import time

    from fusedrnn.bench import timing

    window = timing.IDLE_WINDOW_S
    for spin_s, least, most in [(0.15, 0.15, 0.15 + 2 * window), (0.0, window, 2 * window),
                                (float("inf"), 2.0, 2.0 + 2 * window)]:
        with monkeypatch.context() as m:
            m.setattr(timing, "time", ScriptedClocks(spin_s))
            assert least <= timing.wait_until_idle(max_s=2.0) < most, spin_s

    def spin(cpu_s):  # on this thread's own CPU time, so load only makes it take longer
        start = time.thread_time()
        while time.thread_time() - start < cpu_s:
            pass

    cpu0 = timing.time.process_time()
    spinner = threading.Thread(target=spin, args=(0.05,))
    spinner.start()
    spinner.join()
    assert timing.time.process_time() - cpu0 >= 0.05

    events = []
    runners = {"a": lambda: events.append("a"), "b": lambda: events.append("b")}
    original = timing.wait_until_idle
    try:
        timing.wait_until_idle = lambda: events.append("wait")
        timing.interleave(runners, 0.0, min_reps=2, max_reps=2, block_s=1e-9)
        block = lambda name: ["wait", name, name]  # noqa: E731 (untimed call, then one timed)
        assert events == block("a") + block("b") + block("b") + block("a")
        events.clear()
        timing.interleave({"a": runners["a"]}, 0.0, min_reps=2, max_reps=2, block_s=1e-9)
        assert events == ["a"] * 4
    finally:
        timing.wait_until_idle = original


def test_warm_up_runs_each_runner_untimed_for_its_time_and_calls():
    """Before the first timed round every runner is called, untimed, until both the warm-up
    time and call count are reached, each after the previous runner's threads idle (alone, no
    wait); the case's timing calls it before interleaving."""
    import inspect
    import time

    from fusedrnn.bench import runner, timing

    events = []
    runners = {"slow": lambda: (events.append("slow"), time.sleep(0.03)),
               "fast": lambda: events.append("fast")}
    original = timing.wait_until_idle
    try:
        timing.wait_until_idle = lambda: events.append("wait")
        t0 = time.perf_counter()
        made = timing.warm_up(runners, warmup_s=0.05, min_calls=3)
        assert time.perf_counter() - t0 >= 0.1
        assert made["slow"] == 3 and made["fast"] >= 3
        assert events == ["wait"] + ["slow"] * 3 + ["wait"] + ["fast"] * made["fast"]
        events.clear()
        assert timing.warm_up({"fast": runners["fast"]}, warmup_s=0.0, min_calls=2) == {"fast": 2}
        assert events == ["fast", "fast"]
    finally:
        timing.wait_until_idle = original
    source = inspect.getsource(runner)
    assert source.index("timing.warm_up(timed)") < source.index("timing.interleave(timed")


def test_a_peer_that_fails_to_run_is_in_the_summary(tmp_path, capsys, monkeypatch):
    """A peer raising in its warm-up call printed a traceback and a skip note in its case's
    progress line, and nothing in the summary."""
    pytest.importorskip("torch")
    from fusedrnn.bench.peers import torch_nn

    def broken(self):
        raise RuntimeError("peer boom")
    monkeypatch.setattr(torch_nn.TorchRunner, "__call__", broken)
    status, data, out = run_json(tmp_path, capsys, *TINY, "--cells", "rnn", "--mode", "infer",
                                 "--peers", "torch")
    assert "PEER FAILED TO RUN" in out and "torch in" in out and "peer boom" in out


def test_a_peer_that_fails_to_build_is_in_the_summary(tmp_path, capsys, monkeypatch):
    """A peer whose prepare() raised (an ONNX model its checker refuses, say) was left out of
    its cases with a note in their progress lines only: the summary and RESULTS.md said
    nothing, and its empty columns read as "not installed" or "inference only"."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fusedrnn.bench.peers import onnx_runtime

    def broken(onnx, problem):
        raise ValueError("model boom")
    monkeypatch.setattr(onnx_runtime, "build_model", broken)
    _, data, out = run_json(tmp_path, capsys, *TINY, "--cells", "rnn", "--mode", "infer",
                            "--peers", "onnxruntime")
    line, = [line for line in report.summary(data) if line.startswith("PEER FAILED TO BUILD")]
    assert "onnxruntime in T3-B2-I4-H5-L1 rnn infer t=1: ValueError: model boom" in line
    assert line in report.markdown(data)


def test_a_plot_that_cannot_be_written_is_said_and_fails_the_run(tmp_path, capsys, monkeypatch):
    """A format whose backend fails (.pgf without LaTeX) ended the run in a traceback after
    the timing, before "done"."""
    pytest.importorskip("matplotlib")

    def broken(data, path):
        raise RuntimeError("no latex")
    monkeypatch.setattr(report, "plot", broken)
    status = cli.main([*TINY, "--cells", "rnn", "--mode", "infer", "--peers", "reference",
                       "--plot", str(tmp_path / "out.png")])
    out = capsys.readouterr().out
    assert status == 1
    assert "PLOT NOT WRITTEN" in out and "no latex" in out and "done in" in out


@pytest.mark.parametrize("content,says", [
    (None, "cannot read"), ("nope", "is not JSON"), ('{"a": 1}', "is not a results file"),
])
def test_report_refuses_what_it_cannot_render(tmp_path, capsys, content, says):
    """python -m fusedrnn.bench.report on a missing file, text or another JSON: tracebacks."""
    path = tmp_path / "in.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as e:
        report.main([str(path)])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_a_negative_value_of_another_option_is_not_blamed_on_sizes(capsys):
    """The check for a --sizes value starting with a minus read every such token: `--threads
    -1` said "argument --sizes: every size must be >= 1"."""
    with pytest.raises(SystemExit):
        cli.main(["--quick", "--threads", "-1"])
    err = capsys.readouterr().err.splitlines()[-1]  # (the usage lines name every option)
    assert "argument --threads" in err and "--sizes" not in err


def test_a_fault_only_at_the_full_shape_fails_the_check(tmp_path, capsys, monkeypatch):
    """The check against the reference ran on the first 10 steps and 4 batch rows only: a
    fusedrnn fault on the timed shape's paths alone (here: batches of 8 or more) passed it, and
    with no peer at full size the run exited 0. The full shape's first and last rows are now
    checked too."""
    from fusedrnn.bench.peers import ours

    real = ours.FusedrnnPeer.prepare

    def faulty(self, problem, mode):
        runner = real(self, problem, mode)
        outputs = runner.outputs

        def wrong(result):
            out = outputs(result)
            if out["y"].shape[1] >= 8:
                out["y"] = out["y"].copy()
                out["y"][:, -1] += 0.1
            return out
        runner.outputs = wrong
        return runner
    monkeypatch.setattr(ours.FusedrnnPeer, "prepare", faulty)
    status, data, out = run_json(tmp_path, capsys, "--quick", "--sizes", "12,9,4,5,1",
                                 "--threads", "1", "--cells", "lstm", "--peers", "none")
    assert status == 1
    assert all(not rec["check"]["ok"] and not rec["check"]["full_rows"]["ok"]
               and rec["check"]["forward_error"] < rec["check"]["forward_tol"]
               for rec in data["cases"])
    assert "CHECK FAILED" in out
