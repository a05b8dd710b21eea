"""The ablation runner: sweep expansion, skip/resume, aggregation, one real run."""

import json
import math
import os
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags
from scipy import stats as scipy_stats
from tests.conftest import REPO, prepare_slice

from configs import base
from configs.ablations import antialias, downsample, precision, upsample
from hierarchical_vit import ablate, information, shift_consistency
from hierarchical_vit.analysis import aggregate, stats
from hierarchical_vit.training import tasks, trainer

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
NUM_STEPS = 4


def sweep_config(seeds=(0, 1, 2)) -> ml_collections.ConfigDict:
  config = base.get_config()
  config.train.num_steps = NUM_STEPS
  config.sweep = ml_collections.ConfigDict({
      'name': 'toy', 'seeds': seeds, 'metric': 'eval/accuracy',
      'variants': ({'name': 'patch_merge', 'overrides': {'model.downsample': 'patch_merge'}},
                   {'name': 'avg_pool', 'overrides': {'model.downsample': 'avg_pool',
                                                      'train.learning_rate': 3e-4}}),
      'comparisons': (('patch_merge', 'avg_pool'),),
  })
  return config


class FakeTrainer:
  """Writes a metrics.jsonl like the trainer's, up to `stop_at`; records calls."""

  def __init__(self, stop_at: int = NUM_STEPS):
    self.stop_at = stop_at
    self.calls = []

  def __call__(self, run: ablate.Run, workdir: str) -> None:
    self.calls.append(run.name)
    os.makedirs(workdir, exist_ok=True)
    accuracy = 0.9 if run.variant == 'patch_merge' else 0.8
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      for step in range(2, self.stop_at + 1, 2):
        f.write(json.dumps({'step': step, 'train/loss': 1.0, 'img_per_sec': 100.0 * step,
                            'train/epoch': step / 4}) + '\n')
        f.write(json.dumps({'step': step, 'eval/loss': 0.5,
                            'eval/accuracy': accuracy + 0.01 * run.seed * step / 4}) + '\n')


def fake_cost(model_config) -> dict[str, float]:
  return {'params': 1000 if model_config.downsample == 'patch_merge' else 500, 'gflops': 0.01}


def test_expand_sweep_names_and_overrides():
  runs = ablate.expand_sweep(sweep_config())
  assert [r.name for r in runs] == [f'{v}-seed{s}' for v in ('patch_merge', 'avg_pool')
                                    for s in (0, 1, 2)]
  run = runs[4]
  assert (run.variant, run.seed) == ('avg_pool', 1)
  assert run.overrides == {'model.downsample': 'avg_pool', 'train.learning_rate': 3e-4,
                           'seed': 1}
  assert run.config.model.downsample == 'avg_pool'
  assert run.config.train.learning_rate == 3e-4
  assert run.config.seed == 1
  assert runs[0].config.model.downsample == 'patch_merge'


def test_shipped_sweeps_expand():
  assert len(ablate.expand_sweep(downsample.get_config())) == 11 * 3
  assert len(ablate.expand_sweep(downsample.get_config('imagenet2012'))) == 10 * 3
  parts = {r.name: r.config.model for r in ablate.expand_sweep(downsample.get_config())}
  assert parts['max_pool_3x3-seed0'].downsample == 'max_pool'
  assert parts['max_pool_3x3-seed0'].downsample_options.max_pool.kernel_size == 3
  assert parts['conv_max_pool_2x2-seed2'].downsample_options.conv_max_pool.pool_size == 2
  assert parts['conv_max_pool-seed0'].downsample_options.conv_max_pool.pool_size == 3
  assert parts['conv_3x3-seed1'].downsample_options.conv.kernel_size == 3
  runs = ablate.expand_sweep(upsample.get_config())
  assert len(runs) == 10 * 3
  nearest = next(r for r in runs if r.name == 'avg_pool+nearest-seed2')
  assert nearest.config.model.upsample == 'interpolate'
  assert nearest.config.model.upsample_options.interpolate.method == 'nearest'
  with pytest.raises(ValueError, match="'svhn'"):
    downsample.get_config('svhn')


def test_antialias_sweep_pairs_each_reduction_with_its_blurred_twin():
  config = antialias.get_config()
  runs = ablate.expand_sweep(config)
  assert len(runs) == 6 * 3
  assert {r.config.model.downsample for r in runs} == {n for p in antialias.PAIRS for n in p}
  assert set(config.sweep.comparisons) == {('blur_merge', 'patch_merge'),
                                           ('blur_pool', 'avg_pool'),
                                           ('max_blur_pool', 'max_pool')}
  # The downsample sweep's recipe, so that their runs compare.
  recipe = downsample.get_config()
  assert config.train.to_dict() == recipe.train.to_dict()
  assert config.model.embed_dim == recipe.model.embed_dim
  with pytest.raises(ValueError, match="'svhn'"):
    antialias.get_config('svhn')


def test_precision_sweep_varies_only_the_compute_dtype_and_logits():
  config = precision.get_config()
  runs = ablate.expand_sweep(config)
  assert len(runs) == 3 * 3
  assert {(r.variant, r.config.model.dtype, r.config.model.attention) for r in runs} == {
      ('float32', 'float32', 'einsum'), ('bfloat16', 'bfloat16', 'einsum'),
      ('bfloat16_lowp_logits', 'bfloat16', 'einsum_lowp')}
  assert config.sweep.comparisons == (('bfloat16', 'float32'), ('bfloat16_lowp_logits', 'bfloat16'))
  # Otherwise the downsample sweep's reference run, so that their runs compare.
  recipe = downsample.get_config()
  assert config.train.to_dict() == recipe.train.to_dict()
  assert config.model.downsample == recipe.model.downsample == 'patch_merge'


@pytest.mark.parametrize('overrides, message', [
    ({'model.downsampel': 'avg_pool'}, "model.downsampel='avg_pool'.*no field"),
    ({'modle.downsample': 'avg_pool'}, "no section 'modle'"),
    ({'model.depths': 'deep'}, "model.depths='deep'"),
])
def test_bad_override_names_field_and_value(overrides, message):
  with pytest.raises(ValueError, match=message):
    ablate.apply_overrides(base.get_config(), overrides)


