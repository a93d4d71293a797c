"""Flax integration: op modules, one-call conversion, state semantics across repeated applications."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jint8 import nn as jnn
from jint8 import ops
from jint8 import state as quant_state
from nested_trees import get, merge, nested


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.relu(nn.Conv(8, (3, 3), name='stem')(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, feature_group_count=2)(x))
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8, name='depthwise')(inputs=x))
    return nn.Dense(10, name='classifier')(x.mean((1, 2)))


def _int8_layers(variables):
  return set(quant_state.layer_stats(variables[jnn.STATE_COLLECTION]))


def test_int8_model_default_policy_keeps_first_conv_and_dense_float(rng):
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  variables = jnn.Int8Model(SmallCNN()).init(jax.random.PRNGKey(0), x)
  assert _int8_layers(variables) == {'model/Conv_0', 'model/depthwise'}
  state = variables[jnn.STATE_COLLECTION]['model']['Conv_0']['Int8ConvGeneralDilated_0']
  assert set(state) == set(ops.QuantState._fields)
  assert float(state['grad_clip']) == 0.0 and state['input_amax'].shape == (jnn.Int8Config().history,)
  assert not np.any(np.asarray(state['input_amax']))  # no clips yet: the first step searches


def test_int8_model_policy_options(rng):
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  everything = jnn.Int8Policy(keep_first_conv_float=False, keep_dense_float=False)
  variables = jnn.Int8Model(SmallCNN(), policy=everything).init(jax.random.PRNGKey(0), x)
  assert _int8_layers(variables) == {'model/stem', 'model/Conv_0', 'model/depthwise', 'model/classifier'}
  no_depthwise = jnn.Int8Policy(float_layers=('^depth',))
  variables = jnn.Int8Model(SmallCNN(), policy=no_depthwise).init(jax.random.PRNGKey(0), x)
  assert _int8_layers(variables) == {'model/Conv_0'}
  # Conv_0 has 2 groups of 4 input channels: grouped, not depthwise; it stays int8.
  float_depthwise = jnn.Int8Policy(keep_depthwise_float=True)
  variables = jnn.Int8Model(SmallCNN(), policy=float_depthwise).init(jax.random.PRNGKey(0), x)
  assert _int8_layers(variables) == {'model/Conv_0'}
  with pytest.raises(ValueError, match='bad regular expression'):
    jnn.Int8Policy(float_layers=('(',))


def test_int8_model_output_and_grads_close_to_float(rng):
  x = jnp.asarray(rng.normal(size=(4, 9, 9, 3)), jnp.float32)
  model = jnn.Int8Model(SmallCNN())
  variables = model.init(jax.random.PRNGKey(1), x)
  params, state = variables['params'], variables[jnn.STATE_COLLECTION]

  @jax.jit
  def grads(params, state):
    int8 = jax.grad(lambda p: (model.apply({'params': p, jnn.STATE_COLLECTION: state}, x,
                                           rngs={jnn.ROUNDING_RNG: jax.random.key(2)}) ** 2).mean())(params)
    ref = jax.grad(lambda p: (SmallCNN().apply({'params': p['model']}, x) ** 2).mean())(params)
    return int8, ref

  g_int8, g_ref = grads(params, state)
  for layer in ('Conv_0', 'depthwise', 'classifier', 'stem'):
    a, b = (np.ravel(t['model'][layer]['kernel']) for t in (g_int8, g_ref))
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99, layer


def _int8_kernel_grads(model, x, rngs):
  """The gradients of the int8 layers' kernels (their stochastic rounding's results) under the rng streams ``rngs``."""
  variables = model.init(jax.random.PRNGKey(1), x)
  loss = lambda p, rngs: (model.apply({**variables, 'params': p}, x, rngs=rngs) ** 2).mean()
  grads = jax.jit(jax.grad(loss))(variables['params'], rngs)['model']
  return [np.asarray(grads[layer]['kernel']) for layer in ('Conv_0', 'depthwise')]


def test_rounding_seeds_come_from_the_rng_stream(rng):
  x = jnp.asarray(rng.normal(size=(4, 9, 9, 3)), jnp.float32)
  model = jnn.Int8Model(SmallCNN())
  stream = lambda seed: {jnn.ROUNDING_RNG: jax.random.key(seed, impl='rbg')}
  first, again, other = (_int8_kernel_grads(model, x, stream(seed)) for seed in (1, 1, 2))
  for a, b, c in zip(first, again, other):
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
  # without the stream a forward pass runs, a gradient asks for it (as Flax's dropout does)
  with pytest.raises(ValueError, match='rngs=.*ROUNDING_RNG'):
    _int8_kernel_grads(model, x, {'dropout': jax.random.key(5)})


def test_the_rounding_launches_no_random_number_generator(rng):
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  model = jnn.Int8Model(SmallCNN())
  variables = model.init(jax.random.PRNGKey(0), x)
  loss = lambda p, key: (model.apply({**variables, 'params': p}, x, rngs={jnn.ROUNDING_RNG: key}) ** 2).mean()
  for impl in ('rbg', 'threefry2x32'):
    text = jax.jit(jax.grad(loss)).lower(variables['params'], jax.random.key(3, impl=impl)).as_text()
    # the bits are a hash of each element's index (quant.uniform_hash), seeded from the key's data
    assert 'rng_bit_generator' not in text


def test_int8_model_folds_one_key_per_call_and_seeds_each_application(rng):
  """Int8Model draws one key per call, whatever its number of int8 layers, and each application of an int8 layer
  (a shared one twice) gets its own seeds, which a new key changes."""

  class Shared(nn.Module):
    depth: int

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3), name='stem')(x)
      shared = nn.Conv(8, (3, 3), name='shared')
      for _ in range(self.depth):
        x = nn.relu(shared(x))
      return x.mean()

  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)

  def seeds_and_hlo(depth, key):
    model = jnn.Int8Model(Shared(depth))
    variables = model.init(jax.random.PRNGKey(0), x)
    seen = []

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, jnn.Int8ConvGeneralDilated) and context.method_name == '__call__':
        seen.append(np.asarray(context.module.rounding_seeds()))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      model.apply(variables, x, rngs={jnn.ROUNDING_RNG: key})
    loss = lambda p, k: model.apply({**variables, 'params': p}, x, rngs={jnn.ROUNDING_RNG: k})
    return seen, jax.jit(jax.grad(loss)).lower(variables['params'], key).as_text()

  seeds, hlo = seeds_and_hlo(4, jax.random.key(1))
  assert len(seeds) == 4 and len({tuple(s) for s in seeds}) == 4
  again, _ = seeds_and_hlo(4, jax.random.key(1))
  other, _ = seeds_and_hlo(4, jax.random.key(2))
  np.testing.assert_array_equal(seeds, again)
  assert not any(np.array_equal(a, b) for a, b in zip(seeds, other))
  _, shallow = seeds_and_hlo(1, jax.random.key(1))
  assert 0 < hlo.count('call @threefry') == shallow.count('call @threefry')


def test_explicit_op_modules_plug_into_flax_layers(rng):
  config = jnn.Int8Config(stochastic_rounding=False)

  class Explicit(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), conv_general_dilated_cls=functools.partial(jnn.Int8ConvGeneralDilated,
                                                                          config=config))(x)
      return nn.Dense(3, dot_general_cls=functools.partial(jnn.Int8DotGeneral, config=config))(x)

  x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)), jnp.float32)
  variables = Explicit().init(jax.random.PRNGKey(0), x)
  assert _int8_layers(variables) == {'Conv_0', 'Dense_0'}
  y = Explicit().apply(variables, x)
  assert y.shape == (2, 5, 5, 3) and np.isfinite(np.asarray(y)).all()


class Shared(nn.Module):
  """One conv applied three times (like a detection head shared across pyramid levels)."""

  @nn.compact
  def __call__(self, xs):
    conv = nn.Conv(4, (3, 3), conv_general_dilated_cls=functools.partial(
        jnn.Int8ConvGeneralDilated, config=jnn.Int8Config(stochastic_rounding=False)))
    return sum((conv(x) ** 2).sum() for x in xs)


class Separate(nn.Module):
  """The same computation with three distinct layers."""

  @nn.compact
  def __call__(self, xs):
    total = 0.0
    for i, x in enumerate(xs):
      conv = nn.Conv(4, (3, 3), name=f'conv{i}', conv_general_dilated_cls=functools.partial(
          jnn.Int8ConvGeneralDilated, config=jnn.Int8Config(stochastic_rounding=False)))
      total = total + (conv(x) ** 2).sum()
    return total


def test_layer_applied_three_times_counts_uses_and_sums_state(rng):
  xs = [jnp.asarray(rng.normal(size=(2, 6 + i, 6, 3)) * (i + 1), jnp.float32) for i in range(3)]
  shared = Shared().init(jax.random.PRNGKey(0), xs)
  kernel = shared['params']['Conv_0']
  separate_params = {f'conv{i}': kernel for i in range(3)}
  separate_state = Separate().init(jax.random.PRNGKey(0), xs)[jnn.STATE_COLLECTION]

  def state_grad(module, params, state):
    return jax.jit(jax.grad(lambda s: module.apply({'params': params, jnn.STATE_COLLECTION: s}, xs)))(state)

  got = state_grad(Shared(), shared['params'], shared[jnn.STATE_COLLECTION])['Conv_0']['Int8ConvGeneralDilated_0']
  per_use = state_grad(Separate(), separate_params, separate_state)
  per_use = [per_use[f'conv{i}']['Int8ConvGeneralDilated_0'] for i in range(3)]
  assert float(got['uses']) == 3.0
  assert float(got['input_saturation']) == 3.0  # each application clips at its max-abs (a search trace)
  for name in ('grad_clip', 'grad_deviation'):
    values = [float(u[name]) for u in per_use]
    assert len(set(values)) == 3, name  # the three applications really differ
    np.testing.assert_allclose(float(got[name]), sum(values), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got['input_amax']), sum(np.asarray(u['input_amax']) for u in per_use),
                             rtol=1e-6)


class DeepChain(nn.Module):
  """Twelve convs called in depth order, then a shared conv applied twice, then a Dense: sorted names
  (``Conv_10`` before ``Conv_2``, ``a_shared`` first) differ from the call order."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    for _ in range(12):
      x = nn.relu(nn.Conv(4, (3, 3))(x))
    shared = nn.Conv(4, (1, 1), name='a_shared')
    x = shared(shared(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def test_layer_order_is_the_call_order_and_names_the_layer_stats_keys(rng):
  model = jnn.Int8Model(DeepChain(), policy=jnn.Int8Policy(keep_dense_float=False))
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  key = jax.random.PRNGKey(0)
  with jnn.record_layer_order() as order:
    jax.eval_shape(model.init, key, x)
  # the first conv stays float (the default policy); the shared conv is listed once, where it is first called
  expected = [f'model/Conv_{i}' for i in range(1, 12)] + ['model/a_shared', 'model/Dense_0']
  assert order == expected
  # state that came out of a jitted function has sorted keys: the order is lost there
  stats = quant_state.layer_stats(jax.jit(model.init)(key, x)[jnn.STATE_COLLECTION])
  assert list(stats) == sorted(expected) != expected


def test_layer_stats_give_the_weight_levels_of_each_kernel(rng):
  model = jnn.Int8Model(DeepChain(), policy=jnn.Int8Policy(keep_dense_float=False))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32))
  stats = quant_state.layer_stats(variables[jnn.STATE_COLLECTION], variables['params'])
  for name, layer in stats.items():
    kernel = np.asarray(traverse_util.flatten_dict(variables['params'], sep='/')[f'{name}/kernel'], np.float64)
    per_channel = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0)
    np.testing.assert_allclose(layer['weight_levels'], 127 * per_channel.min() / per_channel.max(), rtol=1e-6)
  # a channel scaled down 64 times keeps 1/64 of the levels
  kernel = rng.normal(size=(3, 3, 1, 8)).astype(np.float32)
  kernel[..., 0] *= np.abs(kernel[..., 1:]).max() / 64 / np.abs(kernel[..., 0]).max()
  np.testing.assert_allclose(quant_state.weight_levels(jnp.asarray(kernel)), 127 / 64, rtol=1e-6)


