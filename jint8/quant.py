"""Symmetric int8 quantization math: quantizers, cosine deviation and the DSGC clip search.

Pure jnp, no Flax. The quantizer with clipping value ``c > 0`` is

    q(x) = round(127 * clamp(x, -c, c) / c),        x_hat = q(x) * c / 127

with round-to-nearest or unbiased stochastic rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

QMAX = 127
# The smallest clip value used anywhere: a clip of 0 (an all-zero tensor) would divide by zero.
MIN_CLIP = float(np.finfo(np.float32).tiny)


def safe_clip(clip: jax.Array) -> jax.Array:
  """Returns ``clip`` as float32, with zero, negative and non-finite values replaced by a tiny positive one."""
  clip = jnp.asarray(clip, jnp.float32)
  return jnp.where(jnp.isfinite(clip) & (clip > MIN_CLIP), clip, MIN_CLIP)


def needs_search(search: jax.Array, clip: jax.Array) -> jax.Array:
  """Whether a layer's clip must be searched with DSGC: its ``search`` flag is set or it has no clip yet."""
  return jnp.logical_or(search > 0, clip <= 0)


def _broadcast_clip(clip: jax.Array, ndim: int, axis: int | None) -> jax.Array:
  clip = safe_clip(clip)
  if axis is None:
    if clip.ndim != 0:
      raise ValueError(f'per-tensor quantization takes a scalar clip, got shape {clip.shape}')
    return clip
  axis = axis % ndim
  if clip.ndim != 1:
    raise ValueError(f'per-channel quantization takes a 1-D clip, got shape {clip.shape}')
  shape = [1] * ndim
  shape[axis] = clip.shape[0]
  return clip.reshape(shape)


def max_abs(x: jax.Array, axis: int | None = None) -> jax.Array:
  """Max-abs clip value: per tensor (``axis=None``) or per channel along ``axis``."""
  x = jnp.abs(x.astype(jnp.float32))
  if axis is None:
    return jnp.max(x)
  axis = axis % x.ndim
  return jnp.max(x, axis=tuple(a for a in range(x.ndim) if a != axis))


