"""The step profiler's HLO and trace bookkeeping (no timing asserted)."""

import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import step_profile
from tests.conftest import REPO, import_optional


def _compiled_text(fn, *shapes):
  return jax.jit(fn).lower(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).compile().as_text()


def test_hlo_dots_counts_matmul_flops_of_plain_and_fused_dots():
  def fn(x, w, v):
    return jnp.tanh(x @ w), jnp.einsum('bij,bjk->bik', v, v)  # (64, 32) @ (32, 16); batched
  dots = step_profile.hlo_dots(_compiled_text(fn, (64, 32), (32, 16), (4, 8, 8)))
  flops = sorted(f for f, _ in dots.values())
  assert flops == [2 * 4 * 8 * 8 * 8, 2 * 64 * 32 * 16]
  descriptions = ' '.join(d for _, d in dots.values())
  assert '[64, 32] x [32, 16] -> [64, 16]' in descriptions


def test_op_times_averages_ops_per_step_and_skips_bookkeeping():
  events = [{'ph': 'X', 'name': 'ynn_fusion.3', 'dur': 4000},
            {'ph': 'X', 'name': 'ynn_fusion.3', 'dur': 2000},
            {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'dur': 9000},
            {'ph': 'X', 'name': 'end: ynn_fusion.3', 'dur': 1},
            {'ph': 'M', 'name': 'thread_name'}]
  assert step_profile.op_times(events, steps=2) == pytest.approx({'ynn_fusion.3': 3e-3})


def test_summarize_groups_matmuls_by_shape_and_the_rest_by_kind():
  times = {'ynn_fusion.1': 0.010, 'ynn_fusion.2': 0.030, 'transpose_copy_fusion.7': 0.002,
           'transpose_copy_fusion.9': 0.003, 'wrapped_reduce': 0.001,
           # The pallas core's kernels (forward, backward) and cuDNN's, as H100 traces
           # name them.
           'pallas_call': 0.004, 'pallas_call.1': 0.0005,
           'dot_product_attention_fwd': 0.002, 'dot_product_attention_bwd.3': 0.001}
  dots = {'ynn_fusion.1': (1e9, 'A'), 'ynn_fusion.2': (3e9, 'A')}
  summary = step_profile.summarize(times, dots)
  assert summary['matmuls'] == [{'shapes': 'A', 's': pytest.approx(0.04), 'gflop': 4.0,
                                 'count': 2, 'gflop_s': pytest.approx(100.0)}]
  assert summary['others'][0] == {'kind': 'transpose_copy_fusion', 's': pytest.approx(0.005)}
  assert summary['attention_s'] == pytest.approx(0.0075)
  assert summary['other_s'] == pytest.approx(0.006)  # Without the attention kernels.
  assert summary['matmul_gflop_s'] == pytest.approx(100.0)
  assert 'fused attention 7.5 ms + other 6 ms' in step_profile.format_summary(
      {'config': 'c', 'mode': 'train', 'batch': 1, 'step_s': 0.05, **summary}, rows=3)


def test_op_times_on_a_gpu_counts_stream_kernels_by_their_hlo_op():
  events = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/host:CPU'}},
            {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/device:GPU:0'}},
            {'ph': 'M', 'name': 'thread_name', 'pid': 2, 'tid': 7,
             'args': {'name': 'Stream #7(Compute)'}},
            {'ph': 'M', 'name': 'thread_name', 'pid': 2, 'tid': 8, 'args': {'name': 'XLA Ops'}},
            # Two kernels of one op (a GEMM and its epilogue), one of another.
            {'ph': 'X', 'pid': 2, 'tid': 7, 'name': 'nvjet_tst_128x64', 'dur': 300,
             'args': {'hlo_op': 'gemm_fusion.4'}},
            {'ph': 'X', 'pid': 2, 'tid': 7, 'name': 'loop_add_fusion', 'dur': 100,
             'args': {'hlo_op': 'gemm_fusion.4'}},
            {'ph': 'X', 'pid': 2, 'tid': 7, 'name': 'input_reduce_fusion', 'dur': 50},
            # The derived line and the host repeat them: not counted again.
            {'ph': 'X', 'pid': 2, 'tid': 8, 'name': 'gemm_fusion.4', 'dur': 400},
            {'ph': 'X', 'pid': 1, 'tid': 1, 'name': 'PjitFunction(step)', 'dur': 900}]
  assert step_profile.op_times(events, steps=1) == pytest.approx(
      {'gemm_fusion.4': 400e-6, 'input_reduce_fusion': 50e-6})


def test_hlo_dots_counts_cublas_gemms_of_gpu_hlo():
  # Abridged from XLA:GPU's compiled Swin-T train step (H100, 2026-11-26).
  hlo = '\n'.join([
      'ENTRY %main.1 (Arg_0.1: bf16[401408,96]) -> bf16[401408,288] {',
      '  %bitcast.2811.0 = bf16[401408,96]{1,0} bitcast(%Arg_0.1)',
      '  %wrapped_convert.2 = bf16[96,288]{1,0} fusion(%p), kind=kLoop, calls=%wrapped_convert_c',
      '  %custom-call.115 = (bf16[401408,288]{1,0}, s8[33554432]{0}) custom-call('
      '%bitcast.2811.0, %wrapped_convert.2), custom_call_target="__cublas$lt$matmul", '
      'backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_batch_dimensions":[],'
      '"lhs_contracting_dimensions":["1"],"rhs_batch_dimensions":[],'
      '"rhs_contracting_dimensions":["0"]}}}',
      '  ROOT %get-tuple-element = bf16[401408,288]{1,0} get-tuple-element(%custom-call.115), index=0',
      '}'])
  assert step_profile.hlo_dots(hlo) == {
      'custom-call.115': (2.0 * 401408 * 288 * 96, '[401408, 96] x [96, 288] -> [401408, 288]')}


