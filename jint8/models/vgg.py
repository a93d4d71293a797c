"""VGG with batch normalization (Simonyan & Zisserman 2015; BN after every conv), CIFAR variant.

3x3 convs without bias, each followed by BN and ReLU, five 2x2 max pools (32x32 -> 1x1), then a single Dense
classifier on the 512 features (the common CIFAR head, e.g. kuangliu/pytorch-cifar) instead of the ImageNet
4096-4096 MLP. VGG-16 with 10 classes has 14,724,042 parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jint8.models.common import ConvBN, check_images, classifier_head, scale_channels

# depth -> conv channels, 'M' = 2x2 max pool (the paper's configurations A, B, D, E)
VGG_LAYERS = {
    11: (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'),
    13: (64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'),
    16: (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'),
    19: (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M', 512, 512, 512, 512,
         'M'),
}


class VGG(nn.Module):
  """VGG-``depth`` with BN for 32x32 inputs; ``width`` scales every channel count."""
  num_classes: int
  depth: int = 16
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    if self.depth not in VGG_LAYERS:
      raise ValueError(f'VGG depth must be one of {sorted(VGG_LAYERS)}, got {self.depth}')
    x = jnp.asarray(check_images(x), self.dtype)
    for layer in VGG_LAYERS[self.depth]:
      if layer == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = ConvBN(scale_channels(layer, self.width), (3, 3), dtype=self.dtype)(x, train)
    return classifier_head(x, self.num_classes, self.dtype)
