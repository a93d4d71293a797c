"""Tests of jint8.input_pipeline: reading tfds records, on-device augmentation, batching and normalisation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jint8 import input_pipeline, sharding
from jint8.datasets import cifar10_jpeg
from test_datasets import TEST_PER_CLASS, TRAIN_PER_CLASS, cifar_subset  # noqa: F401  (session fixture)

MEAN, STD = (10.0, 20.0, 30.0), (2.0, 4.0, 8.0)


def _dataset(num_train=40, num_test=13, seed=0) -> input_pipeline.Dataset:
  rng = np.random.default_rng(seed)
  split = lambda n: input_pipeline.Split(jnp.asarray(rng.integers(0, 256, (n, 8, 8, 3), np.uint8)),
                                         jnp.asarray(rng.integers(0, 10, n), jnp.int32))
  return input_pipeline.Dataset(train=split(num_train), test=split(num_test), num_classes=10, mean_rgb=MEAN,
                                stddev_rgb=STD)


def _augmentations(image: np.ndarray, pad: int) -> list[np.ndarray]:
  """Every crop of the zero-padded ``image``, flipped and not."""
  h, w, _ = image.shape
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  crops = [padded[i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
  return crops + [c[:, ::-1] for c in crops]


def test_pad_crop_flip_is_a_crop_of_the_padded_image():
  images = np.random.default_rng(1).integers(1, 256, (64, 6, 6, 3), np.uint8)
  out = np.asarray(input_pipeline.pad_crop_flip(jax.random.PRNGKey(3), jnp.asarray(images), pad=2))
  assert out.shape == images.shape and out.dtype == np.uint8
  # Pixels are >= 1, so each output matches exactly one (offset, flip): count which ones were drawn.
  drawn = []
  for image, crop in zip(images, out):
    matches = [k for k, a in enumerate(_augmentations(image, 2)) if np.array_equal(crop, a)]
    assert len(matches) == 1
    drawn.append(matches[0])
  drawn = np.asarray(drawn)
  assert 0 < np.mean(drawn >= 25) < 1  # both flipped and unflipped crops (25 offsets each)
  assert len(set(drawn % 25)) > 10  # many different offsets


def test_normalize_matches_numpy():
  images = np.random.default_rng(2).integers(0, 256, (3, 4, 4, 3), np.uint8)
  out = input_pipeline.normalize(jnp.asarray(images), MEAN, STD)
  np.testing.assert_allclose(out, (images.astype(np.float64) - MEAN) / STD, rtol=1e-6)
  assert input_pipeline.normalize(jnp.asarray(images), MEAN, STD, jnp.bfloat16).dtype == jnp.bfloat16


def test_epoch_order_is_a_fresh_permutation_per_epoch():
  key = jax.random.PRNGKey(0)
  orders = [np.asarray(input_pipeline.epoch_order(key, e, 50)) for e in range(3)]
  for order in orders:
    np.testing.assert_array_equal(np.sort(order), np.arange(50))
  assert not np.array_equal(orders[0], orders[1])
  np.testing.assert_array_equal(orders[2], input_pipeline.epoch_order(key, 2, 50))


def test_train_batches_cover_the_epoch_once():
  dataset = _dataset()
  order = input_pipeline.epoch_order(jax.random.PRNGKey(5), 0, 40)
  train_images = np.asarray(dataset.train.images)
  seen = []
  for index in range(4):  # 4 batches of 10
    images, labels = input_pipeline.train_batch(dataset, order, index, 10, jax.random.PRNGKey(index))
    assert images.shape == (10, 8, 8, 3) and images.dtype == jnp.float32
    ids = np.asarray(order[index * 10:(index + 1) * 10])
    np.testing.assert_array_equal(labels, np.asarray(dataset.train.labels)[ids])
    pixels = np.rint(np.asarray(images) * STD + MEAN).astype(np.int64)  # undo the normalisation
    for i, image in zip(ids, pixels):
      assert any(np.array_equal(image, a) for a in _augmentations(train_images[i].astype(np.int64), 4))
    seen.extend(ids)
  np.testing.assert_array_equal(np.sort(seen), np.arange(40))


def test_eval_batches_cover_the_test_split_once_with_a_mask():
  dataset = _dataset(num_test=13)
  assert input_pipeline.num_eval_batches(dataset, 5) == 3
  images, labels, masks = zip(*(input_pipeline.eval_batch(dataset, i, 5) for i in range(3)))
  mask = np.concatenate(masks)
  np.testing.assert_array_equal(mask, np.arange(15) < 13)
  np.testing.assert_array_equal(np.concatenate(labels)[mask], dataset.test.labels)
  expected = (np.asarray(dataset.test.images, np.float64) - MEAN) / STD
  np.testing.assert_allclose(np.concatenate(images)[mask], expected, rtol=1e-6)


def test_read_split_limits_examples(cifar_subset):
  source = cifar10_jpeg.builder(data_dir=cifar_subset.data_dir).as_data_source(split='train')
  images, labels = input_pipeline.read_split(source, 37)
  assert images.shape == (37, 32, 32, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and labels.shape == (37,)
  first = source[0]
  np.testing.assert_array_equal(images[0], first['image'])
  assert labels[0] == first['label']
  assert input_pipeline.read_split(source)[0].shape[0] == 10 * TRAIN_PER_CLASS


def test_create_dataset_places_the_splits(cifar_subset):
  config = ml_collections.ConfigDict(dict(name='cifar10_jpeg', archive=str(cifar_subset.archive),
                                          data_dir=str(cifar_subset.data_dir), max_train_examples=64,
                                          max_test_examples=0))
  mesh = sharding.data_mesh()
  dataset = input_pipeline.create_dataset(config, sharding.replicated(mesh))
  assert dataset.train.images.shape == (64, 32, 32, 3) and dataset.train.images.dtype == jnp.uint8
  assert dataset.test.num_examples == 10 * TEST_PER_CLASS
  assert dataset.num_classes == 10 and dataset.image_shape == (32, 32, 3)
  assert dataset.train.images.sharding.is_fully_replicated
  config.name = 'imagenet'
  with pytest.raises(ValueError, match="config.dataset.name: unknown dataset 'imagenet'"):
    input_pipeline.create_dataset(config, sharding.replicated(mesh))
