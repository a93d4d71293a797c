"""jint8.compare: the run table (final, best, seed groups) and its errors."""

import json
import statistics

import numpy as np
import pytest

from jint8 import compare
from jint8.training import metrics


def _write_run(workdir, accuracies, deviations, seed, precision='int8', images_per_second=(100.0,)):
  """A run logging every 10 steps at batch 8 (config.json) with these test accuracies and deviations."""
  writer = metrics.MetricWriter(workdir)
  for i, (accuracy, deviation) in enumerate(zip(accuracies, deviations)):
    writer.write(10 * (i + 1), 'train', {'loss': 1.0 / (i + 1), 'epoch': i + 1.0, 'nonfinite': i % 2,
                                        'grad_deviation_max': deviation,
                                        'images_per_second': images_per_second[i % len(images_per_second)]})
    writer.write(10 * (i + 1), 'test', {'accuracy': accuracy})
  writer.close()
  (workdir / 'config.json').write_text(json.dumps({'precision': precision, 'seed': seed, 'batch_size': 8}))


def test_table_reports_each_run_and_the_seed_mean(tmp_path, rng):
  runs = {}
  for name, seed, precision in (('int8-s0', 0, 'int8'), ('int8-s1', 1, 'int8'), ('fp32-s0', 0, 'fp32')):
    runs[name] = (rng.uniform(0.5, 0.9, size=4), rng.uniform(0, 0.1, size=4))
    _write_run(tmp_path / name, *runs[name], seed=seed, precision=precision, images_per_second=(4.0, 16.0))
  text = compare.table([tmp_path / n for n in runs], 'accuracy')
  minutes = 2 * (10 * 8 / 4.0 + 10 * 8 / 16.0) / 60  # four logs of 10 steps of 8 images at 4 and 16 images/s
  for name, (accuracies, deviations) in runs.items():
    assert (f'| {name} | 40 | {accuracies[-1]:.4f} | {accuracies.max():.4f} | {accuracies.min():.4f} '
            f'| {minutes:.1f} | 2 | {deviations.max():.4f} | - |' in text)
  finals = [runs['int8-s0'][0][-1], runs['int8-s1'][0][-1]]
  assert (f'| mean of int8-s0, int8-s1 | | {np.mean(finals):.4f} +- {statistics.stdev(finals):.4f} |'
          in text)
  assert 'mean of fp32' not in text  # a group of one run has no mean row
  compare.main([str(tmp_path / n) for n in runs] + ['--plot', str(tmp_path / 'plots' / 'cmp.png')])
  assert (tmp_path / 'plots' / 'cmp.png').stat().st_size > 0


def test_the_lowest_value_skips_the_first_tenth_of_the_steps(tmp_path, rng):
  accuracies = rng.uniform(0.6, 0.9, size=20)
  accuracies[0] = rng.uniform(0.0, 0.1)  # step 100 of 2,000: the first tenth, before the network learned
  accuracies[12] = rng.uniform(0.1, 0.3)  # a dip mid-run
  writer = metrics.MetricWriter(tmp_path / 'run')
  for i, accuracy in enumerate(accuracies):
    writer.write(100 * (i + 1), 'train', {'loss': 1.0 / (i + 1), 'images_per_second': 80.0})
    writer.write(100 * (i + 1), 'test', {'accuracy': accuracy})
  writer.close()
  row = compare.table([tmp_path / 'run'], 'accuracy').splitlines()[-1]
  assert row.startswith(f'| run | 2000 | {accuracies[-1]:.4f} | {accuracies.max():.4f} | {accuracies[12]:.4f} |')


def test_the_table_names_the_step_where_a_run_diverged(tmp_path, rng):
  losses = np.concatenate([np.geomspace(2.3, 0.5, 6), rng.uniform(2.28, 2.32, size=8)])  # back at the start
  writer = metrics.MetricWriter(tmp_path / 'collapsed')
  for i, loss in enumerate(losses):
    writer.write(10 * (i + 1), 'train', {'loss': loss, 'images_per_second': 80.0})
    writer.write(10 * (i + 1), 'test', {'accuracy': rng.uniform(0.1, 0.2)})
  writer.close()
  text = compare.table([tmp_path / 'collapsed'], 'accuracy')
  assert text.splitlines()[-1].endswith('| step 110 |')  # the 5th log back at the start: logs 7-11


def test_a_run_without_the_metric_is_named(tmp_path, rng):
  _write_run(tmp_path / 'run', rng.uniform(size=2), rng.uniform(size=2), seed=0)
  with pytest.raises(ValueError, match=r"run: no evaluation record with 'mAP50'"):
    compare.table([tmp_path / 'run'], 'mAP50')
  with pytest.raises(SystemExit, match='no evaluation record'):
    compare.main([str(tmp_path / 'run'), '--metric', 'mAP50'])


def test_a_path_that_is_not_a_run_folder_is_named(tmp_path, rng):
  _write_run(tmp_path / 'run', rng.uniform(size=2), rng.uniform(size=2), seed=0)
  (tmp_path / 'run.log').write_text('train: ...\n')
  for path in (tmp_path / 'missing', tmp_path / 'run.log'):
    with pytest.raises(SystemExit, match=rf'{path.name}: not a run folder \(no metrics.jsonl'):
      compare.main([str(tmp_path / 'run'), str(path)])


