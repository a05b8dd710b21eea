"""The throughput benchmark compares like with like (no timing here)."""

import json
import os
import platform
import subprocess
import sys

import jax.numpy as jnp
import pytest
from flax import nnx
from tests.conftest import import_optional

from benchmarks import throughput
from hierarchical_vit import report
from hierarchical_vit.models import build_model

timm = import_optional('timm')  # The interop extra (torch + timm).


@pytest.mark.parametrize('name', ['small', 'swin_t_32', 'swin_t_224'])
def test_ours_and_timm_have_the_same_parameters(name):
  bench = throughput.CONFIGS[name]
  config = throughput.model_config(bench, gelu_approximate=True)
  ours = report.count_params(nnx.eval_shape(lambda: build_model(config.model,
                                                                rngs=nnx.Rngs(0))))
  reference = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False,
                                num_classes=throughput.NUM_CLASSES, **bench.timm_kwargs)
  assert config.model.img_size == bench.img_size
  assert ours == sum(p.numel() for p in reference.parameters())


def test_format_table_has_a_row_per_result_and_dashes_for_missing_timm():
  row = {'config': 'small', 'gelu': 'tanh', 'attention': 'einsum', 'remat': 'block',
         'ours_train_img_s': 300.0,
         'ours_eval_img_s': 1100.0, 'ours_train_mfu': 0.25, 'peak_gflops': 340.0,
         'train_compile_s': 5.9, 'eval_compile_s': 0.8, 'xla_peak_mib': 716.0}
  with_timm = dict(row, timm_train_img_s=400.0, timm_eval_img_s=1000.0, train_ratio=0.75,
                   eval_ratio=1.1, timm_train_mfu=0.33)
  lines = throughput.format_table([row, with_timm]).splitlines()
  assert len(lines) == 4
  assert lines[2].split(' | ')[5] == '-'
  assert '| einsum | block |' in lines[2]
  assert '| 0.75 |' in lines[3] and '| 1.10 |' in lines[3] and '25%' in lines[3]
  assert '5.9 / 0.8' in lines[2]
  paired = dict(with_timm, train_ratio_range=[0.7, 0.8])
  assert '| 0.75 (0.70-0.80) |' in throughput.format_table([paired])


def test_paired_ratio_compares_the_sides_within_each_round():
  # Round ratios (timm / ours): 2.0, 1.0, 1.5, 1.0. The ratio of the two
  # medians would read 2.5 / 1.5 = 1.67.
  ratio = throughput.paired_ratio([1.0, 1.0, 2.0, 4.0], [2.0, 1.0, 3.0, 4.0])
  assert ratio == {'median': 1.25, 'min': 1.0, 'max': 2.0}
  with pytest.raises(ValueError, match='one reference time per round'):
    throughput.paired_ratio([1.0, 1.0], [1.0])


def test_torch_runs_where_jax_runs_and_its_setup_is_recorded():
  with pytest.raises(RuntimeError, match=r"JAX runs on 'tpu' but torch on 'cpu'"):
    throughput.setup_torch('tpu', None)  # timm has no TPU side: a ratio would mean nothing.
  info = throughput.setup_torch('cpu', None)
  assert info['timm_device'] == 'cpu' and info['torch_threads'] == os.cpu_count()
  assert info['float32_matmuls'] == 'float32'


def test_bfloat16_runs_both_sides_in_bfloat16():
  bench = throughput.CONFIGS['small']
  config = throughput.model_config(bench, gelu_approximate=True, dtype='bfloat16')
  assert config.model.dtype == 'bfloat16'
  reference = throughput.Timm(bench, config, batch=2)
  with reference.autocast():
    assert reference.model(reference.images).dtype == reference.torch.bfloat16
  assert reference.train(1) > 0 and reference.eval(1) > 0


def test_timm_compile_wraps_the_model_lazily():
  bench = throughput.CONFIGS['small']
  config = throughput.model_config(bench, gelu_approximate=True)
  reference = throughput.Timm(bench, config, batch=2, compile_model=True)
  assert isinstance(reference.model, reference.torch._dynamo.eval_frame.OptimizedModule)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_matmul_peak_multiplies_in_the_benchmark_dtype(dtype):
  peak = throughput.MatmulPeak(n=64, reps=2, dtype=dtype)
  out = peak.fn(peak.a)
  assert out.dtype == dtype and peak.a.shape == (64, 64)
  assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
  assert peak.flops == 2 * 64 ** 3 * 2
  assert peak() > 0


def test_model_config_selects_the_attention_core_and_remat():
  bench = throughput.CONFIGS['swin_t_224']
  default = throughput.model_config(bench, gelu_approximate=False)
  assert (default.model.attention, default.model.remat) == ('einsum', 'none')
  config = throughput.model_config(bench, False, dtype='bfloat16', attention='cudnn',
                                   remat='block')
  assert (config.model.attention, config.model.dtype, config.model.remat) == (
      'cudnn', 'bfloat16', 'block')


