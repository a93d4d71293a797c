"""PASCAL VOC-layout detection data (BCCD) as a TensorFlow Datasets builder that needs no TensorFlow.

The source is the ``bccd-voc.tar.gz`` archive (found as ``jint8.datasets.paths`` finds archives) or an extracted
folder holding one VOC root: a directory with ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` and
``ImageSets/Main/<split>.txt``. The builder writes ``array_record`` files; read them with
``builder.as_data_source(split)``.

Boxes are stored in pixels as ``(xmin, ymin, xmax, ymax)``, clipped to the image; boxes of zero area
(two in BCCD) are dropped. Labels index ``class_names``.
"""

from __future__ import annotations

import os
import pathlib
import tarfile
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jint8.datasets import paths

ARCHIVE = 'bccd-voc.tar.gz'
BCCD_CLASSES = ('RBC', 'WBC', 'Platelets')
_KINDS = ('Annotations', 'JPEGImages', os.path.join('ImageSets', 'Main'))


def parse_annotation(xml: bytes | str, class_names: Sequence[str]) -> dict[str, np.ndarray | int | str]:
  """Parses one VOC annotation file.

  Returns:
    ``{"filename", "width", "height", "boxes": float32 (n, 4) xmin/ymin/xmax/ymax as written,
    "labels": int64 (n,) indices into class_names}``.
  """
  try:
    root = ET.fromstring(xml)
  except ET.ParseError as e:
    raise ValueError(f'malformed VOC annotation XML: {e}') from None

  def text(node, path):
    found = node.find(path)
    if found is None or found.text is None:
      raise ValueError(f'VOC annotation {root.findtext("filename")!r} has no <{path}>')
    return found.text.strip()

  boxes, labels = [], []
  for obj in root.iter('object'):
    name = text(obj, 'name')
    if name not in class_names:
      raise ValueError(f'VOC annotation {text(root, "filename")!r}: class {name!r} is not one of '
                       f'{tuple(class_names)}')
    labels.append(class_names.index(name))
    boxes.append([float(text(obj, f'bndbox/{k}')) for k in ('xmin', 'ymin', 'xmax', 'ymax')])
  return {
      'filename': text(root, 'filename'),
      'width': int(text(root, 'size/width')),
      'height': int(text(root, 'size/height')),
      'boxes': np.asarray(boxes, np.float32).reshape(-1, 4),
      'labels': np.asarray(labels, np.int64),
  }


def read_voc_files(source: str | os.PathLike) -> dict[str, bytes]:
  """Reads the annotations, images and split lists of one VOC root from an archive or a folder.

  Returns:
    The file contents keyed by their path under the VOC root, e.g. ``"Annotations/x.xml"``.
  """
  source = os.fspath(source)
  if not os.path.exists(source):
    raise FileNotFoundError(f'VOC source {source!r} does not exist (a .tar.gz archive or a folder)')
  files, roots = {}, set()

  def add(path, read):
    parent, name = os.path.split(os.path.normpath(path))
    for kind in _KINDS:
      if parent == kind or parent.endswith(os.sep + kind):
        roots.add(parent[:len(parent) - len(kind)])
        files[os.path.join(kind, name)] = read()

  if os.path.isdir(source):
    for folder, _, names in os.walk(source):
      for name in names:
        path = os.path.join(folder, name)
        add(os.path.relpath(path, source), pathlib.Path(path).read_bytes)
  else:
    try:
      with tarfile.open(source) as archive:
        for member in archive:
          if member.isfile():
            add(member.name, lambda m=member: archive.extractfile(m).read())
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
      raise ValueError(f'cannot read the archive {source!r}: {e!r}; the file is damaged or not a .tar.gz') from e
  if len(roots) != 1:
    raise ValueError(f'{source!r} must hold exactly one VOC root (Annotations/, JPEGImages/, ImageSets/Main/), '
                     f'found {sorted(roots) or "none"}')
  return files


def split_ids(files: Mapping[str, bytes], split: str) -> list[str]:
  """The image ids listed in ``ImageSets/Main/<split>.txt``."""
  path = os.path.join('ImageSets', 'Main', f'{split}.txt')
  if path not in files:
    raise ValueError(f'the VOC source has no split {split!r} ({path} is missing)')
  ids = files[path].decode().split()
  if not ids:
    raise ValueError(f'the VOC split {split!r} ({path}) lists no images')
  return ids


class BccdVoc(tfds.core.GeneratorBasedBuilder):
  """BCCD blood-cell detection (364 images 640x480; RBC, WBC, Platelets): features ``image`` (JPEG),
  ``image_id``, ``name``, ``boxes`` (n, 4) and ``labels`` (n,); splits train / val / test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'BCCD in VOC layout; zero-area boxes dropped.'}
  CLASS_NAMES = BCCD_CLASSES
  SPLITS = ('train', 'val', 'test')
  # A local source has no download URLs to checksum. Saying so also skips tfds' lookup of the builder's
  # source folder, which needs the `importlib_resources` backport that tfds does not install.
  url_infos = None

  def __init__(self, *, archive: str | os.PathLike | None = None, **kwargs):
    """``archive``: ``bccd-voc.tar.gz``, the folder holding it, or an extracted VOC folder; ``None`` searches
    as ``jint8.datasets.paths.find_archive`` does. Only read when the dataset is not prepared yet."""
    self._archive = archive
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='BCCD blood-cell detection, boxes in pixels (xmin, ymin, xmax, ymax).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'image_id': np.int64,
            'name': tfds.features.Text(),
            'boxes': tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            'labels': tfds.features.Tensor(shape=(None,), dtype=np.int64),
        }),
        homepage='https://github.com/Shenggan/BCCD_Dataset',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the source is local
    archive = self._archive
    if not (archive and os.path.isdir(archive) and not os.path.isfile(os.path.join(archive, ARCHIVE))):
      archive = paths.find_archive(ARCHIVE, archive)
    files = read_voc_files(archive)
    all_ids = sorted(os.path.splitext(os.path.basename(p))[0] for p in files if p.startswith('Annotations'))
    image_ids = {name: i for i, name in enumerate(all_ids)}
    return {split: self._generate_examples(files, split_ids(files, split), image_ids) for split in self.SPLITS}

  def _generate_examples(self, files, ids, image_ids):
    for name in ids:
      xml_path = os.path.join('Annotations', f'{name}.xml')
      image_path = os.path.join('JPEGImages', f'{name}.jpg')
      if xml_path not in files or image_path not in files:
        raise ValueError(f'VOC image {name!r} is listed in a split but {xml_path} or {image_path} is missing')
      try:
        ann = parse_annotation(files[xml_path], self.CLASS_NAMES)
      except ValueError as e:
        raise ValueError(f'{xml_path}: {e}') from None
      boxes = np.clip(ann['boxes'], 0, [ann['width'], ann['height']] * 2).astype(np.float32)
      keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
      yield name, {
          'image': files[image_path],
          'image_id': image_ids[name],
          'name': name,
          'boxes': boxes[keep],
          'labels': ann['labels'][keep],
      }


def builder(*, data_dir: str | os.PathLike | None = None, archive: str | os.PathLike | None = None) -> BccdVoc:
  """Returns the prepared BCCD builder, reading ``archive`` (see ``BccdVoc``) into ``data_dir`` on first use.

  ``data_dir``: where prepared datasets are cached; ``None`` is tfds' default (``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets``).
  """
  b = BccdVoc(data_dir=data_dir, archive=archive, file_format='array_record')
  b.download_and_prepare()
  return b
