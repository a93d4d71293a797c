"""PNG of detections drawn on images (matplotlib's Figure API: no pyplot, no display)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib import patches
from matplotlib.figure import Figure

_COLORS = ('tab:red', 'tab:blue', 'tab:green', 'tab:orange', 'tab:purple', 'tab:cyan')


def draw_detections(path: str | os.PathLike, images: Sequence[np.ndarray], detections: Sequence[dict],
                    class_names: Sequence[str], ground_truth: Sequence[dict] | None = None, *,
                    columns: int = 3, title: str | None = None) -> None:
  """Saves a grid of ``images`` with their detections (solid, labelled with the score) to a PNG.

  Args:
    path: the PNG to write.
    images: uint8 ``(h, w, 3)`` arrays.
    detections: per image ``{"boxes" (k, 4) xyxy pixels of that image, "scores" (k,), "labels" (k,)}``.
    class_names: names of labels 0, 1, ...; one colour per class.
    ground_truth: optional per image ``{"boxes", "labels"}``, drawn dashed.
    columns: images per row.
    title: figure title.
  """
  if len(images) != len(detections) or (ground_truth is not None and len(ground_truth) != len(images)):
    raise ValueError('images, detections and ground_truth must have one entry per image')
  rows = max(1, math.ceil(len(images) / columns))
  fig = Figure(figsize=(5 * columns, 4 * rows))
  axes = fig.subplots(rows, columns, squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for i, (ax, image) in enumerate(zip(axes.ravel(), images)):
    ax.imshow(image)
    if ground_truth is not None:
      for box, label in zip(ground_truth[i]['boxes'], ground_truth[i]['labels']):
        ax.add_patch(patches.Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, linestyle='--',
                                       linewidth=1, edgecolor=_COLORS[int(label) % len(_COLORS)]))
    det = detections[i]
    for box, score, label in zip(det['boxes'], det['scores'], det['labels']):
      color = _COLORS[int(label) % len(_COLORS)]
      ax.add_patch(patches.Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, linewidth=1.5,
                                     edgecolor=color))
      ax.text(box[0], box[1], f'{class_names[int(label)]} {score:.2f}', color='white', fontsize=6,
              bbox={'facecolor': color, 'alpha': 0.7, 'pad': 1, 'linewidth': 0})
  handles = [patches.Patch(color=_COLORS[i % len(_COLORS)], label=name) for i, name in enumerate(class_names)]
  fig.legend(handles=handles, loc='lower center', ncol=len(class_names))
  if title:
    fig.suptitle(title)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  fig.savefig(path, dpi=100)
