"""The quantization state of an int8 layer, in one place.

Each int8 op module keeps a ``QuantState`` (float32 arrays): in the Flax collection ``STATE_COLLECTION`` (Linen),
as ``jint8.nnx.Int8State`` variables (NNX). A state tree nests the layers' field dicts by path (plain dicts,
FrozenDicts or an ``nnx.State``; list items have int keys). This module says what each field means, what the
backward pass of one application returns for it (its cotangent), how the applications of a layer in one step
combine, how the train step writes the new state (by overwriting, as flax's fp8 ops do with their
``_overwrite_with_gradient`` collection), when the DSGC search is due, and which fields are logged and how they
summarise over steps.

JAX sums the cotangents of a layer applied k times (a detection head shared across pyramid levels); ``uses``
counts k, so ``update`` divides by it: clips, deviations and activation maxima get mean semantics,
``nonfinite`` any semantics. A layer not applied in a step (``uses == 0``) or whose gradient was not finite
keeps its values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jint8 import quant

STATE_COLLECTION = 'int8_state'
# Default length of the activation max-abs history from which the delayed activation clip is taken.
HISTORY = 16


class QuantState(NamedTuple):
  """A layer's quantization state; each field's cotangent is the value one application reports."""

  grad_clip: jax.Array         # DSGC clip of the incoming gradient; 0: none yet, searched on the next step
  grad_deviation: jax.Array    # cosine deviation of the last quantized gradient from the gradient
  input_clip: jax.Array        # the delayed activation clip: the largest of input_amax (update derives it)
  input_amax: jax.Array        # [history] max|x| of the activations of the last steps, newest first
  input_saturation: jax.Array  # max|x| / clip in the last forward: above 1, values beyond the clip saturated
  nonfinite: jax.Array         # 1 when the last gradient held inf or nan
  uses: jax.Array              # applications of the layer in the last step
  # grad_deviation on the layer's last DSGC search step (0 before the first): what ``search_due`` compares the
  # deviation of later steps with (its ``deviation_jump``); the steps between searches report 0, which keeps it
  search_deviation: jax.Array

  @classmethod
  def initial(cls, history: int = HISTORY) -> 'QuantState':
    """The state before the first step: no clips yet, so the first step searches."""
    zero = jnp.zeros((), jnp.float32)
    return cls(zero, zero, zero, jnp.zeros((history,), jnp.float32), zero, zero, zero, zero)

  @classmethod
  def cotangent(cls, *, grad_clip, grad_deviation, input_clip, input_amax, nonfinite, history: int,
                searched: bool = False) -> 'QuantState':
    """What one application's backward pass returns: the values it used and measured (``uses`` 1).
    ``input_clip`` is the activation clip it used: its cotangent is the saturation, the field's is 0.
    ``searched``: whether the step searched the gradient clip (then ``search_deviation`` is the deviation)."""
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    amax = f32(input_amax)
    return cls(f32(grad_clip), f32(grad_deviation), jnp.zeros((), jnp.float32),
               jnp.zeros((history,), jnp.float32).at[0].set(amax), amax / quant.safe_clip(input_clip),
               f32(nonfinite), jnp.ones((), jnp.float32),
               f32(grad_deviation) if searched else jnp.zeros((), jnp.float32))

  def delayed_input_clip(self) -> jax.Array:
    """The activation clip between searches: the largest max|x| of the last steps (``input_clip``)."""
    return quant.safe_clip(self.input_clip)


FIELDS = QuantState._fields


def is_layer(node: Any) -> bool:
  """True for the dict of one op module's state variables inside a state tree."""
  return isinstance(node, Mapping) and set(node) == set(FIELDS)


def _plain_key(entry: Any) -> Any:
  for attribute in ('key', 'idx', 'name'):  # jax.tree_util's DictKey, SequenceKey, GetAttrKey
    if hasattr(entry, attribute):
      return getattr(entry, attribute)
  return entry


def path_keys(key_path: tuple) -> tuple:
  """The plain keys (dict keys, list indices, attribute names) of a ``jax.tree_util`` key path."""
  return tuple(_plain_key(entry) for entry in key_path)


def path_name(path: tuple) -> str:
  """A path of keys as the layer names of logs and errors: ``"stage1/0/conv1"``."""
  return '/'.join(str(k) for k in path)


