"""Tests of the FCOS detector: output layout, int8 conversion with a head shared across pyramid levels
(mean semantics of its quantization state), a loss that falls on real BCCD images, and the trainer end to end
(train, COCO evaluation, PNG, checkpoint restore)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from PIL import Image

from configs import detector
from jint8 import optim, sharding
from jint8 import state as quant_state
from jint8.detection import data, dataset, fcos, losses, targets, trainer
from jint8.detection.trainer import model_strides
from jint8.models import ResNetBackbone
from jint8.nn import ROUNDING_RNG, STATE_COLLECTION, Int8Config, Int8Model, Int8Policy
from jint8.training import metrics
from jint8.training.state import initial_state


class TinyBackbone(nn.Module):
  """Three strided convs: stride-8, 16 and 32 maps with few channels, fast on a CPU."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Conv(8, (3, 3), strides=8)(x))
    c3 = x
    c4 = nn.relu(nn.Conv(8, (3, 3), strides=2)(c3))
    c5 = nn.relu(nn.Conv(8, (3, 3), strides=2)(c4))
    return c3, c4, c5


def _tiny_fcos(**kwargs):
  return fcos.FCOS(TinyBackbone(), num_classes=3, features=8, head_convs=1, groups=4, **kwargs)


def test_output_layout():
  for model, (height, width) in ((_tiny_fcos(extra_levels=2), (128, 128)),
                                 (fcos.FCOS(ResNetBackbone(depth=18, width=0.125), num_classes=3, features=8,
                                            head_convs=1, groups=4), (64, 96))):
    images = jax.ShapeDtypeStruct((2, height, width, 3), jnp.uint8)
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], images)
    n = len(targets.locations((height, width), model.strides)[0])
    assert out['logits'].shape == (2, n, 3) and out['distances'].shape == (2, n, 4)
    assert out['centerness'].shape == (2, n)
  assert _tiny_fcos(extra_levels=2).strides == (8, 16, 32, 64, 128)
  with pytest.raises(ValueError, match='RGB images'):
    jax.eval_shape(lambda x: _tiny_fcos().init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 64, 64), jnp.uint8))


def test_the_head_has_a_logit_per_class_of_the_data():
  config = detector.get_config()
  config.model_kwargs.width, config.fcos.features, config.fcos.groups = 0.125, 8, 4
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8)
  for num_classes in (1, 7):
    model = trainer.create_model(config, num_classes)
    out = jax.eval_shape(lambda x, m=model: m.init_with_output(jax.random.key(0), x)[0], images)
    assert out['logits'].shape[-1] == num_classes


# Fewer DSGC candidates than the default: the same semantics, a smaller graph to compile on a CPU.
_INT8 = Int8Config(num_candidates=8, refine=2)


class _HeadOnLevels(nn.Module):
  """The FCOS head (its prediction convs only: fast to compile) shared over the given levels."""
  levels: tuple[int, ...]

  @nn.compact
  def __call__(self, inputs):
    head = fcos.FCOSHead(num_classes=3, features=8, num_convs=0, name='head')
    return [head(inputs[i]) for i in self.levels]


def _head_int8_model(levels):
  # Round to nearest: the bookkeeping under test does not depend on the rounding, and it compiles faster.
  config = dataclasses.replace(_INT8, stochastic_rounding=False)
  return Int8Model(_HeadOnLevels(levels), config=config, policy=Int8Policy(keep_first_conv_float=False))


def _head_state_after_one_step(levels, variables, inputs, weights):
  """The head's int8_state after one step on the loss sum_levels sum(outputs * weights)."""
  model = _head_int8_model(levels)

  @jax.jit
  def step(params, int8_state):
    def loss_fn(int8_state):
      outputs = model.apply({'params': params, STATE_COLLECTION: int8_state}, inputs)
      return sum(jnp.sum(o * weights[i][j]) for i, level in zip(levels, outputs) for j, o in enumerate(level))
    return quant_state.update(int8_state, jax.grad(loss_fn)(int8_state))

  return traverse_util.flatten_dict(step(variables['params'], variables[STATE_COLLECTION]), sep='/')


