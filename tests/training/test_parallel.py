"""Mesh construction and the FSDP sharding rule."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hierarchical_vit import parallel
from tests.conftest import REPO, xla_flags


# Builds one mesh per (strategy, shape) in argv[1] on 8 CPU devices; prints the
# mesh shapes, or 'ErrorType: message', as JSON.
_CREATE_MESHES = """
import json, sys
import ml_collections
from hierarchical_vit import parallel
results = []
for strategy, shape in json.loads(sys.argv[1]):
  config = ml_collections.ConfigDict(
      {'axes': ('data', 'fsdp'), 'strategy': strategy, 'shape': tuple(shape)})
  try:
    results.append(dict(parallel.create_mesh(config).shape))
  except Exception as error:  # Any type: the test checks it is a ValueError.
    results.append(f'{type(error).__name__}: {error}')
print(json.dumps(results))
"""

# (strategy, shape) -> the mesh shape, or a regex 'ErrorType: message' must match.
_EIGHT_DEVICE_CASES = {
    ('data_parallel', (2, -1)): {'data': 2, 'fsdp': 4},
    ('fsdp', (-1, 2)): {'data': 4, 'fsdp': 2},
    ('data_parallel', ()): {'data': 8, 'fsdp': 1},
    ('fsdp', ()): {'data': 1, 'fsdp': 8},
    ('data_parallel', (0, -1)):
        r'^ValueError: mesh.shape=\(0, -1\) is not valid: each size must be a positive int or -1',
    ('data_parallel', (-2, -4)):
        r'^ValueError: mesh.shape=\(-2, -4\) is not valid: each size must be a positive int',
    ('data_parallel', (3, -1)):
        r'^ValueError: mesh.shape=\(3, -1\) is not valid: 8 devices do not split',
    ('data_parallel', (-1, -1)):
        r'^ValueError: mesh.shape=\(-1, -1\) is not valid: at most one size may be -1',
    ('data_parallel', (2, 2)): r'^ValueError: mesh.shape=\(2, 2\) does not use all 8 devices',
    ('bogus', (2, 4)):
        r"^ValueError: mesh.strategy='bogus' is not valid; valid choices: data_parallel, fsdp",
}


@pytest.fixture(scope='module')
def eight_device_meshes() -> dict:
  """create_mesh's result for each of _EIGHT_DEVICE_CASES, on 8 CPU devices.

  A subprocess, since the device count is fixed when jax starts.
  """
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': xla_flags('--xla_force_host_platform_device_count=8')}
  cases = list(_EIGHT_DEVICE_CASES)
  proc = subprocess.run([sys.executable, '-c', _CREATE_MESHES, json.dumps(cases)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  return dict(zip(cases, json.loads(proc.stdout.splitlines()[-1])))


@pytest.mark.parametrize('case', list(_EIGHT_DEVICE_CASES), ids=str)
def test_create_mesh_on_eight_devices(eight_device_meshes, case):
  expected, got = _EIGHT_DEVICE_CASES[case], eight_device_meshes[case]
  if isinstance(expected, dict):
    assert got == expected
  else:
    assert isinstance(got, str) and re.search(expected, got), got


@pytest.mark.parametrize('mesh, message', [
    ({'axes': ('data', 'fsdp'), 'shape': (-1,)}, r"mesh.shape=\(-1,\) needs one size per axis"),
    ({'axes': ('batch', 'model'), 'shape': (-1, 1)},
     r"mesh.axes=\('batch', 'model'\) is not valid.*\('data', 'fsdp'\)"),
    ({'axes': ('data', 'fsdp'), 'shape': (), 'strategy': 'zero3'},
     "mesh.strategy='zero3' is not valid; valid choices: data_parallel, fsdp"),
])
def test_create_mesh_rejects_bad_config(mesh, message):
  mesh = {'strategy': 'data_parallel', **mesh}
  with pytest.raises(ValueError, match=message):
    parallel.create_mesh(ml_collections.ConfigDict(mesh))


def test_fsdp_spec_shards_largest_divisible_dim():
  assert parallel.fsdp_spec((96, 384), 4, min_size=1) == P(None, 'fsdp')
  assert parallel.fsdp_spec((384, 6), 4, min_size=1) == P('fsdp', None)
  assert parallel.fsdp_spec((7, 5), 4, min_size=1) == P()  # Nothing divides.
  assert parallel.fsdp_spec((96, 384), 4, min_size=10**6) == P()  # Small.
  assert parallel.fsdp_spec((96, 384), 1, min_size=1) == P()  # No fsdp axis.


@dataclasses.dataclass(frozen=True)
class _TpuLike:
  """What mesh_utils reads of a device; platform 'cpu' lays each granule's
  block out in device order (no torus to map onto)."""
  id: int
  process_index: int
  slice_index: int
  platform: str = 'cpu'
  device_kind: str = 'cpu'


@dataclasses.dataclass(frozen=True)
class _GpuLike:
  """A GPU on a node: XLA numbers each host's GPUs as a slice of their own."""
  id: int
  process_index: int
  platform: str = 'gpu'
  device_kind: str = 'NVIDIA H100 80GB HBM3'

  @property
  def slice_index(self) -> int:
    return self.process_index


