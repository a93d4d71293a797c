"""Optax transformations for int8 training: DCLR and the DSGC state update.

They act on the tree ``{"params": <Flax params>, "int8_state": <Flax int8_state>}``. In the gradient of that tree
the ``int8_state`` part holds what the int8 ops' backward passes returned (summed over the applications of each
layer), not gradients: ``dsgc_state_update`` turns it into the update that makes ``optax.apply_updates`` write
the new state, and ``deviation_counteractive_lr`` reads the deviations from it. ``int8_optimizer`` chains both
after any optax optimizer, which sees only ``params``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from jint8 import quant
from jint8.nn import STATE_COLLECTION, Int8Config, Int8Model

# The scalars each int8 op module keeps in STATE_COLLECTION (docs/design.md, "Quantization state"). A tuple, not a
# set: code traced over it must emit the same program in every process (a set's order changes with Python's hash
# seed, and with it the program's fingerprint: JAX's persistent compilation cache would never hit).
_STATE_FIELDS = ('grad_clip', 'grad_deviation', 'input_clip', 'nonfinite', 'search', 'step', 'uses')
# Fields whose per-application cotangents are averaged over the applications of a layer in a step.
_MEAN_FIELDS = ('grad_clip', 'grad_deviation', 'input_clip')

_Path = tuple[str, ...]


def split_state(variables: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits Flax variables into the tree the int8 transformations update and the other collections.

  Returns ``({"params": ..., "int8_state": ...}, rest)``; ``int8_state`` is ``{}`` for a float model, ``rest``
  holds e.g. ``batch_stats``.
  """
  if 'params' not in variables:
    raise ValueError(f'variables hold no "params" collection, only {sorted(variables)}')
  tree = {'params': variables['params'], STATE_COLLECTION: variables.get(STATE_COLLECTION, {})}
  rest = {k: v for k, v in variables.items() if k not in tree}
  return tree, rest


def _check_tree(tree: Any, what: str) -> None:
  if not isinstance(tree, Mapping) or set(tree) != {'params', STATE_COLLECTION}:
    got = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
    raise ValueError(f'{what} must be a dict {{"params": ..., "{STATE_COLLECTION}": ...}} '
                     f'(see jint8.optim.split_state), got {got}')


def _key_name(key: Any) -> str:
  return str(key.key) if isinstance(key, jax.tree_util.DictKey) else str(key)


def _leaf_paths(tree: Any) -> tuple[list[_Path], list[Any], Any]:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [tuple(_key_name(k) for k in key_path) for key_path, _ in leaves]
  return paths, [leaf for _, leaf in leaves], treedef


def _op_states(state: Any, what: str) -> tuple[dict[_Path, dict[str, Any]], list[_Path], Any]:
  """Groups the leaves of an int8_state tree by op module.

  Returns ``({op path: {field: leaf}}, leaf paths, treedef)``; the last two rebuild a tree of the same
  structure (``_rebuild``).
  """
  paths, leaves, treedef = _leaf_paths(state)
  ops = {}
  for path, leaf in zip(paths, leaves):
    if len(path) < 2:
      raise ValueError(f'{what}: leaf {"/".join(path) or "<root>"} is not inside an op module dict')
    ops.setdefault(path[:-1], {})[path[-1]] = leaf
  for op_path, fields in ops.items():
    if set(fields) != set(_STATE_FIELDS):
      raise ValueError(f'{what}: {"/".join(op_path)} holds {sorted(fields)}; an int8 op module holds '
                       f'{list(_STATE_FIELDS)}')
  return ops, paths, treedef


def _rebuild(ops: dict[_Path, dict[str, Any]], paths: list[_Path], treedef: Any) -> Any:
  return treedef.unflatten([ops[path[:-1]][path[-1]] for path in paths])


def _all_finite(arrays: list[jax.Array]) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(a)) for a in arrays], dtype=bool))


def _layer_nonfinite(cot: dict[str, jax.Array]) -> jax.Array:
  """True when a layer's backward pass reported a non-finite gradient or returned a non-finite value."""
  return (cot['nonfinite'] != 0) | ~_all_finite([cot[f] for f in _STATE_FIELDS])


def _new_state(cot: dict[str, jax.Array], old: dict[str, jax.Array], period: int) -> dict[str, jax.Array]:
  """One op module's state after a step, from its summed cotangents ``cot`` and its current state ``old``."""
  uses = cot['uses']
  nonfinite = _layer_nonfinite(cot)
  write = (uses > 0) & ~nonfinite
  new = {f: jnp.where(write, cot[f] / jnp.maximum(uses, 1), old[f]) for f in _MEAN_FIELDS}
  new['nonfinite'] = nonfinite
  new['uses'] = uses
  new['step'] = old['step'] + 1
  new['search'] = jnp.mod(new['step'], period) == 0
  return {f: jnp.asarray(v, old[f].dtype) for f, v in new.items()}


