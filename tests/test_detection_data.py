"""Tests of the detection data path and evaluation: VOC parsing and the prepared data of the real BCCD archive,
box transforms, FCOS target assignment, losses, decoding / NMS, COCO mAP and the PNG of detections."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import detector
from jint8.datasets import paths
from jint8.detection import (coco_eval, data, dataset, losses, postprocess, source, targets, transforms, visualize,
                             voc)

BCCD_CLASSES = detector.get_config().dataset.class_names


@pytest.fixture(scope='module')
def bccd_files():
  return source.Files(paths.find_archive('bccd-voc.tar.gz'))


def _bccd(data_dir, eval_split='val'):
  config = detector.get_config().dataset
  config.data_dir, config.eval_split = str(data_dir), eval_split
  return dataset.load(config)


@pytest.fixture(scope='module')
def bccd_data(tmp_path_factory):
  return _bccd(tmp_path_factory.mktemp('tfds'))


# ---------------------------------------------------------------------------------------------------- VOC


def test_parse_every_bccd_annotation(bccd_files):
  annotations = {p: voc.parse_annotation(bccd_files.read(p), p) for p in bccd_files.names
                 if p.startswith('BCCD/Annotations/')}
  assert len(annotations) == 364
  counts = collections.Counter(n for a in annotations.values() for n in a['names'])
  assert counts == {'RBC': 4155, 'WBC': 372, 'Platelets': 361}
  assert max(len(a['boxes']) for a in annotations.values()) == 30
  first = annotations['BCCD/Annotations/BloodImage_00000.xml']
  assert (first['size'], first['filename']) == ((640, 480), 'BloodImage_00000.jpg')
  assert len(first['boxes']) == 20
  np.testing.assert_array_equal(first['boxes'][0], [260, 177, 491, 376])
  assert first['names'][0] == 'WBC'
  assert voc.find_root(bccd_files) == 'BCCD/'
  for split in ('train', 'val', 'test', 'trainval'):
    assert f'BCCD/ImageSets/Main/{split}.txt' in bccd_files


def test_bccd_splits_and_records(bccd_data, tmp_path):
  sizes, boxes = {}, 0
  seen = set()
  with_test = _bccd(tmp_path, eval_split='test')
  assert bccd_data.class_names == with_test.class_names == BCCD_CLASSES and bccd_data.category_ids == (1, 2, 3)
  for data, split in ((bccd_data, 'train'), (bccd_data, 'val'), (with_test, 'test')):
    records = data.split(split)
    sizes[split] = len(records)
    for i in range(len(records)):
      record = records[i]
      boxes += len(record['boxes'])
      seen.add(int(record['image_id']))
      assert record['boxes'].dtype == np.float32 and record['labels'].shape == (len(record['boxes']),)
      assert np.all(record['boxes'][:, 2:] > record['boxes'][:, :2])
      assert np.all(record['boxes'] >= 0) and np.all(record['boxes'][:, [0, 2]] <= 640)
      assert np.all(record['boxes'][:, [1, 3]] <= 480)
  assert sizes == {'train': 205, 'val': 87, 'test': 72}
  assert seen == set(range(364))
  assert boxes == 4888 - 2  # BloodImage_00338 and _00343 each hold one zero-area box
  assert record['image'].shape == (480, 640, 3) and record['image'].dtype == np.uint8
  assert bccd_data.reports == {'train': 'train: 205 images, 2804 boxes; zero-area boxes dropped: 1',
                               'val': 'val: 87 images, 1137 boxes; zero-area boxes dropped: 1'}
  assert bccd_data.max_boxes == 30


# ---------------------------------------------------------------------------------------------- transforms


def test_resize_scales_boxes(rng):
  image = rng.integers(0, 255, (40, 80, 3), np.uint8)
  resized, boxes = transforms.resize(image, np.array([[8, 4, 40, 20], [0, 0, 80, 40]], np.float32), (20, 60))
  assert resized.shape == (20, 60, 3) and resized.dtype == np.uint8
  np.testing.assert_allclose(boxes, [[6, 2, 30, 10], [0, 0, 60, 20]])


def test_flip_moves_boxes_with_the_pixels():
  image = np.zeros((40, 80, 3), np.uint8)
  image[5:25, 10:30] = 255  # the pixels of box (10, 5, 30, 25)
  box = np.array([[10, 5, 30, 25]], np.float32)
  for axis, expected in (('horizontal', [50, 5, 70, 25]), ('vertical', [10, 15, 30, 35])):
    flipped, boxes = transforms.flip(image, box, axis)
    np.testing.assert_array_equal(boxes, [expected])
    rows, cols = np.nonzero(np.asarray(flipped)[..., 0])
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == tuple(expected)
    twice = transforms.flip(*transforms.flip(image, box, axis), axis)
    np.testing.assert_array_equal(twice[0], image)
    np.testing.assert_array_equal(twice[1], box)
  with pytest.raises(ValueError, match='flip axis'):
    transforms.flip(image, box, 'diagonal')


def test_random_flip_keeps_padding_and_pairs_images_with_boxes(rng):
  images = rng.integers(0, 255, (16, 8, 12, 3), np.uint8)
  boxes = np.sort(rng.uniform(0, 8, (16, 3, 4)).astype(np.float32).reshape(16, 3, 2, 2), axis=2).reshape(16, 3, 4)
  valid = np.array([True, True, False])[None].repeat(16, 0)
  out_images, out_boxes = transforms.random_flip(jax.random.key(0), images, boxes, valid, 'horizontal')
  flipped_images, flipped_boxes = transforms.flip(images, boxes, 'horizontal')
  was_flipped = [not np.array_equal(out_images[i], images[i]) for i in range(16)]
  assert 0 < sum(was_flipped) < 16
  for i, f in enumerate(was_flipped):
    np.testing.assert_array_equal(out_images[i], flipped_images[i] if f else images[i])
    np.testing.assert_array_equal(out_boxes[i, :2], flipped_boxes[i, :2] if f else boxes[i, :2])
    np.testing.assert_array_equal(out_boxes[i, 2], boxes[i, 2])


def test_pad_boxes():
  padded = transforms.pad_boxes(np.array([[1, 2, 3, 4]], np.float32), np.array([2]), 3)
  np.testing.assert_array_equal(padded['boxes'], [[1, 2, 3, 4], [0, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(padded['labels'], [2, 0, 0])
  np.testing.assert_array_equal(padded['valid'], [True, False, False])
  with pytest.raises(ValueError, match='more than max_boxes=1'):
    transforms.pad_boxes(np.zeros((2, 4)), np.zeros(2), 1)


def test_train_and_eval_batches(bccd_data):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  split, ground_truth = data.create_split(bccd_data.split('val'), (96, 128), 32, sharding,
                                          max_examples=10)
  assert split.images.shape == (10, 96, 128, 3) and split.image_size == (96, 128)
  assert len(ground_truth) == 10
  gt = ground_truth[0]
  np.testing.assert_allclose(np.asarray(split.boxes[0, :len(gt['boxes'])]), gt['boxes'] * 0.2, rtol=1e-6)
  assert int(split.valid[0].sum()) == len(gt['boxes'])
  order = jnp.arange(10)[::-1]
  batch = data.train_batch(split, order, 1, 4, jax.random.key(0), flips=())
  np.testing.assert_array_equal(batch['images'], np.asarray(split.images)[[5, 4, 3, 2]])
  images, mask = data.eval_batch(split, 2, 4)
  np.testing.assert_array_equal(mask, [True, True, False, False])
  np.testing.assert_array_equal(images[3], split.images[9])
  assert data.num_batches(split, 4) == 3


# ------------------------------------------------------------------------------------------------- targets


def test_locations_and_size_ranges():
  points, strides = targets.locations((16, 32), (8, 16))
  np.testing.assert_array_equal(points[:4], [[4, 4], [12, 4], [20, 4], [28, 4]])
  np.testing.assert_array_equal(points[8:], [[8, 8], [24, 8]])
  np.testing.assert_array_equal(strides, [8] * 8 + [16] * 2)
  np.testing.assert_array_equal(targets.size_ranges((8, 16, 32), (64, 128)), [[0, 64], [64, 128], [128, np.inf]])
  with pytest.raises(ValueError, match='multiple of every stride'):
    targets.locations((20, 32), (8, 16))
  with pytest.raises(ValueError, match='need 2 size boundaries'):
    targets.size_ranges((8, 16, 32), (64,))


def test_assign_hand_made_case():
  loc = targets.Locations((32, 32), (8, 16), size_boundaries=(16,), center_radius=0)
  boxes = jnp.array([[[0, 0, 16, 16], [0, 0, 32, 32], [2, 2, 10, 10], [0, 0, 8, 8]]], jnp.float32)
  labels = jnp.array([[2, 1, 0, 1]])
  valid = jnp.array([[True, True, True, False]])  # the smallest box is padding: never assigned
  t = jax.tree.map(lambda x: np.asarray(x[0]), loc.targets(boxes, labels, valid))

  def at(x, y, stride):
    return int(np.flatnonzero((loc.points[:, 0] == x) & (loc.points[:, 1] == y) & (loc.point_strides == stride))[0])

  # (4, 4): inside boxes 0 and 2 with largest side <= 16; box 2 is smaller.
  assert t['labels'][at(4, 4, 8)] == 0
  np.testing.assert_allclose(t['distances'][at(4, 4, 8)], np.array([2, 2, 6, 6]) / 8)
  np.testing.assert_allclose(t['centerness'][at(4, 4, 8)], np.sqrt(2 / 6 * 2 / 6), rtol=1e-6)
  # (12, 12): outside box 2, inside box 0 -> label 2.
  assert t['labels'][at(12, 12, 8)] == 2
  np.testing.assert_allclose(t['distances'][at(12, 12, 8)], np.array([12, 12, 4, 4]) / 8)
  # (20, 4): only the big box contains it, but its largest side (28) is too big for stride 8.
  assert t['labels'][at(20, 4, 8)] == -1 and t['centerness'][at(20, 4, 8)] == 0
  # Stride 16: (8, 8) -> big box (largest side 24 > 16).
  assert t['labels'][at(8, 8, 16)] == 1
  np.testing.assert_allclose(t['distances'][at(8, 8, 16)], np.array([8, 8, 24, 24]) / 16)
  np.testing.assert_allclose(t['centerness'][at(8, 8, 16)], 1 / 3, rtol=1e-6)
  assert np.sum(t['labels'] >= 0) == 4 + 4  # four stride-8 locations in box 0, all four stride-16 ones


def _assign_reference(points, strides, ranges, boxes, labels, valid, radius):
  """A per-location loop over the FCOS rules, in float64."""
  n = len(points)
  out_labels, out_dist, out_ctr = np.full(n, -1), np.zeros((n, 4)), np.zeros(n)
  for i, ((x, y), s, (lo, hi)) in enumerate(zip(points, strides, ranges)):
    best = None
    for j, (x0, y0, x1, y1) in enumerate(boxes):
      if not valid[j]:
        continue
      ltrb = np.array([x - x0, y - y0, x1 - x, y1 - y], np.float64)
      if radius:
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, radius * s
        inside = max(x0, cx - r) < x < min(x1, cx + r) and max(y0, cy - r) < y < min(y1, cy + r)
      else:
        inside = ltrb.min() > 0
      area = (x1 - x0) * (y1 - y0)
      if inside and lo < ltrb.max() <= hi and (best is None or area < best[0]):
        best = (area, j, ltrb)
    if best:
      _, j, (l, t, r_, b) = best
      out_labels[i], out_dist[i] = labels[j], best[2] / s
      out_ctr[i] = np.sqrt(min(l, r_) / max(l, r_) * min(t, b) / max(t, b))
  return out_labels, out_dist, out_ctr


@pytest.mark.parametrize('center_radius', [0.0, 0.75])
def test_assign_matches_reference(center_radius):
  rng = np.random.default_rng(0)
  loc = targets.Locations((64, 96), (8, 16, 32), size_boundaries=(16, 32), center_radius=center_radius)
  xy = rng.uniform(0, 80, (16, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(8, 48, (16, 2))], axis=1).astype(np.float32)
  labels = rng.integers(0, 3, 16)
  valid = np.arange(16) < 14
  t = loc.targets(boxes[None], labels[None], valid[None])
  ref = _assign_reference(loc.points, loc.point_strides, loc.ranges, boxes, labels, valid, center_radius)
  np.testing.assert_array_equal(t['labels'][0], ref[0])
  np.testing.assert_allclose(t['distances'][0], ref[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(t['centerness'][0], ref[2], rtol=1e-5, atol=1e-6)
  for stride in (8, 16, 32):  # the case has positives on every level
    assert np.any(ref[0][loc.point_strides == stride] >= 0)


# -------------------------------------------------------------------------------------------------- losses


def _giou_reference(pred, target):
  def xyxy(d):
    return np.stack([-d[:, 0], -d[:, 1], d[:, 2], d[:, 3]], axis=1)
  a, b = xyxy(pred.astype(np.float64)), xyxy(target.astype(np.float64))
  area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])
  inter_wh = np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0, None)
  inter = inter_wh[:, 0] * inter_wh[:, 1]
  union = area(a) + area(b) - inter
  hull = np.maximum(a[:, 2:], b[:, 2:]) - np.minimum(a[:, :2], b[:, :2])
  return inter / union - (hull[:, 0] * hull[:, 1] - union) / (hull[:, 0] * hull[:, 1])


def test_giou(rng):
  np.testing.assert_allclose(losses.giou(jnp.ones((1, 4)), jnp.ones((1, 4))), [1.0], rtol=1e-6)
  np.testing.assert_allclose(losses.giou(jnp.ones((1, 4)), 2 * jnp.ones((1, 4))), [0.25], rtol=1e-6)
  pred, target = rng.uniform(0.1, 5, (50, 4)), rng.uniform(0.1, 5, (50, 4))
  np.testing.assert_allclose(losses.giou(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32)),
                             _giou_reference(pred, target), rtol=1e-5, atol=1e-6)


def test_fcos_loss_matches_reference(rng):
  b, n, c = 2, 30, 3
  outputs = {'logits': rng.normal(size=(b, n, c)), 'distances': rng.uniform(0.1, 3, (b, n, 4)),
             'centerness': rng.normal(size=(b, n))}
  labels = np.where(rng.uniform(size=(b, n)) < 0.3, rng.integers(0, c, (b, n)), -1)
  tgt = {'labels': labels, 'distances': rng.uniform(0.1, 3, (b, n, 4)),
         'centerness': np.where(labels >= 0, rng.uniform(0.1, 1, (b, n)), 0.0)}
  loss, terms = losses.fcos_loss(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), outputs),
                                 jax.tree.map(lambda x: jnp.asarray(x), tgt))
  pos = labels >= 0
  p = 1 / (1 + np.exp(-outputs['logits']))
  onehot = np.eye(c)[np.where(pos, labels, 0)] * pos[..., None]
  p_t = np.where(onehot == 1, p, 1 - p)
  alpha_t = np.where(onehot == 1, 0.25, 0.75)
  cls = np.sum(-alpha_t * (1 - p_t) ** 2 * np.log(p_t)) / pos.sum()
  w = tgt['centerness'][pos]
  box = np.sum((1 - _giou_reference(outputs['distances'][pos], tgt['distances'][pos])) * w) / w.sum()
  q = 1 / (1 + np.exp(-outputs['centerness'][pos]))
  ctr = np.sum(-(w * np.log(q) + (1 - w) * np.log(1 - q))) / pos.sum()
  np.testing.assert_allclose(terms['classification_loss'], cls, rtol=1e-4)
  np.testing.assert_allclose(terms['box_loss'], box, rtol=1e-4)
  np.testing.assert_allclose(terms['centerness_loss'], ctr, rtol=1e-4)
  np.testing.assert_allclose(loss, cls + box + ctr, rtol=1e-4)


def test_fcos_loss_without_positives_is_finite():
  outputs = {'logits': jnp.full((1, 5, 3), -2.0), 'distances': jnp.ones((1, 5, 4)), 'centerness': jnp.zeros((1, 5))}
  tgt = {'labels': -jnp.ones((1, 5), jnp.int32), 'distances': jnp.zeros((1, 5, 4)), 'centerness': jnp.zeros((1, 5))}
  loss, terms = losses.fcos_loss(outputs, tgt)
  assert np.isfinite(loss) and terms['box_loss'] == 0 and terms['centerness_loss'] == 0


# ------------------------------------------------------------------------------------- decoding and NMS


def test_decode_picks_the_best_location_and_class():
  loc = targets.Locations((32, 32), (8, 16), size_boundaries=(16,))
  n = len(loc)
  logits = jnp.full((1, n, 3), -9.0).at[0, 17, 2].set(5.0).at[0, 3, 0].set(2.0)
  distances = jnp.ones((1, n, 4)).at[0, 17].set(jnp.array([0.5, 0.25, 1.0, 2.0]))
  out = postprocess.decode({'logits': logits, 'distances': distances, 'centerness': jnp.zeros((1, n))},
                           loc.points, loc.point_strides, top_k=2)
  x, y = loc.points[17]
  assert loc.point_strides[17] == 16
  np.testing.assert_allclose(out['boxes'][0, 0], [x - 8, y - 4, x + 16, y + 32])
  np.testing.assert_array_equal(out['labels'][0], [2, 0])
  np.testing.assert_allclose(out['scores'][0, 0], np.sqrt(1 / (1 + np.exp(-5.0)) * 0.5), rtol=1e-6)


def test_nms_and_select():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10], [0, 0, 9, 10]], np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.6, 0.01])
  labels = np.array([0, 0, 0, 1, 0])
  np.testing.assert_array_equal(postprocess.nms(boxes, scores, labels, 0.5), [0, 2, 3])
  np.testing.assert_allclose(postprocess.box_iou(boxes[:1], boxes[1:3]), [[0.81, 0.0]])
  kept = postprocess.select(boxes, scores, labels, score_threshold=0.05, iou_threshold=0.9, max_detections=2)
  np.testing.assert_array_equal(kept['scores'], [0.9, 0.8])


# ------------------------------------------------------------------------------------------- COCO mAP


def _ground_truth(bccd_data):
  records = bccd_data.split('val')
  return [{'image_id': int(r['image_id']), 'width': 640, 'height': 480, 'boxes': r['boxes'],
           'labels': r['labels']} for r in (records[i] for i in range(len(records)))]


def test_coco_map_is_one_for_ground_truth_and_lower_when_perturbed(bccd_data, rng):
  gt = _ground_truth(bccd_data)
  perfect = [{'image_id': g['image_id'], 'boxes': g['boxes'], 'scores': np.ones(len(g['boxes'])),
              'labels': g['labels']} for g in gt]
  metrics = coco_eval.evaluate(gt, perfect, BCCD_CLASSES)
  for name in ('mAP', 'mAP50', 'mAP75', 'AP/RBC', 'AP/WBC', 'AP/Platelets'):
    assert metrics[name] == pytest.approx(1.0), name
  shifted = [dict(d, boxes=d['boxes'] + rng.uniform(-8, 8, d['boxes'].shape)) for d in perfect]
  noisy = coco_eval.evaluate(gt, shifted, BCCD_CLASSES)
  assert 0.2 < noisy['mAP'] < 0.95 and noisy['mAP50'] > noisy['mAP']
  halved = [dict(d, boxes=d['boxes'][::2], scores=d['scores'][::2], labels=d['labels'][::2]) for d in perfect]
  assert 0.3 < coco_eval.evaluate(gt, halved, BCCD_CLASSES)['mAP'] < 0.7
  assert coco_eval.evaluate(gt, [], BCCD_CLASSES)['mAP'] == 0.0
  with pytest.raises(ValueError, match='no ground-truth entry'):
    coco_eval.evaluate(gt, [dict(perfect[0], image_id=100_000)], BCCD_CLASSES)


def test_coco_map_on_other_category_ids(bccd_data):
  gt = _ground_truth(bccd_data)
  category_ids = (40, 7, 12)  # neither contiguous nor sorted
  coco = coco_eval.coco_ground_truth(gt, BCCD_CLASSES, category_ids)
  assert {c['id']: c['name'] for c in coco.loadCats(coco.getCatIds())} == dict(zip(category_ids, BCCD_CLASSES))
  assert sorted({a['category_id'] for a in coco.dataset['annotations']}) == [7, 12, 40]
  wbc = [g['labels'] == 1 for g in gt]
  only_wbc = [{'image_id': g['image_id'], 'boxes': g['boxes'][w], 'labels': g['labels'][w], 'scores': np.ones(w.sum())}
              for g, w in zip(gt, wbc)]
  metrics = coco_eval.evaluate(gt, only_wbc, BCCD_CLASSES, category_ids)
  assert (metrics['AP/RBC'], metrics['AP/WBC'], metrics['AP/Platelets']) == (0.0, pytest.approx(1.0), 0.0)
  assert metrics['mAP'] == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match='2 category ids for 3 classes'):
    coco_eval.evaluate(gt, only_wbc, BCCD_CLASSES, (1, 2))


# ------------------------------------------------------------------------------------------- PNG


def test_draw_detections_writes_a_png(tmp_path, rng):
  images = [rng.integers(0, 255, (48, 64, 3), np.uint8) for _ in range(4)]
  dets = [{'boxes': np.array([[4, 4, 30, 40]]), 'scores': np.array([0.9]), 'labels': np.array([1])}] * 4
  gts = [{'boxes': np.array([[5, 5, 31, 41]]), 'labels': np.array([1])}] * 4
  path = tmp_path / 'detections.png'
  visualize.draw_detections(path, images, dets, BCCD_CLASSES, gts, columns=2, title='val')
  with Image.open(path) as png:
    assert png.format == 'PNG' and png.size == (1000, 800)
  with pytest.raises(ValueError, match='one entry per image'):
    visualize.draw_detections(path, images, dets[:2], BCCD_CLASSES)
