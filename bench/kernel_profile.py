"""Where a compiled step spends its accelerator time: kernel time from a JAX profiler trace, by category.

``profile(run, steps, logdir)`` traces ``steps`` calls of ``run`` (each must finish its step) with
``jax.profiler.trace(..., create_perfetto_trace=True)``, then ``breakdown`` sums the duration of every kernel the
device streams ran, by the first category of ``CATEGORIES`` whose substring its name holds, per step. The time
of a step not covered by kernels (launch gaps, host work, waits) is the row ``idle``.
"""

from __future__ import annotations

import gzip
import json
import pathlib
import time
from typing import Callable, Iterable

import jax

# (category, substrings of kernel names); the first category with a matching substring wins.
CATEGORIES = (
    ('int8 wgrad (Pallas)', ('jint8_conv_wgrad', 'jint8_depthwise_wgrad')),
    ('int8 fwd / dgrad / GEMM (Pallas)', ('jint8_conv', 'jint8_depthwise', 'jint8_gemm')),
    ('quantization (Pallas)', ('jint8_quantize', 'jint8_clip_scores')),
    ('XLA conv / GEMM (cuDNN, cuBLAS)', ('cudnn', 'cublas', 'cutlass', 'xmma', 'gemm', 'implicit_convolve',
                                         'sm90_', 'sm80_')),
    ('collectives (NCCL)', ('nccl', 'all_reduce', 'all-reduce')),
    ('layout copies (transpose, copy)', ('transpose', 'copy')),
    ('reductions (BN statistics, sums)', ('reduce', 'reduction')),
    ('elementwise fusions (BN, ReLU, optimizer)', ('fusion', 'loop_', 'convert', 'multiply', 'add')),
)
OTHER = 'other kernels'


def category(kernel_name: str) -> str:
  """The category of ``CATEGORIES`` a kernel belongs to (``OTHER`` when none matches)."""
  name = kernel_name.lower()
  for label, substrings in CATEGORIES:
    if any(s in name for s in substrings):
      return label
  return OTHER


def device_kernels(trace_events: Iterable[dict]) -> list[tuple[str, float]]:
  """``(name, duration in us)`` of the complete events on device processes (``/device:``) of a perfetto trace."""
  events = list(trace_events)
  device_pids = {e['pid'] for e in events
                 if e.get('ph') == 'M' and e.get('name') == 'process_name'
                 and '/device:' in e.get('args', {}).get('name', '')}
  return [(e['name'], float(e['dur'])) for e in events
          if e.get('ph') == 'X' and e.get('pid') in device_pids and 'dur' in e]


def breakdown(kernels: list[tuple[str, float]], steps: int, step_us: float) -> dict[str, float]:
  """Microseconds per step by category (in ``CATEGORIES`` order, then ``OTHER``), plus ``idle``: the step time
  ``step_us`` minus all kernel time (0 when kernels overlap on several streams)."""
  totals = {label: 0.0 for label, _ in CATEGORIES} | {OTHER: 0.0}
  for name, duration in kernels:
    totals[category(name)] += duration / steps
  totals['idle'] = max(0.0, step_us - sum(totals.values()))
  return totals


def profile(run: Callable[[], object], steps: int, logdir: str | pathlib.Path) -> dict[str, float]:
  """Traces ``steps`` calls of ``run`` (after one untraced call) and returns ``breakdown`` of the trace."""
  logdir = pathlib.Path(logdir)
  logdir.mkdir(parents=True, exist_ok=True)
  jax.block_until_ready(run())
  with jax.profiler.trace(str(logdir), create_perfetto_trace=True):
    start = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(run())
    step_us = (time.perf_counter() - start) / steps * 1e6
  trace = max(logdir.glob('**/perfetto_trace.json.gz'), key=lambda p: p.stat().st_mtime)
  with gzip.open(trace) as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  return breakdown(device_kernels(events), steps, step_us)


def format_table(rows: dict[str, dict[str, float]]) -> str:
  """A Markdown table: a column per profiled configuration (``rows``), us per step and share of the step."""
  names = list(rows)
  labels = list(next(iter(rows.values())))
  lines = ['| category | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
  for label in labels:
    cells = []
    for name in names:
      total = sum(rows[name].values())
      cells.append(f'{rows[name][label]:,.0f} us ({100 * rows[name][label] / total:.0f}%)')
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  lines.append('| step | ' + ' | '.join(f'{sum(rows[n].values()):,.0f} us' for n in names) + ' |')
  return '\n'.join(lines)
