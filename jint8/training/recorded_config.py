"""The config that a run's folder records (``config.json``), and the check that a resumed run trains that config.

A checkpoint continues only the run of the config that wrote it: another model or precision does not fit it, and
another seed or learning rate would continue a different run under the old one's name. ``check_resume`` compares
the config with the recorded one before any checkpoint is read and refuses a change, naming every differing key,
unless the change is allowed. Keys that change how a run is logged, evaluated, checkpointed or where its data is
read from, not what it trains, may change freely (``FREE_KEYS``).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from flax import traverse_util

CONFIG_FILE = 'config.json'
FREE_KEYS = frozenset({'log_every_steps', 'eval_every_steps', 'eval_batch_size', 'checkpoint_every_steps',
                       'checkpoint_every_minutes', 'keep_checkpoints', 'divergence_patience', 'dataset.archive',
                       'dataset.data_dir', 'int8.backend'})
_ABSENT = object()


class ConfigChanged(ValueError):
  """A run was resumed with a config other than the one its folder records."""


def as_dict(config: Any) -> dict[str, Any]:
  """An ``ml_collections.ConfigDict`` as ``config.json`` holds it (tuples as lists)."""
  return json.loads(config.to_json_best_effort())


def read(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The config recorded in ``workdir``, ``None`` when there is none."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  return json.loads(path.read_text()) if path.is_file() else None


def write(workdir: str | os.PathLike, config: Any) -> None:
  """Records ``config`` in ``workdir``."""
  (pathlib.Path(workdir) / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2) + '\n')


def differences(a: dict[str, Any], b: dict[str, Any], defaults: dict[str, Any] | None = None
                ) -> dict[str, tuple[Any, Any]]:
  """``{key: (value in a, value in b)}`` for the flattened keys (``"optimizer.learning_rate"``) on which two configs
  (as ``config.json`` holds them) differ, sorted by key.

  ``defaults`` ``None``: a key only one config has differs (``describe`` shows the other's as absent). A dict: such a
  key, written by a newer jint8 than the other config's, counts as its value in ``defaults`` in the other config,
  and is not compared when ``defaults`` lacks it.
  """
  a, b = traverse_util.flatten_dict(a, sep='.'), traverse_util.flatten_dict(b, sep='.')
  fallback = traverse_util.flatten_dict(defaults or {}, sep='.')
  found = {}
  for key in sorted(a.keys() | b.keys()):
    values = tuple(config.get(key, fallback.get(key, _ABSENT)) for config in (a, b))
    if values[0] != values[1] and (defaults is None or _ABSENT not in values):
      found[key] = values
  return found


def describe(changes: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
  """``key old -> new, ...`` for the first ``limit`` changes of ``differences``, then how many more."""
  show = lambda value: '(absent)' if value is _ABSENT else json.dumps(value)
  parts = [f'{key} {show(old)} -> {show(new)}' for key, (old, new) in list(changes.items())[:limit]]
  more = len(changes) - limit
  return ', '.join(parts) + (f' and {more} more' if more > 0 else '')


def check_resume(workdir: pathlib.Path, config: Any, *, allow_change: bool = False) -> dict[str, tuple[Any, Any]]:
  """Checks that ``config`` may resume the run recorded in ``workdir`` (which holds checkpoints).

  Returns the changes of keys other than ``FREE_KEYS`` that ``allow_change`` let through (empty when the configs
  agree on them or ``workdir`` records no config).

  Raises:
    ConfigChanged: the configs differ on other keys than ``FREE_KEYS`` and ``allow_change`` is false; the message
      names every such key and how to start a new run or resume anyway.
  """
  recorded = read(workdir)
  if recorded is None:
    return {}
  changes = {k: v for k, v in differences(recorded, as_dict(config)).items() if k not in FREE_KEYS}
  if changes and not allow_change:
    raise ConfigChanged(
        f'{workdir} holds checkpoints of a run with another config ({workdir / CONFIG_FILE}): {describe(changes)}. '
        'Nothing was changed. To start a new run, give another --workdir; to resume this run with the new config '
        'anyway (its checkpoints must fit the model), pass --allow_config_change (or '
        'allow_config_change=True to train_and_evaluate).')
  return changes
