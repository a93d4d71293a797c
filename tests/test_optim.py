"""jint8.optim: the DSGC state update, DCLR and int8_optimizer on synthetic trees, then through real int8 ops."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jint8 import optim
from jint8.nn import STATE_COLLECTION, Int8Config, Int8ConvGeneralDilated, Int8Model, Int8Policy

OP = 'Int8ConvGeneralDilated_0'
# The int8 layers of the synthetic model; "Dense_0" is a float layer (no op module).
INT8_LAYERS = (('Conv_0',), ('block', 'Conv_1'), ('block', 'Conv_2'))


def nested(path, value):
  for key in reversed(path):
    value = {key: value}
  return value


def merge(*trees):
  out = {}
  for tree in trees:
    for k, v in tree.items():
      out[k] = merge(out[k], v) if isinstance(v, dict) and k in out else v
  return out


def get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def f32(x):
  return jnp.asarray(x, jnp.float32)


def make_params(rng):
  layers = [nested(path, {'kernel': f32(rng.normal(size=(3, 3, 2, 4))), 'bias': f32(rng.normal(size=4))})
            for path in INT8_LAYERS]
  dense = {'Dense_0': {'kernel': f32(rng.normal(size=(4, 3))), 'bias': f32(rng.normal(size=3))}}
  return merge(dense, *layers)


def make_state(rng, step=0):
  """int8_state of the synthetic model: random stored values, every layer at optimizer step ``step``."""
  def layer():
    return {'grad_clip': f32(rng.uniform(0.5, 2)), 'grad_deviation': f32(rng.uniform(0, 0.2)),
            'input_clip': f32(rng.uniform(1, 4)), 'nonfinite': f32(0), 'search': f32(step == 0),
            'step': f32(step), 'uses': f32(1)}
  return merge(*[nested(path + (OP,), layer()) for path in INT8_LAYERS])


def make_cotangent(rng, uses, deviation_range=(0, 0.2)):
  """What the backward passes return, summed over the applications: ``uses`` gives k per layer (a tuple).

  Returns the cotangent tree and the per-layer means of the per-application values.
  """
  cot, means = {}, {}
  for path, k in zip(INT8_LAYERS, uses):
    per_use = {'grad_clip': rng.uniform(0.1, 3, size=k), 'grad_deviation': rng.uniform(*deviation_range, size=k),
               'input_clip': rng.uniform(1, 5, size=k)}
    layer = {f: f32(np.sum(v.astype(np.float32))) for f, v in per_use.items()}
    layer.update(nonfinite=f32(0), search=f32(0), step=f32(0), uses=f32(k))
    cot = merge(cot, nested(path + (OP,), layer))
    means[path] = {f: v.mean() if k else None for f, v in per_use.items()}
  return cot, means


def make_grads(rng, params):
  return jax.tree.map(lambda p: f32(rng.normal(size=p.shape)), params)


def phi(deviation, alpha=20.0, beta=0.1):
  return max(np.exp(-alpha * np.float64(deviation)), beta)


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_state_update_writes_mean_over_applications_and_keeps_unused_layers(rng):
  params = make_params(rng)
  state = make_state(rng, step=4)
  tree = {'params': params, STATE_COLLECTION: state}
  grads = make_grads(rng, params)
  cot, means = make_cotangent(rng, uses=(3, 1, 0))
  tx = optim.dsgc_state_update(period=5)
  updates, _ = tx.update({'params': grads, STATE_COLLECTION: cot}, tx.init(tree), tree)
  assert_trees_equal(updates['params'], grads)  # the params part passes through
  new = optax.apply_updates(tree, updates)[STATE_COLLECTION]

  for path, k in zip(INT8_LAYERS, (3, 1)):  # applied layers: the mean of their applications
    for f in ('grad_clip', 'grad_deviation', 'input_clip'):
      np.testing.assert_allclose(float(get(new, path + (OP, f))), means[path][f], rtol=1e-5, err_msg=f)
    assert float(get(new, path + (OP, 'uses'))) == k
  unused = INT8_LAYERS[2]
  for f in ('grad_clip', 'grad_deviation', 'input_clip'):
    assert float(get(new, unused + (OP, f))) == float(get(state, unused + (OP, f)))
  assert float(get(new, unused + (OP, 'uses'))) == 0
  for path in INT8_LAYERS:
    layer = get(new, path + (OP,))
    assert float(layer['step']) == 5 and float(layer['search']) == 1 and float(layer['nonfinite']) == 0
    assert all(v.dtype == jnp.float32 for v in layer.values())


@pytest.mark.parametrize('period', [1, 3])
def test_search_flag_schedule(rng, period):
  params = make_params(rng)
  tree = {'params': params, STATE_COLLECTION: make_state(rng, step=0)}
  tx = optim.dsgc_state_update(period)
  opt_state = tx.init(tree)

  @jax.jit
  def step(tree, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, tree)
    return optax.apply_updates(tree, updates), opt_state

  for k in range(1, 8):
    cot, _ = make_cotangent(rng, uses=(1, 2, 1))
    tree, opt_state = step(tree, opt_state, {'params': make_grads(rng, params), STATE_COLLECTION: cot})
    for path in INT8_LAYERS:
      layer = get(tree[STATE_COLLECTION], path + (OP,))
      assert float(layer['step']) == k
      assert float(layer['search']) == float(k % period == 0), (k, period)


def test_dclr_scales_only_int8_kernels(rng):
  params = make_params(rng)
  tree = {'params': params, STATE_COLLECTION: make_state(rng)}
  grads = make_grads(rng, params)
  # Deviations around 0.1 put phi on both sides of the floor beta = 0.1 (exp(-20 * 0.115) = 0.1).
  cot, means = make_cotangent(rng, uses=(3, 1, 0), deviation_range=(0.0, 0.25))
  alpha, beta = 20.0, 0.1
  tx = optim.deviation_counteractive_lr(alpha, beta)
  updates, _ = tx.update({'params': grads, STATE_COLLECTION: cot}, tx.init(tree))
  assert_trees_equal(updates[STATE_COLLECTION], cot)
  assert_trees_equal(updates['params']['Dense_0'], grads['Dense_0'])
  for path in INT8_LAYERS:
    deviation = means[path]['grad_deviation']
    scale = 1.0 if deviation is None else phi(deviation, alpha, beta)
    np.testing.assert_allclose(np.asarray(get(updates['params'], path + ('kernel',))),
                               np.asarray(get(grads, path + ('kernel',)), np.float64) * scale, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(get(updates['params'], path + ('bias',))),
                                  np.asarray(get(grads, path + ('bias',))))

  low_precision = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads)
  updates, _ = tx.update({'params': low_precision, STATE_COLLECTION: cot}, tx.init(tree))
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates['params']))


@pytest.mark.parametrize('alpha, beta', [(20.0, 0.1), (5.0, 0.5)])
def test_dclr_formula(rng, alpha, beta):
  params = make_params(rng)
  tree = {'params': params, STATE_COLLECTION: make_state(rng)}
  grads = make_grads(rng, params)
  cot, means = make_cotangent(rng, uses=(1, 1, 2), deviation_range=(0.0, 0.4))
  tx = optim.deviation_counteractive_lr(alpha, beta)
  updates, _ = tx.update({'params': grads, STATE_COLLECTION: cot}, tx.init(tree))
  for path in INT8_LAYERS:
    measured = np.asarray(get(updates['params'], path + ('kernel',))) / np.asarray(get(grads, path + ('kernel',)))
    expected = max(np.exp(-alpha * means[path]['grad_deviation']), beta)
    np.testing.assert_allclose(measured, expected, rtol=1e-5)


def test_dclr_needs_a_sibling_kernel(rng):
  params = make_params(rng)
  state = merge(make_state(rng), nested(('Dense_0', 'Orphan', OP), get(make_state(rng), INT8_LAYERS[0] + (OP,))))
  tx = optim.deviation_counteractive_lr()
  with pytest.raises(ValueError, match='Dense_0/Orphan/Int8ConvGeneralDilated_0 has no sibling param '
                                       'Dense_0/Orphan/kernel'):
    tx.init({'params': params, STATE_COLLECTION: state})
  with pytest.raises(ValueError, match='Dense_0/Orphan'):
    optim.int8_optimizer(optax.sgd(0.1)).init({'params': params, STATE_COLLECTION: state})


@pytest.mark.parametrize('period', [0, -3, 2.5, True, '4'])
def test_bad_period(period):
  with pytest.raises(ValueError, match='period must be a positive int'):
    optim.dsgc_state_update(period)
  with pytest.raises(ValueError, match='period must be a positive int'):
    optim.int8_optimizer(optax.sgd(0.1), period=period)


@pytest.mark.parametrize('alpha, beta, message', [(-1.0, 0.1, 'alpha'), (float('nan'), 0.1, 'alpha'),
                                                  (20.0, 0.0, 'beta'), (20.0, 1.5, 'beta'),
                                                  (20.0, float('nan'), 'beta')])
def test_bad_dclr_arguments(alpha, beta, message):
  with pytest.raises(ValueError, match=message):
    optim.deviation_counteractive_lr(alpha, beta)
  with pytest.raises(ValueError, match=message):
    optim.int8_optimizer(optax.sgd(0.1), alpha=alpha, beta=beta)


def test_bad_trees(rng):
  params = make_params(rng)
  tree = {'params': params, STATE_COLLECTION: make_state(rng)}
  grads = {'params': make_grads(rng, params), STATE_COLLECTION: make_cotangent(rng, (1, 1, 1))[0]}
  tx = optim.dsgc_state_update(3)
  with pytest.raises(ValueError, match='needs the current'):
    tx.update(grads, tx.init(tree))
  with pytest.raises(ValueError, match='must be a dict'):
    optim.int8_optimizer(optax.sgd(0.1)).init(params)
  broken = merge(make_state(rng), nested(INT8_LAYERS[0] + (OP,), {'extra': f32(1)}))
  with pytest.raises(ValueError, match='Conv_0/Int8ConvGeneralDilated_0 holds'):
    tx.update(grads, tx.init(tree), {'params': params, STATE_COLLECTION: broken})
  with pytest.raises(ValueError, match='no "params"'):
    optim.split_state({'batch_stats': {}})


def test_split_state(rng):
  params = make_params(rng)
  state = make_state(rng)
  batch_stats = {'BatchNorm_0': {'mean': f32(rng.normal(size=4))}}
  tree, rest = optim.split_state({'params': params, 'batch_stats': batch_stats, STATE_COLLECTION: state})
  assert tree['params'] is params and tree[STATE_COLLECTION] is state and rest == {'batch_stats': batch_stats}
  tree, rest = optim.split_state({'params': params})
  assert tree == {'params': params, STATE_COLLECTION: {}} and rest == {}


@pytest.mark.parametrize('inner', [
    optax.sgd(optax.linear_schedule(0.1, 0.01, 5), momentum=0.9),
    optax.adamw(1e-2, weight_decay=0.1),
], ids=['sgd_momentum_schedule', 'adamw'])
def test_inner_optimizer_sees_only_params(rng, inner):
  params = make_params(rng)
  tree = {'params': params, STATE_COLLECTION: make_state(rng)}
  tx = optim.int8_optimizer(inner, period=2)
  opt_state = tx.init(tree)
  plain_params, plain_state = params, inner.init(params)
  step = jax.jit(tx.update)
  for _ in range(3):
    grads = make_grads(rng, params)
    cot, means = make_cotangent(rng, uses=(1, 3, 1), deviation_range=(0.0, 0.2))
    updates, opt_state = step({'params': grads, STATE_COLLECTION: cot}, opt_state, tree)
    tree = optax.apply_updates(tree, updates)

    plain_updates, plain_state = inner.update(grads, plain_state, plain_params)
    for path in INT8_LAYERS:  # DCLR scales the inner optimizer's update of each int8 kernel
      kernel = get(plain_updates, path)['kernel']
      get(plain_updates, path)['kernel'] = kernel * phi(means[path]['grad_deviation'])
    plain_params = optax.apply_updates(plain_params, plain_updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 tree['params'], plain_params)
    for path in INT8_LAYERS:  # no momentum, no weight decay on the state: it is this step's mean
      np.testing.assert_allclose(float(get(tree[STATE_COLLECTION], path + (OP, 'grad_clip'))),
                                 means[path]['grad_clip'], rtol=1e-5)
  # The inner optimizer's state is exactly the plain optimizer's: it never saw the int8 state.
  inner_state = opt_state[0][0]
  assert jax.tree.structure(inner_state) == jax.tree.structure(plain_state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
               inner_state, plain_state)


def test_float_model_is_the_inner_optimizer(rng):
  params = make_params(rng)
  inner = optax.adam(1e-2)
  tx = optim.int8_optimizer(inner)
  tree = {'params': params, STATE_COLLECTION: {}}
  opt_state, plain_state = tx.init(tree), inner.init(params)
  for _ in range(2):
    grads = make_grads(rng, params)
    updates, opt_state = tx.update({'params': grads, STATE_COLLECTION: {}}, opt_state, tree)
    plain_updates, plain_state = inner.update(grads, plain_state, params)
    assert updates[STATE_COLLECTION] == {}
    assert_trees_equal(updates['params'], plain_updates)


@pytest.mark.parametrize('cause', ['param_grad', 'layer'])
def test_skip_nonfinite_keeps_params_and_inner_state(rng, cause):
  params = make_params(rng)
  state = make_state(rng, step=3)
  tree = {'params': params, STATE_COLLECTION: state}
  tx = optim.int8_optimizer(optax.adam(1e-2), period=2)
  opt_state = tx.init(tree)
  step = jax.jit(tx.update)
  grads = make_grads(rng, params)
  cot, means = make_cotangent(rng, uses=(1, 1, 1))
  tree_before, opt_state_before = tree, opt_state
  bad = INT8_LAYERS[1]
  if cause == 'param_grad':
    grads['Dense_0']['bias'] = grads['Dense_0']['bias'].at[1].set(jnp.inf)
  else:  # as the op reports it: nonfinite = 1 and a meaningless (here NaN) clip
    get(cot, bad + (OP,)).update(nonfinite=f32(1), grad_clip=f32(np.nan))
  updates, opt_state = step({'params': grads, STATE_COLLECTION: cot}, opt_state, tree)
  tree = optax.apply_updates(tree, updates)

  assert_trees_equal(tree['params'], tree_before['params'])
  assert_trees_equal(opt_state[0], opt_state_before[0])  # adam's count and moments
  new_state = tree[STATE_COLLECTION]
  for path in INT8_LAYERS:
    layer, old = get(new_state, path + (OP,)), get(state, path + (OP,))
    assert float(layer['step']) == 4 and float(layer['search']) == 1
    if cause == 'layer' and path == bad:
      assert float(layer['nonfinite']) == 1
      for f in ('grad_clip', 'grad_deviation', 'input_clip'):  # kept, never NaN
        assert float(layer[f]) == float(old[f])
    else:
      assert float(layer['nonfinite']) == 0
      np.testing.assert_allclose(float(layer['grad_deviation']), means[path]['grad_deviation'], rtol=1e-5)

  # The next finite step trains again, from adam's unchanged state.
  grads = make_grads(rng, params)
  cot, _ = make_cotangent(rng, uses=(1, 1, 1))
  updates, opt_state = step({'params': grads, STATE_COLLECTION: cot}, opt_state, tree)
  assert int(optax.tree_utils.tree_get(opt_state, 'count')) == 1
  assert all(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates['params']))


def test_without_skip_nonfinite_a_bad_layer_still_trains(rng):
  params = make_params(rng)
  tree = {'params': params, STATE_COLLECTION: make_state(rng)}
  tx = optim.int8_optimizer(optax.sgd(0.1), skip_nonfinite=False)
  cot, _ = make_cotangent(rng, uses=(1, 1, 1))
  get(cot, INT8_LAYERS[0] + (OP,))['nonfinite'] = f32(1)
  updates, _ = tx.update({'params': make_grads(rng, params), STATE_COLLECTION: cot}, tx.init(tree), tree)
  assert all(bool(jnp.all(u != 0)) for u in jax.tree.leaves(updates['params']))
  new = optax.apply_updates(tree, updates)[STATE_COLLECTION]
  assert float(get(new, INT8_LAYERS[0] + (OP, 'nonfinite'))) == 1


class TinyNet(nn.Module):
  """Two int8 convs, the second applied twice (shared weights), and a float classifier."""

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, kernel_size=(3, 3),
                             conv_general_dilated_cls=functools.partial(Int8ConvGeneralDilated,
                                                                        config=Int8Config(seed=1)))
    x = nn.relu(conv(8)(x))
    shared = conv(8)
    x = nn.relu(shared(nn.relu(shared(x))))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def train_step(model, tx, tree, opt_state, images, labels):
  """One step of ``tx`` on the cross-entropy of ``model``, the int8 state updated through ``tx``."""
  def loss_fn(params, int8_state):
    logits = model.apply({'params': params, STATE_COLLECTION: int8_state}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.grad(loss_fn, argnums=(0, 1))(tree['params'], tree[STATE_COLLECTION])
  updates, opt_state = tx.update({'params': grads[0], STATE_COLLECTION: grads[1]}, opt_state, tree)
  return optax.apply_updates(tree, updates), opt_state


def test_int8_optimizer_through_int8_convs(rng):
  model = TinyNet()
  images = f32(rng.normal(size=(4, 8, 8, 3)))
  tree, rest = optim.split_state(jax.jit(model.init)(jax.random.PRNGKey(0), images))
  assert rest == {}
  tx = optim.int8_optimizer(optax.sgd(0.05, momentum=0.9), period=2)
  opt_state = tx.init(tree)
  step = jax.jit(functools.partial(train_step, model, tx))

  layers = {'Conv_0': 1, 'Conv_1': 2}
  history = [tree[STATE_COLLECTION]]
  for _ in range(5):
    images = f32(rng.normal(size=(4, 8, 8, 3)))
    labels = jnp.asarray(rng.integers(0, 3, size=4))
    tree, opt_state = step(tree, opt_state, images, labels)
    history.append(tree[STATE_COLLECTION])

  for name, uses in layers.items():
    states = [h[name][OP] for h in history]
    for k in range(1, len(states)):
      before, after = states[k - 1], states[k]
      assert float(after['step']) == k and float(after['uses']) == uses and float(after['nonfinite']) == 0
      assert float(after['search']) == float(k % 2 == 0)
      assert float(after['grad_deviation']) != float(before['grad_deviation'])  # measured every step
      assert 0 < float(after['grad_deviation']) < 1
      if before['search'] == 1:
        assert float(after['grad_clip']) != float(before['grad_clip']), (name, k)  # a new search
      else:
        assert float(after['grad_clip']) == float(before['grad_clip']), (name, k)  # the stored clip reused


def test_needs_search(rng):
  state = make_state(rng, step=1)
  assert not bool(optim.needs_search(state, Int8Config()))
  flagged = merge(state, nested(INT8_LAYERS[1] + (OP, 'search'), f32(1)))
  assert bool(optim.needs_search(flagged, Int8Config()))
  no_input_clip = merge(state, nested(INT8_LAYERS[2] + (OP, 'input_clip'), f32(0)))
  assert not bool(optim.needs_search(no_input_clip, Int8Config(input_clip='maxabs')))  # not used: max-abs
  assert bool(optim.needs_search(no_input_clip, Int8Config(input_clip='stored')))
  no_grad_clip = merge(state, nested(INT8_LAYERS[0] + (OP, 'grad_clip'), f32(0)))
  assert bool(optim.needs_search(no_grad_clip, Int8Config()))
  assert not bool(optim.needs_search(no_grad_clip, Int8Config(dsgc=False)))  # max|g| every step


class FloatNet(nn.Module):
  """Two plain convs and a classifier, made int8 by ``Int8Model``."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


