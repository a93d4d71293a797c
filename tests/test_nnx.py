"""Flax NNX integration: conversion, bit-identity with the Linen layers, nnx.Optimizer training, the search trace,
the rounding seeds, checkpoints, DCLR on NNX state paths and the errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jint8 import nn as jnn
from jint8 import nnx as jnnx
from jint8 import optim, quant
from jint8 import state as quant_state
from jint8.training import checkpointing

EVERYTHING = jnn.Int8Policy(keep_first_conv_float=False, keep_dense_float=False)


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name='stem')(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, feature_group_count=2, name='grouped')(x))
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8, name='depthwise')(x))
    return nn.Dense(10, name='head')(x.mean((1, 2)))


class NnxCNN(nnx.Module):
  """``LinenCNN`` in NNX: a conv, a strided grouped conv, a depthwise conv (in a list) and a Linear head. The
  attributes' names sort in another order than the calls (``blocks`` first, ``stem`` last)."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.grouped = nnx.Conv(8, 8, (3, 3), strides=2, feature_group_count=2, rngs=rngs)
    self.blocks = nnx.List([nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)])
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    x = nnx.relu(self.grouped(x))
    x = nnx.relu(self.blocks[0](x))
    return self.head(x.mean((1, 2)))


def _images(rng, n=4, size=9):
  return jnp.asarray(rng.normal(size=(n, size, size, 3)), jnp.float32)


def _int8_layers(model):
  return set(quant_state.layer_stats(jnnx.int8_state(model)))


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_default_policy_keeps_the_first_conv_called_and_the_linear_float(rng):
  model = jnnx.to_int8(NnxCNN(nnx.Rngs(0)), _images(rng))
  assert _int8_layers(model) == {'grouped', 'blocks/0'}
  assert model.stem.conv_general_dilated is jax.lax.conv_general_dilated
  assert model.head.dot_general is jax.lax.dot_general
  # nnx.state(model, Int8State) selects every field of every int8 layer, before the first step all zero
  state = nnx.to_pure_dict(nnx.state(model, jnnx.Int8State))
  assert set(state['grouped']['conv_general_dilated']) == set(quant_state.FIELDS)
  assert state['blocks'][0]['conv_general_dilated']['input_amax'].shape == (jnn.Int8Config().history,)
  assert not any(np.any(np.asarray(v)) for v in jax.tree.leaves(state))
  assert len(jax.tree.leaves(nnx.state(model, jnnx.Int8State))) == 2 * len(quant_state.FIELDS)


def test_policy_options(rng):
  convert = lambda policy: _int8_layers(jnnx.to_int8(NnxCNN(nnx.Rngs(0)), _images(rng), policy=policy))
  assert convert(EVERYTHING) == {'stem', 'grouped', 'blocks/0', 'head'}
  assert convert(jnn.Int8Policy(float_layers=('^blocks/',))) == {'grouped'}
  # grouped has 2 groups of 4 input channels: not depthwise, it stays int8
  assert convert(jnn.Int8Policy(keep_depthwise_float=True)) == {'grouped'}
  assert _int8_layers(jnnx.to_int8(NnxCNN(nnx.Rngs(0)), policy=jnn.Int8Policy(keep_first_conv_float=False))) == {
      'stem', 'grouped', 'blocks/0'}


def _copy_linen_variables_to(model, params, int8_state):
  """Writes the Linen ``Int8Model(LinenCNN())``'s params and int8 state into ``NnxCNN`` ``model``."""
  nnx_name = {'stem': ('stem',), 'grouped': ('grouped',), 'depthwise': ('blocks', 0), 'head': ('head',)}
  param_state, quant_vars = nnx.state(model, nnx.Param), nnx.state(model, jnnx.Int8State)
  pure_params, pure_quant = nnx.to_pure_dict(param_state), nnx.to_pure_dict(quant_vars)
  for name, path in nnx_name.items():
    layer = pure_params[path[0]] if len(path) == 1 else pure_params[path[0]][path[1]]
    layer.update(params['model'][name])
    layer = pure_quant[path[0]] if len(path) == 1 else pure_quant[path[0]][path[1]]
    (op,) = layer
    (linen_op,) = int8_state['model'][name].values()
    layer[op] = linen_op
  nnx.replace_by_pure_dict(param_state, pure_params)
  nnx.replace_by_pure_dict(quant_vars, pure_quant)
  nnx.update(model, param_state, quant_vars)
  return nnx_name


