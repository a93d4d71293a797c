"""Step records: the metrics of a span of steps, as one compiled loop accumulates them (``step_record``,
``combine_records``) and as a log summarizes them (``summarize_train``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jint8 import state as quant_state

def step_record(step_metrics: dict[str, Any]) -> dict[str, Any]:
  """One step's metrics as a record that ``combine_records`` accumulates: ``steps`` (1), the scalars and, for
  int8, per layer the statistics of ``jint8.state.step_layer_record``."""
  record = {k: v for k, v in step_metrics.items() if k != 'layers'}
  record['steps'] = jnp.ones((), jnp.int32)
  if 'layers' in step_metrics:
    record['layers'] = {name: quant_state.step_layer_record(stats) for name, stats in step_metrics['layers'].items()}
  return record


def combine_records(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
  """The record of two consecutive spans of steps: sums of the scalars, the layers' as ``jint8.state`` says."""
  combined = {k: jax.tree.map(jnp.add, earlier[k], later[k]) for k in later if k != 'layers'}
  if 'layers' in later:
    combined['layers'] = {name: quant_state.combine_layer_records(earlier['layers'][name], stats)
                          for name, stats in later['layers'].items()}
  return combined


def summarize_train(records: list[dict[str, Any]],
                    layer_order: Sequence[str] = ()) -> tuple[dict[str, float], dict[str, dict]]:
  """The mean of each scalar over the steps of ``records`` (``multi_step``'s results since the last log) and,
  for int8, per layer (in ``layer_order``, then the others by name) its summary
  (``jint8.state.summarize_layer_record``); over all layers ``grad_deviation_mean`` / ``_max`` and
  ``nonfinite``."""
  total = jax.device_get(functools.reduce(combine_records, records))
  steps = int(total['steps'])
  scalars = {k: float(v) / steps for k, v in total.items() if k not in ('steps', 'layers')}
  if 'layers' not in total:
    return scalars, {}
  names = [n for n in layer_order if n in total['layers']] + sorted(total['layers'].keys() - set(layer_order))
  layers = {name: quant_state.summarize_layer_record(total['layers'][name], steps) for name in names}
  scalars.update(grad_deviation_mean=float(np.mean([s['grad_deviation'] for s in layers.values()])),
                 grad_deviation_max=max(float(s['grad_deviation_max']) for s in total['layers'].values()),
                 nonfinite=sum(s['nonfinite'] for s in layers.values()))
  return scalars, layers
