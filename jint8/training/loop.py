"""The training loop: a task's train step run many times in one compiled loop (``multi_step``, ``Loop``) and the
host loop around it (``train_loop``), which logs, evaluates, saves checkpoints (every so many steps and minutes),
watches for divergence and stops at a Ctrl-C."""

from __future__ import annotations

import functools
import pathlib
import time
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.experimental import multihost_utils

from jint8 import input_pipeline, sharding
from jint8.training import divergence, interruption, metrics, progress
from jint8.training.records import combine_records, step_record, summarize_train
from jint8.training.resume import checkpoint_tree
from jint8.training.state import TrainState, order_key
from jint8.training.step import bind_train_step, with_weight_levels


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


class Loop:
  """The compiled functions that ``train_loop`` runs: ``train_steps`` (``multi_step`` of a task's train step,
  bound by ``bind_train_step``, with ``with_weight_levels`` at the end) and the epochs' example ``order``."""

  def __init__(self, train_step: Callable[..., tuple[Any, dict[str, Any]]], config: Any, model: nn.Module,
               tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, num_examples: int):
    replicated, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    self.num_examples = num_examples
    self.train_steps = jax.jit(multi_step(
        bind_train_step(train_step, config, model, tx=tx, batch_size=config.batch_size, batch_sharding=batch),
        finish=with_weight_levels), donate_argnums=0, out_shardings=replicated)
    self._order = jax.jit(input_pipeline.epoch_order, static_argnums=2, out_shardings=replicated)

  def order(self, state: TrainState, epoch: int) -> jax.Array:
    """The order in which ``epoch`` visits the ``num_examples`` training examples."""
    return self._order(order_key(state), epoch, self.num_examples)


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


def make_divergence_check(config: Any, workdir: pathlib.Path, step: int) -> divergence.DivergenceCheck:
  """``config.divergence_patience``'s check, given the training losses that ``workdir`` logged up to ``step``."""
  history = [(r['step'], r['loss']) for r in metrics.read_records(workdir)
             if r['split'] == 'train' and r['step'] <= step and 'loss' in r]
  return divergence.DivergenceCheck(config.divergence_patience, history)


def next_stop(step: int, index: int, *, num_steps: int, steps_per_epoch: int, every: Sequence[int],
              log_every: int) -> int:
  """The step at which the compiled loop of steps that starts at ``step`` (batch ``index`` of its epoch) ends: the
  next multiple of any of ``every`` (logs, evaluations, checkpoints), the epoch's end or the run's, and also the
  steps 1, 2, 4, 8, ... into each log interval of ``log_every`` steps, so that the progress bar moves and shows a
  rate soon after the start even when a log interval takes minutes. The stops are the same in every run through
  these steps, so a resumed run combines (and logs) each step's metrics as an uninterrupted one does."""
  into_interval = step % log_every
  doubling = step - into_interval + (1 << into_interval.bit_length())
  return min([(step // n + 1) * n for n in every] + [doubling, num_steps, step + steps_per_epoch - index])


def _as_process_0_says(*flags: bool) -> tuple[bool, ...]:
  """``flags`` as process 0 has them: every process must take the same branch (saving is collective), and wall
  clocks and Ctrl-Cs differ between processes."""
  if jax.process_count() == 1:
    return flags
  return tuple(bool(f) for f in multihost_utils.broadcast_one_to_all(np.asarray(flags)))


def train_loop(state, loop, dataset, *, start: tuple[int, int, int], num_steps: int, steps_per_epoch: int,
               config: Any, schedule, writer: metrics.MetricWriter, checkpointer, bar: progress.Progress,
               evaluate, show: tuple[str, ...], layer_order: Sequence[str] = (),
               divergence_check: divergence.DivergenceCheck | None = None,
               stop: interruption.StopOnInterrupt | None = None):
  """Runs ``loop.train_steps`` (``multi_step``) from ``start = (step, epoch, index in epoch)`` to ``num_steps``.

  Compiles the steps first (the bar says so; the time stays out of the rates). Logs every
  ``config.log_every_steps`` (per-layer statistics in ``layer_order``), calls ``evaluate(state, step)`` every
  ``config.eval_every_steps`` and saves a checkpoint every ``config.checkpoint_every_steps`` (0: once per epoch)
  and after ``config.checkpoint_every_minutes`` (0: never on time), all three also at the end; the steps between
  two stops (``next_stop``) run as one compiled loop. ``show`` names the logged scalars shown on the progress bar.
  Returns the state and the last ``evaluate`` result.

  Raises:
    divergence.TrainingDiverged: ``divergence_check`` saw the logged training loss return to its starting level
      (pending checkpoints are written first).
    interruption.TrainingInterrupted: ``stop`` was requested (Ctrl-C); a checkpoint of the step reached is
      written first.
  """
  step, epoch, index = start
  log_every = config.log_every_steps
  eval_every = config.eval_every_steps or steps_per_epoch
  checkpoint_every = config.checkpoint_every_steps or steps_per_epoch
  save_seconds = 60 * config.checkpoint_every_minutes or float('inf')
  stops = functools.partial(next_stop, num_steps=num_steps, steps_per_epoch=steps_per_epoch,
                            every=(log_every, eval_every, checkpoint_every), log_every=log_every)
  order = loop.order(state, epoch)
  if stop is not None:
    stop.running = f'compiling the train steps and running {_steps(stops(step, index) - step)}'
  with bar.compiling():
    loop.train_steps.lower(state, dataset, order, np.int32(index), np.int32(1)).compile()
  pending, interval_steps, interval_start, paused = [], 0, time.perf_counter(), 0.0
  last_save = time.monotonic()
  result = None
  while step < num_steps:
    stop_step = stops(step, index)
    if stop is not None:
      stop.running = _steps(stop_step - step)
    state, record = loop.train_steps(state, dataset, order, np.int32(index), np.int32(stop_step - step))
    pending.append(jax.block_until_ready(record))  # the bar counts finished steps: a true rate and ETA
    bar.update(stop_step - step)
    index, interval_steps, step = index + stop_step - step, interval_steps + stop_step - step, stop_step
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
    if step % eval_every == 0 or step == num_steps:
      if stop is not None:
        stop.running = f'the evaluation at step {step}'
      jax.block_until_ready(state)  # so that the pause below holds no training step
      pause_start = time.perf_counter()
      result = evaluate(state, step)
      paused += time.perf_counter() - pause_start
    interrupted, save_due = _as_process_0_says(stop is not None and stop.requested,
                                               time.monotonic() - last_save >= save_seconds)
    if step % checkpoint_every == 0 or step == num_steps or save_due or interrupted:
      jax.block_until_ready(state)
      pause_start = time.perf_counter()
      checkpointer.save(step, checkpoint_tree(state, epoch, index))
      last_save = time.monotonic()
      paused += time.perf_counter() - pause_start
    if interrupted and step < num_steps:
      checkpointer.wait()
      raise interruption.TrainingInterrupted(
          f'Stopped by Ctrl-C at step {step} of {num_steps}, with the checkpoint {checkpointer.directory / str(step)}'
          ': run the same command to resume.')
  return state, result


def _steps(n: int) -> str:
  return 'the current step' if n == 1 else f'the current {n} steps'
