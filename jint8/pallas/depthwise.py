"""Kernel: int8 depthwise conv forward and input gradient (one channel per group), channels last.

A depthwise conv has a reduction of only KH*KW products per output, too short for tensor cores, so each
program accumulates a (pixels x channels) tile in int32 on the vector units: per kernel tap a masked gather of
the source tile (contiguous channels) times the tap's weight row. The tap loop is unrolled, so all gathers of
a tile are in flight together (a rolled loop left the kernel waiting on one load at a time). The forward and
the input gradient share the kernel through ``geometry`` (for dgrad only the taps of each stride phase count;
the loop runs to the largest phase's count and masks the rest).
Reference: ``jint8.backend.XlaBackend.conv`` / ``conv_dgrad`` with ``feature_group_count == channels``.
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
class DepthwiseConfig:
  """Tile (pixels x channels) and launch parameters of the depthwise kernels."""
  block_m: int = 64
  block_c: int = 64
  num_warps: int = 4


def channel_block(channels: int, largest: int = 64) -> int:
  """The power-of-two channel block (16 to ``largest``) that pads ``channels`` least, larger on ties."""
  options = [b for b in (16, 32, 64, 128) if b <= largest]
  return min(options, key=lambda b: (common.cdiv(channels, b) * b, -b))


def pick_config(rows: int, channels: int) -> DepthwiseConfig:
  block_c = channel_block(channels)
  return DepthwiseConfig(common.pow2_block(rows, 16, 4096 // block_c), block_c, 4)


def _kernel(src_ref, w_ref, table_ref, scale_ref, out_ref, *, plan: geo.ConvPlan, channels,
            cfg: DepthwiseConfig, interpret: bool):
  bm, bc = cfg.block_m, cfg.block_c
  c_tiles = common.cdiv(channels, bc)
  m_tiles = common.cdiv(plan.rows_per_phase, bm)
  pid = pl.program_id(0)
  c_tile, rest = geo.rem(pid, c_tiles), geo.div(pid, c_tiles)
  m_tile, phase = geo.rem(rest, m_tiles), geo.div(rest, m_tiles)
  r = geo.phase_rows(plan, table_ref, phase, m_tile * bm + lax.iota(jnp.int32, bm))
  chans = c_tile * bc + lax.iota(jnp.int32, bc)
  c_ok = chans < channels
  max_h, max_w = (max(p[3] for p in axis.phases) for axis in (plan.h, plan.w))
  uniform = all(p[3] == max_h for p in plan.h.phases) and all(p[3] == max_w for p in plan.w.phases)
  acc = jnp.zeros((bm, bc), jnp.int32)
  for jh in range(max_h):
    for jw in range(max_w):
      tap_ok = True if uniform else (jh < r.count_h) & (jw < r.count_w)
      pixel, ok = geo.source_pixel(plan, r.image, r.h_base + jh * plan.h.c, r.w_base + jw * plan.w.c)
      mask = (ok & r.ok & tap_ok)[:, None] & c_ok[None, :]
      a = common.gather(src_ref, pixel[:, None] * channels + chans[None, :], mask).astype(jnp.int32)
      kh, kw = r.tap0_h + jh * plan.h.tap_step, r.tap0_w + jw * plan.w.tap_step
      w = common.load(w_ref.at[kh * plan.w.taps + kw, pl.ds(c_tile * bc, bc)], c_ok & tap_ok)
      acc = acc + a * w.astype(jnp.int32)[None, :]
  mask = r.ok[:, None] & c_ok[None, :]
  common.scatter(out_ref, r.out_pixel[:, None] * channels + chans[None, :],
                 backend.rescale(acc.astype(jnp.float32), scale_ref).astype(out_ref.dtype), mask,
                 interpret=interpret)


def _depthwise(src, w2, plan: geo.ConvPlan, scale, *, interpret, config, out_dtype):
  channels = src.shape[-1]
  cfg = config or pick_config(plan.rows_per_phase, channels)
  out_size = plan.batch * plan.h.out_size * plan.w.out_size * channels
  for what, size in (('source', src.size), ('output', out_size)):
    if size >= 2 ** 31:
      raise ValueError(f'the Pallas depthwise conv indexes with int32; its {what} has {size} elements')
  grid = (plan.num_phases * common.cdiv(plan.rows_per_phase, cfg.block_m) * common.cdiv(channels, cfg.block_c),)
  kernel = functools.partial(_kernel, plan=plan, channels=channels, cfg=cfg, interpret=interpret)
  out = common.call(kernel, out_shape=jax.ShapeDtypeStruct((out_size,), out_dtype), grid=grid,
                    interpret=interpret, num_warps=cfg.num_warps, num_stages=2, name='jint8_depthwise')(
                        src.reshape(-1), w2, plan.table(), backend.scale_factors(scale))
  return out.reshape(plan.batch, plan.h.out_size, plan.w.out_size, channels)


def _check(lhs, rhs, geometry: backend.ConvGeometry):
  if lhs.ndim != 4 or rhs.ndim != 4 or geometry.ndim != 2:
    raise ValueError(f'the Pallas depthwise kernels take 2-D convs, got operands {lhs.shape}, {rhs.shape}')
  if not backend.is_depthwise(lhs.shape[-1], rhs.shape, geometry.feature_group_count):
    raise ValueError(f'not a depthwise conv: operands {lhs.shape}, {rhs.shape}, '
                     f'{geometry.feature_group_count} groups')


def depthwise_forward(x, w, geometry: backend.ConvGeometry, scale, *, interpret: bool,
                      config: DepthwiseConfig | None = None, out_dtype=jnp.float32):
  """Depthwise conv of int8 ``x [N, H, W, C]`` and ``w [KH, KW, 1, C]``: ``[N, OH, OW, C]`` in ``out_dtype``."""
  _check(x, w, geometry)
  (n, h, wd, c), (kh, kw) = x.shape, w.shape[:2]
  oh, ow = geometry.out_spatial((h, wd), (kh, kw))
  (sh, sw), ((ph, _), (pw, _)), (dh, dw) = geometry.window_strides, geometry.padding, geometry.rhs_dilation
  plan = geo.ConvPlan(n, geo.forward_axis(h, oh, kh, sh, ph, dh), geo.forward_axis(wd, ow, kw, sw, pw, dw))
  return _depthwise(x, w.reshape(kh * kw, c), plan, scale, interpret=interpret, config=config,
                    out_dtype=out_dtype)


def depthwise_dgrad(g, w, geometry: backend.ConvGeometry, in_spatial, scale, *, interpret: bool,
                    config: DepthwiseConfig | None = None, out_dtype=jnp.float32):
  """Input gradient of a depthwise conv from int8 ``g [N, OH, OW, C]``: ``[N, H, W, C]`` in ``out_dtype``."""
  _check(g, w, geometry)
  (n, oh, ow, c), (kh, kw) = g.shape, w.shape[:2]
  h, wd = in_spatial
  (sh, sw), ((ph, _), (pw, _)), (dh, dw) = geometry.window_strides, geometry.padding, geometry.rhs_dilation
  plan = geo.ConvPlan(n, geo.dgrad_axis(h, oh, kh, sh, ph, dh), geo.dgrad_axis(wd, ow, kw, sw, pw, dw))
  return _depthwise(g, w.reshape(kh * kw, c), plan, scale, interpret=interpret, config=config,
                    out_dtype=out_dtype)
