"""The progress bar: it says when it compiles, and compiling stays out of the rate, the ETA and the elapsed time."""

import time

from jint8.training import progress


def shown_rate(bar):
  """The step rate the bar shows: tqdm's smoothed rate once it has one, else its average since ``initial``."""
  meter = bar._bar.format_dict  # pylint: disable=protected-access
  return meter['n'], meter['elapsed'], meter['rate'] or (meter['n'] - meter['initial']) / meter['elapsed']


def test_compiling_is_shown_and_stays_out_of_the_rate_and_elapsed_time():
  bar = progress.Progress(100, desc='test')
  with bar.compiling():
    assert bar._bar.desc == 'test (compiling)'  # pylint: disable=protected-access
    time.sleep(1.0)
  assert bar._bar.desc == 'test'  # pylint: disable=protected-access
  time.sleep(0.1)
  bar.update(10)
  n, elapsed, rate = shown_rate(bar)
  # 10 steps in 0.1 s: 100 steps/s; counting the compilation's second would give 10 / 1.1 = 9.
  assert n == 10 and elapsed < 0.6 and rate > 40
  bar.close()


def test_steps_count_all_the_time_but_compiling():
  bar = progress.Progress(100, desc='test')
  time.sleep(0.5)
  bar.update(10)
  n, elapsed, rate = shown_rate(bar)
  assert n == 10 and elapsed >= 0.5 and rate < 25
  bar.close()


def test_a_disabled_bar_counts_nothing_and_fails_nothing():
  bar = progress.Progress(100, enabled=False)
  with bar.compiling():
    bar.update(5)
  bar.close()
