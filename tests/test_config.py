"""ISA selection, FUSEDRNN_ISA, threads and show_config()."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _C


def run_python(code, *flags, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=120)


@pytest.mark.parametrize("isa", list(_C.available_isas()))
def test_fusedrnn_isa_forces_a_build(isa):
    r = run_python("import fusedrnn; print(fusedrnn._C.isa())", FUSEDRNN_ISA=isa)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == isa


def test_unknown_isa_fails_at_import_with_a_clear_message():
    r = run_python("import fusedrnn", FUSEDRNN_ISA="sse9000")
    assert r.returncode != 0
    assert "FUSEDRNN_ISA=sse9000 is not an ISA name (lower case" in r.stderr
    assert "this machine runs: generic" in r.stderr
    # the extension is installed and loaded: no advice to install or rebuild it
    assert "pip install" not in r.stderr and "build _C" not in r.stderr
    r = run_python("import fusedrnn", FUSEDRNN_ISA="AVX2")
    assert "FUSEDRNN_ISA=AVX2 is not an ISA name" in r.stderr


def test_an_isa_this_machine_cannot_run_fails_at_import_with_a_clear_message():
    missing = [i for i in ("avx2", "avx512", "amx") if i not in _C.available_isas()]
    if not missing:
        pytest.skip("this machine runs every ISA")
    r = run_python("import fusedrnn", FUSEDRNN_ISA=missing[0])
    assert r.returncode != 0
    assert f"FUSEDRNN_ISA={missing[0]} is not available here" in r.stderr


def test_a_bad_thread_policy_variable_fails_at_import_naming_it():
    r = run_python("import fusedrnn", FUSEDRNN_THREAD_POLICY="bogus")
    assert r.returncode != 0
    assert "FUSEDRNN_THREAD_POLICY=bogus is not a thread policy" in r.stderr
    assert "adaptive, fixed" in r.stderr


def test_default_is_the_widest_fma_build_and_amx_only_when_named():
    """The tiles run when FUSEDRNN_ISA (or a call's isa) names them, never by default (see
    csrc/dispatch.cpp: on a shared host they lost to the AVX-512 build)."""
    r = run_python("import fusedrnn; print(fusedrnn._C.isa())", FUSEDRNN_ISA="")
    order = ["avx512", "avx2", "generic"]
    best = next(i for i in order if i in _C.available_isas())
    assert r.stdout.strip() == best
    if "amx" in _C.available_isas():
        r = run_python("import fusedrnn; print(fusedrnn._C.isa())", FUSEDRNN_ISA="amx")
        assert r.stdout.strip() == "amx"


def test_show_config_reports_isa_and_threads(capsys):
    fusedrnn.show_config()
    out = capsys.readouterr().out
    assert f"isa: {_C.isa()}" in out and "num_threads" in out and "openmp" in out


def _proc_cpuinfo_field(name):
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def test_the_weight_prefetch_distance_is_the_one_measured_for_this_cpu():
    """The micro-kernels prefetch their weight panels 16 k-steps ahead on Intel; on AMD only the
    AVX-512 kernels up to Zen 4 (cpu family 25), 24 ahead, and none from Zen 5 on (family 26),
    each measured best there (csrc/common.h, prefetch_b_ahead). The family is decoded from
    cpuid (base plus extended family), checked here against Linux's decoding of it."""
    vendor, family = _proc_cpuinfo_field("vendor_id"), _proc_cpuinfo_field("cpu family")
    if vendor is None or family is None:
        pytest.skip("no x86 /proc/cpuinfo here to check the CPU's family against")

    def expected(isa):
        if vendor != "AuthenticAMD":
            return 16
        return 24 if isa in ("avx512", "amx") and int(family) <= 25 else 0

    isas = _C.available_isas()
    assert {isa: _C.prefetch_ahead(isa) for isa in isas} == {isa: expected(isa) for isa in isas}
    assert fusedrnn._config.config()["prefetch_ahead"] == expected(_C.isa())


@pytest.mark.parametrize("cpuinfo", [None, "processor\t: 0\nBogoMIPS\t: 50.00\n"],
                         ids=["no /proc", "no model name"])
def test_the_cpu_is_named_where_proc_cpuinfo_does_not_name_it(monkeypatch, cpuinfo):
    """Without /proc/cpuinfo (macOS, Windows) or a "model name" line in it (Linux on ARM),
    show_config()'s cpu is what the platform module says, never empty."""
    import builtins
    import io
    import platform
    from fusedrnn import _config
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if path != "/proc/cpuinfo":
            return real_open(path, *args, **kwargs)
        if cpuinfo is None:
            raise FileNotFoundError(path)
        return io.StringIO(cpuinfo)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert _config.config()["cpu"] == platform.machine() != ""
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert _config._cpu_model() == "arm"


