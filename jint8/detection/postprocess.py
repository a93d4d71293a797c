"""From FCOS outputs to detections: top-k decoding on the device, per-class NMS on the host."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def decode(outputs: dict[str, jax.Array], points: jax.Array, point_strides: jax.Array,
           top_k: int) -> dict[str, jax.Array]:
  """The ``top_k`` best (location, class) pairs of each image, scored ``sqrt(p_class * p_centerness)``.

  Args:
    outputs: the detector's ``{"logits", "distances", "centerness"}`` (see ``fcos.FCOS``).
    points, point_strides: the locations (``targets.locations``).
    top_k: candidates kept per image (capped at locations x classes).

  Returns:
    ``{"boxes": (b, k, 4) xmin/ymin/xmax/ymax in input pixels, "scores": (b, k), "labels": (b, k)}``.
  """
  batch, num_points, num_classes = outputs['logits'].shape
  scores = jnp.sqrt(jax.nn.sigmoid(outputs['logits'])
                    * jax.nn.sigmoid(outputs['centerness'])[..., None]).reshape(batch, -1)
  scores, index = jax.lax.top_k(scores, min(top_k, num_points * num_classes))
  point, label = index // num_classes, index % num_classes
  distances = jnp.take_along_axis(outputs['distances'], point[..., None], axis=1)
  distances = distances * jnp.asarray(point_strides)[point][..., None]
  xy = jnp.asarray(points)[point]
  boxes = jnp.concatenate([xy - distances[..., :2], xy + distances[..., 2:]], axis=-1)
  return {'boxes': boxes, 'scores': scores, 'labels': label.astype(jnp.int32)}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Pairwise IoU ``(n, m)`` of xmin/ymin/xmax/ymax boxes ``(n, 4)`` and ``(m, 4)``."""
  area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
  area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
  low = np.maximum(a[:, None, :2], b[None, :, :2])
  high = np.minimum(a[:, None, 2:], b[None, :, 2:])
  intersection = np.prod(np.clip(high - low, 0, None), axis=2)
  union = area_a[:, None] + area_b[None, :] - intersection
  return intersection / np.maximum(union, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
  """Greedy non-maximum suppression within each class; returns kept indices, best score first."""
  order = np.argsort(-scores, kind='stable')
  iou = box_iou(boxes[order], boxes[order])
  same_class = labels[order][:, None] == labels[order][None, :]
  suppressed = np.zeros(len(order), bool)
  for i in range(len(order)):
    if not suppressed[i]:
      suppressed[i + 1:] |= (iou[i, i + 1:] > iou_threshold) & same_class[i, i + 1:]
  return order[~suppressed]


def select(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, *, score_threshold: float,
           iou_threshold: float, max_detections: int) -> dict[str, np.ndarray]:
  """One image's detections: score threshold, per-class NMS, then the ``max_detections`` best."""
  keep = scores > score_threshold
  boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
  keep = nms(boxes, scores, labels, iou_threshold)[:max_detections]
  return {'boxes': boxes[keep], 'scores': scores[keep], 'labels': labels[keep]}
