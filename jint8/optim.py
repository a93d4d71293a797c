"""Optax transformations for int8 training: Deviation Counteractive LR scaling (DCLR) and ``int8_optimizer``.

They act on the params alone, like any optax optimizer. The step's quantization state, which the train step
writes by overwriting (``jint8.state.update``), reaches DCLR as the extra argument ``int8_state`` of ``update``
(optax's extra-args mechanism, which ``optax.chain`` forwards), so any optax transformation can be chained
before or after ``int8_optimizer`` and never sees the state::

  int8_state = jint8.state.update(int8_state, state_cotangents)
  updates, opt_state = tx.update(grads, opt_state, params, int8_state=int8_state)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jint8 import state as quant_state


def _kernel_scales(params: Any, int8_state: Any, alpha: float, beta: float) -> dict[tuple, jax.Array]:
  """DCLR's scale for the ``kernel`` of each int8 layer, the sibling param of its op module: the op at
  ``(..., "Conv_0", "Int8ConvGeneralDilated_0")`` (Linen; ``(..., "conv", "conv_general_dilated")`` in NNX)
  scales ``params[..., "Conv_0", "kernel"]``. Any pytree of mappings: dicts, FrozenDicts, ``nnx.State``."""
  param_paths = set(quant_state.leaves_by_path(params))
  scales = {}
  for op_path, layer in quant_state.leaves_by_path(int8_state, is_leaf=quant_state.is_layer).items():
    op_name, kernel = quant_state.path_name(op_path), op_path[:-1] + ('kernel',)
    if not quant_state.is_layer(layer):
      raise ValueError(f'deviation_counteractive_lr: int8_state/{op_name} is not an int8 layer state')
    if kernel not in param_paths:
      raise ValueError(f'deviation_counteractive_lr: int8 op {op_name} has no sibling param '
                       f'{quant_state.path_name(kernel)} to scale')
    if kernel in scales:
      raise ValueError(f'deviation_counteractive_lr: two int8 ops share the param {quant_state.path_name(kernel)}')
    # A layer not applied in the step (uses 0) keeps its update.
    deviation = jnp.where(layer['uses'] > 0, layer['grad_deviation'], 0.0)
    scales[kernel] = jnp.maximum(jnp.exp(-alpha * deviation), beta)
  return scales


def deviation_counteractive_lr(alpha: float = 20.0, beta: float = 0.1) -> optax.GradientTransformationExtraArgs:
  """Deviation Counteractive Learning rate scaling (DCLR).

  Multiplies the update of each int8 layer's ``kernel`` by ``max(exp(-alpha * d), beta)``, where ``d`` is the
  cosine deviation of the layer's quantized gradient in this step, read from the extra argument ``int8_state``
  of ``update`` (the state after ``jint8.state.update``). Every other update passes through.

  Args:
    alpha: decay of the scale with the deviation, >= 0.
    beta: the smallest scale, in (0, 1].

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  if not (math.isfinite(alpha) and alpha >= 0):
    raise ValueError(f'alpha must be finite and >= 0, got {alpha!r}')
  if not 0 < beta <= 1:
    raise ValueError(f'beta must be in (0, 1], got {beta!r}')

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, int8_state=None, **extra_args):
    del params, extra_args
    if int8_state is None:
      raise ValueError('deviation_counteractive_lr needs the step\'s quantization state: call '
                       'tx.update(grads, opt_state, params, int8_state=new_int8_state)')
    scales = _kernel_scales(updates, int8_state, alpha, beta)

    def scale(key_path, u):
      path = quant_state.path_keys(key_path)
      return (u * scales[path]).astype(u.dtype) if path in scales else u

    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def skip_nonfinite_steps(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``inner``, but a step with a non-finite gradient leaves the params and ``inner``'s state unchanged.

  With the step's quantization state (the extra argument ``int8_state``) the decision is its layers' ``nonfinite``
  flags, one tiny reduction: an int8 layer checks the gradient that reaches it, and returns NaN gradients for its
  input and kernel when it is not finite, so every gradient upstream is NaN too. Without int8 layers every
  gradient is checked (one reduction over all of them). A ``jnp.where`` selects, instead of branching like
  ``optax.apply_if_finite``: a ``lax.cond`` makes the host wait for the step's gradients before it can launch the
  update (bench/RESULTS.md measured what that costs).
  """
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    int8_state = extra_args.get('int8_state')
    if int8_state is not None and jax.tree.leaves(int8_state):
      finite = ~quant_state.any_nonfinite(int8_state)
    else:  # one reduction over all leaves (XLA fuses the concatenation into it), not one kernel per parameter
      leaves = jax.tree.leaves(updates)
      finite = jnp.all(jnp.isfinite(jnp.concatenate([jnp.ravel(u) for u in leaves]))) if leaves else True
    new_updates, new_state = inner.update(updates, state, params, **extra_args)
    keep = lambda new, old: jnp.where(finite, new, old)
    return (jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates),
            jax.tree.map(keep, new_state, state))

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def int8_optimizer(inner: optax.GradientTransformation, *, alpha: float = 20.0, beta: float = 0.1,
                   dclr: bool = True, skip_nonfinite: bool = True) -> optax.GradientTransformationExtraArgs:
  """An optax optimizer for int8 training: ``inner``, then DCLR, optionally skipping non-finite steps.

  Use it on the params; ``update`` takes the step's new quantization state as ``int8_state=`` (see the module
  docstring).

  Args:
    inner: the optimizer of the params (any optax optimizer: momentum, weight decay, schedules, masks).
    alpha: DCLR decay (``deviation_counteractive_lr``).
    beta: DCLR smallest scale.
    dclr: scale the int8 layers' kernel updates by DCLR.
    skip_nonfinite: on a step with a non-finite gradient (an int8 layer that saw one flags it and returns NaN
      gradients), leave the params and ``inner``'s state unchanged (``skip_nonfinite_steps``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  tx = optax.chain(inner, deviation_counteractive_lr(alpha, beta)) if dclr else optax.with_extra_args_support(inner)
  return skip_nonfinite_steps(tx) if skip_nonfinite else tx
