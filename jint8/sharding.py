"""Data parallelism over every device of every process: one mesh axis, the batch sharded, the rest replicated."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The mesh axis that splits the batch (kernels that XLA cannot partition run per shard of it, see
# jint8.pallas.data_parallel).
DATA_AXIS = 'data'

# Set to 1 (or pass --multihost to train.py) to call jax.distributed.initialize() before anything else.
MULTIHOST_ENV = 'JINT8_MULTIHOST'


def maybe_initialize_distributed(multihost: bool = False) -> None:
  """Joins a multi-process run when ``multihost`` or ``$JINT8_MULTIHOST=1``.

  ``jax.distributed.initialize()`` finds the coordinator from the cluster environment (SLURM, Open MPI,
  Kubernetes, Cloud TPU) or from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
  """
  if multihost or os.environ.get(MULTIHOST_ENV) == '1':
    jax.distributed.initialize()


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh named ``DATA_AXIS`` over ``devices`` (default: all devices of all processes)."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def training_mesh(config) -> Mesh:
  """``data_mesh()`` after checking that ``config.batch_size`` and ``config.eval_batch_size`` split evenly."""
  mesh = data_mesh()
  check_batch_size(config.batch_size, mesh, 'config.batch_size')
  check_batch_size(config.eval_batch_size, mesh, 'config.eval_batch_size')
  return mesh


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (params, optimizer state, the in-memory dataset)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis is split over the devices."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, key: str) -> None:
  """Raises a ValueError naming config ``key`` unless ``batch_size`` splits evenly over the mesh."""
  if batch_size <= 0 or batch_size % mesh.size:
    raise ValueError(f'{key}={batch_size} must be a positive multiple of the number of devices ({mesh.size})')
