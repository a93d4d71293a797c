"""Throughput of the input pipeline alone, and optionally of the train step it feeds.

  python bench/input_pipeline.py [--config configs/resnet.py] [--steps 200] [--train_step]
                                 [--config.precision=bf16 ...]

Prints the time to load the dataset into device memory, then images/s of making training batches on the
device (gather + pad-crop + flip + normalise): per step as the trainer does it (one jitted call per batch) and
fused (a loop of batches in one call, no dispatch cost). With --train_step it also times the config's train
step (batch making included) to show whether input could ever be the bottleneck.
"""

import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from jint8 import classification, input_pipeline, sharding
from jint8.training import optimizers, precision
from jint8.training.state import initial_state
from jint8.training.step import bind_train_step

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/resnet.py', 'Training configuration file.')
flags.DEFINE_integer('steps', 200, 'Batches timed in each measurement.')
flags.DEFINE_bool('train_step', False, 'Also time the train step of the config.')
flags.DEFINE_bool('synthetic', False, 'Random images of CIFAR-10 size instead of the dataset (no tfds needed).')


def _images_per_second(fn, steps: int, batch_size: int) -> float:
  jax.block_until_ready(fn())  # compile and warm up
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return steps * batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  config = FLAGS.config
  mesh = sharding.data_mesh()
  batch_size, steps = config.batch_size, FLAGS.steps
  start = time.perf_counter()
  if FLAGS.synthetic:
    dataset = input_pipeline.synthetic_dataset(sharding.replicated(mesh))
  else:
    dataset = input_pipeline.create_dataset(config.dataset, sharding.replicated(mesh))
  jax.block_until_ready(dataset)
  print(f'load: {dataset.train.num_examples} + {dataset.test.num_examples} images into {mesh.size} '
        f'device(s) in {time.perf_counter() - start:.1f} s', flush=True)
  num_batches = dataset.train.num_examples // batch_size
  order = input_pipeline.epoch_order(jax.random.PRNGKey(0), 0, dataset.train.num_examples)
  batch_sharding = sharding.batch_sharded(mesh)

  @jax.jit
  def one_batch(dataset, index):
    images, labels = input_pipeline.train_batch(dataset, order, index % num_batches, batch_size,
                                                jax.random.PRNGKey(index))
    return jax.lax.with_sharding_constraint(images, batch_sharding), labels

  def per_step():
    return [one_batch(dataset, i) for i in range(steps)]

  @jax.jit
  def fused(dataset):
    def body(i, checksum):
      images, _ = one_batch(dataset, i)
      return checksum + jnp.sum(images)
    return jax.lax.fori_loop(0, steps, body, jnp.float32(0))

  print(f'input pipeline, one call per batch: {_images_per_second(per_step, steps, batch_size):,.0f} images/s '
        f'(batch {batch_size})', flush=True)
  print(f'input pipeline, fused loop: {_images_per_second(lambda: fused(dataset), steps, batch_size):,.0f} '
        'images/s', flush=True)
  if not FLAGS.train_step:
    return
  classification.validate_config(config)
  schedule = optimizers.learning_rate_schedule(config.optimizer, batch_size=batch_size,
                                               steps_per_epoch=num_batches, num_steps=10 * steps)
  tx = precision.wrap_optimizer(optimizers.create_optimizer(config.optimizer, schedule), config)
  model = precision.apply_precision(classification.create_model(config, dataset.num_classes), config)
  state = initial_state(model, tx, dataset.image_shape, config.seed, sharding.replicated(mesh))
  step = jax.jit(bind_train_step(classification.train_step, config, model, tx=tx, batch_size=batch_size,
                                 batch_sharding=batch_sharding), donate_argnums=0)

  def train():
    nonlocal state
    for i in range(steps):
      state, step_metrics = step(state, dataset, order, i % num_batches)
    return step_metrics

  rate = _images_per_second(train, steps, batch_size)
  print(f'train step ({config.model}, {config.precision}, backend {config.int8.backend}): {rate:,.0f} images/s, '
        f'{1e3 * batch_size / rate:.2f} ms/step', flush=True)


if __name__ == '__main__':
  app.run(main)
