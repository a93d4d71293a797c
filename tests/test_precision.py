"""The config's precision (``jint8.training.precision``)."""

import tiny
from jint8.training import precision


def test_precision_is_described_with_the_backend_that_runs():
  config = tiny.config()
  assert precision.describe(config) == ('int8 (xla backend, DSGC every 4 steps, DCLR alpha 20 beta 0.1, '
                                        'float32 elsewhere)')  # backend "auto" off a GPU
  config.int8.deviation_jump = 3.0
  assert 'DSGC every 4 steps and after a 3x deviation jump' in precision.describe(config)
  config.int8.dsgc, config.int8.dclr = False, False
  assert 'max-abs gradient clip, no DCLR' in precision.describe(config)
  assert precision.describe(tiny.config(precision='bf16')) == 'bf16'


def test_int8_config_takes_the_int8_keys_of_the_config():
  config = tiny.config()
  config.int8.depthwise_channel_clips, config.int8.refine, config.int8.dsgc = True, 3, False
  config.int8.input_clip, config.int8.history, config.int8.deviation_jump = 'maxabs', 5, 2.5
  int8 = precision.int8_config(config)
  assert int8.depthwise_channel_clips and int8.refine == 3 and not int8.dsgc
  assert int8.input_clip == 'maxabs' and int8.history == 5 and int8.deviation_jump == 2.5
