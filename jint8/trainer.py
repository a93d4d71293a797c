"""Image-classification training and evaluation (``config.task == "classification"``).

``train_and_evaluate(config, workdir)`` trains the model named in the config on the in-device dataset
(``jint8.input_pipeline``), data parallel over every device (``jint8.sharding``), in fp32, bf16 or int8
(``jint8.precision``). It resumes from the newest checkpoint in ``workdir/checkpoints``, writes metrics to
``workdir/metrics.jsonl`` and TensorBoard, shows a progress bar, and ends with PNG plots. The keys of the
config are listed with their defaults in ``configs/default.py``.
"""

from __future__ import annotations

import functools
import importlib
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any, Callable

import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

from jint8 import (checkpointing, divergence, input_pipeline, metrics, models, nnx_bridge, optimizers, precision,
                   progress, sharding)
from jint8 import state as quant_state
from jint8.nn import ROUNDING_RNG, STATE_COLLECTION, record_layer_order, search_cond

# The Flax APIs of config.api: a Linen model, or a Flax NNX model run through jint8.nnx_bridge.
APIS = ('linen', 'nnx')
# Streams of randomness derived from config.seed with jax.random.fold_in.
_INIT, _ORDER, _AUGMENT, _DROPOUT, _ROUNDING = range(5)


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: the model's variables, the optimizer state and the step count.

  ``int8_state`` is ``{}`` for fp32 / bf16. ``rng`` is the run's raw PRNG key: per-step keys derive from it
  and ``step``, so a restored state continues with the same randomness.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  int8_state: Any
  opt_state: Any
  rng: jax.Array

  def variables(self, params=None, int8_state=None) -> dict[str, Any]:
    """The Flax variables of the model (with ``params`` / ``int8_state`` replaced when given)."""
    variables = {'params': self.params if params is None else params, 'batch_stats': self.batch_stats}
    int8_state = self.int8_state if int8_state is None else int8_state
    if int8_state:
      variables[STATE_COLLECTION] = int8_state
    return variables


def validate_config(config: Any) -> None:
  """Raises a ValueError naming the first config key whose value is invalid."""
  if config.task != 'classification':
    raise ValueError(f"config.task: jint8.trainer trains 'classification', got {config.task!r}")
  if config.api not in APIS:
    raise ValueError(f'config.api must be one of {APIS}, got {config.api!r}')
  precision.check_precision(config)
  for key in ('batch_size', 'eval_batch_size', 'log_every_steps', 'keep_checkpoints'):
    if config[key] < 1:
      raise ValueError(f'config.{key} must be >= 1, got {config[key]}')
  for key in ('eval_every_steps', 'checkpoint_every_steps', 'num_train_steps', 'divergence_patience'):
    if config[key] < 0:
      raise ValueError(f'config.{key} must be >= 0, got {config[key]}')
  for key in ('max_train_examples', 'max_test_examples'):
    if config.dataset[key] < 0:
      raise ValueError(f'config.dataset.{key} must be >= 0 (0: all), got {config.dataset[key]}')
  if not config.num_train_steps and config.num_epochs < 1:
    raise ValueError(f'config.num_epochs must be >= 1 when config.num_train_steps is 0, got {config.num_epochs}')
  if not 0 <= config.label_smoothing < 1:
    raise ValueError(f'config.label_smoothing must be in [0, 1), got {config.label_smoothing}')


