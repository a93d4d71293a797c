"""A training run: the task interface (``Task``) and ``train_and_evaluate``, which runs a task as its config says.

The framework does what every task's run shares: data parallelism over every device (``jint8.sharding``), the
optimizer and its schedule, the precision (fp32, bf16 or int8), the train state, resuming from the newest
checkpoint in ``workdir/checkpoints`` (of the config recorded in ``workdir/config.json``), the compiled loop of train
steps, stopping at a Ctrl-C, ``workdir/metrics.jsonl`` and TensorBoard, the progress bar and the PNG plots at the
end. A task adds its config keys, data, model, train step and evaluation.
"""

from __future__ import annotations

import abc
import json
import pathlib
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import optax
from flax import linen as nn

from jint8 import sharding
from jint8.training import interruption, metrics, optimizers, precision, progress
from jint8.training.loop import Loop, format_record, make_divergence_check, run_length, train_loop
from jint8.training.resume import check_workdir, restore_or_initialize
from jint8.training.state import TrainState


class TrainingData(NamedTuple):
  """What the framework needs of a task's training data."""
  batches: Any  # what the task's train step reads its batches from (an argument of the compiled loop)
  num_examples: int  # examples in an epoch
  input_shape: tuple[int, ...]  # one example's shape, to initialize the model


class Task(abc.ABC):
  """A task's part of a run of ``config``: its config keys, data, model, train step and evaluation.

  One instance serves one run; constructing it checks the config. Inside the run's mesh ``train_and_evaluate``
  calls ``load``, ``create_model`` (unless it was given a model), ``compile`` and ``describe``; then
  ``evaluate`` on the config's evaluation schedule and at the end ``write_outputs``.
  """

  show: ClassVar[tuple[str, ...]]  # the logged training scalars that the progress bar shows

  def __init__(self, config: Any):
    self.validate_config(config)
    self.config = config

  @property
  def eval_split(self) -> str:
    """The split that ``evaluate`` scores: the ``split`` of its records and the key ``final_<split>``."""
    return 'test'

  @staticmethod
  @abc.abstractmethod
  def validate_config(config: Any) -> None:
    """Raises a ValueError naming the first config key whose value is invalid, the framework's keys
    (``jint8.training.run.validate_config``) included."""

  @abc.abstractmethod
  def load(self, replicated: jax.sharding.Sharding) -> TrainingData:
    """Loads the task's data, placed with ``replicated``; returns the training data."""

  @abc.abstractmethod
  def create_model(self) -> nn.Module:
    """The config's model in the compute dtype of ``config.precision`` (the framework makes it int8)."""

  @abc.abstractmethod
  def compile(self, model: nn.Module, mesh: jax.sharding.Mesh) -> Callable[..., tuple[TrainState, dict[str, Any]]]:
    """Prepares the evaluation of ``model`` and returns the task's train step, ``step(state, batches, order,
    index, *, model, tx, batch_size, batch_sharding) -> (state, metrics)`` (``metrics`` with ``loss``)."""

  @abc.abstractmethod
  def describe(self) -> str:
    """The data, for the run's first line: ``"256 training images"``."""

  @abc.abstractmethod
  def evaluate(self, state: TrainState) -> tuple[dict[str, float], Any]:
    """The metrics of ``state`` on ``eval_split``, and what ``write_outputs`` needs of the evaluation."""

  def write_outputs(self, workdir: pathlib.Path, step: int, final: dict[str, float], evaluation: Any) -> list[str]:
    """Writes the task's own files at the end of a run (``final`` and ``evaluation``: the last ``evaluate`` at
    ``step``); returns their names in ``workdir``."""
    del workdir, step, final, evaluation
    return []


def validate_config(config: Any, task: str) -> None:
  """Raises a ValueError naming the first of the framework's config keys whose value is invalid in a config of
  ``task`` (whose own keys the task checks)."""
  if config.task != task:
    raise ValueError(f'config.task: the {task} trainer cannot train {config.task!r}')
  precision.check_precision(config)
  for key in ('batch_size', 'eval_batch_size', 'log_every_steps', 'keep_checkpoints'):
    if config[key] < 1:
      raise ValueError(f'config.{key} must be >= 1, got {config[key]}')
  for key in ('eval_every_steps', 'checkpoint_every_steps', 'checkpoint_every_minutes', 'num_train_steps',
              'divergence_patience', 'grad_clip_norm'):
    if config[key] < 0:
      raise ValueError(f'config.{key} must be >= 0, got {config[key]}')
  for key in ('max_train_examples', 'max_test_examples'):
    if config.dataset[key] < 0:
      raise ValueError(f'config.dataset.{key} must be >= 0 (0: all), got {config.dataset[key]}')
  if not config.num_train_steps and config.num_epochs < 1:
    raise ValueError(f'config.num_epochs must be >= 1 when config.num_train_steps is 0, got {config.num_epochs}')


