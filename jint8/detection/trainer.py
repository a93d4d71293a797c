"""Object detection (``config.task == "detection"``): FCOS on VOC or COCO data, the task on ``jint8.training``.

``train_and_evaluate(config, workdir)`` trains FCOS on splits that live in device memory (``data``), assigning
the FCOS targets inside the compiled step; evaluation decodes the detections, runs per-class NMS on the host and
scores them with pycocotools (mAP@[.5:.95], mAP@.5) at the original image resolution. ``jint8.training.run`` does
the rest (precision, optimizer, data parallelism, checkpoints, metrics, plots); the run ends with
``detections.png``, predictions drawn on validation images. The keys of the config are in ``configs/detector.py``.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import numpy as np
import optax
from flax import linen as nn

from jint8 import models, sharding
from jint8.detection import coco_eval, data, dataset, fcos, losses, postprocess, targets, transforms, visualize
from jint8.nn import ROUNDING_RNG
from jint8.training import precision, run
from jint8.training.state import TrainState, augment_key, rounding_key
from jint8.training.step import gradient_step, with_layer_stats

BACKBONES = {'resnet18': 18, 'resnet34': 34, 'resnet50': 50}


def validate_config(config: Any) -> None:
  """Raises a ValueError naming the first config key whose value is invalid."""
  run.validate_config(config, 'detection')
  if config.model not in BACKBONES:
    raise ValueError(f'config.model: unknown backbone {config.model!r}; valid: {", ".join(BACKBONES)}')
  if config.num_visualize < 0:
    raise ValueError(f'config.num_visualize must be >= 0, got {config.num_visualize}')
  unknown = set(config.dataset.flips) - set(transforms.FLIP_AXES)
  if unknown:
    raise ValueError(f'config.dataset.flips: unknown {sorted(unknown)}; valid: {transforms.FLIP_AXES}')
  dataset.validate_config(config.dataset)
  if config.dataset.max_boxes < 0:
    raise ValueError(f'config.dataset.max_boxes must be >= 0 (0: all), got {config.dataset.max_boxes}')
  largest_stride = 2 ** (5 + config.fcos.extra_levels)
  if len(config.dataset.image_size) != 2 or any(s <= 0 or s % largest_stride for s in config.dataset.image_size):
    raise ValueError(f'config.dataset.image_size must be (height, width), multiples of the largest pyramid stride '
                     f'{largest_stride}, got {tuple(config.dataset.image_size)}')
  if len(config.fcos.size_boundaries) != 2 + config.fcos.extra_levels:
    raise ValueError(f'config.fcos.size_boundaries needs one value per pyramid level but the last '
                     f'({2 + config.fcos.extra_levels}), got {tuple(config.fcos.size_boundaries)}')
  e = config.eval
  if not (e.top_k >= 1 and e.max_detections >= 1 and 0 <= e.score_threshold < 1 and 0 < e.nms_iou <= 1):
    raise ValueError(f'config.eval: need top_k >= 1, max_detections >= 1, 0 <= score_threshold < 1 and '
                     f'0 < nms_iou <= 1, got {e.top_k}, {e.max_detections}, {e.score_threshold}, {e.nms_iou}')


def create_model(config: Any, num_classes: int) -> fcos.FCOS:
  """FCOS for ``num_classes`` classes with the ResNet backbone ``config.model`` in the compute dtype of
  ``config.precision``."""
  dtype = precision.compute_dtype(config)
  try:
    backbone = models.ResNetBackbone(depth=BACKBONES[config.model], dtype=dtype, **config.model_kwargs)
  except TypeError as e:
    raise ValueError(f'config.model_kwargs: {e}') from None
  f = config.fcos
  return fcos.FCOS(backbone, num_classes=num_classes, features=f.features, head_convs=f.head_convs,
                   extra_levels=f.extra_levels, groups=f.groups, dtype=dtype)


def train_step(state: TrainState, split: data.Split, order: jax.Array, index: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, locations: targets.Locations, batch_size: int,
               batch_sharding: jax.sharding.Sharding, flips: tuple[str, ...], focal_alpha: float,
               focal_gamma: float) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step on batch ``index`` of the epoch visiting the training split in ``order``.

  Returns the new state and the step's metrics: the loss and its terms and, for int8, ``layers``.
  """
  batch = data.train_batch(split, order, index, batch_size, augment_key(state), flips)
  batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
  goal = locations.targets(batch['boxes'], batch['labels'], batch['valid'])

  def loss_fn(params, int8_state):
    outputs, updates = model.apply(state.variables(params, int8_state), batch['images'], train=True,
                                   mutable=['batch_stats'], rngs={ROUNDING_RNG: rounding_key(state)})
    loss, terms = losses.fcos_loss(outputs, goal, alpha=focal_alpha, gamma=focal_gamma)
    return loss, (terms, updates.get('batch_stats', {}))

  new_state, _, terms = gradient_step(state, tx, loss_fn)
  return new_state, with_layer_stats(dict(terms), new_state)


