"""Shared pytest fixtures (kept small on purpose)."""
import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A NumPy Generator seeded from the test's id, so every test is reproducible on its own."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