@pytest.mark.parametrize('searches', [True, False])
def test_nnx_layers_match_linen_bit_for_bit(rng, searches):
  x, labels = _images(rng), jnp.asarray(rng.integers(0, 10, 4))
  config = jnn.Int8Config(searches=searches)
  linen = jnn.Int8Model(LinenCNN(), config=config, policy=EVERYTHING)
  variables = linen.init(jax.random.key(0), x)
  params, int8_state = variables['params'], variables[jnn.STATE_COLLECTION]
  if not searches:  # the steps between searches use stored clips and a history: give them some
    int8_state = jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 2, v.shape), jnp.float32), int8_state)
  model = jnnx.to_int8(NnxCNN(nnx.Rngs(1)), x, config=config, policy=EVERYTHING, rngs=nnx.Rngs(int8=2))
  nnx_name = _copy_linen_variables_to(model, params, int8_state)
  # the key each NNX layer draws next (a clone draws it), given to the Linen layer of the same name
  keys = {path[:-2]: op() for path, op in nnx.iter_graph(nnx.clone(model)) if isinstance(op, nnx.RngStream)}
  seeds = {name: quant.rounding_seeds(keys[path]) for name, path in nnx_name.items()}

  def same_seeds(next_fun, args, kwargs, context):
    if context.method_name == 'rounding_seeds':
      return seeds[context.module.path[-2]]
    return next_fun(*args, **kwargs)

  @jax.jit
  def linen_step(params, int8_state):
    def loss_fn(params, int8_state):
      with nn.intercept_methods(same_seeds):
        logits = linen.apply({'params': params, jnn.STATE_COLLECTION: int8_state}, x,
                             rngs={jnn.ROUNDING_RNG: jax.random.key(3)})
      return _cross_entropy(logits, labels), logits
    (_, logits), (g_params, g_state) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, int8_state)
    return logits, g_params['model'], quant_state.update(int8_state, g_state)['model']

  @nnx.jit
  def nnx_step(model):
    def loss_fn(model):
      logits = model(x)
      return _cross_entropy(logits, labels), logits
    (_, logits), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, (nnx.Param, jnnx.Int8State)),
                                            has_aux=True)(model)
    return logits, nnx.to_pure_dict(nnx.state(grads, nnx.Param)), jnnx.update_state(model, grads)

  linen_logits, linen_grads, linen_state = linen_step(params, int8_state)
  nnx_logits, nnx_grads, nnx_state = nnx_step(model)
  np.testing.assert_array_equal(linen_logits, nnx_logits)
  at = lambda tree, path: tree[path[0]] if len(path) == 1 else tree[path[0]][path[1]]
  for name, path in nnx_name.items():
    jax.tree.map(np.testing.assert_array_equal, linen_grads[name], at(nnx_grads, path))
    (linen_layer,), (nnx_layer,) = linen_state[name].values(), at(nnx_state, path).values()
    jax.tree.map(np.testing.assert_array_equal, linen_layer, nnx_layer)
    assert float(nnx_layer['uses']) == 1 and float(nnx_layer['grad_clip']) > 0, name
  jax.tree.map(np.testing.assert_array_equal, nnx_state, jnnx.int8_state(model))  # written into the model


def _train_step(model, optimizer, images, labels):
  def loss_fn(model):
    return _cross_entropy(model(images), labels)
  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, (nnx.Param, jnnx.Int8State)))(model)
  optimizer.update(model, grads, int8_state=jnnx.update_state(model, grads))
  return loss


PERIOD = 3


@nnx.jit
def _step(model, optimizer, images, labels):
  return jnnx.search_cond(_train_step, model, optimizer.step[...], PERIOD, optimizer, images, labels)


def _model_and_optimizer(init_seed, images):
  model = jnnx.to_int8(NnxCNN(nnx.Rngs(init_seed)), images, rngs=nnx.Rngs(int8=init_seed + 1))
  return model, nnx.Optimizer(model, optim.int8_optimizer(optax.adam(0.03)), wrt=nnx.Param)


def test_nnx_optimizer_steps_lower_the_loss_and_search_every_period(rng):
  images, labels = _images(rng, n=16), jnp.asarray(rng.integers(0, 10, 16))
  model, optimizer = _model_and_optimizer(0, images)
  losses, clips = [], []
  for _ in range(13):
    losses.append(float(_step(model, optimizer, images, labels)))
    clips.append({k: float(v['grad_clip']) for k, v in quant_state.layer_stats(jnnx.int8_state(model)).items()})
  assert int(optimizer.step[...]) == 13
  assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
  for layer in ('grouped', 'blocks/0'):
    series = [c[layer] for c in clips]
    changed = [i for i in range(1, len(series)) if series[i] != series[i - 1]]
    assert all(v > 0 for v in series) and changed == [3, 6, 9, 12], (layer, series)


