"""InceptionV3 (Szegedy et al. 2016, "Rethinking the Inception Architecture"), CIFAR variant.

The usual CIFAR adaptation (e.g. weiaicunzai/pytorch-cifar100): the stem keeps torchvision's five convs
but with stride 1, padding on all 3x3 convs except the last, and without the two max pools (32x32 -> 30x30);
then 3x InceptionA, InceptionB (grid reduction to 14x14), 4x InceptionC (factorised 1x7 / 7x1 convs),
InceptionD (to 6x6), 2x InceptionE, global average pooling and a Dense classifier. Block structures and
channel counts are torchvision's; there is no auxiliary classifier and no dropout. With 10 classes it has
21,806,058 parameters. BN epsilon is 1e-5 as in the rest of the zoo (torchvision uses 1e-3).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jint8.models.common import ConvBN, check_images, classifier_head, scale_channels


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)))  # zero padding counted, as in PyTorch


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class _InceptionBlock(nn.Module):
  """Base of the blocks: ``width`` scales every channel count; ``dtype`` is the computation dtype."""
  width: float = 1.0
  dtype: Any = jnp.float32

  def convs(self, x: jax.Array, train: bool, *layers: Sequence[Any]) -> jax.Array:
    """Applies ``ConvBN`` layers given as ``(features, kernel_size[, strides[, padding]])`` in order."""
    for features, kernel_size, *args in layers:
      x = ConvBN(scale_channels(features, self.width), kernel_size, *args, dtype=self.dtype)(x, train)
    return x


class Stem(_InceptionBlock):
  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return self.convs(x, train, (32, (3, 3)), (32, (3, 3)), (64, (3, 3)), (80, (1, 1)),
                      (192, (3, 3), 1, 'VALID'))


class InceptionA(_InceptionBlock):
  pool_features: int = 32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return jnp.concatenate([
        self.convs(x, train, (64, (1, 1))),
        self.convs(x, train, (48, (1, 1)), (64, (5, 5))),
        self.convs(x, train, (64, (1, 1)), (96, (3, 3)), (96, (3, 3))),
        self.convs(_avg_pool_3x3(x), train, (self.pool_features, (1, 1))),
    ], axis=-1)


class InceptionB(_InceptionBlock):
  """Grid reduction with stride-2 3x3 convs."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return jnp.concatenate([
        self.convs(x, train, (384, (3, 3), 2, 'VALID')),
        self.convs(x, train, (64, (1, 1)), (96, (3, 3)), (96, (3, 3), 2, 'VALID')),
        _max_pool_3x3_s2(x),
    ], axis=-1)


class InceptionC(_InceptionBlock):
  """Factorised 7x7 convs (1x7 and 7x1) with ``channels_7x7`` inner channels."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c7 = self.channels_7x7
    return jnp.concatenate([
        self.convs(x, train, (192, (1, 1))),
        self.convs(x, train, (c7, (1, 1)), (c7, (1, 7)), (192, (7, 1))),
        self.convs(x, train, (c7, (1, 1)), (c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)), (192, (1, 7))),
        self.convs(_avg_pool_3x3(x), train, (192, (1, 1))),
    ], axis=-1)


class InceptionD(_InceptionBlock):
  """Grid reduction with a factorised 7x7 branch."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return jnp.concatenate([
        self.convs(x, train, (192, (1, 1)), (320, (3, 3), 2, 'VALID')),
        self.convs(x, train, (192, (1, 1)), (192, (1, 7)), (192, (7, 1)), (192, (3, 3), 2, 'VALID')),
        _max_pool_3x3_s2(x),
    ], axis=-1)


class InceptionE(_InceptionBlock):
  """Expanded filter bank: 3x3 convs factorised into parallel 1x3 and 3x1 convs."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    b3 = self.convs(x, train, (384, (1, 1)))
    b3dbl = self.convs(x, train, (448, (1, 1)), (384, (3, 3)))
    return jnp.concatenate([
        self.convs(x, train, (320, (1, 1))),
        self.convs(b3, train, (384, (1, 3))),
        self.convs(b3, train, (384, (3, 1))),
        self.convs(b3dbl, train, (384, (1, 3))),
        self.convs(b3dbl, train, (384, (3, 1))),
        self.convs(_avg_pool_3x3(x), train, (192, (1, 1))),
    ], axis=-1)


class InceptionV3Cifar(nn.Module):
  """InceptionV3 for 32x32 inputs (at least 9x9); ``width`` scales every channel count."""
  num_classes: int
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = jnp.asarray(check_images(x), self.dtype)
    kw = dict(width=self.width, dtype=self.dtype)
    blocks = [Stem(**kw), InceptionA(pool_features=32, **kw), InceptionA(pool_features=64, **kw),
              InceptionA(pool_features=64, **kw), InceptionB(**kw), InceptionC(channels_7x7=128, **kw),
              InceptionC(channels_7x7=160, **kw), InceptionC(channels_7x7=160, **kw),
              InceptionC(channels_7x7=192, **kw), InceptionD(**kw), InceptionE(**kw), InceptionE(**kw)]
    for block in blocks:
      x = block(x, train)
    return classifier_head(x, self.num_classes, self.dtype)
