"""Device mesh, sharding strategies and multi-process setup.

The mesh has two axes, ('data', 'fsdp'). The batch is always split over both
(every device sees a different slice of the batch); `config.mesh.strategy`
decides where the train state (params, optimizer state, EMA) lives:

  data_parallel: replicated on every device; gradients are all-reduced.
  fsdp:          each array with at least `fsdp_min_size` elements is split
                 along one dim over the 'fsdp' axis (ZeRO-3), replicated over
                 'data'. XLA's sharding propagation inserts the all-gathers
                 (forward/backward) and reduce-scatters (gradients).

The rule picking the dim is `fsdp_spec`: the largest dim that the 'fsdp' axis
divides. On a Swin every large array is a Dense or conv kernel whose largest
dim is a channel dim, so this is what a logical-axis table ('embed'/'mlp' ->
'fsdp') would give, without annotating every layer.

Multi-process runs (one process per TPU host, or per GPU / GPU node) run the
same program in every process: `initialize_distributed` connects them, each
process loads its own slice of the global batch and `shard_batch` assembles
the global arrays.

Hybrid meshes: when devices are joined by a slow network (DCN between TPU
slices, Ethernet / InfiniBand between GPU nodes), `config.mesh.dcn_shape`
says how many of those units (granules: TPU slices, or else processes) lie
along each axis, and `create_mesh` builds each granule's block of the mesh
from its own devices (`mesh_utils.create_hybrid_device_mesh`), so that the
collectives of an axis with one granule stay on the fast links. Several TPU
slices default to one slice per 'data' index: FSDP's all-gathers then stay
inside a slice and only the gradient all-reduce crosses DCN.
"""

import glob
import importlib.util
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hierarchical_vit.layers.common import is_int

STRATEGIES = ('data_parallel', 'fsdp')
# The sharding rules below name these axes: config.mesh.axes must equal them.
AXES = ('data', 'fsdp')
# The axis that mesh.shape = () gives the devices to.
_STRATEGY_AXIS = {'data_parallel': 'data', 'fsdp': 'fsdp'}


def distributed_args(coordinator_address: str = '', num_processes: int = 0,
                     process_id: int = -1) -> dict[str, str | int] | None:
  """Resolves the `jax.distributed.initialize` arguments; None = single process.

  coordinator_address:
    'host:port'  process 0's address; num_processes and process_id come from
                 the arguments or $JAX_NUM_PROCESSES / $JAX_PROCESS_ID;
    'auto'       JAX detects what is not given (Cloud TPU, SLURM srun, Open
                 MPI, k8s): given values override its detection;
    ''           $JAX_COORDINATOR_ADDRESS if set; else 'auto' on a Cloud TPU VM
                 (libtpu installed) or inside a multi-task srun step; else
                 single process.
  """
  coordinator_address = coordinator_address or os.environ.get(
      'JAX_COORDINATOR_ADDRESS', '')
  num_processes = num_processes or _env_int('JAX_NUM_PROCESSES', 0)
  if process_id < 0:
    process_id = _env_int('JAX_PROCESS_ID', -1)
  # Explicit values override what JAX's detection would find (it detects only
  # what is passed as None).
  explicit = {k: v for k, v in (('num_processes', num_processes), ('process_id', process_id))
              if v >= (1 if k == 'num_processes' else 0)}
  if not coordinator_address:
    if _in_cluster():
      return explicit
    if num_processes > 1 or process_id > 0:
      # Each process would train alone, into the same workdir.
      raise ValueError(f'num_processes={num_processes} and process_id={process_id} need a '
                       'coordinator: --coordinator_address=HOST:PORT (process 0\'s) or '
                       '$JAX_COORDINATOR_ADDRESS, or auto inside a cluster.')
    return None
  if coordinator_address == 'auto':
    return explicit
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(
        f'coordinator_address={coordinator_address!r} needs num_processes >= 1 '
        f'and 0 <= process_id < num_processes (flags or $JAX_NUM_PROCESSES, '
        f'$JAX_PROCESS_ID); got {num_processes} and {process_id}.')
  return {'coordinator_address': coordinator_address,
          'num_processes': num_processes, 'process_id': process_id}


def _env_int(name: str, default: int) -> int:
  """An integer environment variable; an error naming it if it is not one."""
  text = os.environ.get(name, '')
  if not text:
    return default
  try:
    return int(text)
  except ValueError:
    raise ValueError(f'${name}={text!r} is not an integer') from None