def test_bad_sweeps_raise():
  config = sweep_config()
  config.sweep.comparisons = (('patch_merge', 'max_pool'),)
  with pytest.raises(ValueError, match="'max_pool'"):
    ablate.expand_sweep(config)
  config = sweep_config()
  config.sweep.variants = config.sweep.variants[:1] * 2
  with pytest.raises(ValueError, match='not unique'):
    ablate.expand_sweep(config)
  with pytest.raises(ValueError, match='no field sweep'):
    ablate.expand_sweep(base.get_config())
  with pytest.raises(ValueError, match='no field sweep: not a sweep config'):
    ablate.Sweep(base.get_config(), '/tmp/unused')
  config = sweep_config()
  config.sweep.variants = ({'name': 'a', 'override': {'seed': 1}},)
  with pytest.raises(ValueError, match="must have exactly the keys 'name' and 'overrides'"):
    ablate.expand_sweep(config)
  config = sweep_config()
  config.sweep.seeds = (0, 0)
  with pytest.raises(ValueError, match=r'sweep.seeds=\(0, 0\) repeats a seed'):
    ablate.expand_sweep(config)
  config = sweep_config()
  config.sweep.metric = 'eval/acuracy'
  with pytest.raises(ValueError, match=r"sweep.metric='eval/acuracy' is not an eval metric of "
                                       r"task 'classification'.*'eval/top5_accuracy'"):
    ablate.expand_sweep(config)
  config = sweep_config()
  config.sweep.comparisons = ('patch_merge', 'avg_pool')  # The outer tuple forgotten.
  with pytest.raises(ValueError, match=r"sweep.comparisons\[0\]='patch_merge' must be an "
                                       r'\(a, b\) pair of variant names'):
    ablate.expand_sweep(config)


@pytest.mark.parametrize('task', sorted(tasks.TASKS))
def test_sweepable_metrics_are_what_the_task_reports(task):
  totals = {'classification': {'loss': 2.0, 'top1': 1.0, 'top5': 2.0, 'count': 4.0},
            'segmentation': {'loss': 2.0, 'pixels': 8.0, 'count': 2.0,
                             'confusion': np.eye(3) * 2}}[task]
  summary = tasks.get_task(task).summarize(totals)
  assert set(tasks.get_task(task).eval_metrics) <= set(summary)
  assert tasks.get_task(task).best_metric in tasks.get_task(task).eval_metrics


def test_select_runs():
  runs = ablate.expand_sweep(sweep_config())
  names = [r.name for r in ablate.select_runs(runs, ['avg_pool', 'patch_merge-seed2'])]
  assert names == ['patch_merge-seed2', 'avg_pool-seed0', 'avg_pool-seed1', 'avg_pool-seed2']
  assert len(ablate.select_runs(runs, [])) == 6
  with pytest.raises(ValueError, match='max_pool'):
    ablate.select_runs(runs, ['max_pool'])


def test_train_command():
  run = ablate.expand_sweep(sweep_config())[3]
  command = ablate.train_command(run, 'configs/x.py:arg', 'w/runs/avg_pool-seed0',
                                 {'data.data_dir': 'data', 'model.downsample': 'conv',
                                  'model.depths': (1, 1)})
  assert command == [
      'python', 'train.py', '--config=configs/x.py:arg', '--config.data.data_dir=data',
      '--config.model.downsample=avg_pool', '--config.model.depths=(1,1,)',
      '--config.train.learning_rate=0.0003', '--config.seed=0',
      '--workdir=w/runs/avg_pool-seed0']


