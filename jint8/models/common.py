"""Layers shared by the model zoo: He-initialised conv + BatchNorm + activation, and the classifier head."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

# He et al. 2015 ("kaiming normal", fan_out mode), the usual init of CNN convs.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def scale_channels(channels: int, width: float) -> int:
  """``channels * width`` rounded to the nearest integer, at least 1."""
  if width <= 0:
    raise ValueError(f'width multiplier must be positive, got {width}')
  return max(1, int(round(channels * width)))


def check_images(x: jax.Array) -> jax.Array:
  """Raises a ValueError unless ``x`` is a 4-D NHWC batch."""
  if x.ndim != 4:
    raise ValueError(f'expected a batch of images of shape (N, H, W, C), got shape {x.shape}')
  return x


class ConvBN(nn.Module):
  """``nn.Conv`` without bias, then ``nn.BatchNorm`` (momentum 0.9), then ``activation`` (None: none).

  ``padding=None`` pads ``k // 2`` on both sides of each spatial dimension (PyTorch style, symmetric).
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: int = 1
  padding: Any = None
  feature_group_count: int = 1
  activation: Callable[[jax.Array], jax.Array] | None = nn.relu
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    padding = [(k // 2, k // 2) for k in self.kernel_size] if self.padding is None else self.padding
    x = nn.Conv(self.features, tuple(self.kernel_size), strides=self.strides, padding=padding,
                feature_group_count=self.feature_group_count, use_bias=False, dtype=self.dtype,
                kernel_init=conv_kernel_init)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)(x)
    return x if self.activation is None else self.activation(x)


def classifier_head(x: jax.Array, num_classes: int, dtype: Any) -> jax.Array:
  """Global average pooling and a Dense layer; returns float32 logits. Call inside a compact method."""
  x = jnp.mean(x, axis=(1, 2))
  return nn.Dense(num_classes, dtype=dtype)(x).astype(jnp.float32)
