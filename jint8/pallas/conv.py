"""Kernel: int8 conv forward and input gradient (dgrad) as one implicit GEMM, channels last.

GEMM rows are output pixels (of one phase, see ``geometry``), columns the output channels of a group, and the
reduction runs over (kernel tap, source channel). Each A tile is gathered straight from the channels-last
source (input for the forward, output gradient for dgrad): row offsets come from the pixel and tap, columns are
contiguous channels, out-of-image taps are masked to zero; no im2col buffer exists in device memory. B is the
kernel rearranged K-major, ``[groups * columns, taps * source_channels_per_group]`` (a few MB at most). int32
accumulation, float32 ``backend.rescale`` epilogue rounded to the output dtype (float32 or bfloat16), scattered
channels-last store.

When a group's source channels are a multiple of the K block, a K step stays inside one tap and rows need one
offset each ("aligned"); otherwise every (row, k) element decodes its own tap (first layers, small groups).
Reference: ``jint8.backend.XlaBackend.conv`` / ``conv_dgrad``.
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
class ConvConfig:
  """Tiles (rows x columns x reduction) and launch parameters of the implicit-GEMM conv."""
  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3


def pick_config(rows: int, columns: int, group_in: int, taps: int) -> ConvConfig:
  """Tiles for ``rows`` output pixels, ``columns`` output channels per group, ``group_in`` source channels.

  8 warps for full 128x128x128 tiles of convs with several taps (faster than 4 on ResNet-50's 3x3 layers in
  bench/kernels.py), 4 otherwise.
  """
  block_m = common.pow2_block(rows, 16, 128)
  block_n = common.pow2_block(columns, 16, 128)
  for block_k in (128, 64, 32):
    if group_in % block_k == 0:
      break
  else:
    block_k = 32 if taps * group_in <= 256 else 64
  num_warps = 8 if taps > 1 and block_m * block_n * block_k == 128 ** 3 else 4
  return ConvConfig(block_m, block_n, block_k, num_warps, 3)


def _kernel(src_ref, w_ref, table_ref, scale_ref, out_ref, *, plan: geo.ConvPlan, channels, group_in,
            group_out, groups, cfg: ConvConfig, interpret: bool):
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  aligned = group_in % bk == 0
  n_tiles = common.cdiv(group_out, bn)
  m_tiles = common.cdiv(plan.rows_per_phase, bm)
  pid = pl.program_id(0)
  col_tile = geo.rem(pid, groups * n_tiles)
  rest = geo.div(pid, groups * n_tiles)
  phase, m_tile = geo.div(rest, m_tiles), geo.rem(rest, m_tiles)
  group, n_tile = geo.div(col_tile, n_tiles), geo.rem(col_tile, n_tiles)

  r = geo.phase_rows(plan, table_ref, phase, m_tile * bm + lax.iota(jnp.int32, bm))
  cols = n_tile * bn + lax.iota(jnp.int32, bn)
  col_ok = cols < group_out
  w_row0 = group * group_out + n_tile * bn
  taps = r.count_h * r.count_w
  count_w = jnp.maximum(r.count_w, 1)
  channel0 = group * group_in
  kernel_w = plan.w.taps
  reduction = plan.h.taps * kernel_w * group_in

  if aligned:
    blocks_per_tap = group_in // bk

    def step(t, acc):
      tap, block = geo.div(t, blocks_per_tap), geo.rem(t, blocks_per_tap)
      jh, jw = geo.div(tap, count_w), geo.rem(tap, count_w)
      pixel, ok = geo.source_pixel(plan, r.image, r.h_base + jh * plan.h.c, r.w_base + jw * plan.w.c)
      mask = jnp.broadcast_to((ok & r.ok)[:, None], (bm, bk))
      offsets = (pixel * channels + channel0 + block * bk)[:, None] + lax.iota(jnp.int32, bk)[None, :]
      a = common.gather(src_ref, offsets, mask)
      kh, kw = r.tap0_h + jh * plan.h.tap_step, r.tap0_w + jw * plan.w.tap_step
      k0 = (kh * kernel_w + kw) * group_in + block * bk
      b_mask = None if group_out % bn == 0 else jnp.broadcast_to(col_ok[:, None], (bn, bk))
      b = common.load(w_ref.at[pl.ds(w_row0, bn), pl.ds(k0, bk)], b_mask)
      return acc + lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)

    steps = taps * blocks_per_tap
  else:
    size = taps * group_in

    def step(t, acc):
      ks = t * bk + lax.iota(jnp.int32, bk)
      k_ok = ks < size
      tap, ci = geo.div(ks, group_in), geo.rem(ks, group_in)
      jh, jw = geo.div(tap, count_w), geo.rem(tap, count_w)
      pixel, ok = geo.source_pixel(plan, r.image[:, None], r.h_base[:, None] + (jh * plan.h.c)[None, :],
                                   r.w_base[:, None] + (jw * plan.w.c)[None, :])
      mask = ok & r.ok[:, None] & k_ok[None, :]
      offsets = pixel * channels + channel0 + ci[None, :]
      a = common.gather(src_ref, offsets, mask)
      kh, kw = r.tap0_h + jh * plan.h.tap_step, r.tap0_w + jw * plan.w.tap_step
      b_mask = col_ok[:, None] & k_ok[None, :]
      b_offsets = (w_row0 + lax.iota(jnp.int32, bn))[:, None] * reduction + (
          (kh * kernel_w + kw) * group_in + ci)[None, :]
      b = common.gather(w_ref, b_offsets, b_mask)
      return acc + lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)

    steps = geo.div(size + bk - 1, bk)

  acc = lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.int32))
  out = backend.rescale(acc.astype(jnp.float32), scale_ref).astype(out_ref.dtype)
  mask = r.ok[:, None] & col_ok[None, :]
  offsets = r.out_pixel[:, None] * (groups * group_out) + (group * group_out + cols)[None, :]
  common.scatter(out_ref, offsets, out, mask, interpret=interpret)


def _implicit_gemm(src, w, plan: geo.ConvPlan, *, group_in, group_out, groups, scale, interpret, config,
                   out_dtype):
  channels = src.shape[-1]
  cfg = config or pick_config(plan.rows_per_phase, group_out, group_in, plan.h.taps * plan.w.taps)
  out_size = plan.batch * plan.h.out_size * plan.w.out_size * groups * group_out
  for what, size in (('source', src.size), ('kernel', w.size), ('output', out_size)):
    if size >= 2 ** 31:
      raise ValueError(f'the Pallas conv indexes with int32; its {what} has {size} elements')
  w = w if group_in % cfg.block_k == 0 else w.reshape(-1)
  grid = (plan.num_phases * common.cdiv(plan.rows_per_phase, cfg.block_m) * groups
          * common.cdiv(group_out, cfg.block_n),)
  kernel = functools.partial(_kernel, plan=plan, channels=channels, group_in=group_in, group_out=group_out,
                             groups=groups, cfg=cfg, interpret=interpret)
  out = common.call(kernel, out_shape=jax.ShapeDtypeStruct((out_size,), out_dtype), grid=grid,
                    interpret=interpret, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    name='jint8_conv')(src.reshape(-1), w, plan.table(),
                                       backend.scale_factors(scale))
  return out.reshape(plan.batch, plan.h.out_size, plan.w.out_size, groups * group_out)


def _check_2d(lhs, rhs, geometry: backend.ConvGeometry):
  if lhs.ndim != 4 or rhs.ndim != 4 or geometry.ndim != 2:
    raise ValueError(f'the Pallas conv kernels take 2-D convs, got operands {lhs.shape}, {rhs.shape}')
  if lhs.dtype != jnp.int8 or rhs.dtype != jnp.int8:
    raise TypeError(f'int8 conv takes int8 operands, got {lhs.dtype} and {rhs.dtype}')


def conv_forward(x, w, geometry: backend.ConvGeometry, scale, *, interpret: bool,
                 config: ConvConfig | None = None, out_dtype=jnp.float32):
  """Forward conv of int8 ``x [N, H, W, Cin]`` and ``w [KH, KW, Cin/G, Cout]``: ``[N, OH, OW, Cout]`` in
  ``out_dtype`` (the float32 product rounded once)."""
  _check_2d(x, w, geometry)
  (n, h, wd, _), (kh, kw, group_in, cout) = x.shape, w.shape
  groups = geometry.feature_group_count
  backend.check_terms(kh * kw * group_in, 'int8 conv forward')
  oh, ow = geometry.out_spatial((h, wd), (kh, kw))
  (sh, sw), ((ph, _), (pw, _)), (dh, dw) = geometry.window_strides, geometry.padding, geometry.rhs_dilation
  plan = geo.ConvPlan(n, geo.forward_axis(h, oh, kh, sh, ph, dh), geo.forward_axis(wd, ow, kw, sw, pw, dw))
  w2 = jnp.transpose(w, (3, 0, 1, 2)).reshape(cout, kh * kw * group_in)
  return _implicit_gemm(x, w2, plan, group_in=group_in, group_out=cout // groups, groups=groups, scale=scale,
                        interpret=interpret, config=config, out_dtype=out_dtype)


def conv_dgrad(g, w, geometry: backend.ConvGeometry, in_spatial, scale, *, interpret: bool,
               config: ConvConfig | None = None, out_dtype=jnp.float32):
  """Input gradient from int8 ``g [N, OH, OW, Cout]`` and ``w``: ``[N, H, W, Cin]`` in ``out_dtype``."""
  _check_2d(g, w, geometry)
  (n, oh, ow, cout), (kh, kw, group_in, _) = g.shape, w.shape
  groups = geometry.feature_group_count
  group_out = cout // groups
  backend.check_terms(kh * kw * group_out, 'int8 conv dgrad')
  h, wd = in_spatial
  (sh, sw), ((ph, _), (pw, _)), (dh, dw) = geometry.window_strides, geometry.padding, geometry.rhs_dilation
  plan = geo.ConvPlan(n, geo.dgrad_axis(h, oh, kh, sh, ph, dh), geo.dgrad_axis(wd, ow, kw, sw, pw, dw))
  w2 = w.reshape(kh, kw, group_in, groups, group_out).transpose(3, 2, 0, 1, 4)
  w2 = w2.reshape(groups * group_in, kh * kw * group_out)
  return _implicit_gemm(g, w2, plan, group_in=group_out, group_out=group_in, groups=groups, scale=scale,
                        interpret=interpret, config=config, out_dtype=out_dtype)
