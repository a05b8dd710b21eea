r"""Ablation sweeps: every (variant, seed) of a sweep config, resumable, aggregated.

A sweep config is an experiment config plus a `sweep` section (see
configs/ablations/downsample.py):

  sweep.name         results go to RESULTS_DIR/<name>/
  sweep.seeds        e.g. (0, 1, 2); each run sets config.seed
  sweep.variants     ({'name': 'avg_pool', 'overrides': {'model.downsample': 'avg_pool'}}, ...)
  sweep.comparisons  (('patch_merge', 'avg_pool'), ...): differences a - b to report
  sweep.metric       final eval metric to compare, e.g. 'eval/accuracy'
  sweep.grid         optional, for crossed sweeps: {'rows', 'columns', 'cell'}
                     lays the variants out as a table (hierarchical_vit.analysis)

Run `<variant>-seed<seed>` trains in WORKDIR/runs/<name> with train.py in a
child process: each run gets fresh memory, and an interrupted run resumes
exactly as train.py does (from its latest checkpoint). A finished run leaves
`result.json` in its workdir and a copy in RESULTS_DIR/<sweep>/runs/<name>.json
(meant to be committed); a run with either is skipped, so a sweep interrupted
on one machine continues on another from the committed results, whatever that
machine's data dir, mesh or logging (config_fingerprint says which results
belong to which config).

  python -m hierarchical_vit.ablate \
      --config=configs/ablations/downsample.py:fashion_mnist \
      --workdir=workdirs/downsample --config.data.data_dir=data
  # One train.py command per unfinished run, e.g. for a cluster; afterwards
  # the same command without --print_commands collects the finished runs.
  ... --print_commands
  # Only some runs (variant or run names, comma-separated):
  ... --only=patch_merge,avg_pool-seed0
  # Two runs at once, each pinned to half of the CPUs (small models: more
  # images per second in total than one run on all cores; SubprocessTrainer):
  ... --runs_at_once=2

Any --config.x=y flag applies to every run (and appears in the commands).
After the runs, every result of the sweep is aggregated into
RESULTS_DIR/<sweep>/{results.csv,results.md,*.png} (hierarchical_vit.analysis).
"""

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent import futures
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import traverse_util
from ml_collections import config_flags

from hierarchical_vit import cli, data, files, report
from hierarchical_vit.analysis import aggregate
from hierarchical_vit.models import abstract_model, input_shape
from hierarchical_vit.training import config_history, tasks, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NAME_PATTERN = re.compile(r'^[A-Za-z0-9_.+-]+$')


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep."""
  name: str                  # '<variant>-seed<seed>', also its directory name.
  variant: str
  seed: int
  overrides: dict[str, Any]  # Dotted config fields set for this run (incl. 'seed').
  config: ml_collections.ConfigDict  # The experiment config with overrides applied.


# (run, workdir) -> None; trains (or resumes) the run to completion in workdir.
TrainFn = Callable[[Run, str], None]
# model config -> {'params': int, 'gflops': float}.
CostFn = Callable[[ml_collections.ConfigDict], dict[str, float]]


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of config with dotted fields set, e.g. {'model.downsample': 'avg_pool'}.

  Only existing fields can be set, so a typo fails here, not after training.
  """
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *sections, field = key.split('.')
    node = config
    for section in sections:
      if section not in node or not isinstance(node[section], ml_collections.ConfigDict):
        raise ValueError(f'override {key}={value!r}: config has no section {section!r}')
      node = node[section]
    if field not in node:
      raise ValueError(f'override {key}={value!r}: config has no field {key!r}')
    try:
      node[field] = value
    except TypeError as e:  # ConfigDict refuses to change a field's type.
      raise ValueError(f'override {key}={value!r}: {e}') from e
  return config


