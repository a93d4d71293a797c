"""Locating the local data archives (read-only inputs such as ``cifar10-jpg.tar.gz``).

An archive is looked for, in order, at:

1. the path given explicitly (the config value): the archive itself or the folder holding it;
2. the folder named by the ``JINT8_DATA_DIR`` environment variable;
3. ``shared/data`` beside the repository (``../shared/data`` from its root), then ``shared/data`` in the current
   directory and each of its parents.
"""

from __future__ import annotations

import os
import pathlib

ENV_VAR = 'JINT8_DATA_DIR'
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def candidate_dirs(path: str | os.PathLike | None = None) -> list[pathlib.Path]:
  """The folders searched for an archive, in order (see the module docstring)."""
  if path:
    return [pathlib.Path(path).expanduser()]
  if os.environ.get(ENV_VAR):
    return [pathlib.Path(os.environ[ENV_VAR]).expanduser()]
  cwd = pathlib.Path.cwd()
  dirs = [_REPO_ROOT.parent / 'shared' / 'data'] + [d / 'shared' / 'data' for d in (cwd, *cwd.parents)]
  return list(dict.fromkeys(d.resolve() for d in dirs))


def find_archive(filename: str, path: str | os.PathLike | None = None, *,
                 key: str = 'config.dataset.archive') -> pathlib.Path:
  """Returns the path of the archive ``filename``.

  Args:
    filename: the archive's file name, e.g. ``'cifar10-jpg.tar.gz'``.
    path: the archive itself or the folder holding it (the config value); ``None`` or ``''`` searches
      ``$JINT8_DATA_DIR``, then ``shared/data`` folders.
    key: the config key that names the archive, for the error message.

  Raises:
    FileNotFoundError: naming ``path`` when it does not exist, else every path tried and how to point at the archive.
  """
  if path:
    given = pathlib.Path(path).expanduser()
    if given.is_file():
      return given
    if not given.exists():
      raise FileNotFoundError(f'{key}: {given} does not exist (give the archive {filename} or the folder holding it)')
  tried = [d / filename for d in candidate_dirs(path)]
  for candidate in tried:
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(
      f'data archive {filename!r} not found; tried: {", ".join(map(str, tried))}. Put it in one of these '
      f'places, set the {ENV_VAR} environment variable to the folder holding it, or pass its path in the '
      f'config ({key}).')
