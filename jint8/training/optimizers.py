"""Optax optimizers built from a config section: any optax optimizer by name, a learning-rate schedule with
linear warmup, and coupled weight decay.

The section (``config.optimizer``) holds ``name`` (an optax optimizer such as ``"sgd"``, ``"adamw"``), ``kwargs``
(its other arguments), ``learning_rate`` (the peak, for a batch of ``base_batch_size``; scaled linearly with
the batch size, ``base_batch_size = 0`` turns that off), ``schedule`` (``"constant"``, ``"cosine"`` to 0 or
``"piecewise"`` multiplying by ``decay_factor`` at each of ``boundaries_epochs``), ``warmup_epochs`` and
``weight_decay`` (added to the gradient as ``weight_decay * param`` before the optimizer).
"""

from __future__ import annotations

import inspect
from typing import Any

import optax

SCHEDULES = ('constant', 'cosine', 'piecewise')


def learning_rate_schedule(cfg: Any, *, batch_size: int, steps_per_epoch: int,
                           num_steps: int) -> optax.Schedule:
  """The learning rate at each step (``cfg`` is ``config.optimizer``)."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f'config.optimizer.schedule: unknown schedule {cfg.schedule!r}; valid: {SCHEDULES}')
  if cfg.learning_rate <= 0:
    raise ValueError(f'config.optimizer.learning_rate must be positive, got {cfg.learning_rate}')
  if cfg.base_batch_size < 0:
    raise ValueError(f'config.optimizer.base_batch_size must be >= 0, got {cfg.base_batch_size}')
  peak = cfg.learning_rate * (batch_size / cfg.base_batch_size if cfg.base_batch_size else 1.0)
  warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
  if not 0 <= warmup < num_steps:
    raise ValueError(f'config.optimizer.warmup_epochs={cfg.warmup_epochs} gives {warmup} warmup steps; '
                     f'it must be >= 0 and shorter than the run ({num_steps} steps)')
  if cfg.schedule == 'constant':
    main = optax.constant_schedule(peak)
  elif cfg.schedule == 'cosine':
    main = optax.cosine_decay_schedule(peak, num_steps - warmup)
  else:
    main = optax.piecewise_constant_schedule(
        peak, {int(round(e * steps_per_epoch)) - warmup: cfg.decay_factor for e in cfg.boundaries_epochs})
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def create_optimizer(cfg: Any, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """``optax.<cfg.name>(learning_rate, **cfg.kwargs)``, after ``add_decayed_weights(cfg.weight_decay)``."""
  factory = getattr(optax, cfg.name, None)
  if not callable(factory) or 'learning_rate' not in _parameters(factory):
    raise ValueError(f'config.optimizer.name: {cfg.name!r} is not an optax optimizer taking a learning_rate '
                     '(e.g. "sgd", "adam", "adamw", "lamb")')
  kwargs = dict(cfg.kwargs)
  unknown = set(kwargs) - set(_parameters(factory))
  if unknown:
    raise ValueError(f'config.optimizer.kwargs: optax.{cfg.name} takes no argument {sorted(unknown)}; '
                     f'it takes {sorted(set(_parameters(factory)) - {"learning_rate"})}')
  optimizer = factory(learning_rate=learning_rate, **kwargs)
  if cfg.weight_decay < 0:
    raise ValueError(f'config.optimizer.weight_decay must be >= 0, got {cfg.weight_decay}')
  if cfg.weight_decay:
    optimizer = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optimizer)
  return optimizer


def _parameters(fn) -> list[str]:
  return list(inspect.signature(fn).parameters)