def expand_sweep(config: ml_collections.ConfigDict) -> list[Run]:
  """All (variant, seed) runs of config.sweep, variant-major, in config order."""
  if 'sweep' not in config:
    raise ValueError('config has no field sweep: not a sweep config '
                     '(see configs/ablations/)')
  sweep = config.sweep
  if not sweep.seeds:
    raise ValueError(f'sweep.seeds={sweep.seeds!r} is empty')
  if len(set(sweep.seeds)) != len(sweep.seeds):
    raise ValueError(f'sweep.seeds={tuple(sweep.seeds)} repeats a seed: its runs would '
                     'share a workdir and count twice')
  metrics = tasks.get_task(config.task).eval_metrics
  if sweep.metric not in metrics:
    raise ValueError(f'sweep.metric={sweep.metric!r} is not an eval metric of task '
                     f'{config.task!r}; valid choices: {list(metrics)}')
  for variant in sweep.variants:
    if set(variant) != {'name', 'overrides'}:
      raise ValueError(f'sweep.variants entry {dict(variant)} must have exactly the keys '
                       "'name' and 'overrides'")
  names = [v['name'] for v in sweep.variants]
  for name in names:
    if not _NAME_PATTERN.match(name):
      raise ValueError(f'sweep.variants name={name!r} must match {_NAME_PATTERN.pattern}')
  if len(set(names)) != len(names):
    raise ValueError(f'sweep.variants names={names} are not unique')
  for i, pair in enumerate(sweep.comparisons):
    # A lone pair without its outer tuple, (('a', 'b'),), would unpack here as ('a', 'b').
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(isinstance(name, str) for name in pair)):
      raise ValueError(f'sweep.comparisons[{i}]={pair!r} must be an (a, b) pair of variant '
                       "names, e.g. comparisons=(('patch_merge', 'avg_pool'),)")
    if pair[0] not in names or pair[1] not in names:
      raise ValueError(f'sweep.comparisons ({pair[0]!r}, {pair[1]!r}) names a variant not in '
                       f'{names}')
  if 'grid' in sweep:
    missing = {'rows', 'columns', 'cell'} - set(sweep.grid)
    if missing:
      raise ValueError(f'sweep.grid lacks {sorted(missing)}: it needs rows, columns and cell')
    for (row, column), cell in aggregate.grid_cells(sweep.grid).items():
      if cell not in names:
        raise ValueError(f'sweep.grid cell (row {row!r}, column {column!r}) = {cell!r} '
                         f'is not a variant in {names}')
  runs = []
  for variant in sweep.variants:
    for seed in sweep.seeds:
      overrides = {**variant['overrides'], 'seed': int(seed)}
      runs.append(Run(name=f'{variant["name"]}-seed{seed}', variant=variant['name'],
                      seed=int(seed), overrides=overrides,
                      config=apply_overrides(config, overrides)))
  return runs


def select_runs(runs: Sequence[Run], only: Sequence[str]) -> list[Run]:
  """The runs whose variant or run name is in `only` (all if `only` is empty)."""
  if not only:
    return list(runs)
  known = {r.variant for r in runs} | {r.name for r in runs}
  unknown = sorted(set(only) - known)
  if unknown:
    raise ValueError(f'--only={",".join(only)}: {unknown} name no variant or run; '
                     f'choices: {sorted(known)}')
  return [r for r in runs if r.variant in only or r.name in only]


def flag_value(value: Any) -> str:
  """A config value as config_flags parses it back from --config.x=VALUE."""
  if isinstance(value, (tuple, list)):
    # A tuple is parsed as a Python literal: its strings need quotes (a bare
    # string field is taken as it is).
    return '(' + ''.join(f'{repr(v) if isinstance(v, str) else flag_value(v)},'
                         for v in value) + ')'
  return str(value)


def train_command(run: Run, config_spec: str, workdir: str,
                  base_overrides: dict[str, Any], python: str = 'python',
                  train_py: str = 'train.py') -> list[str]:
  """train.py argv for a run: the sweep's config file, the command line's
  overrides, then the run's (which win, as in the sweep's own config)."""
  overrides = {**base_overrides, **run.overrides}
  return [python, train_py, f'--config={config_spec}',
          *(f'--config.{k}={flag_value(v)}' for k, v in overrides.items()),
          f'--workdir={workdir}']


