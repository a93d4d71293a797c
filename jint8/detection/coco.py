"""COCO-format detection annotations: one annotation JSON per split and a folder of its images.

Under the source root (a folder or a .tar.gz), split ``s``'s annotations are the file the template
``annotations`` names with ``{split}`` = ``s`` (``annotations/instances_{split}.json`` by default), its images the
folder ``images`` names (``{split}``), which the images' ``file_name``s are relative to. The ``categories``, the
same in every split, are the classes: sorted by id, so label ``i`` is the ``i``-th smallest category id, and
evaluation reports each under its own id, as it does each image under its ``id``. Boxes are ``bbox`` (x, y, width,
height) in pixels; crowd annotations (``iscrowd`` 1) are skipped and counted: evaluation then scores detections
on crowd regions as false positives, where the official COCO evaluation ignores them.
"""

from __future__ import annotations

import collections
import json
import posixpath
from collections.abc import Sequence
from typing import Any

import numpy as np

from jint8.detection import annotations, source


def read(files: source.Files, splits: Sequence[str], annotation_file: str = 'annotations/instances_{split}.json',
         image_folder: str = '{split}') -> annotations.Annotations:
  """The annotations of ``splits``; ``annotation_file`` and ``image_folder`` are the templates of the module
  docstring. Raises a ValueError naming the file and the entry of anything malformed, unknown or missing."""
  categories, result, counts = None, {}, {}
  for split in splits:
    path = annotation_file.format(split=split)
    content = _load(files, path, split)
    split_categories = _categories(content['categories'], path)
    if categories is None:
      categories, first = split_categories, path
    elif split_categories != categories:
      raise ValueError(f'{path}: the categories differ from those of {first}; every split needs the same')
    counts[split] = collections.Counter()
    result[split] = _images(files, content, path, posixpath.normpath(image_folder.format(split=split)),
                            {c: i for i, c in enumerate(categories)}, counts[split])
  return annotations.Annotations(class_names=tuple(categories.values()), category_ids=tuple(categories),
                                 splits=result, counts=counts)


def _load(files: source.Files, path: str, split: str) -> dict[str, Any]:
  if path not in files:
    raise ValueError(f'{files.path} has no annotation file {path} for the split {split!r} '
                     '(config.dataset.annotations names it)')
  try:
    content = json.loads(files.read(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON: {e}') from None
  if not isinstance(content, dict):
    raise ValueError(f'{path}: a COCO annotation file holds a JSON object, found {type(content).__name__}')
  for key in ('images', 'annotations', 'categories'):
    if not isinstance(content.get(key), list):
      raise ValueError(f'{path}: no list {key!r}; a COCO annotation file has "images", "annotations" and '
                       '"categories"')
  return content


def _field(entry: Any, key: str, kind: type, where: str) -> Any:
  """``entry[key]``, which must be of ``kind``; a ValueError naming ``where`` otherwise."""
  value = entry.get(key) if isinstance(entry, dict) else None
  if not isinstance(value, kind) or isinstance(value, bool):
    raise ValueError(f'{where} has no {key!r} of type {kind.__name__}: {entry!r:.200}')
  return value


def _categories(entries: list, path: str) -> dict[int, str]:
  """Category id -> name, sorted by id."""
  if not entries:
    raise ValueError(f'{path}: "categories" is empty')
  categories = {}
  for i, entry in enumerate(entries):
    category = _field(entry, 'id', int, f'{path}: categories[{i}]')
    if category in categories:
      raise ValueError(f'{path}: category id {category} appears twice in "categories"')
    categories[category] = _field(entry, 'name', str, f'{path}: categories[{i}]')
  repeated = [n for n, c in collections.Counter(categories.values()).items() if c > 1]
  if repeated:
    raise ValueError(f'{path}: category names {annotations.some(repeated)} name more than one category id')
  return dict(sorted(categories.items()))


def _images(files: source.Files, content: dict[str, Any], path: str, folder: str, labels: dict[int, int],
            counts: collections.Counter) -> list[annotations.Image]:
  """The split's images with their boxes; ``labels`` maps category ids to labels."""
  images, names = {}, set()
  for i, entry in enumerate(content['images']):
    where = f'{path}: images[{i}]'
    image_id = _field(entry, 'id', int, where)
    if image_id in images:
      raise ValueError(f'{path}: image id {image_id} appears twice in "images"')
    name = _field(entry, 'file_name', str, where)
    if name in names:
      raise ValueError(f'{path}: file_name {name!r} appears twice in "images"')
    names.add(name)
    file = posixpath.normpath(posixpath.join(folder, name))
    if file not in files:
      raise ValueError(f'{path}: image {image_id}\'s file {file} does not exist in {files.path}')
    size = (entry.get('width'), entry.get('height'))
    images[image_id] = {'name': name, 'path': file, 'boxes': [], 'labels': [],
                        'size': size if all(isinstance(s, int) and s > 0 for s in size) else None}
  for i, entry in enumerate(content['annotations']):
    where = f'{path}: annotation {entry.get("id", i) if isinstance(entry, dict) else i}'
    image_id = _field(entry, 'image_id', int, where)
    if image_id not in images:
      raise ValueError(f'{where} names image {image_id}, which is not in "images"')
    category = _field(entry, 'category_id', int, where)
    if category not in labels:
      raise ValueError(f'{where} names category {category}, which is not in "categories" {sorted(labels)}')
    bbox = _field(entry, 'bbox', list, where)
    if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
      raise ValueError(f'{where}: bbox must be 4 numbers [x, y, width, height], got {bbox!r:.200}')
    if entry.get('iscrowd'):
      counts['crowd annotations skipped'] += 1
      continue
    x, y, w, h = bbox
    images[image_id]['boxes'].append([x, y, x + w, y + h])
    images[image_id]['labels'].append(labels[category])
  return [annotations.Image(name=im['name'], image_id=image_id, path=im['path'], size=im['size'],
                            boxes=np.asarray(im['boxes'], np.float32).reshape(-1, 4),
                            labels=np.asarray(im['labels'], np.int64), origin=f'{path}: image {image_id}')
          for image_id, im in images.items()]
