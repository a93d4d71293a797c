"""Where prepared data came from: its source's fingerprint (path, size, SHA-256), recorded with the data, so that a
later run can tell whether the source it is given is the one the prepared data came from."""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Sequence

_CHUNK = 1 << 20


def fingerprint(path: str | os.PathLike, names: Sequence[str] | None = None) -> dict[str, str | int]:
  """``{"path", "size": bytes, "sha256"}`` of the file at ``path``, or (``names``: files under the folder
  ``path``) of every named file's path, size and contents."""
  path = pathlib.Path(path).expanduser().resolve()
  digest, size = hashlib.sha256(), 0
  parts = [(None, path)] if names is None else [(name, path / name) for name in names]
  for name, file in parts:
    length = file.stat().st_size
    if name is not None:
      digest.update(f'{name}\0{length}\0'.encode())
    with open(file, 'rb') as f:
      while chunk := f.read(_CHUNK):
        digest.update(chunk)
    size += length
  return {'path': str(path), 'size': size, 'sha256': digest.hexdigest()}


def same_contents(a: dict[str, str | int], b: dict[str, str | int]) -> bool:
  """Whether two fingerprints are of the same contents (wherever they lie)."""
  return (a['size'], a['sha256']) == (b['size'], b['sha256'])


def describe_change(old: dict[str, str | int], new: dict[str, str | int]) -> str:
  """``size A -> B bytes, sha256 x -> y`` (the digests' first 12 digits)."""
  return f'size {old["size"]} -> {new["size"]} bytes, sha256 {old["sha256"][:12]} -> {new["sha256"][:12]}'
