"""Tests of detection data from the user's own files: PASCAL VOC folders and archives, COCO JSON with its images,
the checks and counts of preparing (clipped, zero-area and crowd boxes, images without boxes, non-RGB images),
the errors that name bad input, rebuilding when the source changes, COCO mAP on the source's category ids, and
train.py end to end on a COCO dataset."""

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from configs import detector
from jint8.detection import annotations, coco, coco_eval, dataset, source, to_coco, trainer, voc

REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ generated data


def _random_boxes(rng, width, height, n):
  """``n`` boxes (xmin, ymin, xmax, ymax), some reaching outside the image, integers as annotation tools write."""
  xy = rng.integers(-10, [width, height], (n, 2))
  wh = rng.integers(1, [width // 2 + 10, height // 2 + 10], (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def _random_images(rng, classes, count, names=None):
  """``count`` images: ``{name: {"size": (w, h), "names": [class], "boxes": (n, 4)}}``, some without boxes."""
  images = {}
  for i in range(count):
    width, height = (int(v) for v in rng.integers(24, 72, 2))
    n = int(rng.integers(0, 6)) if i % 4 else 0
    images[names[i] if names else f'img{i:03d}'] = {
        'size': (width, height), 'names': [str(c) for c in rng.choice(classes, n)],
        'boxes': _random_boxes(rng, width, height, n)}
  return images


def _expected(image, class_names):
  """Boxes clipped to the image, zero-area ones dropped, and their labels, computed box by box."""
  width, height = image['size']
  boxes, labels = [], []
  for name, (x0, y0, x1, y1) in zip(image['names'], image['boxes']):
    box = [min(max(x0, 0), width), min(max(y0, 0), height), min(max(x1, 0), width), min(max(y1, 0), height)]
    if box[2] > box[0] and box[3] > box[1]:
      boxes.append(box)
      labels.append(class_names.index(name))
  return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def _save_image(path, rng, size, mode='RGB', fmt=None):
  """A random image of ``size`` (w, h) in ``mode``; returns its pixels as RGB, as a reader should see them."""
  pixels = rng.integers(0, 256, (size[1], size[0], 3), np.uint8)
  image = Image.fromarray(pixels).convert(mode)
  if mode == 'RGBA':
    image.putalpha(Image.fromarray(rng.integers(0, 256, (size[1], size[0]), np.uint8)))
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, format=fmt)
  with Image.open(path) as saved:
    return np.asarray(saved.convert('RGB'))


def _voc_xml(name, filename, size, objects):
  xml = ''.join(f'<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>'
                f'<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>' for c, b in objects)
  size_xml = f'<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>' if size else ''
  return f'<annotation><folder>JPEGImages</folder><filename>{filename}</filename>{size_xml}{xml}</annotation>'


def _write_voc(root, rng, images, splits):
  """A VOC root under ``root``: PNG images (lossless: the test compares pixels), XML annotations, split files."""
  for name, image in images.items():
    _save_image(root / 'JPEGImages' / f'{name}.png', rng, image['size'])
    (root / 'Annotations').mkdir(parents=True, exist_ok=True)
    (root / 'Annotations' / f'{name}.xml').write_text(
        _voc_xml(name, f'{name}.png', image['size'], zip(image['names'], image['boxes'])))
  (root / 'ImageSets' / 'Main').mkdir(parents=True, exist_ok=True)
  for split, names in splits.items():
    (root / 'ImageSets' / 'Main' / f'{split}.txt').write_text(''.join(f'{n}\n' for n in names))


def _write_coco(root, rng, splits, categories, crowd=()):
  """COCO files under ``root``: ``annotations/instances_<split>.json`` and PNGs in ``<split>/``.

  ``splits``: split -> images as ``_random_images`` makes them, class names being category names; ``crowd``:
  names of images whose first box is a crowd annotation.
  """
  ids = {name: i for i, name in categories.items()}
  image_id, annotation_id = 1000, 1
  for split, images in splits.items():
    content = {'info': {}, 'images': [], 'annotations': [],
               'categories': [{'id': i, 'name': n, 'supercategory': 'x'} for i, n in categories.items()]}
    for name, image in images.items():
      image_id += 7
      image['id'] = image_id
      _save_image(root / split / f'{name}.png', rng, image['size'])
      content['images'].append({'id': image_id, 'file_name': f'{name}.png', 'width': image['size'][0],
                                'height': image['size'][1]})
      for j, (c, (x0, y0, x1, y1)) in enumerate(zip(image['names'], image['boxes'])):
        content['annotations'].append({'id': annotation_id, 'image_id': image_id, 'category_id': ids[c],
                                       'bbox': [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                                       'area': float((x1 - x0) * (y1 - y0)),
                                       'iscrowd': int(name in crowd and j == 0)})
        annotation_id += 1
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    (root / 'annotations' / f'instances_{split}.json').write_text(json.dumps(content))


def _config(path, data_dir, **overrides):
  """``config.dataset`` of configs/detector.py for the data at ``path``, classes taken from the data."""
  d = detector.get_config().dataset
  d.path, d.data_dir, d.class_names = str(path), str(data_dir), ()
  for key, value in overrides.items():
    d[key] = value
  dataset.validate_config(d)
  return d


def _records(data, split):
  source_ = data.split(split)
  return {r['name'].decode(): r for r in (source_[i] for i in range(len(source_)))}


# -------------------------------------------------------------------------------------------------- files


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


# ---------------------------------------------------------------------------------------------------- VOC


@pytest.mark.parametrize('packed', [False, True])
def test_voc_folder_or_archive_any_classes(tmp_path, rng, packed):
  classes = [f'c{c}' for c in rng.choice(100, int(rng.integers(2, 6)), replace=False)]
  images = _random_images(rng, classes, 12)
  names = list(images)
  splits = {'train': names[:8], 'val': names[8:]}
  trained = {c for n in splits['train'] for c in images[n]['names']}
  for name in splits['val']:  # classes the training split lacks are an error (test_voc_errors_name_the_problem)
    image = images[name]
    keep = np.array([c in trained for c in image['names']], bool)
    image['names'], image['boxes'] = [c for c in image['names'] if c in trained], image['boxes'][keep]
  _write_voc(tmp_path / 'mine' / 'VOC', rng, images, splits)
  path = tmp_path / 'mine'
  if packed:
    with tarfile.open(tmp_path / 'mine.tar.gz', 'w:gz') as archive:
      archive.add(path, arcname='mine')
    path = tmp_path / 'mine.tar.gz'
  data = dataset.load(_config(path, tmp_path / 'tfds'))
  class_names = sorted({c for n in splits['train'] for c in images[n]['names']})  # the training split's classes
  assert data.class_names == tuple(class_names) and data.category_ids == tuple(range(1, len(class_names) + 1))
  counts = collections.Counter()
  for split, split_names in splits.items():
    records = _records(data, split)
    assert sorted(records) == sorted(split_names)
    for name in split_names:
      boxes, labels = _expected(images[name], class_names)
      np.testing.assert_array_equal(records[name]['boxes'], boxes)
      np.testing.assert_array_equal(records[name]['labels'], labels)
      with Image.open(tmp_path / 'mine' / 'VOC' / 'JPEGImages' / f'{name}.png') as png:
        np.testing.assert_array_equal(records[name]['image'], np.asarray(png))
      assert records[name]['image_id'] == sorted(images).index(name)
      counts[split] += len(boxes)
    assert data.reports[split].startswith(f'{split}: {len(split_names)} images, {counts[split]} boxes; ')
  assert data.max_boxes == max(len(_expected(im, class_names)[0]) for im in images.values())


def test_voc_explicit_class_names_and_their_order(tmp_path, rng):
  images = _random_images(rng, ['cat', 'dog', 'emu'], 6)
  _write_voc(tmp_path / 'voc', rng, images, {'train': list(images), 'val': list(images)[:2]})
  data = dataset.load(_config(tmp_path / 'voc', tmp_path / 'tfds', class_names=('emu', 'dog', 'cat', 'yak')))
  assert data.class_names == ('emu', 'dog', 'cat', 'yak')
  for name, record in _records(data, 'train').items():
    np.testing.assert_array_equal(record['labels'], _expected(images[name], list(data.class_names))[1])


def test_voc_checks_boxes_and_counts_them(tmp_path, rng):
  objects = {'a': [('x', (-5, 2, 30, 20)), ('y', (10, 10, 10, 30)), ('x', (70, 0, 90, 10)), ('y', (1, 1, 59, 39))],
             'b': [('y', (5, 5, 9, 90))], 'c': [], 'd': [('x', (3, 3, 3, 3))]}
  images = {n: {'size': (60, 40), 'names': [c for c, _ in o], 'boxes': np.asarray([b for _, b in o]).reshape(-1, 4)}
            for n, o in objects.items()}
  _write_voc(tmp_path / 'voc', rng, images, {'train': ['a', 'b', 'c', 'd'], 'val': ['b']})
  data = dataset.load(_config(tmp_path / 'voc', tmp_path / 'tfds'))
  records = _records(data, 'train')
  np.testing.assert_array_equal(records['a']['boxes'], [[0, 2, 30, 20], [1, 1, 59, 39]])
  np.testing.assert_array_equal(records['a']['labels'], [0, 1])
  np.testing.assert_array_equal(records['b']['boxes'], [[5, 5, 9, 40]])
  assert records['c']['boxes'].shape == records['d']['boxes'].shape == (0, 4)  # negatives, kept
  assert data.reports['train'] == ('train: 4 images, 3 boxes; boxes clipped to the image: 2, zero-area boxes '
                                   'dropped: 3, images without boxes kept as negatives: 2')
  assert data.reports['val'] == 'val: 1 images, 1 boxes; boxes clipped to the image: 1'
  skipped = dataset.load(_config(tmp_path / 'voc', tmp_path / 'tfds', empty_images='skip'))
  assert sorted(_records(skipped, 'train')) == ['a', 'b']
  assert skipped.reports['train'].endswith('images without boxes skipped: 2')
  assert skipped.builder.data_dir != data.builder.data_dir  # another setting, other prepared data


def test_non_rgb_images_are_converted(tmp_path, rng):
  kinds = {'gray': ('L', 'JPEG', 'jpg'), 'cmyk': ('CMYK', 'JPEG', 'jpg'), 'alpha': ('RGBA', 'PNG', 'png'),
           'palette': ('P', 'PNG', 'png'), 'bitmap': ('RGB', 'BMP', 'bmp'), 'plain': ('RGB', 'JPEG', 'jpg')}
  root = tmp_path / 'voc'
  pixels = {}
  for name, (mode, fmt, ext) in kinds.items():
    size = tuple(int(v) for v in rng.integers(16, 48, 2))
    pixels[name] = _save_image(root / 'JPEGImages' / f'{name}.{ext}', rng, size, mode, fmt)
    (root / 'Annotations').mkdir(exist_ok=True)
    (root / 'Annotations' / f'{name}.xml').write_text(_voc_xml(name, f'{name}.{ext}', size, [('x', (1, 1, 9, 9))]))
  (root / 'ImageSets' / 'Main').mkdir(parents=True)
  (root / 'ImageSets' / 'Main' / 'train.txt').write_text('\n'.join(kinds))
  data = dataset.load(_config(root, tmp_path / 'tfds', eval_split='train'))
  for name, record in _records(data, 'train').items():
    assert record['image'].shape == pixels[name].shape and record['image'].dtype == np.uint8
    np.testing.assert_array_equal(record['image'], pixels[name], err_msg=name)
  assert data.reports['train'] == ('train: 6 images, 6 boxes; JPEG L images converted to RGB: 1, JPEG CMYK images '
                                   'converted to RGB: 1, PNG RGBA images converted to RGB: 1, PNG P images converted '
                                   'to RGB: 1, BMP RGB images converted to RGB: 1')


def _small_voc(root, rng):
  images = {n: {'size': (40, 30), 'names': ['x', 'y'], 'boxes': np.array([[1, 1, 20, 20], [5, 5, 30, 25]])}
            for n in ('a', 'b', 'c')}
  _write_voc(root, rng, images, {'train': ['a', 'b'], 'val': ['c']})


@pytest.mark.parametrize('break_it, message', [
    (lambda r: (r / 'Annotations' / 'c.xml').write_text(_voc_xml('c', 'c.png', (40, 30), [('zebra', (1, 1, 5, 5))])),
     r"Annotations/c.xml: class 'zebra' is not one of \('x', 'y'\) \(the classes of the training split 'train'\)"),
    (lambda r: (r / 'JPEGImages' / 'b.png').unlink(),
     r"^Annotations/b.xml: no image file for 'b': expected JPEGImages/b.png, found none named b\.\*$"),
    (lambda r: (r / 'ImageSets' / 'Main' / 'val.txt').write_text('c\nq1\nq2\n'),
     r"ImageSets/Main/val.txt names 2 ids without an annotation file Annotations/<id>.xml: 'q1', 'q2'"),
    (lambda r: (r / 'ImageSets' / 'Main' / 'train.txt').write_text('a\nb\na\n'),
     r"ImageSets/Main/train.txt lists 'a' more than once"),
    (lambda r: (r / 'ImageSets' / 'Main' / 'val.txt').unlink(),
     r"has no VOC split 'val' \(ImageSets/Main/val.txt is missing\)"),
    (lambda r: (r / 'ImageSets' / 'Main' / 'val.txt').write_text('\n'),
     r"the VOC split 'val' \(ImageSets/Main/val.txt\) lists no images"),
    (lambda r: (r / 'Annotations' / 'a.xml').write_text('<annotation><object>'),
     r'Annotations/a.xml: malformed VOC annotation XML'),
    (lambda r: (r / 'Annotations' / 'a.xml').write_text(
        '<annotation><object><name>x</name><bndbox><xmin>1</xmin></bndbox></object></annotation>'),
     r'Annotations/a.xml: object 0 \(x\) has no <bndbox/ymin>'),
    (lambda r: (r / 'Annotations' / 'a.xml').write_text(_voc_xml('a', 'a.png', (40, 30), [('x', ('1', 'two', 3, 4))])),
     r'Annotations/a.xml: object 0 \(x\) has <bndbox/ymin>two</bndbox/ymin>, not a number'),
    (lambda r: (r / 'Annotations' / 'a.xml').write_text(_voc_xml('a', 'a.png', (41, 30), [])),
     r'Annotations/a.xml gives the size 41x30 but the image JPEGImages/a.png is 40x30'),
    (lambda r: (r / 'JPEGImages' / 'c.png').write_bytes(b'\x89PNG not really'),
     r'JPEGImages/c.png: cannot read the image or convert it to RGB'),
    (lambda r: _small_voc(r / 'more', np.random.default_rng(0)),
     r"must hold exactly one VOC root \(Annotations/, JPEGImages/, ImageSets/Main/\), found \['', 'more/'\]"),
])
def test_voc_errors_name_the_problem(tmp_path, rng, break_it, message):
  root = tmp_path / 'voc'
  _small_voc(root, rng)
  break_it(root)
  with pytest.raises(ValueError, match=message):
    dataset.load(_config(root, tmp_path / 'tfds'))


def test_voc_unknown_class_with_explicit_names(tmp_path, rng):
  _small_voc(tmp_path / 'voc', rng)
  with pytest.raises(ValueError, match=r"Annotations/a.xml: class 'x' is not one of \('y', 'z'\) "
                                       r"\(config.dataset.class_names; '\(\)' takes the training split's classes\)"):
    dataset.load(_config(tmp_path / 'voc', tmp_path / 'tfds', class_names=('y', 'z')))


def test_voc_image_found_by_id_when_the_xml_names_another_file(tmp_path, rng):
  root = tmp_path / 'voc'
  _small_voc(root, rng)
  (root / 'Annotations' / 'a.xml').write_text(_voc_xml('a', 'renamed.jpg', None, [('x', (1, 1, 9, 9))]))
  (root / 'JPEGImages' / 'a.png').rename(root / 'JPEGImages' / 'a.jpeg')
  files = source.Files(root)
  found = voc.read(files, ['train', 'val'])
  image = found.splits['train'][0]
  assert (image.name, image.path, image.size) == ('a', 'JPEGImages/a.jpeg', None)  # no <size>: the image's own
  _save_image(root / 'JPEGImages' / 'a.png', rng, (40, 30))
  with pytest.raises(ValueError, match=r"no image file for 'a': expected JPEGImages/renamed.jpg, found "
                                       r"\['JPEGImages/a.jpeg', 'JPEGImages/a.png'\]"):
    voc.read(source.Files(root), ['train', 'val'])


# --------------------------------------------------------------------------------------------------- COCO


def test_coco_maps_category_ids_to_labels_and_skips_crowds(tmp_path, rng):
  ids = sorted(int(i) for i in rng.choice(np.arange(1, 90), 4, replace=False))
  names = [f'thing{i}' for i in rng.permutation(4)]
  categories = dict(zip(ids[::-1], names[::-1]))  # listed out of order: the labels follow the sorted ids
  splits = {'train2017': _random_images(rng, names, 9),
            'val2017': _random_images(rng, names, 5, [f'v{i}' for i in range(5)])}
  crowded = [n for n, im in splits['train2017'].items() if len(im['names'])][:2]
  _write_coco(tmp_path / 'coco', rng, splits, categories, crowd=crowded)
  data = dataset.load(_config(tmp_path / 'coco', tmp_path / 'tfds', format='coco', train_split='train2017',
                              eval_split='val2017', class_names=('ignored', 'for', 'coco')))
  assert data.category_ids == tuple(ids) and data.class_names == tuple(categories[i] for i in ids)
  class_names = list(data.class_names)
  for split, images in splits.items():
    records = _records(data, split)
    assert sorted(records) == sorted(f'{n}.png' for n in images)
    for name, image in images.items():
      record = records[f'{name}.png']
      if name in crowded:  # its first box is a crowd region
        image = dict(image, names=image['names'][1:], boxes=image['boxes'][1:])
      boxes, labels = _expected(image, class_names)
      np.testing.assert_allclose(record['boxes'], boxes, rtol=1e-6)
      np.testing.assert_array_equal(record['labels'], labels)
      assert record['image_id'] == image['id']
  assert 'crowd annotations skipped: 2' in data.reports['train2017']


def _small_coco(root, rng):
  images = {n: {'size': (40, 30), 'names': ['p', 'q'], 'boxes': np.array([[1, 1, 20, 20], [5, 5, 30, 25]])}
            for n in ('a', 'b')}
  _write_coco(root, rng, {'train': images, 'val': {'c': dict(images['a'])}}, {3: 'p', 9: 'q'})


def _edit_json(path, edit):
  content = json.loads(path.read_text())
  edit(content)
  path.write_text(json.dumps(content))


@pytest.mark.parametrize('break_it, message', [
    (lambda r: _edit_json(r / 'annotations' / 'instances_val.json',
                          lambda c: c['annotations'][0].update(category_id=4)),
     r'instances_val.json: annotation \d+ names category 4, which is not in "categories" \[3, 9\]'),
    (lambda r: _edit_json(r / 'annotations' / 'instances_train.json',
                          lambda c: c['annotations'][1].update(image_id=5)),
     r'instances_train.json: annotation 2 names image 5, which is not in "images"'),
    (lambda r: (r / 'train' / 'b.png').unlink(),
     r"instances_train.json: image \d+'s file train/b.png does not exist in"),
    (lambda r: (r / 'annotations' / 'instances_val.json').unlink(),
     r"has no annotation file annotations/instances_val.json for the split 'val' \(config.dataset.annotations"),
    (lambda r: (r / 'annotations' / 'instances_train.json').write_text('{"images": ['),
     r'annotations/instances_train.json: not valid JSON'),
    (lambda r: _edit_json(r / 'annotations' / 'instances_train.json', lambda c: c.pop('categories')),
     r'instances_train.json: no list \'categories\''),
    (lambda r: _edit_json(r / 'annotations' / 'instances_val.json', lambda c: c['categories'][1].update(name='z')),
     r'instances_val.json: the categories differ from those of annotations/instances_train.json'),
    (lambda r: _edit_json(r / 'annotations' / 'instances_train.json', lambda c: c['categories'][1].update(id=3)),
     r'instances_train.json: category id 3 appears twice'),
    (lambda r: _edit_json(r / 'annotations' / 'instances_train.json', lambda c: c['categories'][1].update(name='p')),
     r"instances_train.json: category names 'p' name more than one category id"),
    (lambda r: _edit_json(r / 'annotations' / 'instances_train.json',
                          lambda c: c['images'].append(dict(c['images'][0]))),
     r'instances_train.json: image id \d+ appears twice'),
    (lambda r: _edit_json(r / 'annotations' / 'instances_train.json', lambda c: c['images'][1].pop('file_name')),
     r"instances_train.json: images\[1\] has no 'file_name' of type str"),
    (lambda r: _edit_json(r / 'annotations' / 'instances_train.json',
                          lambda c: c['annotations'][0].update(bbox=[1, 2, 3])),
     r'instances_train.json: annotation 1: bbox must be 4 numbers'),
    (lambda r: _edit_json(r / 'annotations' / 'instances_train.json', lambda c: c['images'][0].update(width=50)),
     r'instances_train.json: image \d+ gives the size 50x30 but the image train/a.png is 40x30'),
])
def test_coco_errors_name_the_problem(tmp_path, rng, break_it, message):
  _small_coco(tmp_path / 'coco', rng)
  break_it(tmp_path / 'coco')
  with pytest.raises(ValueError, match=message):
    dataset.load(_config(tmp_path / 'coco', tmp_path / 'tfds', format='coco'))


def test_coco_templates_name_other_layouts(tmp_path, rng):
  images = _random_images(rng, ['p', 'q'], 4)
  _write_coco(tmp_path / 'plain', rng, {'train': images}, {5: 'p', 6: 'q'})
  root = tmp_path / 'roboflow'  # another layout: train/_annotations.coco.json beside the images
  (root / 'train').mkdir(parents=True)
  (tmp_path / 'plain' / 'annotations' / 'instances_train.json').rename(root / 'train' / '_annotations.coco.json')
  for png in (tmp_path / 'plain' / 'train').iterdir():
    png.rename(root / 'train' / png.name)
  found = coco.read(source.Files(root), ['train'], '{split}/_annotations.coco.json', '{split}')
  assert sorted(image.path for image in found.splits['train']) == sorted(f'train/{n}.png' for n in images)
  assert found.class_names == ('p', 'q') and found.category_ids == (5, 6)


# ---------------------------------------------------------------------------------- preparing and config


def test_prepared_data_is_rebuilt_when_the_source_changes(tmp_path, rng, capsys):
  _small_voc(tmp_path / 'voc', rng)
  config = _config(tmp_path / 'voc', tmp_path / 'tfds')
  first = dataset.load(config)
  fingerprint = first.builder.info.metadata['source']
  assert fingerprint == source.Files(tmp_path / 'voc').fingerprint()
  marker = pathlib.Path(first.builder.data_dir) / 'marker'
  marker.write_text('')
  assert dataset.load(config).reports == first.reports and marker.exists()  # unchanged: reused
  capsys.readouterr()
  (tmp_path / 'voc' / 'Annotations' / 'c.xml').write_text(_voc_xml('c', 'c.png', (40, 30), [('y', (2, 3, 9, 9))]))
  again = dataset.load(config)
  assert 'changed since' in capsys.readouterr().out and not marker.exists()
  assert again.builder.data_dir == first.builder.data_dir
  assert again.builder.info.metadata['source']['sha256'] != fingerprint['sha256']
  np.testing.assert_array_equal(_records(again, 'val')['c']['boxes'], [[2, 3, 9, 9]])
  np.testing.assert_array_equal(_records(again, 'val')['c']['labels'], [1])


def test_config_errors_name_the_key(tmp_path):
  cases = [({'format': 'yolo'}, r"config.dataset.format: 'yolo' is not one of \('voc', 'coco'\)"),
           ({'path': ''}, 'config.dataset.path: name the data'),
           ({'class_names': ('a', 'a')}, 'config.dataset.class_names must be distinct non-empty names'),
           ({'empty_images': 'drop'}, "config.dataset.empty_images: 'drop' is not one of"),
           ({'annotations': 'ann/{set}.json'}, r"config.dataset.annotations: 'ann/\{set\}.json' is not a template"),
           ({'eval_split': ''}, 'config.dataset.train_split / eval_split: name both splits')]
  for overrides, message in cases:
    d = detector.get_config().dataset
    for key, value in overrides.items():
      d[key] = value
    with pytest.raises(ValueError, match=message):
      dataset.validate_config(d)
  with pytest.raises(FileNotFoundError, match=f'config.dataset.path: {tmp_path}/nothing does not exist'):
    dataset.locate(str(tmp_path / 'nothing'))
  with pytest.raises(FileNotFoundError, match=r"'nothing.tar.gz' not found.*\(config.dataset.path\)"):
    dataset.locate('nothing.tar.gz')


def test_fit_and_report():
  counts = collections.Counter()
  image = annotations.Image(name='a', image_id=0, path='a.jpg', size=None, origin='a.xml',
                            boxes=np.array([[-1, 0, 5, 5], [2, 2, 2, 9], [1, 1, 4, 4]], np.float32),
                            labels=np.array([3, 1, 2]))
  boxes, labels = annotations.fit(image, 4, 8, 'keep', counts)
  np.testing.assert_array_equal(boxes, [[0, 0, 4, 5], [1, 1, 4, 4]])
  np.testing.assert_array_equal(labels, [3, 2])
  assert annotations.fit(dataclasses.replace(image, boxes=image.boxes + 100), 4, 8, 'skip', counts) is None
  assert annotations.report('val', counts) == ('val: 1 images, 2 boxes; boxes clipped to the image: 1, zero-area '
                                               'boxes dropped: 4, images without boxes skipped: 1')
  assert annotations.report('test', collections.Counter(images=3)) == ('test: 3 images, 0 boxes; no box or image '
                                                                       'needed a change')


def test_max_boxes_below_the_data_is_an_error(tmp_path, rng):
  _small_voc(tmp_path / 'voc', rng)  # two boxes an image
  config = detector.get_config()
  config.dataset = _config(tmp_path / 'voc', tmp_path / 'tfds', max_boxes=1)
  with pytest.raises(ValueError, match='config.dataset.max_boxes: 1 is fewer than the 2 boxes of the fullest image'):
    trainer.train_and_evaluate(config, tmp_path / 'run')


# ----------------------------------------------------------------------------------------------- COCO mAP


def test_voc_written_as_coco_prepares_the_same_examples(tmp_path, rng):
  """to_coco writes a VOC root so that the COCO reader prepares the same images, boxes, labels, image ids and
  classes (the names become file names); a missing source is one line naming it."""
  names = [f'id{i}' for i in range(9)]
  images = _random_images(rng, ['cat', 'ant', 'bat'], 9, names)
  _write_voc(tmp_path / 'voc', rng, images, {'train': names[:6], 'val': names[6:]})
  assert to_coco.main([str(tmp_path / 'voc'), str(tmp_path / 'coco')]) == 0
  from_voc = dataset.load(_config(tmp_path / 'voc', tmp_path / 'tfds'))
  from_coco = dataset.load(_config(tmp_path / 'coco', tmp_path / 'tfds', format='coco'))
  assert from_coco.class_names == from_voc.class_names == ('ant', 'bat', 'cat')
  assert from_coco.category_ids == from_voc.category_ids == (1, 2, 3)
  for split in ('train', 'val'):
    voc_records, coco_records = _records(from_voc, split), _records(from_coco, split)
    assert sorted(coco_records) == sorted(f'{n}.png' for n in voc_records)
    for name, record in voc_records.items():
      other = coco_records[f'{name}.png']
      assert int(other['image_id']) == int(record['image_id'])
      np.testing.assert_array_equal(other['image'], record['image'])
      np.testing.assert_array_equal(other['boxes'], record['boxes'])
      np.testing.assert_array_equal(other['labels'], record['labels'])
  assert to_coco.main([str(tmp_path / 'absent'), str(tmp_path / 'out')]) == 1


def test_map_is_reported_on_the_source_category_ids(tmp_path, rng):
  """coco_eval on labels and category ids gives what pycocotools gives on the original JSON and detections."""
  names = ['p', 'q', 'r']
  images = _random_images(rng, names, 8)
  for image in images.values():  # boxes inside the image: the original JSON then matches the prepared data
    image['boxes'] = np.clip(image['boxes'], 0, list(image['size']) * 2)
    keep = (image['boxes'][:, 2] > image['boxes'][:, 0]) & (image['boxes'][:, 3] > image['boxes'][:, 1])
    image['boxes'], image['names'] = image['boxes'][keep], [n for n, k in zip(image['names'], keep) if k]
  category_ids = {17: 'p', 4: 'q', 40: 'r'}
  _write_coco(tmp_path / 'coco', rng, {'val': images}, category_ids)
  data = dataset.load(_config(tmp_path / 'coco', tmp_path / 'tfds', format='coco', train_split='val'))
  records = _records(data, 'val')
  ground_truth, detections, results = [], [], []
  for name, image in images.items():
    record = records[f'{name}.png']
    ground_truth.append({'image_id': int(record['image_id']), 'width': image['size'][0],
                         'height': image['size'][1], 'boxes': record['boxes'], 'labels': record['labels']})
    n = len(record['boxes']) + 2
    boxes = np.concatenate([record['boxes'], _random_boxes(rng, *image['size'], 2)]) + rng.uniform(-3, 3, (n, 4))
    labels = np.concatenate([record['labels'], rng.integers(0, 3, 2)])
    labels[rng.uniform(size=n) < 0.2] = rng.integers(0, 3)  # some detections of the wrong class
    det = {'image_id': int(record['image_id']), 'boxes': boxes, 'scores': rng.uniform(0.1, 1, n), 'labels': labels}
    detections.append(det)
    for box, score, label in zip(boxes, det['scores'], det['labels']):
      results.append({'image_id': det['image_id'], 'category_id': data.category_ids[label], 'score': float(score),
                      'bbox': [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
  ours = coco_eval.evaluate(ground_truth, detections, data.class_names, data.category_ids)
  original = COCO(str(tmp_path / 'coco' / 'annotations' / 'instances_val.json'))
  official = COCOeval(original, original.loadRes(results), iouType='bbox')
  official.evaluate()
  official.accumulate()
  official.summarize()
  assert 0.05 < ours['mAP'] < 0.95
  np.testing.assert_allclose([ours['mAP'], ours['mAP50'], ours['mAP75']], official.stats[:3], rtol=1e-9)
  for k, category in enumerate(official.params.catIds):  # per class, by the original id
    precision = official.eval['precision'][:, :, k, 0, -1]
    expected = precision[precision > -1].mean() if np.any(precision > -1) else -1.0  # -1: no ground truth
    np.testing.assert_allclose(ours[f'AP/{category_ids[category]}'], expected, rtol=1e-9)
  gt = coco_eval.coco_ground_truth(ground_truth, data.class_names, data.category_ids)
  assert sorted(gt.getCatIds()) == [4, 17, 40] and gt.loadCats(17)[0]['name'] == 'p'


# ----------------------------------------------------------------------------------------------- train.py


def test_train_py_on_coco_data_end_to_end(tmp_path, rng):
  names = ['ant', 'bee', 'cow', 'dog', 'eel']
  splits = {'train': _random_images(rng, names, 10), 'val': _random_images(rng, names, 6, [f'v{i}' for i in range(6)])}
  _write_coco(tmp_path / 'mydata', rng, splits, {2: 'ant', 3: 'bee', 11: 'cow', 12: 'dog', 50: 'eel'})
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  workdir = tmp_path / 'run'
  command = [sys.executable, str(REPO / 'train.py'), f'--config={REPO / "configs" / "detector.py"}',
             f'--workdir={workdir}', '--config.dataset.format=coco', f'--config.dataset.path={tmp_path / "mydata"}',
             f'--config.dataset.data_dir={tmp_path / "tfds"}', '--config.precision=fp32',
             '--config.model_kwargs.width=0.125', '--config.fcos.features=8', '--config.fcos.groups=4',
             '--config.fcos.head_convs=1', '--config.dataset.image_size=(64, 64)',
             '--config.fcos.size_boundaries=(12, 24)', '--config.batch_size=4', '--config.eval_batch_size=4',
             '--config.num_train_steps=2', '--config.log_every_steps=2', '--config.eval_every_steps=2',
             '--config.checkpoint_every_steps=2', '--config.optimizer.warmup_epochs=0', '--config.num_visualize=2',
             '--config.dataset.max_boxes=0']  # 0: as many as the fullest image holds
  result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  final = [json.loads(line)['final_val'] for line in result.stdout.splitlines() if line.startswith('{"final_val"')]
  assert len(final) == 1
  assert set(final[0]) == {'mAP', 'mAP50', 'mAP75'} | {f'AP/{n}' for n in names}  # the data's classes, all five
  assert all(0 <= v <= 1 or v == -1 for v in final[0].values())
  assert 'train: 10 images' in result.stdout and 'val: 6 images' in result.stdout
  assert (workdir / 'detections.png').exists()
  saved = ocp.StandardCheckpointer().metadata(workdir / 'checkpoints' / '2' / 'default').item_metadata
  assert saved['state']['params']['head']['cls_logits']['bias'].shape == (5,)  # a logit per class of the data
