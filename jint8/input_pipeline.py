"""Image-classification input: the dataset decoded once into device memory, batches made on the device.

CIFAR-sized datasets fit in accelerator memory, so the host reads the tfds records once (a tfds data source) and
places the ``uint8`` images on every device. Each training step then gathers its batch from an epoch
permutation, pads-crops (4 px) and flips it, and normalises it per channel, all inside the compiled step: no
host-to-device copy per step. A batch is a function of (seed, epoch, index in the epoch), so a run resumed from
a checkpoint holding that data position sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Dataset name (config.dataset.name) -> the module providing builder(), CLASS_NAMES, MEAN_RGB, STDDEV_RGB
# (imported when used: tensorflow-datasets is needed only to load data).
DATASETS = {'cifar10_jpeg': 'jint8.datasets.cifar10_jpeg'}
_READ_CHUNK = 4096


class Split(NamedTuple):
  """One split in device memory: ``images`` (N, H, W, C) uint8 and ``labels`` (N,) int32."""
  images: jax.Array
  labels: jax.Array

  @property
  def num_examples(self) -> int:
    return self.labels.shape[0]


@flax.struct.dataclass
class Dataset:
  """Train and test splits on the device (a pytree: pass it to jitted functions), with what the model and
  normalisation need as static fields."""
  train: Split
  test: Split
  num_classes: int = flax.struct.field(pytree_node=False)
  mean_rgb: tuple[float, ...] = flax.struct.field(pytree_node=False)
  stddev_rgb: tuple[float, ...] = flax.struct.field(pytree_node=False)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train.images.shape[1:])


def read_split(data_source, max_examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads the first ``max_examples`` (all when ``None`` or 0) records of a tfds data source into numpy.

  Records are fetched in chunks through the data source's batched random access (``__getitems__``, the
  grain data-source protocol), the fastest way tfds offers to decode array_record files without TensorFlow.

  Returns ``(images, labels)``: uint8 (N, H, W, C) and int32 (N,).
  """
  n = len(data_source) if not max_examples else min(max_examples, len(data_source))
  if n == 0:
    raise ValueError(f'the data source {data_source} holds no examples')
  images, labels = [], []
  for start in range(0, n, _READ_CHUNK):
    records = data_source.__getitems__(range(start, min(start + _READ_CHUNK, n)))
    images.append(np.stack([r['image'] for r in records]))
    labels.append(np.asarray([r['label'] for r in records], np.int32))
  return np.concatenate(images), np.concatenate(labels)


def place(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """Places a host array, identical on every process, as a global array with ``sharding``."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def create_dataset(dataset_config: Any, sharding: jax.sharding.Sharding) -> Dataset:
  """Prepares (first use) and loads the dataset named ``dataset_config.name`` onto the devices.

  Args:
    dataset_config: ``config.dataset``: ``name``, ``archive``, ``data_dir``, ``max_train_examples``,
      ``max_test_examples`` (0: all).
    sharding: where the splits go, normally replicated over the mesh.
  """
  if dataset_config.name not in DATASETS:
    raise ValueError(f'config.dataset.name: unknown dataset {dataset_config.name!r}; '
                     f'known: {", ".join(DATASETS)}')
  module = importlib.import_module(DATASETS[dataset_config.name])
  builder = module.builder(data_dir=dataset_config.data_dir or None, archive=dataset_config.archive or None)
  splits = {}
  for split, limit in (('train', dataset_config.max_train_examples),
                       ('test', dataset_config.max_test_examples)):
    images, labels = read_split(builder.as_data_source(split=split), limit)
    splits[split] = Split(place(images, sharding), place(labels, sharding))
  return Dataset(train=splits['train'], test=splits['test'], num_classes=len(module.CLASS_NAMES),
                 mean_rgb=module.MEAN_RGB, stddev_rgb=module.STDDEV_RGB)


def synthetic_dataset(sharding: jax.sharding.Sharding, num_train: int = 50_000, num_test: int = 10_000,
                      seed: int = 0) -> Dataset:
  """Random 32x32 RGB images with 10 classes, CIFAR-10's sizes by default: for benchmarks that need no data."""
  rng = np.random.default_rng(seed)

  def split(n):
    return Split(place(rng.integers(0, 256, (n, 32, 32, 3), np.uint8), sharding),
                 place(rng.integers(0, 10, n).astype(np.int32), sharding))

  return Dataset(train=split(num_train), test=split(num_test), num_classes=10, mean_rgb=(127.5,) * 3,
                 stddev_rgb=(64.0,) * 3)


def epoch_order(key: jax.Array, epoch: int | jax.Array, num_examples: int) -> jax.Array:
  """The order in which epoch ``epoch`` visits the training examples: a permutation of ``num_examples``."""
  return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def pad_crop_flip(key: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
  """Random crop of each image zero-padded by ``pad`` pixels per side, then a random horizontal flip."""
  n, h, w, c = images.shape
  offset_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(offset_key, (n, 2), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (n,))
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  crops = jax.vmap(lambda image, o: lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
  return jnp.where(flips[:, None, None, None], crops[:, :, ::-1], crops)


def normalize(images: jax.Array, mean_rgb, stddev_rgb, dtype=jnp.float32) -> jax.Array:
  """``(images - mean) / stddev`` per channel, in ``dtype``."""
  mean = jnp.asarray(mean_rgb, jnp.float32)
  stddev = jnp.asarray(stddev_rgb, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / stddev).astype(dtype)


def train_batch(dataset: Dataset, order: jax.Array, index: int | jax.Array, batch_size: int,
                key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Batch ``index`` of the epoch visiting the examples in ``order``, augmented and normalised.

  Returns float32 images (batch_size, H, W, C) and int32 labels (batch_size,).
  """
  ids = lax.dynamic_slice_in_dim(order, index * batch_size, batch_size)
  images = pad_crop_flip(key, dataset.train.images[ids])
  return normalize(images, dataset.mean_rgb, dataset.stddev_rgb), dataset.train.labels[ids]


def eval_batch(dataset: Dataset, index: int | jax.Array, batch_size: int
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Test batch ``index`` (normalised, no augmentation) and its mask: the last batch is padded with copies.

  Returns float32 images, int32 labels and a bool mask of shape (batch_size,), True for real examples.
  """
  n = dataset.test.num_examples
  ids = index * batch_size + jnp.arange(batch_size)
  mask = ids < n
  ids = jnp.minimum(ids, n - 1)
  images = normalize(dataset.test.images[ids], dataset.mean_rgb, dataset.stddev_rgb)
  return images, dataset.test.labels[ids], mask


def num_eval_batches(dataset: Dataset, batch_size: int) -> int:
  """Batches of ``batch_size`` covering the test split (the last one padded)."""
  return -(-dataset.test.num_examples // batch_size)
