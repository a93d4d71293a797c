"""Kernel: int8 depthwise conv weight gradient, ``dw[tap, c] = sum over output pixels of x_tap * g``.

Each program owns a channel block and a chunk of output pixels (at most ``jint8.backend.MAX_EXACT_TERMS``, so
the int32 sums are exact); per pixel block it loads the gradient tile once and, for every tap, gathers the
matching input tile and adds the products elementwise to that tap's (pixels x channels) accumulator, which is
summed over pixels once at the end (a reduction across threads per block and tap was the bottleneck).
Partials of the chunks are added in float32.
Reference: ``jint8.backend.XlaBackend.conv_wgrad`` with one channel per group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jint8 import backend
from jint8.pallas import common
from jint8.pallas import geometry as geo
from jint8.pallas.depthwise import channel_block


def _kernel(x_ref, g_ref, out_ref, *, plan: geo.ConvPlan, channels, pixels, chunk, block_m, block_c):
  bm, bc = block_m, block_c
  c_tiles = common.cdiv(channels, bc)
  pid = pl.program_id(0)
  c_tile, split = geo.rem(pid, c_tiles), geo.div(pid, c_tiles)
  chans = c_tile * bc + lax.iota(jnp.int32, bc)
  c_ok = chans < channels
  start = split * chunk
  out_h, out_w = plan.h.out_size, plan.w.out_size
  b_h, b_w = plan.h.phases[0][1], plan.w.phases[0][1]
  taps = [(kh, kw) for kh in range(plan.h.taps) for kw in range(plan.w.taps)]

  def step(t, accs):
    p = start + t * bm + lax.iota(jnp.int32, bm)
    p_ok = p < pixels
    g_mask = None if pixels % bm == 0 and channels % bc == 0 else p_ok[:, None] & c_ok[None, :]
    g = common.load(g_ref.at[pl.ds(start + t * bm, bm), pl.ds(c_tile * bc, bc)], g_mask).astype(jnp.int32)
    image, oh, ow = geo.div(p, out_h * out_w), geo.rem(geo.div(p, out_w), out_h), geo.rem(p, out_w)
    new = []
    for acc, (kh, kw) in zip(accs, taps):
      pixel, ok = geo.source_pixel(plan, image, oh * plan.h.a + b_h + kh * plan.h.c,
                                   ow * plan.w.a + b_w + kw * plan.w.c)
      mask = (ok & p_ok)[:, None] & c_ok[None, :]
      x = common.gather(x_ref, pixel[:, None] * channels + chans[None, :], mask).astype(jnp.int32)
      new.append(acc + x * g)
    return tuple(new)

  steps = geo.div(jnp.minimum(chunk, pixels - start) + bm - 1, bm)
  accs = lax.fori_loop(0, steps, step, tuple(jnp.zeros((bm, bc), jnp.int32) for _ in taps))
  for t, acc in enumerate(accs):
    common.store(out_ref.at[split, jnp.int32(t), pl.ds(c_tile * bc, bc)],
                 jnp.sum(acc, axis=0).astype(jnp.float32), c_ok)


def depthwise_wgrad(x, g, geometry: backend.ConvGeometry, kernel_spatial, scale, *, interpret: bool,
                    block_m: int | None = None, max_terms: int = backend.MAX_EXACT_TERMS):
  """Depthwise kernel gradient from int8 ``x [N, H, W, C]``, ``g [N, OH, OW, C]``: float32 ``[KH, KW, 1, C]``."""
  if x.ndim != 4 or g.ndim != 4 or geometry.ndim != 2:
    raise ValueError(f'the Pallas depthwise wgrad takes 2-D convs, got operands {x.shape}, {g.shape}')
  (n, h, wd, c), (_, oh, ow, cout) = x.shape, g.shape
  if not backend.is_depthwise(c, (1, cout), geometry.feature_group_count):
    raise ValueError(f'not a depthwise conv: operands {x.shape}, {g.shape}, '
                     f'{geometry.feature_group_count} groups')
  if x.size >= 2 ** 31 or g.size >= 2 ** 31:
    raise ValueError('the Pallas depthwise wgrad indexes with int32; its operands are too large')
  kh, kw = kernel_spatial
  (sh, sw), ((ph, _), (pw, _)), (dh, dw) = geometry.window_strides, geometry.padding, geometry.rhs_dilation
  plan = geo.ConvPlan(n, geo.forward_axis(h, oh, kh, sh, ph, dh), geo.forward_axis(wd, ow, kw, sw, pw, dw))
  block_c = channel_block(c, 32)
  # Keep the per-tap accumulators at about 64 registers a thread (4 warps).
  rows = common.pow2_at_most(max(16, 8192 // (kh * kw * block_c)))
  block_m = block_m or common.pow2_block(n * oh * ow, 16, rows)
  pixels = n * oh * ow
  c_tiles = common.cdiv(c, block_c)
  chunk, splits = common.split_reduction(pixels, c_tiles, block_m, max_terms)
  kernel = functools.partial(_kernel, plan=plan, channels=c, pixels=pixels, chunk=chunk, block_m=block_m,
                             block_c=block_c)
  partial = common.call(
      kernel, out_shape=jax.ShapeDtypeStruct((splits, kh * kw, c), jnp.float32), grid=(splits * c_tiles,),
      interpret=interpret, num_warps=4, num_stages=2, name='jint8_depthwise_wgrad')(
          x.reshape(-1), g.reshape(pixels, c))
  dw = backend.rescale(jnp.sum(partial, axis=0), backend.scale_factors(scale))
  return dw.reshape(kh, kw, 1, c)
