"""Resuming a run: what a checkpoint holds (the train state and the data position) and where a run starts."""

from __future__ import annotations

import pathlib
from typing import Any

import flax.serialization
import numpy as np

from jint8.nn import record_layer_order
from jint8.training import checkpointing
from jint8.training.state import TrainState, abstract_state, initial_state


def checkpoint_tree(state: TrainState, epoch: int, index: int) -> dict[str, Any]:
  """What a checkpoint holds: the state and the data position (epoch, batch index in the epoch)."""
  return {'state': flax.serialization.to_state_dict(state),
          'data_position': {'epoch': np.asarray(epoch, np.int64), 'index': np.asarray(index, np.int64)}}


def from_checkpoint_tree(like: TrainState, tree: dict[str, Any]) -> tuple[TrainState, tuple[int, int]]:
  """The state (structured as ``like``) and the data position ``(epoch, index)`` of a restored checkpoint."""
  position = tree['data_position']
  return flax.serialization.from_state_dict(like, tree['state']), (int(position['epoch']), int(position['index']))


def restore_or_initialize(workdir: pathlib.Path, config: Any, init_args: tuple, is_main: bool):
  """The run's checkpointer and the state to start from: the latest readable checkpoint in ``workdir``, else a
  new state from ``initial_state(*init_args)``. Writes ``config.json`` and says which it is.

  Returns ``(checkpointer, state, epoch, index in epoch, layer order)``: the last, the model's int8 layers in
  call order (``record_layer_order`` while tracing the state's shapes), is the order ``train_loop`` logs them in.
  """
  checkpointer = checkpointing.Checkpointer(workdir / 'checkpoints', max_to_keep=config.keep_checkpoints)
  with record_layer_order() as layer_order:
    like = abstract_state(*init_args)
  restored = checkpointer.restore_latest(checkpoint_tree(like, 0, 0))
  if restored:
    state, (epoch, index) = from_checkpoint_tree(like, restored[1])
  else:
    state, epoch, index = initial_state(*init_args), 0, 0
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2) + '\n')
    print(f'Resuming from the checkpoint at step {int(state.step)} (epoch {epoch}, batch {index}) in {workdir}'
          if restored else f'Starting a new run in {workdir}', flush=True)
  return checkpointer, state, epoch, index, layer_order
