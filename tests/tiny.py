"""What the tests of the training framework and its tasks train: a small CNN and the smoke config."""

from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from configs import smoke


class TinyCNN(nn.Module):
  """Three convs (the first stays float under int8, the other two are int8), BN, and a Dense classifier."""
  num_classes: int
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    features = max(1, round(8 * self.width))
    for i, strides in enumerate((1, 2, 2)):
      x = nn.Conv(features * (1 + i // 2), (3, 3), strides=strides, use_bias=False, dtype=self.dtype)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x.mean(axis=(1, 2))).astype(jnp.float32)


def config(**overrides) -> ml_collections.ConfigDict:
  """``configs/smoke.py`` with ``overrides``."""
  config = smoke.get_config()
  config.update(overrides)
  return config
