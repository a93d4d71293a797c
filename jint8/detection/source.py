"""A dataset's files, from a folder or a .tar.gz archive, read by their path under its root, and its fingerprint.

Paths are POSIX-style and relative to the root: the folder, or the archive's top, where an archive whose members
all sit in one top-level folder reads like that folder. Hidden files and folders (``.name``) are left out. An
archive is read into memory on first use (a .tar.gz has no random access); a folder is read file by file.

The fingerprint (``jint8.datasets.provenance``: the resolved path, the total size in bytes and a SHA-256 of the
contents) tells whether the source changed since the data was prepared from it.
"""

from __future__ import annotations

import functools
import os
import pathlib
import posixpath
import tarfile
import zlib

from jint8.datasets import provenance

_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


class Files:
  """The files under one root, a folder or a .tar.gz; ``name in files``, ``files.read(name)``."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path).expanduser().resolve()
    if not self.path.exists():
      raise FileNotFoundError(f'{self.path} does not exist (a folder or a .tar.gz archive)')
    self._is_archive = self.path.is_file()

  @functools.cached_property
  def _archive(self) -> dict[str, bytes]:
    """An archive's regular files, keyed by their path under its root."""
    try:
      with tarfile.open(self.path) as archive:
        members = {_member_name(m): archive.extractfile(m).read() for m in archive
                   if m.isfile() and not _hidden(_member_name(m))}
    except _READ_ERRORS as e:
      raise ValueError(f'cannot read the archive {self.path}: {e!r}; the file is damaged or not a .tar.gz') from e
    tops = {name.split('/', 1)[0] for name in members}
    if len(tops) == 1 and all('/' in name for name in members):
      members = {name.split('/', 1)[1]: data for name, data in members.items()}
    return members

  @functools.cached_property
  def names(self) -> tuple[str, ...]:
    """Every file's path under the root, sorted."""
    if self._is_archive:
      return tuple(sorted(self._archive))
    names = []
    for folder, subfolders, files in os.walk(self.path):
      subfolders[:] = [s for s in subfolders if not s.startswith('.')]
      relative = pathlib.Path(folder).relative_to(self.path)
      names += [(relative / f).as_posix() for f in files if not f.startswith('.')]
    return tuple(sorted(names))

  @functools.cached_property
  def _names(self) -> frozenset[str]:
    return frozenset(self.names)

  def __contains__(self, name: str) -> bool:
    return name in self._names

  def read(self, name: str) -> bytes:
    """The contents of the file ``name``; a FileNotFoundError naming it when there is none."""
    if name not in self:
      raise FileNotFoundError(f'{self.path} has no file {name}')
    return self._archive[name] if self._is_archive else (self.path / name).read_bytes()

  def fingerprint(self) -> dict[str, str | int]:
    """``{"path", "size": bytes, "sha256"}``: of the archive file, or of every file's path, size and contents."""
    return provenance.fingerprint(self.path, None if self._is_archive else self.names)


def _member_name(member: tarfile.TarInfo) -> str:
  return posixpath.normpath(member.name).lstrip('/')


def _hidden(name: str) -> bool:
  return any(part.startswith('.') for part in name.split('/'))