def create_model(config: Any, num_classes: int) -> nn.Module:
  """The model of ``config.model`` / ``config.model_kwargs`` in the compute dtype of ``config.precision``.

  ``config.model`` is a name in ``jint8.models.MODEL_NAMES`` (with ``config.api == "nnx"``: in
  ``NNX_MODEL_NAMES``, the Flax NNX version, bridged into Linen by ``jint8.nnx_bridge``) or
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


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...], seed: int):

  def init() -> TrainState:
    rng = jax.random.PRNGKey(seed)
    init_rng = jax.random.fold_in(rng, _INIT)
    variables = model.init({'params': init_rng, 'dropout': init_rng},
                           jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params, int8_state = variables['params'], variables.get(STATE_COLLECTION, {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), int8_state=int8_state,
                      opt_state=tx.init(params), rng=rng)

  return init


def initial_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
                  seed: int, state_sharding: jax.sharding.Sharding) -> TrainState:
  """Initialises the model and the optimizer, placed with ``state_sharding``."""
  return jax.jit(_init_fn(model, tx, image_shape, seed), out_shardings=state_sharding)()


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
                   seed: int, state_sharding: jax.sharding.Sharding) -> TrainState:
  """The shapes, dtypes and shardings of ``initial_state``, computing nothing (a restore target)."""
  shapes = jax.eval_shape(_init_fn(model, tx, image_shape, seed))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=state_sharding), shapes)


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
  dropout_rng = _step_key(state, _DROPOUT)
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


def _step_key(state: TrainState, stream: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(state.rng, stream), state.step)


def augment_key(state: TrainState) -> jax.Array:
  """The data-augmentation key of ``state``'s step."""
  return _step_key(state, _AUGMENT)


def order_key(state: TrainState) -> jax.Array:
  """The key that orders the training examples, with the epoch folded in (``input_pipeline.epoch_order``)."""
  return jax.random.fold_in(state.rng, _ORDER)


def rounding_key(state: TrainState) -> jax.Array:
  """The int8 ops' stochastic-rounding key of ``state``'s step (the ``jint8.nn.ROUNDING_RNG`` stream), derived
  from ``state.rng`` at run time: one compiled step for every seed. An ``rbg`` key, as ``jint8.nn`` wants."""
  rng = _step_key(state, _ROUNDING)
  return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl='rbg')


def gradient_step(state: TrainState, tx: optax.GradientTransformation,
                  loss_fn: Callable[[Any, Any], tuple[jax.Array, tuple[Any, Any]]]
                  ) -> tuple[TrainState, jax.Array, Any]:
  """One optimizer step on ``loss_fn(params, int8_state) -> (loss, (aux, new batch_stats))``.

  The gradient of the int8 state holds the ops' new quantization values: they overwrite the state
  (``jint8.state.update``), which ``tx`` gets as its extra argument ``int8_state`` (DCLR reads the deviations).
  Returns the new state (step + 1), the loss and ``aux``.
  """
  (loss, (aux, batch_stats)), (g_params, g_state) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.int8_state)
  int8_state = quant_state.update(state.int8_state, g_state) if state.int8_state else state.int8_state
  updates, opt_state = tx.update(g_params, state.opt_state, state.params, int8_state=int8_state)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=batch_stats, int8_state=int8_state, opt_state=opt_state), loss, aux


def with_layer_stats(step_metrics: dict[str, Any], state: TrainState) -> dict[str, Any]:
  """``step_metrics`` with, for an int8 state, ``layers``: each int8 layer's quantization statistics (its
  ``weight_levels`` are added once per ``multi_step`` loop, not here in every step)."""
  if not state.int8_state:
    return step_metrics
  return dict(step_metrics, layers=quant_state.layer_stats(state.int8_state))


def with_weight_levels(record: dict[str, Any], state: TrainState) -> dict[str, Any]:
  """``record`` with each int8 layer's ``weight_levels`` (``jint8.state.weight_levels``) at ``state``."""
  if 'layers' not in record:
    return record
  now = quant_state.layer_stats(state.int8_state, state.params)  # the record's loop-combined stats win
  return dict(record, layers={name: dict(now[name], **stats) for name, stats in record['layers'].items()})


