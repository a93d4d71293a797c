"""The classification task (``jint8.classification``): its config checks, model, one program for every seed, and
the configs of the CIFAR models."""

import functools
import importlib
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import tiny
from jint8 import classification, input_pipeline, models, sharding
from jint8.training import optimizers, precision
from jint8.training.loop import Loop
from jint8.training.state import abstract_state, initial_state, rounding_key
from tiny import TinyCNN

REPO = pathlib.Path(__file__).resolve().parents[1]


def _lowered_train_steps(config: ml_collections.ConfigDict) -> str:
  """The program text of ``config``'s compiled train steps (the classification task's step in
  ``jint8.training.loop.Loop``) on synthetic data."""
  mesh = sharding.training_mesh(config)
  with jax.set_mesh(mesh):
    dataset = input_pipeline.synthetic_dataset(sharding.replicated(mesh), num_train=64, num_test=64)
    tx = precision.wrap_optimizer(optimizers.create_optimizer(config.optimizer, 0.1), config)
    model = precision.apply_precision(classification.create_model(config, dataset.num_classes), config)
    loop = Loop(classification.Classification(config).compile(model, mesh), config, model, tx, mesh,
                dataset.train.num_examples)
    state = abstract_state(model, tx, dataset.image_shape, config.seed, sharding.replicated(mesh))
    return loop.train_steps.lower(state, dataset, jax.ShapeDtypeStruct((64,), np.int32), np.int32(0),
                                  np.int32(1)).as_text()


_HASH_TRAIN_STEPS = """
import hashlib
from configs import smoke
from test_classification import _lowered_train_steps
print(hashlib.sha256(_lowered_train_steps(smoke.get_config()).encode()).hexdigest())
"""


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
  programs = [_lowered_train_steps(tiny.config(model='tiny:TinyCNN', seed=seed)) for seed in (0, 1)]
  assert programs[0] == programs[1]
  # One step from the same params and batch (augmented with a fixed key) under the two seeds' state.rng: only the
  # stochastic rounding tells them apart.
  augmented = input_pipeline.train_batch
  monkeypatch.setattr(input_pipeline, 'train_batch', lambda *args: augmented(*args[:-1], jax.random.PRNGKey(0)))
  replicated = sharding.replicated(sharding.data_mesh())
  dataset = input_pipeline.synthetic_dataset(replicated, num_train=16, num_test=1, seed=int(rng.integers(2 ** 31)))
  order = jnp.asarray(rng.permutation(16), jnp.int32)
  for stochastic in (True, False):
    config = tiny.config(model='tiny:TinyCNN')
    config.int8.update(stochastic_rounding=stochastic, num_candidates=8, refine=2)
    model = precision.apply_precision(classification.create_model(config, dataset.num_classes), config)
    tx = precision.wrap_optimizer(optax.sgd(0.1), config)
    state = initial_state(model, tx, dataset.image_shape, 0, replicated)
    step = jax.jit(functools.partial(classification.train_step, model=model, tx=tx, batch_size=8,
                                     batch_sharding=replicated))
    params = [step(state.replace(rng=jax.random.PRNGKey(seed)), dataset, order, 0)[0].params for seed in (0, 1)]
    differ = not all(jax.tree.leaves(jax.tree.map(np.array_equal, *params)))
    assert differ == stochastic, f'stochastic_rounding={stochastic}: the seeds give different params: {differ}'
  assert jax.random.key_impl(rounding_key(state)) == 'rbg'  # RngBitGenerator: a fast compile


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
    classification.validate_config(tiny.config(**{key: value}))


@pytest.mark.parametrize('name', ['resnet', 'resnet56', 'mobilenet_v2', 'vgg16_bn', 'inception_v3_cifar'])
def test_model_configs_are_valid_and_name_their_model(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  classification.validate_config(config)
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
  config = tiny.config()
  config.int8.backend = 'cuda'
  with pytest.raises(ValueError, match="config.int8.backend: unknown int8 backend 'cuda'"):
    classification.validate_config(config)
  config = tiny.config()
  config.int8.input_clip = 'percentile'
  with pytest.raises(ValueError, match='config.int8: .*input_clip'):
    classification.validate_config(config)
  config = tiny.config()
  config.int8.deviation_jump = 0.5
  with pytest.raises(ValueError, match=r'config.int8: Int8Config.deviation_jump must be 0 \(off\) or > 1, got 0.5'):
    classification.validate_config(config)
  config = tiny.config()
  config.int8.compute_dtype = 'float16'
  with pytest.raises(ValueError, match="config.int8.compute_dtype: 'float16' is not one of"):
    classification.validate_config(config)
  config = tiny.config()
  config.int8.float_layers = ('stage[',)
  with pytest.raises(ValueError, match='config.int8: .*bad regular expression'):
    classification.validate_config(config)
  with pytest.raises(ValueError, match="config.model: unknown model 'resnet21'"):
    classification.create_model(tiny.config(model='resnet21'), 10)
  with pytest.raises(ValueError, match="config.model: unknown NNX model 'mobilenet_v2'; valid: resnet20, resnet56"):
    classification.create_model(tiny.config(model='mobilenet_v2', api='nnx'), 10)
  for api in ('linen', 'nnx'):
    config = tiny.config(api=api)
    config.model_kwargs.depth_multiplier = 2
    with pytest.raises(ValueError, match='config.model_kwargs: .*depth_multiplier'):
      classification.create_model(config, 10)


def test_create_model_uses_the_precision_dtype():
  assert classification.create_model(tiny.config(precision='bf16'), 10).dtype == jnp.bfloat16
  assert classification.create_model(tiny.config(precision='int8'), 10).dtype == jnp.float32
  config = tiny.config(precision='int8')
  config.int8.compute_dtype = 'bfloat16'
  assert classification.create_model(config, 10).dtype == jnp.bfloat16
  model = classification.create_model(tiny.config(model='tiny:TinyCNN'), 7)
  assert isinstance(model, TinyCNN) and model.num_classes == 7
