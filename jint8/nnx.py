"""Flax NNX integration: int8 conv / dot op modules, one-call conversion of an existing NNX model, the state update
and the search trace of a train step.

``to_int8(model, images)`` makes the model's ``nnx.Conv`` and ``nnx.Linear`` layers int8 in place, per
``Int8Policy`` (by default the first conv called and the ``nnx.Linear`` layers stay float): each gets an op module
as its ``conv_general_dilated`` / ``dot_general``, which can also be given explicitly::

  nnx.Conv(64, 64, (3, 3), conv_general_dilated=Int8ConvGeneralDilated(config, rngs=rngs), rngs=rngs)

An op module keeps its layer's ``QuantState`` as ``Int8State`` variables: ``nnx.state(model, Int8State)`` selects
the quantization state of every layer, and checkpoints of ``nnx.state(model)`` hold it. A train step
differentiates with respect to ``nnx.Param`` and ``Int8State``; the state's gradient holds the values the layers
report, which ``update_state`` writes by overwriting (``jint8.state.update``, as ``jint8.nn``'s train step does),
and ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` updates the params, taking the new state for DCLR::

  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, (nnx.Param, Int8State)))(model)
  optimizer.update(model, grads, int8_state=update_state(model, grads))

``search_cond`` runs such a step with the DSGC search (every ``period`` steps) or without it. Each op module draws
the seeds of its stochastic rounding from its own fork of the ``ROUNDING_RNG`` stream of an ``nnx.Rngs``, a new key
on every call (as ``nnx.Dropout`` forks its stream).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen, nnx

from jint8 import ops, quant
from jint8 import state as quant_state
from jint8.nn import ROUNDING_RNG, Int8Config, Int8Policy
from jint8.state import STATE_COLLECTION, QuantState

__all__ = ['ROUNDING_RNG', 'Int8Config', 'Int8ConvGeneralDilated', 'Int8DotGeneral', 'Int8Policy', 'Int8State',
           'int8_state', 'search_cond', 'to_int8', 'update_state']


class Int8State(nnx.Variable):
  """A field of an int8 layer's ``QuantState``: written by ``update_state`` (overwriting), never by an optimizer."""


# In Linen (nnx.bridge) the state is the collection that jint8.nn keeps it in.
nnx.register_variable_name(STATE_COLLECTION, Int8State, overwrite=True)


def _rounding_stream(rngs: Any) -> nnx.RngStream:
  if not isinstance(rngs, nnx.Rngs) or ROUNDING_RNG not in rngs:
    got = f'streams {list(rngs)}' if isinstance(rngs, nnx.Rngs) else type(rngs).__name__
    raise ValueError(f'rngs must be an nnx.Rngs with a {ROUNDING_RNG!r} stream (jint8.nn.ROUNDING_RNG) for the seeds '
                     f'of the stochastic rounding, e.g. nnx.Rngs({ROUNDING_RNG}=seed); got {got}')
  return rngs[ROUNDING_RNG]


class _Int8Op(nnx.Module):
  """Owns a layer's ``QuantState`` as ``Int8State`` variables and draws the rounding seeds from its rng stream."""

  def __init__(self, config: Int8Config = Int8Config(), *, rngs: nnx.Rngs | None = None):
    self.config = config
    # Without a stream a forward pass runs; the backward pass asks for the seeds.
    self.rngs = None if rngs is None else _rounding_stream(rngs).fork()
    for name, value in QuantState.initial(config.history)._asdict().items():
      setattr(self, name, Int8State(value))

  def quant_state(self) -> QuantState:
    return QuantState(*(getattr(self, name)[...] for name in QuantState._fields))

  def rounding_seeds(self) -> jax.Array | None:
    """The seeds of this call's stochastic rounding, from a new key of the op's stream (``None`` without one)."""
    return None if self.rngs is None else quant.rounding_seeds(self.rngs())


def _check_out_sharding(out_sharding) -> None:
  if out_sharding is not None:
    raise NotImplementedError('jint8 int8 layers take no out_sharding: shard their inputs instead')


class Int8ConvGeneralDilated(_Int8Op):
  """Drop-in for ``lax.conv_general_dilated`` as an ``nnx.Conv``'s ``conv_general_dilated``."""

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
               preferred_element_type=None, out_sharding=None):
    _check_out_sharding(out_sharding)
    return ops.int8_conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type, state=self.quant_state(),
        seeds=self.rounding_seeds(), config=self.config)


class Int8DotGeneral(_Int8Op):
  """Drop-in for ``lax.dot_general`` as an ``nnx.Linear``'s ``dot_general``."""

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    _check_out_sharding(out_sharding)
    return ops.int8_dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                                state=self.quant_state(), seeds=self.rounding_seeds(), config=self.config)