def test_search_cond_runs_the_trace_the_step_needs(rng):
  images = _images(rng)
  seen = []

  def step_fn(model, images):
    seen.append({layer.config.searches for _, layer in nnx.iter_graph(model)
                 if isinstance(layer, (jnnx.Int8ConvGeneralDilated, jnnx.Int8DotGeneral))})
    return model(images)

  model, _ = _model_and_optimizer(0, images)
  nnx.jit(lambda model, images: jnnx.search_cond(step_fn, model, 0, PERIOD, images))(model, images)
  assert seen == [{True}, {False}]  # both traced, each with every layer set; the model's config is left as it was
  assert {layer.config.searches for layer in (model.grouped.conv_general_dilated,)} == {True}
  float_model = NnxCNN(nnx.Rngs(0))
  out = jnnx.search_cond(lambda m, x: m(x), float_model, 0, PERIOD, images)
  np.testing.assert_array_equal(out, float_model(images))


def _kernel_grads(model, images):
  grads = nnx.grad(lambda m: (m(images) ** 2).mean())(model)
  return np.asarray(grads['grouped']['kernel'][...])


def test_rounding_seeds_come_from_the_stream_and_change_every_step(rng):
  images = _images(rng)
  convert = lambda rngs: jnnx.to_int8(NnxCNN(nnx.Rngs(0)), images, rngs=rngs)
  model = convert(nnx.Rngs(int8=1))
  first, second = _kernel_grads(model, images), _kernel_grads(model, images)
  assert not np.array_equal(first, second)  # a new key every call
  np.testing.assert_array_equal(first, _kernel_grads(convert(nnx.Rngs(int8=1)), images))
  assert not np.array_equal(first, _kernel_grads(convert(nnx.Rngs(int8=2)), images))

  class HoldsRngs(nnx.Module):
    def __init__(self):
      self.net, self.rngs = NnxCNN(nnx.Rngs(0)), nnx.Rngs(int8=1)

    def __call__(self, x):
      return self.net(x)

  held = jnnx.to_int8(HoldsRngs(), images)  # the stream the model holds
  np.testing.assert_array_equal(first, nnx.grad(lambda m: (m(images) ** 2).mean())(held)['net']['grouped'][
      'kernel'][...])
  # without a stream a forward pass runs; a gradient asks for the seeds (as in Linen)
  streamless = convert(None)
  assert np.isfinite(np.asarray(streamless(images))).all()
  with pytest.raises(ValueError, match='needs the seeds.*jint8.nnx.to_int8 an nnx.Rngs'):
    _kernel_grads(streamless, images)


def test_a_restored_checkpoint_continues_bit_exactly(rng, tmp_path):
  images, labels = _images(rng, n=8), jnp.asarray(rng.integers(0, 10, 8))
  batches = [(images * (1 + 0.1 * i), labels) for i in range(5)]
  model, optimizer = _model_and_optimizer(0, images)
  for batch in batches:
    _step(model, optimizer, *batch)

  model_a, optimizer_a = _model_and_optimizer(0, images)
  for batch in batches[:2]:
    _step(model_a, optimizer_a, *batch)
  checkpointer = checkpointing.Checkpointer(tmp_path)
  checkpointer.save(2, {'model': nnx.state(model_a), 'optimizer': nnx.state(optimizer_a)})
  checkpointer.close()
  model_b, optimizer_b = _model_and_optimizer(5, images)  # other weights and rounding keys, overwritten
  _, tree = checkpointing.Checkpointer(tmp_path).restore_latest(
      {'model': nnx.state(model_b), 'optimizer': nnx.state(optimizer_b)})
  nnx.update(model_b, tree['model'])
  nnx.update(optimizer_b, tree['optimizer'])
  for batch in batches[2:]:
    _step(model_b, optimizer_b, *batch)

  plain = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  expected, got = (jax.tree.map(plain, nnx.to_pure_dict(nnx.state(m))) for m in (model, model_b))
  jax.tree.map(np.testing.assert_array_equal, expected, got)
  assert any(np.any(np.asarray(v)) for v in jax.tree.leaves(expected['grouped']['conv_general_dilated']))
  assert int(optimizer_b.step[...]) == 5


