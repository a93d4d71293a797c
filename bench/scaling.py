"""Data-parallel scaling of training: images/s on 1 device and on every local device, in one run.

  python bench/scaling.py [--config configs/resnet.py] [--steps 50] [--config.precision=bf16 ...]

Two rows per device count: strong scaling keeps the global batch (``config.batch_size``) and splits it over the
devices; weak scaling keeps ``config.batch_size`` per device. Each row runs the trainer's own step
(``jint8.training.loop.multi_step`` over ``jint8.classification.train_step``: batch made on the
device, the update, the gradient all-reduce XLA inserts for the sharded batch) for ``--steps`` steps in one
compiled call on random CIFAR-sized data, after a warm-up call of the same length. The scaling factor is images/s
on N devices over images/s on one, measured in the same run. Prints a Markdown table and writes the rows as JSON
lines to ``--out``.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from jint8 import classification, input_pipeline, sharding
from jint8.training import optimizers, precision
from jint8.training.loop import multi_step
from jint8.training.state import initial_state
from jint8.training.step import bind_train_step

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/resnet.py', 'Training configuration file.')
flags.DEFINE_integer('steps', 50, 'Steps timed per row (at most one epoch of the synthetic data).')
flags.DEFINE_string('out', 'bench/results/scaling.jsonl', 'JSON lines of the rows (appended).')


def images_per_second(config, devices, batch_size: int, steps: int) -> float:
  """Training images/s of ``config``'s model on ``devices`` at global batch ``batch_size``."""
  mesh = sharding.data_mesh(devices)
  sharding.check_batch_size(batch_size, mesh, 'batch size')
  replicated = sharding.replicated(mesh)
  dataset = input_pipeline.synthetic_dataset(replicated)
  steps = min(steps, dataset.train.num_examples // batch_size)
  schedule = optimizers.learning_rate_schedule(config.optimizer, batch_size=batch_size, steps_per_epoch=steps,
                                               num_steps=2 * steps)
  tx = precision.wrap_optimizer(optimizers.create_optimizer(config.optimizer, schedule), config)
  model = precision.apply_precision(classification.create_model(config, dataset.num_classes), config)
  state = initial_state(model, tx, dataset.image_shape, config.seed, replicated)
  order = jax.device_put(input_pipeline.epoch_order(jax.random.PRNGKey(0), 0, dataset.train.num_examples),
                         replicated)
  run = jax.jit(multi_step(bind_train_step(
      classification.train_step, config, model, tx=tx, batch_size=batch_size,
      batch_sharding=sharding.batch_sharded(mesh))), donate_argnums=0, out_shardings=replicated)
  with jax.set_mesh(mesh):  # the Pallas kernels run per batch shard (jint8.pallas.data_parallel)
    state, _ = jax.block_until_ready(run(state, dataset, order, np.int32(0), np.int32(steps)))  # compile, warm up
    start = time.perf_counter()
    jax.block_until_ready(run(state, dataset, order, np.int32(0), np.int32(steps)))
  return steps * batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  config = FLAGS.config
  classification.validate_config(config)
  devices = jax.local_devices()
  print(f'{config.model}, {config.precision}, int8 backend {config.int8.backend}, {len(devices)} x '
        f'{devices[0].device_kind}, {FLAGS.steps} steps per row', flush=True)
  base = images_per_second(config, devices[:1], config.batch_size, FLAGS.steps)
  rows = [{'devices': 1, 'global_batch': config.batch_size, 'images_per_second': base, 'scaling': 1.0,
           'mode': 'baseline'}]
  if len(devices) > 1:
    for mode, batch_size in (('strong', config.batch_size), ('weak', config.batch_size * len(devices))):
      rate = images_per_second(config, devices, batch_size, FLAGS.steps)
      rows.append({'devices': len(devices), 'global_batch': batch_size, 'images_per_second': rate,
                   'scaling': rate / base, 'mode': mode})
  else:
    print('Only one local device: nothing to scale over.', flush=True)
  print('| devices | mode | global batch | images/s | scaling vs 1 device |\n|---|---|---|---|---|')
  for row in rows:
    print(f"| {row['devices']} | {row['mode']} | {row['global_batch']} | {row['images_per_second']:,.0f} "
          f"| {row['scaling']:.2f}x |")
  os.makedirs(os.path.dirname(FLAGS.out) or '.', exist_ok=True)
  with open(FLAGS.out, 'a') as f:
    for row in rows:
      f.write(json.dumps(dict(row, model=config.model, precision=config.precision,
                              device=devices[0].device_kind, date=time.strftime('%Y-%m-%d'))) + '\n')


if __name__ == '__main__':
  app.run(main)
