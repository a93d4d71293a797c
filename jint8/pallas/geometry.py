"""Index maps of the implicit-GEMM conv kernels: which source pixel and kernel tap feed each output pixel.

Along one spatial axis an output row ``r`` of phase ``p`` reads the source at ``r * a + b0[p] + j * c`` with
kernel index ``tap0[p] + j * tap_step``, ``j < count[p]``, and is written at ``r * out_stride + p``.

- Forward conv: one phase; ``src = o * stride - pad + k * dilation``.
- Input gradient (dgrad) of a strided conv: the input pixels ``i * stride + p`` of phase ``p`` receive only the
  taps ``k`` with ``(p + pad - k * dilation) % stride == 0``, an arithmetic progression. Splitting the output
  by phase runs exactly those taps, so a stride-2 2-D dgrad does a quarter of the work of masking a dense
  zero-inserted input, and no divisibility test is left in the kernel.

Kernels read a phase's ``(rows, b0, tap0, count)`` for both axes from a small int32 table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class AxisPlan:
  """One spatial axis of an implicit-GEMM conv (see the module docstring)."""
  src_size: int
  out_size: int
  taps: int
  a: int
  c: int
  tap_step: int
  out_stride: int
  phases: tuple[tuple[int, int, int, int], ...]  # per phase: (rows, b0, tap0, count)

  @property
  def max_rows(self) -> int:
    return max(p[0] for p in self.phases)


def forward_axis(in_size: int, out_size: int, taps: int, stride: int, pad_lo: int, dilation: int) -> AxisPlan:
  return AxisPlan(in_size, out_size, taps, stride, dilation, 1, 1, ((out_size, -pad_lo, 0, taps),))


def dgrad_axis(in_size: int, out_size: int, taps: int, stride: int, pad_lo: int, dilation: int) -> AxisPlan:
  """The input-gradient axis: source = the conv output (size ``out_size``), written = the conv input."""
  g = math.gcd(stride, dilation)
  phases = []
  for p in range(stride):
    rows = max(0, -(-(in_size - p) // stride))
    valid = [k for k in range(taps) if (p + pad_lo - k * dilation) % stride == 0]
    if valid:
      tap0 = valid[0]
      phases.append((rows, (p + pad_lo - tap0 * dilation) // stride, tap0, len(valid)))
    else:
      phases.append((rows, 0, 0, 0))
  return AxisPlan(out_size, in_size, taps, 1, -(dilation // g), stride // g, stride, tuple(phases))


@dataclasses.dataclass(frozen=True)
class ConvPlan:
  """Both spatial axes (``h``, ``w``) and the batch size of an implicit-GEMM conv."""
  batch: int
  h: AxisPlan
  w: AxisPlan

  @property
  def num_phases(self) -> int:
    return len(self.h.phases) * len(self.w.phases)

  @property
  def rows_per_phase(self) -> int:
    return self.batch * self.h.max_rows * self.w.max_rows

  def table(self) -> jax.Array:
    """int32 ``[num_phases, 8]``: ``(rows, b0, tap0, count)`` of the h axis, then of the w axis."""
    rows = [ph + pw for ph in self.h.phases for pw in self.w.phases]
    return jnp.asarray(np.array(rows, np.int32))


class PhaseRows(NamedTuple):
  """Per-row quantities of one block of output rows of one phase (all ``[block]`` int32 except counts)."""
  ok: jax.Array        # the row exists
  image: jax.Array     # batch index
  h_base: jax.Array    # source h of tap j = 0
  w_base: jax.Array
  out_pixel: jax.Array  # flat output pixel index n * H_out * W_out + h * W_out + w
  count_h: jax.Array   # scalar: taps of this phase along h
  count_w: jax.Array
  tap0_h: jax.Array    # scalar: first kernel index along h
  tap0_w: jax.Array


def div(x, d):
  """``x // d`` for non-negative int32 ``x`` and positive ``d`` (C division: no sign fix-ups in Triton)."""
  x = jnp.asarray(x, jnp.int32)
  return lax.div(x, jnp.broadcast_to(jnp.asarray(d, jnp.int32), x.shape))


def rem(x, d):
  """``x % d`` for non-negative int32 ``x`` and positive ``d``."""
  x = jnp.asarray(x, jnp.int32)
  return lax.rem(x, jnp.broadcast_to(jnp.asarray(d, jnp.int32), x.shape))


def phase_rows(plan: ConvPlan, table_ref, phase, rows) -> PhaseRows:
  """The ``PhaseRows`` of the output rows ``rows`` (int32 ``[block]``) of ``phase`` (a scalar)."""
  h, w = plan.h, plan.w
  rows_h, b0_h, tap0_h, count_h, rows_w, b0_w, tap0_w, count_w = [table_ref[phase, c] for c in range(8)]
  phase_h, phase_w = div(phase, len(w.phases)), rem(phase, len(w.phases))
  image = div(rows, h.max_rows * w.max_rows)
  i = rem(div(rows, w.max_rows), h.max_rows)
  j = rem(rows, w.max_rows)
  ok = (image < plan.batch) & (i < rows_h) & (j < rows_w)
  out_pixel = (image * h.out_size + i * h.out_stride + phase_h) * w.out_size + j * w.out_stride + phase_w
  return PhaseRows(ok, image, i * h.a + b0_h, j * w.a + b0_w, out_pixel, count_h, count_w, tap0_h, tap0_w)


def source_pixel(plan: ConvPlan, image, src_h, src_w):
  """Flat source pixel index ``(n * H_src + h) * W_src + w`` and whether it lies inside the source."""
  ok = (src_h >= 0) & (src_h < plan.h.src_size) & (src_w >= 0) & (src_w < plan.w.src_size)
  return (image * plan.h.src_size + src_h) * plan.w.src_size + src_w, ok
