"""Checks the jint8 Pallas kernels on the GPU against float references, on real ResNet-50 / MobileNetV2 shapes.

Every conv path (implicit GEMM, cuDNN "vendor", depthwise; forward, dgrad, wgrad in every operand layout) runs
on int8 operands at batch ``--batch`` and is compared
- exactly with ``XlaBackend`` (int32 lax convs) run on the host CPU, on integers in [-8, 8] (every partial
  sum stays below 2^24, so float32 holds it however the sum is split);
- by relative error ||out - ref|| / ||ref|| with a float32 conv at HIGHEST precision on the GPU, on
  full-range integers (float32 sums of these round, so expect about 1e-7).
The jnp quantizers compiled for the GPU are compared with the same code on the CPU (bit for bit, round to nearest
and stochastic), the Pallas DSGC search with the reference's, stochastic rounding checked for bias; the GEMM
exactly with XLA's int8 dot.

  PYTHONPATH=. python bench/check_kernels.py [--batch 2] [--quick] [--out DIR]

Exits with status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jint8 import backend
from jint8 import quant
from jint8.pallas import PallasBackend
from jint8.pallas import conv_wgrad


@dataclasses.dataclass(frozen=True)
class Layer:
  name: str
  size: int       # input height = width
  cin: int
  cout: int
  kernel: int
  stride: int = 1
  groups: int = 1

  def geometry(self) -> backend.ConvGeometry:
    pad = self.kernel // 2
    return backend.ConvGeometry((self.stride,) * 2, ((pad, pad),) * 2, (1, 1), self.groups)


LAYERS = (
    Layer('stem7x7/2', 224, 3, 64, 7, 2),
    Layer('s1.3x3', 56, 64, 64, 3),
    Layer('s2.3x3/2', 56, 128, 128, 3, 2),
    Layer('s3.1x1.reduce', 14, 1024, 256, 1),
    Layer('s3.down1x1/2', 28, 512, 1024, 1, 2),
    Layer('s4.3x3', 7, 512, 512, 3),
    Layer('mbv2.dw3x3/2', 112, 96, 96, 3, 2, 96),
    Layer('mbv2.dw3x3', 14, 576, 576, 3, 1, 576),
)
QUICK = ('s1.3x3', 's2.3x3/2', 'mbv2.dw3x3/2', 'mbv2.dw3x3')


def float_ops(layer: Layer, x, w, g):
  """float32 forward, dgrad and wgrad at HIGHEST precision (the reference)."""
  geom = layer.geometry()
  dims = ('NHWC', 'HWIO', 'NHWC')

  def fwd(x, w):
    return lax.conv_general_dilated(x, w, geom.window_strides, geom.padding, dimension_numbers=dims,
                                    feature_group_count=geom.feature_group_count,
                                    precision=lax.Precision.HIGHEST)

  y, vjp = jax.vjp(fwd, x.astype(jnp.float32), w.astype(jnp.float32))
  dx, dw = vjp(g.astype(jnp.float32))
  return y, dx, dw


def compare(name, out, ref, exact: bool, results: list):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  if out.shape != ref.shape:
    results.append((name, f'shape {out.shape} != {ref.shape}', False))
    return
  finite = bool(np.all(np.isfinite(out)))
  err = float(np.max(np.abs(out - ref))) if out.size else 0.0
  rel = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
  ok = finite and (err == 0.0 if exact else rel < 1e-5)
  results.append((name, f'max|err| {err:.3g} rel {rel:.2e}' + ('' if finite else ' NON-FINITE'), ok))


def check_convs(args, results: list, key):
  layouts = ('swapped', 'register') if args.quick else conv_wgrad.LAYOUTS
  backends = [PallasBackend(conv_impl='pallas', dgrad_impl='pallas', wgrad_layout=layout) for layout in layouts]
  if not args.quick:
    backends.append(PallasBackend(conv_impl='vendor', dgrad_impl='vendor'))
  cpu = jax.devices('cpu')[0]
  reference = backend.XlaBackend()
  for layer in LAYERS:
    if args.quick and layer.name not in QUICK:
      continue
    geom = layer.geometry()
    spatial, kernel = (layer.size,) * 2, (layer.kernel,) * 2
    shape_x = (args.batch, *spatial, layer.cin)
    shape_w = (*kernel, layer.cin // layer.groups, layer.cout)
    shape_g = (args.batch, *geom.out_spatial(spatial, kernel), layer.cout)
    runs = {}  # (op, plan) -> jitted op, compiled once and run on both value ranges
    for be in backends:
      for op, fn in (('conv', lambda x, w, g, be=be: be.conv(x, w, geom, 1.0)),
                     ('dgrad', lambda x, w, g, be=be: be.conv_dgrad(g, w, geom, spatial, 1.0)),
                     ('wgrad', lambda x, w, g, be=be: be.conv_wgrad(x, g, geom, kernel, 1.0))):
        runs.setdefault((op, be.plan(op, shape_x, shape_w, geom)), jax.jit(fn))
    for bound, exact in ((8, True), (127, False)):
      key, kx, kw_, kg = jax.random.split(key, 4)
      x = jax.random.randint(kx, shape_x, -bound, bound + 1, jnp.int8)
      w = jax.random.randint(kw_, shape_w, -bound, bound + 1, jnp.int8)
      g = jax.random.randint(kg, shape_g, -bound, bound + 1, jnp.int8)
      if exact:
        xc, wc, gc = (jax.device_put(a, cpu) for a in (x, w, g))
        refs = dict(conv=reference.conv(xc, wc, geom, 1.0), dgrad=reference.conv_dgrad(gc, wc, geom, spatial, 1.0),
                    wgrad=reference.conv_wgrad(xc, gc, geom, kernel, 1.0))
      else:
        refs = dict(zip(('conv', 'dgrad', 'wgrad'), float_ops(layer, x, w, g)))
      for (op, plan), run in runs.items():
        name = (f'{layer.name} {op} {plan} batch {args.batch} ' +
                ('ints<=8 exact vs CPU int32' if exact else 'ints<=127 vs GPU f32'))
        try:
          compare(name, jax.block_until_ready(run(x, w, g)), refs[op], exact, results)
        except Exception as e:  # report and go on: one broken path must not hide the others
          results.append((name, f'{type(e).__name__}: {str(e)[:300]}', False))
  return key


def check_quantizers(args, results: list, key):
  """The jnp quantizers compiled for the GPU against the same code on the CPU, and the Pallas DSGC search against
  the reference backend's."""
  cpu = jax.devices('cpu')[0]
  n = 8 * 56 * 56 * (1 if args.smoke else 64)
  seeds = jnp.asarray([12345, 678], jnp.uint32)
  for dtype in (jnp.float32, jnp.bfloat16):
    key, k = jax.random.split(key)
    x = (jax.random.normal(k, (n,)) * 3).astype(dtype)
    clip = jnp.float32(2.5)
    for rounding, s in (('RTN', None), ('SR', seeds)):
      run = jax.jit(lambda x, c, s: quant.quantize(x, c, seeds=s))
      q_gpu = np.asarray(run(x, clip, s))
      q_cpu = np.asarray(run(*jax.device_put((x, clip, s), cpu)))
      results.append((f'quantize {rounding} {jnp.dtype(dtype).name} n={n}',
                      f'{int(np.sum(q_gpu != q_cpu))} differ from the CPU', bool(np.all(q_gpu == q_cpu))))
  ratios = quant.candidate_ratios()
  key, k = jax.random.split(key)
  g = jax.random.t(k, 2.0, (n,)) * 1e-3  # sharp and wide, like a gradient
  clip = float(PallasBackend().search_clip(g, ratios=ratios, refine=8))
  clip_ref = float(backend.XlaBackend().search_clip(jax.device_put(g, cpu), ratios=ratios, refine=8))
  results.append(('search_clip (Pallas) vs XlaBackend on the CPU', f'clip {clip:.6g} vs {clip_ref:.6g}',
                  abs(clip - clip_ref) <= 1e-5 * clip_ref))
  gq = quant.quantize(g, jnp.float32(3e-3), seeds=seeds)
  sums = quant.deviation_sums(g, gq, jnp.float32(3e-3))
  v = jnp.clip(g / 3e-3, -1, 1) * quant.QMAX
  bias = float(jnp.mean(gq.astype(jnp.float32) - v))
  spread = float(jnp.max(jnp.abs(gq.astype(jnp.float32) - v)))
  bound = 5 * 0.5 / np.sqrt(n)
  results.append(('quantize stochastic',
                  f'mean(q - v) {bias:.2e} (|.| < {bound:.1e}), max|q - v| {spread:.3f}, finite {bool(sums.finite())}',
                  abs(bias) < bound and spread <= 1.0 and bool(sums.finite())))
  bad = g.at[12345].set(jnp.inf)
  finite = quant.deviation_sums(bad, gq, jnp.float32(3e-3)).finite()
  results.append(('deviation sums of a gradient with an inf', f'finite={bool(finite)}', not bool(finite)))
  return key