def leaves_by_path(tree: Any, is_leaf=None) -> dict[tuple, Any]:
  """The leaves of any pytree of mappings (dicts, FrozenDicts, ``nnx.State``) keyed by their paths of keys."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {path_keys(path): leaf for path, leaf in leaves}


def _layers(tree: Any) -> tuple[list[dict], Any]:
  """The layer dicts of a state tree, in flattening order, and its treedef."""
  layers, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_layer)
  return [layer for layer in layers if is_layer(layer)], treedef


def _field(layers: list[dict], name: str) -> jax.Array:
  """A field of every layer, stacked along a new leading axis (float32)."""
  return jnp.stack([jnp.asarray(layer[name], jnp.float32) for layer in layers])


def _stacked(layers: list[dict]) -> QuantState | None:
  """The layers' fields stacked along a new leading axis; ``None`` without layers, or when the layers' histories
  differ in length."""
  if not layers or len({jnp.shape(layer['input_amax']) for layer in layers}) > 1:
    return None
  return QuantState(*(_field(layers, f) for f in FIELDS))


def _check(tree: Any, what: str) -> None:
  for path in leaves_by_path(tree):
    if path[-1] not in FIELDS:
      raise ValueError(f'{what}: {path_name(path)} is not a field of an int8 layer state {list(FIELDS)}')


def update_layers(old: QuantState, cot: QuantState) -> QuantState:
  """Layers' states after a step, from the sums ``cot`` of their applications' cotangents: one layer's, or the
  fields of many stacked along a leading axis (``update`` stacks a model's layers, so that the update is a few
  vector operations instead of a few kernels per layer)."""
  uses = cot.uses
  finite = (jnp.isfinite(cot.grad_clip) & jnp.isfinite(cot.grad_deviation) & jnp.isfinite(cot.input_saturation)
            & jnp.all(jnp.isfinite(cot.input_amax), axis=-1))
  nonfinite = (cot.nonfinite > 0) | ~finite
  write = (uses > 0) & ~nonfinite
  n = jnp.maximum(uses, 1.0)
  mean = lambda new, before: jnp.where(write, new / n, before)
  history = jnp.concatenate([cot.input_amax[..., :1] / n[..., None], old.input_amax[..., :-1]], axis=-1)
  history = jnp.where(write[..., None], history, old.input_amax)
  return QuantState(grad_clip=mean(cot.grad_clip, old.grad_clip),
                    grad_deviation=mean(cot.grad_deviation, old.grad_deviation),
                    input_clip=jnp.max(history, axis=-1), input_amax=history,
                    input_saturation=mean(cot.input_saturation, old.input_saturation),
                    nonfinite=nonfinite.astype(jnp.float32), uses=uses,
                    search_deviation=jnp.where(write & (cot.search_deviation > 0), cot.search_deviation / n,
                                               old.search_deviation))


def update(int8_state: Any, cotangents: Any) -> Any:
  """The state tree after a step: each layer overwritten from its summed cotangents (``update_layers``, on all
  layers at once).

  ``cotangents`` is the gradient of the loss with respect to ``int8_state`` (what the int8 backward passes
  returned), of the same structure.
  """
  _check(int8_state, STATE_COLLECTION)
  _check(cotangents, f'{STATE_COLLECTION} cotangents')
  if jax.tree.structure(int8_state) != jax.tree.structure(cotangents):
    raise ValueError(f'{STATE_COLLECTION} and its cotangents differ in structure')
  olds, treedef = _layers(int8_state)
  old, cot = _stacked(olds), _stacked(_layers(cotangents)[0])
  if old is None:  # no layers, or histories of different lengths: layer by layer
    return jax.tree.map(lambda o, c: update_layers(QuantState(**o), QuantState(**c))._asdict(),
                        int8_state, cotangents, is_leaf=is_layer)
  new = update_layers(old, cot)
  return treedef.unflatten([{f: getattr(new, f)[i] for f in FIELDS} for i in range(len(olds))])


def any_nonfinite(int8_state: Any) -> jax.Array:
  """True when a layer's last gradient held inf or nan (its ``nonfinite`` flag): one reduction over the flags."""
  _check(int8_state, STATE_COLLECTION)
  return jnp.any(_field(_layers(int8_state)[0], 'nonfinite') > 0)


