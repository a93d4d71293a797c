"""train.py end to end: a run's metrics, checkpoints and plots, resume after SIGKILL, a stop at Ctrl-C, a corrupt
checkpoint, a resume with another config, another seed, 4 devices, and a bad input of each kind ending in one line.

The runs use configs/smoke.py with the small CNN of ``tiny.py`` (``--config.model=tiny:TinyCNN``) on a few
hundred real CIFAR-10 images, in subprocesses sharing a JAX compilation cache.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

from jint8.training import checkpointing, metrics
from test_datasets import _write_tar, cifar_subset  # noqa: F401  (session fixture)


REPO = pathlib.Path(__file__).resolve().parents[1]


NUM_STEPS = 40


RUN_FLAGS = ('--config.model=tiny:TinyCNN', f'--config.num_train_steps={NUM_STEPS}',
             '--config.log_every_steps=4', '--config.eval_every_steps=8', '--config.checkpoint_every_steps=4')


def _run(cwd, data, cache_dir, *flags, devices=1, background_log=None, background_errors=None, status=0):
  """Runs train.py with the smoke config on the test data; returns the CompletedProcess, which must end with
  ``status`` (or the Popen, writing to ``background_log``, and its stderr to ``background_errors`` when given)."""
  env = dict(os.environ, PYTHONPATH=f'{REPO}{os.pathsep}{REPO / "tests"}', JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  command = [sys.executable, str(REPO / 'train.py'), f'--config={REPO / "configs" / "smoke.py"}',
             f'--config.dataset.archive={data.archive}', f'--config.dataset.data_dir={data.data_dir}',
             *RUN_FLAGS, *flags]
  if background_log is not None:
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=background_log,
                            stderr=background_errors or subprocess.STDOUT)
  result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == status, result.stdout[-3000:] + result.stderr[-3000:]
  return result


def _error_line(result) -> str:
  """The one line a failed run ends with; nothing else on stderr but progress and warning lines, no traceback."""
  output = result.stdout + result.stderr
  assert 'Traceback' not in output and not re.search(r'^\w+(Error|Exception):', output, re.M), output[-3000:]
  return result.stderr.strip().splitlines()[-1]


def _checkpoints(workdir) -> dict[str, float]:
  """Every file under ``workdir/checkpoints`` with its modification time."""
  return {str(p.relative_to(workdir)): p.stat().st_mtime for p in (workdir / 'checkpoints').rglob('*')}


def _final(stdout: str) -> dict[str, float]:
  lines = [line for line in stdout.splitlines() if line.startswith('{"final_test"')]
  assert len(lines) == 1, stdout[-3000:]
  return json.loads(lines[0])['final_test']


def _test_records(workdir) -> list[dict[str, Any]]:
  return [r for r in metrics.read_records(workdir) if r['split'] == 'test']


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def uninterrupted(cifar_subset, cache_dir, tmp_path_factory):
  """One uninterrupted run without --workdir, in a fresh folder."""
  cwd = tmp_path_factory.mktemp('uninterrupted')
  result = _run(cwd, cifar_subset, cache_dir)
  return cwd / 'runs' / 'smoke-int8-s0', result.stdout


def test_run_writes_metrics_checkpoints_and_plots(uninterrupted):
  workdir, stdout = uninterrupted
  assert 'No --workdir given: using runs/smoke-int8-s0' in stdout and 'Starting a new run' in stdout
  records = metrics.read_records(workdir)
  train = [r for r in records if r['split'] == 'train']
  assert [r['step'] for r in train] == list(range(4, NUM_STEPS + 1, 4))
  assert [r['step'] for r in _test_records(workdir)] == list(range(8, NUM_STEPS + 1, 8))
  # int8: the two later convs are int8 (per-layer stats); the first conv and the Dense stay float.
  assert sorted(train[-1]['layers']) == ['model/Conv_1', 'model/Conv_2']
  for r in train:
    assert np.isfinite(r['loss']) and 0 <= r['accuracy'] <= 1 and r['nonfinite'] == 0
    assert 0 <= r['grad_deviation_mean'] <= r['grad_deviation_max'] < 0.5
    assert all(stats['grad_clip'] > 0 and 0 < stats['weight_levels'] <= 127 for stats in r['layers'].values())
  assert train[0]['lr'] > train[-1]['lr'] > 0  # cosine decay
  assert train[-1]['loss'] < train[0]['loss']
  assert _final(stdout) == {k: _test_records(workdir)[-1][k] for k in ('loss', 'accuracy')}
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['32', '36', '40']
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  for png in ('curves.png', 'layers.png'):
    assert (workdir / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert json.loads((workdir / 'config.json').read_text())['num_train_steps'] == NUM_STEPS


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(uninterrupted, cifar_subset, cache_dir, tmp_path):
  workdir = tmp_path / 'run'
  with open(tmp_path / 'killed.log', 'w') as log:
    process = _run(tmp_path, cifar_subset, cache_dir, f'--workdir={workdir}', background_log=log)
    deadline = time.time() + 300
    while not (workdir / 'checkpoints' / '4').exists() and process.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
  assert '"final_test"' not in (tmp_path / 'killed.log').read_text()  # killed before the end
  result = _run(tmp_path, cifar_subset, cache_dir, f'--workdir={workdir}')
  assert 'Resuming from the checkpoint at step' in result.stdout
  assert _final(result.stdout) == _final(uninterrupted[1])
  strip = lambda records: [{k: v for k, v in r.items() if k != 'images_per_second'} for r in records]
  assert strip(metrics.read_records(workdir)) == strip(metrics.read_records(uninterrupted[0]))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(uninterrupted, cifar_subset, cache_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(uninterrupted[0], workdir)
  for path in (workdir / 'checkpoints' / '40').rglob('*'):
    if path.is_file() and path.parent.name == 'd':
      path.write_bytes(path.read_bytes()[:100])  # truncated
  result = _run(tmp_path, cifar_subset, cache_dir, f'--workdir={workdir}')
  warnings = [line for line in result.stderr.splitlines() if 'checkpoint' in line]
  assert len(warnings) == 1 and 'checkpoint step 40' in warnings[0] and 'cannot be read' in warnings[0]
  assert 'Traceback' not in result.stderr and 'Event loop is closed' not in result.stderr
  assert len(result.stderr.splitlines()) < 30, result.stderr  # the progress bar's lines and the warning
  assert 'Resuming from the checkpoint at step 36' in result.stdout
  assert (workdir / 'checkpoints' / '40.corrupt').is_dir()
  assert _final(result.stdout) == _final(uninterrupted[1])


def test_a_resume_with_another_config_is_refused_and_touches_no_checkpoint(uninterrupted, cifar_subset,
                                                                           cache_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(uninterrupted[0], workdir)
  shutil.rmtree(workdir / 'checkpoints' / '40')
  shutil.rmtree(workdir / 'checkpoints' / '36')
  before, recorded = _checkpoints(workdir), (workdir / 'config.json').read_text()
  for flags, changed in ((('--config.precision=fp32',), 'precision "int8" -> "fp32"'),
                         (('--config.seed=1', '--config.model_kwargs.width=0.5'),
                          'model_kwargs.width 0.25 -> 0.5, seed 0 -> 1')):
    result = _run(tmp_path, cifar_subset, cache_dir, f'--workdir={workdir}', *flags, status=1)
    line = _error_line(result)
    assert line.startswith(f'error: {workdir} holds checkpoints of a run with another config') and changed in line
    assert '--allow_config_change' in line and '--workdir' in line
  # --allow_config_change resumes a change the checkpoints fit, and refuses one they do not fit, in one line.
  result = _run(tmp_path, cifar_subset, cache_dir, f'--workdir={workdir}', '--allow_config_change',
                '--config.precision=fp32', status=1)
  assert _error_line(result).startswith(f'error: checkpoint step 32 in {workdir / "checkpoints"} does not fit this '
                                        'run: it holds arrays this run lacks: state.batch_stats.model.BatchNorm_0.')
  assert _checkpoints(workdir) == before and (workdir / 'config.json').read_text() == recorded
  result = _run(tmp_path, cifar_subset, cache_dir, f'--workdir={workdir}', '--allow_config_change',
                '--config.optimizer.learning_rate=0.05')
  assert 'Resuming from the checkpoint at step 32' in result.stdout
  assert 'Resuming with a changed config (allowed): optimizer.learning_rate 0.1 -> 0.05' in result.stdout
  assert json.loads((workdir / 'config.json').read_text())['optimizer']['learning_rate'] == 0.05


def test_another_seed_without_a_workdir_is_a_run_of_its_own(uninterrupted, cifar_subset, cache_dir):
  cwd = uninterrupted[0].parents[1]
  result = _run(cwd, cifar_subset, cache_dir, '--config.seed=1')
  assert 'No --workdir given: using runs/smoke-int8-s1' in result.stdout and 'Starting a new run' in result.stdout
  assert json.loads((uninterrupted[0] / 'config.json').read_text())['seed'] == 0  # seed 0's record untouched
  table = subprocess.run([sys.executable, '-m', 'jint8.compare', 'runs/smoke-int8-s0', 'runs/smoke-int8-s1'],
                         cwd=cwd, capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=REPO))
  assert '| mean of smoke-int8-s0, smoke-int8-s1 |' in table.stdout and 'Duplicate' not in table.stdout


def _wait_for(found, process, seconds=300):
  deadline = time.time() + seconds
  while not found() and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert found(), 'the run ended or timed out first'


# Compiled loops of 1, 1, 2, 4 steps, then one per epoch of 8 (no log, evaluation or checkpoint before step 100,000),
# a checkpoint after each (on time), steps of a wider TinyCNN: once checkpoint 4 is there, the steps 4 to 8 run as
# one compiled loop for about a second.
LONG_RUN = ('--config.num_train_steps=100000', '--config.log_every_steps=100000', '--config.eval_every_steps=100000',
            '--config.checkpoint_every_steps=100000', '--config.checkpoint_every_minutes=1e-9',
            '--config.model_kwargs.width=6')


def _interrupt_a_long_run(data, cache_dir, tmp_path, *, twice: bool):
  """Starts a ``LONG_RUN``, sends it a Ctrl-C in its steps 4 to 8 and, ``twice``, another once it said what happens.

  Returns the workdir, the run's output lines, whether it still ran when it said what happens and its status."""
  workdir, log_path = tmp_path / 'run', tmp_path / 'run.log'
  with open(log_path, 'w') as log:
    process = _run(tmp_path, data, cache_dir, f'--workdir={workdir}', *LONG_RUN, background_log=log)
    _wait_for((workdir / 'checkpoints' / '4').exists, process)
    process.send_signal(signal.SIGINT)
    _wait_for(lambda: 'Ctrl-C' in log_path.read_text(), process)
    running = process.poll() is None
    if twice:
      process.send_signal(signal.SIGINT)
    status = process.wait(timeout=300)
  return workdir, log_path.read_text().splitlines(), running, status


