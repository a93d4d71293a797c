"""The import layers of docs/design.md: a jint8 module imports only modules of its own or a lower layer, and the
library (what ``import jint8`` gives) imports nothing but the standard library and its core dependencies.

Every import statement counts, also one inside a function.
"""

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'jint8'

# Lowest first; a module belongs to the layer of the longest name listed here that it is or lies in.
LAYERS = (
    ('jint8.quant', 'jint8.sharding'),  # quantization math; the data-parallel mesh
    ('jint8.state',),  # the layers' quantization state
    ('jint8.backend',),  # the integer backends' interface, the XLA reference, the registry
    ('jint8.pallas',),  # the Pallas GPU kernels and their backend
    ('jint8.ops',),
    ('jint8.nn', 'jint8.nnx'),
    ('jint8.optim',),
    ('jint8',),  # the package itself: import jint8
    ('jint8.models',),
    ('jint8.datasets', 'jint8.input_pipeline'),
    ('jint8.training',),
    ('jint8.classification', 'jint8.detection'),
    ('jint8.compare',),
)
LIBRARY = LAYERS.index(('jint8',))  # this layer and those below it are the library
CORE_DEPENDENCIES = {'jax', 'jaxlib', 'flax', 'optax', 'numpy'}  # pyproject.toml's dependencies


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob('*.py'))}


def layer(module: str) -> int | None:
  """The index in ``LAYERS`` of ``module``'s layer (``None``: in none)."""
  for name in sorted((n for names in LAYERS for n in names), key=len, reverse=True):
    if module == name or module.startswith(name + '.'):
      return next(i for i, names in enumerate(LAYERS) if name in names)
  return None


def imports(module: str, source: str) -> set[str]:
  """The modules that ``source``, the code of ``module``, imports (``from jint8 import ops`` imports
  ``jint8.ops``)."""
  package = module if MODULES.get(module, pathlib.Path()).name == '__init__.py' else module.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] + ([base] if base else []))
      for alias in node.names:
        found.add(f'{base}.{alias.name}' if f'{base}.{alias.name}' in MODULES else base)
  return found


def upward_imports(module: str, source: str) -> list[str]:
  """The jint8 modules that ``module`` imports from a layer above its own."""
  return sorted(name for name in imports(module, source)
                if name.split('.')[0] == 'jint8' and layer(name) > layer(module))


def outside_dependencies(source: str) -> list[str]:
  """The imported packages that are neither jint8, the standard library nor a core dependency."""
  return sorted({name.split('.')[0] for name in imports('', source)} - {'jint8'} - CORE_DEPENDENCIES
                - set(sys.stdlib_module_names))


def test_every_module_has_a_layer():
  assert [m for m in MODULES if layer(m) is None] == []


@pytest.mark.parametrize('module', sorted(MODULES))
def test_no_module_imports_a_higher_layer(module):
  assert upward_imports(module, MODULES[module].read_text()) == []


@pytest.mark.parametrize('module', sorted(m for m in MODULES if layer(m) <= LIBRARY))
def test_the_library_needs_only_its_core_dependencies(module):
  assert outside_dependencies(MODULES[module].read_text()) == []


def test_the_checks_catch_what_they_are_for():
  assert upward_imports('jint8.ops', 'from jint8 import nn\nfrom jint8 import quant') == ['jint8.nn']
  assert upward_imports('jint8.pallas.conv', 'def f():\n  from jint8.training import metrics') == [
      'jint8.training.metrics']
  assert upward_imports('jint8.pallas.conv', 'from . import common\nfrom .. import optim') == ['jint8.optim']
  assert upward_imports('jint8.training.run', 'from jint8 import sharding, models') == []
  assert outside_dependencies('import os\nimport jax.numpy as jnp\nfrom ml_collections import config_dict\n'
                              'def f():\n  import tensorboardX') == ['ml_collections', 'tensorboardX']
