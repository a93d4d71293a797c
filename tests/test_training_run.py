"""A run's shared parts (``jint8.training.run``): the framework's config keys and the optimizer it builds. The
tasks' end-to-end runs are in test_train.py (classification) and test_detection_model.py (detection)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny
from jint8.training import optimizers, run


@pytest.mark.parametrize('key, value, message', [
    ('task', 'detection', "config.task: the classification trainer cannot train 'detection'"),
    ('grad_clip_norm', -1.0, 'config.grad_clip_norm must be >= 0'),
    ('num_train_steps', -1, 'config.num_train_steps must be >= 0'),
    ('keep_checkpoints', 0, 'config.keep_checkpoints must be >= 1'),
])
def test_the_framework_keys_are_checked_by_name(key, value, message):
  run.validate_config(tiny.config(), 'classification')
  with pytest.raises(ValueError, match=message):
    run.validate_config(tiny.config(**{key: value}), 'classification')


def test_the_optimizer_clips_the_global_gradient_norm_first(rng):
  params = {'w': jnp.asarray(rng.normal(size=(5,)), jnp.float32), 'b': jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  grads = {k: jnp.asarray(10 * rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
  norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in grads.values()))
  for clip, scale in ((0.0, 1.0), (1.0, 1.0 / norm), (2 * norm, 1.0)):
    config = tiny.config(precision='fp32', grad_clip_norm=clip)
    tx = run.create_optimizer(config, 0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    inner = optimizers.create_optimizer(config.optimizer, 0.1)
    expected, _ = inner.update(optax.tree.scale(scale, grads), inner.init(params), params)
    for k in params:
      np.testing.assert_allclose(updates[k], expected[k], rtol=1e-5)
