"""Shared test fixtures."""

import zlib

import jax
import numpy as np
import pytest


@pytest.fixture
def rng(request):
  """A numpy generator seeded from the test's name: fresh data per test, the same on every run."""
  return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.fixture
def fast_compiles():
  """Turns most XLA optimizations off for the test: interpreted Pallas kernels compile 2x faster."""
  old = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', old)
