"""train.py across processes: 2 processes x 4 CPU devices vs 1 x 8, on 127.0.0.1.

One 2-process FSDP run and one 1-process data-parallel run of the same tiny
Swin (4 steps, checkpoints at 2 and 4) are shared by the tests. Every step's
batch is the whole 32-example train split and nothing is random per example
(no augmentation, no dropout / drop path), so both runs compute the same
function whatever order the processes' shards arrive in; only float reduction
order may differ.
"""

import contextlib
import glob
import importlib.util
import json
import os
import shutil
import sys

import jax
import ml_collections
import numpy as np
import pytest
from tests.conftest import REPO, free_port, prepare_slice, spawn, wait_all
from jax.sharding import PartitionSpec as P

from hierarchical_vit import parallel
from hierarchical_vit.training import checkpointing
from hierarchical_vit.training import optimizer as optimizer_lib
from hierarchical_vit.training import trainer

# One worker runs this module (pyproject: --dist loadgroup): its `runs` fixture
# is three train.py processes, which each worker would otherwise start again.
pytestmark = pytest.mark.xdist_group('multihost')

sys.path.insert(0, REPO)  # configs/ is not an installed package.
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_EXAMPLES = 32  # = batch size: every step sees the whole split.
NUM_STEPS = 4
OVERRIDES = {
    'model.embed_dim': 16, 'model.depths': (1, 1), 'model.num_heads': (1, 2),
    'model.img_size': 32, 'model.patch_size': 4, 'model.window_size': 4,
    'model.in_chans': 1, 'model.gelu_approximate': True,
    'model.drop_path_rate': 0.0,
    'data.hflip': False, 'data.crop_padding': 0,
    'train.batch_size': NUM_EXAMPLES, 'train.num_steps': NUM_STEPS,
    'train.warmup_epochs': 0.0, 'train.log_every_steps': 1,
    'train.eval_every_steps': NUM_STEPS, 'train.checkpoint_every_steps': 2,
    'train.eval_batch_size': NUM_EXAMPLES,
}
FSDP = {'mesh.strategy': 'fsdp', 'mesh.fsdp_min_size': 0}  # Shard all it can.


def _config(data_dir: str, overrides: dict) -> ml_collections.ConfigDict:
  config = base.get_config()
  config.data.data_dir = data_dir
  for name, value in overrides.items():
    section, field = name.split('.')
    config[section][field] = value
  return config


def _train_cmd(workdir: str, data_dir: str, overrides: dict) -> list[str]:
  flags = [f'--config.{k}={v}' for k, v in {**OVERRIDES, **overrides}.items()]
  return [sys.executable, 'train.py', '--config=configs/base.py',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *flags]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  return prepare_slice(tmp_path_factory, 'fashion_mnist', NUM_EXAMPLES)


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory) -> dict:
  """Workdirs of the 2-process FSDP run and the 1-process data-parallel run,
  all three processes running at once."""
  root = tmp_path_factory.mktemp('multihost')
  workdirs = {'two': str(root / 'two'), 'one': str(root / 'one')}
  coordinator = f'--coordinator_address=127.0.0.1:{free_port()}'
  commands = [
      (_train_cmd(workdirs['two'], data_dir, FSDP) +
       [coordinator, '--num_processes=2', f'--process_id={i}'], 4)
      for i in range(2)]
  commands.append((_train_cmd(workdirs['one'], data_dir, {}), 8))
  logs = [str(root / f'log{i}.txt') for i in range(len(commands))]
  with contextlib.ExitStack() as stack:
    procs = [stack.enter_context(spawn(cmd, devices, log))
             for (cmd, devices), log in zip(commands, logs)]
    wait_all(procs, logs)
  workdirs['logs'] = logs
  return workdirs


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _losses(workdir: str) -> dict[int, float]:
  return {m['step']: m['train/loss'] for m in _metrics(workdir)
          if 'train/loss' in m}