def test_detection_runs_are_compared_on_their_validation_split(tmp_path, rng):
  maps = {}
  for name, precision in (('det-fp32', 'fp32'), ('det-int8', 'int8')):
    maps[name] = rng.uniform(0.3, 0.9, size=3)
    writer = metrics.MetricWriter(tmp_path / name)
    for i, value in enumerate(maps[name]):
      writer.write(12 * (i + 1), 'train', {'loss': rng.uniform(0.5, 2.0), 'epoch': i + 1.0, 'images_per_second': 8.0})
      writer.write(12 * (i + 1), 'val', {'mAP50': value, 'mAP': value / 2})
    writer.close()
    (tmp_path / name / 'config.json').write_text(json.dumps({'precision': precision, 'seed': 0, 'batch_size': 4}))
  text = compare.table([tmp_path / n for n in maps], 'mAP50')
  for name, values in maps.items():
    assert f'| {name} | 36 | {values[-1]:.4f} | {values.max():.4f} | {values.min():.4f} | 0.3 | 0 |' in text
  compare.main([str(tmp_path / n) for n in maps] + ['--metric', 'mAP50', '--plot', str(tmp_path / 'det.png')])
  assert (tmp_path / 'det.png').stat().st_size > 0


def test_runs_group_on_the_config_keys_they_share():
  old = {'precision': 'int8', 'seed': 0, 'int8': {'period': 100}}
  new = {'precision': 'int8', 'seed': 1, 'int8': {'period': 100, 'compute_dtype': 'float32'}}
  assert compare.same_recipe(old, new)  # a key an older jint8 did not write is not compared
  assert not compare.same_recipe(old, {**new, 'int8': {'period': 1, 'compute_dtype': 'float32'}})
  assert not compare.same_recipe(old, {**new, 'precision': 'fp32'})
  assert not compare.same_recipe(old, None)


def test_a_key_only_newer_runs_have_counts_as_its_default_in_older_runs():
  old = {'precision': 'int8', 'seed': 0, 'int8': {'period': 100}}
  new = {'precision': 'int8', 'seed': 1, 'int8': {'period': 100, 'channel_clips': False}}
  defaults = {'int8': {'period': 100, 'channel_clips': False}}
  assert compare.same_recipe(old, new, defaults)
  assert not compare.same_recipe(old, {**new, 'int8': {'period': 100, 'channel_clips': True}}, defaults)
  assert compare.same_recipe(old, {**new, 'int8': {'period': 100, 'channel_clips': True}})  # no defaults known


def test_compare_reads_the_defaults_from_the_config_file(tmp_path, rng, capsys):
  for name, seed, extra in (('old-s0', 0, {}), ('new-s1', 1, {'divergence_patience': 0})):
    _write_run(tmp_path / name, rng.uniform(0.5, 0.9, size=3), rng.uniform(0, 0.1, size=3), seed=seed)
    config = json.loads((tmp_path / name / 'config.json').read_text())
    (tmp_path / name / 'config.json').write_text(json.dumps({**config, **extra}))
  runs = [str(tmp_path / 'old-s0'), str(tmp_path / 'new-s1')]
  compare.main(runs + ['--defaults', str(compare.DEFAULT_CONFIG)])  # the default patience is not 0
  assert 'mean of' not in capsys.readouterr().out
  (tmp_path / 'patience0.py').write_text(
      'import ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict({"divergence_patience": 0})\n')
  compare.main(runs + ['--defaults', str(tmp_path / 'patience0.py')])
  assert 'mean of old-s0, new-s1' in capsys.readouterr().out
  with pytest.raises(SystemExit, match='--defaults: no config file at'):
    compare.main(runs + ['--defaults', str(tmp_path / 'missing.py')])


def test_max_step_cuts_the_plotted_curves(tmp_path, rng, monkeypatch):
  _write_run(tmp_path / 'run', rng.uniform(0.5, 0.9, size=5), rng.uniform(0, 0.1, size=5), seed=0)
  plotted = {}
  monkeypatch.setattr(compare.metrics, 'plot_comparison', lambda runs, path, metric: plotted.update(runs))
  compare.main([str(tmp_path / 'run'), '--plot', str(tmp_path / 'p.png'), '--max_step', '30'])
  assert sorted({r['step'] for r in plotted['run']}) == [10, 20, 30]
  with pytest.raises(SystemExit, match='--max_step must be >= 1'):
    compare.main([str(tmp_path / 'run'), '--plot', str(tmp_path / 'p.png'), '--max_step', '0'])


def test_runs_of_the_same_config_and_seed_are_duplicates_not_seeds(tmp_path, rng):
  runs = {}
  for name, seed in (('s0', 0), ('s0-again', 0), ('s1', 1)):
    runs[name] = rng.uniform(0.5, 0.9, size=3)
    _write_run(tmp_path / name, runs[name], rng.uniform(0, 0.1, size=3), seed=seed)
  text = compare.table([tmp_path / n for n in runs], 'accuracy')
  finals = [runs['s0'][-1], runs['s1'][-1]]
  assert (f'| mean of s0, s1 | | {np.mean(finals):.4f} +- {statistics.stdev(finals):.4f} |' in text)
  assert text.splitlines()[-1] == 'Duplicate: s0-again has the config and seed (0) of s0; it is left out of the means.'
