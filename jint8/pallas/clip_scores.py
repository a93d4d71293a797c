"""Kernel: one reduction pass over a gradient for DSGC: max|g|, non-finite count and candidate-clip scores.

Without candidates the pass gives max|g| and whether ``g`` is finite. With candidate clips ``c_k`` (and max|g|
from a first pass) it gives, for every candidate at once, the sums <g, q_k> and <q_k, q_k> of the
round-to-nearest quantization ``q_k`` of ``g / max|g|`` and the shared <g, g>; ``clip_scores`` turns them into
cosine deviations. Each program loops over a contiguous chunk and writes one partial per output, so the
partials stay small. As in the reference compiled by XLA, the divisions are products with reciprocals
computed outside the kernel. Reference: ``jint8.quant.score_clips`` / ``quant.dsgc_search``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jint8 import quant
from jint8.pallas import common
from jint8.pallas import data_parallel

MAX_PROGRAMS = 1024


def _kernel(g_ref, inv_amax_ref, inv_rel_ref, *out_refs, n, sub, steps, num_clips, interpret):
  pid = pl.program_id(0)
  start = pid * steps * sub

  def load(s):
    index = start + s * sub + lax.iota(jnp.int32, sub)
    return common.load(g_ref.at[pl.ds(start + s * sub, sub)], index < n).astype(jnp.float32)

  if not num_clips:
    amax_out, nonfinite_out = out_refs

    def reduce_abs(s, carry):
      g = load(s)
      return (jnp.maximum(carry[0], jnp.max(jnp.abs(g))),
              carry[1] + jnp.sum(jnp.where(jnp.isfinite(g), 0.0, 1.0)))

    amax, nonfinite = lax.fori_loop(0, steps, reduce_abs, (jnp.float32(0), jnp.float32(0)))
    amax_out[pid] = amax
    nonfinite_out[pid] = nonfinite
    return

  gq_out, qq_out, gg_out = out_refs
  inv_amax = inv_amax_ref[0]
  inv_rel = inv_rel_ref[...]

  def score(s, carry):
    gq, qq, gg = carry
    g = load(s) * inv_amax
    q = common.round_half_even(jnp.clip(g[:, None] * inv_rel[None, :], -1.0, 1.0) * quant.QMAX,
                               interpret=interpret)
    return gq + jnp.sum(g[:, None] * q, axis=0), qq + jnp.sum(q * q, axis=0), gg + jnp.sum(g * g)

  zeros = jnp.zeros((num_clips,), jnp.float32)
  gq, qq, gg = lax.fori_loop(0, steps, score, (zeros, zeros, jnp.float32(0)))
  common.store(gq_out.at[pid, pl.ds(0, num_clips)], gq)
  common.store(qq_out.at[pid, pl.ds(0, num_clips)], qq)
  gg_out[pid] = gg


def _launch(g, inv_amax, inv_rel, *, num_clips, sub, interpret):
  """The per-program partials of one pass over ``g`` (over each device's batch shard under data parallelism:
  the partials of all shards together are those of a differently chunked pass)."""
  if g.size >= 2 ** 31:
    raise ValueError(f'the Pallas clip search indexes with int32; {g.size} elements is too many')

  def run(g, inv_amax, inv_rel):
    return _launch_local(g, inv_amax, inv_rel, num_clips=num_clips, sub=sub, interpret=interpret)

  return data_parallel.map_batch(run, (g,), (inv_amax, inv_rel))


def _launch_local(g, inv_amax, inv_rel, *, num_clips, sub, interpret):
  g = g.reshape(-1)
  n = g.size
  sub = min(sub, common.pow2_block(n, 16, sub))
  steps = common.cdiv(common.cdiv(n, sub), MAX_PROGRAMS)
  programs = common.cdiv(n, sub * steps)
  if num_clips:
    out_shape = (jax.ShapeDtypeStruct((programs, num_clips), jnp.float32),) * 2 + (
        jax.ShapeDtypeStruct((programs,), jnp.float32),)
  else:
    out_shape = (jax.ShapeDtypeStruct((programs,), jnp.float32),) * 2
  kernel = functools.partial(_kernel, n=n, sub=sub, steps=steps, num_clips=num_clips, interpret=interpret)
  return common.call(kernel, out_shape=out_shape, grid=(programs,), interpret=interpret, num_warps=4,
                     num_stages=2, name='jint8_clip_scores')(
                         g, inv_amax.reshape(1), inv_rel)


def abs_max(g: jax.Array, *, interpret: bool, sub: int = 2048):
  """``(max|g|, all finite)`` in one pass."""
  zero = jnp.zeros((1,), jnp.float32)
  amax, nonfinite = _launch(g, zero, zero, num_clips=0, sub=sub, interpret=interpret)
  return jnp.max(amax), jnp.sum(nonfinite) == 0


def clip_scores(g: jax.Array, amax: jax.Array, clips: jax.Array, *, interpret: bool, sub: int = 256):
  """Cosine deviation of ``g`` against its round-to-nearest quantization at each clip (``quant.score_clips``).

  ``amax`` is max|g| (from ``abs_max``); all clips are scored in one pass over ``g``.
  """
  amax = jnp.maximum(jnp.asarray(amax, jnp.float32), quant.MIN_CLIP)
  num = clips.shape[0]
  width = common.pow2_at_least(max(num, 2))
  inv_rel = 1.0 / (quant.safe_clip(clips) / amax)
  inv_rel = jnp.concatenate([inv_rel, jnp.ones((width - num,), jnp.float32)])
  gq, qq, gg = _launch(g, 1.0 / amax, inv_rel, num_clips=width, sub=sub, interpret=interpret)
  gq, qq, gg = jnp.sum(gq, 0)[:num], jnp.sum(qq, 0)[:num], jnp.sum(gg)
  cos = gq / jnp.sqrt(jnp.maximum(gg * qq, quant.MIN_CLIP))
  return jnp.clip(jnp.where(gg == 0, 0.0, 1.0 - cos), 0.0, 2.0)


def dsgc_search(g: jax.Array, ratios: np.ndarray, refine: int = 8, *, interpret: bool) -> quant.ClipSearch:
  """``quant.dsgc_search`` with max|g| from ``abs_max`` and the candidate scores from ``clip_scores``: three
  passes over ``g`` (two with ``refine == 0``)."""
  amax, _ = abs_max(g, interpret=interpret)

  def score(g, clips):
    return clip_scores(g, amax, clips, interpret=interpret)

  return quant.dsgc_search(g, ratios, refine, amax=amax, score=score)


def reference_abs_max(g):
  """Pure-jnp reference of ``abs_max``."""
  return quant.max_abs(g), quant.all_finite(g)
