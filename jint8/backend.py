"""Integer compute backends for the int8 ops.

A backend does the int8 work of one conv or dense layer: int8 x int8 products accumulated in int32 and rescaled
in float32 in the epilogue, and the DSGC search of search steps. (The quantizers are jnp in ``jint8.ops``, so that
they fuse into the ops producing their inputs.) Layouts are canonical, channels last:

  conv input   lhs  [N, *S, Cin]            (S: spatial input size)
  conv kernel  rhs  [*K, Cin // G, Cout]    (G: feature_group_count)
  conv output  out  [N, *O, Cout]

``XlaBackend`` (name ``"xla"``) runs anywhere through ``lax`` with int32 accumulation; its integer results are
exact. It splits long reductions so that int32 cannot overflow and adds the partial sums in float32.
``jint8.pallas`` registers the GPU kernels as ``"pallas"``; ``get_backend("pallas")`` imports it on demand.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jint8 import quant

# Longest int32 reduction of int8 x int8 products that cannot overflow: 127^2 * n < 2^31.
MAX_EXACT_TERMS = (2 ** 31 - 1) // (quant.QMAX * quant.QMAX)


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """Everything about a conv but its operands: strides, explicit padding, kernel dilation, groups."""

  window_strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  rhs_dilation: tuple[int, ...]
  feature_group_count: int = 1

  @property
  def ndim(self) -> int:
    return len(self.window_strides)

  def out_spatial(self, in_spatial: Sequence[int], kernel_spatial: Sequence[int]) -> tuple[int, ...]:
    """The output's spatial size for an input and kernel of the given spatial sizes."""
    return tuple(
        (s + lo + hi - (k - 1) * d - 1) // st + 1
        for s, k, (lo, hi), d, st in zip(in_spatial, kernel_spatial, self.padding, self.rhs_dilation,
                                          self.window_strides))


def is_depthwise(lhs_channels: int, rhs_shape: Sequence[int], groups: int) -> bool:
  """True for a conv with one input and one output channel per group (channel multiplier 1): it never sums over
  channels."""
  return groups == lhs_channels and rhs_shape[-2] == 1 and rhs_shape[-1] == groups


def scale_factors(scale) -> jax.Array:
  """``scale`` (a scalar, or the factors of a product to multiply by in turn) as a 1-D float32 array."""
  return jnp.asarray(scale, jnp.float32).reshape(-1)


def rescale(product: jax.Array, factors) -> jax.Array:
  """``product`` times each of ``factors`` (``scale_factors``' array, or a ref to it in a kernel) in turn.

  The ops dequantize with two factors, ``clip / 127`` and ``weight_clip / 127``: their one float32 product
  flushes to zero below about 2e-34 (tiny gradients times small weights) where the result, the product times each
  factor in turn, is still a normal float32.
  """
  for i in range(factors.shape[0]):
    product = product * factors[i]
  return product


class Backend(Protocol):
  """What an integer backend provides. Every product returns ``rescale(int32_result, scale_factors(scale))``
  computed in float32 (``scale``: a scalar or factors applied in turn); the forward conv and dgrad round it to
  ``out_dtype`` (float32 or the model's bfloat16) in the epilogue."""

  name: str

  def search_clip(self, g: jax.Array, *, ratios: np.ndarray, refine: int) -> jax.Array:
    """The DSGC clip of ``g``: ``quant.dsgc_search`` over ``ratios`` (run on search steps only)."""

  def conv(self, lhs: jax.Array, rhs: jax.Array, geometry: ConvGeometry, scale: jax.Array,
           out_dtype=jnp.float32) -> jax.Array:
    """Forward conv of int8 ``lhs`` and ``rhs``: ``[N, *O, Cout]`` in ``out_dtype``."""

  def conv_dgrad(self, g: jax.Array, rhs: jax.Array, geometry: ConvGeometry, in_spatial: Sequence[int],
                 scale: jax.Array, out_dtype=jnp.float32) -> jax.Array:
    """Gradient w.r.t. the conv input from int8 ``g [N, *O, Cout]`` and ``rhs``: ``[N, *S, Cin]`` in
    ``out_dtype``."""

  def conv_wgrad(self, lhs: jax.Array, g: jax.Array, geometry: ConvGeometry, kernel_spatial: Sequence[int],
                 scale: jax.Array) -> jax.Array:
    """Gradient w.r.t. the kernel from int8 ``lhs`` and ``g``: float32 ``[*K, Cin // G, Cout]``."""

  def matmul(self, a: jax.Array, b: jax.Array, contract: tuple[int, int], scale: jax.Array) -> jax.Array:
    """2-D int8 product contracting ``a``'s axis ``contract[0]`` with ``b``'s ``contract[1]``: float32."""


