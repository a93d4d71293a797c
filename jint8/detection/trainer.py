"""Object-detection training and evaluation (``config.task == "detection"``): FCOS on BCCD.

``train_and_evaluate(config, workdir)`` works like ``jint8.trainer``'s (same ``TrainState``, precision,
optimizer, sharding, checkpointing, metrics and progress modules): the splits live in device memory
(``data``), FCOS targets are assigned inside the compiled step, and evaluation decodes the detections,
runs per-class NMS on the host and scores them with pycocotools (mAP@[.5:.95], mAP@.5) at the original
image resolution. It ends with the metric plots and ``detections.png``, predictions drawn on validation
images. The keys of the config are in ``configs/detector.py``.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import numpy as np
import optax
from flax import linen as nn

from jint8 import models, sharding
from jint8.detection import coco_eval, data, fcos, losses, postprocess, targets, transforms, visualize, voc
from jint8.input_pipeline import epoch_order
from jint8.nn import ROUNDING_RNG
from jint8.training import metrics, optimizers, precision, progress
from jint8.trainer import (TrainState, augment_key, bind_train_step, format_record, gradient_step,
                           make_divergence_check, multi_step, order_key, restore_or_initialize, rounding_key,
                           run_length, train_loop, with_layer_stats, with_weight_levels)

BACKBONES = {'resnet18': 18, 'resnet34': 34, 'resnet50': 50}


def validate_config(config: Any) -> None:
  """Raises a ValueError naming the first config key whose value is invalid."""
  if config.task != 'detection':
    raise ValueError(f"config.task: jint8.detection.trainer trains 'detection', got {config.task!r}")
  if config.dataset.name != 'bccd_voc':
    raise ValueError(f"config.dataset.name: detection reads 'bccd_voc', got {config.dataset.name!r}")
  if config.model not in BACKBONES:
    raise ValueError(f'config.model: unknown backbone {config.model!r}; valid: {", ".join(BACKBONES)}')
  precision.check_precision(config)
  for key in ('batch_size', 'eval_batch_size', 'log_every_steps', 'keep_checkpoints'):
    if config[key] < 1:
      raise ValueError(f'config.{key} must be >= 1, got {config[key]}')
  for key in ('eval_every_steps', 'checkpoint_every_steps', 'num_train_steps', 'num_visualize',
              'divergence_patience'):
    if config[key] < 0:
      raise ValueError(f'config.{key} must be >= 0, got {config[key]}')
  if not config.num_train_steps and config.num_epochs < 1:
    raise ValueError(f'config.num_epochs must be >= 1 when config.num_train_steps is 0, got {config.num_epochs}')
  unknown = set(config.dataset.flips) - set(transforms.FLIP_AXES)
  if unknown:
    raise ValueError(f'config.dataset.flips: unknown {sorted(unknown)}; valid: {transforms.FLIP_AXES}')
  if config.dataset.train_split not in voc.BccdVoc.SPLITS or config.dataset.eval_split not in voc.BccdVoc.SPLITS:
    raise ValueError(f'config.dataset.train_split / eval_split must be in {voc.BccdVoc.SPLITS}, got '
                     f'{config.dataset.train_split!r} / {config.dataset.eval_split!r}')
  if config.dataset.max_boxes < 1:
    raise ValueError(f'config.dataset.max_boxes must be >= 1, got {config.dataset.max_boxes}')
  for key in ('max_train_examples', 'max_test_examples'):
    if config.dataset[key] < 0:
      raise ValueError(f'config.dataset.{key} must be >= 0 (0: all), got {config.dataset[key]}')
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


def create_model(config: Any) -> fcos.FCOS:
  """FCOS with the ResNet backbone ``config.model`` in the compute dtype of ``config.precision``."""
  dtype = precision.compute_dtype(config)
  try:
    backbone = models.ResNetBackbone(depth=BACKBONES[config.model], dtype=dtype, **config.model_kwargs)
  except TypeError as e:
    raise ValueError(f'config.model_kwargs: {e}') from None
  f = config.fcos
  return fcos.FCOS(backbone, num_classes=len(voc.BCCD_CLASSES), features=f.features, head_convs=f.head_convs,
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


class _Loop:
  """The compiled steps of one run, and evaluation (decoding, NMS, COCO mAP) around them."""

  def __init__(self, config: Any, model: nn.Module, tx: optax.GradientTransformation, train: data.Split,
               evaluation: data.Split, ground_truth: list[dict], mesh: jax.sharding.Mesh):
    replicated, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    self.config = config
    self.train, self.evaluation, self.ground_truth = train, evaluation, ground_truth
    self.locations = targets.Locations(train.image_size, model_strides(model), config.fcos.size_boundaries,
                                       config.fcos.center_radius)
    self.train_steps = jax.jit(multi_step(
        bind_train_step(train_step, config, model, tx=tx, locations=self.locations, batch_size=config.batch_size,
                        batch_sharding=batch, flips=tuple(config.dataset.flips),
                        focal_alpha=config.fcos.focal_alpha, focal_gamma=config.fcos.focal_gamma),
        finish=with_weight_levels), donate_argnums=0, out_shardings=replicated)
    self.predict_step = jax.jit(
        functools.partial(predict_step, model=model, locations=self.locations,
                          batch_size=config.eval_batch_size, batch_sharding=batch, top_k=config.eval.top_k),
        out_shardings=replicated)
    self._order = jax.jit(epoch_order, static_argnums=2, out_shardings=replicated)

  def order(self, state: TrainState, epoch: int) -> jax.Array:
    return self._order(order_key(state), epoch, self.train.num_examples)

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
    return coco_eval.evaluate(self.ground_truth, rescaled, voc.BCCD_CLASSES), detections

  def draw(self, path: pathlib.Path, detections: list[dict[str, np.ndarray]], title: str) -> None:
    """PNG of the first ``config.num_visualize`` evaluation images with their confident detections."""
    n = min(self.config.num_visualize, self.evaluation.num_examples)
    images = np.asarray(jax.device_get(self.evaluation.images[:n]))
    boxes, labels, valid = jax.device_get((self.evaluation.boxes[:n], self.evaluation.labels[:n],
                                           self.evaluation.valid[:n]))
    confident = [{k: v[d['scores'] >= self.config.eval.draw_threshold] for k, v in d.items()}
                 for d in detections[:n]]
    truth = [{'boxes': b[v], 'labels': l[v]} for b, l, v in zip(boxes, labels, valid)]
    visualize.draw_detections(path, images, confident, voc.BCCD_CLASSES, truth, title=title)


def model_strides(model: nn.Module) -> tuple[int, ...]:
  """The pyramid strides of an ``FCOS`` model, also when wrapped by ``Int8Model``."""
  return getattr(model, 'model', model).strides


def train_and_evaluate(config: Any, workdir: str | pathlib.Path, *, model: fcos.FCOS | None = None
                       ) -> dict[str, float]:
  """Trains and evaluates FCOS as ``config`` says, in (and resuming from) ``workdir``.

  Args:
    config: a config with the keys of ``configs/detector.py``.
    workdir: the run's folder: checkpoints, ``metrics.jsonl``, TensorBoard events, plots, ``config.json``.
    model: an ``FCOS`` to train instead of ``create_model(config)``; it is still converted to int8 when
      ``config.precision == "int8"``.

  Returns:
    The final COCO metrics of the evaluation split: ``mAP`` (AP@[.5:.95]), ``mAP50``, ``mAP75``, ``AP/<class>``.
  """
  validate_config(config)
  workdir = pathlib.Path(workdir)
  is_main = jax.process_index() == 0
  mesh = sharding.training_mesh(config)
  with jax.set_mesh(mesh):  # the Pallas kernels run per batch shard (jint8.pallas.data_parallel)

    d = config.dataset
    builder = voc.builder(data_dir=d.data_dir or None, archive=d.archive or None)
    image_size = tuple(d.image_size)
    train, _ = data.create_split(builder.as_data_source(d.train_split), image_size, d.max_boxes,
                                 sharding.replicated(mesh), max_examples=d.max_train_examples)
    evaluation, ground_truth = data.create_split(builder.as_data_source(d.eval_split), image_size, d.max_boxes,
                                                 sharding.replicated(mesh), max_examples=d.max_test_examples)
    steps_per_epoch, num_steps = run_length(config, train.num_examples)
    schedule = optimizers.learning_rate_schedule(config.optimizer, batch_size=config.batch_size,
                                                 steps_per_epoch=steps_per_epoch, num_steps=num_steps)
    inner = optimizers.create_optimizer(config.optimizer, schedule)
    if config.grad_clip_norm:
      inner = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), inner)
    tx = precision.wrap_optimizer(inner, config)
    model = precision.apply_precision(model or create_model(config), config)
    loop = _Loop(config, model, tx, train, evaluation, ground_truth, mesh)

    init_args = (model, tx, (*image_size, 3), config.seed, sharding.replicated(mesh))
    checkpointer, state, epoch, index, layer_order = restore_or_initialize(workdir, config, init_args, is_main)
    step = int(state.step)
    if is_main:
      print(f'{jax.device_count()} devices, {train.num_examples} training / {evaluation.num_examples} '
            f'{d.eval_split} images at {image_size}, {len(loop.locations)} locations, {steps_per_epoch} steps '
            f'per epoch, {num_steps} steps, precision {precision.describe(config)}', flush=True)
    writer = metrics.MetricWriter(workdir, resume_step=step, enabled=is_main)

    bar = progress.Progress(num_steps, initial=step, enabled=is_main)

    def evaluate(state, step):
      result, detections = loop.evaluate(state)
      bar.write(format_record(step, num_steps, d.eval_split, writer.write(step, d.eval_split, result)))
      return result, detections

    state, last = train_loop(state, loop, train, start=(step, epoch, index), num_steps=num_steps,
                             steps_per_epoch=steps_per_epoch, config=config, schedule=schedule, writer=writer,
                             checkpointer=checkpointer, bar=bar, evaluate=evaluate, show=('loss',),
                             layer_order=layer_order, divergence_check=make_divergence_check(config, workdir, step))
    final, detections = last if last is not None else (None, None)
    bar.close()
    if final is None:  # resumed from a finished run
      final, detections = loop.evaluate(state)
    checkpointer.close()
    writer.close()
    if is_main:
      records = metrics.read_records(workdir)
      metrics.plot_curves(records, workdir / 'curves.png')
      written = ['curves.png'] + (['layers.png'] if metrics.plot_layers(records, workdir / 'layers.png') else [])
      if config.num_visualize:
        loop.draw(workdir / 'detections.png', detections,
                  f'{config.model} FCOS, {config.precision}, step {num_steps}: {d.eval_split} mAP {final["mAP"]:.3f}, '
                  f'mAP@.5 {final["mAP50"]:.3f} (dashed: ground truth)')
        written.append('detections.png')
      print(f'Wrote {", ".join(str(workdir / w) for w in written)}', flush=True)
      print(json.dumps({f'final_{d.eval_split}': final}), flush=True)
    return final
