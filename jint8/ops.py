"""int8 conv and dot ops whose backward passes run on int8 operands (``jax.custom_vjp``).

Forward: input and weight are quantized (round to nearest) and multiplied as int8 with int32 accumulation.
Backward: the incoming gradient is quantized with the layer's clip value (DSGC) and stochastic rounding; both
grad-input and grad-weight are int8 products. The cotangent of the layer's ``QuantState`` carries the new state
(the clip used, the measured deviation, ...) out of the backward pass: see docs/design.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jint8 import quant
from jint8.backend import ConvGeometry, get_backend, is_depthwise

_INV_QMAX2 = 1.0 / (quant.QMAX * quant.QMAX)


@dataclasses.dataclass(frozen=True)
class Int8Config:
  """Options of the int8 ops.

  Attributes:
    backend: ``"auto"`` (``"pallas"`` on a GPU, else ``"xla"``), ``"xla"`` (exact reference, any device) or
      ``"pallas"`` (GPU kernels; interpreted elsewhere, slowly).
    dsgc: search the gradient clip value (Direction Sensitive Gradient Clipping); ``False`` clips at max|g|.
    stochastic_rounding: round gradients stochastically (unbiased); ``False`` rounds to nearest.
    num_candidates, min_ratio: the DSGC grid, ``num_candidates`` geometric ratios of max|g| from 1 to
      ``min_ratio``.
    refine: clips scored in a second pass between the best candidate's neighbours (0: none).
    depthwise_channel_clips: depthwise convs (one input channel per output channel) quantize their weights with a
      max-abs clip per channel instead of one per tensor, so that a channel of small weights keeps its int8
      levels; exact in the forward conv, dgrad and wgrad, which never sum over channels. Other layers ignore it.
    input_clip: ``"maxabs"`` clips activations at their max-abs each step; ``"stored"`` searches the clip
      with DSGC on search steps and reuses it in between (values beyond it saturate; experimental: it has not
      trained a model, and bench/RESULTS.md saw its loss rise on synthetic data where ``"maxabs"``'s did not).
    searches: ``False`` traces a step between two searches: every layer uses its stored clips whatever its
      ``search`` flag says, and no search code is traced (fewer kernels per layer). Only for layers that have
      clips already; ``jint8.optim.needs_search`` tells when a step must be traced with ``True``.
    seed: seed of the stochastic rounding (combined with the layer's path and the step) when the model is applied
      without the rng stream ``jint8.nn.ROUNDING_RNG``; a static seed: each value compiles another program.
  """

  backend: str = 'auto'
  dsgc: bool = True
  stochastic_rounding: bool = True
  num_candidates: int = 32
  min_ratio: float = 2.0 ** -8
  refine: int = 8
  depthwise_channel_clips: bool = False
  input_clip: str = 'maxabs'
  searches: bool = True
  seed: int = 0

  def __post_init__(self):
    if self.input_clip not in ('maxabs', 'stored'):
      raise ValueError(f"Int8Config.input_clip must be 'maxabs' or 'stored', got {self.input_clip!r}")
    if self.refine < 0:
      raise ValueError(f'Int8Config.refine must be >= 0, got {self.refine}')
    quant.candidate_ratios(self.num_candidates, self.min_ratio)  # validates the grid

  @property
  def ratios(self) -> np.ndarray:
    return quant.candidate_ratios(self.num_candidates, self.min_ratio)


class QuantState(NamedTuple):
  """A layer's quantization state: float32 scalars (see docs/design.md for what each cotangent carries)."""

  grad_clip: jax.Array
  grad_deviation: jax.Array
  input_clip: jax.Array
  nonfinite: jax.Array
  search: jax.Array
  step: jax.Array
  uses: jax.Array

  @classmethod
  def initial(cls) -> 'QuantState':
    """State before the first step: no clip yet, search on the first backward."""
    zero = jnp.zeros((), jnp.float32)
    return cls(zero, zero, zero, zero, jnp.ones((), jnp.float32), zero, zero)


def _stored_or_searched_clip(backend, x, stored, state, config):
  if not config.searches:
    return quant.safe_clip(stored)
  return backend.search_clip(x, stored, state.search, ratios=config.ratios, refine=config.refine)


def _quantize_operands(backend, x, w, state, config, *, channel_clips=False):
  """``(xq, wq, cx, cw)``; ``cw`` holds a clip per output channel (the last axis of ``w``) with ``channel_clips``."""
  if config.input_clip == 'maxabs':
    cx = quant.safe_clip(quant.max_abs(x))
  else:
    cx = _stored_or_searched_clip(backend, x, state.input_clip, state, config)
  if channel_clips:
    cw = quant.safe_clip(quant.max_abs(w, axis=-1))
    return backend.quantize(x, cx), quant.quantize(w, cw, axis=-1), cx, cw
  cw = quant.safe_clip(quant.max_abs(w))
  return backend.quantize(x, cx), backend.quantize(w, cw), cx, cw


def _times_weight_clip(product, clip, cw, out_dtype):
  """``product(scale, dtype)`` (an integer product times ``scale``) dequantized by the other operand's ``clip`` and
  the weight clip ``cw``: the kernel's scale when ``cw`` is per tensor; per channel, the same scales multiply the
  channels of the integer product (as float32) outside the kernel."""
  scale = clip * cw * _INV_QMAX2
  if cw.ndim == 0:
    return product(scale, out_dtype)
  return (product(jnp.ones((), jnp.float32), jnp.float32) * scale).astype(out_dtype)


def _quantize_gradient(backend, g, state, key, config):
  """Quantizes ``g``; returns ``(gq, clip, finite, state_cotangent)``."""
  clip = _stored_or_searched_clip(backend, g, state.grad_clip, state, config) if config.dsgc else None
  gq, clip, dev, finite = backend.quantize_gradient(g, clip, key, stochastic=config.stochastic_rounding)
  zero = jnp.zeros((), jnp.float32)
  cotangent = QuantState(
      grad_clip=jnp.where(finite, clip, state.grad_clip),
      grad_deviation=jnp.where(finite, dev, state.grad_deviation),
      input_clip=zero,  # filled in by the caller
      nonfinite=jnp.where(finite, 0.0, 1.0).astype(jnp.float32),
      search=zero, step=zero, uses=jnp.ones((), jnp.float32))
  return gq, clip, finite, cotangent


def _dtype_token(x):
  """An empty array that carries ``x``'s dtype through the residuals (residuals must be arrays)."""
  return jnp.zeros((0,), x.dtype)


def _nan_unless(finite, x, dtype):
  """``x`` where the gradient was finite, else NaN: a non-finite gradient is reported, never quantized."""
  return jnp.where(finite, x, jnp.nan).astype(dtype)


# ---------------------------------------------------------------------------------------------------------
# Convolution


def _conv_fwd(lhs, rhs, state, key, geometry, config):
  backend = get_backend(config.backend)
  channel_clips = (config.depthwise_channel_clips
                   and is_depthwise(lhs.shape[-1], rhs.shape, geometry.feature_group_count))
  xq, wq, cx, cw = _quantize_operands(backend, lhs, rhs, state, config, channel_clips=channel_clips)
  y = _times_weight_clip(lambda scale, dtype: backend.conv(xq, wq, geometry, scale, out_dtype=dtype),
                         cx, cw, lhs.dtype)
  return y, (xq, wq, cx, cw, state, key, _dtype_token(lhs), _dtype_token(rhs))


def _conv_bwd(geometry, config, residuals, g):
  xq, wq, cx, cw, state, key, lhs_token, rhs_token = residuals
  backend = get_backend(config.backend)
  nd = geometry.ndim
  gq, c, finite, cotangent = _quantize_gradient(backend, g, state, key, config)
  dx = _times_weight_clip(  # depthwise: the input channel of dx is the output channel of the weight clip
      lambda scale, dtype: backend.conv_dgrad(gq, wq, geometry, xq.shape[1:-1], scale, out_dtype=dtype),
      c, cw, lhs_token.dtype)
  dw = backend.conv_wgrad(xq, gq, geometry, wq.shape[:nd], cx * c * _INV_QMAX2)
  return (_nan_unless(finite, dx, lhs_token.dtype), _nan_unless(finite, dw, rhs_token.dtype),
          cotangent._replace(input_clip=cx), None)


def _conv(lhs, rhs, state, key, geometry, config):
  return _conv_fwd(lhs, rhs, state, key, geometry, config)[0]


_conv = jax.custom_vjp(_conv, nondiff_argnums=(4, 5))
_conv.defvjp(_conv_fwd, _conv_bwd)


def _check_float(name, x):
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
    raise TypeError(f'{name} must be a floating-point array, got dtype {jnp.asarray(x).dtype}')


def _all_ones(v) -> bool:
  return v is None or all(int(a) == 1 for a in v)


def int8_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                              dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                              precision=None, preferred_element_type=None, *, state: QuantState,
                              key: jax.Array, config: Int8Config = Int8Config()):
  """``lax.conv_general_dilated`` with int8 forward, dgrad and wgrad.

  Takes ``lax.conv_general_dilated``'s arguments (``precision`` is ignored: int8 products are exact) plus the
  layer's ``state`` (``QuantState``), a PRNG ``key`` for the gradient's stochastic rounding and ``config``.
  Transposed convs (``lhs_dilation``) and ``batch_group_count`` are not supported.
  """
  del precision
  _check_float('lhs', lhs)
  _check_float('rhs', rhs)
  if lhs.ndim != rhs.ndim or lhs.ndim < 3:
    raise ValueError(f'lhs and rhs must have the same rank >= 3, got shapes {lhs.shape} and {rhs.shape}')
  nd = lhs.ndim - 2
  if not _all_ones(lhs_dilation):
    raise NotImplementedError('int8_conv_general_dilated does not support lhs_dilation (transposed convs); '
                              'keep that layer in float (Int8Policy.float_layers)')
  if batch_group_count != 1:
    raise NotImplementedError('int8_conv_general_dilated does not support batch_group_count != 1')
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  x = jnp.transpose(lhs, (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],))
  w = jnp.transpose(rhs, tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[1], dn.rhs_spec[0]))
  groups = int(feature_group_count)
  if x.shape[-1] != w.shape[-2] * groups or w.shape[-1] % groups:
    raise ValueError(f'feature_group_count={groups} does not fit input channels {x.shape[-1]}, kernel '
                     f'input channels {w.shape[-2]} and output channels {w.shape[-1]}')
  strides = tuple(int(s) for s in window_strides)
  dilation = (1,) * nd if rhs_dilation is None else tuple(int(d) for d in rhs_dilation)
  kernel = w.shape[:nd]
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(x.shape[1:-1], [(k - 1) * d + 1 for k, d in zip(kernel, dilation)],
                               strides, padding)
  else:
    pads = padding
  geometry = ConvGeometry(strides, tuple((int(lo), int(hi)) for lo, hi in pads), dilation, groups)
  y = _conv(x, w, state, key, geometry, config)
  out_perm = [0] * (nd + 2)
  out_perm[dn.out_spec[0]], out_perm[dn.out_spec[1]] = 0, nd + 1
  for i, axis in enumerate(dn.out_spec[2:]):
    out_perm[axis] = 1 + i
  y = jnp.transpose(y, out_perm)
  return y if preferred_element_type is None else y.astype(preferred_element_type)


