"""jint8.optim: DCLR and int8_optimizer on synthetic trees, then through real int8 ops."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jint8 import optim
from jint8 import state as quant_state
from jint8.nn import ROUNDING_RNG, STATE_COLLECTION, Int8Config, Int8ConvGeneralDilated, Int8Model, Int8Policy
from nested_trees import get, merge, nested

OP = 'Int8ConvGeneralDilated_0'
# The int8 layers of the synthetic model; "Dense_0" is a float layer (no op module).
INT8_LAYERS = (('Conv_0',), ('block', 'Conv_1'), ('block', 'Conv_2'))


def f32(x):
  return jnp.asarray(x, jnp.float32)


def make_params(rng):
  layers = [nested(path, {'kernel': f32(rng.normal(size=(3, 3, 2, 4))), 'bias': f32(rng.normal(size=4))})
            for path in INT8_LAYERS]
  dense = {'Dense_0': {'kernel': f32(rng.normal(size=(4, 3))), 'bias': f32(rng.normal(size=3))}}
  return merge(dense, *layers)


def make_state(rng, uses=(1, 1, 1), deviation_range=(0, 0.2)):
  """A step's new int8_state of the synthetic model: random deviations, ``uses`` applications per layer."""
  def layer(k):
    return {'grad_clip': f32(rng.uniform(0.5, 2)), 'grad_deviation': f32(rng.uniform(*deviation_range)),
            'input_clip': f32(rng.uniform(1, 4)), 'input_amax': f32(rng.uniform(1, 4, size=16)),
            'input_saturation': f32(rng.uniform(0.5, 1)), 'nonfinite': f32(0), 'uses': f32(k),
            'search_deviation': f32(rng.uniform(0, 0.1))}
  return merge(*[nested(path + (OP,), layer(k)) for path, k in zip(INT8_LAYERS, uses)])


def make_grads(rng, params):
  return jax.tree.map(lambda p: f32(rng.normal(size=p.shape)), params)


def phi(deviation, alpha=20.0, beta=0.1):
  return max(np.exp(-alpha * np.float64(deviation)), beta)


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_dclr_scales_only_int8_kernels(rng):
  params = make_params(rng)
  grads = make_grads(rng, params)
  # Deviations around 0.1 put phi on both sides of the floor beta = 0.1 (exp(-20 * 0.115) = 0.1).
  state = make_state(rng, uses=(3, 1, 0), deviation_range=(0.0, 0.25))
  alpha, beta = 20.0, 0.1
  tx = optim.deviation_counteractive_lr(alpha, beta)
  updates, _ = tx.update(grads, tx.init(params), params, int8_state=state)
  assert_trees_equal(updates['Dense_0'], grads['Dense_0'])
  for path, k in zip(INT8_LAYERS, (3, 1, 0)):
    deviation = float(get(state, path + (OP, 'grad_deviation')))
    scale = phi(deviation, alpha, beta) if k else 1.0  # a layer not applied keeps its update
    np.testing.assert_allclose(np.asarray(get(updates, path + ('kernel',))),
                               np.asarray(get(grads, path + ('kernel',)), np.float64) * scale, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(get(updates, path + ('bias',))), np.asarray(get(grads, path + ('bias',))))

  low_precision = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads)
  updates, _ = tx.update(low_precision, tx.init(params), int8_state=state)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize('alpha, beta', [(20.0, 0.1), (5.0, 0.5)])
def test_dclr_formula(rng, alpha, beta):
  params = make_params(rng)
  grads = make_grads(rng, params)
  state = make_state(rng, deviation_range=(0.0, 0.4))
  tx = optim.deviation_counteractive_lr(alpha, beta)
  updates, _ = tx.update(grads, tx.init(params), int8_state=state)
  for path in INT8_LAYERS:
    measured = np.asarray(get(updates, path + ('kernel',))) / np.asarray(get(grads, path + ('kernel',)))
    expected = max(np.exp(-alpha * float(get(state, path + (OP, 'grad_deviation')))), beta)
    np.testing.assert_allclose(measured, expected, rtol=1e-5)


def test_dclr_needs_the_state_and_a_sibling_kernel(rng):
  params = make_params(rng)
  tx = optim.deviation_counteractive_lr()
  with pytest.raises(ValueError, match='int8_state=new_int8_state'):
    tx.update(params, tx.init(params))
  state = merge(make_state(rng), nested(('Dense_0', 'Orphan', OP), get(make_state(rng), INT8_LAYERS[0] + (OP,))))
  with pytest.raises(ValueError, match='Dense_0/Orphan/Int8ConvGeneralDilated_0 has no sibling param '
                                       'Dense_0/Orphan/kernel'):
    tx.update(params, tx.init(params), int8_state=state)