def child_env(environ: dict[str, str], cache_dir: str) -> dict[str, str]:
  """environ plus a persistent XLA compilation cache in cache_dir, unless one
  is set already: a variant's seeds compile the same programs, and on 2 CPU
  cores compiling the train and eval steps takes ~10 s of a 3-4 min run.

  It caches every program, however quick to compile (unless the environment
  says otherwise): initializing a model eagerly compiles a truncated-normal
  program per parameter shape, ~10 s for the small preset on 2 CPU cores,
  which a later run of the same model then reads (the throughput benchmark's
  second process: 21.5 s caching compiles over 0.5 s only, 14.8 s caching all).
  """
  return {'JAX_COMPILATION_CACHE_DIR': cache_dir,
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', **environ}


def cpu_slots(cpus: Collection[int], runs_at_once: int) -> list[set[int]]:
  """Splits the CPUs into runs_at_once disjoint, near-equal groups, one per
  concurrent run."""
  if not 1 <= runs_at_once <= len(cpus):
    raise ValueError(f'--runs_at_once={runs_at_once} must be in [1, {len(cpus)}] '
                     f'(the CPUs this process may use)')
  return [set(int(c) for c in group) for group in np.array_split(sorted(cpus), runs_at_once)]


def _spawn_pinned(command: list[str], env: dict[str, str],
                  cpus: set[int] | None) -> subprocess.Popen:
  """Starts command on `cpus` (None: wherever this process may run).

  A child inherits the CPU affinity of the thread that starts it (on Linux it
  is per thread), so this thread is pinned just for the start: a preexec_fn
  would fork a multithreaded process, which can deadlock.
  """
  if not cpus:
    return subprocess.Popen(command, env=env)
  previous = os.sched_getaffinity(0)
  os.sched_setaffinity(0, cpus)
  try:
    return subprocess.Popen(command, env=env)
  finally:
    os.sched_setaffinity(0, previous)


class SubprocessTrainer:
  """Trains each run with train.py in a child process (a TrainFn).

  A child per run bounds memory (jit caches and buffers die with it) and
  resumes exactly as train.py does; compiled programs are cached across runs
  (child_env). With runs_at_once > 1, each child is pinned to its own group of
  CPUs: small models use 2 cores poorly (many small ops). On 2 cores, two
  one-core runs of the segmentation UNet train 2 x 140 img/s against 222 img/s
  for one run on both (train step alone); in its sweep, with the input pipeline,
  2 x ~125 against ~215.
  """

  def __init__(self, config_spec: str, base_overrides: dict[str, Any], cache_dir: str,
               runs_at_once: int = 1):
    self._command = functools.partial(
        train_command, config_spec=config_spec, base_overrides=base_overrides,
        python=sys.executable, train_py=os.path.join(REPO, 'train.py'))
    self._env = child_env(dict(os.environ), cache_dir)
    self._slots = queue.SimpleQueue()
    slots = cpu_slots(os.sched_getaffinity(0), runs_at_once)
    for cpus in slots:
      self._slots.put(cpus if len(slots) > 1 else None)  # One run: no pinning.
    self._children: set[subprocess.Popen] = set()
    self._lock = threading.RLock()  # Also taken by the SIGTERM handler.
    self._stopping = False

  def __call__(self, run: Run, workdir: str) -> None:
    cpus = self._slots.get()  # Blocks until a slot is free.
    try:
      command = self._command(run, workdir=workdir)
      status = self._run_child(run.name, command, cpus)
    finally:
      self._slots.put(cpus)
    if status == trainer.EXIT_PREEMPTED:
      raise RuntimeError(f'run {run.name} was preempted (SIGTERM) after saving its checkpoint; '
                         're-run the sweep to resume it.')
    if status:
      raise RuntimeError(f'run {run.name} failed with exit status {status}: '
                         f'{shlex.join(command)}')

  def _run_child(self, name: str, command: list[str], cpus: set[int] | None) -> int:
    with self._lock:  # No start after SIGTERM, and no child missed by it.
      if self._stopping:
        raise RuntimeError(f'run {name} not started: the sweep received SIGTERM')
      logging.info('Run %s%s: %s', name, f' on CPUs {sorted(cpus)}' if cpus else '',
                   shlex.join(command))
      child = _spawn_pinned(command, self._env, cpus)
      self._children.add(child)
    try:
      return child.wait()
    finally:
      with self._lock:
        self._children.discard(child)

  @contextlib.contextmanager
  def forwarding_sigterm(self) -> Iterator[None]:
    """While active, SIGTERM goes to every running child (each checkpoints and
    exits) and no further run starts. Main thread only (Python's signals)."""

    def forward(signum, _):
      with self._lock:
        self._stopping = True
        for child in self._children:
          child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
      yield
    finally:
      signal.signal(signal.SIGTERM, previous)


def model_cost(model_config: ml_collections.ConfigDict) -> dict[str, float]:
  """Parameters and forward GFLOPs per image (hierarchical_vit.report)."""
  model = abstract_model(model_config, check_backend=False)
  cost = report.model_report(model, input_shape(model_config))
  return {'params': cost['params'], 'gflops': cost['gflops_per_image']}


def total_steps(config: ml_collections.ConfigDict) -> int:
  """Optimizer steps the run trains for (reads the data set's size if needed)."""
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  info = data.get_dataset_info(config.data, task=config.task)
  return trainer.compute_steps(config.train, info.num_train_examples)[1]


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The trainer's metrics.jsonl records; [] if none yet.

  A step can appear twice in files from before a resumed run dropped the
  records after its checkpoint (metrics.keep_records_up_to); the later record
  wins. A run killed mid-write leaves its last line unfinished: that line is
  skipped (a resumed run cuts it off).
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  merged: dict[tuple[int, bool], dict] = {}
  with open(path, encoding='utf-8') as f:
    lines = f.read().split('\n')
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line) if line else None
    except json.JSONDecodeError as error:
      if number < len(lines):  # Only the last line can be half written.
        raise ValueError(f'{path}, line {number}, is not a JSON record: {line[:80]!r}') from error
      logging.warning('%s: skipped the unfinished last line %r', path, line[:80])
      record = None
    if record is not None:
      merged[record['step'], any(k.startswith('eval/') for k in record)] = record
  return [merged[k] for k in sorted(merged)]