def test_summarize_torch_splits_matrix_products_from_the_rest():
  times = {'nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT': 3e-3, 'aten::addmm': 1e-3,
           'triton_per_fused_native_layer_norm_0': 2e-3, 'aten::add_': 0.5e-3,
           'fmha_cutlassF_bf16_aligned_64x64_rf_sm80': 0.25e-3}
  summary = step_profile.summarize_torch(times, rows=2)
  assert summary['gemm_s'] == pytest.approx(4e-3)
  assert summary['attention_s'] == pytest.approx(0.25e-3)  # Not a GEMM though CUTLASS's.
  assert summary['other_s'] == pytest.approx(2.5e-3)
  assert [r['name'] for r in summary['top']] == ['nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT',
                                                 'triton_per_fused_native_layer_norm_0']


def test_profile_timm_accounts_for_its_matrix_products():
  import_optional('timm')  # The interop extra.
  result = step_profile.profile_timm('small', 'eval', batch=2, steps=1)
  # On the CPU: aten ops' self times; the linear layers are most of the model.
  assert result['gemm_s'] > 0 and result['other_s'] > 0 and result['step_s'] > 0
  assert any(r['name'] == 'aten::addmm' for r in result['top'])


def test_cli_profiles_a_real_step_and_keeps_it_when_timms_profile_fails(tmp_path):
  """A real step's profile accounts for its matmuls, and --output holds it
  before timm's profile runs: a timm that breaks (here one that cannot be
  imported) loses only its own part."""
  (tmp_path / 'timm').mkdir()
  (tmp_path / 'timm' / '__init__.py').write_text("raise RuntimeError('this timm is broken')")
  output, trace = tmp_path / 'profile.json', tmp_path / 'trace'
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.step_profile', '--config=small', '--mode=eval',
       '--batch=8', '--steps=1', '--timm', f'--output={output}', f'--trace_out={trace}'],
      env={**os.environ, 'HIERARCHICAL_VIT_TCMALLOC': '0',
           'PYTHONPATH': os.pathsep.join([str(tmp_path), REPO])},
      cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
  assert result.returncode != 0 and 'this timm is broken' in result.stderr
  assert 'GFLOP/s' in result.stdout  # The printed tables.
  written = json.loads(output.read_text())
  assert 'timm' not in written
  # The small Swin's forward at 32x32: ~96 MFLOP per image, nearly all matmuls.
  assert 0.8 * 96e-3 * 8 < written['matmul_gflop'] < 96e-3 * 8 * 1.05
  assert written['matmul_s'] > 0 and written['other_s'] > 0
  assert written['attention_s'] == 0  # The einsum core: no fused kernel.
  assert (written['dtype'], written['attention']) == ('float32', 'einsum')
  # The kept trace and HLO, read back offline, give the same summary.
  with gzip.open(trace / 'hlo.txt.gz', 'rt') as f:
    dots = step_profile.hlo_dots(f.read())
  with gzip.open(trace / 'perfetto_trace.json.gz') as f:
    times = step_profile.op_times(json.load(f)['traceEvents'], steps=1)
  assert step_profile.summarize(times, dots)['matmul_gflop'] == pytest.approx(
      written['matmul_gflop'])


def test_hlo_dots_counts_cublas_gemms_with_epilogue_operands_inside_called_computations():
  gemm = ('  %custom-call.7 = (bf16[64,32]{1,0}, s8[1024]{0}) custom-call(%a, %b, %bias), '
          'custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{'
          '"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"]}}}')
  hlo = '\n'.join([
      '%body (a: bf16[64,16], b: bf16[16,32], bias: bf16[64,32]) -> bf16[64,32] {',
      '  %a = bf16[64,16]{1,0} parameter(0)', '  %b = bf16[16,32]{1,0} parameter(1)',
      '  %bias = bf16[64,32]{1,0} parameter(2)', gemm,
      '  ROOT %g = bf16[64,32]{1,0} get-tuple-element(%custom-call.7), index=0', '}',
      'ENTRY %main (x: bf16[64,16]) -> bf16[64,32] {',
      '  %x = bf16[64,16]{1,0} parameter(0)',
      '  ROOT %fusion.3 = bf16[64,32]{1,0} fusion(%x), kind=kCustom, calls=%body', '}'])
  # The GEMM runs as part of the op that calls its computation.
  assert step_profile.hlo_dots(hlo) == {
      'fusion.3': (2.0 * 64 * 32 * 16, '[64, 16] x [16, 32] -> [64, 32]')}


def test_op_times_on_a_device_without_streams_reads_its_xla_ops_line():
  events = [{'ph': 'M', 'name': 'process_name', 'pid': 3, 'args': {'name': '/device:TPU:0'}},
            {'ph': 'M', 'name': 'thread_name', 'pid': 3, 'tid': 1, 'args': {'name': 'XLA Ops'}},
            {'ph': 'M', 'name': 'thread_name', 'pid': 3, 'tid': 2,
             'args': {'name': 'XLA Modules'}},
            {'ph': 'X', 'pid': 3, 'tid': 1, 'name': 'fusion.1', 'dur': 20},
            {'ph': 'X', 'pid': 3, 'tid': 2, 'name': 'jit_train_step', 'dur': 25}]
  assert step_profile.op_times(events, steps=1) == pytest.approx({'fusion.1': 20e-6})
  lines_only = [e for e in events if e.get('tid') != 1]
  with pytest.raises(ValueError, match="neither streams nor an XLA Ops line.*'XLA Modules'"):
    step_profile.op_times(lines_only, steps=1)
