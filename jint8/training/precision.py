"""Training precision from the config: fp32, bf16 (bf16 compute, fp32 params) or int8 (jint8's int8 convs).

``config.precision`` picks one; for ``"int8"`` the section ``config.int8`` holds the options of the int8 ops
(``Int8Config``), which layers stay float (``Int8Policy``) and the DSGC / DCLR settings of
``jint8.optim.int8_optimizer``:

  backend, dsgc, stochastic_rounding, num_candidates, min_ratio, refine, input_clip, history,
  depthwise_channel_clips                                                             -> Int8Config
  keep_first_conv_float, keep_dense_float, keep_depthwise_float, float_layers         -> Int8Policy
  dclr, alpha, beta, skip_nonfinite                                                   -> int8_optimizer
  period                                 -> DSGC search steps (``jint8.nn.search_cond`` in the trainers)
  compute_dtype                                        -> the dtype around the int8 convs (``compute_dtype``)
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx

from jint8 import backend, optim
from jint8.nn import Int8Config, Int8Model, Int8Policy
from jint8.training import nnx_bridge

PRECISIONS = ('fp32', 'bf16', 'int8')
_COMPUTE_DTYPES = {'fp32': jnp.float32, 'bf16': jnp.bfloat16}
INT8_COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def check_precision(config: Any) -> None:
  """Raises a ValueError naming the config key when ``config.precision`` or ``config.int8`` is invalid."""
  if config.precision not in PRECISIONS:
    raise ValueError(f'config.precision: unknown precision {config.precision!r}; valid: {PRECISIONS}')
  if config.precision == 'int8':
    int8_config(config)
    int8_policy(config)
    try:
      backend.get_backend(config.int8.backend)
    except (ValueError, ImportError) as e:
      raise ValueError(f'config.int8.backend: {e}') from None
    if config.int8.compute_dtype not in INT8_COMPUTE_DTYPES:
      raise ValueError(f'config.int8.compute_dtype: {config.int8.compute_dtype!r} is not one of '
                       f'{tuple(INT8_COMPUTE_DTYPES)}')
    if config.int8.period < 1:
      raise ValueError(f'config.int8.period must be >= 1, got {config.int8.period}')
    if not (config.int8.alpha >= 0 and 0 < config.int8.beta <= 1):
      raise ValueError(f'config.int8.alpha must be >= 0 and config.int8.beta in (0, 1], got '
                       f'alpha={config.int8.alpha}, beta={config.int8.beta}')


def compute_dtype(config: Any):
  """The dtype models compute in (params stay float32): float32 for fp32, bfloat16 for bf16, and for int8
  ``config.int8.compute_dtype``, the dtype of everything around the int8 convs (BN, ReLU, the float layers)."""
  if config.precision == 'int8':
    return INT8_COMPUTE_DTYPES[config.int8.compute_dtype]
  return _COMPUTE_DTYPES[config.precision]


def describe(config: Any) -> str:
  """``config.precision`` in words, for int8 with the backend that runs (``"auto"`` resolved) and DSGC / DCLR."""
  if config.precision != 'int8':
    return config.precision
  c = config.int8
  dsgc = f'DSGC every {c.period} steps' if c.dsgc else 'max-abs gradient clip'
  if c.dsgc and c.deviation_jump:
    dsgc += f' and after a {c.deviation_jump:g}x deviation jump'
  dclr = f'DCLR alpha {c.alpha:g} beta {c.beta:g}' if c.dclr else 'no DCLR'
  return (f'int8 ({backend.get_backend(c.backend).name} backend, {dsgc}, {dclr}, '
          f'{c.compute_dtype} elsewhere)')


def int8_config(config: Any) -> Int8Config:
  """The ``Int8Config`` of ``config.int8``."""
  c = config.int8
  try:
    return Int8Config(backend=c.backend, dsgc=c.dsgc, stochastic_rounding=c.stochastic_rounding,
                      num_candidates=c.num_candidates, min_ratio=c.min_ratio, refine=c.refine,
                      depthwise_channel_clips=c.depthwise_channel_clips, input_clip=c.input_clip,
                      history=c.history, deviation_jump=c.deviation_jump)
  except ValueError as e:
    raise ValueError(f'config.int8: {e}') from None


def int8_policy(config: Any) -> Int8Policy:
  """The ``Int8Policy`` of ``config.int8``."""
  c = config.int8
  try:
    return Int8Policy(keep_first_conv_float=c.keep_first_conv_float, keep_dense_float=c.keep_dense_float,
                      keep_depthwise_float=c.keep_depthwise_float, float_layers=tuple(c.float_layers))
  except ValueError as e:
    raise ValueError(f'config.int8: {e}') from None


def apply_precision(model: nn.Module, config: Any) -> nn.Module:
  """``model`` itself for fp32 / bf16 (build it with ``compute_dtype``), its ``Int8Model`` for int8 (for an NNX
  model bridged by ``jint8.training.nnx_bridge.linen_model``, its ``Int8NnxModel``)."""
  if config.precision != 'int8':
    return model
  if isinstance(model, nnx.bridge.ToLinen):
    return nnx_bridge.Int8NnxModel(model.nnx_class, config=int8_config(config), policy=int8_policy(config))
  return Int8Model(model, config=int8_config(config), policy=int8_policy(config))


def wrap_optimizer(inner: optax.GradientTransformation, config: Any) -> optax.GradientTransformation:
  """The optimizer of the params, taking the step's int8 state as the extra argument ``int8_state``.

  fp32 / bf16: ``inner`` (which ignores it); int8: ``int8_optimizer(inner)`` with the DCLR settings.
  """
  if config.precision != 'int8':
    return optax.with_extra_args_support(inner)
  c = config.int8
  return optim.int8_optimizer(inner, alpha=c.alpha, beta=c.beta, dclr=c.dclr, skip_nonfinite=c.skip_nonfinite)