def test_flag_values_parse_back_to_the_config_values():
  """What train.py's config_flags reads from each --config.x=VALUE is the
  value itself: strings bare or inside tuples, numbers, bools, nested tuples."""
  values = {'name': 'avg pool', 'axes': ('data', 'fsdp'), 'depths': (1, 2), 'rate': 3e-4,
            'flag': True, 'nested': ((1, 'a'), (2.5,)), 'empty': ()}
  argv = ['train.py', *(f'--config.{k}={ablate.flag_value(v)}' for k, v in values.items())]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_dict(
      'config', ml_collections.ConfigDict({k: type(v)() for k, v in values.items()}),
      flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  assert flag_values.config.to_dict() == values


def test_skips_local_and_committed_results(tmp_path):
  config = sweep_config()
  sweep = ablate.Sweep(config, str(tmp_path / 'a'), str(tmp_path / 'committed'))
  trainer = FakeTrainer()
  sweep.execute(sweep.runs, trainer, fake_cost)
  assert len(trainer.calls) == 6
  result = json.loads((tmp_path / 'a/runs/avg_pool-seed1/result.json').read_text())
  assert result['eval']['eval/accuracy'] == pytest.approx(0.81)
  assert (result['params'], result['steps'], result['seed']) == (500, NUM_STEPS, 1)
  assert result['train_img_per_sec'] == 300.0  # Median of 200, 400.
  assert [p['epoch'] for p in result['curve']] == [0.5, 1.0]
  assert [p['eval/accuracy'] for p in result['curve']] == pytest.approx([0.805, 0.81])
  assert all('eval/loss' in p for p in result['curve'])  # Every eval metric: any can be plotted.
  assert (tmp_path / 'committed/toy/runs/avg_pool-seed1.json').exists()

  sweep.execute(sweep.runs, trainer, fake_cost)  # Local results: nothing to do.
  assert len(trainer.calls) == 6
  # Another machine with the committed results only: nothing to do either.
  other = ablate.Sweep(config, str(tmp_path / 'b'), str(tmp_path / 'committed'))
  other.execute(other.runs, trainer, fake_cost)
  assert len(trainer.calls) == 6
  assert len(other.results()) == 6



def test_result_of_another_config_is_refused_not_reused(tmp_path):
  """A sweep whose epochs changed must not silently collect the old runs."""
  trainer = FakeTrainer()
  sweep = ablate.Sweep(sweep_config(seeds=(0,)), str(tmp_path / 'a'), str(tmp_path / 'c'))
  sweep.execute(sweep.runs, trainer, fake_cost)
  moved = sweep_config(seeds=(0,))
  moved.data.data_dir = '/elsewhere'  # Another machine's data dir: still the same run.
  assert ablate.Sweep(moved, str(tmp_path / 'b'), str(tmp_path / 'c')).is_finished(sweep.runs[0])
  changed = sweep_config(seeds=(0,))
  changed.train.learning_rate = 0.1
  other = ablate.Sweep(changed, str(tmp_path / 'b'), str(tmp_path / 'c'))
  with pytest.raises(ValueError, match=r'patch_merge-seed0.json: run patch_merge-seed0 was '
                                       r'trained with another config'):
    other.execute(other.runs, trainer, fake_cost)
  assert len(trainer.calls) == 2
  with pytest.raises(ValueError, match='trained with another config'):
    other.results()  # Nor is it aggregated, e.g. after --only trained other runs.
  committed = tmp_path / 'c/toy/runs/patch_merge-seed0.json'
  unfingerprinted = json.loads(committed.read_text())
  del unfingerprinted['config_fingerprint']
  committed.write_text(json.dumps(unfingerprinted))
  fresh = ablate.Sweep(sweep_config(seeds=(0,)), str(tmp_path / 'd'), str(tmp_path / 'c'))
  with pytest.raises(ValueError, match=r'patch_merge-seed0 carries no config fingerprint'):
    fresh.is_finished(fresh.runs[0])  # A result that cannot be checked is not reused.


def test_finished_metrics_of_another_config_are_refused(tmp_path):
  """Runs trained from --print_commands, then the sweep file edited: their
  metrics show them finished, but their config.json is another config."""
  sweep = ablate.Sweep(sweep_config(seeds=(0,)), str(tmp_path / 'w'), str(tmp_path / 'c'))
  run = sweep.runs[0]
  FakeTrainer()(run, sweep.run_dir(run))
  trainer.save_config(run.config, sweep.run_dir(run))  # As train.py writes it.
  changed = sweep_config(seeds=(0,))
  changed.train.learning_rate = 0.1
  other = ablate.Sweep(changed, str(tmp_path / 'w'), str(tmp_path / 'c'))
  calls = FakeTrainer()
  with pytest.raises(ValueError, match=r'holds a run trained with another config '
                                       r'\(train.learning_rate: 0.001 -> 0.1\)'):
    other.execute(other.runs[:1], calls, fake_cost)
  assert calls.calls == [] and not other.is_finished(other.runs[0])


def test_interrupted_run_raises_then_resumes(tmp_path):
  sweep = ablate.Sweep(sweep_config(seeds=(0,)), str(tmp_path))
  with pytest.raises(RuntimeError, match='patch_merge-seed0 stopped at step 2 of 4'):
    sweep.execute(sweep.runs, FakeTrainer(stop_at=2), fake_cost)
  assert not sweep.is_finished(sweep.runs[0])
  trainer = FakeTrainer()
  sweep.execute(sweep.runs, trainer, fake_cost)
  assert trainer.calls == ['patch_merge-seed0', 'avg_pool-seed0']
  first = json.loads((tmp_path / 'runs/patch_merge-seed0/result.json').read_text())
  assert first['resumed'] and not json.loads(
      (tmp_path / 'runs/avg_pool-seed0/result.json').read_text())['resumed']
  # The re-logged step 2 appears once in the curve.
  assert [p['step'] for p in first['curve']] == [2, 4]


def test_run_trained_elsewhere_is_collected_without_training(tmp_path):
  sweep = ablate.Sweep(sweep_config(seeds=(0,)), str(tmp_path))
  for run in sweep.runs:
    FakeTrainer()(run, sweep.run_dir(run))
  trainer = FakeTrainer()
  sweep.execute(sweep.runs, trainer, fake_cost)
  assert trainer.calls == []
  assert len(sweep.results()) == 2


class ConcurrentTrainer(FakeTrainer):
  """A FakeTrainer whose runs only finish when `parties` of them run at once."""

  def __init__(self, parties: int, fail: str = ''):
    super().__init__()
    self.barrier = threading.Barrier(parties, timeout=20)
    self.fail = fail
    self.started = []

  def __call__(self, run: ablate.Run, workdir: str) -> None:
    self.started.append(run.name)
    if run.name == self.fail:
      self.calls.append(run.name)
      self.barrier.abort()
      raise RuntimeError(f'{run.name} failed')
    self.barrier.wait()
    super().__call__(run, workdir)


def test_runs_at_once_trains_runs_concurrently(tmp_path):
  sweep = ablate.Sweep(sweep_config(seeds=(0, 1)), str(tmp_path))
  trainer = ConcurrentTrainer(parties=2)
  sweep.execute(sweep.runs, trainer, fake_cost, runs_at_once=2)
  assert sorted(trainer.calls) == sorted(r.name for r in sweep.runs)
  assert all(sweep.is_finished(r) for r in sweep.runs)


def test_failed_run_stops_later_runs_from_starting(tmp_path):
  sweep = ablate.Sweep(sweep_config(seeds=(0, 1, 2)), str(tmp_path))
  trainer = ConcurrentTrainer(parties=2, fail='patch_merge-seed0')
  with pytest.raises((RuntimeError, threading.BrokenBarrierError)):
    sweep.execute(sweep.runs, trainer, fake_cost, runs_at_once=2)
  # The failed run and the one beside it started; nothing after them.
  assert sorted(trainer.started) == ['patch_merge-seed0', 'patch_merge-seed1']


def test_every_failure_of_runs_at_once_is_reported(tmp_path):
  def fail(run: ablate.Run, workdir: str) -> None:
    raise RuntimeError(f'{run.name} broke')
  sweep = ablate.Sweep(sweep_config(seeds=(0,)), str(tmp_path))
  with pytest.raises(RuntimeError, match='^2 runs failed: ') as raised:
    sweep.execute(sweep.runs, fail, fake_cost, runs_at_once=2)
  assert 'patch_merge-seed0 broke' in str(raised.value)
  assert 'avg_pool-seed0 broke' in str(raised.value)


def test_cpu_slots_split_cpus_disjointly():
  assert ablate.cpu_slots([0, 1], 1) == [{0, 1}]
  assert ablate.cpu_slots([3, 1, 2, 0], 2) == [{0, 1}, {2, 3}]
  assert ablate.cpu_slots([0, 1, 2], 2) == [{0, 1}, {2}]
  with pytest.raises(ValueError, match=r'--runs_at_once=3 must be in \[1, 2\]'):
    ablate.cpu_slots([0, 1], 3)


def _affinity_command(path) -> list[str]:
  return [sys.executable, '-c', 'import os, sys; open(sys.argv[1], "w").write('
          'repr(sorted(os.sched_getaffinity(0))))', str(path)]


def test_subprocess_trainer_pins_each_child_to_its_cpus(tmp_path):
  cpus = sorted(os.sched_getaffinity(0))
  trainer = ablate.SubprocessTrainer('unused.py', {}, str(tmp_path / 'cache'))
  assert trainer._run_child('one', _affinity_command(tmp_path / 'all'), None) == 0
  assert (tmp_path / 'all').read_text() == repr(cpus)
  assert trainer._run_child('two', _affinity_command(tmp_path / 'one'), {cpus[-1]}) == 0
  assert (tmp_path / 'one').read_text() == repr([cpus[-1]])
  assert sorted(os.sched_getaffinity(0)) == cpus  # The sweep itself stays unpinned.


def test_sigterm_reaches_running_children_and_stops_new_ones(tmp_path):
  trainer = ablate.SubprocessTrainer('unused.py', {}, str(tmp_path / 'cache'))
  statuses = []
  with trainer.forwarding_sigterm():
    child = threading.Thread(target=lambda: statuses.append(trainer._run_child(
        'sleeper', [sys.executable, '-c', 'import time; time.sleep(60)'], None)))
    child.start()
    while not trainer._children:
      threading.Event().wait(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
    child.join(timeout=20)
    assert statuses == [-signal.SIGTERM]
    with pytest.raises(RuntimeError, match='not started: the sweep received SIGTERM'):
      trainer._run_child('later', [sys.executable, '-c', 'pass'], None)


@pytest.mark.parametrize('status, message', [
    (75, 'run patch_merge-seed0 was preempted \\(SIGTERM\\) after saving its checkpoint; '
         're-run the sweep to resume it'),
    (3, 'run patch_merge-seed0 failed with exit status 3: '),
])
def test_a_childs_exit_status_names_preemption_or_failure(tmp_path, status, message):
  trainer = ablate.SubprocessTrainer('unused.py', {}, str(tmp_path / 'cache'))
  trainer._command = lambda run, workdir: [sys.executable, '-c', f'raise SystemExit({status})']
  run = ablate.Sweep(sweep_config(seeds=(0,)), str(tmp_path)).runs[0]
  with pytest.raises(RuntimeError, match=message):
    trainer(run, str(tmp_path / 'run'))


def test_t_quantile_matches_tables():
  for p, df, expected in [(0.975, 1, 12.706205), (0.975, 2, 4.302653), (0.975, 4, 2.776445),
                          (0.975, 10, 2.228139), (0.95, 5, 2.015048)]:
    assert stats.t_quantile(p, df) == pytest.approx(expected, abs=1e-5)


def test_t_quantile_matches_scipy_for_welch_df():
  for df in (1.3, 2.7, 3.4845, 7.9, 40.0):
    assert stats.t_quantile(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-6)


def test_welch_difference_by_hand():
  # Equal variances (1) and n = 3: s.e. = sqrt(2/3), df = 4, t = 2.776445.
  diff = stats.welch_difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
  assert diff.mean == pytest.approx(1.0)
  assert diff.std_error == pytest.approx(math.sqrt(2 / 3))
  assert diff.df == pytest.approx(4.0)
  assert diff.ci_low == pytest.approx(1 - 2.776445 * math.sqrt(2 / 3), abs=1e-5)
  assert diff.ci_high == pytest.approx(1 + 2.776445 * math.sqrt(2 / 3), abs=1e-5)
  # Unequal: var 0.0004 and 0.0009 -> df = (4.333e-4)^2 / (1.333e-4^2/2 + 3e-4^2/2).
  diff = stats.welch_difference([0.90, 0.92, 0.94], [0.85, 0.88, 0.91])
  assert diff.mean == pytest.approx(0.04)
  assert diff.df == pytest.approx((0.0013 / 3) ** 2 / ((0.0004 / 3) ** 2 / 2
                                                       + (0.0009 / 3) ** 2 / 2))
  assert stats.mean_std([0.90, 0.92, 0.94]) == pytest.approx((0.92, 0.02))


def test_paired_difference_by_hand_and_against_scipy():
  diff = stats.paired_difference([1.0, 2.0, 4.0], [0.0, 1.0, 2.0])  # d = 1, 1, 2.
  assert (diff.mean, diff.df) == (pytest.approx(4 / 3), 2)
  assert diff.std_error == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
  assert diff.ci_low == pytest.approx(4 / 3 - 4.302653 / 3, abs=1e-5)
  a, b = [0.90, 0.93, 0.94, 0.97], [0.85, 0.91, 0.90, 0.96]
  low, high = scipy_stats.ttest_rel(a, b).confidence_interval(0.9)
  diff = stats.paired_difference(a, b, confidence=0.9)
  assert (diff.ci_low, diff.ci_high) == pytest.approx((low, high), abs=1e-6)
  assert diff.p_value == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue, rel=1e-9)
  with pytest.raises(ValueError, match='two sequences of one length >= 2, got 3 and 2'):
    stats.paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])