def test_shared_head_state_has_one_use_per_level_and_the_mean_clip(fast_compiles):
  sizes = ((8, 8), (4, 4))
  keys = jax.random.split(jax.random.key(7), 2 * len(sizes))
  inputs = [jax.random.normal(keys[i], (2, *s, 8)) for i, s in enumerate(sizes)]
  weights = [[jax.random.normal(jax.random.fold_in(keys[len(sizes) + i], j), (2, *s, c))
              for j, c in enumerate((3, 4, 1))] for i, s in enumerate(sizes)]
  # The same layers, hence the same variables, whichever levels the head runs on.
  variables = jax.jit(_head_int8_model((0, 1)).init)(jax.random.key(0), inputs)
  shared = _head_state_after_one_step((0, 1), variables, inputs, weights)
  single = [_head_state_after_one_step((i,), variables, inputs, weights) for i in range(2)]
  layers = sorted({k.rsplit('/', 1)[0] for k in shared})
  assert len(layers) == 3  # class, box and centerness predictions
  for layer in layers:
    assert shared[f'{layer}/uses'] == 2 and all(s[f'{layer}/uses'] == 1 for s in single)
    for field in ('grad_clip', 'grad_deviation', 'input_clip'):
      per_level = [float(s[f'{layer}/{field}']) for s in single]
      assert per_level[0] != per_level[1], (layer, field)  # the levels really differ
      np.testing.assert_allclose(shared[f'{layer}/{field}'], np.mean(per_level), rtol=1e-5,
                                 err_msg=f'{layer}/{field}')


def test_int8_loss_falls_on_real_images(tmp_path_factory, fast_compiles):
  config = detector.get_config().dataset
  config.data_dir = str(tmp_path_factory.getbasetemp() / 'tfds')
  split = data.read_split(dataset.load(config).split('train'), (96, 128), 32, max_examples=4)
  model = _tiny_fcos()
  loc = targets.Locations((96, 128), model.strides, (12, 24), center_radius=1.5)
  # The FPN stays float here only to keep the compile short on a CPU.
  model = Int8Model(model, config=_INT8, policy=Int8Policy(float_layers=('^fpn/',)))
  images = jnp.asarray(split['images'])
  goal = loc.targets(jnp.asarray(split['boxes']), jnp.asarray(split['labels']), jnp.asarray(split['valid']))
  for stride in model_strides(model):  # every level has positives
    assert int(jnp.sum((goal['labels'] >= 0) & (loc.point_strides == stride))) > 4
  out, variables = jax.jit(model.init_with_output)(jax.random.key(0), images)
  assert np.all(np.asarray(out['distances']) > 0)
  # The class bias starts at the focal-loss prior: sigmoid(logit) ~ 0.01 everywhere.
  np.testing.assert_allclose(jax.nn.sigmoid(out['logits']).mean(), 0.01, rtol=0.2)
  params, int8_state = variables['params'], variables[STATE_COLLECTION]
  tx = optim.int8_optimizer(optax.adam(1e-2))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, int8_state, opt_state, key):
    def loss_fn(params, int8_state):
      outputs = model.apply({'params': params, STATE_COLLECTION: int8_state}, images, rngs={ROUNDING_RNG: key})
      return losses.fcos_loss(outputs, goal)[0]
    loss, (g_params, g_state) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, int8_state)
    int8_state = quant_state.update(int8_state, g_state)
    updates, opt_state = tx.update(g_params, opt_state, params, int8_state=int8_state)
    return optax.apply_updates(params, updates), int8_state, opt_state, loss

  history = []
  for k in range(15):
    params, int8_state, opt_state, loss = step(params, int8_state, opt_state, jax.random.key(k))
    history.append(float(loss))
  assert np.all(np.isfinite(history))
  assert np.mean(history[-3:]) < 0.8 * np.mean(history[:3]), history
  # The shared head ran once per level, every other int8 layer once.
  uses = {k[:-len('/uses')]: int(v) for k, v in
          traverse_util.flatten_dict(int8_state, sep='/').items() if k.endswith('/uses')}
  head = {k for k in uses if '/head/' in k}
  assert len(head) == 5 and {uses[k] for k in head} == {3}
  assert {v for k, v in uses.items() if k not in head} == {1} and len(uses) == 5 + 2  # + 2 backbone convs