def eval_step(state: TrainState, dataset: input_pipeline.Dataset, index: jax.Array, *, model: nn.Module,
              batch_size: int, batch_sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Sums of loss, correct predictions and examples over test batch ``index`` (padding masked out)."""
  images, labels, mask = input_pipeline.eval_batch(dataset, index, batch_size)
  images = jax.lax.with_sharding_constraint(images, batch_sharding)
  logits = model.apply(state.variables(), images, train=False)
  return {'loss': jnp.sum(cross_entropy(logits, labels) * mask),
          'correct': jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
          'count': jnp.sum(mask)}


def step_record(step_metrics: dict[str, Any]) -> dict[str, Any]:
  """One step's metrics as a record that ``combine_records`` accumulates: ``steps`` (1), the scalars and, for
  int8, per layer the statistics of ``jint8.state.step_layer_record``."""
  record = {k: v for k, v in step_metrics.items() if k != 'layers'}
  record['steps'] = jnp.ones((), jnp.int32)
  if 'layers' in step_metrics:
    record['layers'] = {name: quant_state.step_layer_record(stats) for name, stats in step_metrics['layers'].items()}
  return record


def combine_records(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
  """The record of two consecutive spans of steps: sums of the scalars, the layers' as ``jint8.state`` says."""
  combined = {k: jax.tree.map(jnp.add, earlier[k], later[k]) for k in later if k != 'layers'}
  if 'layers' in later:
    combined['layers'] = {name: quant_state.combine_layer_records(earlier['layers'][name], stats)
                          for name, stats in later['layers'].items()}
  return combined


def bind_train_step(train_step: Callable[..., tuple[Any, dict[str, Any]]], config: Any, model: nn.Module,
                    **kwargs) -> Callable[..., tuple[Any, dict[str, Any]]]:
  """``train_step(state, *args, model=model, **kwargs)`` as ``step(state, *args)``, for int8 through
  ``jint8.nn.search_cond``: the model with the DSGC search code every ``config.int8.period`` steps, without it
  on the steps between."""

  def step(state, *args):
    return search_cond(lambda m: train_step(state, *args, model=m, **kwargs), model, state.int8_state, state.step,
                       config.int8.period)

  return step


def multi_step(train_step: Callable[..., tuple[Any, dict[str, Any]]],
               finish: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None):
  """``train_step(state, data, order, index)`` run ``num_steps`` times on batches ``index, index + 1, ...`` in
  one compiled loop (one compilation for any ``num_steps``).

  Returns ``run(state, data, order, index, num_steps) -> (state, record)`` with the steps' metrics combined
  (``step_record``, ``combine_records``), then passed through ``finish(record, state)`` with the state after the
  last step when given (the trainers add ``with_weight_levels`` there: only that value is logged, so the kernels
  are read for it once per loop instead of in every step).
  """

  def run(state, data, order, index, num_steps):
    _, like = jax.eval_shape(train_step, state, data, order, index)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(step_record, like))

    def body(i, carry):
      state, record = carry
      state, step_metrics = train_step(state, data, order, index + i)
      return state, combine_records(record, step_record(step_metrics))

    state, record = jax.lax.fori_loop(0, num_steps, body, (state, zeros))
    return state, record if finish is None else finish(record, state)

  return run


def summarize_train(records: list[dict[str, Any]],
                    layer_order: Sequence[str] = ()) -> tuple[dict[str, float], dict[str, dict]]:
  """The mean of each scalar over the steps of ``records`` (``multi_step``'s results since the last log) and,
  for int8, per layer (in ``layer_order``, then the others by name) its summary
  (``jint8.state.summarize_layer_record``); over all layers ``grad_deviation_mean`` / ``_max`` and
  ``nonfinite``."""
  total = jax.device_get(functools.reduce(combine_records, records))
  steps = int(total['steps'])
  scalars = {k: float(v) / steps for k, v in total.items() if k not in ('steps', 'layers')}
  if 'layers' not in total:
    return scalars, {}
  names = [n for n in layer_order if n in total['layers']] + sorted(total['layers'].keys() - set(layer_order))
  layers = {name: quant_state.summarize_layer_record(total['layers'][name], steps) for name in names}
  scalars.update(grad_deviation_mean=float(np.mean([s['grad_deviation'] for s in layers.values()])),
                 grad_deviation_max=max(float(s['grad_deviation_max']) for s in total['layers'].values()),
                 nonfinite=sum(s['nonfinite'] for s in layers.values()))
  return scalars, layers


