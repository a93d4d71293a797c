"""Resumable checkpoints of a training run: one pytree per step, saved with an orbax ``CheckpointManager``.

The tree is whatever the trainer needs to continue bit-exactly (params, BN statistics, optimizer state,
int8 state, RNG, step, data position). Saving is asynchronous; an interrupted save leaves no step behind
(orbax commits a step by renaming its temporary folder). A step that cannot be read back is moved aside to
``<step>.corrupt`` with a warning and the previous one is used instead.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils


class Checkpointer:
  """Keeps the last ``max_to_keep`` checkpoints of a run in ``directory``."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3):
    if max_to_keep < 1:
      raise ValueError(f'max_to_keep must be >= 1, got {max_to_keep}')
    self.directory = epath.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    """The newest saved step, ``None`` when there is none."""
    return self._manager.latest_step()

  def save(self, step: int, tree: Any) -> None:
    """Starts saving ``tree`` as ``step`` (asynchronous; a step already saved is left as it is)."""
    if step not in self._manager.all_steps():
      self._manager.save(step, args=ocp.args.StandardSave(tree))

  def restore_latest(self, like: Any) -> tuple[int, Any] | None:
    """Restores the newest readable checkpoint into the structure, dtypes and shardings of ``like``.

    Returns ``(step, tree)``, or ``None`` when the directory holds no checkpoint. Unreadable steps are moved
    aside (with a warning) and older ones tried.

    Raises:
      RuntimeError: checkpoints exist but none can be read.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    unreadable = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return step, self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # orbax raises many types for damaged files: ValueError, JSONDecodeError, ...
        unreadable.append(str(self._move_aside(step)))
        logging.warning('checkpoint step %d in %s cannot be read (%s: %s); moved it to %s; falling back to '
                        'the previous checkpoint', step, self.directory, type(e).__name__, e, unreadable[-1])
    if unreadable:
      raise RuntimeError(f'no readable checkpoint in {self.directory}; the unreadable ones were moved to '
                         f'{", ".join(unreadable)}. Delete them to start over.')
    return None

  def _move_aside(self, step: int) -> epath.Path:
    source = self.directory / str(step)
    target = self.directory / f'{step}.corrupt'
    suffix = 0
    while target.exists():
      suffix += 1
      target = self.directory / f'{step}.corrupt{suffix}'
    if jax.process_index() == 0:
      source.rename(target)
    multihost_utils.sync_global_devices(f'jint8 checkpoint {step} moved aside')
    self._manager.reload()
    return target

  def wait(self) -> None:
    """Blocks until pending saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self._manager.close()