def test_p_values_in_the_far_tail_and_without_spread():
  # Welch with two seeds a side can have df ~ 1, whose tail falls only as 1 / t.
  for t, df in ((3.0, 1.0), (1e4, 1.2), (40.0, 2.5), (-2.0, 7.0)):
    assert stats.two_sided_p(t, 1.0, df) == pytest.approx(2 * scipy_stats.t.sf(abs(t), df),
                                                          rel=1e-9)
  assert stats.two_sided_p(0.5, 0.0, 3) == 0.0 and stats.two_sided_p(0.0, 0.0, 3) == 1.0


def test_holm_adjusts_step_down_by_hand():
  # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06
  # (non-decreasing), each back in its place.
  assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
  assert stats.holm([0.5, 0.9]) == [1.0, 1.0] and stats.holm([0.2]) == [0.2]
  assert stats.holm([]) == []


def test_comparisons_pair_only_the_seeds_both_variants_ran():
  results = ([_result('a', s, v) for s, v in ((0, 0.90), (1, 0.92), (2, 0.97))]
             + [_result('b', s, v) for s, v in ((1, 0.90), (2, 0.94), (3, 0.80))]
             + [_result('c', s, v) for s, v in ((5, 0.90), (6, 0.94))])
  ab, ac = aggregate.comparison_table(results, 'eval/accuracy', (('a', 'b'), ('a', 'c')))
  assert ab['n_pairs'] == 2  # Seeds 1 and 2: differences 0.02 and 0.03.
  assert ab['paired_std_error'] == pytest.approx(0.005)
  assert ab['mean'] == pytest.approx(0.93 - 0.88)  # Welch: every run of each.
  assert 'n_pairs' not in ac
  # Two tests: Holm over both Welch p-values; the paired one is alone in its family.
  assert [ab['p_holm'], ac['p_holm']] == stats.holm([ab['p_value'], ac['p_value']])
  assert ab['paired_p_holm'] == ab['paired_p_value'] and 'paired_p_holm' not in ac


