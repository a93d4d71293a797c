"""Detection input: each split resized once into device memory, batches gathered and flipped on the device.

Like ``jint8.input_pipeline`` for classification: the host decodes and resizes every image once, pads its boxes
to ``max_boxes`` rows and places the arrays on the devices; each training step gathers its batch from an epoch
permutation and flips it inside the compiled step. A batch is a function of (seed, epoch, index in the epoch),
so a resumed run sees the same batches. The original-resolution ground truth stays on the host, for the COCO
evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jint8.detection import transforms
from jint8.input_pipeline import place


@flax.struct.dataclass
class Split:
  """One split on the devices: ``images`` (N, H, W, 3) uint8 resized; ``boxes`` (N, M, 4) in resized pixels;
  ``labels`` (N, M) int32; ``valid`` (N, M) bool."""
  images: jax.Array
  boxes: jax.Array
  labels: jax.Array
  valid: jax.Array

  @property
  def num_examples(self) -> int:
    return self.images.shape[0]

  @property
  def image_size(self) -> tuple[int, int]:
    return tuple(self.images.shape[1:3])


def read_split(data_source: Any, image_size: tuple[int, int], max_boxes: int, *,
               max_examples: int = 0, num_threads: int = 8) -> dict[str, Any]:
  """Reads, resizes and pads the first ``max_examples`` (0: all) records of a split of ``dataset.Data``.

  Returns:
    numpy ``images``, ``boxes``, ``labels``, ``valid`` as in ``Split`` and the list ``ground_truth``.
  """
  n = len(data_source) if not max_examples else min(max_examples, len(data_source))
  if n == 0:
    raise ValueError(f'the data source {data_source} holds no examples')

  def prepare(example):
    image, boxes = transforms.resize(example['image'], example['boxes'], image_size)
    return {'image': image, **transforms.pad_boxes(boxes, example['labels'], max_boxes),
            'ground_truth': {'image_id': int(example['image_id']), 'height': example['image'].shape[0],
                             'width': example['image'].shape[1], 'boxes': example['boxes'],
                             'labels': example['labels'].astype(np.int32)}}

  dataset = grain.MapDataset.source(data_source)[:n].map(prepare)
  examples = list(dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads)))
  stacked = {k: np.stack([e[k] for e in examples]) for k in ('image', 'boxes', 'labels', 'valid')}
  return {'images': stacked.pop('image'), **stacked, 'ground_truth': [e['ground_truth'] for e in examples]}


def create_split(data_source: Any, image_size: tuple[int, int], max_boxes: int,
                 sharding: jax.sharding.Sharding, *, max_examples: int = 0) -> tuple[Split, list[dict]]:
  """``read_split`` placed on the devices with ``sharding`` (normally replicated).

  Returns:
    The ``Split`` and, on the host, its ground truth: per image ``{"image_id", "width", "height", "boxes",
    "labels"}`` at the original resolution.
  """
  arrays = read_split(data_source, image_size, max_boxes, max_examples=max_examples)
  return Split(*(place(arrays[k], sharding) for k in ('images', 'boxes', 'labels', 'valid'))), arrays['ground_truth']


def train_batch(split: Split, order: jax.Array, index: int | jax.Array, batch_size: int, key: jax.Array,
                flips: Sequence[str] = ('horizontal',)) -> dict[str, jax.Array]:
  """Batch ``index`` of the epoch visiting the examples in ``order``, each randomly flipped along ``flips``.

  Returns ``{"images": uint8 (b, H, W, 3), "boxes": (b, M, 4), "labels": (b, M), "valid": (b, M)}``.
  """
  ids = lax.dynamic_slice_in_dim(order, index * batch_size, batch_size)
  images, boxes, valid = split.images[ids], split.boxes[ids], split.valid[ids]
  for axis, flip_key in zip(flips, jax.random.split(key, len(flips))):
    images, boxes = transforms.random_flip(flip_key, images, boxes, valid, axis)
  return {'images': images, 'boxes': boxes, 'labels': split.labels[ids], 'valid': valid}


def eval_batch(split: Split, index: int | jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Images of eval batch ``index`` and their mask (the last batch is padded with copies of the last image).

  Returns uint8 images (batch_size, H, W, 3) and a bool mask (batch_size,), True for real examples.
  """
  ids = index * batch_size + jnp.arange(batch_size)
  mask = ids < split.num_examples
  return split.images[jnp.minimum(ids, split.num_examples - 1)], mask


def num_batches(split: Split, batch_size: int) -> int:
  """Batches of ``batch_size`` covering ``split`` (the last one padded)."""
  return -(-split.num_examples // batch_size)