def _in_cluster() -> bool:
  """Whether JAX's auto-detection applies: a TPU VM or a multi-task srun step.

  A TPU VM has libtpu and TPU chips: an image built with jax[tpu] running on a
  CPU or GPU host has libtpu alone, and JAX's detection would fail there.
  """
  srun_tasks = _env_int('SLURM_STEP_NUM_TASKS', 1)
  return srun_tasks > 1 or (importlib.util.find_spec('libtpu') is not None
                            and _tpu_chips_present())


def _tpu_chips_present() -> bool:
  # TPU v2-v4 chips appear as /dev/accel*, v5 and later as VFIO groups.
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def initialize_distributed(coordinator_address: str = '',
                           num_processes: int = 0, process_id: int = -1,
                           timeout_s: int = 300) -> None:
  """Connects the processes of a multi-process run (see `distributed_args`).

  Must run before anything touches a device. Every process blocks until all
  num_processes have joined, for at most timeout_s.
  """
  args = distributed_args(coordinator_address, num_processes, process_id)
  if args is None:
    return
  jax.distributed.initialize(**args, initialization_timeout=timeout_s)
  logging.info('Process %d of %d; %d local / %d global devices.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def process_zero_value(value: int) -> int:
  """Process 0's `value`, on every process: for a choice that each process
  makes from files it reads on its own (the latest checkpoint, while a run is
  still saving), so that all act on one."""
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def on_all_processes(flag: bool) -> bool:
  """Whether `flag` holds on every process (each passes its own), so that
  all take the same branch before a collective."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.asarray(flag)).all())


def on_any_process(flag: bool) -> bool:
  """Whether `flag` holds on some process (each passes its own), so that all
  take the same branch before a collective."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def create_mesh(mesh_config: ml_collections.ConfigDict,
                devices: list[jax.Device] | None = None) -> Mesh:
  """Builds the mesh from config.mesh over `devices` (default: all of them);
  one -1 in the shape takes the rest."""
  axes = tuple(mesh_config.axes)
  if axes != AXES:
    raise ValueError(f'mesh.axes={axes} is not valid: the sharding rules use the axes {AXES}; '
                     'pick the layout with mesh.strategy and mesh.shape instead.')
  devices = jax.devices() if devices is None else devices
  shape, dcn_shape = mesh_layout(mesh_config, devices)
  # Auto axes: plain jit sharding propagation (jax>=0.7 defaults to Explicit).
  axis_types = (jax.sharding.AxisType.Auto,) * len(axes)
  if np.prod(dcn_shape) == 1:
    # make_array_from_process_local_data places each process's rows on its
    # own devices wherever make_mesh puts them.
    return jax.make_mesh(shape, axes, axis_types=axis_types, devices=devices)
  return Mesh(hybrid_device_grid(shape, dcn_shape, devices), axes, axis_types=axis_types)


def mesh_layout(mesh_config: ml_collections.ConfigDict, devices: list[Any]
                ) -> tuple[tuple[int, int], tuple[int, int]]:
  """(mesh shape, DCN shape): sizes per axis of the whole mesh and of its
  granules (see `hybrid_device_grid`), from config.mesh and the devices."""
  # Checked even with an explicit shape: state_shardings reads it later.
  strategy = _strategy(mesh_config)
  dcn_shape = _dcn_shape(tuple(mesh_config.get('dcn_shape', ())), devices)
  # The default puts every device on the strategy's axis, except that the
  # other axis keeps one index per granule laid along it.
  default = tuple(-1 if axis == _STRATEGY_AXIS[strategy] else n
                  for axis, n in zip(AXES, dcn_shape))
  shape = _mesh_shape(tuple(mesh_config.shape or default), len(devices))
  if any(s % d for s, d in zip(shape, dcn_shape)):
    raise ValueError(f'mesh.shape={shape} does not split over mesh.dcn_shape={dcn_shape}: '
                     'each axis size must be a multiple of its number of granules.')
  return shape, dcn_shape


