"""A training progress bar (tqdm): steps done, step rate, ETA, the latest metrics; process 0 only."""

from __future__ import annotations

import sys
import time
from typing import Mapping

import tqdm


class Progress:
  """Progress over ``total`` steps, starting at ``initial`` (a resumed run).

  On a terminal the bar redraws in place; in a log file it writes a line at most every 30 s.
  """

  def __init__(self, total: int, *, initial: int = 0, desc: str = 'train', enabled: bool = True):
    self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit='step', dynamic_ncols=True,
                          disable=not enabled, mininterval=0.5 if sys.stderr.isatty() else 30.0,
                          smoothing=0.1)

  def update(self, steps: int = 1, *, timed: bool = True) -> None:
    """Counts ``steps`` finished steps. ``timed=False`` leaves them and the time since the last update out of
    the rate, the ETA and the elapsed time (steps whose time includes compiling the step function)."""
    bar = self._bar
    if timed or bar.disable:
      bar.update(steps)
      return
    now = time.time()  # tqdm's clock
    bar.start_t += now - bar.last_print_t
    bar.initial += steps  # tqdm's average rate counts the steps since ``initial``
    bar.n += steps
    bar.last_print_n, bar.last_print_t = bar.n, now  # and its smoothed rate the steps since the last print
    bar.refresh()

  def show(self, metrics: Mapping[str, float]) -> None:
    """Shows ``metrics`` after the bar (e.g. the latest loss and accuracy)."""
    self._bar.set_postfix({k: f'{v:.4g}' for k, v in metrics.items()}, refresh=False)

  def write(self, line: str) -> None:
    """Prints ``line`` above the bar without breaking it."""
    if not self._bar.disable:
      self._bar.write(line)

  def close(self) -> None:
    self._bar.close()