class FloatNet(nn.Module):
  """Two plain convs and a classifier, made int8 by ``Int8Model``."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


@pytest.mark.parametrize('input_clip', ['delayed', 'maxabs'])
def test_search_cond_searches_every_period_and_reuses_the_clips_between(rng, input_clip):
  model = jnn.Int8Model(FloatNet(), config=jnn.Int8Config(input_clip=input_clip),
                        policy=jnn.Int8Policy(keep_first_conv_float=False))
  images = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  params, int8_state = variables['params'], variables[jnn.STATE_COLLECTION]
  period = 3

  def step(model, params, int8_state, images, key):
    loss = lambda p, s: (model.apply({'params': p, jnn.STATE_COLLECTION: s}, images,
                                     rngs={jnn.ROUNDING_RNG: key}) ** 2).mean()
    g_params, g_state = jax.grad(loss, argnums=(0, 1))(params, int8_state)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, g_params), quant_state.update(int8_state, g_state)

  run = jax.jit(lambda step_index, *args: jnn.search_cond(step, model, args[1], step_index, period, *args))
  searched_by_config = {c: jax.jit(functools.partial(step, model.clone(config=jnn.Int8Config(
      input_clip=input_clip, searches=c)))) for c in (True, False)}
  clips = []
  for k in range(7):
    images = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
    due = bool(quant_state.search_due(int8_state, k, period, delayed_input_clip=input_clip == 'delayed'))
    assert due == (k % period == 0)
    expected = searched_by_config[due](params, int8_state, images, jax.random.key(k))
    params, int8_state = run(k, params, int8_state, images, jax.random.key(k))
    jax.tree.map(np.testing.assert_array_equal, (params, int8_state), expected)  # the trace the step needs
    clips.append(float(int8_state['model']['Conv_1']['Int8ConvGeneralDilated_0']['grad_clip']))
  # searched on steps 0, 3, 6; reused in between
  assert clips[1] == clips[0] and clips[2] == clips[0] and clips[3] != clips[2] and clips[4] == clips[3]


def test_search_cond_searches_again_after_a_deviation_jump(rng):
  """With Int8Config.deviation_jump, a step between searches whose layer deviation jumped runs the search trace:
  the layer's clip and its search deviation are new, where without it they are kept."""
  images = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
  layer = ('model', 'Conv_1', 'Int8ConvGeneralDilated_0')

  def run(deviation_jump):
    model = jnn.Int8Model(FloatNet(), config=jnn.Int8Config(deviation_jump=deviation_jump),
                          policy=jnn.Int8Policy(keep_first_conv_float=False))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)

    def step(model, params, int8_state, key):
      loss = lambda p, s: (model.apply({'params': p, jnn.STATE_COLLECTION: s}, images,
                                       rngs={jnn.ROUNDING_RNG: key}) ** 2).mean()
      g_state = jax.grad(loss, argnums=1)(params, int8_state)
      return quant_state.update(int8_state, g_state)

    run_step = jax.jit(lambda k, *args: jnn.search_cond(step, model, args[1], k, 100, *args))
    params = variables['params']
    searched = run_step(0, params, variables[jnn.STATE_COLLECTION], jax.random.key(0))
    reference = float(get(searched, layer + ('search_deviation',)))
    assert reference > 0 and reference == float(get(searched, layer + ('grad_deviation',)))
    jumped = merge(searched, nested(layer + ('grad_deviation',), jnp.float32(5 * reference)))
    after = run_step(1, params, jumped, jax.random.key(1))
    return searched, after

  searched, after = run(0.0)  # off: step 1 is between searches
  for path in (layer + ('search_deviation',), ('model', 'Conv_0', 'Int8ConvGeneralDilated_0', 'grad_clip')):
    assert float(get(after, path)) == float(get(searched, path))
  searched, after = run(3.0)
  assert float(get(after, layer + ('search_deviation',))) != float(get(searched, layer + ('search_deviation',)))
  # Conv_0's gradient passes through Conv_1's stochastic rounding, new every step: searched again, its clip moves
  first = ('model', 'Conv_0', 'Int8ConvGeneralDilated_0', 'grad_clip')
  assert float(get(after, first)) != float(get(searched, first))


def test_search_cond_runs_a_float_model_as_it_is(rng):
  model = FloatNet()
  images = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), images)
  out = jnn.search_cond(lambda m, x: m.apply(params, x), model, {}, 0, 100, images)
  np.testing.assert_array_equal(out, model.apply(params, images))