def dsgc_state_update(period: int) -> optax.GradientTransformation:
  """Writes the quantization state returned by the int8 backward passes.

  Replaces the ``int8_state`` part of the updates by ``new - old`` so that ``optax.apply_updates`` stores, per
  op module: the mean over its applications of the clip values and deviation (kept when the layer was not
  applied or its gradient was non-finite), ``nonfinite``, ``uses``, ``step + 1`` and
  ``search = (step + 1) % period == 0``. Values are written up to float32 rounding of ``old + (new - old)``.
  The ``params`` part passes through. ``update`` needs the current tree as ``params``.

  Args:
    period: steps between two DSGC clip searches; the search runs on the first step and every ``period``.

  Returns:
    An ``optax.GradientTransformation``.
  """
  if isinstance(period, bool) or not isinstance(period, numbers.Integral) or period < 1:
    raise ValueError(f'period must be a positive int, got {period!r}')
  period = int(period)

  def init_fn(tree):
    _check_tree(tree, 'dsgc_state_update params')
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('dsgc_state_update needs the current {"params", "int8_state"} tree: '
                       'call update(updates, opt_state, tree)')
    _check_tree(updates, 'dsgc_state_update updates')
    _check_tree(params, 'dsgc_state_update params')
    cots, paths, treedef = _op_states(updates[STATE_COLLECTION], f'{STATE_COLLECTION} updates')
    olds, old_paths, _ = _op_states(params[STATE_COLLECTION], STATE_COLLECTION)
    if paths != old_paths:
      raise ValueError(f'{STATE_COLLECTION} updates and state differ in structure: '
                       f'{sorted(cots)} vs {sorted(olds)}')
    deltas = {}
    for op_path, cot in cots.items():
      old = olds[op_path]
      new = _new_state(cot, old, period)
      deltas[op_path] = {f: new[f] - old[f] for f in _STATE_FIELDS}
    return {**updates, STATE_COLLECTION: _rebuild(deltas, paths, treedef)}, state

  return optax.GradientTransformation(init_fn, update_fn)


def _kernel_paths(tree: Any, what: str) -> dict[_Path, _Path]:
  """Maps each op module's path in int8_state to the path of its layer's ``kernel`` in params."""
  ops, _, _ = _op_states(tree[STATE_COLLECTION], f'{what} {STATE_COLLECTION}')
  param_paths = set(_leaf_paths(tree['params'])[0])
  kernels = {}
  for op_path in ops:
    kernel = op_path[:-1] + ('kernel',)
    if kernel not in param_paths:
      raise ValueError(f'deviation_counteractive_lr: int8 op {"/".join(op_path)} has no sibling param '
                       f'{"/".join(kernel)} to scale')
    if kernel in kernels.values():
      raise ValueError(f'deviation_counteractive_lr: two int8 ops share the param {"/".join(kernel)}')
    kernels[op_path] = kernel
  return kernels


def deviation_counteractive_lr(alpha: float = 20.0, beta: float = 0.1) -> optax.GradientTransformation:
  """Deviation Counteractive Learning rate scaling (DCLR).

  Multiplies the update of each int8 layer's ``kernel`` by ``max(exp(-alpha * d), beta)``, where ``d`` is the
  mean cosine deviation of the layer's quantized gradient in this step (read from the ``int8_state``
  cotangents; a layer not applied keeps its update). Every other update passes through. Chain it before
  ``dsgc_state_update``, which replaces those cotangents.

  Args:
    alpha: decay of the scale with the deviation, >= 0.
    beta: the smallest scale, in (0, 1].

  Returns:
    An ``optax.GradientTransformation``.
  """
  if not (math.isfinite(alpha) and alpha >= 0):
    raise ValueError(f'alpha must be finite and >= 0, got {alpha!r}')
  if not 0 < beta <= 1:
    raise ValueError(f'beta must be in (0, 1], got {beta!r}')

  def init_fn(tree):
    _check_tree(tree, 'deviation_counteractive_lr params')
    _kernel_paths(tree, 'params')
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    _check_tree(updates, 'deviation_counteractive_lr updates')
    kernels = _kernel_paths(updates, 'updates')
    cots, _, _ = _op_states(updates[STATE_COLLECTION], f'{STATE_COLLECTION} updates')
    scales = {}
    for op_path, kernel in kernels.items():
      cot = cots[op_path]
      deviation = cot['grad_deviation'] / jnp.maximum(cot['uses'], 1)  # 0 when the layer was not applied
      scales[kernel] = jnp.maximum(jnp.exp(-alpha * deviation), beta)

    def scale(key_path, u):
      s = scales.get(tuple(_key_name(k) for k in key_path))
      return u if s is None else (u * s).astype(u.dtype)

    param_updates = jax.tree_util.tree_map_with_path(scale, updates['params'])
    return {**updates, 'params': param_updates}, state

  return optax.GradientTransformation(init_fn, update_fn)


