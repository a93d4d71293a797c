"""How many kernels a compiled step launches, counted in its optimized HLO.

Every instruction that runs as a device kernel counts once: a fusion (however many ops it fused), a custom call
(cuDNN, cuBLAS, a Pallas kernel), and the unfused ops that XLA emits as kernels of their own (copies, sorts,
random-number generators, collectives, ...). A ``while`` body counts once (one iteration), and of a
``conditional`` only the branch asked for: ``kernels(text, branch=1)`` counts the second branch, e.g. the step
between two DSGC searches that ``jint8.nn.search_cond`` puts in the false branch of its ``lax.cond``.
"""

from __future__ import annotations

import re

# Ops that launch a kernel when they are not inside a fusion.
KERNEL_OPS = frozenset({
    'fusion', 'custom-call', 'copy', 'sort', 'rng-bit-generator', 'rng', 'reduce', 'reduce-window',
    'select-and-scatter', 'scatter', 'gather', 'dot', 'convolution', 'transpose', 'all-reduce', 'all-gather',
    'reduce-scatter', 'all-to-all', 'collective-permute', 'dynamic-slice', 'dynamic-update-slice', 'pad',
    'concatenate', 'slice', 'broadcast', 'iota', 'convert', 'add', 'multiply', 'subtract', 'divide', 'maximum',
    'minimum', 'select', 'compare', 'exponential', 'rsqrt', 'sqrt', 'negate', 'abs', 'and', 'or', 'not', 'xor',
    'clamp', 'round-nearest-even', 'floor', 'shift-right-logical', 'shift-left', 'reverse', 'cholesky',
    'triangular-solve', 'fft',
})

_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_INSTRUCTION = re.compile(r'=\s*(?:\([^=]*\)|[\w\[\]{},:\s]*?)\s*([a-z][a-z0-9\-]*)\(')


def computations(text: str) -> tuple[dict[str, list[str]], str]:
  """The HLO module's computations, name -> instruction lines, and the name of its entry computation."""
  comps: dict[str, list[str]] = {}
  entry, current = '', None
  for line in text.splitlines():
    stripped = line.strip()
    if current is None:
      m = _COMPUTATION.match(stripped)
      if m and not stripped.startswith('HloModule'):
        current = m.group(1)
        comps[current] = []
        if stripped.startswith('ENTRY'):
          entry = current
    elif stripped == '}':
      current = None
    elif stripped:
      comps[current].append(stripped)
  if not entry:
    raise ValueError('no ENTRY computation in the HLO text')
  return comps, entry


def _opcode(line: str) -> str | None:
  m = _INSTRUCTION.search(line)
  return m.group(1) if m else None


def _called(line: str, key: str) -> list[str]:
  m = re.search(key + r'=\{?([^}]*?)\}?(?:,\s*[a-z_]+=|$)', line)
  if not m:
    return []
  return [name.strip().lstrip('%') for name in m.group(1).split(',') if name.strip()]


def kernels(text: str, branch: int | None = None) -> int:
  """Kernels one run of the module's entry computation launches; ``branch`` picks the branch of every
  ``conditional`` (``None``: the first); a ``while`` loop counts as one iteration of its body."""
  comps, entry = computations(text)

  def count(name: str) -> int:
    total = 0
    for line in comps[name]:
      op = _opcode(line)
      if op == 'conditional':
        branches = _called(line, 'branch_computations') or (
            _called(line, 'true_computation') + _called(line, 'false_computation'))
        total += count(branches[branch or 0])
      elif op == 'while':
        total += count(_called(line, 'body')[0])
      elif op == 'call':
        total += count(_called(line, 'to_apply')[0])
      elif op in KERNEL_OPS:
        total += 1
    return total

  return count(entry)
