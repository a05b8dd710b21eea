"""The attention-core benchmark measures the shapes a model runs (no timing here)."""

import json
import subprocess
import sys

import pytest

from benchmarks import attention_core


def test_stage_cases_are_the_window_attention_of_swin_t_224():
  cases = attention_core.stage_cases('swin_t_224', batch=2)
  shapes = [(c['stage'], c['shifted'], c['windows'], c['tokens'], c['heads'], c['head_dim'],
             c['groups']) for c in cases]
  # 56, 28, 14 and 7 tokens a side in 7 x 7 windows; the last stage is one
  # window, which Swin does not shift.
  assert shapes == [(0, False, 128, 49, 3, 32, 1), (0, True, 128, 49, 3, 32, 64),
                    (1, False, 32, 49, 6, 32, 1), (1, True, 32, 49, 6, 32, 16),
                    (2, False, 8, 49, 12, 32, 1), (2, True, 8, 49, 12, 32, 4),
                    (3, False, 2, 49, 24, 32, 1)]


def test_each_core_is_checked_against_the_float32_einsum_core():
  case = dict(stage=0, shifted=True, windows=8, tokens=9, heads=2, head_dim=4, groups=4)
  rows = attention_core.benchmark_case(case, ['einsum_lowp', 'pallas'], 'float32', reps=1,
                                       rounds=1, interpret=True)
  # The reference's own row first, however the cores are listed.
  assert [r['core'] for r in rows] == ['einsum', 'einsum_lowp', 'pallas']
  # In float32 einsum_lowp is the einsum program; the kernel differs by rounding.
  assert rows[0]['output_error'] == rows[0]['grad_error'] == rows[1]['output_error'] == 0.0
  assert rows[0]['forward_speedup'] == rows[0]['forward_backward_speedup'] == 1.0
  assert 0 < rows[2]['output_error'] < 1e-5 and 0 < rows[2]['grad_error'] < 1e-5
  assert all(r['forward_ms'] > 0 and r['forward_backward_speedup'] > 0 for r in rows)
  assert rows[1]['forward_backward_temp_mib'] > 0
  assert len(attention_core.format_table(rows).splitlines()) == 5


def test_a_core_that_fails_gets_a_row_with_its_error_and_the_others_are_timed(monkeypatch):
  def broken(q, k, v, bias, scale, dropout):
    raise RuntimeError('no kernel image for this card')
  monkeypatch.setitem(attention_core.ATTENTION_CORES, 'cudnn', broken)
  case = dict(stage=1, shifted=False, windows=2, tokens=4, heads=1, head_dim=4, groups=1)
  rows = attention_core.benchmark_case(case, ['cudnn', 'einsum_lowp', 'cudnn'], 'float32',
                                       reps=1, rounds=1)
  assert [r['core'] for r in rows] == ['einsum', 'cudnn', 'einsum_lowp']  # Each once.
  assert rows[1]['error'] == 'RuntimeError: no kernel image for this card'
  assert 'forward_ms' not in rows[1] and rows[2]['forward_ms'] > 0
  assert 'failed: RuntimeError: no kernel image' in attention_core.format_table(rows)


def test_bfloat16_errors_are_measured_against_float32():
  """The reference runs on the float32 upcast of the same rounded inputs, so
  the error is the core's own bf16 arithmetic: nonzero, within bf16's."""
  case = dict(stage=0, shifted=False, windows=4, tokens=16, heads=2, head_dim=16, groups=1)
  (row,) = attention_core.benchmark_case(case, ['einsum'], 'bfloat16', reps=1, rounds=1)
  assert 0 < row['output_error'] < 0.02 and 0 < row['grad_error'] < 0.05
  assert row['forward_speedup'] == 1.0


def test_cli_writes_a_row_per_stage_case_and_core(tmp_path):
  output = tmp_path / 'cores.json'
  subprocess.run([sys.executable, '-m', 'benchmarks.attention_core', '--config=small', '--batch=1',
                  '--dtype=float32', '--cores=einsum', '--cores=einsum', '--reps=1',
                  '--rounds=1', f'--output={output}'], check=True, capture_output=True)
  result = json.loads(output.read_text())
  # small: 3 stages, the first two shifted; one einsum row each, though named twice.
  assert [(r['stage'], r['shifted'], r['core']) for r in result['results']] == [
      (s, shifted, 'einsum')
      for s, shifted in [(0, False), (0, True), (1, False), (1, True), (2, False)]]
  assert result['backend'] == 'cpu'