class _Loop:
  """The compiled functions of one run: train steps, eval step and epoch order."""

  def __init__(self, config: Any, model: nn.Module, tx: optax.GradientTransformation,
               dataset: input_pipeline.Dataset, mesh: jax.sharding.Mesh):
    replicated, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    self.dataset = dataset
    self.eval_batch_size = config.eval_batch_size
    self.train_steps = jax.jit(multi_step(
        bind_train_step(train_step, config, model, tx=tx, batch_size=config.batch_size, batch_sharding=batch,
                        label_smoothing=config.label_smoothing), finish=with_weight_levels),
        donate_argnums=0, out_shardings=replicated)
    self.eval_step = jax.jit(
        functools.partial(eval_step, model=model, batch_size=config.eval_batch_size, batch_sharding=batch),
        out_shardings=replicated)
    self._order = jax.jit(input_pipeline.epoch_order, static_argnums=2, out_shardings=replicated)

  def order(self, state: TrainState, epoch: int) -> jax.Array:
    return self._order(order_key(state), epoch, self.dataset.train.num_examples)

  def evaluate(self, state: TrainState) -> dict[str, float]:
    """Test-set ``loss`` and ``accuracy``."""
    sums = [self.eval_step(state, self.dataset, i)
            for i in range(input_pipeline.num_eval_batches(self.dataset, self.eval_batch_size))]
    total = jax.device_get(jax.tree.map(lambda *x: sum(x), *sums))
    return {'loss': float(total['loss'] / total['count']), 'accuracy': float(total['correct'] / total['count'])}


def checkpoint_tree(state: TrainState, epoch: int, index: int) -> dict[str, Any]:
  """What a checkpoint holds: the state and the data position (epoch, batch index in the epoch)."""
  return {'state': flax.serialization.to_state_dict(state),
          'data_position': {'epoch': np.asarray(epoch, np.int64), 'index': np.asarray(index, np.int64)}}


def from_checkpoint_tree(like: TrainState, tree: dict[str, Any]) -> tuple[TrainState, tuple[int, int]]:
  """The state (structured as ``like``) and the data position ``(epoch, index)`` of a restored checkpoint."""
  position = tree['data_position']
  return flax.serialization.from_state_dict(like, tree['state']), (int(position['epoch']), int(position['index']))


def format_record(step: int, num_steps: int, split: str, record: dict[str, Any]) -> str:
  """One log line: ``step S/N split: key value, ...``."""
  parts = [f'{k} {v:.4g}' for k, v in record.items() if k not in ('step', 'split', 'layers')]
  return f'step {step}/{num_steps} {split}: ' + ', '.join(parts)


def run_length(config: Any, num_examples: int) -> tuple[int, int]:
  """``(steps per epoch, steps of the run)`` for ``num_examples`` training examples (the last partial batch of
  an epoch is dropped); a batch larger than the training set is an error naming ``config.batch_size``."""
  steps_per_epoch = num_examples // config.batch_size
  if not steps_per_epoch:
    raise ValueError(f'config.batch_size={config.batch_size} is larger than the training set ({num_examples} '
                     'examples)')
  return steps_per_epoch, config.num_train_steps or config.num_epochs * steps_per_epoch


