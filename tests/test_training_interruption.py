"""Ctrl-C (``jint8.training.interruption``): during training the first requests a stop and says so at once, even
while the main thread is blocked in a call that does not return to Python; outside the training steps one ends the
process at once in one line, once the checkpoint being written is saved."""

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from jint8.training import interruption

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_a_ctrl_c_requests_a_stop_and_says_what_happens_at_once():
  said, handler = [], signal.getsignal(signal.SIGINT)
  read, write = os.pipe()

  def interrupt_then_release():  # releases the main thread once the message is out (or after 10 s)
    os.kill(os.getpid(), signal.SIGINT)
    deadline = time.monotonic() + 10
    while not said and time.monotonic() < deadline:
      time.sleep(0.01)
    os.write(write, b'x')

  with interruption.StopOnInterrupt(said.append) as stop:
    stop.running = 'the current 64 steps'
    assert not stop.requested
    threading.Thread(target=interrupt_then_release).start()
    os.read(read, 1)  # blocked, as in a compiled loop of steps
    assert stop.requested
    assert said == ['Ctrl-C: stopping after the current 64 steps, saving a checkpoint; Ctrl-C again to abort.']
  assert signal.getsignal(signal.SIGINT) is handler  # restored
  os.close(read)
  os.close(write)


def test_it_does_nothing_when_disabled():
  handler = signal.getsignal(signal.SIGINT)
  with interruption.StopOnInterrupt(enabled=False) as stop:
    assert signal.getsignal(signal.SIGINT) is handler
  assert not stop.requested


# A program that lets a Ctrl-C outside the training steps end it, then blocks its main thread in a call that does not
# return to Python, as a compilation does. Its saver writes a checkpoint until the file argv[1] exists.
_BLOCKED_PROGRAM = '''
import os, sys
from jint8.training import interruption

class Saver:
  def saving(self):
    return not os.path.exists(sys.argv[1])

saver = Saver()
interruption.wait_on_exit(saver)
interruption.exit_at_interrupt()
with interruption.StopOnInterrupt():  # training steps, which put the exit at a Ctrl-C back when they end
  pass
print('blocked', flush=True)
os.read(os.pipe()[0], 1)
'''


def _start_blocked_program(saved) -> subprocess.Popen:
  process = subprocess.Popen([sys.executable, '-c', _BLOCKED_PROGRAM, str(saved)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
  line = process.stdout.readline()
  if line != 'blocked\n':
    process.kill()
    raise AssertionError(line + process.communicate()[1][-3000:])
  return process


def test_outside_the_training_steps_a_ctrl_c_ends_the_process_at_once_in_one_line(tmp_path):
  saved = tmp_path / 'saved'
  saved.touch()  # no checkpoint being written
  process = _start_blocked_program(saved)
  process.send_signal(signal.SIGINT)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == interruption.EXIT_STATUS == 130
  assert stderr == interruption.OUTSIDE_STEPS + '\n' and stdout == ''


@pytest.mark.parametrize('then', ['the checkpoint is saved', 'Ctrl-C again'])
def test_outside_the_training_steps_a_ctrl_c_waits_for_the_checkpoint_being_written(tmp_path, then):
  saved = tmp_path / 'saved'
  process = _start_blocked_program(saved)
  process.send_signal(signal.SIGINT)
  assert process.stderr.readline() == ('Interrupted (Ctrl-C) outside the training steps; stopping once the checkpoint '
                                       'being written is saved, Ctrl-C again to abort.\n')
  assert process.poll() is None  # it cannot end before the checkpoint is saved
  if then == 'the checkpoint is saved':
    saved.touch()
  else:
    process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 130
  assert stderr == ('' if then == 'the checkpoint is saved' else interruption.ABORT + '\n')