def _restore_state(workdir: str, config: ml_collections.ConfigDict) -> dict:
  """Restores the last train state into this process's mesh and strategy."""
  mesh = parallel.create_mesh(config.mesh)
  _, _, params, _ = trainer.init_model(config)
  tx = optimizer_lib.create_optimizer(
      config.train, optimizer_lib.create_learning_rate_schedule(
          config.train, 1, NUM_STEPS))
  state = trainer.create_train_state(config, params, tx)
  state = parallel.put_global(
      state, parallel.state_shardings(mesh, state, config.mesh))
  manager = checkpointing.create_checkpoint_manager(workdir, 3, read_only=True)
  return checkpointing.restore(manager, NUM_STEPS, state)


def test_two_processes_match_one(runs):
  """Same losses step by step (final parameters: next test)."""
  two, one = _losses(runs['two']), _losses(runs['one'])
  assert sorted(two) == sorted(one) == list(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose([two[s] for s in sorted(two)],
                             [one[s] for s in sorted(one)], rtol=1e-5)
  assert two[NUM_STEPS] < two[1]  # It trained.
  out = open(runs['logs'][0]).read()
  assert 'Process 0 of 2; 4 local / 8 global devices.' in out, out[-3000:]
  assert "Mesh('data': 1, 'fsdp': 8" in out
  # FSDP splits the state 8 ways; data parallel keeps all of it on each device.
  per_device = lambda log: float(
      open(log).read().split('Train state per device: ')[1].split(' MiB')[0])
  assert per_device(runs['logs'][2]) > 4 * per_device(runs['logs'][0])


def test_only_process_zero_writes_logs(runs):
  steps = [m['step'] for m in _metrics(runs['two']) if 'train/loss' in m]
  assert steps == list(range(1, NUM_STEPS + 1))  # Once each: not per process.
  assert len(os.listdir(os.path.join(runs['two'], 'tensorboard'))) == 1
  # The data iterator position is per process: one file each, own shard.
  data = os.path.join(runs['two'], 'checkpoints', str(NUM_STEPS), 'data')
  for i in range(2):
    with open(os.path.join(data, f'process_{i}-of-2.json')) as f:
      assert f'shard_index={i}, shard_count=2' in json.load(f)['sampler']


def test_fsdp_checkpoint_restores_in_one_process_data_parallel(runs, data_dir):
  """The 2-process FSDP checkpoint (arrays split across both processes) loads
  replicated into one process and holds what the 2-process run trained."""
  config = _config(data_dir, OVERRIDES)  # Data parallel.
  state = _restore_state(runs['two'], config)
  assert int(state['step']) == NUM_STEPS
  assert all(x.sharding.spec == P() and x.is_fully_replicated
             for x in jax.tree.leaves(state))
  # The norm the 2-process run logged from its sharded, in-memory params.
  logged = next(m['train/param_norm'] for m in _metrics(runs['two'])
                if m['step'] == NUM_STEPS and 'train/param_norm' in m)
  norm = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                     for x in jax.tree.leaves(state['params'])))
  np.testing.assert_allclose(norm, logged, rtol=1e-6)
  # Params and Adam moments equal the 1-process run's (up to float
  # reduction order).
  # Measured: params differ by <= 2.3e-6, Adam moments by <= 2.5e-8.
  reference = _restore_state(runs['one'], config)
  for key, atol in ('params', 2e-5), ('opt_state', 1e-6):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol),
                 state[key], reference[key])


def test_a_two_process_checkpoint_resumes_in_one_process(runs, data_dir, tmp_path):
  """The 2-process FSDP run, cut back to its step-2 checkpoint, resumes in one
  process on one device, data parallel: the weights reshard and the data
  iterator, whose saved positions are per process, continues at the same point
  of the epoch. Every step reads the whole split, so steps 3 and 4 repeat the
  2-process losses."""
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(runs['two'], workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(NUM_STEPS)))
  log = str(tmp_path / 'log.txt')
  with spawn(_train_cmd(workdir, data_dir, {}), 1, log) as proc:
    wait_all([proc], [log])
  out = open(log).read()
  assert 'Resuming from checkpoint at step 2.' in out
  assert 'was written by 2 processes, this run has 1' in out
  resumed, original = _losses(workdir), _losses(runs['two'])
  np.testing.assert_allclose([resumed[s] for s in (3, 4)], [original[s] for s in (3, 4)],
                             rtol=1e-5)


