"""FCOS training targets: which feature-map location regresses which ground-truth box.

A location of a level with stride s sits at pixel ``(s // 2 + s * i)`` (Tian et al., 2019). It is positive for
a box when it lies inside the box (or, with ``center_radius > 0``, inside the box's central region of
radius ``center_radius * s``) and its largest distance to the box sides falls in the level's size range.
Among several such boxes it takes the smallest one. Locations of all levels are concatenated level by level,
row-major inside a level.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def feature_sizes(image_size: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
  """The ``(height, width)`` of each level; the image size must be a multiple of every stride."""
  height, width = image_size
  for s in strides:
    if height % s or width % s:
      raise ValueError(f'image size {image_size} must be a multiple of every stride {tuple(strides)}')
  return [(height // s, width // s) for s in strides]


def locations(image_size: tuple[int, int], strides: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Pixel positions ``(n, 2)`` as (x, y) and the stride ``(n,)`` of every location of every level."""
  points, point_strides = [], []
  for s, (h, w) in zip(strides, feature_sizes(image_size, strides)):
    ys, xs = np.meshgrid(np.arange(h) * s + s // 2, np.arange(w) * s + s // 2, indexing='ij')
    points.append(np.stack([xs.ravel(), ys.ravel()], axis=-1))
    point_strides.append(np.full(h * w, s))
  return np.concatenate(points).astype(np.float32), np.concatenate(point_strides).astype(np.float32)


def size_ranges(strides: Sequence[int], boundaries: Sequence[float]) -> np.ndarray:
  """``(lo, hi]`` of the largest side distance each location regresses: ``(n, 2)``, one row per location.

  ``boundaries`` has one value fewer than there are levels: level i takes ``(boundaries[i-1], boundaries[i]]``,
  the first from 0 and the last to infinity.
  """
  if len(boundaries) != len(strides) - 1:
    raise ValueError(f'{len(strides)} levels need {len(strides) - 1} size boundaries, got {tuple(boundaries)}')
  edges = np.concatenate([[0.0], np.asarray(boundaries, np.float64), [np.inf]])
  return np.stack([edges[:-1], edges[1:]], axis=-1).astype(np.float32)


def assign(points: jax.Array, point_strides: jax.Array, ranges: jax.Array, boxes: jax.Array,
           labels: jax.Array, valid: jax.Array, center_radius: float = 1.5) -> dict[str, jax.Array]:
  """FCOS targets of one image.

  Args:
    points: ``(n, 2)`` location positions (x, y) in pixels.
    point_strides: ``(n,)`` stride of each location.
    ranges: ``(n, 2)`` size range of each location (see ``size_ranges``, repeated per location).
    boxes: ``(m, 4)`` ground truth (xmin, ymin, xmax, ymax) in pixels.
    labels: ``(m,)`` class indices.
    valid: ``(m,)`` False for padding rows.
    center_radius: positives are restricted to the box centre region of this radius in strides; 0 takes
      the whole box.

  Returns:
    ``{"labels": (n,) int32, -1 for background; "distances": (n, 4) float32 distances (left, top, right,
    bottom) to the assigned box in units of the location's stride; "centerness": (n,) float32}``.
  """
  x, y = points[:, 0:1], points[:, 1:2]
  x0, y0, x1, y1 = (boxes[None, :, k] for k in range(4))
  ltrb = jnp.stack([x - x0, y - y0, x1 - x, y1 - y], axis=-1)  # (n, m, 4)
  if center_radius > 0:
    radius = (point_strides * center_radius)[:, None]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    inside = ((x > jnp.maximum(x0, cx - radius)) & (x < jnp.minimum(x1, cx + radius))
              & (y > jnp.maximum(y0, cy - radius)) & (y < jnp.minimum(y1, cy + radius)))
  else:
    inside = jnp.min(ltrb, axis=-1) > 0
  largest = jnp.max(ltrb, axis=-1)
  in_range = (largest > ranges[:, 0:1]) & (largest <= ranges[:, 1:2])
  area = (x1 - x0) * (y1 - y0)
  candidate_area = jnp.where(inside & in_range & valid[None, :], area, jnp.inf)
  best = jnp.argmin(candidate_area, axis=1)
  positive = jnp.isfinite(jnp.min(candidate_area, axis=1))
  distances = jnp.take_along_axis(ltrb, best[:, None, None], axis=1)[:, 0]
  distances = jnp.where(positive[:, None], jnp.maximum(distances, 0.0), 0.0)
  left, top, right, bottom = (distances[:, k] for k in range(4))
  centerness = jnp.sqrt(jnp.minimum(left, right) / jnp.maximum(jnp.maximum(left, right), 1e-12)
                        * jnp.minimum(top, bottom) / jnp.maximum(jnp.maximum(top, bottom), 1e-12))
  return {
      'labels': jnp.where(positive, labels[best], -1).astype(jnp.int32),
      'distances': distances / point_strides[:, None],
      'centerness': jnp.where(positive, centerness, 0.0),
  }


class Locations:
  """The locations of a detector's levels for one image size, and their batched target assignment."""

  def __init__(self, image_size: tuple[int, int], strides: Sequence[int], size_boundaries: Sequence[float],
               center_radius: float = 1.5):
    self.image_size = tuple(image_size)
    self.strides = tuple(strides)
    self.points, self.point_strides = locations(image_size, strides)
    counts = [h * w for h, w in feature_sizes(image_size, strides)]
    self.ranges = np.repeat(size_ranges(strides, size_boundaries), counts, axis=0)
    self.center_radius = center_radius

  def __len__(self) -> int:
    return len(self.points)

  def targets(self, boxes: jax.Array, labels: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    """``assign`` for a batch: boxes ``(b, m, 4)``, labels and valid ``(b, m)``; results gain a batch axis."""
    return jax.vmap(lambda b, l, v: assign(self.points, self.point_strides, self.ranges, b, l, v,
                                           self.center_radius))(boxes, labels, valid)
