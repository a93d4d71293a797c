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
from jax import lax

QMAX = 127
# The smallest clip value used anywhere: a clip of 0 (an all-zero tensor) would divide by zero.
MIN_CLIP = float(np.finfo(np.float32).tiny)


def safe_clip(clip: jax.Array) -> jax.Array:
  """Returns ``clip`` as float32, with zero, negative and non-finite values replaced by a tiny positive one."""
  clip = jnp.asarray(clip, jnp.float32)
  return jnp.where(jnp.isfinite(clip) & (clip > MIN_CLIP), clip, MIN_CLIP)


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


def flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Each element's row-major index in an array of ``shape``, as uint32 (wrapping past 2^32 elements).

  Built from iotas, so it fuses into the consumer; under a sharded jit each shard gets its global indices.
  """
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2 ** 32)
    stride *= shape[axis]
  return index


def uniform_hash(shape: tuple[int, ...], seeds: jax.Array) -> jax.Array:
  """Counter-based uniform floats in [0, 1) (24 random bits) for each element of an array of ``shape``.

  A Weyl step of the element's index offset by ``seeds[0]``, then a two-multiply xor-shift finalizer with
  ``seeds[1]`` xored in between: integer operations on an iota, which XLA fuses into the consumer (random bits
  from ``jax.random`` are a kernel of their own). ``seeds``: two uint32 values.
  """
  seeds = jnp.asarray(seeds, jnp.uint32)
  h = flat_index(shape) * jnp.uint32(0x9E3779B9) + seeds[0]
  h = h ^ (h >> 16)
  h = (h * jnp.uint32(0x21F0AAAD)) ^ seeds[1]
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x735A2D97)
  h = h ^ (h >> 15)
  return (h >> 8).astype(jnp.int32).astype(jnp.float32) * (2.0 ** -24)


def rounding_seeds(key: jax.Array) -> jax.Array:
  """The two uint32 seeds of ``uniform_hash``: the first two words of a PRNG key's data (a threefry key's both;
  an rbg key holds the same two words twice). Integer ops that fuse, where drawing bits with ``jax.random``
  would launch a random-number kernel per layer."""
  return jax.random.key_data(key).reshape(-1)[:2]


def _mix32(x: int) -> int:
  """A 32-bit integer finalizer (xor-shift-multiply), in Python: for constants computed while tracing."""
  x &= 0xFFFFFFFF
  x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
  x = ((x ^ (x >> 15)) * 0x846CA68B) & 0xFFFFFFFF
  return x ^ (x >> 16)


def layer_seeds(seeds: jax.Array, index: int) -> jax.Array:
  """The seeds of the ``index``-th int8 layer application in a step, from the step's ``seeds``: two constants of
  ``index`` added and xored in, scalar integer ops that XLA fuses into the quantizer (a ``jax.random.fold_in``
  per layer would be a kernel of its own). Different ``index``es give unrelated ``uniform_hash`` streams: the
  first seed shifts the counter, the second enters the finalizer."""
  seeds = jnp.asarray(seeds, jnp.uint32)
  offset = jnp.asarray([_mix32(2 * index + 1), _mix32(2 * index + 2)], jnp.uint32)
  return jnp.stack([seeds[0] + offset[0], seeds[1] ^ offset[1]])


def quantize(x: jax.Array, clip: jax.Array, *, axis: int | None = None,
             seeds: jax.Array | None = None) -> jax.Array:
  """Quantizes ``x`` to int8 with clipping value ``clip``.

  Plain elementwise jnp: inside a jitted step XLA fuses it into the op that produces ``x``, which then writes
  int8 (no pass of its own).

  Args:
    x: a float array.
    clip: a scalar (per tensor) or a 1-D array of ``x.shape[axis]`` values (per channel).
    axis: the channel axis for per-channel clip values; ``None`` for per tensor.
    seeds: two uint32 values (``rounding_seeds``) for unbiased stochastic rounding with ``uniform_hash``;
      ``None`` rounds to nearest (ties to even).

  Returns:
    An int8 array of ``x``'s shape with values in [-127, 127].
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'quantize expects a floating-point array, got {x.dtype}')
  c = _broadcast_clip(clip, x.ndim, axis)
  # Divide before scaling: 127 / c overflows float32 for tiny clip values.
  v = jnp.clip(x.astype(jnp.float32) / c, -1.0, 1.0) * QMAX
  if seeds is None:
    v = jnp.round(v)
  else:
    v = jnp.floor(v + uniform_hash(x.shape, seeds))
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


class DeviationSums(NamedTuple):
  """The sums from which the cosine deviation of ``g`` against its quantization ``q`` follows, with ``g`` in
  units of its clip (``v = g / c``) and ``q`` in int8 steps: <v, q>, <v, v>, <q, q>."""
  vq: jax.Array
  vv: jax.Array
  qq: jax.Array

  def deviation(self) -> jax.Array:
    """``1 - cos(g, q)`` in [0, 2]; 0 when both are all-zero, 1 when one is."""
    cos = self.vq / jnp.maximum(jnp.sqrt(self.vv) * jnp.sqrt(self.qq), MIN_CLIP)
    return jnp.clip(jnp.where((self.vv == 0) & (self.qq == 0), 0.0, 1.0 - cos), 0.0, 2.0)

  def finite(self) -> jax.Array:
    """Whether ``g`` was finite: an inf or nan in ``g`` makes <v, v> inf or nan (so does a gradient beyond the
    clip by more than about 1e17, which is as unusable)."""
    return jnp.isfinite(self.vv)


def deviation_sums(g: jax.Array, q: jax.Array, clip: jax.Array) -> DeviationSums:
  """``DeviationSums`` of ``g`` and its int8 quantization ``q`` at the per-tensor ``clip``: three reductions that
  XLA computes in the fusion that quantizes ``g`` (the same ``g / c``)."""
  v = g.astype(jnp.float32) / safe_clip(clip)
  qf = q.astype(jnp.float32)
  return DeviationSums(jnp.sum(v * qf), jnp.sum(v * v), jnp.sum(qf * qf))


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
