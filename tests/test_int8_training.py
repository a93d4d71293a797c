"""A tiny CNN trains with int8 on a few hundred real CIFAR-10 images (../shared/data/cifar10-jpg.tar.gz); a residual
block whose gradient starts at zero does not stay dead."""

import io
import tarfile

import flax.linen as nn
import jax
import numpy as np
import optax
from PIL import Image

from jint8 import nn as jnn
from jint8 import optim
from jint8 import state as quant_state
from jint8.datasets import paths

CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def read_cifar_images(per_class: int, split: str = 'test'):
  """The first ``per_class`` images of each class of ``split``, as uint8 [N, 32, 32, 3] and labels."""
  images, labels = [], []
  counts = dict.fromkeys(CLASSES, 0)
  with tarfile.open(paths.find_archive('cifar10-jpg.tar.gz')) as tar:
    for member in tar:
      parts = member.name.split('/')
      if len(parts) == 4 and parts[1] == split and member.isfile() and counts[parts[2]] < per_class:
        counts[parts[2]] += 1
        images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert('RGB')))
        labels.append(CLASSES.index(parts[2]))
      if min(counts.values()) == per_class:
        break
  return np.stack(images), np.asarray(labels)


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(32, (3, 3), feature_group_count=32)(x))
    x = nn.relu(nn.Conv(64, (1, 1), strides=2)(x))
    return nn.Dense(10)(x.mean((1, 2)))


def test_tiny_cnn_trains_with_int8_on_real_cifar():
  images, labels = read_cifar_images(per_class=20)
  assert images.shape == (200, 32, 32, 3) and set(labels) == set(range(10))
  x = (images.astype(np.float32) / 255.0 - 0.5) / 0.25
  model = jnn.Int8Model(TinyCNN())
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:2])
  params, int8_state = variables['params'], variables[jnn.STATE_COLLECTION]
  tx = optim.int8_optimizer(optax.adam(3e-3))
  opt_state = tx.init(params)

  def train_step(model, params, int8_state, opt_state, xb, yb, key):
    def loss_fn(params, int8_state):
      logits = model.apply({'params': params, jnn.STATE_COLLECTION: int8_state}, xb, rngs={jnn.ROUNDING_RNG: key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    loss, (g_params, g_state) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, int8_state)
    int8_state = quant_state.update(int8_state, g_state)
    updates, opt_state = tx.update(g_params, opt_state, params, int8_state=int8_state)
    return optax.apply_updates(params, updates), int8_state, opt_state, loss

  @jax.jit
  def step(k, params, int8_state, opt_state, xb, yb):
    return jnn.search_cond(train_step, model, int8_state, k, 4, params, int8_state, opt_state, xb, yb,
                           jax.random.key(k))

  rng = np.random.default_rng(0)
  losses, clips = [], []
  for epoch in range(14):
    order = rng.permutation(len(x))
    for i in range(0, len(x), 100):
      idx = order[i:i + 100]
      params, int8_state, opt_state, loss = step(len(losses), params, int8_state, opt_state, x[idx], labels[idx])
      losses.append(float(loss))
      clips.append({k: float(v['grad_clip']) for k, v in quant_state.layer_stats(int8_state).items()})
  assert np.isfinite(losses).all()
  assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses
  # Every int8 layer got a clip value, re-searched only every 4 steps (search_cond).
  assert set(clips[0]) == {'model/Conv_1', 'model/Conv_2', 'model/Conv_3'}
  for layer in clips[0]:
    series = [c[layer] for c in clips]
    assert all(v > 0 for v in series)
    changed = [i for i in range(1, len(series)) if series[i] != series[i - 1]]
    assert changed and all(i % 4 == 0 for i in changed), (layer, changed)


class ZeroInitResidualNet(nn.Module):
  """A stem, one residual block whose last BatchNorm scale starts at zero (Flax's ImageNet ResNet pattern), a head."""

  @nn.compact
  def __call__(self, x):
    norm = lambda **kw: nn.BatchNorm(use_running_average=False, momentum=0.9, **kw)
    x = nn.relu(norm()(nn.Conv(8, (3, 3), use_bias=False)(x)))
    y = nn.relu(norm()(nn.Conv(8, (3, 3), use_bias=False, name='conv_a')(x)))
    y = norm(scale_init=nn.initializers.zeros, name='last_norm')(nn.Conv(8, (3, 3), use_bias=False, name='conv_b')(y))
    return nn.Dense(10)(nn.relu(x + y).mean((1, 2)))


def test_a_block_whose_gradient_starts_at_zero_gets_a_clip_and_passes_gradients_on():
  # Step 0's gradient into the block is exactly zero (its last BN scale is 0): its search finds no clip, so the
  # layers search again on the next steps, not 100 steps later at the default period, and once the BN scale has
  # moved the block's convs have clips and the gradient reaches the conv upstream of conv_b's dgrad.
  rng = np.random.default_rng(0)
  images = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 10, 16)
  model = jnn.Int8Model(ZeroInitResidualNet())
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  params, batch_stats = variables['params'], variables['batch_stats']
  int8_state = variables[jnn.STATE_COLLECTION]
  tx = optim.int8_optimizer(optax.sgd(0.1, momentum=0.9))
  opt_state = tx.init(params)

  def train_step(model, params, batch_stats, int8_state, opt_state, key):
    def loss_fn(params, int8_state):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats, jnn.STATE_COLLECTION: int8_state},
                                    images, rngs={jnn.ROUNDING_RNG: key}, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates['batch_stats']

    (g_params, g_state), batch_stats = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(params, int8_state)
    int8_state = quant_state.update(int8_state, g_state)
    updates, opt_state = tx.update(g_params, opt_state, params, int8_state=int8_state)
    return optax.apply_updates(params, updates), batch_stats, int8_state, opt_state, g_params

  @jax.jit
  def step(k, params, batch_stats, int8_state, opt_state):
    return jnn.search_cond(train_step, model, int8_state, k, 100, params, batch_stats, int8_state, opt_state,
                           jax.random.key(k))

  clip = lambda layer: float(int8_state['model'][layer]['Int8ConvGeneralDilated_0']['grad_clip'])
  for k in range(3):
    params, batch_stats, int8_state, opt_state, grads = step(k, params, batch_stats, int8_state, opt_state)
    if k == 0:  # all-zero gradients: no clip (not the minimum clip, which would hold for 99 steps)
      assert clip('conv_a') == clip('conv_b') == 0.0
      assert not np.any(grads['model']['conv_a']['kernel']) and np.any(grads['model']['last_norm']['scale'])
  assert clip('conv_a') > 0 and clip('conv_b') > 0
  assert np.any(params['model']['last_norm']['scale'])
  assert np.all(np.isfinite(grads['model']['conv_a']['kernel'])) and np.any(grads['model']['conv_a']['kernel'])