def test_ctrl_c_says_at_once_what_happens_then_saves_and_stops(cifar_subset, cache_dir, tmp_path):
  workdir, lines, running, status = _interrupt_a_long_run(cifar_subset, cache_dir, tmp_path, twice=False)
  assert running and status == 130  # said while the steps still ran
  assert [line for line in lines if 'Ctrl-C' in line] == [
      'Ctrl-C: stopping after the current 4 steps, saving a checkpoint; Ctrl-C again to abort.',
      f'Stopped by Ctrl-C at step 8 of 100000, with the checkpoint {workdir}/checkpoints/8: run the same command to '
      'resume.'], lines[-10:]
  assert lines[-1].startswith('Stopped by Ctrl-C') and not any('Traceback' in line for line in lines)
  # The same command resumes there (here, through the override, to end a few steps later).
  result = _run(tmp_path, cifar_subset, cache_dir, f'--workdir={workdir}', *LONG_RUN, '--config.num_train_steps=10',
                '--allow_config_change')
  assert 'Resuming from the checkpoint at step 8' in result.stdout and 'step 10/10 test' in result.stdout


def test_a_second_ctrl_c_aborts_and_keeps_the_checkpoints(cifar_subset, cache_dir, tmp_path):
  workdir, lines, _, status = _interrupt_a_long_run(cifar_subset, cache_dir, tmp_path, twice=True)
  assert status == 130 and not any('Traceback' in line for line in lines)
  assert [line for line in lines if 'Ctrl-C' in line] == [
      'Ctrl-C: stopping after the current 4 steps, saving a checkpoint; Ctrl-C again to abort.',
      'Ctrl-C again: aborting now; the checkpoints saved so far are kept.']
  assert not (workdir / 'checkpoints' / '8').exists()
  result = _run(tmp_path, cifar_subset, cache_dir, f'--workdir={workdir}', *LONG_RUN, '--config.num_train_steps=6',
                '--allow_config_change')
  assert 'Resuming from the checkpoint at step 4' in result.stdout