class _LayerOp(NamedTuple):
  """How a layer type takes its op: the attribute, lax's op (the default) and jint8's int8 op."""
  attribute: str
  lax_op: Callable[..., Any]
  int8_op: type[_Int8Op]


_LAYER_OPS = {nnx.Conv: _LayerOp('conv_general_dilated', jax.lax.conv_general_dilated, Int8ConvGeneralDilated),
              nnx.Linear: _LayerOp('dot_general', jax.lax.dot_general, Int8DotGeneral)}


def _layer_op(layer: nnx.Module) -> _LayerOp | None:
  return next((op for layer_type, op in _LAYER_OPS.items() if isinstance(layer, layer_type)), None)


class _CallRecorder:
  """A conv's op that notes the conv's path in ``order`` when called: ``to_int8`` finds the first conv called."""

  def __init__(self, path: tuple, order: list[tuple], op: Callable[..., Any]):
    self.path, self.order, self.op = path, order, op

  def __call__(self, *args, **kwargs):
    self.order.append(self.path)
    return self.op(*args, **kwargs)


def _first_conv(model: nnx.Module, inputs: tuple) -> tuple | None:
  """The path of the first ``nnx.Conv`` (with a function as its op) that ``model(*inputs)`` calls, traced
  abstractly: nothing runs and ``model`` is left as it was."""
  convs = {path: conv for path, conv in nnx.iter_graph(model)
           if isinstance(conv, nnx.Conv) and not isinstance(conv.conv_general_dilated, nnx.Module)}
  if not convs:
    return None
  if not inputs:
    raise ValueError('to_int8: Int8Policy.keep_first_conv_float needs the model\'s inputs to find the first conv it '
                     'calls: to_int8(model, images) (arrays or jax.ShapeDtypeStruct), or keep_first_conv_float=False')
  order: list[tuple] = []
  ops_before = {path: conv.conv_general_dilated for path, conv in convs.items()}
  try:
    for path, conv in convs.items():
      conv.conv_general_dilated = _CallRecorder(path, order, ops_before[path])
    nnx.eval_shape(lambda m, *xs: m(*xs), model, *inputs)
  finally:
    for path, conv in convs.items():
      conv.conv_general_dilated = ops_before[path]
  return order[0] if order else None


def _makes_int8(path: tuple, layer: nnx.Module, first_conv: tuple | None, policy: Int8Policy) -> bool:
  """Whether ``to_int8`` makes the layer at ``path`` int8; raises for one that jint8 cannot make int8 but should."""
  name = quant_state.path_name(path)
  if isinstance(layer, nnx.ConvTranspose):
    if policy.names_float(name):
      return False
    raise ValueError(f'to_int8: {name} is an nnx.ConvTranspose, which jint8 cannot make int8: keep it float with '
                     f'Int8Policy(float_layers=(...,)) matching its path')
  spec = _layer_op(layer)
  op = getattr(layer, spec.attribute)
  if isinstance(op, _Int8Op):
    raise ValueError(f'to_int8: {name} is int8 already (convert a model once)')
  if op is not spec.lax_op or policy.names_float(name):
    return False
  if isinstance(layer, nnx.Linear):
    return not policy.keep_dense_float
  if path == first_conv or (policy.keep_depthwise_float and 1 < layer.feature_group_count == layer.in_features):
    return False
  dilation = layer.input_dilation
  if dilation is not None and any(d != 1 for d in ((dilation,) if isinstance(dilation, int) else dilation)):
    raise ValueError(f'to_int8: {name} is an nnx.Conv with input_dilation={dilation}, which jint8 cannot make int8: '
                     f'keep it float with Int8Policy(float_layers=(...,)) matching its path')
  return True


def _held_rngs(model: nnx.Module) -> nnx.Rngs | None:
  """The first ``nnx.Rngs`` with a ``ROUNDING_RNG`` stream that ``model`` holds."""
  return next((node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Rngs) and ROUNDING_RNG in node),
              None)


