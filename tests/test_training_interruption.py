"""Ctrl-C during training (``jint8.training.interruption``): the first requests a stop and says so at once, even
while the main thread is blocked in a call that does not return to Python."""

import os
import signal
import threading
import time

from jint8.training import interruption


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
