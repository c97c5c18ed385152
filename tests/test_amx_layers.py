"""The layer-level suites again on the amx build, where this CPU runs it.

The amx build runs only when named (FUSEDRNN_ISA=amx, or a call's isa; csrc/dispatch.cpp), and
the layers and the torch adapter take the process's ISA: the kernel suites name every ISA per
call, but these files would otherwise never meet the tiles (a frozen layer's split weights kept
across calls, the adapter's autograd on them, ...). One child pytest, about 30 s on 2 cores.
"""
import os
import subprocess
import sys

import pytest

from fusedrnn import _C

LAYER_SUITES = ("test_layers.py", "test_layers_torch.py", "test_frozen.py", "test_torch_adapter.py",
                "test_torch_frozen.py", "test_torch_convert.py", "test_torch_ecosystem.py",
                "test_torch_low_precision.py", "test_onnx_ops.py")

pytestmark = pytest.mark.skipif("amx" not in _C.available_isas(),
                                reason="this CPU does not run AMX")


def test_the_layer_suites_pass_on_the_amx_build():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, FUSEDRNN_ISA="amx")
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider",
                        *(os.path.join(here, f) for f in LAYER_SUITES)],
                       cwd=os.path.dirname(here), env=env, capture_output=True, text=True,
                       timeout=900)
    tail = "\n".join((r.stdout + r.stderr).splitlines()[-40:])
    # (its report header, which -q would drop, names the ISA: conftest.py)
    assert "(isa amx," in r.stdout, f"the child did not run the amx build:\n{tail}"
    assert r.returncode == 0, f"the layer suites failed on the amx build:\n{tail}"
    assert " passed" in tail and " failed" not in tail, tail


def test_the_amx_builds_process_gauges_answer():
    """_C.team_barrier_ns and _C.cache_bytes ask the process's build (no isa argument), so the
    amx build's answer them only under FUSEDRNN_ISA=amx: a time a meeting for two threads, zero
    for one, and the same caches as the default build sees."""
    code = ("import fusedrnn; from fusedrnn import _C; fusedrnn.set_num_threads(2); "
            "ns = _C.team_barrier_ns(2000); fusedrnn.set_num_threads(1); "
            "print(_C.isa(), ns, _C.team_barrier_ns(100), _C.cache_bytes()['l2'], "
            "_C.cache_bytes()['l3'])")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, FUSEDRNN_ISA="amx"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    isa, two, one, l2, l3 = r.stdout.split()
    assert isa == "amx"
    if _C.openmp:
        assert 0 < float(two) < 1e6, two  # a meeting, not a stall
    assert float(one) == 0
    assert (int(l2), int(l3)) == (_C.cache_bytes()["l2"], _C.cache_bytes()["l3"])
