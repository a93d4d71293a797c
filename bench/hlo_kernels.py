"""How many kernels a compiled step launches, counted in its optimized HLO.

Every instruction that runs as a device kernel counts once: a fusion (however many ops it fused), a custom call
(cuDNN, cuBLAS, a Pallas kernel), and the unfused ops that XLA emits as kernels of their own (copies, sorts,
random-number generators, collectives, ...). A ``while`` body counts once (one iteration), and of a
``conditional`` only the branch asked for: ``kernels(text, branch=0)`` counts the false branch of the outermost
``lax.cond``, the step between two DSGC searches in ``jint8.nn.search_cond``.
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
  m = _INSTRUCTION.search(re.sub(r'/\*.*?\*/', '', line))  # tuple types carry /*index=N*/ comments
  return m.group(1) if m else None


def _called(line: str, key: str) -> list[str]:
  m = re.search(key + r'=\{?([^}]*?)\}?(?:,\s*[a-z_]+=|$)', line)
  if not m:
    return []
  return [name.strip().lstrip('%') for name in m.group(1).split(',') if name.strip()]


def branches(line: str) -> list[str]:
  """The branch computations of a ``conditional``, in ``lax.switch`` order: for a boolean predicate (``lax.cond``)
  the false branch first, then the true branch."""
  return _called(line, 'branch_computations') or (
      _called(line, 'false_computation') + _called(line, 'true_computation'))


def kernels(text: str, branch: int | None = None) -> int:
  """Kernels one run of the module's entry computation launches; a ``while`` loop counts as one iteration of its
  body. ``branch`` picks the branch of the outermost ``conditional`` (``lax.cond``'s index: 0 for its false
  branch); nested conditionals, and the outermost one when ``branch`` is ``None``, count their largest branch."""
  comps, entry = computations(text)

  def count(name: str, pick: int | None) -> int:
    total = 0
    for line in comps[name]:
      op = _opcode(line)
      if op == 'conditional':
        names = branches(line)
        total += count(names[pick], None) if pick is not None else max(count(b, None) for b in names)
      elif op == 'while':
        total += count(_called(line, 'body')[0], pick)
      elif op == 'call':
        total += count(_called(line, 'to_apply')[0], pick)
      elif op in KERNEL_OPS:
        total += 1
    return total

  return count(entry, branch)