# Moments outside the training steps: while train.py imports its modules (jaxlib's library is loaded first), and,
# in a new run, while it initializes the state (compiling it; its checkpoint folder was just created).
CTRL_C_MOMENTS = {
    'importing': lambda process, workdir: 'jaxlib' in pathlib.Path(f'/proc/{process.pid}/maps').read_text(),
    'initializing the state': lambda process, workdir: (workdir / 'checkpoints').is_dir(),
}


@pytest.mark.parametrize('moment', list(CTRL_C_MOMENTS))
def test_a_ctrl_c_outside_the_training_steps_ends_the_run_at_once_in_one_line(uninterrupted, cifar_subset, tmp_path,
                                                                               moment):
  workdir = tmp_path / 'run'
  if moment == 'importing':
    shutil.copytree(uninterrupted[0], workdir)  # resumes
  before = _checkpoints(workdir) if workdir.exists() else {}
  with open(tmp_path / 'out.log', 'w') as out, open(tmp_path / 'err.log', 'w') as err:
    # A cache of its own: the state's compilation is real.
    process = _run(tmp_path, cifar_subset, tmp_path / 'cache', f'--workdir={workdir}', background_log=out,
                   background_errors=err)
    _wait_for(lambda: CTRL_C_MOMENTS[moment](process, workdir), process)
    process.send_signal(signal.SIGINT)
    status = process.wait(timeout=300)
  stdout, stderr = (tmp_path / 'out.log').read_text(), (tmp_path / 'err.log').read_text()
  assert status == 130, stdout[-3000:] + stderr[-3000:]
  said = ['Interrupted (Ctrl-C) outside the training steps; the checkpoints saved so far are kept.']
  if moment == 'importing':  # or just after
    said.insert(0, 'Interrupted (Ctrl-C) while starting; nothing was written.')
  assert len(stderr.splitlines()) == 1 and stderr.strip() in said, stderr[-3000:]  # no traceback, no segfault
  assert 'Ctrl-C' not in stdout and 'Traceback' not in stdout and '"final_test"' not in stdout
  if before:
    assert _checkpoints(workdir) == before
  else:
    assert not checkpointing.has_checkpoints(workdir / 'checkpoints')


