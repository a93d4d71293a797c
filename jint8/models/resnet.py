"""ImageNet-style ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition").

``ResNetBackbone`` (7x7/2 stem, 3x3/2 max pool, four residual stages) returns the stride-8/16/32 feature
maps C3, C4, C5 for a detection FPN; ``ResNet`` adds global average pooling and the classifier. Shortcuts
are the identity, or a 1x1 conv projection + BN where the shape changes (option B). A bottleneck downsamples
in its 3x3 conv ("ResNet v1.5", as torchvision). Every BN gamma starts at 1 (no zero-init of the last one).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jint8.models.common import ConvBN, check_images, classifier_head, scale_channels


def _shortcut(x: jax.Array, features: int, strides: int, train: bool, dtype: Any) -> jax.Array:
  if strides == 1 and x.shape[-1] == features:
    return x
  return ConvBN(features, (1, 1), strides, activation=None, dtype=dtype, name='shortcut')(x, train)


class BasicBlock(nn.Module):
  """Two 3x3 convs; ``features`` output channels."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = ConvBN(self.features, (3, 3), self.strides, dtype=self.dtype)(x, train)
    y = ConvBN(self.features, (3, 3), activation=None, dtype=self.dtype)(y, train)
    return nn.relu(y + _shortcut(x, self.features, self.strides, train, self.dtype))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand; ``4 * features`` output channels."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = self.features * self.expansion
    y = ConvBN(self.features, (1, 1), dtype=self.dtype)(x, train)
    y = ConvBN(self.features, (3, 3), self.strides, dtype=self.dtype)(y, train)
    y = ConvBN(out, (1, 1), activation=None, dtype=self.dtype)(y, train)
    return nn.relu(y + _shortcut(x, out, self.strides, train, self.dtype))


def residual_stages(x: jax.Array, train: bool, *, block: type[nn.Module], stage_sizes: Sequence[int],
                    features: int, dtype: Any) -> list[jax.Array]:
  """Runs residual stages: stage i has ``stage_sizes[i]`` blocks of ``features * 2**i`` channels, and every
  stage after the first starts with a stride-2 block. Returns the output of each stage.

  Call inside a compact method: the blocks become submodules of the caller.
  """
  outputs = []
  for i, num_blocks in enumerate(stage_sizes):
    for j in range(num_blocks):
      x = block(features * 2**i, strides=2 if i > 0 and j == 0 else 1, dtype=dtype)(x, train)
    outputs.append(x)
  return outputs


# depth -> (blocks per stage, block type)
RESNET_STAGES = {
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), Bottleneck),
    101: ((3, 4, 23, 3), Bottleneck),
    152: ((3, 8, 36, 3), Bottleneck),
}


class ResNetBackbone(nn.Module):
  """ResNet trunk; returns ``{'C3': ..., 'C4': ..., 'C5': ...}`` at strides 8, 16 and 32.

  ``width`` scales every channel count (1.0: 64 stem channels).
  """
  depth: int = 50
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> dict[str, jax.Array]:
    if self.depth not in RESNET_STAGES:
      raise ValueError(f'ResNet depth must be one of {sorted(RESNET_STAGES)}, got {self.depth}')
    stage_sizes, block = RESNET_STAGES[self.depth]
    features = scale_channels(64, self.width)
    x = jnp.asarray(check_images(x), self.dtype)
    x = ConvBN(features, (7, 7), 2, dtype=self.dtype)(x, train)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    outputs = residual_stages(x, train, block=block, stage_sizes=stage_sizes, features=features,
                              dtype=self.dtype)
    return dict(zip(('C3', 'C4', 'C5'), outputs[1:]))


class ResNet(nn.Module):
  """ImageNet-style ResNet classifier: ``ResNetBackbone`` (submodule ``backbone``) + pooling + Dense."""
  num_classes: int
  depth: int = 50
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    features = ResNetBackbone(depth=self.depth, width=self.width, dtype=self.dtype, name='backbone')(x, train)
    return classifier_head(features['C5'], self.num_classes, self.dtype)
