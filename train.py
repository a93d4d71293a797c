"""Trains a model as a config file says.

  python train.py --config configs/resnet.py [--workdir runs/resnet20] [--config.precision=fp32 ...]

Without --workdir the run goes to runs/<config file name>-<precision>. A workdir holding checkpoints resumes.
The config's `task` picks the task (a module on the framework jint8.training) whose train_and_evaluate runs.
"""

import importlib
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files import `configs.default`

from jint8 import sharding  # pylint: disable=g-import-not-at-top

# config.task -> the module whose train_and_evaluate(config, workdir) runs it.
TASKS = {
    'classification': 'jint8.classification',
    'detection': 'jint8.detection.trainer',
}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and plots '
                    '(default: runs/<config name>-<precision>).')
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() first (multi-process runs; also '
                  'JINT8_MULTIHOST=1).')
flags.mark_flags_as_required(['config'])


def default_workdir(config_path: str, config) -> str:
  """runs/<config file name>-<precision>, e.g. runs/resnet-int8."""
  name = os.path.splitext(os.path.basename(config_path))[0]
  return os.path.join('runs', f'{name}-{config.get("precision", "fp32")}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  sharding.maybe_initialize_distributed(FLAGS.multihost)
  config = FLAGS.config
  task = config.get('task', 'classification')
  if task not in TASKS:
    raise app.UsageError(f'config.task: unknown task {task!r}; known: {", ".join(TASKS)}')
  workdir = FLAGS.workdir
  if workdir is None:
    workdir = default_workdir(config_flags.get_config_filename(FLAGS['config']), config)
    print(f'No --workdir given: using {workdir}', flush=True)
  importlib.import_module(TASKS[task]).train_and_evaluate(config, workdir)


if __name__ == '__main__':
  app.run(main)
