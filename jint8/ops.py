"""int8 conv and dot ops whose backward passes run on int8 operands (``jax.custom_vjp``).

Forward: input and weight are quantized (round to nearest) and multiplied as int8 with int32 accumulation.
Backward: the incoming gradient is quantized with the layer's clip value (DSGC) and stochastic rounding; both
grad-input and grad-weight are int8 products. The quantizers are plain jnp with clips known before their input
is produced (the delayed activation clip, the stored gradient clip), so inside a jitted step XLA fuses them, and
the statistics they report, into the ops that produce their inputs: no quantization pass of their own. The
cotangent of the layer's ``QuantState`` carries the new state (the clips used, the measured deviation, ...) out
of the backward pass: see ``jint8.state`` and docs/design.md.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jint8 import quant
from jint8.backend import ConvGeometry, get_backend, is_depthwise
from jint8.state import HISTORY, QuantState

INPUT_CLIPS = ('delayed', 'maxabs')



@dataclasses.dataclass(frozen=True)
class Int8Config:
  """Options of the int8 ops.

  Attributes:
    backend: ``"auto"`` (``"pallas"`` on a GPU, else ``"xla"``), ``"xla"`` (exact reference, any device) or
      ``"pallas"`` (GPU kernels; interpreted elsewhere, slowly).
    dsgc: search the gradient clip value (Direction Sensitive Gradient Clipping); ``False`` clips at max|g|
      (a separate max-abs pass before the quantizer).
    stochastic_rounding: round gradients stochastically (unbiased); ``False`` rounds to nearest.
    num_candidates, min_ratio: the DSGC grid, ``num_candidates`` geometric ratios of max|g| from 1 to
      ``min_ratio``.
    refine: clips scored in a second pass between the best candidate's neighbours (0: none).
    depthwise_channel_clips: depthwise convs (one input channel per output channel) quantize their weights with a
      max-abs clip per channel instead of one per tensor, so that a channel of small weights keeps its int8
      levels; exact in the forward conv, dgrad and wgrad, which never sum over channels. Other layers ignore it.
    input_clip: ``"delayed"`` quantizes activations with the largest max-abs of the last ``history`` steps
      (known before the activation is produced, so the quantizer fuses into its producer; values beyond it
      saturate, and ``input_saturation`` records by how much); ``"maxabs"`` with this step's max-abs (exact, a
      reduction pass before the quantizer).
    history: steps of activation max-abs kept for the delayed clip.
    deviation_jump: ``search_cond`` also runs the search as soon as a layer's gradient deviation exceeds this
      many times its deviation on its last search step (``jint8.state.search_due``); 0: only every period.
    searches: ``True`` traces a search step: the DSGC search of every gradient clip, and this step's max-abs as
      the activation clip. ``False`` traces a step between searches: the stored clips, no search code.
      ``jint8.nn.search_cond`` runs the train step in the trace the step needs.
  """

  backend: str = 'auto'
  dsgc: bool = True
  stochastic_rounding: bool = True
  num_candidates: int = 32
  min_ratio: float = 2.0 ** -8
  refine: int = 8
  depthwise_channel_clips: bool = False
  input_clip: str = 'delayed'
  history: int = HISTORY
  deviation_jump: float = 0.0
  searches: bool = True

  def __post_init__(self):
    if self.input_clip not in INPUT_CLIPS:
      raise ValueError(f'Int8Config.input_clip must be one of {INPUT_CLIPS}, got {self.input_clip!r}')
    if self.refine < 0:
      raise ValueError(f'Int8Config.refine must be >= 0, got {self.refine}')
    if self.history < 1:
      raise ValueError(f'Int8Config.history must be >= 1, got {self.history}')
    if self.deviation_jump and not self.deviation_jump > 1:
      raise ValueError(f'Int8Config.deviation_jump must be 0 (off) or > 1, got {self.deviation_jump}')
    quant.candidate_ratios(self.num_candidates, self.min_ratio)  # validates the grid

  @property
  def ratios(self) -> np.ndarray:
    return quant.candidate_ratios(self.num_candidates, self.min_ratio)

  @property
  def delayed(self) -> bool:
    """Whether this trace quantizes activations with the delayed clip (a step between searches)."""
    return self.input_clip == 'delayed' and not self.searches


def _quantize_input(x, state: QuantState, config: Int8Config):
  """``(xq, clip, max|x|)``: this step's max-abs as the clip, or the delayed clip with max|x| measured beside."""
  amax = quant.max_abs(x)
  clip = state.delayed_input_clip() if config.delayed else quant.safe_clip(amax)
  return quant.quantize(x, clip), clip, amax


