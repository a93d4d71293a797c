"""What the Pallas kernels share: where they run, how they launch, and exact in-kernel arithmetic.

The kernels use the Pallas Triton backend (``jax.experimental.pallas.triton``); off a CUDA GPU they run with
``interpret=True``. Triton has no round-to-nearest-even, so the DSGC search rounds with ``round_half_even``
(``cvt.rni.f32.f32``). It never divides per element: XLA compiles ``jint8.quant``'s ``x / c`` (``c`` a
broadcast scalar) into ``x * (1 / c)``, so multiplying by a reciprocal computed outside the kernel gives
bit-identical results.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


@functools.cache
def on_cuda_gpu() -> bool:
  """True when JAX's default backend is a CUDA GPU, where the kernels compile through Triton."""
  if jax.default_backend() != 'gpu':
    return False
  return 'rocm' not in jax.devices()[0].client.platform_version.lower()


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def pow2_at_least(n: int) -> int:
  """The smallest power of two >= n (Triton tensors have power-of-two sizes)."""
  return 1 << max(0, int(n) - 1).bit_length()


def pow2_at_most(n: int) -> int:
  """The largest power of two <= n (n >= 1)."""
  return 1 << (int(n).bit_length() - 1)


def pow2_block(n: int, lo: int, hi: int) -> int:
  """A power-of-two block size for a dimension of size ``n``, clamped to ``[lo, hi]``."""
  return max(lo, min(hi, pow2_at_least(n)))


TARGET_PROGRAMS = 528  # 4 per multiprocessor of an H100/H200
MIN_STEPS = 16         # reduction blocks per program before a reduction is split further


def split_reduction(length: int, tiles: int, block: int, max_terms: int) -> tuple[int, int]:
  """``(chunk, splits)`` for a reduction of ``length`` terms over ``tiles`` output tiles.

  ``chunk`` is a multiple of ``block`` and at most ``max_terms`` (an exact int32 sum), and there are enough
  splits to give about ``TARGET_PROGRAMS`` programs without making any shorter than ``MIN_STEPS`` blocks.
  """
  max_chunk = max(block, max_terms // block * block)
  wanted = min(cdiv(TARGET_PROGRAMS, tiles), cdiv(length, MIN_STEPS * block))
  splits = max(cdiv(length, max_chunk), wanted, 1)
  chunk = cdiv(cdiv(length, splits), block) * block
  return chunk, cdiv(length, chunk)


def call(kernel, *, out_shape, grid, interpret: bool, num_warps: int = 4, num_stages: int = 3,
         name: str | None = None):
  """``pl.pallas_call`` of ``kernel`` on whole-array refs (the kernels index memory themselves)."""
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, interpret=interpret, name=name,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages))


def load(ref, mask=None):
  """Loads ``ref`` (a ref or ``ref.at[...]``), zero where ``mask`` is False."""
  if mask is None:
    return pltriton.load(ref)
  return pltriton.load(ref, mask=mask, other=0)


def store(ref, value, mask=None):
  pltriton.store(ref, value, mask=mask)


def gather(ref, offsets: jax.Array, mask: jax.Array) -> jax.Array:
  """Loads the elements of the flat ``ref`` at ``offsets`` (any shape), zero where ``mask`` is False.

  Masked-out offsets may be anything: Triton does not dereference them and the interpreter discards them.
  They are not clamped in the kernel, since a select would hide the offsets' contiguity from Triton and turn
  16-byte vector loads into byte loads.
  """
  return load(ref.at[offsets], mask)


def scatter(ref, offsets: jax.Array, value: jax.Array, mask: jax.Array, *, interpret: bool) -> None:
  """Stores ``value`` into the flat ``ref`` at ``offsets`` where ``mask`` is True.

  In the interpreter masked-out lanes still write back what they read, so they are pointed one past the end
  (dropped) lest they collide with a real store; Triton skips them, so their offsets stay untouched.
  """
  if interpret:
    offsets = jnp.where(mask, offsets, ref.shape[0])
  store(ref.at[offsets], value, mask)


def round_half_even(v: jax.Array, *, interpret: bool) -> jax.Array:
  """``jnp.round`` (ties to even) of float32 ``v``: one ``cvt.rni.f32.f32`` on the GPU.

  Triton has no rounding primitive, and a floor-based emulation is not exact there: Triton contracts the
  product that forms ``v`` with the subtraction into an FMA, which moves ties.
  """
  if interpret:
    return jnp.round(v)
  [r] = pltriton.elementwise_inline_asm(
      'cvt.rni.f32.f32 $0, $1;', args=[v.astype(jnp.float32)], constraints='=f,f', pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.float32)])
  return r