def test_welch_difference_with_unequal_sizes_matches_scipy():
  """n = 4 against n = 2, unequal variances: scipy's Welch t-test gives the
  statistic (diff / s.e.), the df (through its p-value) and the interval."""
  a, b = [0.90, 0.92, 0.94, 0.97], [0.85, 0.91]
  diff = stats.welch_difference(a, b, confidence=0.9)
  test = scipy_stats.ttest_ind(a, b, equal_var=False)
  assert diff.mean / diff.std_error == pytest.approx(test.statistic)
  assert 2 * scipy_stats.t.sf(abs(test.statistic), diff.df) == pytest.approx(test.pvalue)
  assert diff.p_value == pytest.approx(test.pvalue, rel=1e-9)
  low, high = test.confidence_interval(0.9)
  assert (diff.ci_low, diff.ci_high) == pytest.approx((low, high), abs=1e-6)
  # Zero variance on both sides: the point difference; one value: refused.
  point = stats.welch_difference([1.0, 1.0], [0.5, 0.5])
  assert (point.mean, point.ci_low, point.ci_high, point.std_error) == (0.5, 0.5, 0.5, 0.0)
  with pytest.raises(ValueError, match='needs >= 2 values per side, got 1 and 2'):
    stats.welch_difference([1.0], b)


def _result(variant: str, seed: int, accuracy: float) -> dict:
  return {'run': f'{variant}-seed{seed}', 'variant': variant, 'seed': seed,
          'overrides': {'model.downsample': variant, 'seed': seed},
          'eval': {'eval/accuracy': accuracy}, 'test_loss': 0.3,
          'params': 1234567, 'gflops': 0.05, 'train_img_per_sec': 100.0 + seed,
          'wall_time_s': 1.0, 'steps': 10, 'date': '2025-01-01',
          'curve': [{'step': 5, 'epoch': 0.5, 'eval/accuracy': accuracy - 0.1, 'eval/loss': 1.0},
                    {'step': 10, 'epoch': 1.0, 'eval/accuracy': accuracy, 'eval/loss': 0.5}]}


def test_curves_give_the_metric_asked_for_and_read_committed_results():
  point = _result('a', 0, 0.9)['curve'][1]
  assert aggregate.curve_value(point, 'eval/accuracy') == 0.9
  assert aggregate.curve_value(point, 'eval/loss') == 0.5
  # Written before curves kept every metric: 'value' (the sweep's metric) and 'loss'.
  legacy = {'step': 10, 'epoch': 1.0, 'value': 0.9, 'loss': 0.5}
  assert aggregate.curve_value(legacy, 'eval/accuracy') == 0.9
  assert aggregate.curve_value(legacy, 'eval/loss') == 0.5


def test_information_column_skips_variants_with_other_downsampler_options():
  sweep = ml_collections.ConfigDict({
      'name': 'parts', 'seeds': (0,), 'metric': 'eval/accuracy', 'comparisons': (),
      'variants': (
          {'name': 'max_pool', 'overrides': {'model.downsample': 'max_pool'}},
          {'name': 'max_pool_3x3', 'overrides': {
              'model.downsample': 'max_pool', 'model.downsample_options.max_pool.kernel_size': 3}},
          {'name': 'avg_pool', 'overrides': {
              'model.downsample': 'avg_pool', 'model.downsample_options.max_pool.kernel_size': 3}},
      )})
  results = [_result(v, 0, 0.9) for v in ('max_pool', 'max_pool_3x3', 'avg_pool')]
  text = aggregate.markdown(results, sweep, information={'max_pool': 0.433, 'avg_pool': 0.332})
  assert '| max_pool | 1 | 90.00 | 1,234,567 | 0.0500 | 100 | 0.433 |' in text
  assert '| max_pool_3x3 | 1 | 90.00 | 1,234,567 | 0.0500 | 100 | – |' in text
  # Another downsampler's options do not change avg_pool.
  assert '| avg_pool | 1 | 90.00 | 1,234,567 | 0.0500 | 100 | 0.332 |' in text


