"""Training metrics: one JSON record per line in ``metrics.jsonl``, TensorBoard event files, and PNG plots.

A record is ``{"step": int, "split": str, <scalar name>: float, ..., "layers": {layer: {stat: float}}}``;
``layers`` (optional) holds per-layer int8 statistics such as ``grad_deviation`` and ``grad_clip``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Mapping

import numpy as np

METRICS_FILE = 'metrics.jsonl'


def read_records(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of ``workdir/metrics.jsonl`` in order (empty when there is none)."""
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  with path.open() as f:
    return [json.loads(line) for line in f if line.strip()]


def _number(value) -> float | int:
  value = np.asarray(value).item()
  return value if isinstance(value, int) else float(value)


class MetricWriter:
  """Appends records to ``metrics.jsonl`` and writes the same scalars to TensorBoard (process 0 only).

  Args:
    workdir: the run's folder.
    resume_step: the step a resumed run restarts from; records after it (written by the interrupted run
      past its last checkpoint) are dropped so the file holds each step once.
    enabled: write anything at all (``False`` on processes other than 0).
  """

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0, enabled: bool = True):
    self.workdir = pathlib.Path(workdir)
    self._enabled = enabled
    self._tensorboard = None
    if not enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    kept = [r for r in read_records(self.workdir) if r['step'] <= resume_step]
    with (self.workdir / METRICS_FILE).open('w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top  (heavy, process 0 only)
    self._tensorboard = SummaryWriter(str(self.workdir / 'tensorboard'), purge_step=resume_step + 1)

  def write(self, step: int, split: str, scalars: Mapping[str, Any],
            layers: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Writes one record and returns it (with plain Python numbers)."""
    record = {'step': int(step), 'split': split, **{k: _number(v) for k, v in scalars.items()}}
    if layers:
      record['layers'] = {name: {k: _number(v) for k, v in stats.items()} for name, stats in layers.items()}
    if not self._enabled:
      return record
    with (self.workdir / METRICS_FILE).open('a') as f:
      f.write(json.dumps(record) + '\n')
    for name, value in scalars.items():
      self._tensorboard.add_scalar(f'{split}/{name}', record[name], step)
    for layer, stats in record.get('layers', {}).items():
      for name, value in stats.items():
        self._tensorboard.add_scalar(f'{split}_layers/{name}/{layer}', value, step)
    return record

  def flush(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None


def evaluation_records(records: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
  """The records of a run's evaluations (any split but ``train``: ``test`` for CIFAR, ``val`` for BCCD) that
  hold ``metric``."""
  return [r for r in records if r['split'] != 'train' and metric in r]


def _series(records, split: str, name: str) -> tuple[list[int], list[float]]:
  points = [(r['step'], r[name]) for r in records if r['split'] == split and name in r]
  return [s for s, _ in points], [v for _, v in points]


def plot_curves(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
  """One PNG of every scalar over training (but ``epoch``): a panel per name, a line per split."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  names = sorted({k for r in records for k in r if k not in ('step', 'split', 'layers', 'epoch')})
  splits = sorted({r['split'] for r in records})
  cols = min(3, max(1, len(names)))
  rows = max(1, math.ceil(len(names) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    for split in splits:
      steps, values = _series(records, split, name)
      if steps:
        ax.plot(steps, values, label=split, marker='.' if len(steps) < 30 else None)
    ax.set_title(name)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
  for ax in axes.flat[len(names):]:
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


MAX_LEGEND_LAYERS = 20  # plot_layers names up to this many layers in a legend


def plot_layers(records: list[dict[str, Any]], path: str | os.PathLike,
                stats: tuple[str, ...] = ('grad_deviation', 'grad_clip', 'input_clip', 'input_saturation',
                                          'weight_levels')) -> bool:
  """One PNG with a panel per statistic in ``stats`` that the records hold, a line per layer over training (clips
  and weight levels on a log scale).

  Returns ``False`` (and writes nothing) when no record holds per-layer statistics (a float run).
  """
  records = [r for r in records if r.get('layers')]
  if not records:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  layers = list(dict.fromkeys(name for r in records for name in r['layers']))
  stats = [s for s in stats if any(s in r['layers'][name] for r in records for name in r['layers'])]
  cmap = plt.get_cmap('viridis')
  colors = cmap(np.linspace(0, 1, len(layers)))
  fig, axes = plt.subplots(1, len(stats), figsize=(6 * len(stats), 4.5), squeeze=False, constrained_layout=True)
  for ax, stat in zip(axes[0], stats):
    for color, layer in zip(colors, layers):
      points = [(r['step'], r['layers'][layer][stat]) for r in records
                if stat in r['layers'].get(layer, {})]
      if points:
        ax.plot(*zip(*points), color=color, label=layer, linewidth=1)
    ax.set_title(f'{stat} per layer (first layer dark, last light)')
    ax.set_xlabel('step')
    if stat.endswith('_clip') or stat == 'weight_levels':
      ax.set_yscale('log')
    ax.grid(alpha=0.3)
  if len(layers) <= MAX_LEGEND_LAYERS:
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='outside right center', fontsize='x-small')
  else:  # a legend of dozens of names would cover the panels: a colour bar of the layer index instead
    mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, len(layers) - 1), cmap)
    fig.colorbar(mappable, ax=axes[0].tolist(), label=f'layer index of {len(layers)}, in the order they were logged')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def plot_comparison(runs: Mapping[str, list[dict[str, Any]]], path: str | os.PathLike,
                    metric: str = 'accuracy') -> None:
  """One PNG comparing runs: the evaluated ``metric`` and train ``loss`` over epochs (steps when a run logs no epoch),
  a line per run."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for name, records in runs.items():
    with_epoch = [r for r in records if r.get('epoch')]
    epochs_per_step = with_epoch[-1]['epoch'] / with_epoch[-1]['step'] if with_epoch else 1.0
    evaluations = evaluation_records(records, metric)
    curves = (([r['step'] for r in evaluations], [r[metric] for r in evaluations]),
              _series(records, 'train', 'loss'))
    for ax, (steps, values) in zip(axes, curves):
      ax.plot([s * epochs_per_step for s in steps], values, label=name, linewidth=1)
  for ax, title in zip(axes, (f'evaluation {metric}', 'train loss')):
    ax.set_title(title)
    ax.set_xlabel('epoch')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
  axes[1].set_yscale('log')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
