"""End-to-end train-step speed and memory: bf16 XLA against jint8 int8, in one run.

Modes: ``bf16`` (Flax model in bf16, XLA convs), ``int8`` (jint8's default: the delayed activation clip and the
stored DSGC gradient clip, quantizers fused into their producers, the DSGC search every ``period`` steps in a
second trace, ``jint8.nn.search_cond``, as the trainers do), ``int8-maxabs`` (as ``int8`` with this step's
max-abs as the activation clip: ``input_clip="maxabs"``), ``int8-search`` (the DSGC search on every step),
``int8-unguarded`` (as ``int8`` without skipping non-finite steps: ``int8_optimizer(skip_nonfinite=False)``),
``int8-float-depthwise`` (as ``int8``, depthwise convs in bf16: ``Int8Policy(keep_depthwise_float=True)``) and
``int8-depthwise-channel-clips`` (as ``int8``, depthwise weights with a clip per channel).
The table's header names ``XLA_FLAGS`` when set. The modes of one model compile one after another (or at once on
``--compile_workers`` threads: faster, but XLA then times its cuDNN conv candidates while other compiles use the
GPU, which may pick slower algorithms for the bf16 row), then run one after another on an otherwise idle device.
Synthetic data; SGD with momentum; BN in the model's dtype. Prints a table (median images/s over ``--steps`` steps
after warm-up, the ratio to bf16, the compiled step's memory from XLA's memory analysis, and the kernels one step
launches, counted in the optimized HLO (``hlo_kernels``; for int8 the step between two searches) with the extra
kernels per int8 layer over bf16) and writes it as markdown and JSON under ``--out``. With ``--profile`` it also
traces 5 steps of each row and tabulates the device time by kernel category (``kernel_profile.py``).

  python bench/train_step.py --models resnet50,resnet20,mobilenet_v2 --backend pallas [--profile] --out $OUT
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jint8
import hlo_kernels
import kernel_profile
from jint8 import models
from jint8 import state as quant_state

# model -> (image size, batch size, classes)
SHAPES = {'resnet50': (224, 256, 1000), 'resnet18': (224, 256, 1000), 'resnet20': (32, 512, 10),
          'mobilenet_v2': (32, 512, 10)}
MODES = ('bf16', 'int8', 'int8-maxabs', 'int8-search', 'int8-unguarded', 'int8-float-depthwise',
         'int8-depthwise-channel-clips')


def build_step(model_name: str, mode: str, backend: str, period: int):
  """The jitted step of ``mode``, its arguments, the batch size and the number of int8 layers."""
  size, batch, classes = SHAPES[model_name]
  model = models.create_model(model_name, num_classes=classes, dtype=jnp.bfloat16)
  if mode != 'bf16':
    config = jint8.nn.Int8Config(backend=backend, input_clip='maxabs' if mode == 'int8-maxabs' else 'delayed',
                                 depthwise_channel_clips=mode == 'int8-depthwise-channel-clips')
    policy = jint8.nn.Int8Policy(keep_depthwise_float=mode == 'int8-float-depthwise')
    model = jint8.nn.Int8Model(model, config=config, policy=policy)
  inner = optax.sgd(0.1, momentum=0.9)
  tx = optax.with_extra_args_support(inner) if mode == 'bf16' else jint8.optim.int8_optimizer(
      inner, skip_nonfinite=mode != 'int8-unguarded')
  period = 1 if mode == 'int8-search' else period
  images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.bfloat16)
  labels = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, classes)
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(2), x, train=False))(images)
  params, int8_state = variables['params'], variables.get(jint8.nn.STATE_COLLECTION, {})
  opt_state = tx.init(params)
  batch_stats = variables['batch_stats']

  def model_step(model, step, params, int8_state, opt_state, batch_stats, images, labels):
    def loss_fn(params, int8_state):
      v = {'params': params, 'batch_stats': batch_stats, jint8.nn.STATE_COLLECTION: int8_state}
      logits, updated = model.apply(v, images, train=True, mutable=['batch_stats'],
                                    rngs={jint8.nn.ROUNDING_RNG: jax.random.fold_in(jax.random.key(3), step)})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
      return loss, updated['batch_stats']

    (loss, batch_stats), (g_params, g_state) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, int8_state)
    int8_state = quant_state.update(int8_state, g_state) if int8_state else int8_state
    updates, opt_state = tx.update(g_params, opt_state, params, int8_state=int8_state)
    return step + 1, optax.apply_updates(params, updates), int8_state, opt_state, batch_stats, loss

  def step(step, params, int8_state, *args):
    return jint8.nn.search_cond(model_step, model, int8_state, step, period, step, params, int8_state, *args)

  step = jax.jit(step, donate_argnums=(1, 2, 3, 4))
  layers = len(quant_state.layer_stats(int8_state))
  return step, (jnp.int32(0), params, int8_state, opt_state, batch_stats, images, labels), batch, layers


def compile_steps(model_name: str, modes: list[str], backend: str, period: int, workers: int) -> dict:
  """Builds and lowers each mode's step, then compiles them on ``workers`` threads (XLA compiles without the GIL).

  Returns mode -> (compiled step, arguments, batch, int8 layers, seconds from the first compile to this one's
  end), or mode -> the exception that building or compiling it raised.
  """
  lowered, result = {}, {}
  for mode in modes:
    try:
      step, args, batch, layers = build_step(model_name, mode, backend, period)
      lowered[mode] = (step.lower(*args), args, batch, layers)
    except Exception as e:  # reported in the table; the other modes still run
      result[mode] = e
  t0 = time.perf_counter()

  def compile_one(mode):
    compiled = lowered[mode][0].compile()
    return compiled, time.perf_counter() - t0

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    futures = {mode: pool.submit(compile_one, mode) for mode in lowered}
    for mode, future in futures.items():
      try:
        compiled, seconds = future.result()
        result[mode] = (compiled, *lowered[mode][1:], seconds)
      except Exception as e:
        result[mode] = e
  return result


def measure(model_name: str, mode: str, compiled, args, batch: int, layers: int, steps: int, warmup: int,
            profile_dir: pathlib.Path | None = None, hlo_dir: pathlib.Path | None = None) -> dict:
  memory = compiled.memory_analysis()
  peak = None
  if memory is not None:
    peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes)
  hlo = compiled.as_text()
  kernels = hlo_kernels.kernels(hlo, branch=0)  # int8: search_cond's step between searches
  if hlo_dir is not None:
    hlo_dir.mkdir(parents=True, exist_ok=True)
    (hlo_dir / f'{model_name}-{mode}.hlo.txt').write_text(hlo)
  state, (images, labels) = args[:5], args[5:]
  times = []
  for i in range(warmup + steps):
    t = time.perf_counter()
    *state, loss = compiled(*state, images, labels)
    loss.block_until_ready()
    if i >= warmup:
      times.append(time.perf_counter() - t)
  if not np.isfinite(float(loss)):
    raise RuntimeError(f'{model_name} {mode}: non-finite loss {float(loss)}')
  median = statistics.median(times)
  row = {'model': model_name, 'mode': mode, 'batch': batch, 'images_per_s': batch / median,
         'step_ms': median * 1e3, 'spread_ms': (max(times) - min(times)) * 1e3,
         'peak_bytes': peak, 'loss': float(loss), 'kernels': kernels, 'int8_layers': layers}
  if profile_dir is not None:

    def run():
      nonlocal state
      *state, step_loss = compiled(*state, images, labels)
      return step_loss

    row['profile_us'] = kernel_profile.profile(run, 5, profile_dir / f'{model_name}-{mode}')
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default='resnet50,resnet20,mobilenet_v2')
  parser.add_argument('--modes', default=','.join(MODES))
  parser.add_argument('--backend', default='pallas', choices=('pallas', 'xla'))
  parser.add_argument('--period', type=int, default=100)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--out', default='bench/results')
  parser.add_argument('--compile_workers', type=int, default=1,
                      help='modes of one model compiled at once; more saves compile time but may slow the XLA '
                           'rows (bench/RESULTS.md: autotuning timed under concurrent compiles)')
  parser.add_argument('--profile', action='store_true', help='trace 5 steps per row: device time by kernel kind')
  parser.add_argument('--dump_hlo', action='store_true', help='write each compiled step\'s optimized HLO to --out')
  parser.add_argument('--commit', default=None, help="the code's commit, recorded in the JSON (default: git's HEAD)")
  args = parser.parse_args()
  for name in args.models.split(','):
    if name not in SHAPES:
      parser.error(f'unknown model {name!r}; choose from {", ".join(SHAPES)}')
  for mode in args.modes.split(','):
    if mode not in MODES:
      parser.error(f'unknown mode {mode!r}; choose from {", ".join(MODES)}')

  rows = []
  modes = args.modes.split(',')
  for name in args.models.split(','):
    built = compile_steps(name, modes, args.backend, args.period, args.compile_workers)
    for mode in modes:  # timed one after another, after every compilation of this model has ended
      try:
        if isinstance(built[mode], Exception):
          raise built[mode]
        compiled, step_args, batch, layers, compile_s = built.pop(mode)
        row = measure(name, mode, compiled, step_args, batch, layers, args.steps, args.warmup,
                      pathlib.Path(args.out) / 'traces' if args.profile else None,
                      pathlib.Path(args.out) if args.dump_hlo else None)
        row['compile_s'] = compile_s
      except Exception as e:  # a failing configuration is reported in the table, the others still run
        row = {'model': name, 'mode': mode, 'error': f'{type(e).__name__}: {str(e)[:300]}'}
      rows.append(row)
      print(json.dumps(row), flush=True)

  device = jax.devices()[0].device_kind
  run = {'card': device, 'jax': jax.__version__, 'date': datetime.date.today().isoformat(),
         'commit': args.commit or _git_head(), 'backend': args.backend}
  rows = [dict(r, **run) for r in rows]
  header = (f"train step, {device}, JAX {jax.__version__}, backend {args.backend}, {run['date']}, commit "
            f"{run['commit']}, median of {args.steps} steps, {args.compile_workers} compile worker(s)"
            + (f", XLA_FLAGS={os.environ['XLA_FLAGS']}" if os.environ.get('XLA_FLAGS') else ''))
  lines = [header, '', '| model | mode | batch | img/s | vs bf16 | step ms | peak memory GiB | vs bf16 '
           '| kernels per step | extra per int8 layer | compiled after s |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  base = {r['model']: r for r in rows if r['mode'] == 'bf16' and 'error' not in r}
  for r in rows:
    if 'error' in r:
      lines.append(f"| {r['model']} | {r['mode']} | | failed: {r['error'][:120]} | | | | | | | |")
      continue
    b = base.get(r['model'])
    speed = f"{r['images_per_s'] / b['images_per_s']:.2f}x" if b else ''
    mem = f"{r['peak_bytes'] / b['peak_bytes']:.2f}x" if b and r['peak_bytes'] and b['peak_bytes'] else ''
    peak = f"{r['peak_bytes'] / 2**30:.1f}" if r['peak_bytes'] else ''
    extra = f"{(r['kernels'] - b['kernels']) / r['int8_layers']:.2f}" if b and r['int8_layers'] else ''
    lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['images_per_s']:.0f} | {speed} | "
                 f"{r['step_ms']:.1f} | {peak} | {mem} | {r['kernels']} | {extra} | {r['compile_s']:.0f} |")
  profiles = {f"{r['model']} {r['mode']}": r['profile_us'] for r in rows if 'profile_us' in r}
  if profiles:
    lines += ['', 'Device time per step by kernel category (5 traced steps):', '',
              kernel_profile.format_table(profiles)]
  table = '\n'.join(lines)
  print(table)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'train_step.md').write_text(table + '\n')
  (out / 'train_step.json').write_text(json.dumps(rows, indent=1))


def _git_head() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, check=True,
                          cwd=pathlib.Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


if __name__ == '__main__':
  main()
