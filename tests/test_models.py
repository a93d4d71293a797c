"""Tests of the model zoo: shapes, parameter counts, BatchNorm modes, depthwise convs, backbone strides."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax import traverse_util

from jint8.models import MODEL_NAMES, ResNetBackbone, ResNetCifar, create_model, create_nnx_model
from jint8.models.common import conv_kernel_init
from jint8.models.mobilenet_v2 import MobileNetV2

# Models run for real, one per block family, at tiny widths and sizes (XLA:CPU compiles them quickly).
SMALL = {
    'resnet20': (dict(width=0.25), 8),
    'resnet50': (dict(width=0.0625), 32),
    'mobilenet_v2': (dict(width=0.25), 8),
    'vgg16_bn': (dict(width=0.0625), 32),
    'inception_v3_cifar': (dict(width=0.0625), 16),
}
# A real init compiles a random-number kernel per parameter shape, which takes seconds each on a CPU; tests
# that only need some well-scaled variables draw them with numpy, and keys use the cheaper "rbg" generator.
_KEY = jax.random.key(0, impl='rbg')


def _images(seed, n, size):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, 3)), jnp.float32)


def _random_variables(model, x, seed=0):
  """Random variables of the shapes ``model.init`` gives: He-scaled kernels and random BN statistics."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), _KEY, x)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(size=leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1]))
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape)
    return rng.normal(0, 0.1, leaf.shape)

  return jax.tree.map(jnp.float32, jax.tree_util.tree_map_with_path(draw, shapes))


def _num_params(model, size):
  shapes = jax.eval_shape(functools.partial(model.init, train=False), _KEY, jnp.zeros((1, size, size, 3)))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes['params']))


def _conv_kernels(params):
  return {path: k for path, k in traverse_util.flatten_dict(params).items()
          if path[-1] == 'kernel' and k.ndim == 4}


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_output_shapes_and_dtypes(name):
  size = 64 if name in ('resnet18', 'resnet50') else 32
  model = create_model(name, num_classes=10, dtype=jnp.bfloat16)
  logits, variables = jax.eval_shape(functools.partial(model.init_with_output, train=False), _KEY,
                                     jnp.zeros((2, size, size, 3)))
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert set(variables) == {'params', 'batch_stats'}
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_conv_kernels_use_he_fan_out_init():
  kernel = conv_kernel_init(_KEY, (3, 3, 32, 256))
  fan_out = 3 * 3 * 256
  assert abs(float(jnp.std(kernel)) / np.sqrt(2 / fan_out) - 1) < 0.03
  assert abs(float(jnp.mean(kernel))) < 0.02 * np.sqrt(2 / fan_out)


# Option-A counts from He et al. / the common reference code, plus option B's two projection shortcuts
# (1x1 conv + BN gamma, beta): 16 -> 32 and 32 -> 64 channels.
_PROJECTIONS_B = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


@pytest.mark.parametrize('name, num_classes, size, expected', [
    ('resnet20', 10, 32, 269_722 + _PROJECTIONS_B),
    ('resnet56', 10, 32, 853_018 + _PROJECTIONS_B),
    ('resnet18', 1000, 224, 11_689_512),  # torchvision
    ('resnet50', 1000, 224, 25_557_032),  # torchvision
    ('mobilenet_v2', 1000, 32, 3_504_872),  # torchvision (strides do not change the count)
    # 13 conv layers without bias + 13 BN (gamma, beta) + Dense 512 -> 10.
    ('vgg16_bn', 10, 32, 14_710_464 + 2 * 4224 + 5130),
    # torchvision inception_v3 (27,161,264) less its aux classifier (3,326,696), head 2048 -> 10 classes.
    ('inception_v3_cifar', 10, 32, 27_161_264 - 3_326_696 - 2048 * 990 - 990),
])
def test_parameter_counts_match_reference(name, num_classes, size, expected):
  assert _num_params(create_model(name, num_classes=num_classes), size) == expected


@pytest.mark.parametrize('name', SMALL)
def test_forward_in_train_mode(name):
  kwargs, size = SMALL[name]
  model = create_model(name, num_classes=7, **kwargs)
  x = _images(1, 4, size)
  variables = _random_variables(model, x)
  logits, new_state = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, x)
  assert logits.shape == (4, 7) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Every BN updates its running variance (no batch variance equals the random running one).
  old, new = (traverse_util.flatten_dict(v['batch_stats']) for v in (variables, new_state))
  assert old.keys() == new.keys()
  assert all(not np.allclose(old[k], new[k]) for k in old if k[-1] == 'var')


