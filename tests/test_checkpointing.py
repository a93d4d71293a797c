"""The orbax checkpointer (``jint8.training.checkpointing``): restore, keep the newest, skip a corrupt step."""

import jax.numpy as jnp
import numpy as np
import pytest

from jint8.training import checkpointing


def test_checkpointer_restores_and_skips_a_corrupt_step(tmp_path):
  like = {'w': jnp.zeros((3,)), 'step': jnp.zeros((), jnp.int32), 'position': np.asarray(0, np.int64)}
  checkpointer = checkpointing.Checkpointer(tmp_path, max_to_keep=2)
  assert checkpointer.restore_latest(like) is None
  for step in (1, 2, 3):
    checkpointer.save(step, {'w': jnp.full((3,), float(step)), 'step': jnp.int32(step),
                             'position': np.asarray(10 * step, np.int64)})
  checkpointer.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['2', '3']
  (tmp_path / '3' / 'default' / '_METADATA').write_text('{')
  step, tree = checkpointing.Checkpointer(tmp_path).restore_latest(like)
  assert step == 2 and int(tree['position']) == 20
  np.testing.assert_array_equal(tree['w'], [2.0, 2.0, 2.0])
  assert (tmp_path / '3.corrupt').is_dir()
  (tmp_path / '2' / 'default' / '_METADATA').write_text('{')
  with pytest.raises(RuntimeError, match='no readable checkpoint'):
    checkpointing.Checkpointer(tmp_path).restore_latest(like)
