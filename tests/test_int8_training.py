"""A tiny CNN trains with int8 on a few hundred real CIFAR-10 images (../shared/data/cifar10-jpg.tar.gz)."""

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
