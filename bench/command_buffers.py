"""What a Pallas kernel launch costs inside and outside XLA's command buffers (CUDA graphs).

Times one jitted chain of ``--pairs`` (Pallas ``quantize`` + XLA fusion) pairs on a 256x1024 bf16 array, and a
chain of XLA fusions alone, once per ``XLA_FLAGS`` setting, each in its own process (XLA reads its flags once).
Prints a table of microseconds per pair (median of 20 calls) and writes it as markdown and JSON under ``--out``.
A Pallas kernel that XLA leaves out of its command buffers costs several microseconds more than one inside.

  python bench/command_buffers.py --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

# (label, XLA_FLAGS)
SETTINGS = (('default', ''), ('command buffers off', '--xla_gpu_enable_command_buffer='))


def measure(pairs: int, calls: int = 20) -> dict[str, float]:
  """Microseconds per pair of each chain, in this process (its XLA_FLAGS)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from jint8.pallas import quantize as quantize_kernel  # pylint: disable=g-import-not-at-top

  if jax.default_backend() != 'gpu':
    raise SystemExit(f'bench/command_buffers.py needs a GPU; the default backend is {jax.default_backend()}')

  @jax.jit
  def pallas_chain(x):
    for _ in range(pairs):
      q = quantize_kernel.quantize(x, jnp.float32(3.0), interpret=False)
      x = x * 0.999 + q.astype(jnp.bfloat16) * 1e-3
    return x

  @jax.jit
  def xla_chain(x):
    for _ in range(pairs):
      x = jax.lax.optimization_barrier(x * 0.999 + jnp.sin(x) * 1e-3)
    return x

  x = jax.random.normal(jax.random.key(0), (256, 1024), jnp.bfloat16)
  result = {}
  for name, chain in (('pallas + xla', pallas_chain), ('xla only', xla_chain)):
    chain(x).block_until_ready()
    times = []
    for _ in range(calls):
      start = time.perf_counter()
      chain(x).block_until_ready()
      times.append(time.perf_counter() - start)
    result[name] = statistics.median(times) / pairs * 1e6
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--pairs', type=int, default=200)
  parser.add_argument('--out', default='bench/results')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.pairs)))
    return

  rows = []
  for label, flags in SETTINGS:
    env = dict(os.environ, XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} {flags}'.strip())
    done = subprocess.run([sys.executable, __file__, '--child', f'--pairs={args.pairs}'], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode:
      raise SystemExit(f'{label} ({flags or "no flags"}) failed:\n{done.stderr[-2000:]}')
    rows.append({'setting': label, 'xla_flags': flags, **json.loads(done.stdout.strip().splitlines()[-1])})

  lines = [f'command buffers, {args.pairs} pairs, median of 20 calls (us per pair)', '',
           '| setting | XLA_FLAGS | Pallas + XLA fusion | XLA fusions only |', '|---|---|---|---|']
  lines += [f'| {r["setting"]} | `{r["xla_flags"]}` | {r["pallas + xla"]:.2f} | {r["xla only"]:.2f} |' for r in rows]
  table = '\n'.join(lines)
  print(table)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'command_buffers.md').write_text(table + '\n')
  (out / 'command_buffers.json').write_text(json.dumps(rows, indent=1) + '\n')


if __name__ == '__main__':
  main()
