"""Times the jint8 Pallas kernels against XLA bf16 on the GPU: int8 GEMM, quantizers, ResNet-50/MobileNetV2 convs.

All timings in one run, same process: median over repeats of back-to-back calls after a warm-up (the host
clock around ``jax.block_until_ready``; each repeat lasts >= 30 ms so launch gaps are hidden), on random data.
Per conv layer (batch 256, channels last): bf16 forward, dgrad, wgrad (XLA/cuDNN, bf16 in and out) against
the int8 path of ``PallasBackend`` including its quantizers (activation and weight max-abs + round to nearest,
gradient stochastic rounding with the deviation sums at a stored clip), and alternatives (other wgrad operand
layouts, forward tiles with the other warp count).
TOP/s counts 2 * MACs per conv or product.

  PYTHONPATH=. python bench/kernels.py [--budget SECONDS] [--out DIR]

Sections run in priority order and stop starting new work after ``--budget`` seconds; the tables are printed
last and written to ``DIR/kernels.md`` (and every measurement to ``DIR/kernels.jsonl``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

from jint8 import backend
from jint8 import quant
from jint8.pallas import PallasBackend
from jint8.pallas import common
from jint8.pallas import conv
from jint8.pallas import gemm

BATCH = 256


def timeit(fn, *args, reps: int = 5, target: float = 0.03) -> float:
  """Median seconds per call of the jitted ``fn`` (compiled and warmed up first)."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - t0
  n = max(1, min(200, int(target / max(once, 1e-6))))
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / n)
  return statistics.median(samples)


@dataclasses.dataclass(frozen=True)
class Conv:
  name: str
  size: int
  cin: int
  cout: int
  kernel: int
  stride: int = 1
  groups: int = 1

  @property
  def geometry(self) -> backend.ConvGeometry:
    pad = self.kernel // 2
    return backend.ConvGeometry((self.stride,) * 2, ((pad, pad),) * 2, (1, 1), self.groups)

  @property
  def out_size(self) -> int:
    return self.geometry.out_spatial((self.size,) * 2, (self.kernel,) * 2)[0]

  @property
  def macs(self) -> int:
    return BATCH * self.out_size ** 2 * self.cout * self.kernel ** 2 * self.cin // self.groups


RESNET_TARGETS = (  # stage 2-4 3x3 and 1x1: the >= 1.5x target
    Conv('s2.3x3', 28, 128, 128, 3), Conv('s2.1x1.reduce', 28, 512, 128, 1),
    Conv('s2.1x1.expand', 28, 128, 512, 1), Conv('s3.3x3', 14, 256, 256, 3),
    Conv('s3.1x1.reduce', 14, 1024, 256, 1), Conv('s3.1x1.expand', 14, 256, 1024, 1),
    Conv('s4.3x3', 7, 512, 512, 3), Conv('s4.1x1.reduce', 7, 2048, 512, 1),
    Conv('s4.1x1.expand', 7, 512, 2048, 1))
RESNET_OTHERS = (
    Conv('s1.3x3', 56, 64, 64, 3), Conv('s3.3x3/2', 28, 256, 256, 3, 2), Conv('s3.down1x1/2', 28, 512, 1024, 1, 2),
    Conv('stem7x7/2', 224, 3, 64, 7, 2))
DEPTHWISE = (
    Conv('mbv2.dw/2 112', 112, 96, 96, 3, 2, 96), Conv('mbv2.dw 56', 56, 144, 144, 3, 1, 144),
    Conv('mbv2.dw 14', 14, 576, 576, 3, 1, 576), Conv('mbv2.dw 7', 7, 960, 960, 3, 1, 960))
WGRAD_ALTERNATES = ('swapped', 'mixed')


class Recorder:
  """Collects measurements, streams them to a jsonl file, and keeps to the time budget."""

  def __init__(self, out: str, budget: float):
    self.start = time.perf_counter()
    self.budget = budget
    self.rows: list[dict] = []
    self.skipped: list[str] = []
    self.file = open(os.path.join(out, 'kernels.jsonl'), 'w') if out else None

  def over(self) -> bool:
    return time.perf_counter() - self.start > self.budget

  def time(self, section: str, name: str, fn, *args, **info):
    """Times ``fn(*args)``; records the failure instead when it raises."""
    if self.over():
      self.skipped.append(f'{section}/{name}')
      return None
    try:
      seconds = timeit(fn, *args)
      row = dict(section=section, name=name, us=seconds * 1e6, **info)
    except Exception as e:  # one broken variant must not stop the run
      seconds = None
      row = dict(section=section, name=name, error=f'{type(e).__name__}: {str(e)[:400]}', **info)
    self.rows.append(row)
    print(json.dumps(row), flush=True)
    if self.file:
      self.file.write(json.dumps(row) + '\n')
      self.file.flush()
    return seconds