def test_dclr_scales_the_int8_kernels_through_nnx_optimizer(rng):
  images = _images(rng)
  model = jnnx.to_int8(NnxCNN(nnx.Rngs(0)), images, rngs=nnx.Rngs(int8=1))
  grads = nnx.grad(lambda m: (m(images) ** 2).mean(), argnums=nnx.DiffState(0, (nnx.Param, jnnx.Int8State)))(model)
  int8_state = jnnx.update_state(model, grads)
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  deltas = []
  alpha = 5e3  # this step's deviations are small: a steep DCLR scales visibly
  for tx in (optax.sgd(0.1), optim.int8_optimizer(optax.sgd(0.1), alpha=alpha)):
    updated = nnx.clone(model)
    nnx.Optimizer(updated, tx, wrt=nnx.Param).update(updated, grads, int8_state=int8_state)
    deltas.append(jax.tree.map(jnp.subtract, nnx.to_pure_dict(nnx.state(updated, nnx.Param)), before))
  plain, scaled = deltas
  for layer, path in (('grouped', ('grouped',)), ('blocks/0', ('blocks', 0))):
    scale = max(np.exp(-alpha * float(quant_state.layer_stats(int8_state)[layer]['grad_deviation'])), 0.1)
    assert scale < 0.99, scale
    at = lambda tree: tree[path[0]] if len(path) == 1 else tree[path[0]][path[1]]
    # (the deltas of float32 weights: exact to a rounding of the weights)
    np.testing.assert_allclose(at(scaled)['kernel'], at(plain)['kernel'] * scale, rtol=1e-3, atol=1e-7)
    np.testing.assert_array_equal(at(scaled)['bias'], at(plain)['bias'])
  for layer in ('stem', 'head'):  # float layers
    jax.tree.map(np.testing.assert_array_equal, scaled[layer], plain[layer])


class Decoder(nnx.Module):
  def __init__(self, rngs, input_dilation=1):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.up = nnx.ConvTranspose(4, 4, (3, 3), strides=(2, 2), rngs=rngs)
    self.dilated = nnx.Conv(4, 4, (3, 3), input_dilation=input_dilation, padding=((1, 1), (1, 1)), rngs=rngs)

  def __call__(self, x):
    return self.dilated(self.up(self.conv(x)))


def test_errors_name_the_layer(rng):
  images = _images(rng, n=2, size=6)
  with pytest.raises(TypeError, match='to_int8 converts an nnx.Module, got LinenCNN .a Linen module: use '
                                      'jint8.nn.Int8Model'):
    jnnx.to_int8(LinenCNN(), images)
  with pytest.raises(TypeError, match='to_int8 converts an nnx.Module, got function'):
    jnnx.to_int8(lambda x: x, images)
  with pytest.raises(ValueError, match='to_int8: up is an nnx.ConvTranspose, which jint8 cannot make int8'):
    jnnx.to_int8(Decoder(nnx.Rngs(0)), images)
  model = jnnx.to_int8(Decoder(nnx.Rngs(0)), images, policy=jnn.Int8Policy(float_layers=('^up$',)))
  assert _int8_layers(model) == {'dilated'} and model(images).shape == (2, 12, 12, 4)
  with pytest.raises(ValueError, match=r'to_int8: dilated is an nnx.Conv with input_dilation=\(2, 2\), which'):
    jnnx.to_int8(Decoder(nnx.Rngs(0), input_dilation=(2, 2)), images, policy=jnn.Int8Policy(float_layers=('up',)))
  model = jnnx.to_int8(NnxCNN(nnx.Rngs(0)), images, rngs=nnx.Rngs(int8=0))
  with pytest.raises(ValueError, match='to_int8: blocks/0 is int8 already'):
    jnnx.to_int8(model, images)
  with pytest.raises(ValueError, match="nnx.Rngs with a 'int8' stream .*got streams \\['params'\\]"):
    jnnx.to_int8(NnxCNN(nnx.Rngs(0)), images, rngs=nnx.Rngs(params=0))
  with pytest.raises(ValueError, match='keep_first_conv_float needs the model.s inputs'):
    jnnx.to_int8(NnxCNN(nnx.Rngs(0)))
  grads = nnx.grad(lambda m: (m(images) ** 2).mean())(model)  # the params alone
  with pytest.raises(ValueError, match='update_state: grads hold no Int8State'):
    jnnx.update_state(model, grads)
  with pytest.raises(NotImplementedError, match='no out_sharding'):
    model.grouped(jnp.ones((1, 4, 4, 8)), out_sharding=jax.sharding.PartitionSpec())
