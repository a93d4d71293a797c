"""The data-parallel mesh (``jint8.sharding``)."""

import jax
import pytest

import tiny
from jint8 import sharding


def test_training_mesh_checks_the_batch_sizes():
  assert sharding.training_mesh(tiny.config()).size == jax.device_count()
  with pytest.raises(ValueError, match=r'config.eval_batch_size=0 must be a positive multiple'):
    sharding.training_mesh(tiny.config(eval_batch_size=0))