def _params_only(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs ``inner`` on the ``params`` part of the tree; the ``int8_state`` part passes through."""

  def init_fn(tree):
    _check_tree(tree, 'int8_optimizer params')
    return inner.init(tree['params'])

  def update_fn(updates, state, params=None):
    _check_tree(updates, 'int8_optimizer updates')
    param_updates, state = inner.update(updates['params'], state, None if params is None else params['params'])
    return {**updates, 'params': param_updates}, state

  return optax.GradientTransformation(init_fn, update_fn)


def _skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Zeroes the ``params`` updates of ``inner`` and keeps its state on a step with a non-finite gradient.

  A step is non-finite when any gradient or int8_state cotangent is, or any int8 layer reported a non-finite
  gradient. The ``int8_state`` part passes through, so the state still records ``nonfinite``.
  """

  def update_fn(updates, state, params=None):
    _check_tree(updates, 'int8_optimizer updates')
    cots, _, _ = _op_states(updates[STATE_COLLECTION], f'{STATE_COLLECTION} updates')
    finite = _all_finite(jax.tree_util.tree_leaves(updates['params']))
    for cot in cots.values():
      finite &= ~_layer_nonfinite(cot)
    new_updates, new_state = inner.update(updates, state, params)
    param_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates['params'])
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return {**new_updates, 'params': param_updates}, new_state

  return optax.GradientTransformation(inner.init, update_fn)


def int8_optimizer(inner: optax.GradientTransformation, *, period: int = 100, alpha: float = 20.0,
                   beta: float = 0.1, dclr: bool = True, skip_nonfinite: bool = True
                   ) -> optax.GradientTransformation:
  """An optax optimizer for int8 training: ``inner`` on the params, DCLR, then the DSGC state update.

  ``inner`` (any optax optimizer: momentum, weight decay, schedules, masks written for the Flax params) sees
  only ``tree["params"]``, never the quantization state. Use it on ``{"params": ..., "int8_state": ...}``
  (``split_state``); with an empty ``int8_state`` (a float model) it is ``inner`` (plus ``skip_nonfinite``).

  Args:
    inner: the optimizer of the params.
    period: steps between two DSGC clip searches (``dsgc_state_update``).
    alpha: DCLR decay (``deviation_counteractive_lr``).
    beta: DCLR smallest scale.
    dclr: scale the int8 layers' kernel updates by DCLR.
    skip_nonfinite: on a step with a non-finite gradient, leave the params and ``inner``'s state unchanged
      (like ``optax.apply_if_finite``); the int8 state still records ``nonfinite``.

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs the current tree as ``params``.
  """
  params_step = _params_only(inner)
  if dclr:
    params_step = optax.chain(params_step, deviation_counteractive_lr(alpha, beta))
  if skip_nonfinite:
    params_step = _skip_nonfinite(params_step)
  return optax.chain(params_step, dsgc_state_update(period))


def needs_search(int8_state: Any, config: Int8Config) -> jax.Array:
  """True when the next step must run the DSGC search code: a clip that ``config`` searches (``grad_clip`` with
  DSGC, ``input_clip`` when stored) needs a search in some layer (``quant.needs_search``)."""
  ops, _, _ = _op_states(int8_state, STATE_COLLECTION)
  searched = (['grad_clip'] if config.dsgc else []) + (['input_clip'] if config.input_clip == 'stored' else [])
  flags = [quant.needs_search(fields['search'], fields[clip]) for fields in ops.values() for clip in searched]
  return jnp.any(jnp.stack(flags)) if flags else jnp.asarray(False)


def search_cond(step_fn: Callable[..., Any], model: nn.Module, int8_state: Any, *args) -> Any:
  """``step_fn(model, *args)``, for an ``Int8Model`` traced twice and chosen by ``lax.cond``.

  On the steps ``needs_search`` finds, ``model`` runs as it is; on the others (``period - 1`` of every
  ``period``) a copy with ``Int8Config(searches=False)``, whose layers launch no search kernels. Both give the
  same values; the cost is compiling the step twice. Put the whole step (forward, backward and optimizer
  update) in ``step_fn``: differentiating through the ``lax.cond`` would keep both branches' residuals.
  """
  if not isinstance(model, Int8Model) or not jax.tree_util.tree_leaves(int8_state):
    return step_fn(model, *args)
  steady = model.clone(config=dataclasses.replace(model.config, searches=False))
  return jax.lax.cond(needs_search(int8_state, model.config), lambda: step_fn(model, *args),
                      lambda: step_fn(steady, *args))