def restore_or_initialize(workdir: pathlib.Path, config: Any, init_args: tuple, is_main: bool):
  """The run's checkpointer and the state to start from: the latest readable checkpoint in ``workdir``, else a
  new state from ``initial_state(*init_args)``. Writes ``config.json`` and says which it is.

  Returns ``(checkpointer, state, epoch, index in epoch, layer order)``: the last, the model's int8 layers in
  call order (``record_layer_order`` while tracing the state's shapes), is the order ``train_loop`` logs them in.
  """
  checkpointer = checkpointing.Checkpointer(workdir / 'checkpoints', max_to_keep=config.keep_checkpoints)
  with record_layer_order() as layer_order:
    like = abstract_state(*init_args)
  restored = checkpointer.restore_latest(checkpoint_tree(like, 0, 0))
  if restored:
    state, (epoch, index) = from_checkpoint_tree(like, restored[1])
  else:
    state, epoch, index = initial_state(*init_args), 0, 0
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2) + '\n')
    print(f'Resuming from the checkpoint at step {int(state.step)} (epoch {epoch}, batch {index}) in {workdir}'
          if restored else f'Starting a new run in {workdir}', flush=True)
  return checkpointer, state, epoch, index, layer_order


def make_divergence_check(config: Any, workdir: pathlib.Path, step: int) -> divergence.DivergenceCheck:
  """``config.divergence_patience``'s check, given the training losses that ``workdir`` logged up to ``step``."""
  history = [(r['step'], r['loss']) for r in metrics.read_records(workdir)
             if r['split'] == 'train' and r['step'] <= step and 'loss' in r]
  return divergence.DivergenceCheck(config.divergence_patience, history)


