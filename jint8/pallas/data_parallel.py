"""The kernels under data parallelism: each device runs them on its own shard of the batch.

A Pallas kernel is a custom call that ``jax.jit``'s partitioner cannot split: on a mesh it would gather the
batch-sharded operands and compute the whole batch on every device. When a mesh is active
(``jax.set_mesh(mesh)``, as the trainers do) whose axis ``jint8.sharding.DATA_AXIS`` has more than one
device, ``map_batch`` runs a kernel under ``jax.shard_map`` instead: the batch-leading operands (activations and
gradients) split along their first axis, the others (weights, clips) replicated. Outputs are either batch-leading
too (the convs' results, per-block partial statistics, which concatenate into the single-device partials of a
differently blocked tensor) or summed over the devices (wgrad).
"""

from __future__ import annotations

from typing import Callable

import jax
from jax import lax
from jax.sharding import PartitionSpec

from jint8.sharding import DATA_AXIS


def shards(leading: int) -> int:
  """How many devices split a batch of ``leading`` rows: the active mesh's ``DATA_AXIS`` size when it is more
  than one and divides ``leading``, else 1 (the kernels then see the whole array)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names:
    return 1
  size = dict(mesh.shape)[DATA_AXIS]
  return size if size > 1 and leading % size == 0 else 1


def map_batch(fn: Callable, batched: tuple, replicated: tuple = (), *, sum_outputs: bool = False,
              with_shard_index: bool = False):
  """``fn(*batched, *replicated)`` on each device's shard of the ``batched`` arrays.

  Without a data-parallel mesh (``shards`` is 1) it is ``fn`` on the whole arrays. Otherwise every output is
  batch-leading (shards concatenated along the first axis) or, with ``sum_outputs``, summed over the devices.
  ``with_shard_index`` also passes ``shard_index``, the device's position along the batch (0 on one device).
  """
  def call(args, shard_index):
    return fn(*args, **({'shard_index': shard_index} if with_shard_index else {}))

  if shards(batched[0].shape[0] if batched[0].ndim else 1) == 1:
    return call((*batched, *replicated), 0)

  def local(*args):
    out = call(args, lax.axis_index(DATA_AXIS))
    return jax.tree.map(lambda x: lax.psum(x, DATA_AXIS), out) if sum_outputs else out

  specs = (PartitionSpec(DATA_AXIS),) * len(batched) + (PartitionSpec(),) * len(replicated)
  return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), in_specs=specs,
                       out_specs=PartitionSpec() if sum_outputs else PartitionSpec(DATA_AXIS),
                       check_vma=False)(*batched, *replicated)
