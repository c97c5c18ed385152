"""Shared pytest fixtures (kept small on purpose)."""
import pathlib
import zlib

import numpy as np
import pytest

_TREE = pathlib.Path(__file__).resolve().parent.parent / "python" / "fusedrnn"


def pytest_report_header(config):
    """Which fusedrnn the run tests: the installed package, not this tree's python/ (which has no
    _C), so a tree edited since its last `pip install .` would test the old code unnoticed."""
    try:
        import fusedrnn
    except ImportError as e:
        return f"fusedrnn: does not import ({e}); pip install . first"
    pkg = pathlib.Path(fusedrnn.__file__).resolve().parent
    line = (f"fusedrnn {fusedrnn.__version__} from {pkg} (isa {fusedrnn._C.isa()}, "
            f"openmp {bool(fusedrnn._C.openmp)})")
    ext = pathlib.Path(fusedrnn._C.__file__).resolve()
    if ext.parent != pkg:   # an editable install (pip install -e .): its _C is in site-packages
        line += (f"\nNOTE: fusedrnn._C is {ext}, not one in {pkg} (an editable install): a _C "
                 f"copied there, as the README's fast rebuild does, is not the one tested; "
                 f"pip install -e . again after changing csrc/")
    if pkg == _TREE or not _TREE.is_dir():
        return line
    stale = sorted(str(f.relative_to(_TREE)) for f in _TREE.rglob("*.py")
                   if not (pkg / f.relative_to(_TREE)).is_file()
                   or (pkg / f.relative_to(_TREE)).read_bytes() != f.read_bytes())
    if stale:
        line += (f"\nWARNING: the installed fusedrnn differs from this tree's python/fusedrnn in "
                 f"{len(stale)} file(s) ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}):"
                 " these tests run the installed code; pip install . to test this tree")
    return line


@pytest.fixture
def rng(request):
    """A NumPy Generator seeded from the test's id, so every test is reproducible on its own."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def fixed_threads():
    """Calls use the threads set, whatever the adaptive policy measured (tests of the threaded
    paths must run them)."""
    import fusedrnn
    before = fusedrnn.get_thread_policy()
    fusedrnn.set_thread_policy("fixed")
    yield
    fusedrnn.set_thread_policy(before)


@pytest.fixture
def one_thread():
    """Calls run on one thread, and on as many as before after."""
    import fusedrnn
    before = fusedrnn.get_num_threads()
    fusedrnn.set_num_threads(1)
    yield
    fusedrnn.set_num_threads(before)


@pytest.fixture
def two_threads(fixed_threads):
    """Calls run on two threads (with the fixed policy), and on as many as before after."""
    import fusedrnn
    before = fusedrnn.get_num_threads()
    fusedrnn.set_num_threads(2)
    yield
    fusedrnn.set_num_threads(before)
