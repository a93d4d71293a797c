"""The orbax checkpointer (``jint8.training.checkpointing``): restore, keep the newest, move a corrupt step aside
with one warning line, refuse a checkpoint of another model without touching it."""

import gc
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint8.training import checkpointing


def _like(width=3):
  return {'w': jnp.zeros((width,)), 'step': jnp.zeros((), jnp.int32), 'position': np.asarray(0, np.int64)}


def _save(directory, steps, max_to_keep=3):
  checkpointer = checkpointing.Checkpointer(directory, max_to_keep=max_to_keep)
  for step in steps:
    checkpointer.save(step, {'w': jnp.full((3,), float(step)), 'step': jnp.int32(step),
                             'position': np.asarray(10 * step, np.int64)})
  checkpointer.close()


def test_checkpointer_restores_and_skips_a_corrupt_step(tmp_path):
  assert checkpointing.Checkpointer(tmp_path).restore_latest(_like()) is None
  assert not checkpointing.has_checkpoints(tmp_path) and not checkpointing.has_checkpoints(tmp_path / 'none')
  _save(tmp_path, (1, 2, 3), max_to_keep=2)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['2', '3'] and checkpointing.has_checkpoints(tmp_path)
  (tmp_path / '3' / 'default' / '_METADATA').write_text('{')
  step, tree = checkpointing.Checkpointer(tmp_path).restore_latest(_like())
  assert step == 2 and int(tree['position']) == 20
  np.testing.assert_array_equal(tree['w'], [2.0, 2.0, 2.0])
  assert (tmp_path / '3.corrupt').is_dir()
  (tmp_path / '2' / 'default' / '_METADATA').write_text('{')
  with pytest.raises(checkpointing.NoReadableCheckpoint, match='no readable checkpoint'):
    checkpointing.Checkpointer(tmp_path).restore_latest(_like())


def _many(step):  # arrays stored outside the OCDBT index (over 1 KiB each), many of them read at once
  return {f'a{i:03d}': jnp.asarray(np.random.default_rng(step * 1000 + i).standard_normal(1000, np.float32))
          for i in range(100)}


def _cut_to_10_bytes(files):
  for path in files:
    path.write_bytes(path.read_bytes()[:10])


def _cut_largest_in_half(files):  # one file fails while the reads of the others are still running
  largest = max(files, key=lambda path: path.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])


@pytest.mark.parametrize('tree,cut,corrupt', [
    (lambda step: {'w': jnp.full((3,), float(step)), 'step': jnp.int32(step), 'position': np.asarray(10 * step)},
     _cut_to_10_bytes, [2]),
    # Which reads are running when the cut file fails varies from run to run; 3 such steps leave some abandoned.
    (_many, _cut_largest_in_half, [4, 3, 2]),
], ids=['every data file cut to 10 bytes', 'the largest data file cut in half'])
def test_truncated_array_files_give_one_warning_line_and_no_noise(tmp_path, caplog, capfd, recwarn, monkeypatch, tree,
                                                                   cut, corrupt):
  checkpointer = checkpointing.Checkpointer(tmp_path, max_to_keep=4)
  for step in range(1, corrupt[0] + 1):
    checkpointer.save(step, tree(step))
  checkpointer.close()
  for step in corrupt:
    cut([path for path in (tmp_path / str(step) / 'default').rglob('*') if path.is_file() and path.parent.name == 'd'])
  unraisable = []  # what the process's hook gets: orbax's abandoned reads raise when collected
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
  with caplog.at_level(logging.WARNING):
    step, restored = checkpointing.Checkpointer(tmp_path).restore_latest(tree(0))
    gc.collect()  # orbax's failed tasks would log their errors when collected
  assert step == 1 and all((tmp_path / f'{step}.corrupt').is_dir() for step in corrupt)
  jax.tree.map(np.testing.assert_array_equal, restored, tree(1))
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert [w.split(' in ')[0] for w in warnings] == [f'checkpoint step {step}' for step in corrupt]
  assert all(len(w) < 500 for w in warnings)
  assert not unraisable, f'{len(unraisable)} unraisable errors, the first: {unraisable[0].exc_value!r:.300}'
  captured = capfd.readouterr()
  assert 'Traceback' not in captured.err + captured.out and 'Exception ignored' not in captured.err
  assert 'Event loop is closed' not in captured.err
  assert not [w for w in recwarn if 'never awaited' in str(w.message)]


@pytest.mark.parametrize('like,message', [
    (_like(4), r'w is float32\[3\] in it, float32\[4\] in this run'),
    ({**_like(), 'extra': jnp.zeros(2)}, 'it lacks arrays this run has: extra'),
    ({'w': jnp.zeros(3)}, 'it holds arrays this run lacks: position, step'),
])
def test_a_checkpoint_of_another_model_is_refused_and_kept(tmp_path, like, message):
  _save(tmp_path, (1, 2))
  expected = f'checkpoint step 2 in .* does not fit this run: {message}'
  with pytest.raises(checkpointing.CheckpointMismatch, match=expected):
    checkpointing.Checkpointer(tmp_path).restore_latest(like)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2']  # nothing moved aside
  assert checkpointing.Checkpointer(tmp_path).restore_latest(_like())[0] == 2
