"""Resumable checkpoints of a training run: one pytree per step, saved with an orbax ``CheckpointManager``.

The tree is whatever the trainer needs to continue bit-exactly (params, BN statistics, optimizer state,
int8 state, RNG, step, data position). Saving is asynchronous; an interrupted save leaves no step behind
(orbax commits a step by renaming its temporary folder). Before a step is restored, the shapes and dtypes it holds
are compared with the tree asked for: a checkpoint of another model is an error that touches nothing. Only a step
that cannot be read back is moved aside to ``<step>.corrupt``, with a one-line warning, and the previous one is used
instead.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging as python_logging
import os
import sys
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from jint8.training import interruption


class CheckpointMismatch(ValueError):
  """A checkpoint holds other arrays (names, shapes or dtypes) than the tree it is restored into."""


class NoReadableCheckpoint(ValueError):
  """Every checkpoint of a run is damaged."""


def mismatch(stored: Any, like: Any) -> str | None:
  """How the arrays of a checkpoint (``stored``: its metadata tree, with ``shape`` and ``dtype`` per array) differ
  from those of ``like`` (names, shapes, dtypes), ``None`` when they agree."""
  stored, like = _arrays(stored), _arrays(like)
  for what, names in (('holds arrays this run lacks', sorted(stored.keys() - like.keys())),
                      ('lacks arrays this run has', sorted(like.keys() - stored.keys()))):
    if names:
      return f'it {what}: {", ".join(names[:3])}' + (f' and {len(names) - 3} more' if len(names) > 3 else '')
  for name in sorted(stored):
    if stored[name] != like[name]:
      (shape, dtype), (like_shape, like_dtype) = stored[name], like[name]
      return f'{name} is {dtype}{list(shape)} in it, {like_dtype}{list(like_shape)} in this run'
  return None


def _arrays(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """``{"state.params.Conv_0.kernel": (shape, dtype)}`` of the arrays (or their metadata) in ``tree``."""
  return {jax.tree_util.keystr(path, simple=True, separator='.'): (tuple(x.shape), np.dtype(x.dtype))
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


_ORBAX = os.path.dirname(ocp.__file__) + os.sep
_NEVER_AWAITED = "coroutine '_read_array_index_and_device_put' was never awaited"  # an orbax read


@contextlib.contextmanager
def _quiet_failed_restore():
  """Silences what a restore that fails on damaged files leaves behind, hundreds of tracebacks in all: orbax's
  asyncio tasks log their exceptions through the ``asyncio`` logger when they are collected, and its reads report
  as "unraisable" (``_restore_leftover``) or as never awaited. Yields a list for the caller to add the error of a
  failed restore to; then the filters of the reads stay installed, since the reads may end after it returned."""
  asyncio_logger = python_logging.getLogger('asyncio')
  level, verbosity, hook = asyncio_logger.level, logging.get_verbosity(), sys.unraisablehook
  asyncio_logger.setLevel(python_logging.CRITICAL)
  logging.set_verbosity(logging.ERROR)
  sys.unraisablehook = quiet = lambda unraisable: None if _restore_leftover(unraisable) else hook(unraisable)
  errors = []
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', _NEVER_AWAITED, RuntimeWarning)
    try:
      yield errors
    finally:
      gc.collect()  # collects the failed restore's tasks while their logger is quiet
      asyncio_logger.setLevel(level)
      logging.set_verbosity(verbosity)
  if errors:
    warnings.filterwarnings('ignore', _NEVER_AWAITED, RuntimeWarning)
  elif sys.unraisablehook is quiet:
    sys.unraisablehook = hook


def _restore_leftover(unraisable) -> bool:
  """Whether an unraisable error is one that a failed restore leaves: a read of orbax's that the failure abandoned,
  which raises an Exception when it is closed on collection, or a TensorStore read that ended after the restore's
  event loop closed (``RuntimeError('Event loop is closed')``)."""
  error, source = unraisable.exc_value, unraisable.object
  if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
    return True
  return (inspect.iscoroutine(source) and source.cr_code.co_filename.startswith(_ORBAX)
          and isinstance(error.__context__, GeneratorExit))


def has_checkpoints(directory: str | os.PathLike) -> bool:
  """Whether ``directory`` holds a saved step (readable or not)."""
  return os.path.isdir(directory) and bool(ocp.utils.checkpoint_steps(directory))


class Checkpointer:
  """Keeps the last ``max_to_keep`` checkpoints of a run in ``directory``."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3):
    if max_to_keep < 1:
      raise ValueError(f'max_to_keep must be >= 1, got {max_to_keep}')
    self.directory = epath.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers=ocp.StandardCheckpointHandler())
    interruption.wait_on_exit(self)  # a Ctrl-C outside the training steps lets a save finish

  def latest_step(self) -> int | None:
    """The newest saved step, ``None`` when there is none."""
    return self._manager.latest_step()

  def save(self, step: int, tree: Any) -> None:
    """Starts saving ``tree`` as ``step`` (asynchronous; a step already saved is left as it is)."""
    if step not in self._manager.all_steps():
      self._manager.save(step, args=ocp.args.StandardSave(tree))

  def saving(self) -> bool:
    """Whether a save started and is not written yet."""
    return self._manager.is_saving_in_progress()

  def restore_latest(self, like: Any) -> tuple[int, Any] | None:
    """Restores the newest readable checkpoint into the structure, dtypes and shardings of ``like``.

    Returns ``(step, tree)``, or ``None`` when the directory holds no checkpoint. Unreadable steps are moved
    aside (with a one-line warning) and older ones tried.

    Raises:
      CheckpointMismatch: the newest readable checkpoint holds other arrays than ``like`` (another model); no
        checkpoint is touched.
      NoReadableCheckpoint: checkpoints exist but none can be read.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    unreadable = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      with _quiet_failed_restore() as errors:
        try:
          differs = mismatch(self._manager.item_metadata(step).tree, abstract)
          if differs is None:
            return step, self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many types for damaged files: ValueError, JSONDecodeError, ...
          errors.append(' '.join(f'{type(e).__name__}: {e}'.split()))
      if not errors:
        raise CheckpointMismatch(f'checkpoint step {step} in {self.directory} does not fit this run: {differs}. '
                                 'Nothing was changed: is it the checkpoint of another model or precision?')
      error = errors[0]
      unreadable.append(str(self._move_aside(step)))
      logging.warning('checkpoint step %d in %s cannot be read (%s); moved it to %s', step, self.directory,
                      error if len(error) <= 160 else error[:157] + '...', unreadable[-1])
    if unreadable:
      raise NoReadableCheckpoint(f'no readable checkpoint in {self.directory}; the unreadable ones were moved to '
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
