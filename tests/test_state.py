"""jint8.state: the update of the quantization state from the backward passes' cotangents, the search schedule and
the logged statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint8 import state as quant_state
from jint8.state import QuantState
from nested_trees import get, merge, nested

OP = 'Int8ConvGeneralDilated_0'
LAYERS = (('Conv_0',), ('block', 'Conv_1'), ('block', 'Conv_2'))
HISTORY = 4


def f32(x):
  return jnp.asarray(x, jnp.float32)


def make_state(rng):
  """A state tree of three layers with random stored values."""
  def layer():
    history = rng.uniform(1, 4, size=HISTORY)
    return QuantState(f32(rng.uniform(0.5, 2)), f32(rng.uniform(0, 0.2)), f32(history.max()), f32(history),
                      f32(rng.uniform(0.5, 1)), f32(0), f32(1), f32(rng.uniform(0, 0.1)))._asdict()
  return merge(*[nested(path + (OP,), layer()) for path in LAYERS])


def per_use_cotangents(rng, k):
  """``k`` applications' cotangents of one layer, as the op returns them."""
  return [QuantState.cotangent(grad_clip=rng.uniform(0.1, 3), grad_deviation=rng.uniform(0, 0.2),
                               input_clip=rng.uniform(1, 5), input_amax=rng.uniform(1, 6), nonfinite=0.0,
                               history=HISTORY) for _ in range(k)]


def summed(cots):
  """What JAX's autodiff gives for a layer applied len(cots) times: the sum of the cotangents."""
  if not cots:
    return jax.tree.map(jnp.zeros_like, per_use_cotangents(np.random.default_rng(0), 1)[0])._asdict()
  return jax.tree.map(lambda *x: sum(x), *cots)._asdict()


def test_update_writes_the_mean_over_applications_and_keeps_unused_layers(rng):
  state = make_state(rng)
  uses = (3, 1, 0)
  per_use = [per_use_cotangents(rng, k) for k in uses]
  cot = merge(*[nested(path + (OP,), summed(c)) for path, c in zip(LAYERS, per_use)])
  new = quant_state.update(state, cot)
  for path, cots, k in zip(LAYERS, per_use, uses):
    layer, old = get(new, path + (OP,)), get(state, path + (OP,))
    assert float(layer['uses']) == k and float(layer['nonfinite']) == 0
    if not k:  # not applied: everything kept
      for f in ('grad_clip', 'grad_deviation', 'input_clip', 'input_saturation', 'input_amax'):
        np.testing.assert_array_equal(np.asarray(layer[f]), np.asarray(old[f]))
      continue
    for f in ('grad_clip', 'grad_deviation', 'input_saturation'):
      np.testing.assert_allclose(float(layer[f]), np.mean([float(getattr(c, f)) for c in cots]), rtol=1e-5)
    # the history shifts by one: this step's mean max-abs first, the oldest value dropped; the delayed clip is
    # its largest value
    amax = np.mean([float(c.input_amax[0]) for c in cots])
    history = np.concatenate([[amax], np.asarray(old['input_amax'])[:-1]])
    np.testing.assert_allclose(np.asarray(layer['input_amax']), history, rtol=1e-6)
    np.testing.assert_allclose(float(layer['input_clip']), history.max(), rtol=1e-6)
    assert all(v.dtype == jnp.float32 for v in layer.values())


def test_update_overwrites_exactly(rng):
  # The new values are written, not added as deltas: no float rounding of old + (new - old).
  state = make_state(rng)
  cots = {path: per_use_cotangents(rng, 1)[0] for path in LAYERS}
  cot = merge(*[nested(path + (OP,), c._asdict()) for path, c in cots.items()])
  new = quant_state.update(state, cot)
  for path, c in cots.items():
    for f in ('grad_clip', 'grad_deviation', 'input_saturation'):
      assert float(get(new, path + (OP, f))) == float(getattr(c, f))
    assert float(get(new, path + (OP, 'input_clip'))) == float(jnp.max(get(new, path + (OP, 'input_amax'))))


@pytest.mark.parametrize('cause', ['reported', 'nan_value'])
def test_a_nonfinite_layer_keeps_its_values(rng, cause):
  state = make_state(rng)
  cot = merge(*[nested(path + (OP,), summed(per_use_cotangents(rng, 1))) for path in LAYERS])
  bad = get(cot, LAYERS[1] + (OP,))
  if cause == 'reported':
    bad.update(nonfinite=f32(1))
  else:
    bad.update(grad_clip=f32(np.nan))
  new = quant_state.update(state, cot)
  layer, old = get(new, LAYERS[1] + (OP,)), get(state, LAYERS[1] + (OP,))
  assert float(layer['nonfinite']) == 1
  for f in ('grad_clip', 'grad_deviation', 'input_clip', 'input_amax'):
    np.testing.assert_array_equal(np.asarray(layer[f]), np.asarray(old[f]))  # kept, never NaN
  assert float(get(new, LAYERS[0] + (OP, 'nonfinite'))) == 0


