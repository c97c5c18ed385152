"""Shared pytest fixtures (kept small on purpose)."""
import zlib

import numpy as np
import pytest


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