def hybrid_device_grid(shape: tuple[int, ...], dcn_shape: tuple[int, ...],
                       devices: list[Any]) -> np.ndarray:
  """The devices as a `shape` array made of dcn_shape blocks, one per granule
  (TPU slice if the devices span several, else process), each block
  (shape / dcn_shape) laid out from that granule's devices alone."""
  ici_shape = tuple(s // d for s, d in zip(shape, dcn_shape))
  return mesh_utils.create_hybrid_device_mesh(
      ici_shape, dcn_shape, devices, process_is_granule=_num_slices(devices) == 1,
      allow_split_physical_axes=True)


def _num_slices(devices: list[Any]) -> int:
  """How many TPU slices the devices span. XLA gives GPUs a slice_index per
  host too, but there the granules are processes (mesh.dcn_shape), and the
  default mesh spans every device."""
  if devices[0].platform == 'gpu':
    return 1
  return len({getattr(d, 'slice_index', 0) for d in devices})


def _dcn_shape(dcn_shape: tuple[int, ...], devices: list[Any]) -> tuple[int, ...]:
  """mesh.dcn_shape, () meaning one TPU slice per 'data' index (no DCN on one slice)."""
  slices = _num_slices(devices)
  if not dcn_shape:
    return (slices,) + (1,) * (len(AXES) - 1)
  field = f'mesh.dcn_shape={dcn_shape}'
  if len(dcn_shape) != len(AXES) or not all(is_int(s) and s > 0 for s in dcn_shape):
    raise ValueError(f'{field} is not valid: it needs one positive int per axis of {AXES}, '
                     'or () for one TPU slice per data index.')
  if slices > 1:
    valid, unit = (slices,), f'the {slices} TPU slices of this run'
  else:
    processes = len({d.process_index for d in devices})
    valid, unit = (1, processes), f'1 (no hybrid mesh) or the {processes} processes of this run'
  if np.prod(dcn_shape) not in valid:
    raise ValueError(f'{field} is not valid: its sizes must multiply to {unit}.')
  return tuple(int(s) for s in dcn_shape)


def _mesh_shape(shape: tuple[int, ...], num_devices: int) -> tuple[int, ...]:
  """mesh.shape with its -1 filled in; ValueError unless it uses all devices."""
  field = f'mesh.shape={shape}'
  if len(shape) != len(AXES):
    raise ValueError(f'{field} needs one size per axis of {AXES}.')
  if not all(is_int(s) and (s > 0 or s == -1) for s in shape):
    raise ValueError(f'{field} is not valid: each size must be a positive int or -1 '
                     '(the devices left over).')
  if shape.count(-1) > 1:
    raise ValueError(f'{field} is not valid: at most one size may be -1.')
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f'{field} is not valid: {num_devices} devices do not split into it; '
                       f'the sizes other than -1 must multiply to a divisor of {num_devices}.')
    return tuple(num_devices // known if s == -1 else int(s) for s in shape)
  if known != num_devices:
    raise ValueError(f'{field} does not use all {num_devices} devices: the sizes must '
                     f'multiply to {num_devices}, or one of them be -1.')
  return tuple(int(s) for s in shape)


def _strategy(mesh_config: ml_collections.ConfigDict) -> str:
  if mesh_config.strategy not in STRATEGIES:
    raise ValueError(f'mesh.strategy={mesh_config.strategy!r} is not valid; valid choices: '
                     f'{", ".join(STRATEGIES)}.')
  return mesh_config.strategy


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


def state_shardings(mesh: Mesh, state: Any, mesh_config: ml_collections.ConfigDict) -> Any:
  """NamedShardings for a pytree of arrays (params, optimizer state, EMA).

  Adam's moments have the shapes of the params, so they get the same specs.
  """
  if _strategy(mesh_config) == 'data_parallel':
    return jax.tree.map(lambda _: replicated(mesh), state)
  fsdp_size = mesh.shape['fsdp']
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(
          np.shape(x), fsdp_size, mesh_config.fsdp_min_size)), state)


def put_global(tree: Any, shardings: Any) -> Any:
  """jax.device_put for values that every process holds identically.

  Each process fills only its own devices' shards from its local copy. Unlike
  device_put across processes this needs no equality check (an all-gather of
  every array) and also takes PRNG key arrays. shardings: one for all leaves
  or a matching pytree.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(_put_leaf, tree, shardings)


def _put_leaf(x, sharding: NamedSharding) -> jax.Array:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = _put_leaf(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of a pytree of sharded jax.Arrays."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def log_memory(state: dict) -> None:
  """Logs the train state's bytes per device and the devices' memory stats.

  The first is exact from the shardings; activations come on top of it.
  memory_stats() is None on CPU.
  """
  mib = {name: bytes_per_device(value) / 2**20 for name, value in state.items()}
  logging.info('Train state per device: %.3g MiB (%s).', sum(mib.values()),
               ', '.join(f'{k} {v:.3g}' for k, v in mib.items()))
  stats = jax.local_devices()[0].memory_stats()
  if stats:
    logging.info('%s memory: %.2f GiB in use, %.2f GiB peak, %.2f GiB limit.',
                 jax.local_devices()[0],
                 stats.get('bytes_in_use', 0) / 2**30,
                 stats.get('peak_bytes_in_use', 0) / 2**30,
                 stats.get('bytes_limit', 0) / 2**30)


def shard_batch(batch: dict[str, np.ndarray],
                sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles global arrays from this process's slice of the global batch."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