def test_batchnorm_of_the_stem_matches_reference():
  """Train mode: batch statistics, running statistics updated with momentum 0.9; eval mode: running ones."""
  model = ResNetCifar(num_classes=10, depth=20, width=0.25)
  x = _images(2, 3, 8)
  variables = _random_variables(model, x)
  kernel = np.asarray(variables['params']['ConvBN_0']['Conv_0']['kernel'], np.float64)
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = sum(np.einsum('nhwc,cf->nhwf', xp[:, i:i + 8, j:j + 8], kernel[i, j])
             for i in range(3) for j in range(3))
  batch_mean, batch_var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
  bn = {k: np.asarray(v, np.float64) for k, v in variables['params']['ConvBN_0']['BatchNorm_0'].items()}
  running = {k: np.asarray(v, np.float64)
             for k, v in variables['batch_stats']['ConvBN_0']['BatchNorm_0'].items()}

  @jax.jit
  def stem_outputs(variables, x):
    outputs = []
    for train in (True, False):
      _, state = model.apply(variables, x, train=train, capture_intermediates=True,
                             mutable=['batch_stats', 'intermediates'])
      outputs.append((state['intermediates']['ConvBN_0']['__call__'][0], state['batch_stats']))
    return outputs

  def reference(mean, var):
    return np.maximum(bn['scale'] * (conv - mean) / np.sqrt(var + 1e-5) + bn['bias'], 0)

  (train_out, train_stats), (eval_out, eval_stats) = stem_outputs(variables, x)
  np.testing.assert_allclose(train_out, reference(batch_mean, batch_var), atol=1e-4)
  stem_stats = train_stats['ConvBN_0']['BatchNorm_0']
  np.testing.assert_allclose(stem_stats['mean'], 0.9 * running['mean'] + 0.1 * batch_mean, atol=1e-5)
  np.testing.assert_allclose(stem_stats['var'], 0.9 * running['var'] + 0.1 * batch_var, rtol=1e-5)
  np.testing.assert_allclose(eval_out, reference(running['mean'], running['var']), atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, eval_stats, variables['batch_stats'])


def test_mobilenet_v2_convs_are_depthwise():
  convs = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == '__call__':
      m = context.module
      convs.append((tuple(m.kernel_size), m.feature_group_count, args[0].shape[-1], m.features))
    return next_fun(*args, **kwargs)

  model = MobileNetV2(num_classes=10)
  with nn.intercept_methods(record):
    shapes = jax.eval_shape(functools.partial(model.init, train=False), _KEY, jnp.zeros((1, 32, 32, 3)))
  spatial = [c for c in convs if c[0] == (3, 3)][1:]  # all 3x3 convs after the stem
  assert len(spatial) == 17  # one per inverted residual block
  for _, groups, in_channels, out_channels in spatial:
    assert groups == in_channels == out_channels
  depthwise_kernels = [k for k in _conv_kernels(shapes['params']).values() if k.shape[:3] == (3, 3, 1)]
  assert len(depthwise_kernels) == 17


def test_config_keeps_the_depthwise_convs_of_mobilenet_v2_float():
  from configs import default  # pylint: disable=import-outside-toplevel
  from jint8 import nn as jnn  # pylint: disable=import-outside-toplevel
  from jint8.training import precision  # pylint: disable=import-outside-toplevel

  config = default.get_config()
  config.precision = 'int8'
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  int8_convs = {}
  for keep in (False, True):
    config.int8.keep_depthwise_float = keep
    model = precision.apply_precision(MobileNetV2(num_classes=10), config)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), _KEY, x)
    state = traverse_util.flatten_dict(shapes[jnn.STATE_COLLECTION])
    int8_convs[keep] = sum(path[-1] == 'grad_clip' for path in state)
  # 52 convs: the stem (float), 17 depthwise, 16 expansions, 17 projections, the last 1x1.
  assert int8_convs == {False: 51, True: 34}


