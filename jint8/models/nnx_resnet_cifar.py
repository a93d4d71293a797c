"""The CIFAR ResNets of ``resnet_cifar.py`` as Flax NNX modules: ResNet-(6n+2), e.g. ResNet-20 (n=3).

The same network and initialisation as the Linen ``ResNetCifar`` (option-B shortcuts, He-initialised convs without
bias, BN momentum 0.9, every BN gamma at 1), built from ``nnx.Conv``, ``nnx.BatchNorm`` and ``nnx.Linear``, so that
``jint8.nnx.to_int8`` converts it. Called as ``model(x, train)`` on an NHWC batch; returns float32 logits.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jint8.models.common import check_images, conv_kernel_init, scale_channels


class ConvBN(nnx.Module):
  """``nnx.Conv`` without bias (padding ``k // 2``), then ``nnx.BatchNorm``, then ``activation`` (None: none)."""

  def __init__(self, in_features: int, features: int, kernel_size: int, strides: int = 1, *,
               activation: Callable[[jax.Array], jax.Array] | None = nnx.relu, dtype: Any, rngs: nnx.Rngs):
    self.conv = nnx.Conv(in_features, features, (kernel_size, kernel_size), strides,
                         padding=[(kernel_size // 2, kernel_size // 2)] * 2, use_bias=False, dtype=dtype,
                         kernel_init=conv_kernel_init, rngs=rngs)
    self.bn = nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.activation = activation

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = self.bn(self.conv(x), use_running_average=not train)
    return x if self.activation is None else self.activation(x)


class BasicBlock(nnx.Module):
  """Two 3x3 convs and the shortcut: the identity, or a 1x1 conv + BN where the shape changes."""

  def __init__(self, in_features: int, features: int, strides: int, *, dtype: Any, rngs: nnx.Rngs):
    self.conv1 = ConvBN(in_features, features, 3, strides, dtype=dtype, rngs=rngs)
    self.conv2 = ConvBN(features, features, 3, activation=None, dtype=dtype, rngs=rngs)
    projects = strides != 1 or in_features != features
    self.shortcut = ConvBN(in_features, features, 1, strides, activation=None, dtype=dtype, rngs=rngs) \
        if projects else None

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = self.conv2(self.conv1(x, train), train)
    return nnx.relu(y + (x if self.shortcut is None else self.shortcut(x, train)))


class ResNetCifar(nnx.Module):
  """ResNet-``depth`` for 32x32 inputs; ``depth = 6n + 2``. ``width`` scales every channel count."""

  def __init__(self, num_classes: int, depth: int = 20, width: float = 1.0, dtype: Any = jnp.float32, *,
               in_features: int = 3, rngs: nnx.Rngs):
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f'CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 56, ...), got {depth}')
    features = scale_channels(16, width)
    self.dtype = dtype
    self.stem = ConvBN(in_features, features, 3, dtype=dtype, rngs=rngs)
    blocks = []
    for stage in range(3):
      for index in range((depth - 2) // 6):
        width_in, features = features, scale_channels(16, width) * 2 ** stage
        blocks.append(BasicBlock(width_in, features, 2 if stage > 0 and index == 0 else 1, dtype=dtype, rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.classifier = nnx.Linear(features, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = self.stem(jnp.asarray(check_images(x), self.dtype), train)
    for block in self.blocks:
      x = block(x, train)
    return self.classifier(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)
