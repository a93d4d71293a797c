"""The train state: what a step changes, how a run's state starts, and the run's streams of randomness.

Every random key of a run derives from ``TrainState.rng`` (``config.seed``) and the step, so a restored state
continues with the same randomness and one compiled step serves every seed.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from jint8.nn import STATE_COLLECTION

# Streams of randomness derived from config.seed with jax.random.fold_in.
_INIT, _ORDER, _AUGMENT, _DROPOUT, _ROUNDING = range(5)


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: the model's variables, the optimizer state and the step count.

  ``int8_state`` is ``{}`` for fp32 / bf16. ``rng`` is the run's raw PRNG key: per-step keys derive from it
  and ``step``, so a restored state continues with the same randomness.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  int8_state: Any
  opt_state: Any
  rng: jax.Array

  def variables(self, params=None, int8_state=None) -> dict[str, Any]:
    """The Flax variables of the model (with ``params`` / ``int8_state`` replaced when given)."""
    variables = {'params': self.params if params is None else params, 'batch_stats': self.batch_stats}
    int8_state = self.int8_state if int8_state is None else int8_state
    if int8_state:
      variables[STATE_COLLECTION] = int8_state
    return variables


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...], seed: int):

  def init() -> TrainState:
    rng = jax.random.PRNGKey(seed)
    init_rng = jax.random.fold_in(rng, _INIT)
    variables = model.init({'params': init_rng, 'dropout': init_rng},
                           jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params, int8_state = variables['params'], variables.get(STATE_COLLECTION, {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), int8_state=int8_state,
                      opt_state=tx.init(params), rng=rng)

  return init


def initial_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
                  seed: int, state_sharding: jax.sharding.Sharding) -> TrainState:
  """Initialises the model and the optimizer, placed with ``state_sharding``."""
  return jax.jit(_init_fn(model, tx, image_shape, seed), out_shardings=state_sharding)()


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
                   seed: int, state_sharding: jax.sharding.Sharding) -> TrainState:
  """The shapes, dtypes and shardings of ``initial_state``, computing nothing (a restore target)."""
  shapes = jax.eval_shape(_init_fn(model, tx, image_shape, seed))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=state_sharding), shapes)


def _step_key(state: TrainState, stream: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(state.rng, stream), state.step)


def augment_key(state: TrainState) -> jax.Array:
  """The data-augmentation key of ``state``'s step."""
  return _step_key(state, _AUGMENT)


def dropout_key(state: TrainState) -> jax.Array:
  """The dropout key of ``state``'s step."""
  return _step_key(state, _DROPOUT)


def order_key(state: TrainState) -> jax.Array:
  """The key that orders the training examples, with the epoch folded in (``input_pipeline.epoch_order``)."""
  return jax.random.fold_in(state.rng, _ORDER)


def rounding_key(state: TrainState) -> jax.Array:
  """The int8 ops' stochastic-rounding key of ``state``'s step (the ``jint8.nn.ROUNDING_RNG`` stream), derived
  from ``state.rng`` at run time: one compiled step for every seed. An ``rbg`` key, as ``jint8.nn`` wants."""
  rng = _step_key(state, _ROUNDING)
  return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl='rbg')