def test_aggregates_by_hand(tmp_path):
  results = ([_result('patch_merge', s, a) for s, a in enumerate((0.90, 0.92, 0.94))]
             + [_result('avg_pool', s, a) for s, a in enumerate((0.85, 0.88, 0.91))])
  config = sweep_config()
  (tmp_path / 'information.json').write_text(json.dumps(
      {'errors': {'patch_merge': 0.125, 'avg_pool': 0.5}}))
  (tmp_path / 'shift_consistency.json').write_text(json.dumps(
      {'variants': {'patch_merge': {'num_runs': 3, 'consistency': 0.75,
                                   'consistency_std': 0.0125}},
       'shift': 'crop', 'max_shift': 16, 'num_images': 500}))
  written = aggregate.write_all(results, config.sweep, str(tmp_path))
  assert len(written) == 5
  for path in written:
    if path.endswith('.png'):
      with open(path, 'rb') as f:
        assert f.read(8) == PNG_SIGNATURE
  table = aggregate.variant_table(results, 'eval/accuracy')
  assert [(r['variant'], r['n']) for r in table] == [('patch_merge', 3), ('avg_pool', 3)]
  assert table[1]['mean'] == pytest.approx(0.88)
  assert table[1]['std'] == pytest.approx(0.03)
  assert table[1]['train_img_per_sec'] == pytest.approx(101.0)
  markdown = (tmp_path / 'results.md').read_text()
  assert ('| patch_merge | 3 | 92.00 ± 2.00 | 1,234,567 | 0.0500 | 101 | 0.125 | 75.00 ± 1.25 |'
          in markdown)
  assert '| avg_pool | 3 | 88.00 ± 3.00 | 1,234,567 | 0.0500 | 101 | 0.500 | – |' in markdown
  assert '| recon. error | shift consistency (%) |' in markdown
  assert ("two random crops of a wider view (Zhang's ImageNet protocol) of a held-out image "
          'by up to 16 pixels per axis, on 500 images') in markdown
  assert '| patch_merge − avg_pool | 3, 3 | 4.00 ± 2.08 |' in markdown
  # Paired by seed: differences 5, 4, 3 pp, s.e. 1/sqrt(3), t(0.975, 2) = 4.302653.
  assert '| [1.52, 6.48] (3) |' in markdown
  csv_lines = (tmp_path / 'results.csv').read_text().splitlines()
  assert len(csv_lines) == 7 and csv_lines[0].startswith('run,variant,seed,eval/accuracy,')
  assert csv_lines[1].startswith('patch_merge-seed0,patch_merge,0,0.9,')


def grid_sweep() -> ml_collections.ConfigDict:
  """2 upsamplers x 2 downsamplers, cells named '<down>+<up>'."""
  config = sweep_config(seeds=(0, 1))
  config.sweep.variants = tuple(
      {'name': f'{down}+{up}', 'overrides': {'model.downsample': down}}
      for up in ('expand', 'bilinear') for down in ('merge', 'pool'))
  config.sweep.comparisons = ()
  config.sweep.grid = {'rows': ('expand', 'bilinear'), 'columns': ('merge', 'pool'),
                       'cell': '{column}+{row}'}
  return config


