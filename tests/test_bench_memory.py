"""Tests of the training peak-memory measurement (fusedrnn.bench.memory): the analytic sizes by
hand and against the kernels' own saved state, real measurements in fresh processes on a size
big enough to see (several MiB), the command line's JSON, and the report's section."""
import json
import shutil
import sys

import numpy as np
import pytest

import fusedrnn
from fusedrnn import functional
from fusedrnn.bench import cases, cli, memory, peak, report

F32 = 4
MEASURED = cases.custom_config(50, 32, 256, 256, 1)     # needs several MiB: well above noise
TINY = ["--quick", "--sizes", "3,2,4,5,1", "--threads", "1"]

needs_linux = pytest.mark.skipif(memory.unavailable_reason() is not None,
                                 reason="peak memory is measured on Linux only")


# -- what BPTT needs

@pytest.mark.parametrize("cell, saved", [
    # T=5 B=3 I=7 H=4: h (T+1)*B*H = 72, gates T*B*G*H = 60*G, c like h, GRU extra T*B*H = 60
    ("rnn", 72),
    ("rnn_relu", 72),
    ("lstm", 72 + 72 + 240),
    ("gru", 72 + 180 + 60),
])
def test_needed_bytes_by_hand(cell, saved):
    G = cases.GATES[cell]
    got = memory.needed_bytes(cases.custom_config(5, 3, 7, 4, 1), cell)
    assert got == {"saved": saved * F32, "x": 105 * F32, "y": 60 * F32, "dx": 105 * F32,
                   "weight_grads": (G * 4 * (7 + 4) + 2 * G * 4) * F32}


def test_needed_bytes_of_a_stack_keep_each_layers_input():
    one = memory.needed_bytes(cases.custom_config(5, 3, 7, 4, 1), "lstm")
    two = memory.needed_bytes(cases.custom_config(5, 3, 7, 4, 2), "lstm")
    # layer 2 saves what layer 1 saves, plus its input (layer 1's y, T*B*H = 60)
    assert two["saved"] == 2 * one["saved"] + 60 * F32
    assert two["weight_grads"] == one["weight_grads"] + (4 * 4 * (4 + 4) + 2 * 4 * 4) * F32


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_needed_bytes_of_a_bidirectional_stack_are_what_its_layers_save(cell):
    """Each direction keeps its states and gates, a layer above the first its input (both
    directions' outputs, 2H wide) once for both; the gradients are both directions'."""
    config = cases.bidirectional(cases.custom_config(6, 3, 5, 4, 2))
    layer = getattr(fusedrnn, cell.upper())(5, 4, num_layers=2, bidirectional=True, seed=0)
    layer(np.zeros((6, 3, 5), np.float32))
    ctxs = layer._saved[0].ctxs
    saved = sum(ctx.saved_bytes for pair in ctxs for ctx in pair)  # (states and gates)
    above = ctxs[1][0].x_bytes  # layer 1's input, layer 0's y: one array both directions keep
    assert above == ctxs[1][1].x_bytes == 6 * 3 * 8 * F32
    need = memory.needed_bytes(config, cell)
    assert need["saved"] == saved + above
    assert need["weight_grads"] == sum(p.nbytes for _, p in layer.named_parameters())
    assert need["y"] == 6 * 3 * 8 * F32


@pytest.mark.parametrize("cell", cases.CELLS)
def test_needed_bytes_are_what_the_kernels_save(cell):
    config = cases.custom_config(6, 3, 5, 4, 1)
    p = cases.make_problem(config, cell)
    w = p.layers[0]
    c0 = None if p.c0 is None else p.c0[0]
    *_, ctx = functional.forward(p.kernel_cell, p.x, p.h0[0], c0, w["w_ih"], w["w_hh"],
                                 w["b_ih"], w["b_hh"], training=True)
    assert ctx.saved_bytes == memory.needed_bytes(config, cell)["saved"]


# -- measurements in fresh processes

