"""The training loop (``jint8.training.loop``): steps in one compiled loop and the records they combine
(``jint8.training.records``), the host loop's stops (divergence, Ctrl-C) and checkpoints, the run length."""

import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from jint8.training import checkpointing, divergence, interruption, metrics, progress
from jint8.training.loop import make_divergence_check, multi_step, next_stop, run_length, train_loop
from jint8.training.records import step_record, summarize_train


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
  run = jax.jit(multi_step(_toy_step))
  state, first = run(jnp.float32(1.0), data, order, np.int32(2), np.int32(3))
  state, second = run(state, data, order, np.int32(5), np.int32(2))
  values = np.asarray(data)[np.asarray(order)[2:7]].astype(np.float64)
  np.testing.assert_allclose(state, 1 + values.sum(), rtol=1e-6)
  assert int(first['steps']) == 3 and int(second['steps']) == 2
  scalars, layers = summarize_train([first, second])
  assert scalars == pytest.approx({'loss': values.mean(), 'accuracy': values.mean() / 4,
                                   'grad_deviation_mean': 0.15 * values.mean(),
                                   'grad_deviation_max': values.max() / 5,
                                   'nonfinite': 2 * int((values > 3.5).sum())}, rel=1e-5)
  assert layers['a'] == pytest.approx({'grad_deviation': values.mean() / 10, 'grad_clip': values[-1],
                                       'input_clip': 2 * values[-1], 'input_saturation': values.max() / 2,
                                       'saturated_steps': int((values > 2).sum()),
                                       'nonfinite': int((values > 3.5).sum()), 'weight_levels': 3 * values[-1]},
                                      rel=1e-5)
  fp32 = summarize_train([step_record({'loss': jnp.float32(1.5), 'accuracy': jnp.float32(1.0)})])
  assert fp32 == ({'loss': 1.5, 'accuracy': 1.0}, {})


def test_summarize_train_lists_layers_in_the_given_order(rng):
  data = jnp.asarray(rng.uniform(0, 4, size=4), jnp.float32)
  _, record = jax.jit(multi_step(_toy_step))(jnp.float32(0.0), data, jnp.arange(4, dtype=jnp.int32),
                                                      np.int32(0), np.int32(4))
  assert list(summarize_train([record])[1]) == ['a', 'b']  # no order given: by name
  assert list(summarize_train([record], ['b', 'a'])[1]) == ['b', 'a']
  assert list(summarize_train([record], ['b'])[1]) == ['b', 'a']  # unlisted layers follow, by name


class _ToyLoop:
  """The train steps of ``_toy_step`` over a fixed sequence of per-step losses, in order."""

  def __init__(self):
    self.train_steps = jax.jit(multi_step(_toy_step))

  def order(self, state, epoch):
    del state, epoch
    return jnp.arange(40, dtype=jnp.int32)


@pytest.mark.parametrize('patience', [3, 0])
def test_train_loop_stops_a_run_whose_loss_returns_to_its_start(rng, tmp_path, patience):
  # per-step losses: 2.3 for 8 steps, then falling to about 0.5, then back at 2.3 from step 24 on
  losses = np.concatenate([np.full(8, 2.3), np.geomspace(1.5, 0.5, 15), np.full(17, 2.3)])
  losses *= np.exp(rng.normal(0, 0.02, losses.size))
  dataset = jnp.asarray(losses, jnp.float32)
  config = tiny.config(log_every_steps=4, eval_every_steps=0, checkpoint_every_steps=4, batch_size=1,
                   divergence_patience=patience)
  writer = metrics.MetricWriter(tmp_path)
  checkpointer = checkpointing.Checkpointer(tmp_path / 'checkpoints')
  kwargs = dict(start=(0, 0, 0), num_steps=40, steps_per_epoch=40, config=config, schedule=lambda step: 0.1,
                writer=writer, checkpointer=checkpointer, bar=progress.Progress(40, enabled=False),
                evaluate=lambda state, step: {}, show=('loss',),
                divergence_check=make_divergence_check(config, tmp_path, 0))
  if patience:
    with pytest.raises(divergence.TrainingDiverged, match='steps 28-36'):
      train_loop(jnp.float32(0.0), _ToyLoop(), dataset, **kwargs)
    assert checkpointer.latest_step() == 32  # the last one before the error, written in full
    assert [r['step'] for r in metrics.read_records(tmp_path)][-1] == 36
  else:
    state, _ = train_loop(jnp.float32(0.0), _ToyLoop(), dataset, **kwargs)
    np.testing.assert_allclose(state, losses.sum(), rtol=1e-5)
  checkpointer.close()
  writer.close()