def predict_step(state: TrainState, split: data.Split, index: jax.Array, *, model: nn.Module,
                 locations: targets.Locations, batch_size: int, batch_sharding: jax.sharding.Sharding,
                 top_k: int) -> tuple[dict[str, jax.Array], jax.Array]:
  """The ``top_k`` decoded candidates of each image of eval batch ``index``, and the batch mask."""
  images, mask = data.eval_batch(split, index, batch_size)
  images = jax.lax.with_sharding_constraint(images, batch_sharding)
  outputs = model.apply(state.variables(), images, train=False)
  return postprocess.decode(outputs, locations.points, locations.point_strides, top_k), mask


def model_strides(model: nn.Module) -> tuple[int, ...]:
  """The pyramid strides of an ``FCOS`` model, also when wrapped by ``Int8Model``."""
  return getattr(model, 'model', model).strides


class Detection(run.Task):
  """The detection task: a VOC or COCO source's splits in device memory (``dataset``), ``train_step``, and COCO
  evaluation around the compiled ``predict_step`` (decoding, NMS, mAP on the source's category ids)."""

  show = ('loss',)
  validate_config = staticmethod(validate_config)

  @property
  def eval_split(self) -> str:
    return self.config.dataset.eval_split

  def load(self, replicated: jax.sharding.Sharding) -> run.TrainingData:
    d = self.config.dataset
    self.source = dataset.load(d)
    if d.max_boxes and d.max_boxes < self.source.max_boxes:
      raise ValueError(f'config.dataset.max_boxes: {d.max_boxes} is fewer than the {self.source.max_boxes} boxes of '
                       'the fullest image (0: as many as the data needs)')
    if jax.process_index() == 0:
      print('\n'.join(f'{d.path} {line}' for line in self.source.reports.values()), flush=True)
    self.image_size, max_boxes = tuple(d.image_size), d.max_boxes or self.source.max_boxes
    self.train, _ = data.create_split(self.source.split(d.train_split), self.image_size, max_boxes, replicated,
                                      max_examples=d.max_train_examples)
    self.evaluation, self.ground_truth = data.create_split(self.source.split(d.eval_split), self.image_size,
                                                           max_boxes, replicated, max_examples=d.max_test_examples)
    return run.TrainingData(self.train, self.train.num_examples, (*self.image_size, 3))

  def create_model(self) -> fcos.FCOS:
    return create_model(self.config, len(self.source.class_names))

  def compile(self, model: nn.Module, mesh: jax.sharding.Mesh):
    config = self.config
    self.locations = targets.Locations(self.train.image_size, model_strides(model), config.fcos.size_boundaries,
                                       config.fcos.center_radius)
    self.predict_step = jax.jit(
        functools.partial(predict_step, model=model, locations=self.locations,
                          batch_size=config.eval_batch_size, batch_sharding=sharding.batch_sharded(mesh),
                          top_k=config.eval.top_k),
        out_shardings=sharding.replicated(mesh))
    return functools.partial(train_step, locations=self.locations, flips=tuple(config.dataset.flips),
                             focal_alpha=config.fcos.focal_alpha, focal_gamma=config.fcos.focal_gamma)

  def describe(self) -> str:
    return (f'{self.train.num_examples} training / {self.evaluation.num_examples} {self.eval_split} images at '
            f'{self.image_size}, {len(self.locations)} locations')

  def predict(self, state: TrainState) -> list[dict[str, np.ndarray]]:
    """Detections of every evaluation image after NMS, in resized-image pixels."""
    c = self.config.eval
    detections = []
    for i in range(data.num_batches(self.evaluation, self.config.eval_batch_size)):
      candidates, mask = jax.device_get(self.predict_step(state, self.evaluation, i))
      for j in np.flatnonzero(mask):
        detections.append(postprocess.select(
            candidates['boxes'][j], candidates['scores'][j], candidates['labels'][j],
            score_threshold=c.score_threshold, iou_threshold=c.nms_iou, max_detections=c.max_detections))
    return detections

  def evaluate(self, state: TrainState) -> tuple[dict[str, float], list[dict[str, np.ndarray]]]:
    """COCO metrics on the evaluation split at its original resolution, and the resized-pixel detections."""
    detections = self.predict(state)
    height, width = self.evaluation.image_size
    rescaled = []
    for det, gt in zip(detections, self.ground_truth):
      scale = np.array([gt['width'] / width, gt['height'] / height] * 2, np.float32)
      boxes = np.clip(det['boxes'] * scale, 0, [gt['width'], gt['height']] * 2)
      rescaled.append({**det, 'boxes': boxes, 'image_id': gt['image_id']})
    return (coco_eval.evaluate(self.ground_truth, rescaled, self.source.class_names, self.source.category_ids),
            detections)

  def draw(self, path: pathlib.Path, detections: list[dict[str, np.ndarray]], title: str) -> None:
    """PNG of the first ``config.num_visualize`` evaluation images with their confident detections."""
    n = min(self.config.num_visualize, self.evaluation.num_examples)
    images = np.asarray(jax.device_get(self.evaluation.images[:n]))
    boxes, labels, valid = jax.device_get((self.evaluation.boxes[:n], self.evaluation.labels[:n],
                                           self.evaluation.valid[:n]))
    confident = [{k: v[d['scores'] >= self.config.eval.draw_threshold] for k, v in d.items()}
                 for d in detections[:n]]
    truth = [{'boxes': b[v], 'labels': l[v]} for b, l, v in zip(boxes, labels, valid)]
    visualize.draw_detections(path, images, confident, self.source.class_names, truth, title=title)

  def write_outputs(self, workdir: pathlib.Path, step: int, final: dict[str, float],
                    evaluation: list[dict[str, np.ndarray]]) -> list[str]:
    """``detections.png`` (``draw``) unless ``config.num_visualize`` is 0."""
    config = self.config
    if not config.num_visualize:
      return []
    self.draw(workdir / 'detections.png', evaluation,
              f'{config.model} FCOS, {config.precision}, step {step}: {self.eval_split} mAP {final["mAP"]:.3f}, '
              f'mAP@.5 {final["mAP50"]:.3f} (dashed: ground truth)')
    return ['detections.png']


def train_and_evaluate(config: Any, workdir: str | pathlib.Path, *, model: fcos.FCOS | None = None,
                       allow_config_change: bool = False) -> dict[str, float]:
  """Runs the ``Detection`` task of ``config`` (the keys of ``configs/detector.py``) in ``workdir``
  (``jint8.training.run.train_and_evaluate``, which says what ``allow_config_change`` allows); returns the final
  COCO metrics of the evaluation split: ``mAP`` (AP@[.5:.95]), ``mAP50``, ``mAP75``, ``AP/<class>``. ``model``, an
  ``FCOS``, replaces ``create_model(config)``."""
  return run.train_and_evaluate(Detection(config), workdir, model=model, allow_config_change=allow_config_change)
