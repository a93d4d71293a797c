"""FCOS losses: sigmoid focal loss for classes, GIoU loss for boxes, binary cross-entropy for centerness."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def giou(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Generalized IoU of boxes given as distances ``(..., 4)`` (left, top, right, bottom) from one point.

  Both boxes contain the point (all distances >= 0), so their intersection and enclosing box follow from
  per-side minima and maxima.
  """
  pred_area = (pred[..., 0] + pred[..., 2]) * (pred[..., 1] + pred[..., 3])
  target_area = (target[..., 0] + target[..., 2]) * (target[..., 1] + target[..., 3])
  low, high = jnp.minimum(pred, target), jnp.maximum(pred, target)
  intersection = (low[..., 0] + low[..., 2]) * (low[..., 1] + low[..., 3])
  enclosing = (high[..., 0] + high[..., 2]) * (high[..., 1] + high[..., 3])
  union = pred_area + target_area - intersection
  eps = 1e-7
  return intersection / (union + eps) - (enclosing - union) / (enclosing + eps)


def fcos_loss(outputs: dict[str, jax.Array], targets: dict[str, jax.Array], *, alpha: float = 0.25,
              gamma: float = 2.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The FCOS loss of a batch.

  Args:
    outputs: ``{"logits": (b, n, classes), "distances": (b, n, 4) positive, "centerness": (b, n) logits}``.
    targets: ``{"labels": (b, n), -1 background; "distances": (b, n, 4); "centerness": (b, n)}`` (see
      ``targets.assign``).
    alpha, gamma: focal loss parameters.

  Returns:
    ``(loss, terms)``: classification normalised by the number of positives, GIoU weighted by the
    centerness targets and normalised by their sum, centerness BCE normalised by the positives.
  """
  logits = outputs['logits'].astype(jnp.float32)
  positive = targets['labels'] >= 0
  num_positive = jnp.maximum(jnp.sum(positive), 1).astype(jnp.float32)
  onehot = jax.nn.one_hot(targets['labels'], logits.shape[-1], dtype=jnp.float32)  # -1 gives all zeros
  classification = jnp.sum(optax.sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma)) / num_positive

  weight = jnp.where(positive, targets['centerness'], 0.0)
  box_loss = 1.0 - giou(outputs['distances'].astype(jnp.float32), targets['distances'])
  box = jnp.sum(jnp.where(positive, box_loss, 0.0) * weight) / jnp.maximum(jnp.sum(weight), 1e-6)

  centerness_bce = optax.sigmoid_binary_cross_entropy(outputs['centerness'].astype(jnp.float32),
                                                      targets['centerness'])
  centerness = jnp.sum(jnp.where(positive, centerness_bce, 0.0)) / num_positive
  loss = classification + box + centerness
  return loss, {'loss': loss, 'classification_loss': classification, 'box_loss': box,
                'centerness_loss': centerness, 'positives': num_positive}