def eval_curve(records: Sequence[dict]) -> list[dict[str, float]]:
  """[{'step', 'epoch', 'eval/...': every eval metric}] of every evaluation, by
  step: all of them, since sweep.metric may change after the runs finished
  (it is not part of what a run trains, config_fingerprint).

  The trainer logs train scalars (with train/epoch) at every eval step.
  """
  epochs = {r['step']: r['train/epoch'] for r in records if 'train/epoch' in r}
  return [{'step': r['step'], 'epoch': epochs.get(r['step']),
           **{k: v for k, v in r.items() if k.startswith('eval/')}}
          for r in records if 'eval/loss' in r]


def finished_step(records: Sequence[dict]) -> int | None:
  """Step of the last evaluation (the trainer always evaluates its last step)."""
  steps = [r['step'] for r in records if 'eval/loss' in r]
  return steps[-1] if steps else None


def config_fingerprint(config: ml_collections.ConfigDict) -> str:
  """A hash of what a run trains: its config without the fields that only say
  where the data is read from and how the run executes
  (trainer.EXECUTION_FIELDS: a committed result stays valid on a machine with
  another data dir, mesh or logging interval), fields added since results were
  committed left out at their old behaviour and removed ones put back
  (training/config_history.py), so those results remain valid."""
  trained = config.to_dict()
  for path, old_behaviour in config_history.ADDED_FIELDS.items():
    holder = config_history.parent(trained, path)
    if holder is not None and holder.get(path[-1], old_behaviour) == old_behaviour:
      holder.pop(path[-1], None)
  for path, value in config_history.REMOVED_FIELDS.items():
    holder = trained
    for key in path[:-1]:
      holder = holder.setdefault(key, {})
    holder.setdefault(path[-1], value)
  flat = traverse_util.flatten_dict(trained, sep='.')
  what = {k: v for k, v in flat.items() if not k.startswith(trainer.EXECUTION_FIELDS)}
  text = json.dumps(what, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def summarize(sweep: str, run: Run, records: Sequence[dict], cost: dict[str, float],
              wall_time_s: float, resumed: bool) -> dict[str, Any]:
  """The result.json of a finished run."""
  evals = [r for r in records if 'eval/loss' in r]
  final = {k: v for k, v in evals[-1].items() if k.startswith('eval/')}
  # Median: robust to the intervals that include compilation or evaluation.
  speeds = [r['img_per_sec'] for r in records if 'img_per_sec' in r]
  return {
      'sweep': sweep, 'run': run.name, 'variant': run.variant, 'seed': run.seed,
      'overrides': run.overrides, 'config_fingerprint': config_fingerprint(run.config),
      'test_loss': final.get('eval/loss'), 'eval': final, 'steps': evals[-1]['step'],
      'params': cost['params'], 'gflops': cost['gflops'],
      'train_img_per_sec': float(np.median(speeds)) if speeds else None,
      # Of this invocation only: small when it merely collected a run that
      # trained elsewhere or resumed from a late checkpoint.
      'wall_time_s': wall_time_s, 'resumed': resumed,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'curve': eval_curve(records),
  }


class Sweep:
  """Where a sweep's runs and results live.

  Args:
    config: the sweep config (with its `sweep` section).
    workdir: runs train in workdir/runs/<run name>.
    results_dir: committed results go to results_dir/<sweep name>/; '' keeps
      them in workdir/results.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, results_dir: str = ''):
    self.runs = expand_sweep(config)  # First: it refuses a config without a sweep.
    self.name = config.sweep.name
    if not _NAME_PATTERN.match(self.name):
      raise ValueError(f'sweep.name={self.name!r} must match {_NAME_PATTERN.pattern}')
    self.config = config
    self.workdir = workdir
    self.output_dir = (os.path.join(results_dir, self.name) if results_dir
                       else os.path.join(workdir, 'results'))

  def run_dir(self, run: Run) -> str:
    return os.path.join(self.workdir, 'runs', run.name)

  def local_result(self, run: Run) -> str:
    return os.path.join(self.run_dir(run), 'result.json')

  def committed_result(self, run: Run) -> str:
    return os.path.join(self.output_dir, 'runs', f'{run.name}.json')

  def result_path(self, run: Run) -> str | None:
    """This run's result (local copy preferred), None if it has none; raises if
    the result was trained with another config (e.g. the sweep's epochs
    changed since) or carries no fingerprint to tell."""
    for path in (self.local_result(run), self.committed_result(run)):
      if not os.path.exists(path):
        continue
      with open(path, encoding='utf-8') as f:
        recorded = json.load(f).get('config_fingerprint')
      expected = config_fingerprint(run.config)
      if recorded is None:
        raise ValueError(
            f'{path}: the result of run {run.name} carries no config fingerprint, so it '
            'cannot be checked against this sweep; delete it (to use a committed copy, '
            f'or to retrain) or pass another --results_dir and --workdir.')
      if recorded != expected:
        raise ValueError(
            f'{path}: run {run.name} was trained with another config (fingerprint '
            f'{recorded}, now {expected}). Delete it and {self.run_dir(run)} to retrain, '
            'or pass another --results_dir and --workdir.')
      return path
    return None

  def is_finished(self, run: Run) -> bool:
    return self.result_path(run) is not None

  def results(self) -> list[dict[str, Any]]:
    """Every finished run's result, in sweep order; raises on a result of
    another config, so that one is never aggregated with this sweep's."""
    results = []
    for run in self.runs:
      path = self.result_path(run)
      if path is not None:
        with open(path, encoding='utf-8') as f:
          results.append(json.load(f))
    return results

  def train(self, run: Run, train_fn: TrainFn) -> tuple[list[dict], float, bool]:
    """Trains or resumes `run` to its last step unless its metrics show it
    finished already (e.g. launched from --print_commands elsewhere).

    Returns its metrics records, the seconds this took and whether it resumed.
    """
    run_dir = self.run_dir(run)
    expected = total_steps(run.config)
    records = read_metrics(run_dir)
    resumed = bool(records)
    if resumed:
      # Finished or not, records of another config must not become this
      # config's result (e.g. the sweep file edited after --print_commands).
      trainer.check_resumable(run.config, run_dir)
    start = time.perf_counter()
    if finished_step(records) != expected:
      logging.info('%s: training%s.', run.name, ' (resuming)' if resumed else '')
      train_fn(run, run_dir)
      records = read_metrics(run_dir)
    if finished_step(records) != expected:
      raise RuntimeError(
          f'run {run.name} stopped at step {finished_step(records)} of {expected} '
          '(preempted?); re-run the sweep to resume it from its checkpoint.')
    return records, time.perf_counter() - start, resumed

  def execute(self, runs: Sequence[Run], train_fn: TrainFn,
              cost_fn: CostFn = model_cost, runs_at_once: int = 1) -> None:
    """Trains every unfinished run, runs_at_once at a time, and records each
    result as it finishes. If a run fails, no further run starts; the error
    is raised once the running ones end."""
    todo = []
    for run in runs:
      if self.is_finished(run):
        logging.info('%s: finished, skipped.', run.name)
      else:
        todo.append(run)
    costs: dict[str, dict[str, float]] = {}  # Per model config: seeds share it.
    waiting = iter(todo)
    with futures.ThreadPoolExecutor(runs_at_once) as pool:
      running: dict[futures.Future, Run] = {}

      def start_next() -> None:
        run = next(waiting, None)
        if run is not None:
          running[pool.submit(self.train, run, train_fn)] = run

      for _ in range(runs_at_once):
        start_next()
      finished = 0
      failures: list[tuple[str, Exception]] = []
      while running:
        done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
        for future in done:
          run = running.pop(future)
          try:
            records, wall_time, resumed = future.result()
          except Exception as e:
            failures.append((run.name, e))  # No new starts; the running ones finish.
            continue
          key = run.config.model.to_json()
          if key not in costs:
            costs[key] = cost_fn(run.config.model)
          result = summarize(self.name, run, records, costs[key], wall_time, resumed)
          files.write_json(self.local_result(run), result)
          files.write_json(self.committed_result(run), result)
          finished += 1
          logging.info('Run %d/%d, %s: %s = %s.', finished, len(todo), run.name,
                       self.config.sweep.metric, result['eval'].get(self.config.sweep.metric))
          if not failures:
            start_next()
    _raise_failures(failures)


def check_runs(runs: Sequence[Run]) -> None:
  """Refuses a sweep whose variant cannot run (an override out of range, a
  model that cannot be built, a batch larger than the data) before any run
  trains, by trainer.check_run: its child would fail only when its turn came,
  after the runs before it. Missing data raises MissingDataError, which says
  how to prepare it.

  Device counts and the attention core's backend are left to each child: jax's
  backend is not started here, where it would hold the memory of a GPU that
  the children need.
  """
  for run in {r.variant: r for r in runs}.values():
    try:
      trainer.check_run(run.config, check_backend=False)
    except ValueError as error:
      raise ValueError(f'sweep variant {run.variant!r} ({run.overrides}): {error}') from None


def _raise_failures(failures: Sequence[tuple[str, Exception]]) -> None:
  """Re-raises a single failure as it was; several as one error naming each."""
  if len(failures) == 1:
    raise failures[0][1]
  if failures:
    raise RuntimeError(f'{len(failures)} runs failed: ' + '; '.join(
        f'{name}: {type(e).__name__}: {e}' for name, e in failures)) from failures[0][1]


def main(argv):
  del argv
  config_flag = flags.FLAGS['config']
  if config_flag.value is None:
    raise app.UsageError('--config is required.')
  config_spec = config_flags.get_config_filename(config_flag)
  base_overrides = config_flags.get_override_values(config_flag)
  sweep = Sweep(config_flag.value, _WORKDIR.value, _RESULTS_DIR.value)
  runs = [r for r in select_runs(sweep.runs, _ONLY.value) if not sweep.is_finished(r)]
  if _PRINT_COMMANDS.value:
    for run in runs:
      print(shlex.join(train_command(run, config_spec, sweep.run_dir(run), base_overrides)))
    return
  check_runs(runs)
  cache_dir = os.path.join(os.path.abspath(_WORKDIR.value), 'compilation_cache')
  train_fn = SubprocessTrainer(config_spec, base_overrides, cache_dir, _RUNS_AT_ONCE.value)
  with train_fn.forwarding_sigterm():
    sweep.execute(runs, train_fn, runs_at_once=_RUNS_AT_ONCE.value)
  written = aggregate.write_all(sweep.results(), sweep.config.sweep, sweep.output_dir)
  print('\n'.join(['Wrote:', *written]))


if __name__ == '__main__':
  # Defined here, not at import, so that the library functions above can be
  # imported next to other modules' flags.
  config_flags.DEFINE_config_file('config', None, 'Sweep config file.')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Runs train in WORKDIR/runs/<name>.',
                                 required=True)
  _RESULTS_DIR = flags.DEFINE_string(
      'results_dir', 'docs/results',
      'Committed results: RESULTS_DIR/<sweep>/runs/<name>.json and the aggregates; '
      "'' keeps them in WORKDIR/results.")
  _PRINT_COMMANDS = flags.DEFINE_bool(
      'print_commands', False, 'Print one train.py command per unfinished run; train nothing.')
  _ONLY = flags.DEFINE_list('only', [], 'Variant or run names to run (default: all).')
  _RUNS_AT_ONCE = flags.DEFINE_integer(
      'runs_at_once', 1, 'Runs trained at once, each pinned to its share of the CPUs.')
  app.run(main, flags_parser=cli.parse_flags)