# ---------------------------------------------------------------------------------------------------------
# Dense (dot_general without batch dimensions)


def _dot_fwd(lhs, rhs, state, key, config):
  backend = get_backend(config.backend)
  xq, wq, cx, cw = _quantize_operands(backend, lhs, rhs, state, config)
  y = backend.matmul(xq, wq, (1, 0), cx * cw * _INV_QMAX2).astype(lhs.dtype)
  return y, (xq, wq, cx, cw, state, key, _dtype_token(lhs), _dtype_token(rhs))


def _dot_bwd(config, residuals, g):
  xq, wq, cx, cw, state, key, lhs_token, rhs_token = residuals
  backend = get_backend(config.backend)
  gq, c, finite, cotangent = _quantize_gradient(backend, g, state, key, config)
  dx = backend.matmul(gq, wq, (1, 1), c * cw * _INV_QMAX2)
  dw = backend.matmul(xq, gq, (0, 0), cx * c * _INV_QMAX2)
  return (_nan_unless(finite, dx, lhs_token.dtype), _nan_unless(finite, dw, rhs_token.dtype),
          cotangent._replace(input_clip=cx), None)


def _dot(lhs, rhs, state, key, config):
  return _dot_fwd(lhs, rhs, state, key, config)[0]


_dot = jax.custom_vjp(_dot, nondiff_argnums=(4,))
_dot.defvjp(_dot_fwd, _dot_bwd)