@needs_linux
def test_fusedrnn_peak_is_measured():
    got = memory.measure(MEASURED, "lstm", "fusedrnn")
    need = memory.needed_bytes(MEASURED, "lstm")
    assert got["version"] and got["rss_before_bytes"] > 0
    assert 0 < got["resident_after_bytes"] <= got["peak_extra_bytes"]  # its workspace stays
    # While backward runs, the saved state, y, dx and the weight gradients all exist at once.
    floor = need["saved"] + need["y"] + need["dx"] + need["weight_grads"]
    assert floor <= got["peak_extra_bytes"] < 8 * (floor + need["x"])


@needs_linux
@pytest.mark.torch
def test_torch_peak_is_measured():
    pytest.importorskip("torch")
    got = memory.measure(MEASURED, "gru", "torch")
    need = memory.needed_bytes(MEASURED, "gru")
    floor = need["y"] + need["dx"] + need["weight_grads"]
    assert floor <= got["peak_extra_bytes"] < 8 * (floor + need["saved"] + need["x"])


def test_a_missing_peer_is_reported_not_raised(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)        # import raises ImportError
    spec = json.dumps({"peer": "torch", "cell": "rnn",
                       "config": {"name": "t", "T": 2, "B": 1, "I": 3, "H": 3, "L": 1}})
    assert memory.child_main(spec) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["unavailable"].startswith("not installed")


@needs_linux
def test_a_child_that_fails_or_hangs_is_reported_not_measured(monkeypatch):
    """A measurement whose fresh process fails (its last stderr line is the reason) or gives no
    result in time is 'not measured' with the reason, in the record and the progress line; the
    other measurements go on."""
    got = memory.measure(MEASURED, "nope", "fusedrnn")        # the child's KeyError
    assert got["unavailable"].startswith("failed (exit status 1): KeyError"), got
    got = memory.measure(MEASURED, "lstm", "fusedrnn", timeout_s=0.001)
    assert got == {"unavailable": "failed: no result within 0.001 s"}
    monkeypatch.setattr(sys, "executable", shutil.which("false"))   # exits 1, says nothing
    said = []
    data = memory.measure_all([(MEASURED, "rnn")], peers=("fusedrnn",), say=said.append)
    (rec,) = data["records"]
    assert rec["not_measured"] == {"fusedrnn": "failed (exit status 1): no output"}
    assert rec["peak_extra_bytes"] == {} and rec["versions"] == {}
    assert said == [f"memory {MEASURED.name} rnn fusedrnn: not measured, failed (exit status 1): "
                    "no output"]


