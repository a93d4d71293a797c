"""A training progress bar (tqdm): compiling, steps done, step rate, ETA, the latest metrics; process 0 only."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Mapping

import tqdm


class Progress:
  """Progress over ``total`` steps, starting at ``initial`` (a resumed run).

  On a terminal the bar redraws in place; in a log file it writes a line at most every 30 s.
  """

  def __init__(self, total: int, *, initial: int = 0, desc: str = 'train', enabled: bool = True):
    self._desc = desc
    self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit='step', dynamic_ncols=True,
                          disable=not enabled, mininterval=0.5 if sys.stderr.isatty() else 30.0,
                          smoothing=0.1)

  @contextlib.contextmanager
  def compiling(self):
    """Says "compiling" while the block runs; its time stays out of the elapsed time, the rate and the ETA."""
    bar = self._bar
    if bar.disable:
      yield
      return
    bar.set_description_str(f'{self._desc} (compiling)')
    start = time.time()  # tqdm's clock
    try:
      yield
    finally:
      spent = time.time() - start
      bar.start_t += spent
      bar.last_print_t += spent  # tqdm's smoothed rate counts the time since the last print
      bar.set_description_str(self._desc)

  def update(self, steps: int = 1) -> None:
    """Counts ``steps`` finished steps."""
    self._bar.update(steps)

  def show(self, metrics: Mapping[str, float]) -> None:
    """Shows ``metrics`` after the bar (e.g. the latest loss and accuracy)."""
    self._bar.set_postfix({k: f'{v:.4g}' for k, v in metrics.items()}, refresh=False)

  def write(self, line: str) -> None:
    """Prints ``line`` above the bar without breaking it, at once also into a log file."""
    if not self._bar.disable:
      self._bar.write(line, file=sys.stdout)
      sys.stdout.flush()

  def close(self) -> None:
    self._bar.close()
