"""Trains a model as a config file says.

  python train.py --config configs/resnet.py [--workdir runs/resnet20] [--config.precision=fp32 ...]

Without --workdir the run goes to runs/<config file name>-<precision>-s<seed>. A workdir holding checkpoints
resumes, if its recorded config (config.json) is this one (--allow_config_change resumes it anyway). The config's
`task` picks the task (a module on the framework jint8.training) whose train_and_evaluate runs.

A bad input (config value, data file, workdir) ends the run with one line naming it and exit status 1; --verbose
(or JINT8_VERBOSE=1) also prints the traceback. Ctrl-C during training stops after the running steps with a
checkpoint; at any other moment (starting, compiling, the final evaluation) it ends the run at once in one line, once a
checkpoint being written is saved. Exit status 130 either way (``jint8.training.interruption``).
"""

import os
import signal
import sys


def interrupted_while_starting(signum, frame):
  """Ends the run at a Ctrl-C while the modules load (before anything is written), in one line: a KeyboardInterrupt
  there is a long traceback, or lost when a callback of jax's swallows it."""
  del signum, frame
  os.write(2, b'Interrupted (Ctrl-C) while starting; nothing was written.\n')
  os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access


if __name__ == '__main__':
  signal.signal(signal.SIGINT, interrupted_while_starting)  # until interruption.exit_at_interrupt() below

# pylint: disable=g-import-not-at-top,wrong-import-position  (below the handler: the imports take seconds)
import importlib

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files import `configs.default`

from jint8 import sharding  # pylint: disable=g-import-not-at-top
from jint8.training import divergence, interruption  # pylint: disable=g-import-not-at-top

# config.task -> the module whose train_and_evaluate(config, workdir) runs it.
TASKS = {
    'classification': 'jint8.classification',
    'detection': 'jint8.detection.trainer',
}
VERBOSE_ENV = 'JINT8_VERBOSE'
# What a bad input raises (config and data checks, missing or unreadable files, a workdir of another run) and how
# a run ends early on its own: one line each, no traceback.
USER_ERRORS = (ValueError, OSError, NotImplementedError, divergence.TrainingDiverged)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and plots '
                    '(default: runs/<config name>-<precision>-s<seed>).')
flags.DEFINE_bool('allow_config_change', False, 'Resume a workdir whose recorded config (config.json) differs from '
                  'this one; its checkpoints must still fit the model.')
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() first (multi-process runs; also '
                  'JINT8_MULTIHOST=1).')
flags.DEFINE_bool('verbose', False, f'On an error, print its traceback too (also {VERBOSE_ENV}=1).')
flags.mark_flags_as_required(['config'])


def default_workdir(config_path: str, config) -> str:
  """runs/<config file name>-<precision>-s<seed>, e.g. runs/resnet-int8-s0."""
  name = os.path.splitext(os.path.basename(config_path))[0]
  return os.path.join('runs', f'{name}-{config.get("precision", "fp32")}-s{config.get("seed", 0)}')


def verbose(argv) -> bool:
  """Whether errors print their traceback (--verbose, read from ``argv`` before the flags are parsed)."""
  return os.environ.get(VERBOSE_ENV, '') not in ('', '0') or any(a in ('--verbose', '-verbose') for a in argv)


def one_line(error: BaseException) -> str:
  """An error's message on one line."""
  return ' '.join(str(error).split()) or type(error).__name__


def unknown_key_message(argv, error: BaseException) -> str:
  """The message of an override ``--config.KEY=VALUE`` whose key the config lacks (``ml_collections`` raises a
  KeyError or AttributeError holding ``'key'`` and maybe a suggestion)."""
  while isinstance(error, BaseException) and error.args:  # AttributeError(KeyError(message))
    error = error.args[0]
  first, _, suggestion = str(error).partition('\n')
  key = first.strip('"\' ')
  given = [a.split('=', 1)[0] for a in argv if a.startswith('--config.') and key in a.split('=', 1)[0].split('.')]
  flag = given[0] if given else f'--config.{key}'
  return (f'{flag}: the config has no key {flag.removeprefix("--config.")}'
          + (f' ({suggestion.strip()})' if suggestion.strip() else ''))


def parse_flags(argv):
  """absl's flag parsing, every error in one line: a flag's, or an override naming a key the config lacks."""
  try:
    return FLAGS(argv)
  except (flags.Error, KeyError, AttributeError) as e:
    if verbose(argv):
      raise
    message = one_line(e) if isinstance(e, flags.Error) else unknown_key_message(argv, e)
    sys.exit(f'error: {message}')


def run(config_path: str, config) -> None:
  """Runs the config's task in the workdir."""
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  sharding.maybe_initialize_distributed(FLAGS.multihost)
  task = config.get('task', 'classification')
  if task not in TASKS:
    raise ValueError(f'config.task: unknown task {task!r}; known: {", ".join(TASKS)}')
  workdir = FLAGS.workdir
  if workdir is None:
    workdir = default_workdir(config_path, config)
    print(f'No --workdir given: using {workdir}', flush=True)
  importlib.import_module(TASKS[task]).train_and_evaluate(config, workdir,
                                                          allow_config_change=FLAGS.allow_config_change)


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments: {" ".join(argv[1:])}')
  try:
    run(config_flags.get_config_filename(FLAGS['config']), FLAGS.config)
  except interruption.TrainingInterrupted as e:
    sys.stderr.write(f'{e}\n')
    sys.exit(interruption.EXIT_STATUS)
  except USER_ERRORS as e:
    if verbose(sys.argv):
      raise
    sys.exit(f'error: {one_line(e)}')


if __name__ == '__main__':
  interruption.exit_at_interrupt()  # a Ctrl-C outside the training steps ends the run at once, in one line
  app.run(main, flags_parser=parse_flags)
