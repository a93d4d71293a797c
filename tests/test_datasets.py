"""Tests of jint8.datasets: locating archives and the tfds builder of the CIFAR-10 JPEG archive.

The session fixture ``cifar_subset`` copies a few hundred real images out of ../shared/data/cifar10-jpg.tar.gz
into a small archive of the same layout and prepares the tfds dataset from it once; test_input_pipeline.py
and test_train.py use it too.
"""

import collections
import io
import os
import pathlib
import shutil
import tarfile
import types

import numpy as np
import pytest
from PIL import Image

from jint8.datasets import cifar10_jpeg, paths, provenance

TRAIN_PER_CLASS, TEST_PER_CLASS = 30, 10


def _real_archive() -> pathlib.Path:
  return paths.find_archive(cifar10_jpeg.ARCHIVE)


def _write_subset(source: pathlib.Path, target: pathlib.Path) -> None:
  """Copies the first images of each (split, class) of ``source`` into ``target``."""
  limits = {'train': TRAIN_PER_CLASS, 'test': TEST_PER_CLASS}
  counts, files = collections.Counter(), {}
  with tarfile.open(source, 'r:gz') as src:
    for member in src:
      parts = member.name.split('/')
      if member.isfile() and len(parts) == 4 and counts[parts[1], parts[2]] < limits[parts[1]]:
        counts[parts[1], parts[2]] += 1
        files[member.name] = src.extractfile(member).read()
  _write_tar(target, files)


def _write_tar(path: pathlib.Path, files: dict[str, bytes]) -> None:
  with tarfile.open(path, 'w:gz') as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope='session')
def cifar_subset(tmp_path_factory):
  """A small CIFAR-10 JPEG archive of real images and its prepared tfds data_dir."""
  root = tmp_path_factory.getbasetemp() / 'cifar_subset'  # fixed: several modules import this fixture
  archive, data_dir = root / cifar10_jpeg.ARCHIVE, root / 'tfds'
  if not archive.exists():
    root.mkdir(exist_ok=True)
    _write_subset(_real_archive(), archive)
  with tarfile.open(archive, 'r:gz') as tar:
    files = {member.name: tar.extractfile(member).read() for member in tar}
  cifar10_jpeg.builder(data_dir=data_dir, archive=archive)
  return types.SimpleNamespace(archive=archive, data_dir=data_dir, files=files)


def _decode(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def test_builder_stores_decoded_images_and_labels(cifar_subset):
  builder = cifar10_jpeg.builder(data_dir=cifar_subset.data_dir)  # prepared: needs no archive
  assert builder.name == 'jint8_cifar10_jpeg'
  for split, per_class in (('train', TRAIN_PER_CLASS), ('test', TEST_PER_CLASS)):
    source = builder.as_data_source(split=split)
    assert len(source) == 10 * per_class
    # Every stored example is the PIL decoding of exactly one archive member of its split and class.
    expected = {}
    for name, data in cifar_subset.files.items():
      _, member_split, label, _ = name.split('/')
      if member_split == split:
        expected.setdefault(_decode(data).tobytes(), []).append(cifar10_jpeg.CLASS_NAMES.index(label))
    labels = []
    for record in source.__getitems__(range(len(source))):
      assert record['image'].dtype == np.uint8 and record['image'].shape == (32, 32, 3)
      assert record['label'] in expected.pop(record['image'].tobytes())
      labels.append(record['label'])
    assert not expected
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)


def test_builder_shuffles_classes(cifar_subset):
  source = cifar10_jpeg.builder(data_dir=cifar_subset.data_dir).as_data_source(split='train')
  first = [r['label'] for r in source.__getitems__(range(50))]
  assert len(set(first)) >= 5  # not class by class as in the archive


def test_find_archive_order(tmp_path, monkeypatch):
  config_dir, env_dir, shared = tmp_path / 'config', tmp_path / 'env', tmp_path / 'work' / 'shared' / 'data'
  for d in (config_dir, env_dir, shared):
    d.mkdir(parents=True)
    (d / 'a.tar.gz').write_bytes(b'x')
  nested = tmp_path / 'work' / 'repo' / 'sub'
  nested.mkdir(parents=True)
  monkeypatch.chdir(nested)
  monkeypatch.setenv(paths.ENV_VAR, str(env_dir))
  assert paths.find_archive('a.tar.gz', config_dir) == config_dir / 'a.tar.gz'
  assert paths.find_archive('a.tar.gz', config_dir / 'a.tar.gz') == config_dir / 'a.tar.gz'
  assert paths.find_archive('a.tar.gz') == env_dir / 'a.tar.gz'
  monkeypatch.delenv(paths.ENV_VAR)
  assert paths.find_archive('a.tar.gz') == (shared / 'a.tar.gz').resolve()  # found from the cwd's parents