def test_eval_py_across_two_processes_reports_what_training_logged(runs, tmp_path):
  """eval.py on 2 processes x 4 devices: each process reads its half of the
  eval split, and the metrics of the whole split equal those the 2-process run
  logged when it evaluated the same final weights; process 0 alone prints.
  A global eval batch of 24 gives each process 12 rows a step over its 16
  examples: its second batch is 4 examples and 8 rows of padding."""
  coordinator = f'--coordinator_address=127.0.0.1:{free_port()}'
  logs = [str(tmp_path / f'log{i}.txt') for i in range(2)]
  with contextlib.ExitStack() as stack:
    procs = [stack.enter_context(spawn(
        [sys.executable, 'eval.py', f'--workdir={runs["two"]}',
         f'--config=configs/saved.py:{runs["two"]}', '--config.train.eval_batch_size=24',
         coordinator, '--num_processes=2', f'--process_id={i}'], 4, logs[i]))
             for i in range(2)]
    wait_all(procs, logs)
  out1 = open(logs[1]).read()
  assert 'Process 1 of 2; 4 local / 8 global devices.' in out1
  assert 'test accuracy' in open(logs[0]).read() and 'test accuracy' not in out1
  with open(os.path.join(runs['two'], f'eval_test_{NUM_STEPS}.json')) as f:
    report = json.load(f)
  logged = next(m for m in _metrics(runs['two']) if m['step'] == NUM_STEPS and 'eval/loss' in m)
  assert report['num_examples'] == logged['eval/num_examples'] == NUM_EXAMPLES
  assert report['accuracy'] == pytest.approx(logged['eval/accuracy'])
  assert report['loss'] == pytest.approx(logged['eval/loss'], rel=1e-5)
  assert np.sum(report['confusion_matrix']) == NUM_EXAMPLES


def test_distributed_args(monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
               'JAX_PROCESS_ID', 'SLURM_STEP_NUM_TASKS'):
    monkeypatch.delenv(name, raising=False)
  assert parallel.distributed_args('h:1', 2, 1) == {
      'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 1}
  assert parallel.distributed_args('auto') == {}  # JAX detects the cluster.
  with pytest.raises(ValueError, match='process_id'):
    parallel.distributed_args('h:1', 2)
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'h:2')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  assert parallel.distributed_args() == {
      'coordinator_address': 'h:2', 'num_processes': 4, 'process_id': 3}
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS')
  with pytest.raises(ValueError, match=r'num_processes=4 and process_id=3 need a coordinator'):
    parallel.distributed_args()  # Each process would train alone into one workdir.
  monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '8')  # Inside `srun -n 8`.
  # JAX detects what is left unset; explicit values pass through.
  assert parallel.distributed_args() == {'num_processes': 4, 'process_id': 3}
  assert parallel.distributed_args('auto', 2) == {'num_processes': 2, 'process_id': 3}
  monkeypatch.delenv('JAX_NUM_PROCESSES')
  monkeypatch.delenv('JAX_PROCESS_ID')
  assert parallel.distributed_args() == {}
  monkeypatch.setenv('JAX_NUM_PROCESSES', '')
  assert parallel.distributed_args() == {}  # Set but empty: unset.
  monkeypatch.setenv('JAX_NUM_PROCESSES', 'two')
  with pytest.raises(ValueError, match=r"\$JAX_NUM_PROCESSES='two' is not an integer"):
    parallel.distributed_args()


@pytest.mark.parametrize('devices, expected', [([], None), (['/dev/accel0'], {}),
                                               (['/dev/vfio/0'], {})])
