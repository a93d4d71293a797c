"""A tensorflow-datasets builder for the local CIFAR-10 JPEG archive ``cifar10-jpg.tar.gz``.

The archive holds ``cifar10-jpg/{train,test}/<class>/NNNN.jpg`` (32x32 JPEG, quality 75, the original
50,000 / 10,000 split). The builder decodes every image once and stores ``uint8`` arrays in ``array_record``
files, read back without TensorFlow through ``builder.as_data_source()``. It has its own name,
``jint8_cifar10_jpeg``, so tfds never tries to download the official ``cifar10``. The metadata records the archive's
fingerprint (``jint8.datasets.provenance``), which every later load compares with the archive it is given.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jint8.datasets import paths, provenance

ARCHIVE = 'cifar10-jpg.tar.gz'
CLASS_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
IMAGE_SHAPE = (32, 32, 3)
# Per-channel mean and standard deviation of the 50,000 decoded training images, in pixel units (0..255).
MEAN_RGB = (125.269, 122.933, 113.863)
STDDEV_RGB = (62.534, 61.909, 66.460)
_ROOT = 'cifar10-jpg'
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


class Jint8Cifar10Jpeg(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10 decoded from the local JPEG archive; features ``image`` (32x32x3 uint8) and ``label``."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Decoded uint8 images from cifar10-jpg.tar.gz.',
                   '1.1.0': "The metadata records the archive's fingerprint (path, size, SHA-256)."}
  # A local archive has no download URLs to checksum. Saying so also skips tfds' lookup of the builder's
  # source folder, which needs the `importlib_resources` backport that tfds does not install on Python >= 3.9.
  url_infos = None

  def __init__(self, *, archive: str | os.PathLike | None = None, **kwargs):
    """``archive``: the archive or the folder holding it; ``None`` searches as ``paths.find_archive`` does."""
    self._archive = archive
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        metadata=tfds.core.MetadataDict(),
        citation='Krizhevsky, 2009, "Learning Multiple Layers of Features from Tiny Images".')

  def _split_generators(self, dl_manager):
    del dl_manager  # the archive is local
    archive = paths.find_archive(ARCHIVE, self._archive)
    self.info.metadata['source'] = provenance.fingerprint(archive)
    return {split: self._generate_examples(archive, split) for split in ('train', 'test')}

  def _generate_examples(self, archive, split):
    count = 0
    try:
      with tarfile.open(archive, 'r:gz') as tar:
        for member in tar:
          parts = member.name.split('/')
          if not (member.isfile() and len(parts) == 4 and parts[:2] == [_ROOT, split]):
            continue
          yield f'{split}/{parts[2]}/{parts[3]}', _decode(tar, member, archive)
          count += 1
    except _READ_ERRORS as e:
      raise ValueError(f'cannot read the CIFAR-10 archive {archive}: {e!r}. The file is damaged or is not a '
                       f'.tar.gz: replace it with a fresh copy of {ARCHIVE}.') from e
    if not count:
      raise ValueError(f'the CIFAR-10 archive {archive} holds no images under {_ROOT}/{split}/<class>/: '
                       f'is it {ARCHIVE}?')


def _decode(tar: tarfile.TarFile, member: tarfile.TarInfo, archive) -> dict:
  label = member.name.split('/')[2]
  if label not in CLASS_NAMES:
    raise ValueError(f'{archive}: {member.name} is in an unknown class folder {label!r}; '
                     f'expected one of {CLASS_NAMES}')
  with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
    pixels = np.asarray(image.convert('RGB'))
  if pixels.shape != IMAGE_SHAPE:
    raise ValueError(f'{archive}: {member.name} has shape {pixels.shape}, expected {IMAGE_SHAPE}')
  return {'image': pixels, 'label': label}


def builder(*, data_dir: str | os.PathLike | None = None,
            archive: str | os.PathLike | None = None) -> Jint8Cifar10Jpeg:
  """Returns the prepared builder, decoding the archive into ``data_dir`` on first use.

  Data prepared before is used as it is, or, when ``archive`` is given, only if it came from that archive (the same
  size and SHA-256, wherever it lies now).

  Args:
    data_dir: where prepared datasets are cached; ``None`` is tfds' default (``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    archive: the archive or the folder holding it (``config.dataset.archive``); ``None`` searches as
      ``paths.find_archive`` does, when the data is not prepared yet.

  Raises:
    FileNotFoundError: ``archive`` does not exist, or the data is not prepared and no archive was found.
    ValueError: ``archive`` is not the one the prepared data came from, or it cannot be read.
  """
  b = Jint8Cifar10Jpeg(data_dir=data_dir, archive=archive, file_format='array_record')
  if not b.is_prepared():
    b.download_and_prepare()
    return b
  if not archive:
    return b
  recorded = b.info.metadata['source']
  try:
    found = paths.find_archive(ARCHIVE, archive)
  except FileNotFoundError:
    raise FileNotFoundError(f'config.dataset.archive: {archive} is neither {ARCHIVE} nor a folder holding it (the '
                            f'data prepared in {b.data_dir} came from {recorded["path"]})') from None
  current = provenance.fingerprint(found)
  if not provenance.same_contents(recorded, current):
    raise ValueError(f'config.dataset.archive: {found} is not the archive that the data prepared in {b.data_dir} came '
                     f'from, {recorded["path"]} ({provenance.describe_change(recorded, current)}). Delete '
                     f'{b.data_dir} to prepare the data from {found}, or set config.dataset.data_dir to another '
                     'folder.')
  return b