def test_update_rejects_foreign_trees(rng):
  state = make_state(rng)
  cot = merge(*[nested(path + (OP,), summed(per_use_cotangents(rng, 1))) for path in LAYERS])
  broken = merge(state, nested(LAYERS[0] + (OP,), {'extra': f32(1)}))
  with pytest.raises(ValueError, match='Conv_0/Int8ConvGeneralDilated_0/extra is not a field'):
    quant_state.update(broken, cot)
  with pytest.raises(ValueError, match='differ in structure'):
    quant_state.update(state, {'Conv_0': get(cot, ('Conv_0',))})


def test_search_due_every_period_and_while_a_clip_is_missing(rng):
  state = make_state(rng)
  assert [bool(quant_state.search_due(state, step, 3)) for step in range(7)] == [
      True, False, False, True, False, False, True]
  no_grad_clip = merge(state, nested(LAYERS[0] + (OP, 'grad_clip'), f32(0)))
  assert bool(quant_state.search_due(no_grad_clip, 4, 3))
  assert not bool(quant_state.search_due(no_grad_clip, 4, 3, dsgc=False))  # max|g| every step: no search
  no_history = merge(state, nested(LAYERS[2] + (OP,), {'input_amax': jnp.zeros(HISTORY), 'input_clip': f32(0)}))
  assert bool(quant_state.search_due(no_history, 4, 3))
  assert not bool(quant_state.search_due(no_history, 4, 3, delayed_input_clip=False))
  fresh = merge(*[nested(path + (OP,), QuantState.initial(HISTORY)._asdict()) for path in LAYERS])
  assert bool(quant_state.search_due(fresh, 5, 100))


def test_search_deviation_is_written_by_search_steps_only(rng):
  state = make_state(rng)
  old = {path: float(get(state, path + (OP, 'search_deviation'))) for path in LAYERS}
  searched = {path: [QuantState.cotangent(grad_clip=1.0, grad_deviation=rng.uniform(0.01, 0.2), input_clip=2.0,
                                          input_amax=1.0, nonfinite=0.0, history=HISTORY, searched=True)
                     for _ in range(k)] for path, k in zip(LAYERS, (2, 1, 0))}
  new = quant_state.update(state, merge(*[nested(path + (OP,), summed(c)) for path, c in searched.items()]))
  for path, cots in searched.items():
    expected = np.mean([float(c.grad_deviation) for c in cots]) if cots else old[path]
    np.testing.assert_allclose(float(get(new, path + (OP, 'search_deviation'))), expected, rtol=1e-6)
  steady = {path: per_use_cotangents(rng, 1) for path in LAYERS}  # steps between searches report 0
  kept = quant_state.update(new, merge(*[nested(path + (OP,), summed(c)) for path, c in steady.items()]))
  for path in LAYERS:
    assert float(get(kept, path + (OP, 'search_deviation'))) == float(get(new, path + (OP, 'search_deviation')))
    assert float(get(kept, path + (OP, 'grad_deviation'))) == float(steady[path][0].grad_deviation)


def test_search_due_after_a_deviation_jump(rng):
  state = make_state(rng)
  for path in LAYERS:
    state = merge(state, nested(path + (OP,), {'search_deviation': f32(0.02), 'grad_deviation': f32(0.03)}))
  jumped = merge(state, nested(LAYERS[1] + (OP, 'grad_deviation'), f32(0.05)))  # 2.5x its search's deviation
  due = lambda s, **kw: bool(quant_state.search_due(s, 4, 3, **kw))
  assert not due(state, deviation_jump=2.0) and not due(jumped)  # off by default
  assert due(jumped, deviation_jump=2.0) and not due(jumped, deviation_jump=3.0)
  assert not due(jumped, deviation_jump=2.0, dsgc=False)  # max|g| clips: nothing to search
  never_searched = merge(jumped, nested(LAYERS[1] + (OP, 'search_deviation'), f32(0)))
  assert not due(never_searched, deviation_jump=2.0)
  for bad in (0.5, 1.0, -2.0):
    with pytest.raises(ValueError, match='deviation_jump'):
      quant_state.search_due(state, 4, 3, deviation_jump=bad)


def test_layer_records_combine_field_by_field(rng):
  steps = []
  for _ in range(4):
    stats = {'grad_clip': f32(rng.uniform(0.1, 1)), 'grad_deviation': f32(rng.uniform(0, 0.1)),
             'input_clip': f32(rng.uniform(1, 4)), 'input_saturation': f32(rng.uniform(0.8, 1.2)),
             'nonfinite': f32(rng.integers(0, 2))}
    steps.append(stats)
  records = [quant_state.step_layer_record(s) for s in steps]
  total = records[0]
  for r in records[1:]:
    total = quant_state.combine_layer_records(total, r)
  summary = quant_state.summarize_layer_record(jax.device_get(total), len(steps))
  value = lambda f: np.array([float(s[f]) for s in steps])
  assert summary['grad_clip'] == float(steps[-1]['grad_clip']) and summary['input_clip'] == float(
      steps[-1]['input_clip'])
  np.testing.assert_allclose(summary['grad_deviation'], value('grad_deviation').mean(), rtol=1e-6)
  assert float(total['grad_deviation_max']) == value('grad_deviation').max()
  assert summary['input_saturation'] == value('input_saturation').max()
  assert summary['saturated_steps'] == int(np.sum(value('input_saturation') > 1))
  assert summary['nonfinite'] == int(value('nonfinite').sum())
