"""Kernel: int8 x int8 matrix product with int32 accumulation and a float32 ``backend.rescale`` epilogue.

Both operands are K-major (``a [M, K]``, ``b [N, K]``, K contiguous): Hopper's 8-bit tensor-core path needs
K-major shared-memory tiles for full speed. Programs walk the output tiles in groups of ``GROUP_M`` rows so that
neighbouring programs share operand tiles in L2. Reductions longer than ``jint8.backend.MAX_EXACT_TERMS`` are
split and the partial products added in float32.
Reference: ``jint8.backend.XlaBackend.matmul``.
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

GROUP_M = 8


@dataclasses.dataclass(frozen=True)
class GemmConfig:
  """Tile sizes and launch parameters of the int8 GEMM."""
  block_m: int = 128
  block_n: int = 128
  block_k: int = 128
  num_warps: int = 4
  num_stages: int = 3


def pick_config(m: int, n: int, k: int) -> GemmConfig:
  """Block sizes for an ``m x n x k`` product: 128x128x128 tiles, 4 warps, 3 stages (the fastest of the
  configurations bench/kernels.py compared), smaller ones to fit."""
  return GemmConfig(common.pow2_block(m, 16, 128), common.pow2_block(n, 16, 128), common.pow2_block(k, 32, 128),
                    4, 3)


def _kernel(a_ref, b_ref, scale_ref, out_ref, *, m, n, k, cfg):
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  tiles_m, tiles_n = common.cdiv(m, bm), common.cdiv(n, bn)
  pid = pl.program_id(0)
  per_group = GROUP_M * tiles_n
  first_m = (pid // per_group) * GROUP_M
  group_rows = jnp.minimum(tiles_m - first_m, GROUP_M)
  pid_m = first_m + (pid % per_group) % group_rows
  pid_n = (pid % per_group) // group_rows
  rows = pid_m * bm + lax.iota(jnp.int32, bm)
  cols = pid_n * bn + lax.iota(jnp.int32, bn)
  row_ok = rows < m if m % bm else None
  col_ok = cols < n if n % bn else None

  def step(t, acc):
    k_ok = (t * bk + lax.iota(jnp.int32, bk) < k)[None, :] if k % bk else None
    a = common.load(a_ref.at[pl.ds(pid_m * bm, bm), pl.ds(t * bk, bk)], _and(_col(row_ok), k_ok))
    b = common.load(b_ref.at[pl.ds(pid_n * bn, bn), pl.ds(t * bk, bk)], _and(_col(col_ok), k_ok))
    return acc + lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)

  acc = lax.fori_loop(0, common.cdiv(k, bk), step, jnp.zeros((bm, bn), jnp.int32))
  out = backend.rescale(acc.astype(jnp.float32), scale_ref)
  common.store(out_ref.at[pl.ds(pid_m * bm, bm), pl.ds(pid_n * bn, bn)], out,
               _and(_col(row_ok), None if col_ok is None else col_ok[None, :]))


def _col(mask):
  return None if mask is None else mask[:, None]


def _and(a, b):
  if a is None:
    return b
  return a if b is None else a & b


def matmul_kmajor(a: jax.Array, b: jax.Array, scale: jax.Array, *, interpret: bool,
                  config: GemmConfig | None = None, max_terms: int = backend.MAX_EXACT_TERMS) -> jax.Array:
  """``a @ b.T`` (exact in int32) times ``scale`` (``backend.rescale``) in float32, for int8 ``a [M, K]`` and
  ``b [N, K]``."""
  if a.dtype != jnp.int8 or b.dtype != jnp.int8:
    raise TypeError(f'int8 GEMM takes int8 operands, got {a.dtype} and {b.dtype}')
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f'int8 GEMM needs a [M, K] and b [N, K], got {a.shape} and {b.shape}')
  (m, k), n = a.shape, b.shape[0]
  cfg = config or pick_config(m, n, k)
  scale = backend.scale_factors(scale)
  chunk = max(cfg.block_k, max_terms // cfg.block_k * cfg.block_k)

  def product(a, b, scale):
    kernel = functools.partial(_kernel, m=m, n=n, k=a.shape[1], cfg=cfg)
    grid = (common.cdiv(m, cfg.block_m) * common.cdiv(n, cfg.block_n),)
    return common.call(kernel, out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32), grid=grid,
                       interpret=interpret, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                       name='jint8_gemm')(a, b, scale)

  if k <= chunk:
    return product(a, b, scale)
  total = None
  for start in range(0, k, chunk):
    size = min(chunk, k - start)
    part = product(lax.slice_in_dim(a, start, start + size, axis=1),
                   lax.slice_in_dim(b, start, start + size, axis=1), jnp.ones((1,), jnp.float32))
    total = part if total is None else total + part
  return backend.rescale(total, scale)