def _slices(num_slices: int, per_slice: int, hosts_per_slice: int = 2) -> list[_TpuLike]:
  per_host = per_slice // hosts_per_slice
  return [_TpuLike(i, i // per_host, i // per_slice) for i in range(num_slices * per_slice)]


def _grid(devices, **mesh) -> np.ndarray:
  config = ml_collections.ConfigDict(
      {'axes': parallel.AXES, 'strategy': 'fsdp', 'shape': (), 'dcn_shape': (), **mesh})
  shape, dcn_shape = parallel.mesh_layout(config, devices)
  return parallel.hybrid_device_grid(shape, dcn_shape, devices)


def _attr(grid: np.ndarray, name: str) -> np.ndarray:
  return np.vectorize(lambda d: getattr(d, name))(grid)


def test_two_slices_fsdp_default_keeps_fsdp_inside_a_slice():
  devices = _slices(2, 4)
  grid = _grid(devices)
  assert grid.shape == (2, 4)
  np.testing.assert_array_equal(_attr(grid, 'slice_index'), [[0] * 4, [1] * 4])
  assert sorted(_attr(grid, 'id').ravel()) == list(range(8))  # Each device once.


def test_two_slices_data_parallel_default_stacks_slices_along_data():
  grid = _grid(_slices(2, 4), strategy='data_parallel')
  assert grid.shape == (8, 1)
  np.testing.assert_array_equal(_attr(grid, 'slice_index').ravel(), [0] * 4 + [1] * 4)


def test_explicit_shape_splits_into_per_slice_blocks():
  """(4, 2) over 2 slices along data: each slice is a (2, 2) block of rows."""
  grid = _grid(_slices(2, 4), shape=(4, -1))
  assert grid.shape == (4, 2)
  np.testing.assert_array_equal(_attr(grid, 'slice_index'), [[0, 0], [0, 0], [1, 1], [1, 1]])


def test_slices_along_fsdp():
  grid = _grid(_slices(2, 4), dcn_shape=(1, 2))
  assert grid.shape == (1, 8)
  np.testing.assert_array_equal(_attr(grid, 'slice_index'), [[0] * 4 + [1] * 4])


def test_processes_are_the_granules_without_slices():
  """GPU nodes: dcn_shape (2, 1) makes each node (process) one row."""
  devices = [_GpuLike(i, i // 4) for i in range(8)]
  grid = _grid(devices, dcn_shape=(2, 1))
  assert grid.shape == (2, 4)
  np.testing.assert_array_equal(_attr(grid, 'process_index'), [[0] * 4, [1] * 4])
  # Their per-host slice_index makes no hybrid default: FSDP spans every GPU.
  for mesh in ({}, {'shape': (1, -1)}):
    config = ml_collections.ConfigDict({'axes': parallel.AXES, 'strategy': 'fsdp',
                                        'shape': (), 'dcn_shape': (), **mesh})
    assert parallel.mesh_layout(config, devices) == ((1, 8), (1, 1))


@pytest.mark.parametrize('devices, mesh, message', [
    (_slices(2, 4), {'dcn_shape': (3, 1)},
     r'mesh.dcn_shape=\(3, 1\) is not valid: its sizes must multiply to the 2 TPU slices'),
    (_slices(2, 4), {'dcn_shape': (1, 1)}, 'must multiply to the 2 TPU slices'),
    (_slices(2, 4), {'dcn_shape': (2,)}, r'mesh.dcn_shape=\(2,\) is not valid: it needs one'),
    (_slices(2, 4), {'dcn_shape': (2, 0)}, 'one positive int per axis'),
    (_slices(2, 4), {'shape': (1, 8)},
     r'mesh.shape=\(1, 8\) does not split over mesh.dcn_shape=\(2, 1\)'),
    ([_GpuLike(i, 0) for i in range(8)], {'dcn_shape': (2, 1)},
     r'must multiply to 1 \(no hybrid mesh\) or the 1 processes'),
])
def test_hybrid_mesh_rejects_bad_config(devices, mesh, message):
  with pytest.raises(ValueError, match=message):
    _grid(devices, **mesh)
