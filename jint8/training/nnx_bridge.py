"""Flax NNX models in the trainers, whose code drives Linen models (``init`` / ``apply`` on variable dicts).

``linen_model`` bridges an NNX model into Linen with ``nnx.bridge.ToLinen``, which builds the NNX model from an
``nnx.Rngs`` of Linen's rng streams at every ``init`` and ``apply`` and keeps its variables in Linen collections by
type: ``nnx.Param`` in ``params``, ``nnx.BatchStat`` in ``batch_stats``, ``jint8.nnx.Int8State`` in
``STATE_COLLECTION``. ``Int8NnxModel`` is its int8 version: the ``Int8Model`` whose built NNX model
``jint8.nnx.to_int8`` converts, so the trainers' int8 code (``jint8.state.update``, DCLR, ``jint8.nn.search_cond``)
runs it unchanged. Its int8 layers fork the ``ROUNDING_RNG`` key of each ``apply``, as Linen's layers derive theirs
from it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
from flax import nnx

from jint8 import nnx as jnnx
from jint8.nn import ROUNDING_RNG, Int8Model


def linen_model(model_fn: Callable[..., nnx.Module]) -> nnx.bridge.ToLinen:
  """The NNX model ``model_fn(rngs=...)`` as a Linen module."""
  return nnx.bridge.ToLinen(model_fn, metadata_fn=None)


def _int8_model(model_fn: Callable[..., nnx.Module], *, rngs: nnx.Rngs, inputs, config, policy) -> nnx.Module:
  return jnnx.to_int8(model_fn(rngs=rngs), *inputs, config=config, policy=policy,
                      rngs=rngs if ROUNDING_RNG in rngs else None)


class Int8NnxModel(Int8Model):
  """``Int8Model`` of the NNX model ``model(rngs=...)`` (a function building it, where ``Int8Model`` takes a Linen
  module): ``jint8.nnx.to_int8`` converts it per ``config`` and ``policy``, finding the first conv with the shape of
  the first argument. Its variables nest under ``"model"``."""

  @nn.compact
  def __call__(self, x, *args, **kwargs):
    build = functools.partial(_int8_model, self.model, inputs=(jax.ShapeDtypeStruct(x.shape, x.dtype),),
                              config=self.config, policy=self.policy)
    return nnx.bridge.ToLinen(build, metadata_fn=None, name='model')(x, *args, **kwargs)
