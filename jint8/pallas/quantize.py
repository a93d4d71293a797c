"""Kernel: int8 quantization of a tensor with a given clip, optionally with the statistics of the result.

One pass over ``x``: ``q = round(127 * clamp(x / c, -1, 1))`` with round-to-nearest-even (activations,
weights; bit-identical to ``jint8.quant.quantize`` as XLA compiles it, ``x / c`` becoming ``x * (1 / c)``, as
here) or stochastic rounding from a counter-based hash (gradients). With ``with_stats`` each program also
writes, for its block, max|x| and the three sums of the cosine deviation (<x,x>, <x,q>, <q,q> with x divided
by the block's max|x|, so that they neither overflow nor underflow; a non-finite x makes <x,x> non-finite);
``combine_stats`` merges them into the tensor's max|x|, finiteness and ``1 - cos(x, q)``.
Reference: ``jint8.quant.quantize`` / ``quant.cosine_deviation``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jint8 import quant
from jint8.pallas import common
from jint8.pallas import data_parallel

BLOCK = 4096


class QuantizeStats(NamedTuple):
  """What one pass learns about ``x`` and its quantization ``q``."""
  max_abs: jax.Array     # max|x|
  finite: jax.Array      # all of x finite
  deviation: jax.Array   # 1 - cos(x, q)


def _kernel(x_ref, inv_clip_ref, seed_ref, q_ref, *stat_refs, n, block, stochastic, interpret):
  pid = pl.program_id(0)
  start = pid * block
  index = start + lax.iota(jnp.int32, block)
  mask = index < n if n % block else None
  x = common.load(x_ref.at[pl.ds(start, block)], mask).astype(jnp.float32)
  v = jnp.clip(x * inv_clip_ref[0], -1.0, 1.0) * quant.QMAX
  if stochastic:
    v = jnp.floor(v + common.uniform(index, seed_ref[0], seed_ref[1]))
  else:
    v = common.round_half_even(v, interpret=interpret)
  q = jnp.clip(v, -quant.QMAX, quant.QMAX)
  common.store(q_ref.at[pl.ds(start, block)], q.astype(jnp.int8), mask)
  if stat_refs:
    amax_ref, xx_ref, xq_ref, qq_ref = stat_refs
    amax = jnp.max(jnp.abs(x))
    xn = x * (1.0 / jnp.maximum(amax, quant.MIN_CLIP))
    amax_ref[pid] = amax
    xx_ref[pid] = jnp.sum(xn * xn)
    xq_ref[pid] = jnp.sum(xn * q)
    qq_ref[pid] = jnp.sum(q * q)


def quantize(x: jax.Array, clip: jax.Array, seeds: jax.Array | None = None, *, with_stats: bool = False,
             interpret: bool, block: int | None = None):
  """Quantizes ``x`` to int8 with the per-tensor ``clip``.

  Args:
    x: a float array of any shape.
    clip: the clipping value (a scalar; made safe with ``quant.safe_clip``).
    seeds: two uint32 values seeding stochastic rounding; ``None`` rounds to nearest (ties to even).
    with_stats: also return ``QuantizeStats`` of ``x`` and the result.
    interpret: run the kernel in the Pallas interpreter (no GPU).
    block: elements per program (a power of two); chosen from the size when ``None``.

  Returns:
    The int8 array of ``x``'s shape, and with ``with_stats`` its ``QuantizeStats``. Under data parallelism
    (``data_parallel``) each device quantizes its batch shard; the rounding is the same as on one device.
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'quantize expects a floating-point array, got {x.dtype}')
  if x.size >= 2 ** 31:
    raise ValueError(f'the Pallas quantizer indexes with int32; {x.size} elements is too many')
  inv_clip = (1.0 / quant.safe_clip(clip)).reshape(1)
  stochastic = seeds is not None
  seeds = jnp.zeros((2,), jnp.uint32) if seeds is None else jnp.asarray(seeds, jnp.uint32).reshape(2)

  def run(x, inv_clip, seeds, *, shard_index):
    n = x.size
    size = block or common.pow2_block(n, 128, BLOCK)
    num_blocks = common.cdiv(n, size)
    # Stochastic rounding hashes each element's index in the whole tensor: shard i starts at i * n.
    seeds = seeds.at[0].add(jnp.asarray(shard_index, jnp.uint32) * jnp.uint32(n) * jnp.uint32(common.WEYL))
    out_shape = [jax.ShapeDtypeStruct((n,), jnp.int8)]
    if with_stats:
      out_shape += [jax.ShapeDtypeStruct((num_blocks,), jnp.float32)] * 4
    kernel = functools.partial(_kernel, n=n, block=size, stochastic=stochastic, interpret=interpret)
    outs = common.call(kernel, out_shape=tuple(out_shape), grid=(num_blocks,), interpret=interpret,
                       num_warps=8 if size >= 2048 else 4, num_stages=1, name='jint8_quantize')(
                           x.reshape(-1), inv_clip, seeds)
    return (outs[0].reshape(x.shape),) + tuple(outs[1:])

  outs = data_parallel.map_batch(run, (x,), (inv_clip, seeds), with_shard_index=True)
  if not with_stats:
    return outs[0]
  return outs[0], combine_stats(*outs[1:])


def combine_stats(block_max, xx, xq, qq) -> QuantizeStats:
  """Merges per-block statistics: each block's sums are rescaled from its own max|x| to the global one."""
  finite = jnp.all(jnp.isfinite(xx)) & jnp.all(jnp.isfinite(block_max))
  amax = jnp.max(block_max)
  w = block_max / jnp.maximum(amax, quant.MIN_CLIP)
  xx = jnp.sum(w * w * xx)
  xq = jnp.sum(w * xq)
  qq = jnp.sum(qq)
  cos = xq / jnp.sqrt(jnp.maximum(xx * qq, quant.MIN_CLIP))
  deviation = jnp.clip(jnp.where((xx == 0) & (qq == 0), 0.0, 1.0 - cos), 0.0, 2.0)
  return QuantizeStats(amax, finite, deviation)


def reference_quantize(x, clip, key=None, *, with_stats=False):
  """Pure-jnp reference: ``quant.quantize`` and the statistics the kernel reports."""
  q = quant.quantize(x, clip, key=key)
  if not with_stats:
    return q
  return q, QuantizeStats(quant.max_abs(x), quant.all_finite(x), quant.cosine_deviation(x, q))