def test_libtpu_alone_is_not_a_tpu_vm(monkeypatch, devices, expected):
  """jax[tpu] installed on a CPU or GPU host: one process, not JAX's cluster
  auto-detection (which would fail without TPU chips)."""
  for name in ('JAX_COORDINATOR_ADDRESS', 'SLURM_STEP_NUM_TASKS'):
    monkeypatch.delenv(name, raising=False)
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: object() if name == 'libtpu' else find_spec(name, *a))
  monkeypatch.setattr(glob, 'glob', lambda pattern: [d for d in devices
                                                     if d.startswith(pattern.rstrip('*[0-9]'))])
  assert parallel.distributed_args() == expected


def test_state_shardings_strategy():
  """Dispatch and validation; the fsdp split itself needs > 1 device (above)."""
  config = ml_collections.ConfigDict({'strategy': 'data_parallel', 'axes':
                                      ('data', 'fsdp'), 'shape': (),
                                      'fsdp_min_size': 0})
  mesh = parallel.create_mesh(config)
  state = {'kernel': np.zeros((8, 16)), 'bias': np.zeros(16)}
  assert all(s.spec == P() for s in jax.tree.leaves(
      parallel.state_shardings(mesh, state, config)))
  config.strategy = 'zero'
  with pytest.raises(ValueError, match='data_parallel, fsdp'):
    parallel.state_shardings(mesh, state, config)


# Each of 2 processes (4 CPU devices each) builds the hybrid FSDP mesh with
# processes as the DCN granules, shards a weight over 'fsdp' and its quarter of
# the batch, and prints the mesh and a replicated product as JSON.
_HYBRID_MESH = """
import json, sys
import jax, ml_collections, numpy as np
from hierarchical_vit import parallel
parallel.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
config = ml_collections.ConfigDict({'axes': parallel.AXES, 'strategy': 'fsdp', 'shape': (),
                                    'dcn_shape': (2, 1), 'fsdp_min_size': 0})
mesh = parallel.create_mesh(config)
w = np.arange(16 * 8, dtype=np.float32).reshape(16, 8) / 100
params = parallel.put_global({'w': w}, parallel.state_shardings(mesh, {'w': w}, config))
x = np.arange(8 * 16, dtype=np.float32).reshape(8, 16) / 100
i = jax.process_index()
batch = parallel.shard_batch({'x': x[4 * i:4 * i + 4]}, parallel.batch_sharding(mesh))
y = jax.jit(lambda p, b: b['x'] @ p['w'], out_shardings=parallel.replicated(mesh))(params, batch)
open(sys.argv[3], 'w').write(json.dumps({'process_zero_value': parallel.process_zero_value(10 + i),
                  'shape': dict(mesh.shape),
                  'processes': [[d.process_index for d in row] for row in mesh.devices],
                  'w_spec': str(params['w'].sharding.spec), 'y': np.asarray(y).tolist()}))
"""


def test_hybrid_mesh_across_two_processes(tmp_path):
  """mesh.dcn_shape=(2, 1) on 2 processes (as on 2 GPU nodes): each process's
  devices are one row, so FSDP's gathers stay inside a process, and a sharded
  product over the process-local batches is exact. Also: process_zero_value
  gives both processes process 0's value (restore_trained's step)."""
  coordinator = f'127.0.0.1:{free_port()}'
  logs = [str(tmp_path / f'log{i}.txt') for i in range(2)]
  with contextlib.ExitStack() as stack:
    procs = [stack.enter_context(spawn(
        [sys.executable, '-c', _HYBRID_MESH, coordinator, str(i), str(tmp_path / f'out{i}.json')],
        4, logs[i]))
             for i in range(2)]
    wait_all(procs, logs)
  x = np.arange(8 * 16, dtype=np.float32).reshape(8, 16) / 100
  w = np.arange(16 * 8, dtype=np.float32).reshape(16, 8) / 100
  for i in range(2):
    # A file, not the log: Gloo's C++ lines interleave with printed output.
    out = json.loads((tmp_path / f'out{i}.json').read_text())
    assert out['process_zero_value'] == 10  # Process 1 passed 11.
    assert out['shape'] == {'data': 2, 'fsdp': 4}
    assert out['processes'] == [[0] * 4, [1] * 4]
    assert out['w_spec'] == str(P('fsdp', None))
    np.testing.assert_allclose(out['y'], x @ w, rtol=1e-6)
