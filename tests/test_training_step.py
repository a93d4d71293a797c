"""The shared parts of a train step (``jint8.training.step``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from jint8 import classification
from jint8.nn import STATE_COLLECTION, Int8Model
from jint8.training import precision
from jint8.training.state import TrainState
from jint8.training.step import bind_train_step
from tiny import TinyCNN


@pytest.mark.parametrize('api', ['linen', 'nnx'])
@pytest.mark.parametrize('precision_name,traced', [('int8', [True, False]), ('fp32', [None])])
def test_bind_train_step_traces_int8_steps_with_and_without_the_search(rng, api, precision_name, traced):
  config = tiny.config(precision=precision_name, api=api)
  images = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  model = precision.apply_precision(classification.create_model(config, 3) if api == 'nnx' else TinyCNN(num_classes=3),
                                    config)
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  state = TrainState(step=jnp.int32(0), params=variables['params'], batch_stats=variables['batch_stats'],
                             int8_state=variables.get(STATE_COLLECTION, {}), opt_state=(), rng=jax.random.PRNGKey(1))
  seen = []  # Int8Config.searches of each traced model (None: a float model)

  def fake_step(state, x, *, model, scale):
    seen.append(model.config.searches if isinstance(model, Int8Model) else None)
    return state, x * scale

  _, out = jax.jit(bind_train_step(fake_step, config, model, scale=2.0))(state, images)
  assert seen == traced
  np.testing.assert_array_equal(out, images * 2.0)
