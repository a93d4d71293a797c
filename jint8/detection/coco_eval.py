"""COCO-style box mAP with pycocotools, from ground truth and detections held in memory."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def _xywh(boxes: np.ndarray) -> np.ndarray:
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _category_ids(class_names: Sequence[str], category_ids: Sequence[int] | None) -> list[int]:
  if category_ids is None:
    return list(range(1, len(class_names) + 1))
  if len(category_ids) != len(class_names):
    raise ValueError(f'{len(category_ids)} category ids for {len(class_names)} classes')
  return [int(c) for c in category_ids]


def coco_ground_truth(images: Sequence[dict], class_names: Sequence[str],
                      category_ids: Sequence[int] | None = None) -> COCO:
  """A ``COCO`` object from ``[{"image_id", "width", "height", "boxes": (n, 4) xyxy, "labels": (n,)}]``.

  Label ``i`` is category ``category_ids[i]`` (None: ``i + 1``).
  """
  category_ids = _category_ids(class_names, category_ids)
  annotations = []
  for image in images:
    for box, label in zip(_xywh(image['boxes']), np.asarray(image['labels']).reshape(-1)):
      if not 0 <= label < len(class_names):
        raise ValueError(f'image {image["image_id"]}: label {label} is not in [0, {len(class_names)})')
      annotations.append({'id': len(annotations) + 1, 'image_id': int(image['image_id']),
                          'category_id': category_ids[label], 'bbox': box.tolist(),
                          'area': float(box[2] * box[3]), 'iscrowd': 0})
  coco = COCO()
  coco.dataset = {
      'images': [{'id': int(im['image_id']), 'width': int(im['width']), 'height': int(im['height'])}
                 for im in images],
      'annotations': annotations,
      'categories': [{'id': c, 'name': name} for c, name in zip(category_ids, class_names)],
  }
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def evaluate(ground_truth: Sequence[dict], detections: Sequence[dict], class_names: Sequence[str],
             category_ids: Sequence[int] | None = None) -> dict[str, float]:
  """COCO box AP of ``detections`` against ``ground_truth``.

  Args:
    ground_truth: per image ``{"image_id", "width", "height", "boxes" (n, 4), "labels" (n,)}``, boxes
      (xmin, ymin, xmax, ymax) in pixels.
    detections: per image ``{"image_id", "boxes" (k, 4), "scores" (k,), "labels" (k,)}``, same coordinates.
    class_names: names of labels 0, 1, ...
    category_ids: the category id of each label, as the source's annotations give it (None: label + 1).

  Returns:
    ``{"mAP": AP@[.5:.95], "mAP50": AP@.5, "mAP75": AP@.75, "AP/<class>": AP@[.5:.95] of each class}``
    (pycocotools' conventions: at most 100 detections per image, 101-point interpolation).
  """
  category_ids = _category_ids(class_names, category_ids)
  gt = coco_ground_truth(ground_truth, class_names, category_ids)
  results = []
  known = set(gt.getImgIds())
  for det in detections:
    if int(det['image_id']) not in known:
      raise ValueError(f'detections for image {det["image_id"]}, which has no ground-truth entry')
    for box, score, label in zip(_xywh(det['boxes']), np.asarray(det['scores']).reshape(-1),
                                 np.asarray(det['labels']).reshape(-1)):
      results.append({'image_id': int(det['image_id']), 'category_id': category_ids[label],
                      'bbox': box.tolist(), 'score': float(score)})
  metrics = {'mAP': 0.0, 'mAP50': 0.0, 'mAP75': 0.0} | {f'AP/{name}': 0.0 for name in class_names}
  if not results:  # pycocotools cannot load an empty result list
    return metrics
  with contextlib.redirect_stdout(io.StringIO()):
    coco_eval = COCOeval(gt, gt.loadRes(results), iouType='bbox')
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
  metrics.update(mAP=coco_eval.stats[0], mAP50=coco_eval.stats[1], mAP75=coco_eval.stats[2])
  # precision: (iou thresholds, recall points, classes in params.catIds order, area ranges, max dets);
  # area "all", 100 detections.
  precision = coco_eval.eval['precision'][:, :, :, 0, -1]
  for category, name in zip(category_ids, class_names):
    k = coco_eval.params.catIds.index(category)
    valid = precision[:, :, k][precision[:, :, k] > -1]
    metrics[f'AP/{name}'] = float(valid.mean()) if valid.size else -1.0
  return {k: float(v) for k, v in metrics.items()}
