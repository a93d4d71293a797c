"""Compares finished runs: a table of final evaluation metrics (with mean and spread over seeds, the lowest value
after the first tenth of the steps, minutes of training, where the training loss diverged) and a PNG of curves.

  python -m jint8.compare runs/resnet20-fp32-s0 runs/resnet20-fp32-s1 runs/resnet20-int8-s0 ... \\
      [--metric accuracy] [--plot compare.png [--max_step 2000]]

Runs whose ``config.json`` differ only in ``seed`` form a group; the group line gives the mean and the standard
deviation (ddof 1) of the final evaluation metric (the test split for CIFAR, the validation split for detection).
Runs of the same config and seed are duplicates, not seeds: a note after the table names them, and the means count
the first of them only.
A key that only some runs have (written by a newer jint8) counts as its default in the others: ``--defaults``
names the config file that holds the defaults (the repository's ``configs/default.py`` when it is there).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import sys
from typing import Any

from jint8.training import divergence, metrics, recorded_config


def training_seconds(train_records: list[dict[str, Any]], batch_size: int) -> float:
  """Time spent in training steps (evaluation and checkpoints excluded), from the logged ``images_per_second``
  of each interval: the sum of ``steps in the interval * batch_size / images_per_second``."""
  seconds, previous = 0.0, 0
  for record in train_records:
    seconds += (record['step'] - previous) * batch_size / record['images_per_second']
    previous = record['step']
  return seconds


def summarize_run(workdir: pathlib.Path, metric: str, config: dict[str, Any] | None) -> dict[str, Any]:
  """The final, best and lowest (after the first tenth of the steps: a dip that a run recovered from) evaluated
  ``metric``, the steps, the minutes of training (``None`` without the run's
  ``config``), the non-finite gradient events, the largest per-layer gradient deviation and the step at which the
  training loss had diverged (``jint8.training.divergence`` with the default patience; ``None``: it did not) of
  the run in ``workdir``."""
  if not (workdir / metrics.METRICS_FILE).is_file():
    raise ValueError(f'{workdir}: not a run folder (no {metrics.METRICS_FILE} in it)')
  records = metrics.read_records(workdir)
  tests = metrics.evaluation_records(records, metric)
  if not tests:
    raise ValueError(f'{workdir}: no evaluation record with {metric!r} in {workdir / metrics.METRICS_FILE}')
  train = [r for r in records if r['split'] == 'train']
  minutes = None if config is None else training_seconds(train, config['batch_size']) / 60
  return {'run': workdir.name, 'steps': tests[-1]['step'], 'final': tests[-1][metric],
          'best': max(r[metric] for r in tests),
          'lowest': min(r[metric] for r in tests if r['step'] >= tests[-1]['step'] / 10),
          'train_minutes': minutes,
          'nonfinite': sum(r.get('nonfinite', 0) for r in train),
          'max_deviation': max((r.get('grad_deviation_max', 0.0) for r in train), default=0.0),
          'diverged_at': divergence.first_divergence([(r['step'], r['loss']) for r in train if 'loss' in r])}


DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'default.py'


def load_defaults(path: pathlib.Path) -> dict[str, Any]:
  """The config of the file at ``path`` (its ``get_config()``) as ``config.json`` would hold it."""
  if not path.is_file():
    raise ValueError(f'--defaults: no config file at {path}')
  spec = importlib.util.spec_from_file_location('_jint8_compare_defaults', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return recorded_config.as_dict(module.get_config())


def same_recipe(a: dict[str, Any] | None, b: dict[str, Any] | None, defaults: dict[str, Any] | None = None) -> bool:
  """Whether two runs' configs agree on every key, the seed aside. A key only one has was written by a newer jint8
  than the other run's, which kept that key's default behaviour: it is compared with its value in ``defaults``
  (not at all when ``defaults`` lacks it)."""
  if a is None or b is None:
    return False
  return not set(recorded_config.differences(a, b, defaults or {})) - {'seed'}


def table(workdirs: list[pathlib.Path], metric: str, defaults: dict[str, Any] | None = None) -> str:
  """A Markdown table: a row per run, then a row per group of two or more seeds (mean +- std; ``defaults`` as
  in ``same_recipe``), then a note per run that repeats another's config and seed (left out of the means)."""
  rows = [f'| run | steps | final {metric} | best | lowest after 10% | train minutes | non-finite | max deviation '
          '| diverged at |', '|---|---|---|---|---|---|---|---|---|']
  groups: list[tuple[dict[str, Any] | None, list[dict[str, Any]]]] = []
  for workdir in workdirs:
    config = recorded_config.read(workdir)
    run = summarize_run(workdir, metric, config) | {'seed': None if config is None else config.get('seed')}
    group = next((runs for first, runs in groups if same_recipe(first, config, defaults)), None)
    if group is None:
      groups.append((config, [run]))
    else:
      group.append(run)
    minutes = '-' if run['train_minutes'] is None else f"{run['train_minutes']:.1f}"
    diverged = '-' if run['diverged_at'] is None else f"step {run['diverged_at']}"
    rows.append(f"| {run['run']} | {run['steps']} | {run['final']:.4f} | {run['best']:.4f} | {run['lowest']:.4f} "
                f"| {minutes} | {run['nonfinite']} | {run['max_deviation']:.4f} | {diverged} |")
  notes = []
  for _, runs in groups:
    seeds = {}
    for run in runs:
      first = seeds.setdefault(run['seed'], run)
      if first is not run:
        notes.append(f"Duplicate: {run['run']} has the config and seed ({run['seed']}) of {first['run']}; "
                     'it is left out of the means.')
    if len(seeds) > 1:
      finals = [r['final'] for r in seeds.values()]
      rows.append(f"| mean of {', '.join(r['run'] for r in seeds.values())} | | {statistics.mean(finals):.4f} "
                  f"+- {statistics.stdev(finals):.4f} | | | | | | |")
  return '\n'.join(rows + ([''] + notes if notes else []))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdirs', nargs='+', type=pathlib.Path, help='run folders holding metrics.jsonl')
  parser.add_argument('--metric', default='accuracy', help="evaluation metric to compare ('mAP50' for detection)")
  parser.add_argument('--plot', type=pathlib.Path, help='write a PNG of the curves here')
  parser.add_argument('--max_step', type=int, help='plot the curves up to this step only (the table is unchanged)')
  parser.add_argument('--defaults', type=pathlib.Path, default=DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None,
                      help='config file whose values a run without a key had (default: configs/default.py)')
  args = parser.parse_args(argv)
  if args.max_step is not None and args.max_step < 1:
    sys.exit(f'error: --max_step must be >= 1, got {args.max_step}')
  try:
    defaults = None if args.defaults is None else load_defaults(args.defaults)
    print(table(args.workdirs, args.metric, defaults))
  except ValueError as e:
    sys.exit(f'error: {e}')
  if args.plot:
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    last = args.max_step or float('inf')
    runs = {w.name: [r for r in metrics.read_records(w) if r['step'] <= last] for w in args.workdirs}
    metrics.plot_comparison(runs, args.plot, args.metric)
    print(f'Wrote {args.plot}')


if __name__ == '__main__':
  main()
