"""Optimizers and learning-rate schedules from the config (``jint8.training.optimizers``)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from jint8.training import optimizers


def _optimizer_config(**overrides):
  config = default.get_config().optimizer
  for key, value in overrides.items():
    config[key] = value
  return config


def test_learning_rate_schedules():
  cosine = optimizers.learning_rate_schedule(_optimizer_config(), batch_size=256, steps_per_epoch=10,
                                             num_steps=100)
  for step in (0, 37, 100):
    assert cosine(step) == pytest.approx(0.2 * 0.5 * (1 + np.cos(np.pi * step / 100)), abs=1e-7)
  warm = optimizers.learning_rate_schedule(_optimizer_config(warmup_epochs=2.0, base_batch_size=0),
                                           batch_size=256, steps_per_epoch=10, num_steps=100)
  assert [float(warm(s)) for s in (0, 10)] == pytest.approx([0.0, 0.05])
  assert warm(20 + 40) == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi * 40 / 80)))
  piecewise = optimizers.learning_rate_schedule(
      _optimizer_config(schedule='piecewise', boundaries_epochs=(5, 8), base_batch_size=0), batch_size=64,
      steps_per_epoch=10, num_steps=100)
  assert [float(piecewise(s)) for s in (49, 50, 79, 80)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
  with pytest.raises(ValueError, match='config.optimizer.schedule'):
    optimizers.learning_rate_schedule(_optimizer_config(schedule='linear'), batch_size=1, steps_per_epoch=1,
                                      num_steps=1)
  with pytest.raises(ValueError, match='config.optimizer.warmup_epochs'):
    optimizers.learning_rate_schedule(_optimizer_config(warmup_epochs=20.0), batch_size=1,
                                      steps_per_epoch=10, num_steps=100)


def test_create_optimizer_is_optax_by_name_with_weight_decay():
  params = {'w': jnp.asarray(np.random.default_rng(0).normal(size=(5,)), jnp.float32)}
  grads = {'w': jnp.asarray(np.random.default_rng(1).normal(size=(5,)), jnp.float32)}
  tx = optimizers.create_optimizer(_optimizer_config(), 0.1)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Nesterov SGD from zero momentum: update = -lr * (1 + momentum) * (g + wd * w).
  expected = -0.1 * 1.9 * (np.asarray(grads['w'], np.float64) + 5e-4 * np.asarray(params['w'], np.float64))
  np.testing.assert_allclose(updates['w'], expected, rtol=1e-6)
  adam = optimizers.create_optimizer(_optimizer_config(name='adamw', kwargs={'b1': 0.8}, weight_decay=0.0), 0.1)
  assert isinstance(adam, optax.GradientTransformation)
  with pytest.raises(ValueError, match="config.optimizer.name: 'sgdd'"):
    optimizers.create_optimizer(_optimizer_config(name='sgdd'), 0.1)
  with pytest.raises(ValueError, match=r"config.optimizer.kwargs: optax.sgd takes no argument \['beta'\]"):
    optimizers.create_optimizer(_optimizer_config(kwargs={'beta': 0.9}), 0.1)