def int8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                     state: QuantState, key: jax.Array, config: Int8Config = Int8Config()):
  """``lax.dot_general`` with int8 forward and backward products, for dense layers (no batch dimensions).

  Any contracting dimensions and any leading shape of ``lhs`` are accepted (``nn.Dense`` contracts the last
  axis of its input with the first of its kernel). ``precision`` is ignored: int8 products are exact.
  """
  del precision
  _check_float('lhs', lhs)
  _check_float('rhs', rhs)
  (lc, rc), (lb, rb) = dimension_numbers
  if tuple(lb) or tuple(rb):
    raise NotImplementedError('int8_dot_general does not support batch dimensions')
  lc = tuple(a % lhs.ndim for a in lc)
  rc = tuple(a % rhs.ndim for a in rc)
  if tuple(lhs.shape[a] for a in lc) != tuple(rhs.shape[a] for a in rc):
    raise ValueError(f'contracting dimensions do not match: lhs {lhs.shape} axes {lc}, rhs {rhs.shape} '
                     f'axes {rc}')
  lfree = tuple(a for a in range(lhs.ndim) if a not in lc)
  rfree = tuple(a for a in range(rhs.ndim) if a not in rc)
  k = math.prod(lhs.shape[a] for a in lc)
  x = jnp.transpose(lhs, lfree + lc).reshape(-1, k)
  w = jnp.transpose(rhs, rc + rfree).reshape(k, -1)
  y = _dot(x, w, state, key, config)
  y = y.reshape(tuple(lhs.shape[a] for a in lfree) + tuple(rhs.shape[a] for a in rfree))
  return y if preferred_element_type is None else y.astype(preferred_element_type)