def bench_gemm(rec: Recorder, size: int):
  keys = jax.random.split(jax.random.key(1), 2)
  a = jax.random.randint(keys[0], (size, size), -127, 128, jnp.int8)
  b = jax.random.randint(keys[1], (size, size), -127, 128, jnp.int8)  # [N, K]
  af, bf = a.astype(jnp.bfloat16), b.T.astype(jnp.bfloat16)
  info = dict(ops=2 * size ** 3)
  rec.time('gemm', 'xla bf16', jax.jit(lambda x, y: x @ y), af, bf, **info)
  rec.time('gemm', 'xla int8 (B K-major)', jax.jit(lambda x, y: lax.dot_general(
      x, y, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)), a, b, **info)
  default = gemm.pick_config(size, size, size)
  configs = [default] + [c for c in (
      gemm.GemmConfig(128, 128, 256, 4, 3), gemm.GemmConfig(128, 128, 128, 4, 2),
      gemm.GemmConfig(128, 128, 64, 4, 5)) if c != default]
  for cfg in configs:
    name = (f'pallas int8 {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}'
            + (' (default)' if cfg == default else ''))
    rec.time('gemm', name, jax.jit(lambda x, y, cfg=cfg: gemm.matmul_kmajor(
        x, y, 1.0, interpret=not common.on_cuda_gpu(), config=cfg)), a, b, **info)


def bench_quantizers(rec: Recorder, n: int):
  """The jnp quantizers alone (each one pass of its own here; in a train step they fuse into their producers)."""
  be = PallasBackend()
  x = jax.random.normal(jax.random.key(2), (n,), jnp.bfloat16)
  g = (jax.random.t(jax.random.key(3), 2.0, (n,)) * 1e-3).astype(jnp.bfloat16)
  ratios = quant.candidate_ratios()
  seeds = jnp.asarray([3, 4], jnp.uint32)
  info = dict(elements=n, bytes=3 * n)  # bf16 in, int8 out
  rec.time('quant', f'copy x+1 bf16 n={n}', jax.jit(lambda v: v + 1), x, elements=n, bytes=4 * n)

  def gradient(clip):  # clip: 'stored' (given), 'max-abs' (no DSGC) or 'search' (a DSGC search step)
    def run(v, s):
      c = {'stored': jnp.float32(3e-3), 'max-abs': quant.safe_clip(quant.max_abs(v))}.get(clip)
      if clip == 'search':
        c = be.search_clip(v, ratios=ratios, refine=8)
      q = quant.quantize(v, c, seeds=s)
      return q, quant.deviation_sums(v, q, c)
    return jax.jit(run)

  rec.time('quant', f'jnp RTN (clip given) n={n}', jax.jit(lambda v: quant.quantize(v, jnp.float32(2.0))), x,
           **info)
  rec.time('quant', f'jnp grad SR+deviation (stored clip) n={n}', gradient('stored'), g, seeds, **info)
  rec.time('quant', f'jnp grad max-abs clip (no DSGC) n={n}', gradient('max-abs'), g, seeds, **info)
  rec.time('quant', f'grad DSGC search step (Pallas search) n={n}', gradient('search'), g, seeds, **info)


