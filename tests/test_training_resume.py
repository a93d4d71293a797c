"""Checkpoints of the train state and the data position (``jint8.training.resume``)."""

import jax
import numpy as np
import optax

import tiny
from jint8 import classification, sharding
from jint8.training import checkpointing, precision
from jint8.training.resume import checkpoint_tree, from_checkpoint_tree
from jint8.training.state import abstract_state, initial_state


def test_fp32_state_round_trips_through_a_checkpoint(tmp_path):
  config = tiny.config(precision='fp32')
  model = classification.create_model(tiny.config(model='tiny:TinyCNN', precision='fp32'), 10)
  tx = precision.wrap_optimizer(optax.sgd(0.1, momentum=0.9), config)
  args = (model, tx, (32, 32, 3), 0, sharding.replicated(sharding.data_mesh()))
  state = initial_state(*args)
  assert state.int8_state == {}
  checkpointer = checkpointing.Checkpointer(tmp_path)
  checkpointer.save(7, checkpoint_tree(state, epoch=2, index=3))
  checkpointer.close()
  like = abstract_state(*args)
  step, tree = checkpointing.Checkpointer(tmp_path).restore_latest(checkpoint_tree(like, 0, 0))
  restored, position = from_checkpoint_tree(like, tree)
  assert step == 7 and position == (2, 3)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
