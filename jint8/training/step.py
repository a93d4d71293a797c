"""The parts of a task's train step that every task shares: one optimizer step on a loss (``gradient_step``),
the int8 layers' statistics in its metrics (``with_layer_stats``, ``with_weight_levels``), and the step bound to
its model for the compiled loop (``bind_train_step``)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from flax import linen as nn

from jint8 import state as quant_state
from jint8.nn import search_cond
from jint8.training.state import TrainState


def gradient_step(state: TrainState, tx: optax.GradientTransformation,
                  loss_fn: Callable[[Any, Any], tuple[jax.Array, tuple[Any, Any]]]
                  ) -> tuple[TrainState, jax.Array, Any]:
  """One optimizer step on ``loss_fn(params, int8_state) -> (loss, (aux, new batch_stats))``.

  The gradient of the int8 state holds the ops' new quantization values: they overwrite the state
  (``jint8.state.update``), which ``tx`` gets as its extra argument ``int8_state`` (DCLR reads the deviations).
  Returns the new state (step + 1), the loss and ``aux``.
  """
  (loss, (aux, batch_stats)), (g_params, g_state) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.int8_state)
  int8_state = quant_state.update(state.int8_state, g_state) if state.int8_state else state.int8_state
  updates, opt_state = tx.update(g_params, state.opt_state, state.params, int8_state=int8_state)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       batch_stats=batch_stats, int8_state=int8_state, opt_state=opt_state), loss, aux


def with_layer_stats(step_metrics: dict[str, Any], state: TrainState) -> dict[str, Any]:
  """``step_metrics`` with, for an int8 state, ``layers``: each int8 layer's quantization statistics (its
  ``weight_levels`` are added once per ``multi_step`` loop, not here in every step)."""
  if not state.int8_state:
    return step_metrics
  return dict(step_metrics, layers=quant_state.layer_stats(state.int8_state))


def with_weight_levels(record: dict[str, Any], state: TrainState) -> dict[str, Any]:
  """``record`` with each int8 layer's ``weight_levels`` (``jint8.state.weight_levels``) at ``state``."""
  if 'layers' not in record:
    return record
  now = quant_state.layer_stats(state.int8_state, state.params)  # the record's loop-combined stats win
  return dict(record, layers={name: dict(now[name], **stats) for name, stats in record['layers'].items()})


def bind_train_step(train_step: Callable[..., tuple[Any, dict[str, Any]]], config: Any, model: nn.Module,
                    **kwargs) -> Callable[..., tuple[Any, dict[str, Any]]]:
  """``train_step(state, *args, model=model, **kwargs)`` as ``step(state, *args)``, for int8 through
  ``jint8.nn.search_cond``: the model with the DSGC search code every ``config.int8.period`` steps, without it
  on the steps between."""

  def step(state, *args):
    return search_cond(lambda m: train_step(state, *args, model=m, **kwargs), model, state.int8_state, state.step,
                       config.int8.period)

  return step
