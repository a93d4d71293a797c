"""CIFAR ResNets (He et al. 2016, Section 4.2): ResNet-(6n+2), e.g. ResNet-20 (n=3) and ResNet-56 (n=9).

A 3x3 conv with 16 channels, then three stages of n basic blocks with 16, 32 and 64 channels (strides 1, 2,
2), global average pooling and a Dense classifier. Shortcuts use option B: the identity, or a 1x1 conv
projection + BN where the shape changes (two projections in all), so ResNet-20 has 272,474 parameters
(269,722 with option A's zero-padding shortcuts) and ResNet-56 855,770 (853,018). Every BN gamma starts at 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jint8.models.common import ConvBN, check_images, classifier_head, scale_channels
from jint8.models.resnet import BasicBlock, residual_stages


class ResNetCifar(nn.Module):
  """ResNet-``depth`` for 32x32 inputs; ``depth = 6n + 2``. ``width`` scales every channel count."""
  num_classes: int
  depth: int = 20
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f'CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 56, ...), got {self.depth}')
    features = scale_channels(16, self.width)
    x = jnp.asarray(check_images(x), self.dtype)
    x = ConvBN(features, (3, 3), dtype=self.dtype)(x, train)
    x = residual_stages(x, train, block=BasicBlock, stage_sizes=((self.depth - 2) // 6,) * 3,
                        features=features, dtype=self.dtype)[-1]
    return classifier_head(x, self.num_classes, self.dtype)
