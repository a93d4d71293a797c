"""PASCAL VOC-layout detection annotations, read from a folder or a .tar.gz holding one VOC root.

A VOC root is a folder with ``Annotations/<id>.xml``, the images in ``JPEGImages/`` (the file the XML's
``<filename>`` names, else the one file named ``<id>.<extension>``) and ``ImageSets/Main/<split>.txt`` listing a
split's ids. The classes are the ones given, in that order, or else the sorted names of the training split's
objects; category id ``label + 1`` reports them in evaluation, and image id ``i`` the ``i``-th annotation file in
sorted order. Every object counts, ``<difficult>`` ones too.
"""

from __future__ import annotations

import collections
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import numpy as np

from jint8.detection import annotations, source

KINDS = ('Annotations', 'JPEGImages', 'ImageSets/Main')
_COORDINATES = ('xmin', 'ymin', 'xmax', 'ymax')


def find_root(files: source.Files) -> str:
  """The VOC root's path under the source root, '' or ending in '/'."""
  roots = set()
  for name in files.names:
    parent = posixpath.dirname(name)
    for kind in KINDS:
      if parent == kind or parent.endswith('/' + kind):
        roots.add(parent[:len(parent) - len(kind)])
  if len(roots) != 1:
    raise ValueError(f'{files.path} must hold exactly one VOC root (Annotations/, JPEGImages/, ImageSets/Main/), '
                     f'found {sorted(roots) or "none"}')
  return roots.pop()


def parse_annotation(xml: bytes | str, origin: str) -> dict:
  """One VOC annotation file, ``origin`` naming it in errors.

  Returns:
    ``{"filename": str or None, "size": (width, height) or None, "names": [str] (n,), "boxes": float32 (n, 4)
    xmin, ymin, xmax, ymax as written}``.
  """
  try:
    root = ET.fromstring(xml)
  except ET.ParseError as e:
    raise ValueError(f'{origin}: malformed VOC annotation XML: {e}') from None

  def number(node, path, where):
    text = node.findtext(path)
    if text is None or not text.strip():
      raise ValueError(f'{origin}: {where} has no <{path}>')
    try:
      return float(text)
    except ValueError:
      raise ValueError(f'{origin}: {where} has <{path}>{text.strip()}</{path}>, not a number') from None

  names, boxes = [], []
  for i, obj in enumerate(root.iter('object')):
    name = (obj.findtext('name') or '').strip()
    if not name:
      raise ValueError(f'{origin}: object {i} has no <name>')
    names.append(name)
    boxes.append([number(obj, f'bndbox/{k}', f'object {i} ({name})') for k in _COORDINATES])
  size = None
  if root.find('size') is not None:
    width, height = (int(number(root, f'size/{k}', 'the annotation')) for k in ('width', 'height'))
    size = (width, height) if width > 0 and height > 0 else None  # some tools write 0 for unknown
  filename = (root.findtext('filename') or '').strip() or None
  return {'filename': filename, 'size': size, 'names': names, 'boxes': np.asarray(boxes, np.float32).reshape(-1, 4)}


def split_ids(files: source.Files, root: str, split: str) -> list[str]:
  """The image ids that ``ImageSets/Main/<split>.txt`` lists (the first word of each line)."""
  path = f'{root}ImageSets/Main/{split}.txt'
  if path not in files:
    raise ValueError(f'{files.path} has no VOC split {split!r} ({path} is missing)')
  ids = [line.split()[0] for line in files.read(path).decode().splitlines() if line.strip()]
  if not ids:
    raise ValueError(f'{files.path}: the VOC split {split!r} ({path}) lists no images')
  repeated = [i for i, n in collections.Counter(ids).items() if n > 1]
  if repeated:
    raise ValueError(f'{files.path}: {path} lists {annotations.some(repeated)} more than once')
  missing = [i for i in ids if f'{root}Annotations/{i}.xml' not in files]
  if missing:
    raise ValueError(f'{files.path}: {path} names {len(missing)} ids without an annotation file '
                     f'{root}Annotations/<id>.xml: {annotations.some(missing)}')
  return ids


def read(files: source.Files, splits: Sequence[str], class_names: Sequence[str] = ()) -> annotations.Annotations:
  """The annotations of ``splits`` (the first is the training split, whose objects name the classes when
  ``class_names`` is empty). Raises a ValueError naming the file of any unknown class or missing image."""
  root = find_root(files)
  ids = {split: split_ids(files, root, split) for split in splits}
  prefix = f'{root}Annotations/'
  all_ids = sorted(posixpath.splitext(n[len(prefix):])[0] for n in files.names
                   if n.startswith(prefix) and n.endswith('.xml'))
  image_ids = {name: i for i, name in enumerate(all_ids)}
  images = {}
  for name in dict.fromkeys(n for listed in ids.values() for n in listed):
    origin = f'{prefix}{name}.xml'
    images[name] = parse_annotation(files.read(origin), origin) | {'origin': origin}
  if not class_names:
    class_names = sorted({n for name in ids[splits[0]] for n in images[name]['names']})
    if not class_names:
      raise ValueError(f'{files.path}: the training split {splits[0]!r} has no objects to take the class names '
                       'from; name them in config.dataset.class_names')
    known = f'the classes of the training split {splits[0]!r}'
  else:
    known = "config.dataset.class_names; '()' takes the training split's classes"
  labels = {c: i for i, c in enumerate(class_names)}
  by_stem = collections.defaultdict(list)
  for n in files.names:
    if n.startswith(f'{root}JPEGImages/'):
      by_stem[posixpath.splitext(posixpath.basename(n))[0]].append(n)

  def image(name):
    ann = images[name]
    unknown = [c for c in ann['names'] if c not in labels]
    if unknown:
      raise ValueError(f'{ann["origin"]}: class {unknown[0]!r} is not one of {tuple(class_names)} ({known})')
    path = f'{root}JPEGImages/{ann["filename"]}'
    if not ann['filename'] or path not in files:
      if len(by_stem[name]) != 1:
        raise ValueError(f'{ann["origin"]}: no image file for {name!r}: expected {root}JPEGImages/'
                         f'{ann["filename"] or name + ".jpg"}, found {by_stem[name] or "none"} named {name}.*')
      path = by_stem[name][0]
    return annotations.Image(name=name, image_id=image_ids[name], path=path, size=ann['size'], boxes=ann['boxes'],
                             labels=np.asarray([labels[c] for c in ann['names']], np.int64), origin=ann['origin'])

  return annotations.Annotations(
      class_names=tuple(class_names), category_ids=tuple(range(1, len(class_names) + 1)),
      splits={split: [image(name) for name in listed] for split, listed in ids.items()},
      counts={split: collections.Counter() for split in splits})

