"""Step records: the metrics of a span of steps, as one compiled loop accumulates them (``step_record``,
``combine_records``) and as a log summarizes them (``summarize_train``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# record keys that keep the later step's value; the others add up
_LAST = ('grad_clip', 'input_clip', 'weight_levels')


def step_record(step_metrics: dict[str, Any]) -> dict[str, Any]:
  """One step's metrics as a record that ``combine_records`` accumulates: ``steps`` (1), the scalars and, for
  int8, per layer ``grad_deviation``, ``grad_deviation_max``, ``grad_clip``, ``input_clip``, ``nonfinite``."""
  record = {k: v for k, v in step_metrics.items() if k != 'layers'}
  record['steps'] = jnp.ones((), jnp.int32)
  if 'layers' in step_metrics:
    record['layers'] = {name: dict(stats, grad_deviation_max=stats['grad_deviation'])
                        for name, stats in step_metrics['layers'].items()}
  return record


def combine_records(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
  """The record of two consecutive spans of steps: maxima of ``grad_deviation_max``, the later clips, sums of
  everything else."""

  def combine(path, x, y):
    key = path[-1].key
    if key in _LAST:
      return y
    return jnp.maximum(x, y) if key == 'grad_deviation_max' else x + y

  return jax.tree_util.tree_map_with_path(combine, earlier, later)


def summarize_train(records: list[dict[str, Any]],
                    layer_order: Sequence[str] = ()) -> tuple[dict[str, float], dict[str, dict]]:
  """The mean of each scalar over the steps of ``records`` (``multi_step``'s results since the last log) and,
  for int8, per layer (in ``layer_order``, then the others by name) the mean ``grad_deviation``, the last
  ``grad_clip`` and ``input_clip``, the ``nonfinite`` count; over all layers ``grad_deviation_mean`` / ``_max``
  and ``nonfinite``."""
  total = jax.device_get(functools.reduce(combine_records, records))
  steps = int(total['steps'])
  scalars = {k: float(v) / steps for k, v in total.items() if k not in ('steps', 'layers')}
  if 'layers' not in total:
    return scalars, {}
  names = [n for n in layer_order if n in total['layers']] + sorted(total['layers'].keys() - set(layer_order))
  layers = {name: {'grad_deviation': float(s['grad_deviation']) / steps, 'grad_clip': float(s['grad_clip']),
                   'input_clip': float(s['input_clip']), 'nonfinite': int(s['nonfinite']),
                   **({'weight_levels': float(s['weight_levels'])} if 'weight_levels' in s else {})}
            for name, s in ((n, total['layers'][n]) for n in names)}
  scalars.update(grad_deviation_mean=float(np.mean([s['grad_deviation'] for s in layers.values()])),
                 grad_deviation_max=max(float(s['grad_deviation_max']) for s in total['layers'].values()),
                 nonfinite=sum(s['nonfinite'] for s in layers.values()))
  return scalars, layers