@pytest.mark.parametrize('depth, channels', [(18, (128, 256, 512)), (50, (512, 1024, 2048))])
def test_backbone_feature_strides(depth, channels):
  x = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
  backbone = ResNetBackbone(depth=depth)
  features, _ = jax.eval_shape(functools.partial(backbone.init_with_output, train=False), _KEY, x)
  assert list(features) == ['C3', 'C4', 'C5']
  for (level, stride), c in zip([('C3', 8), ('C4', 16), ('C5', 32)], channels):
    assert features[level].shape == (2, 64 // stride, 96 // stride, c)


def test_bad_input_raises_clear_errors():
  with pytest.raises(ValueError, match='unknown model .*resnet21.*resnet20, resnet56, resnet18'):
    create_model('resnet21', num_classes=10)
  x = jnp.ones((2, 8, 8, 3))
  with pytest.raises(ValueError, match='6n \\+ 2'):
    ResNetCifar(num_classes=10, depth=21).init(_KEY, x)
  with pytest.raises(ValueError, match='width multiplier must be positive'):
    create_model('resnet20', num_classes=10, width=0.0).init(_KEY, x)
  with pytest.raises(ValueError, match='depth must be one of'):
    ResNetBackbone(depth=42).init(_KEY, x)
  with pytest.raises(ValueError, match=r'\(N, H, W, C\), got shape \(8, 8, 3\)'):
    create_model('vgg16_bn', num_classes=10).init(_KEY, x[0])


def test_int8_model_converts_every_conv_but_the_first():
  from jint8 import nn as jnn  # pylint: disable=import-outside-toplevel

  model = create_model('resnet20', num_classes=10, width=0.25)
  int8_model = jnn.Int8Model(model)
  x = _images(3, 4, 8)
  variables = jax.jit(functools.partial(int8_model.init, train=False))(_KEY, x)
  kernels = _conv_kernels(variables['params']['model'])
  assert len(kernels) == 21  # stem, 9 blocks x 2, two projection shortcuts
  state_layers = {path[:-1] for path in traverse_util.flatten_dict(variables[jnn.STATE_COLLECTION])
                  if path[-1] == 'grad_clip'}
  assert len(state_layers) == len(kernels) - 1
  assert not any(path[1] == 'ConvBN_0' for path in state_layers)  # the stem stays float

  @jax.jit
  def outputs(variables, x):
    train_logits, _ = int8_model.apply(variables, x, train=True, mutable=['batch_stats'])
    float_variables = {c: variables[c]['model'] for c in ('params', 'batch_stats')}
    return (train_logits, int8_model.apply(variables, x, train=False),
            model.apply(float_variables, x, train=False))

  train_logits, int8_logits, float_logits = outputs(variables, x)
  assert train_logits.shape == (4, 10) and np.all(np.isfinite(train_logits))
  # The int8 forward stays close to the float model run on the same variables.
  error = np.linalg.norm(int8_logits - float_logits) / np.linalg.norm(float_logits)
  assert 0 < error < 0.1


def _nnx_path(linen_path):
  """The NNX ResNetCifar's name of a Linen ResNetCifar variable: ConvBN_0/Conv_0 is stem/conv, BasicBlock_3/ConvBN_1
  is blocks/3/conv2, Dense_0 is classifier."""
  renames = {'ConvBN_0': 'stem', 'Dense_0': 'classifier', 'Conv_0': 'conv', 'BatchNorm_0': 'bn'}
  path = []
  for i, name in enumerate(linen_path):
    if name.startswith('BasicBlock_'):
      path += ['blocks', int(name.split('_')[1])]
    elif i > 0 and linen_path[i - 1].startswith('BasicBlock_') and name.startswith('ConvBN_'):
      path.append(f'conv{int(name.split("_")[1]) + 1}')
    else:
      path.append(renames.get(name, name))
  return tuple(path)


@pytest.mark.parametrize('train', [True, False])
def test_the_nnx_resnet_cifar_is_the_linen_network(train):
  linen = create_model('resnet20', num_classes=7, width=0.25)
  x = _images(2, 4, 8)
  variables = _random_variables(linen, x)
  model = create_nnx_model('resnet20', num_classes=7, width=0.25, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param, nnx.BatchStat)
  pure = [nnx.to_pure_dict(s) for s in state]
  for collection, tree in zip(('params', 'batch_stats'), pure):
    flat = traverse_util.flatten_dict(variables[collection])
    assert len(flat) == len(jax.tree.leaves(tree))
    for linen_path, value in flat.items():
      node = tree
      for key in _nnx_path(linen_path)[:-1]:
        node = node[key]
      assert node[_nnx_path(linen_path)[-1]].shape == value.shape, linen_path
      node[_nnx_path(linen_path)[-1]] = value
  for s, p in zip(state, pure):
    nnx.replace_by_pure_dict(s, p)
  nnx.update(model, *state)
  expected = linen.apply(variables, x, train=train, mutable=['batch_stats'])[0]
  np.testing.assert_allclose(model(x, train), expected, rtol=1e-5, atol=1e-5)