def test_other_systems_get_a_clear_result(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert memory.measure(MEASURED, "rnn", "fusedrnn") == {"unavailable": memory.NOT_ON_THIS_OS}
    data = memory.measure_all([(MEASURED, "rnn")], say=lambda *a: None)
    assert not data["available"] and data["records"] == []
    assert "not available on this OS" in report.memory_text(data)
    assert "not available on this OS" in "\n".join(report.memory_markdown(data))


# -- the command line and the report

@needs_linux
def test_cli_json(tmp_path, capsys):
    path = tmp_path / "memory.json"
    assert memory.main(["--sizes", "20,8,32,32,1", "--cells", "gru", "--peers", "none",
                        "--json", str(path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert {"method", "threads", "available", "reason", "records"} <= set(data)
    assert data["available"] and data["threads"] == 1
    (rec,) = data["records"]
    assert {"config", "cell", "T", "B", "I", "H", "L", "needed_bytes", "peak_extra_bytes",
            "not_measured", "versions"} <= set(rec)
    assert (rec["config"], rec["cell"]) == ("T20-B8-I32-H32-L1", "gru")
    assert rec["needed_bytes"] == memory.needed_bytes(cases.custom_config(20, 8, 32, 32, 1), "gru")
    assert list(rec["peak_extra_bytes"]) == ["fusedrnn"] and rec["peak_extra_bytes"]["fusedrnn"] > 0
    assert "fusedrnn MiB" in out and "T20-B8-I32-H32-L1" in out


def test_bench_memory_option_takes_the_plans_training_pairs():
    parse = cli.parser().parse_args
    assert not parse([]).memory and parse(["--memory"]).memory
    pairs = cli.memory_pairs(cli.plan(parse(["--quick"])))
    assert [(c.name, cell) for c, cell in pairs] == [
        ("online-small", "rnn"), ("online-small", "lstm"), ("online-small", "gru"),
        ("stacked", "lstm"), ("stacked", "gru")]
    assert cli.memory_pairs(cli.plan(parse(["--configs", "wide", "--mode", "infer"]))) == []


@needs_linux
def test_bench_run_reports_memory(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(peak, "SIZES", (64,))           # structure, not speed: time little
    monkeypatch.setitem(cli.QUICK, "peak_budget_s", 0.0)
    monkeypatch.setitem(cli.QUICK, "budget_s", 0.0)
    path = tmp_path / "out.json"
    assert cli.main([*TINY, "--cells", "rnn", "--mode", "train", "--peers", "none", "--memory",
                     "--json", str(path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    (rec,) = data["memory"]["records"]
    assert (rec["config"], rec["cell"]) == ("T3-B2-I4-H5-L1", "rnn")
    assert rec["peak_extra_bytes"]["fusedrnn"] >= 0 and rec["not_measured"] == {}
    assert "fusedrnn MiB" in out
    text = report.markdown(data)
    assert "## Training peak memory" in text
    assert "| T3-B2-I4-H5-L1 | rnn |" in text.split("## Training peak memory")[1]
    del data["memory"]
    assert "## Training peak memory" not in report.markdown(data)


def test_memory_table_numbers():
    mib = 1 << 20
    mem = {"method": "m", "threads": 1, "available": True, "reason": None, "records": [
        {"config": "fastrnns", "cell": "lstm", "needed_bytes": {
            "saved": 75 * mib, "x": mib, "y": mib, "dx": mib, "weight_grads": mib},
         "peak_extra_bytes": {"fusedrnn": 200 * mib, "torch": 100 * mib},
         "resident_after_bytes": {"fusedrnn": 150 * mib, "torch": 2 * mib},
         "not_measured": {}, "versions": {}},
        {"config": "fastrnns", "cell": "gru", "needed_bytes": {
            "saved": mib, "x": mib, "y": mib, "dx": mib, "weight_grads": mib},
         "peak_extra_bytes": {"fusedrnn": 3 * mib}, "not_measured": {"torch": "not installed"},
         "versions": {}}]}
    header, rows = report.memory_rows(mem)
    assert rows[0] == ["fastrnns", "lstm", "75.0", "3.0", "200.0", "100.0", "x0.50", "150.0",
                       "2.0"]
    assert rows[1][-4:] == ["-", "-", "-", "-"]   # an older record without "kept" figures
    notes = report.memory_text(mem)
    assert "peak during one call, in a fresh process" in notes and "kept" in notes
    assert "fastrnns gru: torch not measured (not installed)" in report.memory_text(mem)


@needs_linux
@pytest.mark.torch
def test_torch_memory_call_has_no_loss_tensor(monkeypatch, capsys):
    """The child measures torch doing fusedrnn's work: backward of y with dy itself (a loss
    (y * dy).sum() adds one or two T x B x H tensors to torch's peak), dh0 included."""
    torch = pytest.importorskip("torch")
    seen = []
    real = torch.autograd.backward

    def spy(tensors, grad_tensors=None, *a, **k):
        seen.append(tensors)
        return real(tensors, grad_tensors, *a, **k)

    monkeypatch.setattr(torch.autograd, "backward", spy)
    spec = json.dumps({"peer": "torch", "cell": "lstm",
                       "config": {"name": "t", "T": 4, "B": 2, "I": 3, "H": 5, "L": 1}})
    assert memory.child_main(spec) == 0
    assert "peak_extra_bytes" in json.loads(capsys.readouterr().out.splitlines()[-1])
    assert len(seen) == 2                            # the warm-up call, then the measured one
    assert seen[0].dim() == 3 and seen[1].shape == (4, 2, 5)     # y, not a scalar loss