def test_threads_set_get_and_refuse_bad_values():
    before = fusedrnn.get_num_threads()
    try:
        fusedrnn.set_num_threads(1)
        assert fusedrnn.get_num_threads() == 1
        with pytest.raises(ValueError, match="num_threads must be >= 1"):
            fusedrnn.set_num_threads(0)
        for bad in (1.5, True, np.bool_(True), "2", None):
            with pytest.raises(TypeError, match="num_threads must be an int"):
                fusedrnn.set_num_threads(bad)
        fusedrnn.set_num_threads(np.int64(2))   # (as torch.set_num_threads and the layers' sizes)
        assert fusedrnn.get_num_threads() == (2 if _C.openmp else 1)
        assert type(fusedrnn.get_num_threads()) is int
        fusedrnn.set_num_threads(1)
        # (past C's int: pybind11's "incompatible function arguments", naming no argument)
        for n in (-1, -2**31 - 1, -10**30):
            with pytest.raises(ValueError, match=f"num_threads must be >= 1, got {n}"):
                fusedrnn.set_num_threads(n)
        # GNU OpenMP ends the process where it cannot start the threads: refused up front
        for n in (1025, 10**6, 10**30):
            with pytest.raises(ValueError, match="num_threads must be <= 1024"):
                fusedrnn.set_num_threads(n)
        with pytest.raises(ValueError, match="num_threads must be <= 1024"):
            _C.set_num_threads(1025)
        fusedrnn.set_num_threads(1024)   # (no kernel runs on them here)
        # without OpenMP the kernels run on one thread, and the count says so
        assert fusedrnn.get_num_threads() == (1024 if _C.openmp else 1)
    finally:
        fusedrnn.set_num_threads(before)


def test_omp_num_threads_is_the_default():
    if not _C.openmp:
        pytest.skip("built without OpenMP")
    r = run_python("import fusedrnn; print(fusedrnn.get_num_threads())", OMP_NUM_THREADS="1")
    assert r.stdout.strip() == "1"
    r = run_python("import fusedrnn; print(fusedrnn.get_num_threads())", OMP_NUM_THREADS="5000")
    assert r.stdout.strip() == "1024"


FORK_AFTER_THREADS = """
import os, time
import numpy as np
import fusedrnn
fusedrnn.set_num_threads(2)
lstm = fusedrnn.LSTM(32, 128, seed=1)
x = np.random.default_rng(0).standard_normal((60, 16, 32), dtype=np.float32)

def train_step():
    y, _ = lstm(x)
    dx, _ = lstm.backward(np.cos(y))
    return y, dx

want = train_step()                         # the parent's OpenMP threads now exist
pid = os.fork()
if pid == 0:
    got = train_step()                      # hung in libgomp before the child went to one thread
    try:
        fusedrnn.set_num_threads(2)
        os._exit(4)
    except RuntimeError as e:
        ok = "fork" in str(e) and "spawn" in str(e)
    same = all(np.array_equal(a, b) for a, b in zip(got, want))
    os._exit(0 if ok and same and fusedrnn.get_num_threads() == 1 else 3)
deadline = time.time() + 60
while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child", os.waitstatus_to_exitcode(status))
        break
    time.sleep(0.1)
else:
    os.kill(pid, 9)
    print("child hung")
"""


def test_a_forked_child_runs_on_one_thread_instead_of_hanging():
    if not _C.openmp:
        pytest.skip("built without OpenMP")
    r = run_python(FORK_AFTER_THREADS)
    assert r.stdout.strip() == "child 0", r.stdout + r.stderr


DENORMALS_IN_TORCH_AFTER_A_CALL = """
import threading
import numpy as np
import fusedrnn
import torch
fusedrnn.set_num_threads(2)
torch.set_num_threads(2)

def flushed_by_torch_after_a_call():
    lstm = fusedrnn.LSTM(16, 64, seed=0).eval()      # the call starts this thread's workers
    lstm(np.random.default_rng(0).standard_normal((20, 8, 16), dtype=np.float32))
    tiny = torch.full((1 << 22,), 1e-38) * 1e-3      # torch's parallel work, on those workers
    return int((tiny == 0).sum())

flushed = [flushed_by_torch_after_a_call()]
t = threading.Thread(target=lambda: flushed.append(flushed_by_torch_after_a_call()))
t.start(); t.join()
print(flushed)
"""


def test_openmp_workers_keep_the_callers_denormals():
    """The kernels flush denormals inside; workers they start must not inherit that for good
    (torch shares the libgomp, and its parallel work would flush on them)."""
    pytest.importorskip("torch")
    if not _C.openmp:
        pytest.skip("built without OpenMP")
    r = run_python(DENORMALS_IN_TORCH_AFTER_A_CALL)
    assert r.stdout.strip() == "[0, 0]", r.stdout + r.stderr


TORCH_SETS_THE_THREADS = """
import torch
import fusedrnn
torch.set_num_threads(1)
followed = fusedrnn.get_num_threads()
fusedrnn.set_num_threads(2)
torch.set_num_threads(1)
print(followed, fusedrnn.get_num_threads())
"""