def test_grid_table_and_plot_by_hand(tmp_path):
  sweep = grid_sweep().sweep
  values = {'merge+expand': (0.50, 0.54), 'pool+expand': (0.40, 0.40),
            'merge+bilinear': (0.30, 0.36)}  # pool+bilinear not run yet.
  results = [_result(variant, seed, value) for variant, pair in values.items()
             for seed, value in enumerate(pair)]
  written = aggregate.write_all(results, sweep, str(tmp_path))
  assert os.path.basename(written[-1]) == 'grid.png'
  with open(written[-1], 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE
  markdown = (tmp_path / 'results.md').read_text()
  assert '| | merge | pool |' in markdown
  assert '| expand | 52.00 ± 2.83 (2) | 40.00 ± 0.00 (2) |' in markdown
  assert '| bilinear | 33.00 ± 4.24 (2) | – |' in markdown


def test_grid_cell_that_is_no_variant_raises():
  config = grid_sweep()
  assert len(ablate.expand_sweep(config)) == 8
  config.sweep.grid.cell = '{row}+{column}'
  with pytest.raises(ValueError, match=r"sweep.grid cell \(row 'expand', column 'merge'\) = "
                                       r"'expand\+merge'"):
    ablate.expand_sweep(config)
  config.sweep.grid.cell = '{row}+{col}'
  with pytest.raises(ValueError, match=r"sweep.grid.cell='\{row\}\+\{col\}' may only use"):
    ablate.expand_sweep(config)
  del config.sweep.grid['cell']
  with pytest.raises(ValueError, match=r"sweep.grid lacks \['cell'\]: it needs rows, columns"):
    ablate.expand_sweep(config)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  return prepare_slice(tmp_path_factory, 'fashion_mnist', 64)


TINY_SWEEP = '''import sys
sys.path.insert(0, {repo!r})
import ml_collections
from configs import base


def get_config():
  config = base.get_config()
  config.model.update(embed_dim=16, depths=(1, 1), num_heads=(1, 2), img_size=32,
                      patch_size=4, window_size=4, in_chans=1, gelu_approximate=True)
  config.data.update(data_dir={data_dir!r}, hflip=False)
  config.train.update(batch_size=32, num_steps=2, log_every_steps=1, eval_batch_size=64)
  config.sweep = ml_collections.ConfigDict({{
      'name': 'tiny', 'seeds': (0,), 'metric': 'eval/accuracy', 'comparisons': (),
      'variants': ({{'name': 'avg_pool', 'overrides': {{'model.downsample': 'avg_pool'}}}},),
  }})
  return config
'''


def test_child_env_adds_a_compilation_cache_of_every_program_unless_set():
  env = ablate.child_env({'PATH': '/bin'}, '/cache')
  assert env == {'PATH': '/bin', 'JAX_COMPILATION_CACHE_DIR': '/cache',
                 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  mine = {'JAX_COMPILATION_CACHE_DIR': '/mine', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '2'}
  assert ablate.child_env(mine, '/cache') == mine


def test_real_run_through_train_py(tmp_path, data_dir, monkeypatch):
  """Wiring: config file -> train.py child process -> result -> aggregates."""
  suite_cache = os.environ['JAX_COMPILATION_CACHE_DIR']  # The test suite's own (conftest.py):
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')  # the sweep must give its child one.
  config_path = tmp_path / 'tiny_sweep.py'
  config_path.write_text(TINY_SWEEP.format(repo=REPO, data_dir=data_dir))
  namespace = {}
  exec(config_path.read_text(), namespace)  # pylint: disable=exec-used
  config = namespace['get_config']()
  sweep = ablate.Sweep(config, str(tmp_path / 'work'), str(tmp_path / 'committed'))
  cache_dir = tmp_path / 'compilation_cache'
  sweep.execute(sweep.runs, ablate.SubprocessTrainer(str(config_path), {}, str(cache_dir)))
  assert any(cache_dir.iterdir()), 'the child compiled without the persistent cache'
  result = sweep.results()[0]
  assert result['run'] == 'avg_pool-seed0' and result['steps'] == 2
  assert 0 <= result['eval']['eval/accuracy'] <= 1 and result['params'] > 0 and result['gflops'] > 0
  saved = json.loads((tmp_path / 'work/runs/avg_pool-seed0/config.json').read_text())
  assert saved['model']['downsample'] == 'avg_pool'
  assert aggregate.write_all(sweep.results(), config.sweep, sweep.output_dir)
  # The information measure on the trained model's features and downsampler.
  rng = np.random.default_rng(0)
  images = rng.normal(size=(8, 32, 32, 1)).astype(np.float32)
  run_dir = str(tmp_path / 'work/runs/avg_pool-seed0')
  errors = information.trained_errors(run_dir, images[:6], images[6:])
  assert errors['space_to_depth'] < 1e-4 < errors['trained']
  # The features are stage 0's output, as the whole encoder computes it, and
  # 'trained' is the model's first downsampler on them. Jitted as there (the
  # least-squares fit of 'trained' amplifies float32 rounding; eagerly the
  # encoder also takes ~10 s here).
  model = trainer.restore_trained(trainer.load_config(run_dir), run_dir).model()
  features = information.stage0_features(model.encoder)
  whole = nnx.jit(lambda encoder, x: encoder(x)[0])(model.encoder, jnp.asarray(images))
  np.testing.assert_allclose(features(images), whole, rtol=1e-5, atol=1e-5)
  f_train, f_test = (np.asarray(features(x)) for x in (images[:6], images[6:]))
  assert errors['avg_pool'] == pytest.approx(
      information.downsampler_errors(f_train, f_test)['avg_pool'], rel=1e-6)
  first = jax.jit(model.encoder.downsamplers[0])
  assert errors['trained'] == pytest.approx(information.reconstruction_error(
      lambda x: np.asarray(first(x)), f_train, f_test), rel=1e-6)
  # Shift consistency of the trained run, in-process and through its CLI.
  # More images than the 64-image split holds: measured on the 64.
  measured = shift_consistency.measure_run(run_dir, num_images=100, max_shift=2)
  assert measured['step'] == 2 and len(measured['diagonal']) == 2
  assert measured['num_images'] == 64
  assert all(0 <= measured[m] <= 1 for m in shift_consistency.METRICS)
  # Crops of a 2-pixel wider view: its centre crop is the usual eval image.
  cropped = shift_consistency.measure_run(run_dir, num_images=100, max_shift=2, shift='crop')
  assert cropped['accuracy'] == measured['accuracy'] and len(cropped['diagonal']) == 2
  output = tmp_path / 'shift_consistency.json'
  cli = subprocess.run([sys.executable, '-m', 'hierarchical_vit.shift_consistency',
                        f"--run_dirs={tmp_path / 'work/runs/*'}", '--num_images=100',
                        '--max_shift=2', f'--output={output}'],
                       cwd=REPO, capture_output=True, text=True, check=False,
                       env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=suite_cache))
  assert cli.returncode == 0, cli.stderr[-2000:]
  written = json.loads(output.read_text())
  assert written['runs'] == {'avg_pool-seed0': measured} and written['num_images'] == 64
  assert written['variants']['avg_pool']['num_runs'] == 1


@pytest.fixture(scope='module')
def canvas_dir(tmp_path_factory) -> str:
  return prepare_slice(tmp_path_factory, 'fashion_mnist_canvas', 64)


def test_total_steps_of_a_segmentation_sweep_reads_the_canvas_split(canvas_dir):
  """Segmentation data sets have no image labels: the run's task must reach the data info."""
  run = ablate.expand_sweep(upsample.get_config())[0]
  run.config.data.data_dir = canvas_dir
  run.config.train.update(batch_size=16, num_epochs=2.0, num_steps=0)
  assert ablate.total_steps(run.config) == 2 * 64 // 16


# Each committed sweep with the command-line overrides docs/results/README.md gives.
_LONGER = {'train.warmup_epochs': 0.25, 'train.num_epochs': 4.0,
           'train.eval_every_steps': 468, 'sweep.name': 'downsample_fashion_mnist_4ep'}
_TWO_EPOCHS = {'train.warmup_epochs': 0.2, 'train.num_epochs': 2.0,
               'train.eval_every_steps': 468, 'sweep.name': 'antialias_fashion_mnist_2ep'}
_COMMITTED_SWEEPS = {
    'downsample_fashion_mnist': downsample.get_config(),
    'downsample_fashion_mnist_4ep': ablate.apply_overrides(downsample.get_config(), _LONGER),
    'antialias_fashion_mnist_2ep': ablate.apply_overrides(antialias.get_config(), _TWO_EPOCHS),
    'antialias_fashion_mnist_2ep_crop2': ablate.apply_overrides(antialias.get_config(), {
        **_TWO_EPOCHS, 'data.crop_padding': 2, 'sweep.name': 'antialias_fashion_mnist_2ep_crop2'}),
    'upsample_segmentation': upsample.get_config(),
    'precision_fashion_mnist_2ep': ablate.apply_overrides(precision.get_config(), {
        **_TWO_EPOCHS, 'sweep.name': 'precision_fashion_mnist_2ep'}),
}


def test_every_committed_sweep_is_checked():
  committed = {d for d in os.listdir(os.path.join(REPO, 'docs', 'results'))
               if os.path.isdir(os.path.join(REPO, 'docs', 'results', d, 'runs'))}
  assert committed == set(_COMMITTED_SWEEPS)


@pytest.mark.parametrize('name', sorted(_COMMITTED_SWEEPS))
def test_committed_results_match_their_sweep_config(tmp_path, name):
  """Rerunning a committed sweep collects its results: a config change that
  alters what those runs trained would raise here (see training/config_history.py)."""
  config = _COMMITTED_SWEEPS[name]
  assert config.sweep.name == name
  sweep = ablate.Sweep(config, str(tmp_path), os.path.join(REPO, 'docs', 'results'))
  committed = os.listdir(os.path.join(sweep.output_dir, 'runs'))
  finished = [run for run in sweep.runs if sweep.is_finished(run)]
  assert committed and sorted(f'{run.name}.json' for run in finished) == sorted(committed)


def test_added_and_removed_fields_keep_the_fingerprint_of_what_was_trained():
  config = sweep_config()
  before = config.to_dict()
  del before['model']['attention']  # The config as it was before the field existed...
  before['data']['shuffle_buffer'] = 0  # ... and before this one was removed.
  old = ml_collections.ConfigDict(before)
  assert 'shuffle_buffer' not in config.data
  assert ablate.config_fingerprint(config) == ablate.config_fingerprint(old)
  config.model.attention = 'cudnn'
  assert ablate.config_fingerprint(config) != ablate.config_fingerprint(old)



def test_how_a_run_executes_leaves_the_fingerprint_and_what_it_trains_changes_it():
  config = sweep_config()
  fingerprint = ablate.config_fingerprint(config)
  elsewhere = config.copy_and_resolve_references()
  elsewhere.data.data_dir = '/mnt/other'
  elsewhere.mesh.strategy = 'fsdp'
  elsewhere.model.remat = 'block'
  elsewhere.train.update(log_every_steps=3, checkpoint_every_steps=7, keep_checkpoints=5,
                         eval_batch_size=2 * config.train.eval_batch_size)
  elsewhere.sweep.metric = 'eval/loss'  # How results are read, not what trained.
  assert ablate.config_fingerprint(elsewhere) == fingerprint
  for field, value in [('data.num_workers', config.data.num_workers + 1),
                       ('train.eval_every_steps', 17), ('model.drop_path_rate', 0.3)]:
    changed = config.copy_and_resolve_references()
    section, key = field.split('.')
    changed[section][key] = value
    assert ablate.config_fingerprint(changed) != fingerprint, field


def test_options_of_a_newer_downsampler_keep_the_fingerprint_until_changed():
  config = sweep_config()
  before = config.to_dict()
  del before['model']['downsample_options']['blur_pool']
  old = ml_collections.ConfigDict(before)
  assert ablate.config_fingerprint(config) == ablate.config_fingerprint(old)
  config.model.downsample_options.blur_pool.filter_size = 5
  assert ablate.config_fingerprint(config) != ablate.config_fingerprint(old)


def test_missing_data_stops_the_sweep_before_any_run(tmp_path):
  (tmp_path / 'empty').mkdir()
  proc = subprocess.run(
      [sys.executable, '-m', 'hierarchical_vit.ablate',
       '--config=configs/ablations/downsample.py:fashion_mnist',
       f'--workdir={tmp_path / "work"}', f'--results_dir={tmp_path / "results"}',
       f'--config.data.data_dir={tmp_path / "empty"}', '--only=avg_pool-seed0'],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode != 0
  assert "Data set 'fashion_mnist' is not prepared in data_dir" in proc.stderr
  assert 'hierarchical_vit.data.prepare --dataset=fashion_mnist' in proc.stderr
  assert not (tmp_path / 'work' / 'runs').exists()  # No child was started.


def test_a_loss_metric_is_shown_as_it_is_not_in_percent():
  sweep = ml_collections.ConfigDict({
      'name': 'losses', 'seeds': (0, 1), 'metric': 'eval/loss',
      'comparisons': (('a', 'b'),),
      'variants': ({'name': 'a', 'overrides': {}}, {'name': 'b', 'overrides': {}})})
  results = []
  for variant, losses in (('a', (0.35, 0.37)), ('b', (0.30, 0.30))):
    for seed, loss in enumerate(losses):
      result = _result(variant, seed, 0.9)
      result['eval'] = {'eval/loss': loss}
      results.append(result)
  text = aggregate.markdown(results, sweep)
  assert '| eval/loss | params' in text and '| a | 2 | 0.3600 ± 0.0141 |' in text
  assert '## Differences a − b of eval/loss (absolute)' in text
  assert '| a − b | 2, 2 | 0.0600 ± 0.0100 |' in text and '(%)' not in text.split('##')[0]
  # t = 6 at df 1 (b has no spread); one comparison, so Holm leaves p as it is.
  p = stats.two_sided_p(0.06, 0.01, 1.0)
  assert f'| 1.0 | {p:.2g} | [' in text and 'Holm-adjusted over the 1 comparisons' in text


def test_a_variant_that_cannot_run_stops_the_sweep_before_any_run(data_dir):
  """An override out of range, or a model its fields cannot build, is refused
  by variant before the first child trains, not when its turn comes."""
  config = downsample.get_config('fashion_mnist')
  config.data.data_dir = data_dir  # 64 training examples.
  config.train.batch_size = 32
  good = ablate.expand_sweep(config)
  ablate.check_runs(good)
  for overrides, message in (
      ({'train.label_smoothing': 1.0}, r'train.label_smoothing=1.0 must be in \[0, 1\)'),
      ({'model.num_heads': (1, 2)}, r'model.num_heads'),
      ({'train.batch_size': 128}, r'train.batch_size=128 exceeds the 64 training examples')):
    config.sweep.update(variants=({'name': 'bad', 'overrides': overrides},), comparisons=())
    with pytest.raises(ValueError, match=r"sweep variant 'bad' \(\{.*\}\): " + message):
      ablate.check_runs(ablate.expand_sweep(config))
