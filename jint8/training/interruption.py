"""Ctrl-C during training: the first stops the run after the steps running now, with a checkpoint; a second aborts.

JAX runs a compiled loop of steps to its end, and Python runs a signal handler only when its main thread gets
back from such a call, which on a CPU can take minutes. So the signal is watched by a thread instead: Python
writes every signal's number to SIGINT's wakeup file descriptor the moment it arrives, and the thread reading it
says at once what will happen and sets ``StopOnInterrupt.requested``. ``jint8.training.loop.train_loop`` checks
it after each compiled loop of steps, saves a checkpoint and raises ``TrainingInterrupted``. A second Ctrl-C
ends the process at once (``EXIT_STATUS``); the checkpoints already written stay valid (orbax commits a step by
renaming its folder when it is complete).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

EXIT_STATUS = 128 + signal.SIGINT  # the status a shell gives a process ended by Ctrl-C


class TrainingInterrupted(Exception):
  """Training stopped at a Ctrl-C, after saving a checkpoint; the message says where and how to resume."""


class StopOnInterrupt:
  """While active (``with StopOnInterrupt(say) as stop:``), Ctrl-C sets ``stop.requested`` and calls ``say`` with
  what happens next ("stopping after {stop.running}, ..."); a second one exits the process.

  Outside the main thread (where Python takes no signal handler) or with ``enabled=False`` it does nothing.
  """

  def __init__(self, say: Callable[[str], None] | None = None, *, enabled: bool = True):
    self.requested = False
    self.running = 'the current steps'  # what runs now, for the message; the training loop keeps it up to date
    self._say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    self._enabled = enabled and threading.current_thread() is threading.main_thread()

  def __enter__(self) -> StopOnInterrupt:
    if not self._enabled:
      return self
    self._read, self._write = os.pipe()
    os.set_blocking(self._write, False)
    self._previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: None)  # the watcher acts
    self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
    self._watcher = threading.Thread(target=self._watch, name='jint8-stop-on-interrupt', daemon=True)
    self._watcher.start()
    return self

  def _watch(self) -> None:
    while data := os.read(self._read, 64):  # a byte per signal; empty once __exit__ closed the other end
      for signum in data:
        if signum != signal.SIGINT:
          continue
        if self.requested:
          self._say('Ctrl-C again: aborting now; the checkpoints saved so far are kept.')
          os._exit(EXIT_STATUS)  # pylint: disable=protected-access  (the main thread may be busy for minutes)
        self.requested = True
        self._say(f'Ctrl-C: stopping after {self.running}, saving a checkpoint; Ctrl-C again to abort.')

  def __exit__(self, *exc_info) -> None:
    if not self._enabled:
      return
    signal.set_wakeup_fd(self._previous_fd)
    signal.signal(signal.SIGINT, self._previous_handler)
    os.close(self._write)
    self._watcher.join()
    os.close(self._read)
