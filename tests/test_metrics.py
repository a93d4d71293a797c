"""The metric records of a run (``jint8.training.metrics``)."""

import jax.numpy as jnp
import numpy as np

from jint8.training import metrics


def test_metric_writer_drops_records_after_the_resume_step(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  for step in (1, 2, 3):
    writer.write(step, 'train', {'loss': np.float32(step)}, {'l0': {'grad_clip': jnp.float32(0.5)}})
  writer.close()
  writer = metrics.MetricWriter(tmp_path, resume_step=2)
  writer.write(3, 'train', {'loss': 9.0})
  writer.close()
  assert metrics.read_records(tmp_path) == [
      {'step': 1, 'split': 'train', 'loss': 1.0, 'layers': {'l0': {'grad_clip': 0.5}}},
      {'step': 2, 'split': 'train', 'loss': 2.0, 'layers': {'l0': {'grad_clip': 0.5}}},
      {'step': 3, 'split': 'train', 'loss': 9.0}]
  assert not metrics.plot_layers([{'step': 1, 'split': 'train', 'loss': 1.0}], tmp_path / 'layers.png')
  assert not (tmp_path / 'layers.png').exists()
