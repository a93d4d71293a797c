"""Flax Linen integration: int8 conv / dot op modules and one-call conversion of an existing model.

The op modules plug into Flax's own layers::

  nn.Conv(64, (3, 3), conv_general_dilated_cls=functools.partial(Int8ConvGeneralDilated, config=cfg))
  nn.Dense(10, dot_general_cls=functools.partial(Int8DotGeneral, config=cfg))

and keep their quantization state in the variable collection ``STATE_COLLECTION``. ``Int8Model`` makes every
``nn.Conv`` / ``nn.Dense`` of an existing model int8 without touching the model's code.

The stochastic rounding of the gradients draws its seeds from the rng stream ``ROUNDING_RNG``, which a train step
must give ``apply`` with a new key every step (``rngs={ROUNDING_RNG: key}``, a traced key: one compiled program
for every seed, as the trainers do); a forward pass alone needs none. ``Int8Model`` draws one key per call and
gives its layers seeds derived from it (``quant.layer_seeds``); an op module used on its own draws its own key.
``search_cond`` runs a train step in the trace it needs: with the DSGC search (every ``period`` steps) or without
it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from jint8 import ops, quant
from jint8 import state as quant_state
from jint8.ops import Int8Config
from jint8.state import STATE_COLLECTION, QuantState

ROUNDING_RNG = 'int8'

__all__ = ['ROUNDING_RNG', 'STATE_COLLECTION', 'Int8Config', 'Int8ConvGeneralDilated', 'Int8DotGeneral', 'Int8Model',
           'Int8Policy', 'record_layer_order', 'search_cond']


class _Int8Op(nn.Module):
  """Owns a layer's ``QuantState`` variables and the seeds of its stochastic rounding: ``layer_seeds`` when given
  (``Int8Model`` gives them), else from the ``ROUNDING_RNG`` stream."""

  config: Int8Config = Int8Config()
  layer_seeds: jax.Array | None = None

  def quant_state(self) -> QuantState:
    initial = QuantState.initial(self.config.history)
    return QuantState(*(self.variable(STATE_COLLECTION, name, lambda v=value: v).value
                        for name, value in zip(QuantState._fields, initial)))

  def rounding_seeds(self) -> jax.Array | None:
    """The seeds of this application's stochastic rounding: ``layer_seeds``, or from the ``ROUNDING_RNG`` stream's
    key (``make_rng`` folds in the layer's path and a count of its applications); ``None`` without either, which
    only a forward pass may do (the backward pass then asks for them)."""
    if self.layer_seeds is not None:
      return self.layer_seeds
    return quant.rounding_seeds(self.make_rng(ROUNDING_RNG)) if self.has_rng(ROUNDING_RNG) else None


class Int8ConvGeneralDilated(_Int8Op):
  """Drop-in for ``lax.conv_general_dilated`` inside ``nn.Conv`` (``conv_general_dilated_cls``)."""

  @nn.compact
  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
               preferred_element_type=None):
    return ops.int8_conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type, state=self.quant_state(),
        seeds=self.rounding_seeds(), config=self.config)


class Int8DotGeneral(_Int8Op):
  """Drop-in for ``lax.dot_general`` inside ``nn.Dense`` (``dot_general_cls``)."""

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    return ops.int8_dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                                state=self.quant_state(), seeds=self.rounding_seeds(), config=self.config)


@dataclasses.dataclass(frozen=True)
class Int8Policy:
  """Which ``nn.Conv`` / ``nn.Dense`` layers ``Int8Model`` makes int8.

  Attributes:
    keep_first_conv_float: the first conv called stays float (as in the paper).
    keep_dense_float: ``nn.Dense`` layers (a CNN's classifier) stay float.
    keep_depthwise_float: depthwise convs (one group per input channel, as in MobileNetV2) stay float: they
      are memory-bound, and the int8 depthwise kernels are slower than bf16's (bench/RESULTS.md).
    float_layers: regular expressions; a layer whose path inside the wrapped model (``"stage1/block0/Conv_1"``)
      matches one stays float.
  """

  keep_first_conv_float: bool = True
  keep_dense_float: bool = True
  keep_depthwise_float: bool = False
  float_layers: tuple[str, ...] = ()

  def __post_init__(self):
    for pattern in self.float_layers:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f'Int8Policy.float_layers: bad regular expression {pattern!r}: {e}') from None

  def names_float(self, path: str) -> bool:
    """Whether a regular expression of ``float_layers`` matches the layer path ``path``."""
    return any(re.search(pattern, path) for pattern in self.float_layers)


def _is_depthwise(conv: nn.Conv, call_args, call_kwargs) -> bool:
  inputs = call_args[0] if call_args else call_kwargs['inputs']
  return 1 < conv.feature_group_count == inputs.shape[-1]


class Int8Model(nn.Module):
  """Runs ``model`` with its ``nn.Conv`` and ``nn.Dense`` layers made int8 (per ``policy``).

  The model's variables nest under ``"model"``; each int8 layer adds its state to ``STATE_COLLECTION``.
  Layers given their own ``conv_general_dilated(_cls)`` / ``dot_general(_cls)`` are left alone. Each call draws
  one key from the ``ROUNDING_RNG`` stream, and the ``i``-th int8 layer application in the call rounds with
  ``quant.layer_seeds(seeds, i)``: the same order in every trace of the model.
  """

  model: nn.Module
  config: Int8Config = Int8Config()
  policy: Int8Policy = Int8Policy()

  def __call__(self, *args, **kwargs):
    first_conv_seen = []
    seeds = quant.rounding_seeds(self.make_rng(ROUNDING_RNG)) if self.has_rng(ROUNDING_RNG) else None
    applications = itertools.count()

    def interceptor(next_fun, call_args, call_kwargs, context):
      module = context.module
      if context.method_name != '__call__':
        return next_fun(*call_args, **call_kwargs)
      if isinstance(module, nn.Conv):
        attribute, op = 'conv_general_dilated_cls', Int8ConvGeneralDilated
        is_first = not first_conv_seen
        first_conv_seen.append(module.path)
        keep = ((self.policy.keep_first_conv_float and is_first) or module.conv_general_dilated is not None
                or (self.policy.keep_depthwise_float and _is_depthwise(module, call_args, call_kwargs)))
      elif isinstance(module, nn.Dense):
        attribute, op = 'dot_general_cls', Int8DotGeneral
        keep = self.policy.keep_dense_float or module.dot_general is not None
      else:
        return next_fun(*call_args, **call_kwargs)
      name = '/'.join(module.path[len(self.path) + 1:])
      if keep or getattr(module, attribute) is not None or self.policy.names_float(name):
        return next_fun(*call_args, **call_kwargs)
      # Flax modules are frozen dataclasses: set the op class for the duration of this call only.
      layer_seeds = None if seeds is None else quant.layer_seeds(seeds, next(applications))
      object.__setattr__(module, attribute, functools.partial(op, config=self.config, layer_seeds=layer_seeds))
      try:
        return next_fun(*call_args, **call_kwargs)
      finally:
        object.__setattr__(module, attribute, None)

    with nn.intercept_methods(interceptor):
      return self.model(*args, **kwargs)


@contextlib.contextmanager
def record_layer_order():
  """Yields a list that collects, while the block traces or runs models, the names of their int8 layers (as
  ``layer_stats`` names them) in the order they are called: the network's depth order, which ``layer_stats``
  loses once the state has passed through ``jit`` (sorted keys: ``Block_10`` before ``Block_2``). A layer applied
  several times keeps its first place."""
  order: list[str] = []

  def record(next_fun, call_args, call_kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, _Int8Op):
      name = '/'.join(context.module.path[:-1])
      if name not in order:
        order.append(name)
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    yield order


def search_cond(step_fn: Callable[..., Any], model: nn.Module, int8_state: Any, step: jax.Array, period: int,
                *args) -> Any:
  """``step_fn(model, *args)``, for an ``Int8Model`` traced twice and chosen by ``lax.cond``.

  On the steps where the search is due (``jint8.state.search_due``: every ``period`` steps, while a layer lacks
  a clip, and after a deviation jump when ``Int8Config.deviation_jump`` asks for it) ``model`` runs with
  ``Int8Config(searches=True)``: the DSGC search of every gradient clip and exact activation clips; on the
  others with ``searches=False``: the stored and delayed clips, no search code, every quantizer fused into its
  producer. The cost is compiling the step twice. Put the whole step (forward,
  backward and the state and optimizer updates) in ``step_fn``: differentiating through the ``lax.cond`` would
  keep both branches' residuals. A float model (no int8 state) runs as it is.
  """
  if not isinstance(model, Int8Model) or not jax.tree_util.tree_leaves(int8_state):
    return step_fn(model, *args)
  config = model.config
  search = model.clone(config=dataclasses.replace(config, searches=True))
  steady = model.clone(config=dataclasses.replace(config, searches=False))
  due = quant_state.search_due(int8_state, step, period, dsgc=config.dsgc,
                               delayed_input_clip=config.input_clip == 'delayed',
                               deviation_jump=config.deviation_jump)
  return jax.lax.cond(due, lambda: step_fn(search, *args), lambda: step_fn(steady, *args))