def search_due(int8_state: Any, step: jax.Array, period: int, *, dsgc: bool = True,
               delayed_input_clip: bool = True, deviation_jump: float = 0.0) -> jax.Array:
  """True when the next step must run the DSGC search code: every ``period`` steps from step 0, and whenever a
  layer lacks a clip that the search provides (a gradient clip with ``dsgc``, an activation clip with
  ``delayed_input_clip``): before its first step, after a search that saw an all-zero gradient. With
  ``deviation_jump > 1`` (and ``dsgc``) also as soon as a layer's last deviation exceeds ``deviation_jump`` times
  its deviation on its last search step: its gradients changed faster than the period assumed. (The deviation
  of that search step is the new reference, so a deviation that stays high triggers once.)"""
  _check(int8_state, STATE_COLLECTION)
  if deviation_jump and deviation_jump <= 1:
    raise ValueError(f'deviation_jump must be 0 (off) or > 1, got {deviation_jump}')
  due = jnp.asarray(step) % period == 0
  layers, _ = _layers(int8_state)
  if not layers:
    return due
  if dsgc:
    due = due | jnp.any(_field(layers, 'grad_clip') <= 0)
    if deviation_jump:
      reference = _field(layers, 'search_deviation')
      due = due | jnp.any((reference > 0) & (_field(layers, 'grad_deviation') > deviation_jump * reference))
  if delayed_input_clip:
    due = due | jnp.any(_field(layers, 'input_clip') <= 0)
  return due


# ---------------------------------------------------------------------------------------------------------
# Statistics: what is logged per layer, and how a span of steps summarises it.

# Logged per layer, and how the values of consecutive steps combine: the last value, the sum or the maximum.
# (``grad_deviation`` is summed and divided by the steps when summarised: its mean.)
LOGGED = {'grad_clip': 'last', 'grad_deviation': 'sum', 'input_clip': 'last', 'input_saturation': 'max',
          'nonfinite': 'sum'}
# Derived per-step values that summarise the span: the largest deviation, the steps with saturated activations.
DERIVED = {'grad_deviation_max': 'max', 'saturated_steps': 'sum', 'weight_levels': 'last'}


def layer_stats(int8_state: Any, params: Any = None) -> dict[str, dict[str, jax.Array]]:
  """Per layer (keyed by its path), the ``LOGGED`` fields; with ``params``, also the ``weight_levels`` of each
  layer's ``kernel``."""
  stats = {path_name(path[:-1]): {f: node[f] for f in LOGGED}
           for path, node in leaves_by_path(int8_state, is_leaf=is_layer).items()}
  if params is not None:
    kernels = {path_name(path[:-1]): value for path, value in leaves_by_path(params).items() if path[-1] == 'kernel'}
    for name, layer in stats.items():
      if name in kernels:
        layer['weight_levels'] = weight_levels(kernels[name])
  return stats


def step_layer_record(stats: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """One step's layer statistics as a record that ``combine_layer_records`` accumulates."""
  return dict(stats, grad_deviation_max=stats['grad_deviation'],
              saturated_steps=(stats['input_saturation'] > 1).astype(jnp.float32))


def combine_layer_records(earlier: Mapping[str, jax.Array], later: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The record of two consecutive spans of steps, field by field (``LOGGED``, ``DERIVED``)."""
  how = {**LOGGED, **DERIVED}
  combine = {'last': lambda x, y: y, 'sum': lambda x, y: x + y, 'max': jnp.maximum}
  return {k: combine[how[k]](earlier[k], later[k]) for k in later}


def summarize_layer_record(record: Mapping[str, Any], steps: int) -> dict[str, float | int]:
  """A span's record as logged numbers: mean deviation, last clips, largest saturation, counts."""
  out = {'grad_deviation': float(record['grad_deviation']) / steps, 'grad_clip': float(record['grad_clip']),
         'input_clip': float(record['input_clip']), 'input_saturation': float(record['input_saturation']),
         'saturated_steps': int(record['saturated_steps']), 'nonfinite': int(record['nonfinite'])}
  if 'weight_levels' in record:
    out['weight_levels'] = float(record['weight_levels'])
  return out


def weight_levels(kernel: jax.Array) -> jax.Array:
  """The int8 levels that the output channel (last axis) of smallest max-abs keeps when the kernel is quantized
  with one clip per tensor: ``127 * min_c max|w_c| / max|w|``. A few levels mean that channel is mostly rounding
  (``Int8Config.depthwise_channel_clips`` gives depthwise convs a clip per channel)."""
  per_channel = quant.max_abs(kernel, axis=-1)
  return quant.QMAX * jnp.min(per_channel) / quant.safe_clip(jnp.max(per_channel))
