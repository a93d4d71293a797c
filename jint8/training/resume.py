"""Resuming a run: whether a run may use its folder, what a checkpoint holds (the train state and the data position)
and where a run starts."""

from __future__ import annotations

import pathlib
from typing import Any

import flax.serialization
import numpy as np

from jint8.nn import record_layer_order
from jint8.training import checkpointing, recorded_config
from jint8.training.state import TrainState, abstract_state, initial_state


def checkpoint_tree(state: TrainState, epoch: int, index: int) -> dict[str, Any]:
  """What a checkpoint holds: the state and the data position (epoch, batch index in the epoch)."""
  return {'state': flax.serialization.to_state_dict(state),
          'data_position': {'epoch': np.asarray(epoch, np.int64), 'index': np.asarray(index, np.int64)}}


def from_checkpoint_tree(like: TrainState, tree: dict[str, Any]) -> tuple[TrainState, tuple[int, int]]:
  """The state (structured as ``like``) and the data position ``(epoch, index)`` of a restored checkpoint."""
  position = tree['data_position']
  return flax.serialization.from_state_dict(like, tree['state']), (int(position['epoch']), int(position['index']))


CHECKPOINTS = 'checkpoints'  # the folder of a run's checkpoints in its workdir


def check_workdir(workdir: pathlib.Path, config: Any, *, allow_config_change: bool = False
                  ) -> dict[str, tuple[Any, Any]]:
  """Checks, before anything is loaded, that a run of ``config`` may use ``workdir``: a folder or nothing yet and,
  when it holds checkpoints, one whose recorded config is ``config`` (``recorded_config.check_resume``).

  Returns the config changes that ``allow_config_change`` let through.

  Raises:
    ValueError: ``workdir`` is a file, or (``recorded_config.ConfigChanged``) it holds checkpoints of another config.
  """
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f'the workdir {workdir} is a file, not a folder: give another --workdir')
  if not checkpointing.has_checkpoints(workdir / CHECKPOINTS):
    return {}
  return recorded_config.check_resume(workdir, config, allow_change=allow_config_change)


def restore_or_initialize(workdir: pathlib.Path, config: Any, init_args: tuple, is_main: bool,
                          config_changes: dict[str, tuple[Any, Any]] | None = None):
  """The run's checkpointer and the state to start from: the latest readable checkpoint in ``workdir``, else a
  new state from ``initial_state(*init_args)``. Records ``config`` in ``workdir`` and says which it is (and the
  ``config_changes`` of ``check_workdir`` that a resume was allowed).

  Returns ``(checkpointer, state, epoch, index in epoch, layer order)``: the last, the model's int8 layers in
  call order (``record_layer_order`` while tracing the state's shapes), is the order ``train_loop`` logs them in.

  Raises:
    checkpointing.CheckpointMismatch: the newest readable checkpoint is not one of this model.
  """
  checkpointer = checkpointing.Checkpointer(workdir / CHECKPOINTS, max_to_keep=config.keep_checkpoints)
  with record_layer_order() as layer_order:
    like = abstract_state(*init_args)
  try:
    restored = checkpointer.restore_latest(checkpoint_tree(like, 0, 0))
  except ValueError:
    checkpointer.close()
    raise
  if restored:
    state, (epoch, index) = from_checkpoint_tree(like, restored[1])
  else:
    state, epoch, index = initial_state(*init_args), 0, 0
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    recorded_config.write(workdir, config)
    print(f'Resuming from the checkpoint at step {int(state.step)} (epoch {epoch}, batch {index}) in {workdir}'
          if restored else f'Starting a new run in {workdir}', flush=True)
    if restored and config_changes:
      print(f'Resuming with a changed config (allowed): {recorded_config.describe(config_changes)}', flush=True)
  return checkpointer, state, epoch, index, layer_order