def _quantize_weight(w, channel_clips: bool):
  """``(wq, cw)``; ``cw`` holds a clip per output channel (the last axis of ``w``) with ``channel_clips``."""
  axis = -1 if channel_clips else None
  cw = quant.safe_clip(quant.max_abs(w, axis=axis))
  return quant.quantize(w, cw, axis=axis), cw


def _dequantization_scale(clip_a, clip_b):
  """The factors that turn the integer product of two int8 operands quantized at ``clip_a`` and ``clip_b`` back
  into floats, ``(clip_a / 127, clip_b / 127)``, which the backends apply in turn (``jint8.backend.rescale``):
  their one float32 product would flush to zero for tiny clips."""
  return jnp.stack([clip_a / quant.QMAX, clip_b / quant.QMAX])


def _times_weight_clip(product, clip, cw, out_dtype):
  """``product(scale, dtype)`` (an integer product times ``scale``) dequantized by the other operand's ``clip`` and
  the weight clip ``cw``: the kernel's scale when ``cw`` is per tensor; per channel, the same factors multiply the
  channels of the integer product (as float32) outside the kernel."""
  if cw.ndim == 0:
    return product(_dequantization_scale(clip, cw), out_dtype)
  integer = product(jnp.ones((), jnp.float32), jnp.float32)
  return (integer * (clip / quant.QMAX) * (cw / quant.QMAX)).astype(out_dtype)


def _quantize_gradient(backend, g, stored_clip, seeds, config: Int8Config):
  """``(gq, clip, deviation sums)``: the DSGC clip searched (search trace) or stored, else max|g|; the quantizer
  and the sums are elementwise and reductions over ``g``, which fuse into the op that produced ``g``."""
  if not config.dsgc:
    clip = quant.safe_clip(quant.max_abs(g))
  elif config.searches:
    clip = backend.search_clip(g, ratios=config.ratios, refine=config.refine)
  else:
    clip = quant.safe_clip(stored_clip)
  if config.stochastic_rounding and seeds is None:
    raise ValueError(f'the gradient of an int8 layer (shape {g.shape}) needs the seeds of its stochastic rounding: '
                     f'apply the model with rngs={{jint8.nn.ROUNDING_RNG: key}}, a new key every step (Linen), or '
                     f'give jint8.nnx.to_int8 an nnx.Rngs with that stream (NNX)')
  gq = quant.quantize(g, clip, seeds=seeds if config.stochastic_rounding else None)
  return gq, clip, quant.deviation_sums(g, gq, clip)


def _state_cotangent(config, stored_clip, clip, sums, cx, amax):
  """The layer's ``QuantState`` cotangent: a clip searched on an all-zero gradient is no clip (0: search again),
  a stored one stays."""
  finite = sums.finite()
  kept = stored_clip if config.dsgc and not config.searches else jnp.zeros((), jnp.float32)
  return QuantState.cotangent(
      grad_clip=jnp.where(sums.vv > 0, clip, kept), grad_deviation=jnp.where(finite, sums.deviation(), 0.0),
      input_clip=cx, input_amax=amax, nonfinite=jnp.where(finite, 0.0, 1.0), history=config.history,
      searched=config.dsgc and config.searches)


def _dtype_token(x):
  """An empty array that carries ``x``'s dtype through the residuals (residuals must be arrays)."""
  return jnp.zeros((0,), x.dtype)


def _nan_unless(finite, x, dtype):
  """``x`` where the gradient was finite, else NaN: a non-finite gradient is reported, never quantized."""
  return jnp.where(finite, x, jnp.nan).astype(dtype)


# ---------------------------------------------------------------------------------------------------------
# Convolution


def _conv_fwd(lhs, rhs, state, seeds, geometry, config):
  backend = get_backend(config.backend)
  channel_clips = (config.depthwise_channel_clips
                   and is_depthwise(lhs.shape[-1], rhs.shape, geometry.feature_group_count))
  xq, cx, amax = _quantize_input(lhs, state, config)
  wq, cw = _quantize_weight(rhs, channel_clips)
  y = _times_weight_clip(lambda scale, dtype: backend.conv(xq, wq, geometry, scale, out_dtype=dtype),
                         cx, cw, lhs.dtype)
  return y, (xq, wq, cx, cw, amax, state.grad_clip, seeds, _dtype_token(lhs), _dtype_token(rhs))


