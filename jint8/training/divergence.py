"""Stops a run whose training loss climbs back to where it started.

An int8 MobileNetV2 run on CIFAR-10 (docs/results.md, "MobileNetV2, the 100-epoch recipe") trained normally
for 8 epochs, then its loss rose back to chance level and stayed there for the remaining 80 epochs: no gradient
was non-finite, so nothing else stopped it. ``DivergenceCheck`` ends such a run with a ``TrainingDiverged`` error
naming the steps, instead of letting it spend its remaining time at chance.
"""

from __future__ import annotations

import math
from typing import Iterable

DEFAULT_PATIENCE = 5  # the default of config.divergence_patience (configs/default.py)
# Diverged: back at least this fraction of the way from the best logged loss to the first one.
RETURN_FRACTION = 0.9
# Only a run whose loss once fell below this fraction of its first logged value can diverge.
PROGRESS_FRACTION = 0.5


class TrainingDiverged(RuntimeError):
  """The training loss went back to its starting level and stayed there (``DivergenceCheck``)."""


def divergence(history: list[tuple[int, float]], patience: int) -> str | None:
  """Why the run of ``history`` (``(step, training loss)`` per log, in order) has diverged, or ``None``.

  Diverged: the loss once fell below ``PROGRESS_FRACTION`` of its first logged value, and each of the last
  ``patience`` logs (all after the best one) is non-finite or at least ``best + RETURN_FRACTION * (first - best)``.
  ``patience`` 0 never reports.
  """
  if patience < 1 or len(history) <= patience:
    return None
  first = history[0][1]
  best_step, best = min(((s, l) for s, l in history if math.isfinite(l)), key=lambda p: p[1], default=(0, first))
  if not math.isfinite(first) or best >= PROGRESS_FRACTION * first:
    return None
  threshold = best + RETURN_FRACTION * (first - best)
  recent = history[-patience:]
  if recent[0][0] <= best_step or any(l < threshold for _, l in recent):  # NaN compares False: counts as high
    return None
  return (f'training diverged: the training loss was {", ".join(f"{l:.4g}" for _, l in recent)} in the last '
          f'{patience} logs (steps {recent[0][0]}-{recent[-1][0]}), back above {threshold:.4g}: near its first '
          f'logged value {first:.4g}, after falling to {best:.4g} at step {best_step}. The checkpoints saved '
          f'after step {best_step} hold the diverged model. Try a lower learning rate (docs/results.md has what '
          f'diverged and why); --config.divergence_patience=0 turns this check off.')


def first_divergence(history: list[tuple[int, float]], patience: int = DEFAULT_PATIENCE) -> int | None:
  """The step of the first log at which ``divergence`` reports on ``history``, or ``None`` (a finished run)."""
  return next((history[n - 1][0] for n in range(patience + 1, len(history) + 1)
               if divergence(history[:n], patience) is not None), None)


class DivergenceCheck:
  """Raises ``TrainingDiverged`` from ``update`` when ``divergence`` reports on the logged training losses.

  Args:
    patience: logs in a row that must sit at the starting level (0: never raise).
    history: the ``(step, loss)`` logs of the run before a resume, so that a resumed run is judged whole.
  """

  def __init__(self, patience: int, history: Iterable[tuple[int, float]] = ()):
    if patience < 0:
      raise ValueError(f'patience must be >= 0 (0: off), got {patience}')
    self.patience = patience
    self.history = [(int(s), float(l)) for s, l in history]

  def update(self, step: int, loss: float) -> None:
    """Adds one log's training loss; raises ``TrainingDiverged`` when the run has diverged."""
    self.history.append((int(step), float(loss)))
    reason = divergence(self.history, self.patience)
    if reason is not None:
      raise TrainingDiverged(reason)
