"""MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks"), CIFAR variant.

The CIFAR variant of kuangliu/pytorch-cifar: the stem conv and the first block of the 24-channel stage use
stride 1 instead of 2, so a 32x32 input reaches the last stage at 4x4 (total stride 8 instead of 32).
Otherwise as the paper and torchvision: a block with expansion 1 has no expansion conv, a block has a
residual connection only when its stride is 1 and its input and output channels match (no projection
shortcuts), ReLU6, and channel counts ``make_divisible(c * width, 8)``. With 1000 classes it has
torchvision's 3,504,872 parameters (strides do not change parameter counts).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jint8.models.common import ConvBN, check_images, classifier_head

# (expansion t, output channels c, blocks n, stride s of the first block): the paper's Table 2, with the
# second row at stride 1 for CIFAR.
CIFAR_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                  (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds ``value`` to a multiple of ``divisor`` (at least ``divisor``), never going down by over 10%."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
  """1x1 expansion (skipped when ``expansion == 1``), 3x3 depthwise, linear 1x1 projection."""
  features: int
  expansion: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    hidden = x.shape[-1] * self.expansion
    y = x
    if self.expansion != 1:
      y = ConvBN(hidden, (1, 1), activation=nn.relu6, dtype=self.dtype)(y, train)
    y = ConvBN(hidden, (3, 3), self.strides, feature_group_count=hidden, activation=nn.relu6,
               dtype=self.dtype)(y, train)
    y = ConvBN(self.features, (1, 1), activation=None, dtype=self.dtype)(y, train)
    return x + y if self.strides == 1 and x.shape[-1] == self.features else y


class MobileNetV2(nn.Module):
  """MobileNetV2 for 32x32 inputs (CIFAR variant); ``width`` is the paper's width multiplier."""
  num_classes: int
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    if self.width <= 0:
      raise ValueError(f'width multiplier must be positive, got {self.width}')
    x = jnp.asarray(check_images(x), self.dtype)
    x = ConvBN(make_divisible(32 * self.width), (3, 3), activation=nn.relu6, dtype=self.dtype)(x, train)
    for expansion, channels, num_blocks, strides in CIFAR_SETTINGS:
      for i in range(num_blocks):
        x = InvertedResidual(make_divisible(channels * self.width), expansion, strides if i == 0 else 1,
                             dtype=self.dtype)(x, train)
    # As in the paper, the last conv is not made narrower for width < 1.
    x = ConvBN(make_divisible(1280 * max(1.0, self.width)), (1, 1), activation=nn.relu6,
               dtype=self.dtype)(x, train)
    return classifier_head(x, self.num_classes, self.dtype)