def test_int8_train_step_rounds_with_the_seed_of_the_state(rng, fast_compiles):
  # Only the backbone convs are int8 (the first stays float): a short compile on a CPU.
  model = Int8Model(_tiny_fcos(), config=_INT8, policy=Int8Policy(float_layers=('^fpn/', '^head/')))
  boxes = np.sort(rng.uniform(0, 64, (4, 3, 2, 2)), axis=2).reshape(4, 3, 4)
  split = data.Split(images=jnp.asarray(rng.integers(0, 256, (4, 64, 64, 3)), jnp.uint8),
                     boxes=jnp.asarray(boxes, jnp.float32), labels=jnp.asarray(rng.integers(0, 3, (4, 3)), jnp.int32),
                     valid=jnp.asarray(rng.uniform(size=(4, 3)) < 0.8))
  tx = optim.int8_optimizer(optax.sgd(0.1))
  replicated = sharding.replicated(sharding.data_mesh())
  state = initial_state(model, tx, (64, 64, 3), 0, replicated)
  step = jax.jit(functools.partial(
      trainer.train_step, model=model, tx=tx, locations=targets.Locations((64, 64), model_strides(model), (12, 24)),
      batch_size=4, batch_sharding=replicated, flips=(), focal_alpha=0.25, focal_gamma=2.0))
  # no flips: the state's rng reaches only the stochastic rounding
  order = jnp.asarray(rng.permutation(4), jnp.int32)
  first, again, other = (step(state.replace(rng=jax.random.PRNGKey(seed)), split, order, 0)[0].params
                         for seed in (1, 1, 2))
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, first, other)))


def test_train_and_evaluate_end_to_end(tmp_path, fast_compiles):
  config = detector.get_config()
  config.precision = 'fp32'
  config.dataset.data_dir = str(tmp_path / 'tfds')
  config.dataset.image_size = (64, 96)
  config.dataset.max_train_examples = 8
  config.dataset.max_test_examples = 6
  config.fcos.size_boundaries = (12, 24)
  config.batch_size = config.eval_batch_size = 4
  config.num_train_steps = 4
  config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  config.optimizer.warmup_epochs = 0.0
  config.num_visualize = 2
  workdir = tmp_path / 'run'
  final = trainer.train_and_evaluate(config, workdir, model=_tiny_fcos())
  assert set(final) == {'mAP', 'mAP50', 'mAP75', 'AP/RBC', 'AP/WBC', 'AP/Platelets'}
  assert all(0 <= v <= 1 for v in final.values())
  records = metrics.read_records(workdir)
  assert [(r['step'], r['split']) for r in records] == [(2, 'train'), (2, 'val'), (4, 'train'), (4, 'val')]
  assert all(np.isfinite(r['loss']) and r['positives'] > 0 for r in records if r['split'] == 'train')
  with Image.open(workdir / 'detections.png') as png:
    assert png.format == 'PNG'
  assert (workdir / 'curves.png').exists()
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4']
  # A finished run restores its last checkpoint and only evaluates it again.
  assert trainer.train_and_evaluate(config, workdir, model=_tiny_fcos()) == final
  assert len(metrics.read_records(workdir)) == 4
  config.dataset.flips = ('sideways',)
  with pytest.raises(ValueError, match='config.dataset.flips'):
    trainer.train_and_evaluate(config, workdir, model=_tiny_fcos())