def channels_last_dimension_numbers(nd: int) -> lax.ConvDimensionNumbers:
  """Dimension numbers of the canonical layouts: lhs ``[N, *S, C]``, rhs ``[*K, I, O]``, out ``[N, *O, C]``."""
  spatial = tuple(range(1, nd + 1))
  return lax.ConvDimensionNumbers(
      lhs_spec=(0, nd + 1) + spatial,
      rhs_spec=(nd + 1, nd) + tuple(range(nd)),
      out_spec=(0, nd + 1) + spatial)


def _conv_accumulator_type():
  """int32 where XLA lowers s8 x s8 -> s32 convs; float32 on GPUs, where cuDNN takes only s8 x s8 -> f32
  (it accumulates in int32 and converts at the end)."""
  return jnp.float32 if jax.default_backend() == 'gpu' else jnp.int32


def _chunked_sum(fn, n: int, chunk: int):
  """Sums ``fn(start, size)`` (an int32 partial) over ``[0, n)`` in chunks of ``chunk``, in float32."""
  total = None
  for start in range(0, n, chunk):
    part = fn(start, min(chunk, n - start)).astype(jnp.float32)
    total = part if total is None else total + part
  return total


def check_terms(terms: int, what: str) -> None:
  """Raises a NotImplementedError when ``what`` sums more int8 products per output than int32 holds exactly."""
  if terms > MAX_EXACT_TERMS:
    raise NotImplementedError(
        f'{what} reduces over {terms} int8 products per output, more than the {MAX_EXACT_TERMS} an int32 '
        'accumulator holds exactly; split the layer (fewer input channels per group) or keep it in float')


def lax_conv(lhs: jax.Array, rhs: jax.Array, geometry: ConvGeometry, accumulator) -> jax.Array:
  """The forward conv of int8 ``lhs`` and ``rhs`` as one ``lax`` conv, summed in ``accumulator`` (``jnp.int32``,
  or ``jnp.float32`` where XLA takes only s8 x s8 -> f32): ``[N, *O, Cout]``."""
  return lax.conv_general_dilated(
      lhs, rhs, geometry.window_strides, geometry.padding, rhs_dilation=geometry.rhs_dilation,
      dimension_numbers=channels_last_dimension_numbers(geometry.ndim),
      feature_group_count=geometry.feature_group_count, preferred_element_type=accumulator)