def test_cpu_model_reads_cpuinfo_and_falls_back_to_the_architecture(tmp_path):
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text('processor\t: 0\nvendor_id\t: GenuineIntel\n'
                     'model name\t: Intel(R) Xeon(R) Processor\nflags\t: fpu\n')
  assert throughput.cpu_model(str(cpuinfo)) == 'Intel(R) Xeon(R) Processor'
  assert throughput.cpu_model(str(tmp_path / 'missing')) in (platform.processor(),
                                                               platform.machine())



def test_cli_times_each_variant_and_keeps_those_before_one_that_fails(tmp_path):
  output = tmp_path / 'throughput.json'
  # Variants run in the order (einsum, block), (cudnn, block): the second fails
  # here (no cuDNN on the CPU), after the JSON holds the first.
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.throughput', '--configs=small', '--gelu=tanh',
       '--batch=2', '--steps=1', '--rounds=1', '--notimm', '--attention=einsum',
       '--attention=cudnn', '--remat=block', '--peak_size=256', f'--output={output}'],
      env=dict(os.environ, HIERARCHICAL_VIT_TCMALLOC='0'), capture_output=True, text=True,
      cwd=os.path.dirname(os.path.dirname(__file__)), check=False)
  assert result.returncode != 0 and 'cudnn' in result.stderr
  results = json.loads(output.read_text())['results']
  assert [(r['attention'], r['remat']) for r in results] == [('einsum', 'block')]
  assert all(r['ours_train_img_s'] > 0 and 'timm_train_img_s' not in r for r in results)
  assert results[0]['peak_matmul'] == 'float32 256^2'
  # MFU counts the architecture's matmul FLOPs (the same for either GELU).
  config = throughput.model_config(throughput.CONFIGS['small'], gelu_approximate=False)
  model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
  flops = 3 * report.matmul_flops(model, (2, 32, 32, 3)) / 2 / 1e9
  assert results[0]['train_model_gflop_per_img'] == pytest.approx(flops, rel=1e-6)
  assert results[0]['ours_train_mfu'] == pytest.approx(
      results[0]['ours_train_img_s'] * flops / results[0]['peak_gflops'], rel=1e-6)


def test_timm_for_builds_one_reference_for_every_variant_of_ours():
  reference = throughput.timm_for('small', 'bfloat16', batch=2, compile_model=False)
  assert not reference.compiled and reference.images.shape == (2, 3, 32, 32)
  with reference.autocast():
    assert reference.model(reference.images).dtype == reference.torch.bfloat16


class _Timed:
  """A contestant whose step takes `seconds` per round; each call goes to `log`."""

  def __init__(self, name, seconds, log):
    self.name, self.seconds, self.log = name, iter(seconds), log

  def __call__(self, steps):
    self.log.append((self.name, steps))
    return 0.0 if steps == 1 else next(self.seconds)  # The warm-up step is not timed.


def test_benchmark_pairs_each_of_ours_with_its_timm_counterpart(monkeypatch):
  """Stubbed contestants with known times: the ratios are timm / ours per
  round (train with train, eval with eval), img/s and MFU follow from them;
  each warms up once, untimed, and the peak is timed in every round."""
  log = []

  class StubOurs:
    num_params, model_flops_per_image = 1000, 2e9
    train_compile_s = eval_compile_s = 1.0

    def __init__(self, config, batch):
      self.train = _Timed('ours_train', [1.0, 1.0, 1.2], log)
      self.eval = _Timed('ours_eval', [0.5, 0.4, 0.5], log)

    def memory(self):
      return {}

  class StubTimm:
    compiled, num_params = False, 1000
    train = _Timed('timm_train', [2.0, 3.0, 2.4], log)
    eval = _Timed('timm_eval', [0.25, 0.4, 1.0], log)

  class StubPeak:
    dtype, n = 'float32', 2048

    def __call__(self):
      log.append(('peak', None))
      return 100.0

  monkeypatch.setattr(throughput, 'Ours', StubOurs)
  result = throughput.benchmark('small', 'tanh', StubPeak(), batch=8, steps=4, rounds=3,
                                timm_model=StubTimm())
  assert result['train_ratio'] == 2.0 and result['train_ratio_range'] == [2.0, 3.0]
  assert result['eval_ratio'] == 1.0 and result['eval_ratio_range'] == [0.5, 2.0]
  assert result['ours_train_img_s'] == 32 / 1.0 and result['timm_eval_img_s'] == 32 / 0.4
  assert result['ours_train_mfu'] == pytest.approx(32 * 6.0 / 100.0)
  assert result['timm_train_mfu'] == pytest.approx(32 / 2.4 * 6.0 / 100.0)
  order = ['ours_train', 'timm_train', 'ours_eval', 'timm_eval']
  assert log == [(name, 1) for name in order] + 3 * [*((name, 4) for name in order),
                                                     ('peak', None)]


def test_timms_train_step_updates_its_weights():
  reference = throughput.timm_for('small', 'float32', batch=2, compile_model=False)
  before = [p.detach().clone() for p in reference.model.parameters()]
  assert reference.train(1) > 0
  changed = [not reference.torch.equal(a, b) for a, b in zip(before,
                                                             reference.model.parameters())]
  assert sum(changed) > len(changed) // 2  # AdamW moved (nearly) every tensor.
