"""Mesh construction and the FSDP sharding rule."""

import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from hierarchical_vit import parallel


def test_create_mesh_fills_minus_one():
  mesh = parallel.create_mesh(ml_collections.ConfigDict(
      {'axes': ('data', 'fsdp'), 'shape': (-1, 1)}))
  assert mesh.axis_names == ('data', 'fsdp')
  assert mesh.devices.size == mesh.shape['data']


@pytest.mark.parametrize('mesh, message', [
    ({'axes': ('data', 'fsdp'), 'shape': (1, 1000)}, 'does not use all'),
    ({'axes': ('data', 'fsdp'), 'shape': (-1, -1)}, 'At most one -1'),
    ({'axes': ('data', 'fsdp'), 'shape': (-1,)}, r"mesh.shape=\(-1,\) needs one size per axis"),
    ({'axes': ('batch', 'model'), 'shape': (-1, 1)},
     r"mesh.axes=\('batch', 'model'\) is not valid.*\('data', 'fsdp'\)"),
    ({'axes': ('data', 'fsdp'), 'shape': (), 'strategy': 'zero3'},
     "mesh.strategy='zero3' is not valid; valid choices: data_parallel, fsdp"),
])
def test_create_mesh_rejects_bad_config(mesh, message):
  with pytest.raises(ValueError, match=message):
    parallel.create_mesh(ml_collections.ConfigDict(mesh))


def test_fsdp_spec_shards_largest_divisible_dim():
  assert parallel.fsdp_spec((96, 384), 4, min_size=1) == P(None, 'fsdp')
  assert parallel.fsdp_spec((384, 6), 4, min_size=1) == P('fsdp', None)
  assert parallel.fsdp_spec((7, 5), 4, min_size=1) == P()  # Nothing divides.
  assert parallel.fsdp_spec((96, 384), 4, min_size=10**6) == P()  # Small.
  assert parallel.fsdp_spec((96, 384), 1, min_size=1) == P()  # No fsdp axis.
