"""Shared test fixtures."""

import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
  """A numpy generator seeded from the test's name: fresh data per test, the same on every run."""
  return np.random.default_rng(zlib.crc32(request.node.name.encode()))