def to_int8(model: nnx.Module, *inputs, config: Int8Config = Int8Config(), policy: Int8Policy = Int8Policy(),
            rngs: nnx.Rngs | None = None) -> nnx.Module:
  """Makes the ``nnx.Conv`` and ``nnx.Linear`` layers of ``model`` int8 in place, as ``policy`` says; returns
  ``model``.

  Layers given an op of their own are left alone. ``nnx.ConvTranspose`` layers and convs with ``input_dilation``,
  which jint8 cannot make int8, must be kept float by ``policy.float_layers`` (an error names them otherwise).

  Args:
    model: an ``nnx.Module``.
    *inputs: arguments of ``model(*inputs)`` (arrays or ``jax.ShapeDtypeStruct``), traced abstractly to find the
      first conv the model calls, which ``policy.keep_first_conv_float`` keeps float (as ``jint8.nn.Int8Model``).
    config: the int8 ops' options.
    policy: which layers stay float; ``float_layers`` match paths such as ``"blocks/0/conv1"``.
    rngs: an ``nnx.Rngs`` with a ``ROUNDING_RNG`` stream, which each int8 layer forks for the seeds of its
      stochastic rounding; by default the first such ``nnx.Rngs`` that ``model`` holds. Without a stream the model
      runs forward passes, and a gradient is an error.
  """
  if not isinstance(model, nnx.Module):
    hint = ' (a Linen module: use jint8.nn.Int8Model)' if isinstance(model, linen.Module) else ''
    raise TypeError(f'to_int8 converts an nnx.Module, got {type(model).__name__}{hint}')
  if rngs is not None:
    _rounding_stream(rngs)  # a clear error before anything changes
  layers = [(path, layer) for path, layer in nnx.iter_graph(model)
            if _layer_op(layer) or isinstance(layer, nnx.ConvTranspose)]
  first_conv = _first_conv(model, inputs) if policy.keep_first_conv_float else None
  chosen = [layer for path, layer in layers if _makes_int8(path, layer, first_conv, policy)]
  rngs = _held_rngs(model) if rngs is None else rngs
  for layer in chosen:
    spec = _layer_op(layer)
    setattr(layer, spec.attribute, nnx.data(spec.int8_op(config, rngs=rngs)))
  return model


def _int8_ops(model: nnx.Module) -> list[_Int8Op]:
  return [node for _, node in nnx.iter_graph(model) if isinstance(node, _Int8Op)]


def int8_state(model: nnx.Module) -> dict[str, Any]:
  """The quantization state of ``model``'s int8 layers as nested dicts of arrays (the trees of ``jint8.state``)."""
  return nnx.to_pure_dict(nnx.state(model, Int8State))


def update_state(model: nnx.Module, grads: nnx.State) -> dict[str, Any]:
  """Writes the new quantization state of ``model``'s int8 layers by overwriting (``jint8.state.update``), from the
  ``Int8State`` part of ``grads`` (what the layers' backward passes returned); returns it as ``int8_state`` does,
  for DCLR (``optimizer.update(model, grads, int8_state=...)``)."""
  state = nnx.state(model, Int8State)
  cotangents = nnx.to_pure_dict(nnx.state(grads, Int8State))
  if jax.tree.leaves(state) and not jax.tree.leaves(cotangents):
    raise ValueError('update_state: grads hold no Int8State: differentiate with respect to the state too, '
                     'nnx.grad(loss_fn, argnums=nnx.DiffState(0, (nnx.Param, jint8.nnx.Int8State)))')
  new = quant_state.update(nnx.to_pure_dict(state), cotangents)
  nnx.replace_by_pure_dict(state, new)
  nnx.update(model, state)
  return new


@contextlib.contextmanager
def _searching(model: nnx.Module, searches: bool) -> Iterator[None]:
  """Sets ``Int8Config.searches`` of every int8 layer for the block (restored after it)."""
  layers = _int8_ops(model)
  configs = [layer.config for layer in layers]
  for layer, config in zip(layers, configs):
    layer.config = dataclasses.replace(config, searches=searches)
  try:
    yield
  finally:
    for layer, config in zip(layers, configs):
      layer.config = config


def search_cond(step_fn: Callable[..., Any], model: nnx.Module, step: jax.Array, period: int, *args) -> Any:
  """``step_fn(model, *args)`` traced twice and chosen by ``nnx.cond``: ``jint8.nn.search_cond`` for NNX.

  On the steps where the search is due (``jint8.state.search_due``: every ``period`` steps, and while a layer lacks
  a clip) the int8 layers run with ``Int8Config(searches=True)``: the DSGC search of every gradient clip and exact
  activation clips; on the others with ``searches=False``: the stored and delayed clips, no search code. Put the
  whole step (forward, backward, ``update_state`` and the optimizer) in ``step_fn``; what it changes in ``model``
  and in the graph nodes among ``args`` (an ``nnx.Optimizer``) is kept. A model without int8 layers runs as it is.
  """
  layers = _int8_ops(model)
  if not layers:
    return step_fn(model, *args)
  due = functools.reduce(jnp.logical_or, [
      quant_state.search_due({name: getattr(layer, name)[...] for name in QuantState._fields}, step, period,
                             dsgc=layer.config.dsgc, delayed_input_clip=layer.config.input_clip == 'delayed',
                             deviation_jump=layer.config.deviation_jump)
      for layer in layers])

  def traced(searches):
    def run(model, *args):
      with _searching(model, searches):
        return step_fn(model, *args)
    return run

  return nnx.cond(due, traced(True), traced(False), model, *args)
