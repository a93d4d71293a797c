"""The train state's streams of randomness (``jint8.training.state``)."""

import jax
import jax.numpy as jnp
import numpy as np

from jint8.training.state import TrainState, augment_key, order_key, rounding_key


def test_randomness_streams_are_distinct_and_per_step(rng):
  """Order, augmentation and rounding keys (shared by every task) differ; the per-step ones change each step."""
  state = TrainState(step=jnp.asarray(int(rng.integers(1000))), params={}, batch_stats={}, int8_state={},
                             opt_state=(), rng=jax.random.PRNGKey(int(rng.integers(2 ** 31))))
  later = state.replace(step=state.step + 1)
  keys = [order_key(state), augment_key(state), augment_key(later),
          jax.random.key_data(rounding_key(state))[:2], jax.random.key_data(rounding_key(later))[:2]]
  keys = {tuple(np.asarray(k).tolist()) for k in keys}  # two uint32 words each
  assert len(keys) == 5
  np.testing.assert_array_equal(order_key(state), order_key(later))