@pytest.mark.parametrize('alpha, beta, message', [(-1.0, 0.1, 'alpha'), (float('nan'), 0.1, 'alpha'),
                                                  (20.0, 0.0, 'beta'), (20.0, 1.5, 'beta'),
                                                  (20.0, float('nan'), 'beta')])
def test_bad_dclr_arguments(alpha, beta, message):
  with pytest.raises(ValueError, match=message):
    optim.deviation_counteractive_lr(alpha, beta)
  with pytest.raises(ValueError, match=message):
    optim.int8_optimizer(optax.sgd(0.1), alpha=alpha, beta=beta)


@pytest.mark.parametrize('inner', [
    optax.sgd(optax.linear_schedule(0.1, 0.01, 5), momentum=0.9),
    optax.adamw(1e-2, weight_decay=0.1),
], ids=['sgd_momentum_schedule', 'adamw'])
def test_int8_optimizer_is_inner_then_dclr(rng, inner):
  params = make_params(rng)
  tx = optim.int8_optimizer(inner)
  opt_state = tx.init(params)
  plain_params, plain_state = params, inner.init(params)
  step = jax.jit(tx.update)
  for _ in range(3):
    grads = make_grads(rng, params)
    state = make_state(rng, uses=(1, 3, 1))
    updates, opt_state = step(grads, opt_state, params, int8_state=state)
    params = optax.apply_updates(params, updates)

    plain_updates, plain_state = inner.update(grads, plain_state, plain_params)
    for path in INT8_LAYERS:  # DCLR scales the inner optimizer's update of each int8 kernel
      kernel = get(plain_updates, path)['kernel']
      get(plain_updates, path)['kernel'] = kernel * phi(float(get(state, path + (OP, 'grad_deviation'))))
    plain_params = optax.apply_updates(plain_params, plain_updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 params, plain_params)


def test_a_transform_chained_outside_sees_only_the_params(rng):
  # clip_by_global_norm outside int8_optimizer: the norm is the params' gradient norm alone.
  params = make_params(rng)
  grads = jax.tree.map(lambda g: 10 * g, make_grads(rng, params))
  state = make_state(rng)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optim.int8_optimizer(optax.sgd(1.0), dclr=False))
  updates, _ = tx.update(grads, tx.init(params), params, int8_state=state)
  norm_of = lambda tree: np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
  np.testing.assert_allclose(norm_of(updates), 1.0, rtol=1e-5)
  norm = norm_of(grads)
  jax.tree.map(lambda u, g: np.testing.assert_allclose(np.asarray(u), -np.asarray(g) / norm, rtol=1e-5), updates, grads)
  with_dclr = optax.chain(optax.clip_by_global_norm(1.0), optim.int8_optimizer(optax.sgd(1.0)))
  updates, _ = with_dclr.update(grads, with_dclr.init(params), params, int8_state=state)
  path = INT8_LAYERS[0] + ('kernel',)
  np.testing.assert_allclose(np.asarray(get(updates, path)), -np.asarray(get(grads, path)) / norm
                             * phi(float(get(state, INT8_LAYERS[0] + (OP, 'grad_deviation')))), rtol=1e-5)


def test_float_model_is_the_inner_optimizer(rng):
  params = make_params(rng)
  inner = optax.adam(1e-2)
  tx = optim.int8_optimizer(inner, skip_nonfinite=False)
  opt_state, plain_state = tx.init(params), inner.init(params)
  for _ in range(2):
    grads = make_grads(rng, params)
    updates, opt_state = tx.update(grads, opt_state, params, int8_state={})
    plain_updates, plain_state = inner.update(grads, plain_state, params)
    assert_trees_equal(updates, plain_updates)