def bench_conv(rec: Recorder, layer: Conv, seed: int, wgrad_layouts=(), fwd_warps=()):
  """The bf16 ops, the int8 path of the default backend, and alternatives (section "alt")."""
  be = PallasBackend()
  geom = layer.geometry
  spatial, kernel = (layer.size,) * 2, (layer.kernel,) * 2
  ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(ks[0], (BATCH, *spatial, layer.cin), jnp.bfloat16)
  w = (jax.random.normal(ks[1], (*kernel, layer.cin // layer.groups, layer.cout)) * 0.05).astype(jnp.bfloat16)
  g = jax.random.normal(ks[2], (BATCH, layer.out_size, layer.out_size, layer.cout), jnp.bfloat16) * 1e-3
  xq = quant.quantize(x, quant.max_abs(x))
  wq = quant.quantize(w, quant.max_abs(w))
  gq = quant.quantize(g, quant.max_abs(g))
  dims = ('NHWC', 'HWIO', 'NHWC')
  info = dict(layer=layer.name, ops=2 * layer.macs)

  def bf16_fwd(x, w):
    return lax.conv_general_dilated(x, w, geom.window_strides, geom.padding, dimension_numbers=dims,
                                    feature_group_count=layer.groups)

  rec.time('conv', 'bf16 fwd', jax.jit(bf16_fwd), x, w, **info)
  rec.time('conv', 'bf16 dgrad', jax.jit(lambda x, w, g: jax.vjp(lambda v: bf16_fwd(v, w), x)[1](g)[0]),
           x, w, g, **info)
  rec.time('conv', 'bf16 wgrad', jax.jit(lambda x, w, g: jax.vjp(lambda v: bf16_fwd(x, v), w)[1](g)[0]),
           x, w, g, **info)
  rec.time('conv', 'int8 quantize x, w (max-abs + RTN)', jax.jit(
      lambda x, w: (quant.quantize(x, quant.max_abs(x)), quant.quantize(w, quant.max_abs(w)))), x, w, **info)
  seeds = jnp.asarray([5, 6], jnp.uint32)
  rec.time('conv', 'int8 quantize g (SR + deviation)', jax.jit(
      lambda g, s: (lambda q: (q, quant.deviation_sums(g, q, 1e-3)))(quant.quantize(g, 1e-3, seeds=s))), g, seeds,
           **info)
  plan = {op: be.plan(op, x.shape, w.shape, geom) for op in ('conv', 'dgrad', 'wgrad')}
  rec.time('conv', f'int8 fwd {plan["conv"]}', jax.jit(lambda x, w: be.conv(x, w, geom, 0.5)), xq, wq, **info)
  rec.time('conv', f'int8 dgrad {plan["dgrad"]}', jax.jit(lambda g, w: be.conv_dgrad(g, w, geom, spatial, 0.5)),
           gq, wq, **info)
  rec.time('conv', f'int8 wgrad {plan["wgrad"]}', jax.jit(lambda x, g: be.conv_wgrad(x, g, geom, kernel, 0.5)),
           xq, gq, **info)
  for layout in wgrad_layouts:
    b = PallasBackend(wgrad_layout=layout)
    if b.plan('wgrad', x.shape, w.shape, geom) != plan['wgrad']:
      rec.time('alt', f'int8 wgrad gemm-{layout}', jax.jit(
          lambda x, g, b=b: b.conv_wgrad(x, g, geom, kernel, 0.5)), xq, gq, **info)
  for warps in fwd_warps:
    cfg = conv.pick_config(BATCH * layer.out_size ** 2, layer.cout, layer.cin, layer.kernel ** 2)
    cfg = dataclasses.replace(cfg, num_warps=warps)
    rec.time('alt', f'int8 fwd gemm {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{warps}', jax.jit(
        lambda x, w, cfg=cfg: conv.conv_forward(x, w, geom, 0.5, interpret=not common.on_cuda_gpu(),
                                                config=cfg)), xq, wq, **info)


def conv_table(rows: list[dict]) -> list[str]:
  by_layer: dict[str, dict[str, dict]] = {}
  for row in rows:
    if row['section'] == 'conv':
      by_layer.setdefault(row['layer'], {})[row['name']] = row
  lines = ['| layer | int8 path fwd / dgrad / wgrad | bf16 fwd, dgrad, wgrad (us) '
           '| int8 quant, fwd, dgrad, wgrad (us) | int8/bf16 speedup fwd, dgrad, wgrad | total bf16 -> int8 (us) '
           '| speedup incl. quant | int8 TOP/s fwd, dgrad, wgrad |', '|---|---|---|---|---|---|---|---|']
  for layer, r in by_layer.items():
    us = lambda name: r.get(name, {}).get('us')
    pick = lambda op: next((n for n in r if n.startswith(f'int8 {op} ')), None)
    f8, d8, w8 = pick('fwd'), pick('dgrad'), pick('wgrad')
    bf = [us('bf16 fwd'), us('bf16 dgrad'), us('bf16 wgrad')]
    i8 = [us(f8) if f8 else None, us(d8) if d8 else None, us(w8) if w8 else None]
    quant_us = [us('int8 quantize x, w (max-abs + RTN)'), us('int8 quantize g (SR + deviation)')]
    fmt = lambda v: '-' if v is None else f'{v:.0f}'
    ratio = lambda a, b: '-' if a is None or b is None else f'{a / b:.2f}'
    ops = next(iter(r.values())).get('ops', 0)
    tops = lambda t: '-' if t is None else f'{ops / t / 1e6:.0f}'
    total_bf = None if None in bf else sum(bf)
    total_i8 = None if None in i8 + quant_us else sum(i8) + sum(quant_us)
    paths = ' / '.join(n.split(' ', 2)[2] if n else '-' for n in (f8, d8, w8))
    quant_total = None if None in quant_us else sum(quant_us)
    lines.append(f'| {layer} | {paths} | {", ".join(map(fmt, bf))} | {fmt(quant_total)}, '
                 f'{", ".join(map(fmt, i8))} | {", ".join(ratio(a, b) for a, b in zip(bf, i8))} | '
                 f'{fmt(total_bf)} -> {fmt(total_i8)} | {ratio(total_bf, total_i8)} | '
                 f'{", ".join(map(tops, i8))} |')
  return lines


def flat_table(rows: list[dict], section: str) -> list[str]:
  lines = ['| layer | variant | us | TOP/s or GB/s |', '|---|---|---|---|']
  for row in rows:
    if row['section'] != section:
      continue
    if 'error' in row:
      lines.append(f'| {row.get("layer", "")} | {row["name"]} | ERROR | {row["error"][:160]} |')
      continue
    rate = (f'{row["ops"] / row["us"] / 1e6:.0f} TOP/s' if 'ops' in row
            else f'{row["bytes"] / row["us"] / 1e3:.0f} GB/s' if 'bytes' in row else '')
    lines.append(f'| {row.get("layer", "")} | {row["name"]} | {row["us"]:.1f} | {rate} |')
  return lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--budget', type=float, default=270.0, help='seconds after which no new timing starts')
  parser.add_argument('--out', default=os.environ.get('OUT', ''))
  parser.add_argument('--sections', default='gemm,quant,depthwise,targets,others',
                      help='comma-separated: gemm, quant, targets, depthwise, others')
  parser.add_argument('--smoke', action='store_true', help='tiny sizes: a quick run of this script on a CPU')
  args = parser.parse_args(argv)
  global BATCH
  gemm_size, quant_size, shrink = 8192, BATCH * 56 * 56 * 256, lambda layers: layers
  if args.smoke:
    BATCH, gemm_size, quant_size = 1, 96, 3000
    shrink = lambda layers: tuple(
        dataclasses.replace(layer, size=min(layer.size, 9), cin=min(layer.cin, 32) if layer.groups == 1 else 16,
                            cout=min(layer.cout, 32) if layer.groups == 1 else 16, groups=min(layer.groups, 16))
        for layer in layers[:2])
  dev = jax.devices()[0]
  print(f'jax {jax.__version__}, {dev.device_kind}, batch {BATCH}', flush=True)
  rec = Recorder(args.out, args.budget)
  sections = args.sections.split(',')
  work = {
      'gemm': [lambda: bench_gemm(rec, gemm_size)],
      'quant': [lambda: bench_quantizers(rec, quant_size)],
      'targets': [lambda layer=layer, i=i: bench_conv(rec, layer, i, WGRAD_ALTERNATES,
                                                      (4,) if layer.kernel == 3 else (8,))
                  for i, layer in enumerate(shrink(RESNET_TARGETS))],
      'depthwise': [lambda layer=layer, i=i: bench_conv(rec, layer, i)
                    for i, layer in enumerate(shrink(DEPTHWISE))],
      'others': [lambda layer=layer, i=i: bench_conv(rec, layer, i, WGRAD_ALTERNATES)
                 for i, layer in enumerate(shrink(RESNET_OTHERS))],
  }
  for section in sections:
    for job in work[section]:
      job()
  report = [f'# jint8 kernels, {dev.device_kind}, jax {jax.__version__}, batch {BATCH}', '',
            f'## int8 GEMM {gemm_size}^3', *flat_table(rec.rows, 'gemm'), '',
            '## Quantizers (bf16 in, int8 out)', *flat_table(rec.rows, 'quant'), '',
            '## Conv layers (chosen path)', *conv_table(rec.rows), '',
            '## Alternatives', *flat_table(rec.rows, 'alt'), '',
            f'skipped after the {args.budget:.0f} s budget: {", ".join(rec.skipped) or "nothing"}',
            f'elapsed {time.perf_counter() - rec.start:.0f} s']
  text = '\n'.join(report)
  print(text, flush=True)
  if args.out:
    with open(os.path.join(args.out, 'kernels.md'), 'w') as f:
      f.write(text + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