def test_a_resumed_run_is_checked_with_the_losses_it_logged_before(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  for step, loss in ((100, 2.3), (200, 0.6), (300, 2.3), (400, 9.0)):
    writer.write(step, 'train', {'loss': loss})
  writer.write(200, 'test', {'loss': 9.0, 'accuracy': 0.1})
  writer.close()
  check = make_divergence_check(tiny.config(divergence_patience=2), tmp_path, 300)
  assert check.history == [(100, 2.3), (200, 0.6), (300, 2.3)]  # train logs up to the resume step
  with pytest.raises(divergence.TrainingDiverged):
    check.update(400, 2.4)


def test_run_length_in_steps_and_a_batch_larger_than_the_data():
  assert run_length(tiny.config(batch_size=32, num_train_steps=0, num_epochs=3), 100) == (3, 9)
  assert run_length(tiny.config(batch_size=32, num_train_steps=7), 100) == (3, 7)
  with pytest.raises(ValueError, match=r'config.batch_size=128 is larger than the training set \(100 examples\)'):
    run_length(tiny.config(batch_size=128), 100)


def test_the_compiled_loops_stop_at_logs_evaluations_checkpoints_and_doubling_steps_into_a_log():
  stops, step, index = [], 0, 0
  while step < 50:
    step = next_stop(step, index, num_steps=50, steps_per_epoch=30, every=(20, 40, 25), log_every=20)
    index = step % 30
    stops.append(step)
  # 1, 2, 4, 8, 16 steps into each log interval of 20; logs at 20, 40; the epoch ends at 30; a checkpoint at 25
  assert stops == [1, 2, 4, 8, 16, 20, 21, 22, 24, 25, 28, 30, 36, 40, 41, 42, 44, 48, 50]


class _Saves:
  """A checkpointer that records the steps it saves."""

  def __init__(self, directory):
    self.directory, self.steps = directory, []

  def save(self, step, tree):
    self.steps.append((step, int(tree['data_position']['index'])))

  def wait(self):
    pass


def _run_toy_loop(tmp_path, num_steps=12, **overrides):
  config = tiny.config(**{'log_every_steps': 4, 'eval_every_steps': 0, 'checkpoint_every_steps': 8, 'batch_size': 1,
                          **overrides})
  saves = _Saves(tmp_path / 'checkpoints')
  kwargs = dict(start=(0, 0, 0), num_steps=num_steps, steps_per_epoch=40, config=config, schedule=lambda step: 0.1,
                writer=metrics.MetricWriter(tmp_path), checkpointer=saves, bar=progress.Progress(12, enabled=False),
                evaluate=lambda state, step: {}, show=('loss',))
  return saves, kwargs


def test_checkpoints_are_also_saved_on_time(tmp_path):
  saves, kwargs = _run_toy_loop(tmp_path, checkpoint_every_minutes=0.0)
  train_loop(jnp.float32(0.0), _ToyLoop(), jnp.ones(40), **kwargs)
  assert saves.steps == [(8, 8), (12, 12)]  # every 8 steps and at the end
  saves, kwargs = _run_toy_loop(tmp_path, checkpoint_every_minutes=1e-9)
  train_loop(jnp.float32(0.0), _ToyLoop(), jnp.ones(40), **kwargs)
  assert saves.steps == [(s, s) for s in (1, 2, 4, 5, 6, 8, 9, 10, 12)]  # after every compiled loop


class _SlowCompile:
  """``multi_step(_toy_step)`` jitted, whose compilation takes a second more: ahead of time (``lower(...).compile()``)
  or, as ``jax.jit`` does, in the first call."""

  def __init__(self):
    self._steps, self._compiled = jax.jit(multi_step(_toy_step)), None

  def lower(self, *args):
    return types.SimpleNamespace(compile=lambda: self._compile(args))

  def _compile(self, args):
    time.sleep(1.0)
    self._compiled = self._steps.lower(*args).compile()

  def __call__(self, *args):
    if self._compiled is None:
      self._compile(args)
    return self._compiled(*args)


def test_compiling_is_not_training_time(tmp_path):
  loop = _ToyLoop()
  loop.train_steps = _SlowCompile()
  _, kwargs = _run_toy_loop(tmp_path, num_steps=4)
  train_loop(jnp.float32(0.0), loop, jnp.ones(40), **kwargs)
  [record] = [r for r in metrics.read_records(tmp_path) if r['split'] == 'train']
  # With the compiling second counted, 4 images would take >= 1 s (<= 4 images/s); without it, far less than the
  # 0.5 s this bound allows even on a loaded machine.
  assert record['images_per_second'] > 8


def test_a_stop_request_saves_a_checkpoint_and_ends_the_run(tmp_path):
  saves, kwargs = _run_toy_loop(tmp_path)
  stop = types.SimpleNamespace(requested=False, running='')
  evaluations = []

  def evaluate(state, step):  # the evaluations at the ends of the epochs of 3 steps
    evaluations.append((step, float(state)))
    stop.requested = step == 6  # as a Ctrl-C while it evaluates would
    return {}

  with pytest.raises(interruption.TrainingInterrupted,
                     match=f'Stopped by Ctrl-C at step 6 of 12, with the checkpoint {tmp_path}/checkpoints/6: run'):
    train_loop(jnp.float32(0.0), _ToyLoop(), jnp.ones(40), **{**kwargs, 'steps_per_epoch': 3, 'evaluate': evaluate},
               stop=stop)
  assert evaluations == [(3, 3.0), (6, 6.0)] and saves.steps == [(6, 0)]  # saved after the evaluation, no more steps