def train_loop(state, loop, dataset, *, start: tuple[int, int, int], num_steps: int, steps_per_epoch: int,
               config: Any, schedule, writer: metrics.MetricWriter, checkpointer, bar: progress.Progress,
               evaluate, show: tuple[str, ...], layer_order: Sequence[str] = (),
               divergence_check: divergence.DivergenceCheck | None = None):
  """Runs ``loop.train_steps`` (``multi_step``) from ``start = (step, epoch, index in epoch)`` to ``num_steps``.

  Logs every ``config.log_every_steps`` (per-layer statistics in ``layer_order``), calls ``evaluate(state,
  step)`` every ``config.eval_every_steps`` and saves a checkpoint every ``config.checkpoint_every_steps`` (0:
  once per epoch), all three also at the end; the steps between two of these events (or an epoch's end) run as
  one compiled loop. ``show`` names the logged scalars shown on the progress bar. Returns the state and the last
  ``evaluate`` result.

  Raises:
    divergence.TrainingDiverged: ``divergence_check`` saw the logged training loss return to its starting level
      (pending checkpoints are written first).
  """
  step, epoch, index = start
  log_every = config.log_every_steps
  eval_every = config.eval_every_steps or steps_per_epoch
  checkpoint_every = config.checkpoint_every_steps or steps_per_epoch
  order = loop.order(state, epoch)
  pending, interval_steps, interval_start, paused = [], 0, time.perf_counter(), 0.0
  result = None
  while step < num_steps:
    stop = min([(step // every + 1) * every for every in (log_every, eval_every, checkpoint_every)]
               + [num_steps, step + steps_per_epoch - index])
    state, record = loop.train_steps(state, dataset, order, np.int32(index), np.int32(stop - step))
    pending.append(jax.block_until_ready(record))  # the bar counts finished steps: a true rate and ETA
    bar.update(stop - step, timed=step > start[0])  # the first call compiled the steps
    index, interval_steps, step = index + stop - step, interval_steps + stop - step, stop
    if index == steps_per_epoch:
      epoch, index = epoch + 1, 0
      order = loop.order(state, epoch)
    if step % log_every == 0 or step == num_steps:
      scalars, layers = summarize_train(pending, layer_order)
      elapsed = time.perf_counter() - interval_start - paused
      scalars.update(lr=float(schedule(step - 1)), epoch=step / steps_per_epoch,
                     images_per_second=interval_steps * config.batch_size / elapsed)
      record = writer.write(step, 'train', scalars, layers)
      bar.show({k: record[k] for k in show})
      bar.write(format_record(step, num_steps, 'train', record))
      pending, interval_steps, interval_start, paused = [], 0, time.perf_counter(), 0.0
      if divergence_check is not None:
        try:
          divergence_check.update(step, record['loss'])
        except divergence.TrainingDiverged:
          checkpointer.wait()
          raise
    evaluate_now = step % eval_every == 0 or step == num_steps
    save = step % checkpoint_every == 0 or step == num_steps
    if evaluate_now or save:
      jax.block_until_ready(state)  # so that the pause below holds no training step
      pause_start = time.perf_counter()
      if evaluate_now:
        result = evaluate(state, step)
      if save:
        checkpointer.save(step, checkpoint_tree(state, epoch, index))
      paused += time.perf_counter() - pause_start
  return state, result


def train_and_evaluate(config: Any, workdir: str | pathlib.Path, *, model: nn.Module | None = None
                       ) -> dict[str, float]:
  """Trains and evaluates as ``config`` says, in (and resuming from) ``workdir``.

  Args:
    config: a config with the keys of ``configs/default.py``.
    workdir: the run's folder: checkpoints, ``metrics.jsonl``, TensorBoard events, plots, ``config.json``.
    model: a Flax module (called as ``model(images, train=...)``) to train instead of ``config.model``; it is
      still converted to int8 when ``config.precision == "int8"``.

  Returns:
    The final test metrics: ``loss`` and ``accuracy``.
  """
  validate_config(config)
  workdir = pathlib.Path(workdir)
  is_main = jax.process_index() == 0
  mesh = sharding.training_mesh(config)
  with jax.set_mesh(mesh):  # the Pallas kernels run per batch shard (jint8.pallas.data_parallel)

    dataset = input_pipeline.create_dataset(config.dataset, sharding.replicated(mesh))
    steps_per_epoch, num_steps = run_length(config, dataset.train.num_examples)
    schedule = optimizers.learning_rate_schedule(config.optimizer, batch_size=config.batch_size,
                                                 steps_per_epoch=steps_per_epoch, num_steps=num_steps)
    tx = precision.wrap_optimizer(optimizers.create_optimizer(config.optimizer, schedule), config)
    model = precision.apply_precision(model or create_model(config, dataset.num_classes), config)
    loop = _Loop(config, model, tx, dataset, mesh)

    init_args = (model, tx, dataset.image_shape, config.seed, sharding.replicated(mesh))
    checkpointer, state, epoch, index, layer_order = restore_or_initialize(workdir, config, init_args, is_main)
    step = int(state.step)
    if is_main:
      print(f'{jax.device_count()} devices, {dataset.train.num_examples} training images, {steps_per_epoch} '
            f'steps per epoch, {num_steps} steps, precision {precision.describe(config)}', flush=True)
    writer = metrics.MetricWriter(workdir, resume_step=step, enabled=is_main)
    if step >= num_steps:
      final = loop.evaluate(state)
      if is_main:
        print(f'Already trained to step {step}; ' + format_record(step, num_steps, 'test', final), flush=True)
      checkpointer.close()
      writer.close()
      return final

    bar = progress.Progress(num_steps, initial=step, enabled=is_main)

    def evaluate(state, step):
      record = writer.write(step, 'test', loop.evaluate(state))
      bar.write(format_record(step, num_steps, 'test', record))
      return record

    state, final = train_loop(state, loop, dataset, start=(step, epoch, index), num_steps=num_steps,
                              steps_per_epoch=steps_per_epoch, config=config, schedule=schedule, writer=writer,
                              checkpointer=checkpointer, bar=bar, evaluate=evaluate, show=('loss', 'accuracy'),
                              layer_order=layer_order, divergence_check=make_divergence_check(config, workdir, step))
    bar.close()
    final = {k: final[k] for k in ('loss', 'accuracy')}
    checkpointer.close()
    writer.close()
    if is_main:
      records = metrics.read_records(workdir)
      metrics.plot_curves(records, workdir / 'curves.png')
      if metrics.plot_layers(records, workdir / 'layers.png'):
        print(f'Wrote {workdir / "curves.png"} and {workdir / "layers.png"}', flush=True)
      else:
        print(f'Wrote {workdir / "curves.png"}', flush=True)
      print(json.dumps({'final_test': final}), flush=True)
    return final
