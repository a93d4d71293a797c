"""FCOS, a one-stage anchor-free detector (Tian et al., ICCV 2019, "FCOS: Fully Convolutional One-Stage
Object Detection"): a backbone, a feature pyramid (P3-P5, optionally P6-P7) and one head shared by all levels.

Every layer is a plain ``nn.Conv``, so ``jint8.nn.Int8Model`` converts the whole detector. The shared head is
applied once per level; its int8 layers see one gradient per level and keep the mean of their quantization
state (``docs/design.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# ImageNet channel statistics for uint8-range RGB input.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

_head_init = nn.initializers.normal(0.01)


class FPN(nn.Module):
  """Feature pyramid: 1x1 laterals, nearest-neighbour top-down sum, 3x3 outputs; ``extra_levels`` stride-2
  3x3 convs on the coarsest output (P6, P7)."""

  features: int
  extra_levels: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: list[jax.Array]) -> list[jax.Array]:
    laterals = [nn.Conv(self.features, (1, 1), dtype=self.dtype, name=f'lateral_{i}')(x)
                for i, x in enumerate(inputs)]
    for i in range(len(laterals) - 2, -1, -1):
      finer = laterals[i]
      coarser = jax.image.resize(laterals[i + 1], finer.shape[:3] + laterals[i + 1].shape[3:], 'nearest')
      laterals[i] = finer + coarser.astype(finer.dtype)
    outputs = [nn.Conv(self.features, (3, 3), dtype=self.dtype, name=f'output_{i}')(x)
               for i, x in enumerate(laterals)]
    for i in range(self.extra_levels):
      x = outputs[-1] if i == 0 else nn.relu(outputs[-1])
      outputs.append(nn.Conv(self.features, (3, 3), strides=2, dtype=self.dtype, name=f'extra_{i}')(x))
    return outputs


class FCOSHead(nn.Module):
  """Classification and box towers (``num_convs`` x [3x3 conv, GroupNorm, ReLU]) and the three predictions
  of one pyramid level: class logits, box distances (raw) and centerness logits (on the box tower)."""

  num_classes: int
  features: int
  num_convs: int = 4
  groups: int = 32
  prior_prob: float = 0.01
  dtype: Any = jnp.float32

  def tower(self, x: jax.Array, name: str) -> jax.Array:
    for i in range(self.num_convs):
      x = nn.Conv(self.features, (3, 3), kernel_init=_head_init, dtype=self.dtype, name=f'{name}_conv_{i}')(x)
      x = nn.relu(nn.GroupNorm(self.groups, dtype=self.dtype, name=f'{name}_norm_{i}')(x))
    return x

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    cls = self.tower(x, 'cls')
    box = self.tower(x, 'box')
    prior = -math.log((1 - self.prior_prob) / self.prior_prob)
    logits = nn.Conv(self.num_classes, (3, 3), kernel_init=_head_init, bias_init=nn.initializers.constant(prior),
                     dtype=self.dtype, name='cls_logits')(cls)
    distances = nn.Conv(4, (3, 3), kernel_init=_head_init, dtype=self.dtype, name='box_distances')(box)
    centerness = nn.Conv(1, (3, 3), kernel_init=_head_init, dtype=self.dtype, name='centerness')(box)
    return logits, distances, centerness


class FCOS(nn.Module):
  """FCOS detector.

  Attributes:
    backbone: a module called ``backbone(images, train)`` that returns the stride-8, 16 and 32 feature maps,
      as a sequence or as a dict in that order (``jint8.models.ResNetBackbone``'s C3, C4, C5).
    num_classes: foreground classes.
    features: channels of the pyramid and the head.
    head_convs: convs per head tower.
    extra_levels: pyramid levels above P5 (0: P3-P5, 2: P3-P7).
    groups: GroupNorm groups in the head.

  Called on a uint8-range NHWC batch, it returns float32 ``{"logits": (b, n, classes), "distances": (b, n, 4)
  left/top/right/bottom in strides (softplus, positive), "centerness": (b, n) logits}`` over the locations of
  all levels (``targets.locations`` order).
  """

  backbone: nn.Module
  num_classes: int
  features: int = 128
  head_convs: int = 4
  extra_levels: int = 0
  groups: int = 32
  dtype: Any = jnp.float32

  @property
  def strides(self) -> tuple[int, ...]:
    return tuple(2 ** (3 + i) for i in range(3 + self.extra_levels))

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'FCOS expects RGB images (batch, height, width, 3), got shape {images.shape}')
    x = (images.astype(jnp.float32) - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)
    features = self.backbone(x.astype(self.dtype), train)
    if isinstance(features, Mapping):
      features = list(features.values())
    if len(features) != 3:
      raise ValueError(f'the backbone must return 3 feature maps (strides 8, 16, 32), got {len(features)}')
    levels = FPN(self.features, self.extra_levels, dtype=self.dtype, name='fpn')(list(features))
    head = FCOSHead(self.num_classes, self.features, self.head_convs, self.groups, dtype=self.dtype, name='head')
    outputs = {'logits': [], 'distances': [], 'centerness': []}
    for i, level in enumerate(levels):
      logits, distances, centerness = head(level)
      scale = self.param(f'scale_{i}', nn.initializers.ones, ())
      batch = level.shape[0]
      outputs['logits'].append(logits.reshape(batch, -1, self.num_classes))
      outputs['distances'].append(nn.softplus(scale * distances.astype(jnp.float32)).reshape(batch, -1, 4))
      outputs['centerness'].append(centerness.reshape(batch, -1))
    return {k: jnp.concatenate(v, axis=1).astype(jnp.float32) for k, v in outputs.items()}
