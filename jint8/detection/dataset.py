"""The detection data that ``config.dataset`` names, prepared once as a tensorflow-datasets builder without TensorFlow.

``config.dataset.format`` picks the reader (``voc``, ``coco``) of the source at ``config.dataset.path``, a folder
or a .tar.gz. Preparing decodes every image (one that is not an RGB JPEG or PNG is converted to RGB and stored as
PNG), fits its boxes to it (``annotations.fit``) and writes ``array_record`` files with the features ``image``,
``image_id``, ``name``, ``boxes`` (n, 4) float32 xmin, ymin, xmax, ymax in pixels and ``labels`` (n,) int64. The
metadata records the class names, the category id evaluation reports each under, a report per split of what
preparing changed, and the source's fingerprint (path, size, SHA-256): every load fingerprints the source again
(reading all of it), and data prepared from an earlier state of it is deleted and prepared anew.

Each source and setting has its own folder, ``<data_dir>/jint8_detection/<format>_<source>_<hash>/``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import pathlib
import re
import shutil
from typing import Any

import numpy as np
from absl import logging
import tensorflow_datasets as tfds
from PIL import Image

from jint8.datasets import paths, provenance
from jint8.detection import annotations, coco, source, voc

FORMATS = ('voc', 'coco')
_STORED = {('JPEG', 'RGB'), ('PNG', 'RGB')}  # images stored as they are; others are converted to an RGB PNG


@dataclasses.dataclass(frozen=True)
class Data:
  """Prepared detection data. ``split(name)`` reads a split's records; label ``i`` is ``class_names[i]``,
  reported in evaluation as category ``category_ids[i]``; ``reports`` holds a line per split saying what preparing
  changed; ``max_boxes`` is the most boxes one image of any split holds."""
  builder: tfds.core.DatasetBuilder
  class_names: tuple[str, ...]
  category_ids: tuple[int, ...]
  reports: dict[str, str]
  max_boxes: int

  def split(self, name: str) -> Any:
    """The records of split ``name``, a random-access data source."""
    return self.builder.as_data_source(name)


def validate_config(d: Any) -> None:
  """Raises a ValueError naming the first key of ``config.dataset`` (``d``) whose value the data cannot use."""
  if d.format not in FORMATS:
    raise ValueError(f'config.dataset.format: {d.format!r} is not one of {FORMATS}')
  if not d.path:
    raise ValueError('config.dataset.path: name the data, a folder or a .tar.gz archive')
  if not d.train_split or not d.eval_split:
    raise ValueError(f'config.dataset.train_split / eval_split: name both splits, got {d.train_split!r} / '
                     f'{d.eval_split!r}')
  names = tuple(d.class_names)
  if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
    raise ValueError(f'config.dataset.class_names must be distinct non-empty names, got {names}')
  if d.empty_images not in annotations.EMPTY_IMAGES:
    raise ValueError(f'config.dataset.empty_images: {d.empty_images!r} is not one of {annotations.EMPTY_IMAGES}')
  for key in ('annotations', 'images'):
    try:
      d[key].format(split='train')
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(f'config.dataset.{key}: {d[key]!r} is not a template with {{split}}: {e!r}') from None


def locate(path: str) -> pathlib.Path:
  """``config.dataset.path``: the path as given, or a file name alone also where ``jint8.datasets.paths`` looks."""
  given = pathlib.Path(path).expanduser()
  if given.exists():
    return given
  if given.name == path:
    return paths.find_archive(path, key='config.dataset.path')
  raise FileNotFoundError(f'config.dataset.path: {path} does not exist')


def load(d: Any) -> Data:
  """The data of ``config.dataset`` (``d``, valid for ``validate_config``), prepared on first use or when the
  source changed; ``d.data_dir``: where prepared data is kept ('': tfds' default, ``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets``)."""
  files = source.Files(locate(d.path))
  settings = {'format': d.format, 'path': str(files.path), 'splits': list(dict.fromkeys((d.train_split, d.eval_split))),
              'empty_images': d.empty_images}
  settings |= {'class_names': list(d.class_names)} if d.format == 'voc' else {'annotations': d.annotations,
                                                                               'images': d.images}
  fingerprint = files.fingerprint()

  def make_builder():
    with _tfds_quiet():  # tfds warns about every builder config it does not list; each source has its own
      return Jint8Detection(settings=settings, files=files, fingerprint=fingerprint, data_dir=d.data_dir or None,
                            file_format='array_record')

  builder = make_builder()
  recorded = builder.info.metadata.get('source')  # None until prepared
  if recorded is not None and not provenance.same_contents(recorded, fingerprint):
    print(f'{files.path} changed since {builder.data_dir} was prepared from it '
          f'({provenance.describe_change(recorded, fingerprint)}): preparing it again', flush=True)
    shutil.rmtree(builder.data_dir)
    builder = make_builder()
  builder.download_and_prepare()
  metadata = builder.info.metadata
  return Data(builder, tuple(metadata['class_names']), tuple(metadata['category_ids']), dict(metadata['reports']),
              max(metadata['max_boxes'].values()))


@contextlib.contextmanager
def _tfds_quiet():
  """Lets only errors through absl logging, which tfds logs to."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def config_name(settings: dict[str, Any]) -> str:
  """The builder config of ``settings``: the format, the source's name and a hash of every setting."""
  stem = re.sub(r'[^A-Za-z0-9]+', '-', pathlib.Path(settings['path']).name.split('.')[0]).strip('-') or 'data'
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
  return f'{settings["format"]}_{stem}_{digest}'


class Jint8Detection(tfds.core.GeneratorBasedBuilder):
  """Images with boxes from a VOC or COCO source (see the module docstring); one builder config per source."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'VOC or COCO sources; boxes clipped to the image, zero-area boxes dropped, images RGB.'}
  # A local source has no download URLs to checksum. Saying so also skips tfds' lookup of the builder's
  # source folder, which needs the `importlib_resources` backport that tfds does not install.
  url_infos = None

  def __init__(self, *, settings: dict[str, Any], files: source.Files, fingerprint: dict[str, Any], **kwargs):
    """``settings``: as ``load`` makes them; ``files``: the source, read only when preparing; ``fingerprint``:
    its ``files.fingerprint()``, recorded in the metadata."""
    self._settings, self._files, self._fingerprint = settings, files, fingerprint
    config = tfds.core.BuilderConfig(name=config_name(settings), description=json.dumps(settings, sort_keys=True))
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Detection images with boxes in pixels (xmin, ymin, xmax, ymax) and labels.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),  # JPEG or PNG, as read or converted
            'image_id': np.int64,
            'name': tfds.features.Text(),
            'boxes': tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            'labels': tfds.features.Tensor(shape=(None,), dtype=np.int64),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the source is local
    s = self._settings
    if s['format'] == 'voc':
      data = voc.read(self._files, s['splits'], s['class_names'])
    else:
      data = coco.read(self._files, s['splits'], s['annotations'], s['images'])
    self.info.metadata.update(class_names=list(data.class_names), category_ids=list(data.category_ids),
                              source=self._fingerprint, reports={}, max_boxes={})
    return {split: self._generate_examples(data, split) for split in s['splits']}

  def _generate_examples(self, data: annotations.Annotations, split: str):
    counts, most = data.counts[split], 0
    for image in data.splits[split]:
      encoded, (width, height) = rgb_image(self._files.read(image.path), image.path, counts)
      fitted = annotations.fit(image, width, height, self._settings['empty_images'], counts)
      if fitted is None:
        continue
      most = max(most, len(fitted[0]))
      yield image.name, {'image': encoded, 'image_id': image.image_id, 'name': image.name, 'boxes': fitted[0],
                         'labels': fitted[1]}
    if not counts['images']:
      raise ValueError(f'{self._files.path}: the split {split!r} has no images left to prepare '
                       f'({annotations.report(split, counts)})')
    self.info.metadata['reports'][split] = annotations.report(split, counts)
    self.info.metadata['max_boxes'][split] = most


def rgb_image(encoded: bytes, path: str, counts: collections.Counter) -> tuple[bytes, tuple[int, int]]:
  """An image file as RGB JPEG or PNG bytes, and its (width, height); any other is converted to an RGB PNG,
  counted in ``counts``. Raises a ValueError naming ``path`` when the image cannot be decoded."""
  try:
    with Image.open(io.BytesIO(encoded)) as image:
      image.load()
      if (image.format, image.mode) in _STORED:
        return encoded, image.size
      counts[f'{image.format} {image.mode} images converted to RGB'] += 1
      buffer = io.BytesIO()
      image.convert('RGB').save(buffer, format='PNG')
      return buffer.getvalue(), image.size
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f'{path}: cannot read the image or convert it to RGB: {e}') from None