def quantize(x: jax.Array, clip: jax.Array, *, axis: int | None = None,
             key: jax.Array | None = None) -> jax.Array:
  """Quantizes ``x`` to int8 with clipping value ``clip``.

  Args:
    x: a float array.
    clip: a scalar (per tensor) or a 1-D array of ``x.shape[axis]`` values (per channel).
    axis: the channel axis for per-channel clip values; ``None`` for per tensor.
    key: a PRNG key for unbiased stochastic rounding; ``None`` rounds to nearest.

  Returns:
    An int8 array of ``x``'s shape with values in [-127, 127].
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'quantize expects a floating-point array, got {x.dtype}')
  c = _broadcast_clip(clip, x.ndim, axis)
  # Divide before scaling: 127 / c overflows float32 for tiny clip values.
  v = jnp.clip(x.astype(jnp.float32) / c, -1.0, 1.0) * QMAX
  if key is None:
    v = jnp.round(v)
  else:
    v = jnp.floor(v + jax.random.uniform(key, v.shape, jnp.float32))
  return jnp.clip(v, -QMAX, QMAX).astype(jnp.int8)


def dequantize(q: jax.Array, clip: jax.Array, *, axis: int | None = None,
               dtype=jnp.float32) -> jax.Array:
  """Maps int8 values back to floats: ``q * clip / 127``."""
  c = _broadcast_clip(clip, q.ndim, axis)
  return (q.astype(jnp.float32) * (c / QMAX)).astype(dtype)


def cosine_deviation(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine distance ``1 - <a, b> / (|a| |b|)`` in float32, in [0, 2].

  Each operand is divided by its max-abs first, so tiny and huge values neither underflow nor overflow.
  Two all-zero operands have deviation 0; one all-zero operand against a non-zero one has deviation 1.
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  a = a / jnp.maximum(jnp.max(jnp.abs(a)), MIN_CLIP)
  b = b / jnp.maximum(jnp.max(jnp.abs(b)), MIN_CLIP)
  ab, aa, bb = jnp.sum(a * b), jnp.sum(a * a), jnp.sum(b * b)
  cos = ab / jnp.sqrt(jnp.maximum(aa * bb, MIN_CLIP))
  d = jnp.where((aa == 0) & (bb == 0), 0.0, 1.0 - cos)
  return jnp.clip(d, 0.0, 2.0)


def candidate_ratios(num: int = 32, min_ratio: float = 2.0 ** -8) -> np.ndarray:
  """The DSGC candidate grid: ``num`` ratios r_k of max|g|, geometric from 1 down to ``min_ratio``."""
  if num < 2 or not 0 < min_ratio < 1:
    raise ValueError(f'need num >= 2 and 0 < min_ratio < 1, got num={num}, min_ratio={min_ratio}')
  return np.geomspace(1.0, min_ratio, num).astype(np.float32)


def score_clips(g: jax.Array, clips: jax.Array) -> jax.Array:
  """Cosine deviation of ``g`` against its round-to-nearest quantization at each clip in ``clips``.

  All candidates are scored from one fused reduction over ``g``: each needs only <g, q_k> and <q_k, q_k>;
  <g, g> is shared.
  """
  g = g.reshape(-1).astype(jnp.float32)
  amax = jnp.maximum(jnp.max(jnp.abs(g)), MIN_CLIP)
  g = g / amax  # normalised so that tiny gradients do not underflow in the squares
  c_rel = safe_clip(clips)[:, None] / amax
  q = jnp.round(jnp.clip(g[None, :] / c_rel, -1.0, 1.0) * QMAX)
  gq = jnp.sum(g[None, :] * q, axis=1)
  qq = jnp.sum(q * q, axis=1)
  gg = jnp.sum(g * g)
  cos = gq / jnp.sqrt(jnp.maximum(gg * qq, MIN_CLIP))
  return jnp.clip(jnp.where(gg == 0, 0.0, 1.0 - cos), 0.0, 2.0)


class ClipSearch(NamedTuple):
  """Result of a DSGC search: the chosen clip value and the deviation it gives (round to nearest)."""
  clip: jax.Array
  deviation: jax.Array


def dsgc_search(g: jax.Array, ratios: np.ndarray | None = None, refine: int = 8, *,
                amax: jax.Array | None = None, score=score_clips) -> ClipSearch:
  """Direction Sensitive Gradient Clipping: the clip value minimising the cosine deviation of ``g``.

  Candidates are ``ratios * max|g|`` (default: ``candidate_ratios()``, 32 geometric steps from 1 to 2^-8).
  With ``refine > 0`` a second pass scores ``refine`` evenly spaced clips between the best candidate's two
  neighbours. Each pass is one reduction over ``g`` (``score(g, clips)``, by default ``score_clips``; a kernel
  backend passes its own, with ``amax`` = max|g| when it has it). An all-zero ``g`` gives a tiny positive clip
  and deviation 0; the result is only meaningful for finite ``g``.
  """
  ratios = candidate_ratios() if ratios is None else np.asarray(ratios, np.float32)
  amax = max_abs(g) if amax is None else amax
  clips = safe_clip(amax) * ratios
  scores = score(g, clips)
  best = jnp.argmin(scores)
  clip, dev = clips[best], scores[best]
  if refine > 0:
    hi = clips[jnp.maximum(best - 1, 0)]
    lo = clips[jnp.minimum(best + 1, len(ratios) - 1)]
    fine = lo + (hi - lo) * jnp.linspace(0.0, 1.0, refine + 2)[1:-1]
    fine_scores = score(g, fine)
    fbest = jnp.argmin(fine_scores)
    better = fine_scores[fbest] < dev
    clip = jnp.where(better, fine[fbest], clip)
    dev = jnp.where(better, fine_scores[fbest], dev)
  return ClipSearch(safe_clip(clip), dev)


def all_finite(x: jax.Array) -> jax.Array:
  """True when every element of ``x`` is finite."""
  return jnp.all(jnp.isfinite(x))
