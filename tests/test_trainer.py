"""Tests of the trainer: train.py end to end (resume after SIGKILL, 4 devices, corrupt checkpoints), the config
checks, checkpoints, metrics and optimizer schedules.

The end-to-end runs use configs/smoke.py with the small CNN below (``--config.model=test_trainer:TinyCNN``) on
a few hundred real CIFAR-10 images, in subprocesses sharing a JAX compilation cache.
"""

import functools
import importlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from jint8 import (checkpointing, divergence, input_pipeline, metrics, models, optimizers, precision, progress,
                   sharding, trainer)
from jint8.nn import STATE_COLLECTION, Int8Model
from test_datasets import cifar_subset  # noqa: F401  (session fixture)

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import default, smoke  # pylint: disable=g-import-not-at-top

NUM_STEPS = 40
RUN_FLAGS = ('--config.model=test_trainer:TinyCNN', f'--config.num_train_steps={NUM_STEPS}',
             '--config.log_every_steps=4', '--config.eval_every_steps=8', '--config.checkpoint_every_steps=4')


class TinyCNN(nn.Module):
  """Three convs (the first stays float under int8, the other two are int8), BN, and a Dense classifier."""
  num_classes: int
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    features = max(1, round(8 * self.width))
    for i, strides in enumerate((1, 2, 2)):
      x = nn.Conv(features * (1 + i // 2), (3, 3), strides=strides, use_bias=False, dtype=self.dtype)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x.mean(axis=(1, 2))).astype(jnp.float32)


def _run(cwd, data, cache_dir, *flags, devices=1, background_log=None):
  """Runs train.py with the smoke config on the test data; returns the CompletedProcess (or the Popen)."""
  env = dict(os.environ, PYTHONPATH=f'{REPO}{os.pathsep}{REPO / "tests"}', JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  command = [sys.executable, str(REPO / 'train.py'), f'--config={REPO / "configs" / "smoke.py"}',
             f'--config.dataset.archive={data.archive}', f'--config.dataset.data_dir={data.data_dir}',
             *RUN_FLAGS, *flags]
  if background_log is not None:
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=background_log, stderr=subprocess.STDOUT)
  result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


def _final(stdout: str) -> dict[str, float]:
  lines = [line for line in stdout.splitlines() if line.startswith('{"final_test"')]
  assert len(lines) == 1, stdout[-3000:]
  return json.loads(lines[0])['final_test']


def _test_records(workdir) -> list[dict[str, Any]]:
  return [r for r in metrics.read_records(workdir) if r['split'] == 'test']


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def uninterrupted(cifar_subset, cache_dir, tmp_path_factory):
  """One uninterrupted run without --workdir, in a fresh folder."""
  cwd = tmp_path_factory.mktemp('uninterrupted')
  result = _run(cwd, cifar_subset, cache_dir)
  return cwd / 'runs' / 'smoke-int8', result.stdout


def test_run_writes_metrics_checkpoints_and_plots(uninterrupted):
  workdir, stdout = uninterrupted
  assert 'No --workdir given: using runs/smoke-int8' in stdout and 'Starting a new run' in stdout
  records = metrics.read_records(workdir)
  train = [r for r in records if r['split'] == 'train']
  assert [r['step'] for r in train] == list(range(4, NUM_STEPS + 1, 4))
  assert [r['step'] for r in _test_records(workdir)] == list(range(8, NUM_STEPS + 1, 8))
  # int8: the two later convs are int8 (per-layer stats); the first conv and the Dense stay float.
  assert sorted(train[-1]['layers']) == ['model/Conv_1', 'model/Conv_2']
  for r in train:
    assert np.isfinite(r['loss']) and 0 <= r['accuracy'] <= 1 and r['nonfinite'] == 0
    assert 0 <= r['grad_deviation_mean'] <= r['grad_deviation_max'] < 0.5
    assert all(stats['grad_clip'] > 0 and 0 < stats['weight_levels'] <= 127 for stats in r['layers'].values())
  assert train[0]['lr'] > train[-1]['lr'] > 0  # cosine decay
  assert train[-1]['loss'] < train[0]['loss']
  assert _final(stdout) == {k: _test_records(workdir)[-1][k] for k in ('loss', 'accuracy')}
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['32', '36', '40']
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  for png in ('curves.png', 'layers.png'):
    assert (workdir / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert json.loads((workdir / 'config.json').read_text())['num_train_steps'] == NUM_STEPS


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(uninterrupted, cifar_subset, cache_dir, tmp_path):
  workdir = tmp_path / 'run'
  with open(tmp_path / 'killed.log', 'w') as log:
    process = _run(tmp_path, cifar_subset, cache_dir, f'--workdir={workdir}', background_log=log)
    deadline = time.time() + 300
    while not (workdir / 'checkpoints' / '4').exists() and process.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
  assert '"final_test"' not in (tmp_path / 'killed.log').read_text()  # killed before the end
  result = _run(tmp_path, cifar_subset, cache_dir, f'--workdir={workdir}')
  assert 'Resuming from the checkpoint at step' in result.stdout
  assert _final(result.stdout) == _final(uninterrupted[1])
  strip = lambda records: [{k: v for k, v in r.items() if k != 'images_per_second'} for r in records]
  assert strip(metrics.read_records(workdir)) == strip(metrics.read_records(uninterrupted[0]))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(uninterrupted, cifar_subset, cache_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(uninterrupted[0], workdir)
  for path in (workdir / 'checkpoints' / '40').rglob('*'):
    if path.is_file() and path.parent.name == 'd':
      path.write_bytes(b'damaged')
  result = _run(tmp_path, cifar_subset, cache_dir, f'--workdir={workdir}')
  assert 'checkpoint step 40' in result.stderr and 'cannot be read' in result.stderr
  assert 'Resuming from the checkpoint at step 36' in result.stdout
  assert (workdir / 'checkpoints' / '40.corrupt').is_dir()
  assert _final(result.stdout) == _final(uninterrupted[1])


def test_four_devices_match_one_device(uninterrupted, cifar_subset, cache_dir, tmp_path):
  result = _run(tmp_path, cifar_subset, cache_dir, f'--workdir={tmp_path / "run"}', devices=4)
  assert '4 devices' in result.stdout
  one, four = _test_records(uninterrupted[0]), _test_records(tmp_path / 'run')
  assert [r['step'] for r in one] == [r['step'] for r in four]
  # Sums reduce in another order over 4 devices; int8 rounding then amplifies the float differences slowly.
  assert four[0]['loss'] == pytest.approx(one[0]['loss'], rel=1e-4)
  for a, b in zip(one, four):
    assert b['loss'] == pytest.approx(a['loss'], rel=2e-3)
    assert b['accuracy'] == pytest.approx(a['accuracy'], abs=0.021)  # 2 of 100 test images


def _lowered_train_steps(config: ml_collections.ConfigDict) -> str:
  """The program text of ``config``'s compiled train steps (``trainer._Loop``) on synthetic data."""
  mesh = sharding.training_mesh(config)
  with jax.set_mesh(mesh):
    dataset = input_pipeline.synthetic_dataset(sharding.replicated(mesh), num_train=64, num_test=64)
    tx = precision.wrap_optimizer(optimizers.create_optimizer(config.optimizer, 0.1), config)
    model = precision.apply_precision(trainer.create_model(config, dataset.num_classes), config)
    loop = trainer._Loop(config, model, tx, dataset, mesh)
    state = trainer.abstract_state(model, tx, dataset.image_shape, config.seed, sharding.replicated(mesh))
    return loop.train_steps.lower(state, dataset, jax.ShapeDtypeStruct((64,), np.int32), np.int32(0),
                                  np.int32(1)).as_text()


_HASH_TRAIN_STEPS = """
import hashlib
from configs import smoke
from test_trainer import _lowered_train_steps
print(hashlib.sha256(_lowered_train_steps(smoke.get_config()).encode()).hexdigest())
"""


def test_an_nnx_resnet20_trains_and_resumes_bit_exactly(cifar_subset, cache_dir, tmp_path):
  """--config.api=nnx: the zoo's NNX ResNet-20 (the smoke config's quarter width), made int8 by jint8.nnx; a run
  resumed from its step-4 checkpoint ends as the uninterrupted run did."""
  flags = ('--config.api=nnx', '--config.model=resnet20', '--config.num_train_steps=8')
  workdir, resumed = tmp_path / 'run', tmp_path / 'resumed'
  result = _run(tmp_path, cifar_subset, cache_dir, f'--workdir={workdir}', *flags)
  train = [r for r in metrics.read_records(workdir) if r['split'] == 'train']
  # every conv but the stem is int8 (18 in the blocks, 2 shortcuts); the classifier stays float
  layers = train[-1]['layers']
  assert len(layers) == 20 and 'model/blocks/3/shortcut/conv' in layers and 'model/stem/conv' not in layers
  for r in train:
    assert np.isfinite(r['loss']) and r['nonfinite'] == 0
    assert all(stats['grad_clip'] > 0 and 0 < stats['weight_levels'] <= 127 for stats in r['layers'].values())
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '8')
  again = _run(tmp_path, cifar_subset, cache_dir, f'--workdir={resumed}', *flags)
  assert 'Resuming from the checkpoint at step 4' in again.stdout
  assert _final(again.stdout) == _final(result.stdout)
  strip = lambda records: [{k: v for k, v in r.items() if k != 'images_per_second'} for r in records]
  assert strip(metrics.read_records(resumed)) == strip(metrics.read_records(workdir))


def test_the_int8_train_steps_lower_to_the_same_program_in_every_process():
  # JAX's persistent compilation cache keys on the program: a program that depends on Python's hash seed (a set
  # iterated while tracing) would be recompiled by every run and every resume.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / 'tests')]), JAX_PLATFORMS='cpu')
  hashes = [subprocess.run([sys.executable, '-c', _HASH_TRAIN_STEPS], env={**env, 'PYTHONHASHSEED': seed},
                           capture_output=True, text=True, timeout=300, check=True).stdout.split()[-1]
            for seed in ('0', '1')]
  assert hashes[0] == hashes[1]


def test_every_seed_runs_one_int8_program_and_rounds_with_its_seed(rng, monkeypatch):
  # One program for a seed sweep: JAX's persistent compilation cache compiles it once.
  programs = [_lowered_train_steps(_config(model='test_trainer:TinyCNN', seed=seed)) for seed in (0, 1)]
  assert programs[0] == programs[1]
  # One step from the same params and batch (augmented with a fixed key) under the two seeds' state.rng: only the
  # stochastic rounding tells them apart.
  augmented = input_pipeline.train_batch
  monkeypatch.setattr(input_pipeline, 'train_batch', lambda *args: augmented(*args[:-1], jax.random.PRNGKey(0)))
  replicated = sharding.replicated(sharding.data_mesh())
  dataset = input_pipeline.synthetic_dataset(replicated, num_train=16, num_test=1, seed=int(rng.integers(2 ** 31)))
  order = jnp.asarray(rng.permutation(16), jnp.int32)
  for stochastic in (True, False):
    config = _config(model='test_trainer:TinyCNN')
    config.int8.update(stochastic_rounding=stochastic, num_candidates=8, refine=2)
    model = precision.apply_precision(trainer.create_model(config, dataset.num_classes), config)
    tx = precision.wrap_optimizer(optax.sgd(0.1), config)
    state = trainer.initial_state(model, tx, dataset.image_shape, 0, replicated)
    step = jax.jit(functools.partial(trainer.train_step, model=model, tx=tx, batch_size=8, batch_sharding=replicated))
    params = [step(state.replace(rng=jax.random.PRNGKey(seed)), dataset, order, 0)[0].params for seed in (0, 1)]
    differ = not all(jax.tree.leaves(jax.tree.map(np.array_equal, *params)))
    assert differ == stochastic, f'stochastic_rounding={stochastic}: the seeds give different params: {differ}'
  assert jax.random.key_impl(trainer.rounding_key(state)) == 'rbg'  # RngBitGenerator: a fast compile


def test_randomness_streams_are_distinct_and_per_step(rng):
  """Order, augmentation and rounding keys (shared by both trainers) differ; the per-step ones change each step."""
  state = trainer.TrainState(step=jnp.asarray(int(rng.integers(1000))), params={}, batch_stats={}, int8_state={},
                             opt_state=(), rng=jax.random.PRNGKey(int(rng.integers(2 ** 31))))
  later = state.replace(step=state.step + 1)
  keys = [trainer.order_key(state), trainer.augment_key(state), trainer.augment_key(later),
          jax.random.key_data(trainer.rounding_key(state))[:2], jax.random.key_data(trainer.rounding_key(later))[:2]]
  keys = {tuple(np.asarray(k).tolist()) for k in keys}  # two uint32 words each
  assert len(keys) == 5
  np.testing.assert_array_equal(trainer.order_key(state), trainer.order_key(later))


def test_unknown_config_key_is_rejected_by_name(cifar_subset, cache_dir, tmp_path):
  process = subprocess.run(
      [sys.executable, str(REPO / 'train.py'), f'--config={REPO / "configs" / "smoke.py"}',
       '--config.optimizer.learning_rat=0.1'], cwd=tmp_path, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert process.returncode != 0 and 'learning_rat' in process.stderr


def _config(**overrides) -> ml_collections.ConfigDict:
  config = smoke.get_config()
  config.update(overrides)
  return config


@pytest.mark.parametrize('key, value, message', [
    ('precision', 'int4', 'config.precision: unknown precision'),
    ('task', 'segmentation', 'config.task'),
    ('batch_size', 0, 'config.batch_size must be >= 1'),
    ('label_smoothing', 1.0, 'config.label_smoothing'),
    ('eval_every_steps', -1, 'config.eval_every_steps'),
    ('api', 'haiku', "config.api must be one of \\('linen', 'nnx'\\), got 'haiku'"),
])
def test_invalid_config_values_name_the_key(key, value, message):
  with pytest.raises(ValueError, match=message):
    trainer.validate_config(_config(**{key: value}))


@pytest.mark.parametrize('name', ['resnet', 'resnet56', 'mobilenet_v2', 'vgg16_bn', 'inception_v3_cifar'])
def test_model_configs_are_valid_and_name_their_model(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  trainer.validate_config(config)
  assert config.model in models.MODEL_NAMES and config.int8.backend == 'auto'
  assert config.num_epochs == (100 if name == 'mobilenet_v2' else 200)


def test_mobilenet_v2_config_runs_the_measured_schedule():
  """docs/results.md's recipe: peak lr 0.2 at batch 512 after 2 warm-up epochs, cosine to 0 at step 9,700."""
  config = importlib.import_module('configs.mobilenet_v2').get_config()
  steps_per_epoch = 50_000 // config.batch_size
  schedule = optimizers.learning_rate_schedule(config.optimizer, batch_size=config.batch_size,
                                               steps_per_epoch=steps_per_epoch,
                                               num_steps=config.num_epochs * steps_per_epoch)
  assert config.num_epochs * steps_per_epoch == 9_700
  np.testing.assert_allclose([schedule(97), schedule(194), schedule(9_700)], [0.1, 0.2, 0.0], atol=1e-7)


def test_invalid_int8_and_model_settings_name_the_key():
  config = _config()
  config.int8.backend = 'cuda'
  with pytest.raises(ValueError, match="config.int8.backend: unknown int8 backend 'cuda'"):
    trainer.validate_config(config)
  config = _config()
  config.int8.input_clip = 'percentile'
  with pytest.raises(ValueError, match='config.int8: .*input_clip'):
    trainer.validate_config(config)
  config = _config()
  config.int8.compute_dtype = 'float16'
  with pytest.raises(ValueError, match="config.int8.compute_dtype: 'float16' is not one of"):
    trainer.validate_config(config)
  config = _config()
  config.int8.float_layers = ('stage[',)
  with pytest.raises(ValueError, match='config.int8: .*bad regular expression'):
    trainer.validate_config(config)
  with pytest.raises(ValueError, match="config.model: unknown model 'resnet21'"):
    trainer.create_model(_config(model='resnet21'), 10)
  with pytest.raises(ValueError, match="config.model: unknown NNX model 'mobilenet_v2'; valid: resnet20, resnet56"):
    trainer.create_model(_config(model='mobilenet_v2', api='nnx'), 10)
  for api in ('linen', 'nnx'):
    config = _config(api=api)
    config.model_kwargs.depth_multiplier = 2
    with pytest.raises(ValueError, match='config.model_kwargs: .*depth_multiplier'):
      trainer.create_model(config, 10)


def test_training_mesh_checks_the_batch_sizes():
  assert sharding.training_mesh(_config()).size == jax.device_count()
  with pytest.raises(ValueError, match=r'config.eval_batch_size=0 must be a positive multiple'):
    sharding.training_mesh(_config(eval_batch_size=0))


def test_run_length_in_steps_and_a_batch_larger_than_the_data():
  assert trainer.run_length(_config(batch_size=32, num_train_steps=0, num_epochs=3), 100) == (3, 9)
  assert trainer.run_length(_config(batch_size=32, num_train_steps=7), 100) == (3, 7)
  with pytest.raises(ValueError, match=r'config.batch_size=128 is larger than the training set \(100 examples\)'):
    trainer.run_length(_config(batch_size=128), 100)


def test_precision_is_described_with_the_backend_that_runs():
  config = _config()
  assert precision.describe(config) == ('int8 (xla backend, DSGC every 4 steps, DCLR alpha 20 beta 0.1, '
                                        'float32 elsewhere)')  # backend "auto" off a GPU
  config.int8.dsgc, config.int8.dclr = False, False
  assert 'max-abs gradient clip, no DCLR' in precision.describe(config)
  assert precision.describe(_config(precision='bf16')) == 'bf16'


def test_create_model_uses_the_precision_dtype():
  assert trainer.create_model(_config(precision='bf16'), 10).dtype == jnp.bfloat16
  assert trainer.create_model(_config(precision='int8'), 10).dtype == jnp.float32
  config = _config(precision='int8')
  config.int8.compute_dtype = 'bfloat16'
  assert trainer.create_model(config, 10).dtype == jnp.bfloat16
  model = trainer.create_model(_config(model='test_trainer:TinyCNN'), 7)
  assert isinstance(model, TinyCNN) and model.num_classes == 7


def _optimizer_config(**overrides):
  config = default.get_config().optimizer
  for key, value in overrides.items():
    config[key] = value
  return config


def test_learning_rate_schedules():
  cosine = optimizers.learning_rate_schedule(_optimizer_config(), batch_size=256, steps_per_epoch=10,
                                             num_steps=100)
  for step in (0, 37, 100):
    assert cosine(step) == pytest.approx(0.2 * 0.5 * (1 + np.cos(np.pi * step / 100)), abs=1e-7)
  warm = optimizers.learning_rate_schedule(_optimizer_config(warmup_epochs=2.0, base_batch_size=0),
                                           batch_size=256, steps_per_epoch=10, num_steps=100)
  assert [float(warm(s)) for s in (0, 10)] == pytest.approx([0.0, 0.05])
  assert warm(20 + 40) == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi * 40 / 80)))
  piecewise = optimizers.learning_rate_schedule(
      _optimizer_config(schedule='piecewise', boundaries_epochs=(5, 8), base_batch_size=0), batch_size=64,
      steps_per_epoch=10, num_steps=100)
  assert [float(piecewise(s)) for s in (49, 50, 79, 80)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
  with pytest.raises(ValueError, match='config.optimizer.schedule'):
    optimizers.learning_rate_schedule(_optimizer_config(schedule='linear'), batch_size=1, steps_per_epoch=1,
                                      num_steps=1)
  with pytest.raises(ValueError, match='config.optimizer.warmup_epochs'):
    optimizers.learning_rate_schedule(_optimizer_config(warmup_epochs=20.0), batch_size=1,
                                      steps_per_epoch=10, num_steps=100)


def test_create_optimizer_is_optax_by_name_with_weight_decay():
  params = {'w': jnp.asarray(np.random.default_rng(0).normal(size=(5,)), jnp.float32)}
  grads = {'w': jnp.asarray(np.random.default_rng(1).normal(size=(5,)), jnp.float32)}
  tx = optimizers.create_optimizer(_optimizer_config(), 0.1)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Nesterov SGD from zero momentum: update = -lr * (1 + momentum) * (g + wd * w).
  expected = -0.1 * 1.9 * (np.asarray(grads['w'], np.float64) + 5e-4 * np.asarray(params['w'], np.float64))
  np.testing.assert_allclose(updates['w'], expected, rtol=1e-6)
  adam = optimizers.create_optimizer(_optimizer_config(name='adamw', kwargs={'b1': 0.8}, weight_decay=0.0), 0.1)
  assert isinstance(adam, optax.GradientTransformation)
  with pytest.raises(ValueError, match="config.optimizer.name: 'sgdd'"):
    optimizers.create_optimizer(_optimizer_config(name='sgdd'), 0.1)
  with pytest.raises(ValueError, match=r"config.optimizer.kwargs: optax.sgd takes no argument \['beta'\]"):
    optimizers.create_optimizer(_optimizer_config(kwargs={'beta': 0.9}), 0.1)


def _toy_step(state, data, order, index):
  """A train step of a toy state: adds the batch's value; metrics like an int8 step's, varying per batch."""
  value = data[order[index]]
  layer = {'grad_clip': value, 'grad_deviation': value / 10, 'input_clip': 2 * value, 'input_saturation': value / 2,
           'nonfinite': (value > 3.5).astype(jnp.float32), 'weight_levels': 3 * value}
  layers = {'a': layer, 'b': dict(layer, grad_deviation=value / 5)}
  return state + value, {'loss': value, 'accuracy': value / 4, 'layers': layers}


def test_multi_step_runs_the_steps_of_one_epoch_and_summarizes_them(rng):
  data = jnp.asarray(rng.uniform(0, 4, size=8), jnp.float32)
  order = jnp.asarray(rng.permutation(8), jnp.int32)
  run = jax.jit(trainer.multi_step(_toy_step))
  state, first = run(jnp.float32(1.0), data, order, np.int32(2), np.int32(3))
  state, second = run(state, data, order, np.int32(5), np.int32(2))
  values = np.asarray(data)[np.asarray(order)[2:7]].astype(np.float64)
  np.testing.assert_allclose(state, 1 + values.sum(), rtol=1e-6)
  assert int(first['steps']) == 3 and int(second['steps']) == 2
  scalars, layers = trainer.summarize_train([first, second])
  assert scalars == pytest.approx({'loss': values.mean(), 'accuracy': values.mean() / 4,
                                   'grad_deviation_mean': 0.15 * values.mean(),
                                   'grad_deviation_max': values.max() / 5,
                                   'nonfinite': 2 * int((values > 3.5).sum())}, rel=1e-5)
  assert layers['a'] == pytest.approx({'grad_deviation': values.mean() / 10, 'grad_clip': values[-1],
                                       'input_clip': 2 * values[-1], 'input_saturation': values.max() / 2,
                                       'saturated_steps': int((values > 2).sum()),
                                       'nonfinite': int((values > 3.5).sum()), 'weight_levels': 3 * values[-1]},
                                      rel=1e-5)
  fp32 = trainer.summarize_train([trainer.step_record({'loss': jnp.float32(1.5), 'accuracy': jnp.float32(1.0)})])
  assert fp32 == ({'loss': 1.5, 'accuracy': 1.0}, {})


@pytest.mark.parametrize('api', ['linen', 'nnx'])
@pytest.mark.parametrize('precision_name,traced', [('int8', [True, False]), ('fp32', [None])])
def test_bind_train_step_traces_int8_steps_with_and_without_the_search(rng, api, precision_name, traced):
  config = _config(precision=precision_name, api=api)
  images = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  model = precision.apply_precision(trainer.create_model(config, 3) if api == 'nnx' else TinyCNN(num_classes=3),
                                    config)
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  state = trainer.TrainState(step=jnp.int32(0), params=variables['params'], batch_stats=variables['batch_stats'],
                             int8_state=variables.get(STATE_COLLECTION, {}), opt_state=(), rng=jax.random.PRNGKey(1))
  seen = []  # Int8Config.searches of each traced model (None: a float model)

  def fake_step(state, x, *, model, scale):
    seen.append(model.config.searches if isinstance(model, Int8Model) else None)
    return state, x * scale

  _, out = jax.jit(trainer.bind_train_step(fake_step, config, model, scale=2.0))(state, images)
  assert seen == traced
  np.testing.assert_array_equal(out, images * 2.0)


def test_checkpointer_restores_and_skips_a_corrupt_step(tmp_path):
  like = {'w': jnp.zeros((3,)), 'step': jnp.zeros((), jnp.int32), 'position': np.asarray(0, np.int64)}
  checkpointer = checkpointing.Checkpointer(tmp_path, max_to_keep=2)
  assert checkpointer.restore_latest(like) is None
  for step in (1, 2, 3):
    checkpointer.save(step, {'w': jnp.full((3,), float(step)), 'step': jnp.int32(step),
                             'position': np.asarray(10 * step, np.int64)})
  checkpointer.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['2', '3']
  (tmp_path / '3' / 'default' / '_METADATA').write_text('{')
  step, tree = checkpointing.Checkpointer(tmp_path).restore_latest(like)
  assert step == 2 and int(tree['position']) == 20
  np.testing.assert_array_equal(tree['w'], [2.0, 2.0, 2.0])
  assert (tmp_path / '3.corrupt').is_dir()
  (tmp_path / '2' / 'default' / '_METADATA').write_text('{')
  with pytest.raises(RuntimeError, match='no readable checkpoint'):
    checkpointing.Checkpointer(tmp_path).restore_latest(like)


def test_metric_writer_drops_records_after_the_resume_step(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  for step in (1, 2, 3):
    writer.write(step, 'train', {'loss': np.float32(step)}, {'l0': {'grad_clip': jnp.float32(0.5)}})
  writer.close()
  writer = metrics.MetricWriter(tmp_path, resume_step=2)
  writer.write(3, 'train', {'loss': 9.0})
  writer.close()
  assert metrics.read_records(tmp_path) == [
      {'step': 1, 'split': 'train', 'loss': 1.0, 'layers': {'l0': {'grad_clip': 0.5}}},
      {'step': 2, 'split': 'train', 'loss': 2.0, 'layers': {'l0': {'grad_clip': 0.5}}},
      {'step': 3, 'split': 'train', 'loss': 9.0}]
  assert not metrics.plot_layers([{'step': 1, 'split': 'train', 'loss': 1.0}], tmp_path / 'layers.png')
  assert not (tmp_path / 'layers.png').exists()


def test_fp32_state_round_trips_through_a_checkpoint(tmp_path):
  config = _config(precision='fp32')
  model = trainer.create_model(_config(model='test_trainer:TinyCNN', precision='fp32'), 10)
  tx = precision.wrap_optimizer(optax.sgd(0.1, momentum=0.9), config)
  args = (model, tx, (32, 32, 3), 0, sharding.replicated(sharding.data_mesh()))
  state = trainer.initial_state(*args)
  assert state.int8_state == {}
  checkpointer = checkpointing.Checkpointer(tmp_path)
  checkpointer.save(7, trainer.checkpoint_tree(state, epoch=2, index=3))
  checkpointer.close()
  like = trainer.abstract_state(*args)
  step, tree = checkpointing.Checkpointer(tmp_path).restore_latest(trainer.checkpoint_tree(like, 0, 0))
  restored, position = trainer.from_checkpoint_tree(like, tree)
  assert step == 7 and position == (2, 3)
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_summarize_train_lists_layers_in_the_given_order(rng):
  data = jnp.asarray(rng.uniform(0, 4, size=4), jnp.float32)
  _, record = jax.jit(trainer.multi_step(_toy_step))(jnp.float32(0.0), data, jnp.arange(4, dtype=jnp.int32),
                                                      np.int32(0), np.int32(4))
  assert list(trainer.summarize_train([record])[1]) == ['a', 'b']  # no order given: by name
  assert list(trainer.summarize_train([record], ['b', 'a'])[1]) == ['b', 'a']
  assert list(trainer.summarize_train([record], ['b'])[1]) == ['b', 'a']  # unlisted layers follow, by name


class _ToyLoop:
  """The train steps of ``_toy_step`` over a fixed sequence of per-step losses, in order."""

  def __init__(self):
    self.train_steps = jax.jit(trainer.multi_step(_toy_step))

  def order(self, state, epoch):
    del state, epoch
    return jnp.arange(40, dtype=jnp.int32)


@pytest.mark.parametrize('patience', [3, 0])
def test_train_loop_stops_a_run_whose_loss_returns_to_its_start(rng, tmp_path, patience):
  # per-step losses: 2.3 for 8 steps, then falling to about 0.5, then back at 2.3 from step 24 on
  losses = np.concatenate([np.full(8, 2.3), np.geomspace(1.5, 0.5, 15), np.full(17, 2.3)])
  losses *= np.exp(rng.normal(0, 0.02, losses.size))
  dataset = jnp.asarray(losses, jnp.float32)
  config = _config(log_every_steps=4, eval_every_steps=0, checkpoint_every_steps=4, batch_size=1,
                   divergence_patience=patience)
  writer = metrics.MetricWriter(tmp_path)
  checkpointer = checkpointing.Checkpointer(tmp_path / 'checkpoints')
  kwargs = dict(start=(0, 0, 0), num_steps=40, steps_per_epoch=40, config=config, schedule=lambda step: 0.1,
                writer=writer, checkpointer=checkpointer, bar=progress.Progress(40, enabled=False),
                evaluate=lambda state, step: {}, show=('loss',),
                divergence_check=trainer.make_divergence_check(config, tmp_path, 0))
  if patience:
    with pytest.raises(divergence.TrainingDiverged, match='steps 28-36'):
      trainer.train_loop(jnp.float32(0.0), _ToyLoop(), dataset, **kwargs)
    assert checkpointer.latest_step() == 32  # the last one before the error, written in full
    assert [r['step'] for r in metrics.read_records(tmp_path)][-1] == 36
  else:
    state, _ = trainer.train_loop(jnp.float32(0.0), _ToyLoop(), dataset, **kwargs)
    np.testing.assert_allclose(state, losses.sum(), rtol=1e-5)
  checkpointer.close()
  writer.close()


def test_a_resumed_run_is_checked_with_the_losses_it_logged_before(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  for step, loss in ((100, 2.3), (200, 0.6), (300, 2.3), (400, 9.0)):
    writer.write(step, 'train', {'loss': loss})
  writer.write(200, 'test', {'loss': 9.0, 'accuracy': 0.1})
  writer.close()
  check = trainer.make_divergence_check(_config(divergence_patience=2), tmp_path, 300)
  assert check.history == [(100, 2.3), (200, 0.6), (300, 2.3)]  # train logs up to the resume step
  with pytest.raises(divergence.TrainingDiverged):
    check.update(400, 2.4)


def test_int8_config_takes_the_int8_keys_of_the_config():
  config = _config()
  config.int8.depthwise_channel_clips, config.int8.refine, config.int8.dsgc = True, 3, False
  config.int8.input_clip, config.int8.history = 'maxabs', 5
  int8 = precision.int8_config(config)
  assert int8.depthwise_channel_clips and int8.refine == 3 and not int8.dsgc
  assert int8.input_clip == 'maxabs' and int8.history == 5