def test_missing_archive_names_paths_tried(tmp_path, monkeypatch):
  monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError) as e:
    cifar10_jpeg.builder(data_dir=tmp_path / 'tfds')
  message = str(e.value)
  assert str(tmp_path / 'nowhere' / cifar10_jpeg.ARCHIVE) in message
  assert paths.ENV_VAR in message and 'config.dataset.archive' in message


def test_a_given_archive_path_that_does_not_exist_is_named(tmp_path):
  for given in (tmp_path / 'none.tar.gz', tmp_path / 'none'):
    with pytest.raises(FileNotFoundError) as e:
      paths.find_archive(cifar10_jpeg.ARCHIVE, given)
    assert str(e.value) == (f'config.dataset.archive: {given} does not exist (give the archive {cifar10_jpeg.ARCHIVE} '
                            'or the folder holding it)')


def test_corrupt_archive_is_a_clear_error(cifar_subset, tmp_path):
  archive = tmp_path / cifar10_jpeg.ARCHIVE
  data = cifar_subset.archive.read_bytes()
  archive.write_bytes(data[:len(data) // 2])  # truncated download
  with pytest.raises(ValueError, match=f'cannot read the CIFAR-10 archive {archive}.*fresh copy'):
    cifar10_jpeg.builder(data_dir=tmp_path / 'tfds', archive=archive)
  assert not list((tmp_path / 'tfds').glob('*/1.0.0/*.array_record*'))  # nothing half-written is kept


def test_archive_of_another_layout_is_a_clear_error(tmp_path):
  archive = tmp_path / cifar10_jpeg.ARCHIVE
  _write_tar(archive, {'cifar10-jpg/train/unicorn/0000.jpg': b'not read'})
  with pytest.raises(ValueError, match="unknown class folder 'unicorn'"):
    cifar10_jpeg.builder(data_dir=tmp_path / 'tfds', archive=archive)
  _write_tar(archive, {'images/0000.jpg': b'x'})
  with pytest.raises(ValueError, match='holds no images'):
    cifar10_jpeg.builder(data_dir=tmp_path / 'tfds2', archive=archive)


def test_real_archive_is_found_from_the_repository():
  archive = _real_archive()
  assert archive.name == cifar10_jpeg.ARCHIVE and os.path.getsize(archive) > 10_000_000


def test_prepared_data_must_come_from_the_archive_named(cifar_subset, tmp_path):
  builder = cifar10_jpeg.builder(data_dir=cifar_subset.data_dir, archive=cifar_subset.archive)
  assert builder.info.metadata['source'] == provenance.fingerprint(cifar_subset.archive)
  moved = tmp_path / 'moved' / cifar10_jpeg.ARCHIVE  # the same archive elsewhere, as a file or its folder
  moved.parent.mkdir()
  shutil.copy(cifar_subset.archive, moved)
  for same in (moved, moved.parent):
    assert cifar10_jpeg.builder(data_dir=cifar_subset.data_dir, archive=same).data_dir == builder.data_dir
  other = tmp_path / 'other.tar.gz'
  _write_tar(other, {'cifar10-jpg/train/cat/0000.jpg': cifar_subset.files[next(iter(cifar_subset.files))]})
  with pytest.raises(ValueError, match=f'config.dataset.archive: {other} is not the archive that the data prepared '
                                       f'in {builder.data_dir} came from, {cifar_subset.archive} '):
    cifar10_jpeg.builder(data_dir=cifar_subset.data_dir, archive=other)
  with pytest.raises(FileNotFoundError, match=f'config.dataset.archive: {tmp_path / "missing.tar.gz"} is neither '
                                              f'.* came from {cifar_subset.archive}'):
    cifar10_jpeg.builder(data_dir=cifar_subset.data_dir, archive=tmp_path / 'missing.tar.gz')