def _conv_bwd(geometry, config, residuals, g):
  xq, wq, cx, cw, amax, stored_clip, seeds, lhs_token, rhs_token = residuals
  backend = get_backend(config.backend)
  nd = geometry.ndim
  gq, c, sums = _quantize_gradient(backend, g, stored_clip, seeds, config)
  finite = sums.finite()
  dx = _times_weight_clip(  # depthwise: the input channel of dx is the output channel of the weight clip
      lambda scale, dtype: backend.conv_dgrad(gq, wq, geometry, xq.shape[1:-1], scale, out_dtype=dtype),
      c, cw, lhs_token.dtype)
  dw = backend.conv_wgrad(xq, gq, geometry, wq.shape[:nd], _dequantization_scale(cx, c))
  return (_nan_unless(finite, dx, lhs_token.dtype), _nan_unless(finite, dw, rhs_token.dtype),
          _state_cotangent(config, stored_clip, c, sums, cx, amax), None)


def _conv(lhs, rhs, state, seeds, geometry, config):
  return _conv_fwd(lhs, rhs, state, seeds, geometry, config)[0]


_conv = jax.custom_vjp(_conv, nondiff_argnums=(4, 5))
_conv.defvjp(_conv_fwd, _conv_bwd)


def _check_float(name, x):
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
    raise TypeError(f'{name} must be a floating-point array, got dtype {jnp.asarray(x).dtype}')


def _check_seeds(seeds):
  if seeds is None:
    return None
  seeds = jnp.asarray(seeds)
  if seeds.shape != (2,) or seeds.dtype != jnp.uint32:
    raise TypeError(f'seeds must be two uint32 values (jint8.quant.rounding_seeds), got {seeds.dtype}{list(seeds.shape)}')
  return seeds


def _all_ones(v) -> bool:
  return v is None or all(int(a) == 1 for a in v)


def int8_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                              dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                              precision=None, preferred_element_type=None, *, state: QuantState,
                              seeds: jax.Array | None, config: Int8Config = Int8Config()):
  """``lax.conv_general_dilated`` with int8 forward, dgrad and wgrad.

  Takes ``lax.conv_general_dilated``'s arguments (``precision`` is ignored: int8 products are exact) plus the
  layer's ``state`` (``QuantState``), the ``seeds`` of the gradient's stochastic rounding (two uint32,
  ``quant.rounding_seeds``, new every step; ``None`` in a forward pass that is not differentiated) and ``config``.
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
  y = _conv(x, w, state, _check_seeds(seeds), geometry, config)
  out_perm = [0] * (nd + 2)
  out_perm[dn.out_spec[0]], out_perm[dn.out_spec[1]] = 0, nd + 1
  for i, axis in enumerate(dn.out_spec[2:]):
    out_perm[axis] = 1 + i
  y = jnp.transpose(y, out_perm)
  return y if preferred_element_type is None else y.astype(preferred_element_type)


# ---------------------------------------------------------------------------------------------------------
# Dense (dot_general without batch dimensions)


def _dot_fwd(lhs, rhs, state, seeds, config):
  backend = get_backend(config.backend)
  xq, cx, amax = _quantize_input(lhs, state, config)
  wq, cw = _quantize_weight(rhs, False)
  y = backend.matmul(xq, wq, (1, 0), _dequantization_scale(cx, cw)).astype(lhs.dtype)
  return y, (xq, wq, cx, cw, amax, state.grad_clip, seeds, _dtype_token(lhs), _dtype_token(rhs))


def _dot_bwd(config, residuals, g):
  xq, wq, cx, cw, amax, stored_clip, seeds, lhs_token, rhs_token = residuals
  backend = get_backend(config.backend)
  gq, c, sums = _quantize_gradient(backend, g, stored_clip, seeds, config)
  finite = sums.finite()
  dx = backend.matmul(gq, wq, (1, 1), _dequantization_scale(c, cw))
  dw = backend.matmul(xq, gq, (0, 0), _dequantization_scale(cx, c))
  return (_nan_unless(finite, dx, lhs_token.dtype), _nan_unless(finite, dw, rhs_token.dtype),
          _state_cotangent(config, stored_clip, c, sums, cx, amax), None)


def _dot(lhs, rhs, state, seeds, config):
  return _dot_fwd(lhs, rhs, state, seeds, config)[0]


_dot = jax.custom_vjp(_dot, nondiff_argnums=(4,))
_dot.defvjp(_dot_fwd, _dot_bwd)


def int8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                     state: QuantState, seeds: jax.Array | None, config: Int8Config = Int8Config()):
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
  y = _dot(x, w, state, _check_seeds(seeds), config)
  y = y.reshape(tuple(lhs.shape[a] for a in lfree) + tuple(rhs.shape[a] for a in rfree))
  return y if preferred_element_type is None else y.astype(preferred_element_type)

