"""The orbax checkpointer (``jint8.training.checkpointing``): restore, keep the newest, move a corrupt step aside
with one warning line, refuse a checkpoint of another model without touching it."""

import gc
import logging

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


def test_truncated_array_files_give_one_warning_line_and_no_noise(tmp_path, caplog, capfd):
  _save(tmp_path, (1, 2))
  for path in (tmp_path / '2' / 'default').rglob('*'):
    if path.is_file() and path.parent.name == 'd':
      path.write_bytes(path.read_bytes()[:10])  # the arrays' data, cut short
  with caplog.at_level(logging.WARNING):
    step, _ = checkpointing.Checkpointer(tmp_path).restore_latest(_like())
    gc.collect()  # orbax's failed tasks would log their errors when collected
  assert step == 1 and (tmp_path / '2.corrupt').is_dir()
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1 and warnings[0].startswith('checkpoint step 2 in') and len(warnings[0]) < 500
  captured = capfd.readouterr()
  assert 'Traceback' not in captured.err + captured.out and 'Event loop is closed' not in captured.err


@pytest.mark.parametrize('like,message', [
    (_like(4), r'w is float32\[3\] in it, float32\[4\] in this run'),
    ({**_like(), 'extra': jnp.zeros(2)}, 'it lacks arrays this run has: extra'),
    ({'w': jnp.zeros(3)}, 'it holds arrays this run lacks: position, step'),
])
def test_a_checkpoint_of_another_model_is_refused_and_kept(tmp_path, like, message):
  _save(tmp_path, (1, 2))
  with pytest.raises(checkpointing.CheckpointMismatch, match=f'checkpoint step 2 in .* does not fit this run: {message}'):
    checkpointing.Checkpointer(tmp_path).restore_latest(like)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2']  # nothing moved aside
  assert checkpointing.Checkpointer(tmp_path).restore_latest(_like())[0] == 2