def check_gemm(args, results: list, key):
  be = PallasBackend()
  shapes = ((1000, 3000, 2000), (4096, 4096, 4096))
  for m, k, n in ((37, 100, 45),) if args.smoke else shapes[:1] if args.quick else shapes:
    key, ka, kb = jax.random.split(key, 3)
    a = jax.random.randint(ka, (m, k), -127, 128, jnp.int8)
    b = jax.random.randint(kb, (n, k), -127, 128, jnp.int8)
    ref = lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    for contract, bb in (((1, 1), b), ((1, 0), b.T)):
      out = be.matmul(a, bb, contract, 1.0)
      compare(f'gemm {m}x{k}x{n} contract={contract}', out, ref.astype(jnp.float32), True, results)
  return key


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--smoke', action='store_true', help='tiny shapes: a quick run of this script on a CPU')
  parser.add_argument('--quick', action='store_true', help=f'only the layers {QUICK} and new wgrad layouts')
  parser.add_argument('--out', default=os.environ.get('OUT', ''))
  args = parser.parse_args(argv)
  if args.smoke:
    global LAYERS
    LAYERS = tuple(dataclasses.replace(layer, size=9, cin=min(layer.cin, 16), cout=min(layer.cout, 24))
                   for layer in LAYERS if layer.groups == 1) + (
                                           Layer('dw-smoke', 9, 24, 24, 3, 2, 24),)
    args.batch = 1
  print(f'jax {jax.__version__}, devices {jax.devices()}', flush=True)
  start = time.perf_counter()
  results: list = []
  key = jax.random.key(0)
  probe = backend.ConvGeometry((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
  try:  # does the XLA reference backend's int32 conv run here? (cuDNN rejects s32 outputs)
    x8 = jnp.ones((2, 8, 8, 16), jnp.int8)
    jax.block_until_ready(backend.XlaBackend().conv(x8, jnp.ones((3, 3, 16, 16), jnp.int8), probe, 1.0))
    results.append(('XlaBackend.conv (int32 conv) on this device', 'runs', True))
  except Exception as e:
    results.append(('XlaBackend.conv (int32 conv) on this device', f'unsupported: {str(e)[:120]}', True))
  for check in (check_quantizers, check_gemm, check_convs):
    try:
      key = check(args, results, key)
    except Exception as e:
      results.append((check.__name__, f'{type(e).__name__}: {str(e)[:300]}', False))
    print(f'  ... {len(results)} checks, {time.perf_counter() - start:.0f} s', flush=True)
  lines = [f'{"PASS" if ok else "FAIL"}  {name}: {detail}' for name, detail, ok in results]
  failed = sum(not ok for _, _, ok in results)
  lines.append(f'{len(results) - failed} passed, {failed} failed, {time.perf_counter() - start:.0f} s')
  print('\n'.join(lines), flush=True)
  if args.out:
    with open(os.path.join(args.out, 'check_kernels.txt'), 'w') as f:
      f.write('\n'.join(lines) + '\n')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