def test_torch_set_num_threads_sets_ours_until_we_set_them():
    """As the README says: torch and fusedrnn share libgomp's thread count, which
    fusedrnn.set_num_threads overrides for fusedrnn alone."""
    pytest.importorskip("torch")
    if not _C.openmp:
        pytest.skip("built without OpenMP")
    r = run_python(TORCH_SETS_THE_THREADS)
    assert r.stdout.strip() == "1 2", r.stdout + r.stderr


MEMORY_KEPT_AFTER_A_LAYER = """
import gc
import numpy as np
import fusedrnn

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

layer = fusedrnn.LSTM(256, 512, seed=0)
x = np.random.default_rng(0).standard_normal((100, 32, 256)).astype(np.float32)
base = rss_mib()
y, _ = layer(x)
layer.backward(np.ones_like(y))
layer.eval()(x)
del layer, y
gc.collect()
kept = rss_mib() - base
fusedrnn.empty_cache()
print(round(kept), round(rss_mib() - base))
"""


def test_empty_cache_gives_the_kept_memory_back():
    """Blocks kept for reuse and packed weights outlive the layer; empty_cache frees them."""
    kept, after = (float(v) for v in run_python(MEMORY_KEPT_AFTER_A_LAYER).stdout.split())
    assert kept > 30          # MiB: what the test is about (the blocks of one training step)
    assert after < 0.2 * kept


def test_workspace_bytes_count_the_kernels_blocks():
    """_C.workspace_bytes: the arrays the kernels make are in use while alive (as asked for, not
    their size classes), the peak keeps the most at once until reset, and freed blocks go idle."""
    import numpy as np
    a = np.zeros((100, 64, 128), np.float32)       # 3.1 MiB: the kernels' y is its size
    h0 = np.zeros((64, 128), np.float32)
    w = np.zeros((128, 128), np.float32)

    def forward():
        return fusedrnn.functional.forward("rnn_tanh", a, h0, None, w, w, None, None,
                                           training=False)[:2]

    forward()                                      # (the threads' lasting buffers)
    fusedrnn.empty_cache()
    before = _C.workspace_bytes(reset_peak=True)
    assert before["idle"] == 0 and before["peak"] == before["in_use"]
    y, hn = forward()
    _C.packed_cache(clear=True)                    # (the call's packed weights, kept)
    during = _C.workspace_bytes()
    assert during["in_use"] - before["in_use"] == y.nbytes + hn.nbytes
    del y, hn
    after = _C.workspace_bytes()
    assert after["in_use"] == before["in_use"]
    assert after["peak"] >= during["in_use"]
    assert after["idle"] >= a.nbytes              # y's block, kept for reuse
    assert _C.workspace_bytes(reset_peak=True)["peak"] == after["in_use"]


def test_the_torch_adapter_without_torch_says_what_it_needs():
    r = run_python("import sys; sys.modules['torch'] = None; import fusedrnn.torch")
    assert r.returncode != 0
    assert "fusedrnn.torch needs PyTorch" in r.stderr and "pip install torch" in r.stderr


def test_a_tree_without_the_compiled_module_says_so(tmp_path):
    """fusedrnn's Python files without _C (a source tree not built for this Python) name what
    is missing; Python alone blamed 'a circular import'."""
    import shutil
    shutil.copytree(os.path.dirname(fusedrnn.__file__), tmp_path / "fusedrnn",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    # -S: no site-packages, so no installed fusedrnn takes the import instead of the copy on
    # PYTHONPATH (an editable install's import hook, from a .pth file, takes it before PYTHONPATH)
    r = run_python("import fusedrnn", "-S", PYTHONPATH=str(tmp_path))
    assert r.returncode != 0
    assert "fusedrnn's compiled module fusedrnn._C did not import for this Python" in r.stderr
    assert str(tmp_path / "fusedrnn") in r.stderr and "pip install ." in r.stderr
    # why, without Python's own guess ("most likely due to a circular import")
    assert "there is no built _C there" in r.stderr and "circular import" not in r.stderr


def test_a_tree_with_another_python_s_or_a_broken_compiled_module_says_which(tmp_path):
    import importlib.machinery
    import shutil
    package = tmp_path / "fusedrnn"
    shutil.copytree(os.path.dirname(fusedrnn.__file__), package,
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    other = "_C.cpython-99-x86_64-linux-gnu.so"   # built for another Python: never tried
    (package / other).write_bytes(b"")
    r = run_python("import fusedrnn", "-S", PYTHONPATH=str(tmp_path))
    assert r.returncode != 0
    assert f"the _C there is built for another Python ({other})" in r.stderr
    assert "circular import" not in r.stderr
    ours = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]   # this Python's, but no library
    (package / ours).write_bytes(b"not an ELF file")
    r = run_python("import fusedrnn", "-S", PYTHONPATH=str(tmp_path))
    assert r.returncode != 0
    assert f"{package / ours} did not load: " in r.stderr and "circular import" not in r.stderr
