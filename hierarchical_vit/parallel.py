"""Device mesh, shardings and multi-process setup.

The mesh has two axes, ('data', 'fsdp'). The batch is split over both of them
(every device sees a different slice of the batch). Parameters are replicated
over 'data' and, when the 'fsdp' axis has more than one device, large
parameters are additionally split over 'fsdp' (ZeRO-3 / FSDP style); XLA's
sharding propagation inserts the all-gathers and reduce-scatters.
"""

import os

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Parameters with fewer elements than this stay replicated under FSDP: the
# communication latency of sharding them costs more than the memory saved.
FSDP_MIN_SIZE = 2**18


def initialize_distributed(coordinator_address: str = '',
                           num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Calls `jax.distributed.initialize` when running with several processes.

  Arguments fall back to the env vars JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID. With no coordinator given anywhere this
  is a no-op (single process), unless a cluster JAX detects by itself (SLURM,
  TPU pod) is present, in which case `jax.distributed.initialize()` with no
  arguments is what that cluster needs and callers should pass
  coordinator_address='auto'.
  """
  coordinator_address = coordinator_address or os.environ.get(
      'JAX_COORDINATOR_ADDRESS', '')
  if not coordinator_address:
    return
  if coordinator_address == 'auto':
    jax.distributed.initialize()
    return
  num_processes = num_processes or int(os.environ.get('JAX_NUM_PROCESSES', 1))
  if process_id < 0:
    process_id = int(os.environ.get('JAX_PROCESS_ID', 0))
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)


def create_mesh(mesh_config: ml_collections.ConfigDict) -> Mesh:
  """Builds the mesh from config.mesh; one -1 in the shape takes the rest."""
  axes = tuple(mesh_config.axes)
  shape = list(mesh_config.shape)
  num_devices = jax.device_count()
  if shape.count(-1) > 1:
    raise ValueError(f'At most one -1 in mesh.shape, got {shape}.')
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if num_devices % known:
      raise ValueError(f'{num_devices} devices do not split into mesh {shape}.')
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f'Mesh {dict(zip(axes, shape))} does not use all '
                     f'{num_devices} devices.')
  # Auto axes: plain jit sharding propagation (jax>=0.7 defaults to Explicit).
  return jax.make_mesh(tuple(shape), axes,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over all mesh axes; the rest replicated."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """Shards the largest dim divisible by fsdp_size; small arrays replicated."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, state, fsdp_axis: str = 'fsdp'):
  """NamedShardings for a pytree of arrays (params, optimizer state, EMA).

  Pure data parallel (fsdp axis of size 1) replicates everything.
  """
  fsdp_size = mesh.shape.get(fsdp_axis, 1)
  return jax.tree.map(
      lambda x: NamedSharding(
          mesh, fsdp_spec(np.shape(x), fsdp_size, FSDP_MIN_SIZE)), state)


def shard_batch(batch: dict[str, np.ndarray],
                sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles global arrays from this process's slice of the global batch."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
