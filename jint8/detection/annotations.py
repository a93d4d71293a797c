"""Detection annotations in one form for every source format, and the checks each image's boxes get.

A reader (``voc``, ``coco``) turns a source into ``Annotations``: the class names, the category id that
evaluation reports each class under, and per split the ``Image``s with their boxes as annotated. ``fit`` then
checks each image against its decoded size: boxes reaching outside the image are clipped, boxes of zero area
(after clipping) dropped, images left without boxes kept as negatives or skipped, each counted, and ``report``
says it all in one line per split.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

EMPTY_IMAGES = ('keep', 'skip')  # what becomes of an image without boxes: kept as a negative, or skipped


@dataclasses.dataclass(frozen=True)
class Image:
  """One annotated image.

  ``name``: unique in its split (the VOC id, the COCO file name); ``image_id``: the id evaluation reports it
  under; ``path``: its file under the source root; ``size``: the (width, height) its annotation states, None
  where it states none; ``boxes``: float32 (n, 4) xmin, ymin, xmax, ymax in pixels as annotated; ``labels``:
  int64 (n,) indices into the class names; ``origin``: the annotation file or entry, for messages.
  """
  name: str
  image_id: int
  path: str
  size: tuple[int, int] | None
  boxes: np.ndarray
  labels: np.ndarray
  origin: str


@dataclasses.dataclass(frozen=True)
class Annotations:
  """A source's classes and images: label ``i`` is ``class_names[i]``, evaluated as category ``category_ids[i]``;
  ``splits`` maps each split to its images; ``counts`` holds, per split, what the reader left out."""
  class_names: tuple[str, ...]
  category_ids: tuple[int, ...]
  splits: dict[str, list[Image]]
  counts: dict[str, collections.Counter]


def fit(image: Image, width: int, height: int, empty_images: str,
        counts: collections.Counter) -> tuple[np.ndarray, np.ndarray] | None:
  """``image``'s boxes and labels fitted to its decoded ``width`` x ``height``, counted into ``counts``.

  Returns None for an image left without boxes when ``empty_images == "skip"``. Raises a ValueError when the
  annotation states another size than the image has.
  """
  if image.size is not None and tuple(image.size) != (width, height):
    raise ValueError(f'{image.origin} gives the size {image.size[0]}x{image.size[1]} but the image {image.path} is '
                     f'{width}x{height}')
  boxes = np.clip(image.boxes, 0, [width, height] * 2).astype(np.float32)
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  counts['boxes clipped to the image'] += int(np.sum(np.any(boxes != image.boxes, axis=1) & keep))
  counts['zero-area boxes dropped'] += int(np.sum(~keep))
  boxes, labels = boxes[keep], image.labels[keep]
  if not len(boxes):
    counts['images without boxes ' + ('skipped' if empty_images == 'skip' else 'kept as negatives')] += 1
    if empty_images == 'skip':
      return None
  counts['images'] += 1
  counts['boxes'] += len(boxes)
  return boxes, labels


def report(split: str, counts: collections.Counter) -> str:
  """One line: the split's images and boxes, then every change counted (``fit``'s and the reader's)."""
  changes = [f'{what}: {n}' for what, n in counts.items() if n and what not in ('images', 'boxes')]
  return (f'{split}: {counts["images"]} images, {counts["boxes"]} boxes; '
          + (', '.join(changes) if changes else 'no box or image needed a change'))


def some(items: Sequence[str], most: int = 5) -> str:
  """The first ``most`` of ``items`` for a message, and how many more."""
  return ', '.join(map(repr, items[:most])) + (f' and {len(items) - most} more' if len(items) > most else '')
