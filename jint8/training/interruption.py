"""Ctrl-C: during training the first stops the run after the steps running now, with a checkpoint, and a second aborts
(``StopOnInterrupt``); at any other moment of a program's run it ends the process at once, in one line, once the
checkpoints being written are saved (``exit_at_interrupt``).

JAX runs a compiled loop of steps (or a compilation) to its end, and Python runs a signal handler only when its main
thread gets back from such a call, which on a CPU can take minutes. So the signal is watched by a thread instead:
Python writes every signal's number to SIGINT's wakeup file descriptor the moment it arrives, and the thread reading
it acts at once. In training it says what will happen and sets ``StopOnInterrupt.requested``;
``jint8.training.loop.train_loop`` checks it after each compiled loop of steps, saves a checkpoint and raises
``TrainingInterrupted``. A second Ctrl-C, or one outside the training steps, ends the process with ``os._exit``
(``EXIT_STATUS``): the main thread may be busy for minutes, and the interpreter's shutdown would race XLA's compile
threads (a segmentation fault). The checkpoints already written stay valid (orbax commits a step by renaming its
folder when it is complete).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import weakref
from typing import Callable

EXIT_STATUS = 128 + signal.SIGINT  # the status a shell gives a process ended by Ctrl-C
OUTSIDE_STEPS = 'Interrupted (Ctrl-C) outside the training steps; the checkpoints saved so far are kept.'
ABORT = 'Ctrl-C again: aborting now; the checkpoints saved so far are kept.'

# What a Ctrl-C outside the training steps lets finish first: objects whose ``saving()`` says whether a checkpoint
# is being written (``jint8.training.checkpointing.Checkpointer``).
_savers = weakref.WeakSet()


class TrainingInterrupted(Exception):
  """Training stopped at a Ctrl-C, after saving a checkpoint; the message says where and how to resume."""


def _say_on_stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _exit() -> None:
  """Ends the process at once with ``EXIT_STATUS``, what it printed flushed."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # closed or broken
      pass
  os._exit(EXIT_STATUS)  # pylint: disable=protected-access


class _Watcher:
  """Calls ``on_interrupt()`` in a thread of its own at each SIGINT, at once even while the main thread is in a long
  call, until ``close()`` puts the previous handling back."""

  def __init__(self, on_interrupt: Callable[[], None]):
    self._read, self._write = os.pipe()
    os.set_blocking(self._write, False)
    self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)  # first: no signal is lost
    self._previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: None)  # the watcher acts
    self._thread = threading.Thread(target=self._watch, args=(on_interrupt,), name='jint8-interrupt-watcher',
                                    daemon=True)
    self._thread.start()

  def _watch(self, on_interrupt: Callable[[], None]) -> None:
    while data := os.read(self._read, 64):  # a byte per signal; empty once close() closed the other end
      for signum in data:
        if signum == signal.SIGINT:
          on_interrupt()

  def close(self) -> None:
    signal.set_wakeup_fd(self._previous_fd)
    signal.signal(signal.SIGINT, self._previous_handler)
    os.close(self._write)
    self._thread.join()
    os.close(self._read)


class StopOnInterrupt:
  """While active (``with StopOnInterrupt(say) as stop:``), Ctrl-C sets ``stop.requested`` and calls ``say`` with
  what happens next ("stopping after {stop.running}, ..."); a second one exits the process.

  Outside the main thread (where Python takes no signal handler) or with ``enabled=False`` it does nothing.
  """

  def __init__(self, say: Callable[[str], None] | None = None, *, enabled: bool = True):
    self.requested = False
    self.running = 'the current steps'  # what runs now, for the message; the training loop keeps it up to date
    self._say = say or _say_on_stderr
    self._enabled = enabled and threading.current_thread() is threading.main_thread()

  def __enter__(self) -> StopOnInterrupt:
    if self._enabled:
      self._watcher = _Watcher(self._interrupted)
    return self

  def _interrupted(self) -> None:
    if self.requested:
      self._say(ABORT)
      _exit()
    self.requested = True
    self._say(f'Ctrl-C: stopping after {self.running}, saving a checkpoint; Ctrl-C again to abort.')

  def __exit__(self, *exc_info) -> None:
    if self._enabled:
      self._watcher.close()


def wait_on_exit(saver) -> None:
  """Makes a Ctrl-C outside the training steps wait for the checkpoint that ``saver`` is writing (while
  ``saver.saving()``) before the process ends, so that no save is cut off."""
  _savers.add(saver)


def exit_at_interrupt(say: Callable[[str], None] | None = None) -> None:
  """Makes a Ctrl-C outside ``StopOnInterrupt`` end the process for the rest of its run: at once with ``OUTSIDE_STEPS``
  (``say``, stderr by default) and ``EXIT_STATUS``, or, while a checkpoint is being written (``wait_on_exit``), once it
  is saved; then a second Ctrl-C aborts. Call it from the main thread, as a program (``train.py``) starts."""
  say = say or _say_on_stderr
  interrupted = threading.Event()

  def wait_then_exit():
    while any(saver.saving() for saver in list(_savers)):
      time.sleep(0.05)
    _exit()

  def on_interrupt():
    if interrupted.is_set():
      say(ABORT)
      _exit()
    interrupted.set()
    if not any(saver.saving() for saver in list(_savers)):
      say(OUTSIDE_STEPS)
      _exit()
    say('Interrupted (Ctrl-C) outside the training steps; stopping once the checkpoint being written is saved, '
        'Ctrl-C again to abort.')
    threading.Thread(target=wait_then_exit, name='jint8-exit-after-saving', daemon=True).start()

  _Watcher(on_interrupt)  # never closed: StopOnInterrupt puts it back when it ends
