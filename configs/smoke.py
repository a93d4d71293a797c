"""A short run on the CPU, mostly compiling: ResNet-20 at quarter width on 256 training images, int8, 12 steps.

Checks the whole path (data, int8 training, evaluation, checkpoints, metrics, plots); it learns nothing.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = 'resnet20'
  config.model_kwargs.width = 0.25
  config.dataset.max_train_examples = 256
  config.dataset.max_test_examples = 128
  config.precision = 'int8'
  config.int8.period = 4
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_train_steps = 12
  config.log_every_steps = 2
  config.eval_every_steps = 6
  config.checkpoint_every_steps = 4
  config.keep_checkpoints = 3
  return config