def create_optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """``config.optimizer`` at the learning rates of ``schedule``, after a clip of the global gradient norm at
  ``config.grad_clip_norm`` (0: none), wrapped for ``config.precision``."""
  inner = optimizers.create_optimizer(config.optimizer, schedule)
  if config.grad_clip_norm:
    inner = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), inner)
  return precision.wrap_optimizer(inner, config)


def train_and_evaluate(task: Task, workdir: str | pathlib.Path, *, model: nn.Module | None = None,
                       allow_config_change: bool = False) -> dict[str, float]:
  """Trains and evaluates ``task`` as its config says, in (and resuming from) ``workdir``.

  Args:
    task: the task, built from the config.
    workdir: the run's folder: checkpoints, ``metrics.jsonl``, TensorBoard events, plots, ``config.json`` (the
      config, which a resume must match: ``jint8.training.recorded_config``).
    model: a Flax module to train instead of ``task.create_model()``; it is still converted to int8 when
      ``config.precision == "int8"``.
    allow_config_change: resume the checkpoints of ``workdir`` even when the config differs from the recorded one.

  Returns:
    The final metrics of ``task.evaluate``. A run that had already reached its last step only evaluates.

  Raises:
    ValueError: ``workdir`` cannot hold this run (``resume.check_workdir``), or its checkpoint is of another model.
  """
  config = task.config
  workdir = pathlib.Path(workdir)
  config_changes = check_workdir(workdir, config, allow_config_change=allow_config_change)
  is_main = jax.process_index() == 0
  mesh = sharding.training_mesh(config)
  with jax.set_mesh(mesh):  # the Pallas kernels run per batch shard (jint8.pallas.data_parallel)

    data = task.load(sharding.replicated(mesh))
    steps_per_epoch, num_steps = run_length(config, data.num_examples)
    schedule = optimizers.learning_rate_schedule(config.optimizer, batch_size=config.batch_size,
                                                 steps_per_epoch=steps_per_epoch, num_steps=num_steps)
    tx = create_optimizer(config, schedule)
    model = precision.apply_precision(model or task.create_model(), config)
    loop = Loop(task.compile(model, mesh), config, model, tx, mesh, data.num_examples)

    init_args = (model, tx, data.input_shape, config.seed, sharding.replicated(mesh))
    checkpointer, state, epoch, index, layer_order = restore_or_initialize(workdir, config, init_args, is_main,
                                                                           config_changes)
    step = int(state.step)
    if is_main:
      print(f'{jax.device_count()} devices, {task.describe()}, {steps_per_epoch} steps per epoch, {num_steps} '
            f'steps, precision {precision.describe(config)}', flush=True)
    writer = metrics.MetricWriter(workdir, resume_step=step, enabled=is_main)
    split = task.eval_split
    if step >= num_steps:
      final, _ = task.evaluate(state)
      if is_main:
        print(f'Already trained to step {step}; ' + format_record(step, num_steps, split, final), flush=True)
      checkpointer.close()
      writer.close()
      return final

    bar = progress.Progress(num_steps, initial=step, enabled=is_main)

    def evaluate(state, step):
      result, evaluation = task.evaluate(state)
      bar.write(format_record(step, num_steps, split, writer.write(step, split, result)))
      return result, evaluation

    try:
      with interruption.StopOnInterrupt(bar.write) as stop:
        state, (final, evaluation) = train_loop(
            state, loop, data.batches, start=(step, epoch, index), num_steps=num_steps,
            steps_per_epoch=steps_per_epoch, config=config, schedule=schedule, writer=writer,
            checkpointer=checkpointer, bar=bar, evaluate=evaluate, show=task.show, layer_order=layer_order,
            divergence_check=make_divergence_check(config, workdir, step), stop=stop)
    finally:
      bar.close()
      checkpointer.close()
      writer.close()
    if is_main:
      records = metrics.read_records(workdir)
      metrics.plot_curves(records, workdir / 'curves.png')
      written = ['curves.png'] + (['layers.png'] if metrics.plot_layers(records, workdir / 'layers.png') else [])
      written += task.write_outputs(workdir, num_steps, final, evaluation)
      print(f'Wrote {", ".join(str(workdir / name) for name in written)}', flush=True)
      print(json.dumps({f'final_{split}': final}), flush=True)
    return final
