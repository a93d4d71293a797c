"""The config a run's folder records (``jint8.training.recorded_config``): differences, the resume check."""

import json

import pytest

import tiny
from jint8.training import recorded_config


def test_differences_name_flattened_keys_and_absent_ones():
  a = {'seed': 0, 'optimizer': {'learning_rate': 0.1, 'name': 'sgd'}, 'old': 1}
  b = {'seed': 1, 'optimizer': {'learning_rate': 0.1, 'name': 'adam'}, 'new': (1, 2)}
  changes = recorded_config.differences(a, json.loads(json.dumps(b)))
  assert list(changes) == ['new', 'old', 'optimizer.name', 'seed']
  assert recorded_config.describe(changes) == 'new (absent) -> [1, 2], old 1 -> (absent), optimizer.name "sgd" -> ' \
                                              '"adam", seed 0 -> 1'
  assert recorded_config.describe(changes, limit=1) == 'new (absent) -> [1, 2] and 3 more'
  # With defaults, a key only one config has counts as its default in the other, or not at all.
  assert list(recorded_config.differences(a, b, defaults={'old': 1, 'new': [1, 3]})) == ['new', 'optimizer.name',
                                                                                       'seed']


def test_a_resume_with_another_config_is_refused_naming_every_key(tmp_path):
  config = tiny.config()
  assert recorded_config.check_resume(tmp_path, config) == {}  # nothing recorded: nothing to compare
  recorded_config.write(tmp_path, config)
  assert recorded_config.read(tmp_path) == recorded_config.as_dict(config)
  assert recorded_config.check_resume(tmp_path, tiny.config()) == {}
  # Keys of how the run is logged, checkpointed or where its data lies may change.
  assert recorded_config.check_resume(tmp_path, tiny.config(log_every_steps=7, keep_checkpoints=9)) == {}
  changed = tiny.config(seed=3, precision='fp32')
  with pytest.raises(recorded_config.ConfigChanged) as e:
    recorded_config.check_resume(tmp_path, changed)
  message = str(e.value)
  assert 'precision "int8" -> "fp32", seed 0 -> 3.' in message and '--workdir' in message
  assert message.endswith('pass --allow_config_change (or allow_config_change=True to train_and_evaluate).')
  assert '\n' not in message
  assert recorded_config.check_resume(tmp_path, changed, allow_change=True) == {'precision': ('int8', 'fp32'),
                                                                               'seed': (0, 3)}
