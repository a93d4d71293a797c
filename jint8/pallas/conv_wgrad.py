"""Kernel: int8 conv weight gradient (wgrad) as an implicit GEMM with a split reduction.

For each kernel tap, ``dw[tap] = x_tap^T g``: rows are the input channels of a group, columns its output
channels, and the reduction runs over the N*OH*OW output pixels; ``x_tap`` is gathered from ``x`` on the fly
(the source pixel of each output pixel under that tap, zero outside the image). The reduction is split into
chunks of at most ``jint8.backend.MAX_EXACT_TERMS`` pixels, so the int32 accumulators never overflow, and into
enough chunks to fill the GPU; each chunk writes a float32 partial and the partials are added in float32.

Operand layouts (``WgradConfig.layout``):
- ``"kmajor"``: ``x`` and ``g`` are first transposed to channel-major ``[C, pixels]`` (one XLA pass over the
  int8 data each), so both tiles are K-major, which Hopper's 8-bit tensor cores need for full speed; but the
  tap shift makes the ``x`` gathers unaligned (byte loads).
- ``"mnmajor"``: both tiles come straight from the channels-last tensors (pixel-major, 16-byte loads) and are
  transposed in the dot; no extra pass, slower products.
- ``"mixed"``: ``x`` pixel-major (aligned gathers), ``g`` transposed to K-major (dense tiles).
- ``"swapped"``: as ``"mixed"`` with the operands swapped, ``dw^T = g^T x_tap``: the K-major ``g`` tile is the
  left operand and the pixel-major ``x`` tile the right one (in a plain GEMM a K x N right operand is faster
  than a pixel-major left one).
- ``"register"``: as ``"mixed"``, with the ``x`` tile transposed in registers (a masking select keeps Triton
  from folding the transpose into a pixel-major shared-memory operand, which 8-bit wgmma cannot read), meant
  to let the left operand reach the tensor cores from registers (not checked in the machine code).
``"register"`` is the default: the fastest on ResNet-50's layers in bench/kernels.py (bench/RESULTS.md).
Reference: ``jint8.backend.XlaBackend.conv_wgrad``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jint8 import backend
from jint8.pallas import common
from jint8.pallas import geometry as geo


@dataclasses.dataclass(frozen=True)
class WgradConfig:
  """Tiles (input channels x output channels x pixels), layout and launch parameters of the wgrad."""
  block_m: int = 128
  block_n: int = 128
  block_k: int = 128
  layout: str = 'register'
  num_warps: int = 4
  num_stages: int = 3

  @property
  def x_kmajor(self) -> bool:
    return self.layout == 'kmajor'

  @property
  def g_kmajor(self) -> bool:
    return self.layout != 'mnmajor'


LAYOUTS = ('register', 'swapped', 'mixed', 'kmajor', 'mnmajor')


def pick_config(group_in: int, group_out: int, layout: str | None = None) -> WgradConfig:
  """Tiles for a group of ``group_in`` x ``group_out`` channels, by default in the fastest layout measured."""
  layout = layout or 'register'
  if layout not in LAYOUTS:
    raise ValueError(f'wgrad layout must be one of {LAYOUTS}, got {layout!r}')
  return WgradConfig(common.pow2_block(group_in, 16, 128), common.pow2_block(group_out, 16, 128), 128, layout)


def _kernel(x_ref, g_ref, out_ref, *, plan: geo.ConvPlan, in_channels, group_in,
            group_out, groups, pixels, chunk, cfg: WgradConfig):
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  kernel_w = plan.w.taps
  m_tiles, n_tiles = common.cdiv(group_in, bm), common.cdiv(group_out, bn)
  pid = pl.program_id(0)
  n_tile, rest = geo.rem(pid, n_tiles), geo.div(pid, n_tiles)
  m_tile, rest = geo.rem(rest, m_tiles), geo.div(rest, m_tiles)
  group, rest = geo.rem(rest, groups), geo.div(rest, groups)
  num_taps = plan.h.taps * kernel_w
  tap, split = geo.rem(rest, num_taps), geo.div(rest, num_taps)
  kh, kw = geo.div(tap, kernel_w), geo.rem(tap, kernel_w)

  ci = m_tile * bm + lax.iota(jnp.int32, bm)
  ci_ok = ci < group_in
  in_channel = group * group_in + ci
  co_ok = n_tile * bn + lax.iota(jnp.int32, bn) < group_out
  out_col0 = group * group_out + n_tile * bn
  start = split * chunk
  in_pixels = plan.batch * plan.h.src_size * plan.w.src_size
  out_h, out_w = plan.h.out_size, plan.w.out_size
  b_h, b_w = plan.h.phases[0][1], plan.w.phases[0][1]

  def step(t, acc):
    k0 = start + t * bk
    p = k0 + lax.iota(jnp.int32, bk)
    p_ok = p < pixels
    image, oh, ow = geo.div(p, out_h * out_w), geo.rem(geo.div(p, out_w), out_h), geo.rem(p, out_w)
    pixel, ok = geo.source_pixel(plan, image, oh * plan.h.a + b_h + kh * plan.h.c,
                                 ow * plan.w.a + b_w + kw * plan.w.c)
    ok = ok & p_ok
    if cfg.x_kmajor:
      a = common.gather(x_ref, in_channel[:, None] * in_pixels + pixel[None, :], ci_ok[:, None] & ok[None, :])
    else:
      mask = ok[:, None] & ci_ok[None, :]
      a = common.gather(x_ref, pixel[:, None] * in_channels + in_channel[None, :], mask)
      if cfg.layout == 'register':
        a = jnp.where(mask.T, a.T, jnp.int8(0))
    dense = group_out % bn == 0 and pixels % bk == 0
    if cfg.g_kmajor:
      b = common.load(g_ref.at[pl.ds(out_col0, bn), pl.ds(k0, bk)],
                      None if dense else co_ok[:, None] & p_ok[None, :])
    else:
      b = common.load(g_ref.at[pl.ds(k0, bk), pl.ds(out_col0, bn)],
                      None if dense else p_ok[:, None] & co_ok[None, :])
    if cfg.layout == 'swapped':  # (co, ci) tile: transposed once after the loop
      return acc + lax.dot_general(b, a, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    contract = ((1 if cfg.x_kmajor or cfg.layout == 'register' else 0,), (1 if cfg.g_kmajor else 0,))
    return acc + lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.int32)

  steps = geo.div(jnp.minimum(chunk, pixels - start) + bk - 1, bk)
  shape = (bn, bm) if cfg.layout == 'swapped' else (bm, bn)
  acc = lax.fori_loop(0, steps, step, jnp.zeros(shape, jnp.int32))
  if cfg.layout == 'swapped':
    acc = acc.T
  mask = ci_ok[:, None] & co_ok[None, :]
  common.store(out_ref.at[split, tap, pl.ds(group * group_in + m_tile * bm, bm), pl.ds(n_tile * bn, bn)],
               acc.astype(jnp.float32), mask)


def conv_wgrad(x, g, geometry: backend.ConvGeometry, kernel_spatial, scale, *, interpret: bool,
               config: WgradConfig | None = None, max_terms: int = backend.MAX_EXACT_TERMS):
  """Kernel gradient from int8 ``x [N, H, W, Cin]``, ``g [N, OH, OW, Cout]``: float32 ``[KH, KW, Cin/G, Cout]``."""
  if x.ndim != 4 or g.ndim != 4 or geometry.ndim != 2:
    raise ValueError(f'the Pallas wgrad takes 2-D convs, got operands {x.shape}, {g.shape}')
  if x.dtype != jnp.int8 or g.dtype != jnp.int8:
    raise TypeError(f'int8 wgrad takes int8 operands, got {x.dtype} and {g.dtype}')
  (n, h, wd, cin), (_, oh, ow, cout) = x.shape, g.shape
  kh, kw = kernel_spatial
  groups = geometry.feature_group_count
  group_in, group_out = cin // groups, cout // groups
  for what, size in (('input', x.size), ('gradient', g.size)):
    if size >= 2 ** 31:
      raise ValueError(f'the Pallas wgrad indexes with int32; its {what} has {size} elements')
  (sh, sw), ((ph, _), (pw, _)), (dh, dw) = geometry.window_strides, geometry.padding, geometry.rhs_dilation
  plan = geo.ConvPlan(n, geo.forward_axis(h, oh, kh, sh, ph, dh), geo.forward_axis(wd, ow, kw, sw, pw, dw))
  cfg = config or pick_config(group_in, group_out)
  pixels = n * oh * ow
  tiles = kh * kw * groups * common.cdiv(group_in, cfg.block_m) * common.cdiv(group_out, cfg.block_n)
  chunk, splits = common.split_reduction(pixels, tiles, cfg.block_k, max_terms)
  x_op = (jnp.transpose(x, (3, 0, 1, 2)) if cfg.x_kmajor else x).reshape(-1)
  g_op = jnp.transpose(g, (3, 0, 1, 2)).reshape(cout, pixels) if cfg.g_kmajor else g.reshape(pixels, cout)
  kernel = functools.partial(_kernel, plan=plan, in_channels=cin, group_in=group_in,
                             group_out=group_out, groups=groups, pixels=pixels, chunk=chunk, cfg=cfg)
  partial = common.call(
      kernel, out_shape=jax.ShapeDtypeStruct((splits, kh * kw, cin, group_out), jnp.float32),
      grid=(splits * tiles,), interpret=interpret, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
      name='jint8_conv_wgrad')(x_op, g_op)
  dw = backend.rescale(jnp.sum(partial, axis=0), backend.scale_factors(scale))
  dw = dw.reshape(kh, kw, groups, group_in, group_out).transpose(0, 1, 3, 2, 4)
  return dw.reshape(kh, kw, group_in, cout)