def test_skip_nonfinite_keeps_params_and_inner_state(rng):
  params = make_params(rng)
  tx = optim.int8_optimizer(optax.adam(1e-2))
  opt_state = tx.init(params)
  step = jax.jit(tx.update)
  grads = make_grads(rng, params)
  # an int8 layer that saw a non-finite gradient flags it and returns NaN gradients for its input and kernel
  grads['block']['Conv_1']['kernel'] = jnp.full_like(grads['block']['Conv_1']['kernel'], jnp.nan)
  state = make_state(rng)
  flagged = merge(state, nested(('block', 'Conv_1', OP, 'nonfinite'), f32(1)))
  updates, new_opt_state = step(grads, opt_state, params, int8_state=flagged)
  assert all(not bool(jnp.any(u)) for u in jax.tree.leaves(updates))  # nothing moves
  assert_trees_equal(new_opt_state, opt_state)  # adam's count and moments
  # The next finite step trains again, from adam's unchanged state.
  updates, new_opt_state = step(make_grads(rng, params), new_opt_state, params, int8_state=state)
  assert int(optax.tree_utils.tree_get(new_opt_state, 'count')) == 1
  assert all(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))
  unguarded = optim.int8_optimizer(optax.sgd(0.1), skip_nonfinite=False)
  updates, _ = unguarded.update(grads, unguarded.init(params), params, int8_state=flagged)
  assert np.isnan(np.asarray(updates['block']['Conv_1']['kernel'])).all()


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_skip_nonfinite_without_int8_layers_checks_every_gradient(rng, bad):
  """A model without int8 layers (an empty state, or none given): a non-finite value in any gradient skips."""
  params = make_params(rng)
  tx = optim.skip_nonfinite_steps(optax.sgd(0.1, momentum=0.9))
  opt_state = tx.init(params)
  grads = make_grads(rng, params)
  leaf = rng.integers(len(jax.tree.leaves(grads)))
  grads = jax.tree.unflatten(jax.tree.structure(grads), [
      g.ravel().at[rng.integers(g.size)].set(bad).reshape(g.shape) if i == leaf else g
      for i, g in enumerate(jax.tree.leaves(grads))])
  for extra in ({}, {'int8_state': {}}):
    updates, new_opt_state = jax.jit(tx.update)(grads, opt_state, params, **extra)
    assert all(not bool(jnp.any(u)) for u in jax.tree.leaves(updates))
    assert_trees_equal(new_opt_state, opt_state)


class TinyNet(nn.Module):
  """Two int8 convs, the second applied twice (shared weights), and a float classifier."""

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, kernel_size=(3, 3),
                             conv_general_dilated_cls=functools.partial(Int8ConvGeneralDilated,
                                                                        config=Int8Config(searches=True)))
    x = nn.relu(conv(8)(x))
    shared = conv(8)
    x = nn.relu(shared(nn.relu(shared(x))))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def train_step(model, tx, params, int8_state, opt_state, images, labels, key):
  """One step on the cross-entropy of ``model``: the int8 state overwritten, ``tx`` on the params."""
  def loss_fn(params, int8_state):
    logits = model.apply({'params': params, STATE_COLLECTION: int8_state}, images, rngs={ROUNDING_RNG: key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  g_params, g_state = jax.grad(loss_fn, argnums=(0, 1))(params, int8_state)
  int8_state = quant_state.update(int8_state, g_state)
  updates, opt_state = tx.update(g_params, opt_state, params, int8_state=int8_state)
  return optax.apply_updates(params, updates), int8_state, opt_state


def test_int8_optimizer_through_int8_convs(rng):
  model = TinyNet()
  images = f32(rng.normal(size=(4, 8, 8, 3)))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  params, int8_state = variables['params'], variables[STATE_COLLECTION]
  tx = optim.int8_optimizer(optax.sgd(0.05, momentum=0.9))
  opt_state = tx.init(params)
  step = jax.jit(functools.partial(train_step, model, tx))

  layers = {'Conv_0': 1, 'Conv_1': 2}
  history = [int8_state]
  for k in range(4):
    images = f32(rng.normal(size=(4, 8, 8, 3)))
    labels = jnp.asarray(rng.integers(0, 3, size=4))
    params, int8_state, opt_state = step(params, int8_state, opt_state, images, labels, jax.random.key(k))
    history.append(int8_state)

  for name, uses in layers.items():
    states = [h[name][OP] for h in history]
    for k in range(1, len(states)):
      before, after = states[k - 1], states[k]
      assert float(after['uses']) == uses and float(after['nonfinite']) == 0
      assert float(after['grad_deviation']) != float(before['grad_deviation'])  # measured every step
      assert 0 < float(after['grad_deviation']) < 1
      assert float(after['grad_clip']) != float(before['grad_clip'])  # searched every step (searches=True)
      np.testing.assert_array_equal(np.asarray(after['input_amax'][1:]), np.asarray(before['input_amax'][:-1]))