BAD_INPUTS = {
    'unknown key': (('--config.optimizer.learning_rat=0.1',),
                    'error: --config.optimizer.learning_rat: the config has no key optimizer.learning_rat '
                    '(Did you mean "learning_rate" instead of "learning_rat"?)'),
    'wrong type': (('--config.batch_size=abc',),
                   "error: flag --config.batch_size=abc: invalid literal for int() with base 10: 'abc'"),
    'unknown model': (('--config.model=resnet99',), "error: config.model: unknown model 'resnet99'; valid: "),
    'unknown precision': (('--config.precision=int4',),
                          "error: config.precision: unknown precision 'int4'; valid: ('fp32', 'bf16', 'int8')"),
    'workdir a file': (('--workdir={tmp}/file',), 'error: the workdir {tmp}/file is a file, not a folder'),
    'missing archive': (('--config.dataset.archive={tmp}/missing.tar.gz',),
                        'error: config.dataset.archive: {tmp}/missing.tar.gz is neither cifar10-jpg.tar.gz nor a '
                        'folder holding it (the data prepared in '),
    'missing archive, nothing prepared': (('--config.dataset.archive={tmp}/missing.tar.gz',
                                           '--config.dataset.data_dir={tmp}/tfds'),
                                          'error: config.dataset.archive: {tmp}/missing.tar.gz does not exist (give '
                                          'the archive cifar10-jpg.tar.gz or the folder holding it)'),
    'foreign archive': (('--config.dataset.archive={tmp}/foreign.tar.gz',),
                        'error: config.dataset.archive: {tmp}/foreign.tar.gz is not the archive that the data '
                        'prepared in '),
    'foreign archive, nothing prepared': (('--config.dataset.archive={tmp}/foreign.tar.gz',
                                           '--config.dataset.data_dir={tmp}/tfds'),
                                          'error: the CIFAR-10 archive {tmp}/foreign.tar.gz holds no images'),
    'empty archive': (('--config.dataset.archive={tmp}/empty.tar.gz', '--config.dataset.data_dir={tmp}/tfds'),
                      'error: cannot read the CIFAR-10 archive {tmp}/empty.tar.gz'),
    'truncated archive': (('--config.dataset.archive={tmp}/cut.tar.gz', '--config.dataset.data_dir={tmp}/tfds'),
                          'error: cannot read the CIFAR-10 archive {tmp}/cut.tar.gz'),
}


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_a_bad_input_ends_in_one_line(cifar_subset, cache_dir, tmp_path, case):
  (tmp_path / 'file').write_text('not a folder\n')
  (tmp_path / 'empty.tar.gz').write_bytes(b'')
  data = cifar_subset.archive.read_bytes()
  (tmp_path / 'cut.tar.gz').write_bytes(data[:len(data) // 2])
  _write_tar(tmp_path / 'foreign.tar.gz', {'JPEGImages/0.jpg': data[:100]})
  flags, message = BAD_INPUTS[case]
  result = _run(tmp_path, cifar_subset, cache_dir, f'--workdir={tmp_path / "run"}',
                *[f.format(tmp=tmp_path) for f in flags], status=1)
  assert _error_line(result).startswith(message.format(tmp=tmp_path))
  assert not (tmp_path / 'run').exists()  # nothing written


def test_verbose_shows_the_traceback(tmp_path):
  process = subprocess.run(
      [sys.executable, str(REPO / 'train.py'), f'--config={REPO / "configs" / "smoke.py"}', '--config.precision=int4',
       '--verbose', f'--workdir={tmp_path / "run"}'], cwd=tmp_path, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu'))
  assert process.returncode == 1 and 'Traceback' in process.stderr and "unknown precision 'int4'" in process.stderr