@pytest.mark.parametrize('input_clip', ['maxabs', 'stored'])
def test_search_cond_gives_the_steps_of_one_trace(rng, input_clip):
  model = Int8Model(FloatNet(), config=Int8Config(seed=2, input_clip=input_clip),
                    policy=Int8Policy(keep_first_conv_float=False))
  images = f32(rng.normal(size=(4, 8, 8, 3)))
  tree, _ = optim.split_state(jax.jit(model.init)(jax.random.PRNGKey(0), images))
  tx = optim.int8_optimizer(optax.sgd(0.05, momentum=0.9), period=3)
  step = lambda model, *args: train_step(model, tx, *args)
  one_trace = jax.jit(functools.partial(step, model))
  two_traces = jax.jit(lambda tree, *args: optim.search_cond(step, model, tree[STATE_COLLECTION], tree, *args))
  a, b = (tree, tx.init(tree)), (tree, tx.init(tree))
  searched = []
  for _ in range(7):
    images = f32(rng.normal(size=(4, 8, 8, 3)))
    labels = jnp.asarray(rng.integers(0, 3, size=4))
    searched.append(bool(optim.needs_search(b[0][STATE_COLLECTION], model.config)))
    a, b = one_trace(*a, images, labels), two_traces(*b, images, labels)
    jax.tree.map(np.testing.assert_array_equal, a[0][STATE_COLLECTION], b[0][STATE_COLLECTION])
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-8), a[0]['params'],
                 b[0]['params'])
  assert searched == [True, False, False, True, False, False, True]
  # The clips were searched on those steps and reused on the others.
  clip = a[0][STATE_COLLECTION]['model']['Conv_1']['Int8ConvGeneralDilated_0']['grad_clip']
  assert float(clip) > 0


def test_search_cond_runs_a_float_model_as_it_is(rng):
  model = FloatNet()
  images = f32(rng.normal(size=(2, 8, 8, 3)))
  params = model.init(jax.random.PRNGKey(0), images)
  out = optim.search_cond(lambda m, x: m.apply(params, x), model, {}, images)
  np.testing.assert_array_equal(out, model.apply(params, images))
