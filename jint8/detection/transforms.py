"""Image transforms that move boxes with the pixels, and box padding.

Boxes are ``(..., 4)`` arrays in pixels, ``(xmin, ymin, xmax, ymax)``, with the image spanning
``[0, width] x [0, height]``. ``resize`` and ``pad_boxes`` run on the host (numpy) once per image; ``flip`` and
``random_flip`` are jnp and run on batches inside the compiled training step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

FLIP_AXES = ('horizontal', 'vertical')


def resize(image: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Resizes a uint8 ``(h, w, c)`` image to ``size = (height, width)`` (bilinear) and scales its ``(n, 4)``
  boxes with it."""
  if image.ndim != 3 or boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f'resize expects an (h, w, c) image and (n, 4) boxes, got {image.shape} and {boxes.shape}')
  height, width = size
  old_height, old_width = image.shape[:2]
  resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
  scale = np.array([width / old_width, height / old_height] * 2, np.float32)
  return resized, (boxes * scale).astype(np.float32)


def pad_boxes(boxes: np.ndarray, labels: np.ndarray, max_boxes: int) -> dict[str, np.ndarray]:
  """Pads an image's boxes and labels to ``max_boxes`` rows.

  Returns:
    ``{"boxes": float32 (max_boxes, 4), "labels": int32 (max_boxes,), "valid": bool (max_boxes,)}``;
    padded rows are zero with ``valid`` False.
  """
  n = len(boxes)
  if n != len(labels):
    raise ValueError(f'{n} boxes but {len(labels)} labels')
  if n > max_boxes:
    raise ValueError(f'an image has {n} boxes, more than max_boxes={max_boxes} (raise config.dataset.max_boxes)')
  padded = {
      'boxes': np.zeros((max_boxes, 4), np.float32),
      'labels': np.zeros((max_boxes,), np.int32),
      'valid': np.zeros((max_boxes,), bool),
  }
  padded['boxes'][:n] = boxes
  padded['labels'][:n] = labels
  padded['valid'][:n] = True
  return padded


def flip(images: jax.Array, boxes: jax.Array, axis: str) -> tuple[jax.Array, jax.Array]:
  """Mirrors images ``(..., h, w, c)`` and their boxes ``(..., n, 4)``: ``axis`` ``"horizontal"`` (left-right)
  or ``"vertical"`` (top-bottom)."""
  if axis not in FLIP_AXES:
    raise ValueError(f'flip axis must be one of {FLIP_AXES}, got {axis!r}')
  image_axis, lo, hi = (-2, 0, 2) if axis == 'horizontal' else (-3, 1, 3)
  extent = images.shape[image_axis]
  boxes = jnp.asarray(boxes)
  flipped = boxes.at[..., lo].set(extent - boxes[..., hi]).at[..., hi].set(extent - boxes[..., lo])
  return jnp.flip(images, image_axis), flipped


def random_flip(key: jax.Array, images: jax.Array, boxes: jax.Array, valid: jax.Array,
                axis: str) -> tuple[jax.Array, jax.Array]:
  """Flips each image of a batch ``(b, h, w, c)`` with probability 1/2, with its valid boxes ``(b, n, 4)``;
  padding rows stay as they are."""
  flipped_images, flipped_boxes = flip(images, boxes, axis)
  coin = jax.random.bernoulli(key, 0.5, (images.shape[0],))
  images = jnp.where(coin[:, None, None, None], flipped_images, images)
  boxes = jnp.where((coin[:, None] & valid)[..., None], flipped_boxes, boxes)
  return images, boxes
