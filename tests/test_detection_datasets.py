"""Tests of detection data sources: the files of a folder or a .tar.gz archive, and their fingerprint."""

import hashlib
import tarfile

import pytest

from jint8.detection import source


def test_files_read_folders_and_archives_alike(tmp_path, rng):
  contents = {f'top/a{i}/{j}.bin': rng.bytes(int(rng.integers(1, 5000))) for i in range(3) for j in range(2)}
  for name, data in contents.items():
    (tmp_path / 'folder' / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / 'folder' / name).write_bytes(data)
  (tmp_path / 'folder' / 'top' / '.hidden').write_bytes(b'x')
  with tarfile.open(tmp_path / 'data.tar.gz', 'w:gz') as archive:
    archive.add(tmp_path / 'folder' / 'top', arcname='./top')
  folder, archive = source.Files(tmp_path / 'folder' / 'top'), source.Files(tmp_path / 'data.tar.gz')
  expected = sorted(n[len('top/'):] for n in contents)
  assert list(folder.names) == list(archive.names) == expected  # the archive's one top folder is its root
  for name in expected:
    assert folder.read(name) == archive.read(name) == contents[f'top/{name}']
  assert 'a0/0.bin' in archive and 'a0/9.bin' not in folder
  assert '.hidden' not in folder and '../top/a0/0.bin' not in folder  # nothing hidden or outside the root
  with pytest.raises(FileNotFoundError, match='has no file a0/9.bin'):
    folder.read('a0/9.bin')
  digest = hashlib.sha256((tmp_path / 'data.tar.gz').read_bytes()).hexdigest()
  assert archive.fingerprint() == {'path': str(tmp_path / 'data.tar.gz'), 'size': (tmp_path / 'data.tar.gz').stat(
      ).st_size, 'sha256': digest}
  before = folder.fingerprint()
  assert before['size'] == sum(map(len, contents.values()))
  (tmp_path / 'folder' / 'top' / 'a1' / '0.bin').write_bytes(contents['top/a1/0.bin'][::-1] + b'!')
  assert source.Files(tmp_path / 'folder' / 'top').fingerprint()['sha256'] != before['sha256']
  with pytest.raises(FileNotFoundError, match='does not exist'):
    source.Files(tmp_path / 'missing')
  (tmp_path / 'broken.tar.gz').write_bytes(b'not a tar file')
  with pytest.raises(ValueError, match='cannot read the archive'):
    source.Files(tmp_path / 'broken.tar.gz').names
