"""The Pallas GPU kernels behind the ``jint8.backend.Backend`` interface: ``PallasBackend`` (name ``"pallas"``).

``PallasBackend`` implements ``jint8.backend.Backend`` with the same semantics as ``XlaBackend``:

- ``search_clip``: ``clip_scores``, the DSGC search in three passes (search steps only).
- ``matmul``: ``gemm``, a K-major int8 GEMM.
- ``conv``: ``conv`` (implicit GEMM) / ``depthwise``, or XLA's int8 conv (``"vendor"``).
- ``conv_dgrad``: ``conv`` (implicit GEMM over stride phases) / ``depthwise``, or the vendor conv for stride 1.
- ``conv_wgrad``: ``conv_wgrad`` (split-K implicit GEMM, five operand layouts) / ``depthwise_wgrad``.

Choices are visible through ``PallasBackend.plan`` and set by the attributes ``conv_impl`` / ``dgrad_impl``
(``"auto"``, ``"pallas"``, ``"vendor"``) and ``wgrad_layout`` (``"auto"`` or one of
``conv_wgrad.LAYOUTS``), whose defaults come from the environment variables ``JINT8_CONV_IMPL``,
``JINT8_DGRAD_IMPL``, ``JINT8_WGRAD_LAYOUT``. ``"auto"`` runs the Pallas kernels, which write the model's dtype
where XLA's int8 conv writes float32 (bench/RESULTS.md). ``"vendor"`` applies where XLA takes the int8 conv
(one group, channels a multiple of 4; stride 1 for dgrad); elsewhere the kernels run.

1-D convs run as 2-D convs of height 1. There is no kernel for 3-D convs: they use the XLA reference
formulation (``XlaBackend``), except where ``"vendor"`` is asked for and applies. Every such use is logged once
and recorded in ``PallasBackend.fallbacks``.

Under a data-parallel mesh (``jax.set_mesh``) every kernel runs on each device's batch shard
(``data_parallel``), with the results a single device would give.

Off a CUDA GPU the kernels run in the Pallas interpreter (``interpret=True``), which is how CI tests them.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

from jint8 import backend
from jint8 import quant
from jint8.pallas import clip_scores
from jint8.pallas import common
from jint8.pallas import conv as conv_kernel
from jint8.pallas import conv_wgrad as wgrad_kernel
from jint8.pallas import data_parallel
from jint8.pallas import depthwise
from jint8.pallas import depthwise_wgrad
from jint8.pallas import gemm

CONV_IMPLS = ('auto', 'pallas', 'vendor')
WGRAD_LAYOUTS = ('auto',) + wgrad_kernel.LAYOUTS


def _option(value, env: str, allowed: tuple[str, ...], what: str) -> str:
  value = value or os.environ.get(env, 'auto')
  if value not in allowed:
    raise ValueError(f'{what} must be one of {allowed}, got {value!r} (environment variable {env})')
  return value


def _as_2d(geometry: backend.ConvGeometry) -> backend.ConvGeometry:
  """The geometry of a 1-D conv as a 2-D conv of height 1; 2-D geometries unchanged.

  Activations ``[N, W, C]`` become ``[N, 1, W, C]`` and kernels ``[K, Cin/G, Cout]`` ``[1, K, Cin/G, Cout]``.
  """
  if geometry.ndim == 2:
    return geometry
  return backend.ConvGeometry((1,) + geometry.window_strides, ((0, 0),) + geometry.padding,
                              (1,) + geometry.rhs_dilation, geometry.feature_group_count)


class PallasBackend:
  """The Pallas GPU kernels behind the ``jint8.backend.Backend`` interface (see the module docstring)."""

  name = 'pallas'

  def __init__(self, *, interpret: bool | None = None, conv_impl: str | None = None,
               dgrad_impl: str | None = None, wgrad_layout: str | None = None):
    self.interpret = interpret  # None: interpret unless on a CUDA GPU
    self.conv_impl = _option(conv_impl, 'JINT8_CONV_IMPL', CONV_IMPLS, 'conv_impl')
    self.dgrad_impl = _option(dgrad_impl, 'JINT8_DGRAD_IMPL', CONV_IMPLS, 'dgrad_impl')
    self.wgrad_layout = _option(wgrad_layout, 'JINT8_WGRAD_LAYOUT', WGRAD_LAYOUTS, 'wgrad_layout')
    self.fallbacks: dict[str, str] = {}
    self._reference = backend.XlaBackend()

  def _interpret(self) -> bool:
    return not common.on_cuda_gpu() if self.interpret is None else self.interpret

  def plan(self, op: str, lhs_shape, rhs_shape, geometry: backend.ConvGeometry) -> str:
    """How ``op`` (``"conv"``, ``"dgrad"``, ``"wgrad"``) runs for these operand shapes.

    ``lhs_shape`` is the conv input ``[N, *S, Cin]``, ``rhs_shape`` the kernel ``[*K, Cin/G, Cout]``. Returns
    ``"vendor"`` (XLA's int8 conv), ``"gemm"`` (implicit-GEMM kernel), ``"gemm-<layout>"`` (wgrad kernel
    and its operand layout), ``"depthwise"`` or ``"xla"`` (reference formulation, no kernel).
    """
    if op not in ('conv', 'dgrad', 'wgrad'):
      raise ValueError(f'unknown conv op {op!r}; expected "conv", "dgrad" or "wgrad"')
    nd, groups = geometry.ndim, geometry.feature_group_count
    cin, cout = lhs_shape[-1], rhs_shape[-1]
    one_group = groups == 1 and cin % 4 == 0 and cout % 4 == 0
    if op == 'conv' and self.conv_impl == 'vendor' and one_group:
      return 'vendor'
    if op == 'dgrad' and self.dgrad_impl == 'vendor' and one_group and all(
        s == 1 for s in geometry.window_strides) and all(
            lo <= (k - 1) * d and hi <= (k - 1) * d
            for (lo, hi), k, d in zip(geometry.padding, rhs_shape[:nd], geometry.rhs_dilation)):
      return 'vendor'
    if nd > 2:
      return 'xla'
    if backend.is_depthwise(cin, rhs_shape, groups):
      return 'depthwise'
    if op != 'wgrad':
      return 'gemm'
    layout = None if self.wgrad_layout == 'auto' else self.wgrad_layout
    return 'gemm-' + wgrad_kernel.pick_config(cin // groups, cout // groups, layout).layout

  def _fallback(self, op: str, lhs_shape, rhs_shape):
    key = f'{op} {tuple(lhs_shape)} x {tuple(rhs_shape)}'
    if key not in self.fallbacks:
      reason = f'no Pallas kernel for {len(rhs_shape) - 2}-D convs: XLA reference formulation'
      self.fallbacks[key] = reason
      logging.warning('jint8 pallas backend: %s: %s', key, reason)

  def search_clip(self, g, *, ratios, refine):
    return clip_scores.dsgc_search(g, ratios, refine, interpret=self._interpret()).clip

  def conv(self, lhs, rhs, geometry, scale, out_dtype=jnp.float32):
    path = self.plan('conv', lhs.shape, rhs.shape, geometry)
    if path == 'vendor':
      return _vendor_conv(lhs, rhs, geometry, scale).astype(out_dtype)
    if path == 'xla':
      self._fallback('conv', lhs.shape, rhs.shape)
      return self._reference.conv(lhs, rhs, geometry, scale, out_dtype)
    one_d, interpret = geometry.ndim == 1, self._interpret()
    kernel = depthwise.depthwise_forward if path == 'depthwise' else conv_kernel.conv_forward

    def run(x, w, scale):
      y = kernel(x[:, None] if one_d else x, w[None] if one_d else w, _as_2d(geometry), scale,
                 interpret=interpret, out_dtype=out_dtype)
      return y[:, 0] if one_d else y

    return data_parallel.map_batch(run, (lhs,), (rhs, backend.scale_factors(scale)))

  def conv_dgrad(self, g, rhs, geometry, in_spatial, scale, out_dtype=jnp.float32):
    lhs_shape = (g.shape[0], *in_spatial, rhs.shape[-2] * geometry.feature_group_count)
    path = self.plan('dgrad', lhs_shape, rhs.shape, geometry)
    if path == 'vendor':
      return _vendor_dgrad(g, rhs, geometry, in_spatial, scale).astype(out_dtype)
    if path == 'xla':
      self._fallback('dgrad', lhs_shape, rhs.shape)
      return self._reference.conv_dgrad(g, rhs, geometry, in_spatial, scale, out_dtype)
    one_d, interpret = geometry.ndim == 1, self._interpret()
    kernel = depthwise.depthwise_dgrad if path == 'depthwise' else conv_kernel.conv_dgrad

    def run(g, w, scale):
      dx = kernel(g[:, None] if one_d else g, w[None] if one_d else w, _as_2d(geometry),
                  (1, *in_spatial) if one_d else tuple(in_spatial), scale, interpret=interpret,
                  out_dtype=out_dtype)
      return dx[:, 0] if one_d else dx

    return data_parallel.map_batch(run, (g,), (rhs, backend.scale_factors(scale)))

  def conv_wgrad(self, lhs, g, geometry, kernel_spatial, scale):
    rhs_shape = (*kernel_spatial, lhs.shape[-1] // geometry.feature_group_count, g.shape[-1])
    path = self.plan('wgrad', lhs.shape, rhs_shape, geometry)
    if path == 'xla':
      self._fallback('wgrad', lhs.shape, rhs_shape)
      return self._reference.conv_wgrad(lhs, g, geometry, kernel_spatial, scale)
    one_d, interpret = geometry.ndim == 1, self._interpret()
    spatial = (1, *kernel_spatial) if one_d else tuple(kernel_spatial)
    cfg = None if path == 'depthwise' else wgrad_kernel.pick_config(
        rhs_shape[-2], g.shape[-1] // geometry.feature_group_count, path.removeprefix('gemm-'))

    def run(x, g, scale):  # this shard's part of the sum over the batch
      x, g = (x[:, None], g[:, None]) if one_d else (x, g)
      if cfg is None:
        dw = depthwise_wgrad.depthwise_wgrad(x, g, _as_2d(geometry), spatial, scale, interpret=interpret)
      else:
        dw = wgrad_kernel.conv_wgrad(x, g, _as_2d(geometry), spatial, scale, interpret=interpret, config=cfg)
      return dw[0] if one_d else dw

    return data_parallel.map_batch(run, (lhs, g), (backend.scale_factors(scale),), sum_outputs=True)

  def matmul(self, a, b, contract, scale):
    if a.ndim != 2 or b.ndim != 2:
      raise ValueError(f'matmul takes 2-D operands, got {a.shape} and {b.shape}')
    interpret = self._interpret()

    def run(a, b, scale):
      a = a if contract[0] == 1 else a.T
      b = b if contract[1] == 1 else b.T
      return gemm.matmul_kmajor(a, b, scale, interpret=interpret)

    scale = backend.scale_factors(scale)
    if contract[0] == 1:  # a's rows (the batch) split, b replicated
      return data_parallel.map_batch(run, (a,), (b, scale))
    if contract[1] == 0:  # both contracted over their first axis, the batch: a sum over the shards
      return data_parallel.map_batch(run, (a, b), (scale,), sum_outputs=True)
    return run(a, b, scale)


def _vendor_conv(lhs, rhs, geometry: backend.ConvGeometry, scale):
  """XLA's int8 conv (``XlaBackend``'s formulation), s8 x s8 -> f32: cuDNN rejects an s32 output; the sums are
  exact int32 converted."""
  return backend.rescale(backend.lax_conv(lhs, rhs, geometry, jnp.float32), backend.scale_factors(scale))


def _vendor_dgrad(g, rhs, geometry: backend.ConvGeometry, in_spatial, scale):
  """dgrad of a stride-1, one-group conv as XLA's int8 conv (``XlaBackend``'s formulation), s8 x s8 -> f32."""
  return backend.rescale(backend.lax_conv_dgrad(g, rhs, geometry, in_spatial, jnp.float32),
                         backend.scale_factors(scale))