def lax_conv_dgrad(g: jax.Array, rhs: jax.Array, geometry: ConvGeometry, in_spatial: Sequence[int],
                   accumulator) -> jax.Array:
  """The input gradient of a conv from int8 ``g [N, *O, Cout]`` and ``rhs`` as one ``lax`` conv, summed in
  ``accumulator``: ``[N, *S, Cin]``.

  It is the conv of ``g``, dilated by the strides, with the spatially flipped kernel whose input and output
  channels are swapped inside each group.
  """
  nd, groups = geometry.ndim, geometry.feature_group_count
  kernel, cin_g, cout = rhs.shape[:nd], rhs.shape[nd], rhs.shape[nd + 1]
  w = jnp.flip(rhs, axis=tuple(range(nd))).reshape(*kernel, cin_g, groups, cout // groups)
  w = jnp.transpose(w, tuple(range(nd)) + (nd + 2, nd + 1, nd)).reshape(*kernel, cout // groups, groups * cin_g)
  out_spatial = g.shape[1:-1]
  pads = []
  for s, k, o, (lo, _), d, st in zip(in_spatial, kernel, out_spatial, geometry.padding,
                                     geometry.rhs_dilation, geometry.window_strides):
    pads.append(((k - 1) * d - lo, s - (o - 1) * st - 1 + lo))
  return lax.conv_general_dilated(
      g, w, (1,) * nd, pads, lhs_dilation=geometry.window_strides, rhs_dilation=geometry.rhs_dilation,
      dimension_numbers=channels_last_dimension_numbers(nd), feature_group_count=groups,
      preferred_element_type=accumulator)


class XlaBackend:
  """Reference backend: ``lax`` convs and dots on int8 operands with int32 accumulation. Runs anywhere."""

  name = 'xla'

  def search_clip(self, g, *, ratios, refine):
    return quant.dsgc_search(g, ratios, refine).clip

  def conv(self, lhs, rhs, geometry, scale, out_dtype=jnp.float32):
    nd = geometry.ndim
    check_terms(math.prod(rhs.shape[:nd]) * rhs.shape[nd], 'int8 conv forward')
    y = lax_conv(lhs, rhs, geometry, _conv_accumulator_type())
    return rescale(y.astype(jnp.float32), scale_factors(scale)).astype(out_dtype)

  def conv_dgrad(self, g, rhs, geometry, in_spatial, scale, out_dtype=jnp.float32):
    nd, groups = geometry.ndim, geometry.feature_group_count
    check_terms(math.prod(rhs.shape[:nd]) * rhs.shape[nd + 1] // groups, 'int8 conv dgrad')
    dx = lax_conv_dgrad(g, rhs, geometry, in_spatial, _conv_accumulator_type())
    return rescale(dx.astype(jnp.float32), scale_factors(scale)).astype(out_dtype)

  def conv_wgrad(self, lhs, g, geometry, kernel_spatial, scale):
    # dw is a conv that contracts the batch: lhs as [Cin, *S, N] (channels as batch), g as [*O, N, Cout].
    nd = geometry.ndim
    in_spatial, out_spatial = lhs.shape[1:-1], g.shape[1:-1]
    per_image = math.prod(out_spatial)
    check_terms(per_image, 'int8 conv wgrad (one image)')
    pads = tuple((lo, (k - 1) * d + (o - 1) * st + 1 - s - lo)
                 for s, k, o, (lo, _), d, st in zip(in_spatial, kernel_spatial, out_spatial, geometry.padding,
                                                    geometry.rhs_dilation, geometry.window_strides))
    x_t = jnp.moveaxis(lhs, 0, -1)          # [*S, Cin, N]
    x_t = jnp.moveaxis(x_t, -2, 0)          # [Cin, *S, N]
    g_t = jnp.moveaxis(g, 0, -2)            # [*O, N, Cout]

    def partial_sum(start, size):
      return lax.conv_general_dilated(
          lax.slice_in_dim(x_t, start, start + size, axis=nd + 1),
          lax.slice_in_dim(g_t, start, start + size, axis=nd),
          geometry.rhs_dilation, pads, rhs_dilation=geometry.window_strides,
          dimension_numbers=channels_last_dimension_numbers(nd), batch_group_count=geometry.feature_group_count,
          preferred_element_type=_conv_accumulator_type())

    dw = _chunked_sum(partial_sum, lhs.shape[0], max(1, MAX_EXACT_TERMS // per_image))  # [Cin/G, *K, Cout]
    return rescale(jnp.moveaxis(dw, 0, nd), scale_factors(scale))

  def matmul(self, a, b, contract, scale):
    n = a.shape[contract[0]]
    chunk = MAX_EXACT_TERMS

    def partial_sum(start, size):
      return lax.dot_general(lax.slice_in_dim(a, start, start + size, axis=contract[0]),
                             lax.slice_in_dim(b, start, start + size, axis=contract[1]),
                             (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.int32)

    return rescale(_chunked_sum(partial_sum, n, chunk), scale_factors(scale))


_BACKENDS: dict[str, Backend] = {'xla': XlaBackend()}
_LAZY = {'pallas': 'jint8.pallas'}


def register_backend(backend: Backend) -> None:
  """Makes ``backend`` available to the ops under ``backend.name``."""
  _BACKENDS[backend.name] = backend


def get_backend(name: str) -> Backend:
  """The backend registered under ``name``: ``"xla"``, ``"pallas"`` (imports ``jint8.pallas``), or ``"auto"``:
  ``"pallas"`` when JAX's default device is a GPU, else ``"xla"``."""
  if name == 'auto':
    name = 'pallas' if jax.default_backend() == 'gpu' else 'xla'
  if name not in _BACKENDS and name in _LAZY:
    importlib.import_module(_LAZY[name])
  if name not in _BACKENDS:
    raise ValueError(f'unknown int8 backend {name!r}; available: {sorted(set(_BACKENDS) | set(_LAZY))}')
  return _BACKENDS[name]
