"""Tests of jint8.training.divergence: which logged training-loss histories count as diverged."""

import math

import numpy as np
import pytest

from jint8.training import divergence


def _history(losses, every=100):
  return [(every * (i + 1), float(l)) for i, l in enumerate(losses)]


def _training_curve(rng, logs=200, start=2.3, end=0.02):
  """A falling loss with log-normal noise, like a healthy run's logs."""
  curve = start * (end / start) ** np.linspace(0, 1, logs)
  return curve * np.exp(rng.normal(0, 0.15, logs))


def test_a_healthy_noisy_run_never_reports(rng):
  history = _history(_training_curve(rng))
  for n in range(1, len(history) + 1):
    assert divergence.divergence(history[:n], patience=3) is None


def test_a_collapse_to_the_starting_loss_reports_after_patience_logs(rng):
  falling = _training_curve(rng, logs=10, start=2.2, end=0.6)
  falling[0] = 2.2  # the threshold then lies under 2.1 whatever the noise
  at_chance = rng.uniform(2.25, 2.35, size=8)
  history = _history(np.concatenate([falling, at_chance]))
  reports = [n for n in range(1, len(history) + 1) if divergence.divergence(history[:n], patience=5)]
  assert reports and reports[0] == 15  # the 5th log at chance
  assert divergence.first_divergence(history, patience=5) == history[14][0]
  assert divergence.first_divergence(history[:14], patience=5) is None
  reason = divergence.divergence(history[:15], patience=5)
  assert 'steps 1100-1500' in reason and 'divergence_patience=0' in reason


def test_the_threshold_is_nine_tenths_of_the_way_back():
  first, best = 2.0, 0.5
  threshold = best + divergence.RETURN_FRACTION * (first - best)  # 1.85
  below = _history([first, 1.0, best] + [threshold - 0.01] * 3)
  above = _history([first, 1.0, best] + [threshold + 0.01] * 3)
  assert divergence.divergence(below, patience=3) is None
  assert divergence.divergence(above, patience=3) is not None


def test_non_finite_losses_count_as_back_at_the_start():
  history = _history([2.3, 1.0, 0.5, math.nan, math.inf, math.nan])
  assert divergence.divergence(history, patience=3) is not None
  assert divergence.divergence(history[:-1], patience=3) is None


def test_a_run_that_never_halved_its_loss_does_not_report(rng):
  slow = _history(rng.uniform(1.3, 2.3, size=30))  # never below half of the first log
  assert divergence.divergence(slow, patience=3) is None


def test_patience_zero_never_reports_and_negative_is_an_error():
  history = _history([2.3, 0.5, 2.3, 2.3, 2.3])
  assert divergence.divergence(history, patience=0) is None
  with pytest.raises(ValueError, match='patience must be >= 0'):
    divergence.DivergenceCheck(-1)


def test_check_raises_and_a_resumed_check_judges_the_whole_run(rng):
  before = _history(_training_curve(rng, logs=6, start=2.3, end=0.5))
  check = divergence.DivergenceCheck(2, history=before)  # a resumed run: its first log is the resume's history
  check.update(700, 2.3)
  with pytest.raises(divergence.TrainingDiverged, match='steps 700-800'):
    check.update(800, 2.31)
