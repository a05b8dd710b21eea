"""The kernel-resources pre-flight compiles the pallas kernels for sm_90a with no GPU."""

import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import kernel_resources
from tests.conftest import import_optional

import_optional('triton')  # Comes with torch (the interop extra).


def test_both_kernels_of_a_small_case_compile_for_sm_90a():
  case = dict(stage=0, shifted=True, windows=8, tokens=9, heads=2, head_dim=4, groups=4)
  rows = kernel_resources.kernel_resources(case, 'bfloat16', capability=90)
  assert [r['kernel'] for r in rows] == ['window_attention_fwd', 'window_attention_bwd']
  # Forward: a program per (image, window, head); backward: per (chunk of 2 images, window, head).
  assert [r['grid'] for r in rows] == [[2, 4, 2], [1, 4, 2]]
  for r in rows:
    assert 0 < r['registers'] <= 255 and r['num_warps'] == 4
    assert r['spill_store_bytes'] == r['spill_load_bytes'] == 0  # 16 x 16 tiles.
    assert r['shared_bytes'] >= 0 and r['wgmma'] >= 0
  assert rows[1]['registers'] > rows[0]['registers']
  assert len(kernel_resources.format_table(rows).splitlines()) == 4


def test_a_module_without_triton_ir_is_refused_with_the_reason():
  lowered = jax.jit(jnp.sin).trace(jnp.zeros(3)).lower(lowering_platforms=('cuda',))
  with pytest.raises(RuntimeError, match='compiles the Triton kernels itself'):
    kernel_resources.triton_kernels(lowered.compiler_ir('stablehlo'))


def test_a_missing_triton_is_reported(monkeypatch):
  monkeypatch.setitem(sys.modules, 'triton', None)  # import triton raises ImportError.
  with pytest.raises(RuntimeError, match='pip install triton'):
    kernel_resources.compile_kernel({'name': 'k', 'num_warps': 4, 'num_stages': 1, 'ir': b''}, 90)
