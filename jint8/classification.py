"""Image classification (``config.task == "classification"``): the task on ``jint8.training``.

``train_and_evaluate(config, workdir)`` trains the model named in the config on the in-device dataset
(``jint8.input_pipeline``) and reports the test set's loss and accuracy; ``jint8.training.run`` does the rest
(precision, optimizer, data parallelism, checkpoints, metrics, plots). The keys of the config are listed with
their defaults in ``configs/default.py``.
"""

from __future__ import annotations

import functools
import importlib
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx

from jint8 import input_pipeline, models, sharding
from jint8.nn import ROUNDING_RNG
from jint8.training import nnx_bridge, precision, run
from jint8.training.state import TrainState, augment_key, dropout_key, rounding_key
from jint8.training.step import gradient_step, with_layer_stats


# The Flax APIs of config.api: a Linen model, or a Flax NNX model run through jint8.training.nnx_bridge.
APIS = ('linen', 'nnx')


def validate_config(config: Any) -> None:
  """Raises a ValueError naming the first config key whose value is invalid."""
  run.validate_config(config, 'classification')
  if config.api not in APIS:
    raise ValueError(f'config.api must be one of {APIS}, got {config.api!r}')
  if not 0 <= config.label_smoothing < 1:
    raise ValueError(f'config.label_smoothing must be in [0, 1), got {config.label_smoothing}')


def create_model(config: Any, num_classes: int) -> nn.Module:
  """The model of ``config.model`` / ``config.model_kwargs`` in the compute dtype of ``config.precision``.

  ``config.model`` is a name in ``jint8.models.MODEL_NAMES`` (with ``config.api == "nnx"``: in
  ``NNX_MODEL_NAMES``, the Flax NNX version, bridged into Linen by ``jint8.training.nnx_bridge``) or
  ``"package.module:Factory"``, any callable taking ``num_classes``, ``dtype`` and the ``model_kwargs`` (a model of
  your own; for NNX also ``rngs``).
  """
  kwargs = dict(num_classes=num_classes, dtype=precision.compute_dtype(config), **config.model_kwargs)
  nnx_api = config.api == 'nnx'
  names, zoo = (models.NNX_MODEL_NAMES, models.create_nnx_model) if nnx_api else (models.MODEL_NAMES,
                                                                                 models.create_model)
  if ':' in config.model:
    module_name, name = config.model.split(':', 1)
    try:
      factory = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
      raise ValueError(f'config.model: cannot import {config.model!r}: {e}') from None
  elif config.model in names:
    factory = functools.partial(zoo, config.model)
  else:
    raise ValueError(f'config.model: unknown {"NNX " if nnx_api else ""}model {config.model!r}; valid: '
                     f'{", ".join(names)} or "package.module:Factory"')
  try:
    if nnx_api:
      nnx.eval_shape(lambda: factory(**kwargs, rngs=nnx.Rngs(0)))  # checks the kwargs, building nothing
      return nnx_bridge.linen_model(functools.partial(factory, **kwargs))
    return factory(**kwargs)
  except TypeError as e:
    raise ValueError(f'config.model_kwargs: {e}') from None


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy in float32, with optional label smoothing."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(state: TrainState, dataset: input_pipeline.Dataset, order: jax.Array, index: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation, batch_size: int,
               batch_sharding: jax.sharding.Sharding, label_smoothing: float = 0.0
               ) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step on batch ``index`` of the epoch visiting the training set in ``order``.

  Returns the new state and the step's metrics: ``loss``, ``accuracy`` and, for int8, ``layers`` (per layer the
  statistics ``jint8.state.LOGGED`` of this step).
  """
  dropout_rng = dropout_key(state)
  images, labels = input_pipeline.train_batch(dataset, order, index, batch_size, augment_key(state))
  images = jax.lax.with_sharding_constraint(images, batch_sharding)
  labels = jax.lax.with_sharding_constraint(labels, batch_sharding)

  def loss_fn(params, int8_state):
    logits, updates = model.apply(state.variables(params, int8_state), images, train=True, mutable=['batch_stats'],
                                  rngs={'dropout': dropout_rng, ROUNDING_RNG: rounding_key(state)})
    loss = jnp.mean(cross_entropy(logits, labels, label_smoothing))
    return loss, (logits, updates.get('batch_stats', {}))

  new_state, loss, logits = gradient_step(state, tx, loss_fn)
  return new_state, with_layer_stats({'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)},
                                     new_state)


def eval_step(state: TrainState, dataset: input_pipeline.Dataset, index: jax.Array, *, model: nn.Module,
              batch_size: int, batch_sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Sums of loss, correct predictions and examples over test batch ``index`` (padding masked out)."""
  images, labels, mask = input_pipeline.eval_batch(dataset, index, batch_size)
  images = jax.lax.with_sharding_constraint(images, batch_sharding)
  logits = model.apply(state.variables(), images, train=False)
  return {'loss': jnp.sum(cross_entropy(logits, labels) * mask),
          'correct': jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
          'count': jnp.sum(mask)}


class Classification(run.Task):
  """The classification task: the dataset of ``config.dataset``, ``train_step`` and test-set evaluation."""

  show = ('loss', 'accuracy')
  validate_config = staticmethod(validate_config)

  def load(self, replicated: jax.sharding.Sharding) -> run.TrainingData:
    self.dataset = input_pipeline.create_dataset(self.config.dataset, replicated)
    return run.TrainingData(self.dataset, self.dataset.train.num_examples, self.dataset.image_shape)

  def create_model(self) -> nn.Module:
    return create_model(self.config, self.dataset.num_classes)

  def compile(self, model: nn.Module, mesh: jax.sharding.Mesh):
    self.eval_step = jax.jit(
        functools.partial(eval_step, model=model, batch_size=self.config.eval_batch_size,
                          batch_sharding=sharding.batch_sharded(mesh)),
        out_shardings=sharding.replicated(mesh))
    return functools.partial(train_step, label_smoothing=self.config.label_smoothing)

  def describe(self) -> str:
    return f'{self.dataset.train.num_examples} training images'

  def evaluate(self, state: TrainState) -> tuple[dict[str, float], None]:
    """Test-set ``loss`` and ``accuracy``."""
    sums = [self.eval_step(state, self.dataset, i)
            for i in range(input_pipeline.num_eval_batches(self.dataset, self.config.eval_batch_size))]
    total = jax.device_get(jax.tree.map(lambda *x: sum(x), *sums))
    return {'loss': float(total['loss'] / total['count']), 'accuracy': float(total['correct'] / total['count'])}, None


def train_and_evaluate(config: Any, workdir: str | pathlib.Path, *, model: nn.Module | None = None,
                       allow_config_change: bool = False) -> dict[str, float]:
  """Runs the ``Classification`` task of ``config`` (the keys of ``configs/default.py``) in ``workdir``
  (``jint8.training.run.train_and_evaluate``, which says what ``allow_config_change`` allows); returns the final
  test ``loss`` and ``accuracy``. ``model``, a Flax module called as ``model(images, train=...)``, replaces
  ``config.model``."""
  return run.train_and_evaluate(Classification(config), workdir, model=model,
                                allow_config_change=allow_config_change)
