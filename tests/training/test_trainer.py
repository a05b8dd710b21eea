"""The training loop on a tiny Swin and a 256-example Fashion-MNIST slice."""

import functools
import glob
import importlib
import itertools
import json
import os
import re
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import cifar
from configs import segmentation
from tests.conftest import import_optional, xla_flags
from tests.training.conftest import (finish, read_metrics, run_script, tiny_config,
                                     write_config_file)
from hierarchical_vit import data
from hierarchical_vit import convert
from hierarchical_vit import parallel
from hierarchical_vit.training import checkpointing
from hierarchical_vit.training import config_history
from hierarchical_vit.training import optimizer as optimizer_lib
from hierarchical_vit.layers.common import Mlp
from hierarchical_vit.training import trainer


def _train_losses(workdir: str) -> dict[int, float]:
  return {m['step']: m['train/loss'] for m in read_metrics(workdir)
          if 'train/loss' in m}


def _restore_params(workdir: str, config, step: int):
  _, _, params, _ = trainer.init_model(config)
  manager = checkpointing.create_checkpoint_manager(workdir, 3, read_only=True)
  return checkpointing.restore_weights(
      manager, step, jax.device_put({'params': params}))['params']


def test_train_step_decreases_loss(data_dir):
  config = tiny_config(data_dir, grad_clip_norm=1.0)
  config.model.drop_path_rate = 0.0
  graphdef, _, params, rest = trainer.init_model(config)
  schedule = optax.constant_schedule(3e-3)
  tx = optax.adamw(schedule)
  state = trainer.create_train_state(config, params, tx)
  step = jax.jit(trainer.make_train_step(graphdef, tx, schedule, config),
                 donate_argnums=0)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(16, 32, 32, 1)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
  losses = []
  for _ in range(10):
    state, metrics = step(state, batch, rest)
    losses.append(float(metrics['train/loss']))
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < 0.8 * losses[0], losses
  assert int(state['step']) == 10


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """A finished 6-step run (checkpoints at 3 and 6, eval at 6); its eval
  batches of 48 end in a padded one (256 = 5 x 48 + 16)."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  config = tiny_config(data_dir, eval_batch_size=48)
  final = trainer.train_and_evaluate(config, workdir)
  return config, workdir, final


def test_train_and_evaluate_outputs(trained):
  config, workdir, final = trained
  assert final['step'] == 6
  assert 0.0 <= final['eval/accuracy'] <= 1.0
  assert final['eval/num_examples'] == 256  # Padding masked out.
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                 if s.isdigit())
  assert steps == [3, 6]
  assert [m['step'] for m in read_metrics(workdir) if 'train/loss' in m] == list(
      range(1, 7))
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert json.load(open(os.path.join(workdir, 'config.json')))['seed'] == 0


def test_resume_after_kill_mid_save_is_exact(trained, tmp_path):
  """Kill while saving step 6 -> restart resumes at 3 and reproduces step 6."""
  config, workdir, _ = trained
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  # What orbax leaves when killed before its final rename: a tmp directory.
  checkpoints = os.path.join(resumed, 'checkpoints')
  os.rename(os.path.join(checkpoints, '6'),
            os.path.join(checkpoints, '6.orbax-checkpoint-tmp'))
  os.remove(os.path.join(checkpoints, '6.orbax-checkpoint-tmp',
                         'commit_success.txt'))

  trainer.train_and_evaluate(config, resumed)

  # Same batches (data order) and dropout: identical losses and params; the
  # records of steps 4-6 from before the kill were replaced, not repeated.
  straight, again = _train_losses(workdir), _train_losses(resumed)
  steps = [m['step'] for m in read_metrics(resumed) if 'train/loss' in m]
  assert steps == [1, 2, 3, 4, 5, 6]
  for step in again:
    assert again[step] == straight[step], step
  jax.tree.map(np.testing.assert_array_equal,
               _restore_params(workdir, config, 6),
               _restore_params(resumed, config, 6))
  data_state = lambda d: open(os.path.join(
      d, 'checkpoints', '6', 'data', 'process_0-of-1.json')).read()
  assert data_state(workdir) == data_state(resumed)


def test_non_finite_loss_stops_without_saving(trained, tmp_path):
  config, workdir, _ = trained
  resumed = str(tmp_path / 'nan')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '6'))
  # Step 4 overflows the params under a 1e38 learning rate (a NaN one is refused
  # by check_config), which a resume must not change.
  os.remove(os.path.join(resumed, 'config.json'))
  config = tiny_config(config.data.data_dir, learning_rate=1e38)
  with pytest.raises(FloatingPointError,
                     match=r'Non-finite .* step 4.*checkpoint \(step 3\)'):
    trainer.train_and_evaluate(config, resumed)
  assert sorted(os.listdir(os.path.join(resumed, 'checkpoints'))) == ['3']


def test_eval_script_writes_json_and_png(trained):
  _, workdir, final = trained
  proc = run_script(['eval.py', f'--workdir={workdir}'])
  out = finish(proc, 120)
  assert proc.returncode == 0, out
  report = json.load(open(os.path.join(workdir, 'eval_test_6.json')))
  assert report['num_examples'] == 256
  np.testing.assert_allclose(report['accuracy'], final['eval/accuracy'])
  assert len(report['per_class_accuracy']) == 10
  assert os.path.getsize(os.path.join(workdir, 'confusion_test_6.png')) > 0
  assert 'test accuracy (step 6)' in out


def test_a_run_saved_before_config_changes_still_loads(trained, tmp_path):
  """A workdir from before model.attention existed and data.shuffle_buffer was
  removed loads as today's config and restores the same weights."""
  config, workdir, _ = trained
  old = str(tmp_path / 'old')
  shutil.copytree(workdir, old)
  with open(os.path.join(old, 'config.json')) as f:
    saved = json.load(f)
  del saved['model']['attention']
  saved['data']['shuffle_buffer'] = 0
  with open(os.path.join(old, 'config.json'), 'w') as f:
    json.dump(saved, f)

  loaded = trainer.load_config(old)
  assert loaded.to_dict() == trainer.load_config(workdir).to_dict()
  assert loaded.model.attention == 'einsum' and 'shuffle_buffer' not in loaded.data
  got, want = trainer.restore_trained(loaded, old), trainer.restore_trained(config, workdir)
  assert got.step == want.step == 6
  jax.tree.map(np.testing.assert_array_equal, got.params, want.params)
  assert trainer.restore_trained(config, workdir, step=3).step == 3
  assert trainer.restore_trained(config, workdir, step='best').step == 6  # Only 6 has eval.
  with pytest.raises(ValueError, match=r"step='last' is not valid"):
    trainer.restore_trained(config, workdir, step='last')
  with pytest.raises(ValueError, match=r'step=4 has no checkpoint in .*; saved steps: \[3, 6\]'):
    trainer.restore_trained(config, workdir, step=4)
  for step in (-7, -2):  # Only -1 means the latest; -2 is not 'none found' either.
    with pytest.raises(ValueError, match=rf"step={step} is not valid: a saved step, -1"):
      trainer.restore_trained(config, workdir, step=step)
  no_ema = config.copy_and_resolve_references()
  no_ema.train.ema_decay = 0.999  # This run kept no EMA weights.
  with pytest.raises(ValueError, match=r'holds a run of another model or weights '
                                       r'\(train.ema_decay: 0.0 -> 0.999\)'):
    trainer.restore_trained(no_ema, workdir)
  # Same parameter shapes, another model: a restore alone would not notice.
  other = config.copy_and_resolve_references()
  other.model.downsample = 'avg_pool'
  with pytest.raises(ValueError, match=r"model.downsample: 'patch_merge' -> 'avg_pool'\): "
                                       r'evaluate it with its own config'):
    trainer.restore_trained(other, workdir)
  bf16 = config.copy_and_resolve_references()
  bf16.model.update(dtype='bfloat16', drop_path_rate=0.0)  # How, not what: allowed.
  assert trainer.restore_trained(bf16, workdir).step == 6


def test_a_step_missing_from_a_stale_checkpoint_listing_is_looked_up_again(trained, monkeypatch):
  """On several processes each lists the checkpoints itself, and one may have
  listed before process 0's step was saved: it reads the listing again rather
  than refusing a step the others restore (and leaving them waiting)."""
  config, workdir, _ = trained
  create = checkpointing.create_checkpoint_manager

  class ListedBeforeStep6:
    def __init__(self, manager):
      self.manager, self.reloaded = manager, False

    def __getattr__(self, name):
      return getattr(self.manager, name)

    def all_steps(self):
      return self.manager.all_steps() if self.reloaded else [3]

    def reload(self):
      self.reloaded = True
      self.manager.reload()

  monkeypatch.setattr(checkpointing, 'create_checkpoint_manager',
                      lambda *args, **kwargs: ListedBeforeStep6(create(*args, **kwargs)))
  assert trainer.restore_trained(config, workdir, step=6).step == 6


def test_a_run_exports_to_timm_as_the_weights_eval_uses(trained, tmp_path):
  """convert --workdir: timm loads the export strictly and computes our model's
  logits (with timm's exact GELU on both sides; the run trained with tanh)."""
  timm, torch = import_optional('timm'), import_optional('torch')
  safetensors_torch = import_optional('safetensors.torch')
  config, workdir, _ = trained
  path = str(tmp_path / 'run.safetensors')
  convert.export_run(workdir, path, step='best')
  reference = timm.create_model(
      'swin_tiny_patch4_window7_224', pretrained=False, img_size=32, patch_size=4,
      window_size=4, in_chans=1, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=10)
  reference.load_state_dict(safetensors_torch.load_file(path), strict=True)
  reference.eval()
  model = trainer.restore_trained(config, workdir).model()
  for _, module in nnx.iter_graph(model):
    if isinstance(module, Mlp):
      module.gelu_approximate = False
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(model(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-4)


def test_only_the_params_go_through_the_host(monkeypatch):
  """shard_train_state creates the Adam moments and the EMA on their shards
  (FSDP never holds them whole): the host hands over the params alone, and the
  state is create_train_state's. The FSDP split itself: tests/test_multihost.py."""
  config = tiny_config('', ema_decay=0.9)
  _, _, params, _ = trainer.init_model(config)
  tx = optimizer_lib.create_optimizer(config.train, lambda step: 1e-3)
  handed_over = []
  put_global = parallel.put_global
  monkeypatch.setattr(parallel, 'put_global', lambda tree, shardings: (
      handed_over.append(tree) or put_global(tree, shardings)))
  state = trainer.shard_train_state(config, params, tx, parallel.create_mesh(config.mesh))
  assert handed_over == [params]
  assert set(state) == {'step', 'params', 'opt_state', 'rng', 'ema_params'}
  jax.tree.map(np.testing.assert_array_equal, state,
               trainer.create_train_state(config, params, tx))


def test_config_history_fills_only_what_is_missing():
  saved = {'model': {'attention': 'cudnn', 'remat': 'block', 'name': 'classifier'},
           'data': {'name': 'x', 'randaugment_prob': 0.5, 'randaugment_magnitude_std': 0.5}}
  assert config_history.upgrade(saved) == saved
  old = {'model': {'name': 'classifier'}, 'data': {'name': 'x', 'shuffle_buffer': 0}}
  upgraded = config_history.upgrade(old)
  assert upgraded == {'model': {'name': 'classifier', 'attention': 'einsum', 'remat': 'none'},
                      'data': {'name': 'x', 'randaugment_prob': 1.0,
                               'randaugment_magnitude_std': 0.0}}
  assert old['data'] == {'name': 'x', 'shuffle_buffer': 0}  # The input is left as it was.


def test_config_history_fills_nested_fields_without_sharing_them():
  old = {'model': {'downsample_options': {'conv': {'kernel_size': 3}}}}
  upgraded = config_history.upgrade(old)
  options = upgraded['model']['downsample_options']
  assert options['conv'] == {'kernel_size': 3} and options['blur_pool'] == {'filter_size': 3}
  assert old == {'model': {'downsample_options': {'conv': {'kernel_size': 3}}}}
  options['blur_pool']['filter_size'] = 5  # A copy, not the table's own dict.
  assert config_history.ADDED_FIELDS[('model', 'downsample_options', 'blur_pool')] == {
      'filter_size': 3}
  # A saved value is kept; a config without the holding dict is left alone.
  saved = {'model': {'downsample_options': {'blur_pool': {'filter_size': 5}}}}
  assert config_history.upgrade(saved)['model']['downsample_options']['blur_pool'] == {
      'filter_size': 5}
  assert config_history.upgrade({'seed': 0}) == {'seed': 0}


def test_sigterm_saves_and_exits_as_unfinished(data_dir, tmp_path):
  workdir = str(tmp_path / 'preempted')
  config_file = write_config_file(tmp_path, data_dir, num_steps=10_000,
                                  checkpoint_every_steps=10_000)
  proc = run_script(['train.py', f'--config={config_file}',
                     f'--workdir={workdir}'])
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 120
  while not (os.path.exists(metrics) and os.path.getsize(metrics)):
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()  # Reading a live child's output would wait for its 10,000 steps.
      pytest.fail(f'no metrics within 120 s:\n{proc.communicate()[0][-3000:]}')
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = finish(proc, 120)
  assert proc.returncode == trainer.EXIT_PREEMPTED == 75, out  # Not 0: a retry must resume it.
  assert 'Preempted' in out and 'Final metrics' not in out
  # Epoch-end evals also save; the preemption save is the latest.
  latest = max(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))
  assert latest < 10_000 and f'Preempted: saved step {latest},' in out


def test_preemption_is_polled_across_processes_every_few_steps(monkeypatch):
  """Each cross-process poll waits for the step in flight: only every
  poll_every_steps steps, and every process gets the same answer."""
  gathers = []
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(parallel.multihost_utils, 'process_allgather',
                      lambda x: gathers.append(x) or np.stack([x, np.array(False)]))
  flag = trainer._PreemptionFlag()
  try:
    every = flag.poll_every_steps
    assert not any(flag.is_set(step) for step in range(1, 2 * every + 1))
    assert len(gathers) == 2
    flag._handle(signal.SIGTERM, None)
    assert not flag.is_set(2 * every + 1) and flag.is_set(3 * every)
  finally:
    flag.restore()


def test_one_vs_eight_devices_agree(data_dir, trained, tmp_path):
  """Same global batch on 8 fake CPU devices: same loss trajectory."""
  _, workdir, _ = trained
  workdir8 = str(tmp_path / 'eight')
  config_file = write_config_file(tmp_path, data_dir)
  proc = run_script(
      ['train.py', f'--config={config_file}', f'--workdir={workdir8}'],
      env={'XLA_FLAGS': xla_flags('--xla_force_host_platform_device_count=8')})
  out = finish(proc, 180)
  assert proc.returncode == 0, out
  assert 'devices=8' in out or "'data': 8" in out, out[-3000:]
  one, eight = _train_losses(workdir), _train_losses(workdir8)
  assert sorted(one) == sorted(eight)
  np.testing.assert_allclose([eight[s] for s in sorted(eight)],
                             [one[s] for s in sorted(one)], rtol=2e-4)


# (classes, channels) of each data set a shipped config trains on, from tfds.
_DATA = {'cifar10': (10, 3), 'cifar100': (100, 3), 'fashion_mnist': (10, 1),
         'imagenet2012': (1000, 3), 'fashion_mnist_canvas': (11, 1), 'oxford_iiit_pet': (2, 3)}


def _info(config) -> data.DatasetInfo:
  classes, channels = _DATA[config.data.name]
  size = config.data.image_size
  return data.DatasetInfo(name=config.data.name, num_classes=classes, num_train_examples=100,
                          num_eval_examples=10, image_shape=(size, size, channels),
                          class_names=tuple(map(str, range(classes))))


@pytest.mark.parametrize('name, arg', [
    ('base', None), ('quickstart', None), ('fashion_mnist', None), ('cifar', 'cifar10,cifar_small'),
    ('cifar', 'cifar100,cifar_swin_t'), ('swin_imagenet', 'swin_t'),
    ('swin_finetune_cifar10', None), ('segmentation', None), ('segmentation_pets', None)])
def test_shipped_configs_match_their_data(name, arg):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config(arg) if arg else module.get_config()
  if name == 'swin_finetune_cifar10':
    # Without pretrained weights it would train Swin-T from scratch.
    with pytest.raises(ValueError, match=r'train.init_from is not set, and this config '
                                         r'fine-tunes pretrained weights: pass '
                                         r'--config.train.init_from=PATH'):
      trainer.check_config(config, _info(config))
    config.train.init_from = 'swin_t.npz'
  trainer.check_config(config, _info(config))


@pytest.mark.parametrize('field, value, message', [
    ('model.num_classes', 100, r"model.num_classes=100 does not match data 'cifar10'.*"
                               r"model.num_classes=10"),
    ('model.in_chans', 1, r'model.in_chans=1 does not match.*model.in_chans=3'),
    ('model.img_size', 64, r'model.img_size=\(64, 64\) does not match.*'
                           r'data.image_size=32.*model.img_size=\(32, 32\)'),
    ('train.grad_accum_steps', 3, r'train.batch_size=128 must be divisible by '
                                  r'train.grad_accum_steps \(3\)'),
    ('train.eval_batch_size', 255, r'train.eval_batch_size=255 must be divisible by the '
                                   r'device and process counts \(2\)'),
    ('train.log_every_steps', 0, r'train.log_every_steps=0 must be >= 1'),
    ('train.checkpoint_every_steps', 0, r'train.checkpoint_every_steps=0 must be >= 1'),
    ('train.grad_accum_steps', 0, r'train.grad_accum_steps=0 must be >= 1'),
    ('train.eval_every_steps', -1, r'train.eval_every_steps=-1 must be >= 0'),
    ('train.batch_size', 0, r'train.batch_size=0 must be >= 1'),
    ('train.eval_batch_size', 0, r'train.eval_batch_size=0 must be >= 1'),
    ('train.keep_checkpoints', 0, r'train.keep_checkpoints=0 must be >= 1'),
    ('train.num_steps', -5, r'train.num_steps=-5 must be >= 0'),
    ('train.num_epochs', 0.0, r'train.num_epochs=0.0 must be > 0 \(or train.num_steps > 0\)'),
    ('train.warmup_epochs', -1.0, r'train.warmup_epochs=-1.0 must be finite and >= 0'),
    ('train.label_smoothing', 1.0, r'train.label_smoothing=1.0 must be in \[0, 1\)'),
    ('train.ema_decay', 1.5, r'train.ema_decay=1.5 must be in \[0, 1\) \(0 = off\)'),
    ('data.mix_prob', -0.5, r'data.mix_prob=-0.5 must be in \[0, 1\]'),
    ('data.num_workers', -1, r'data.num_workers=-1 must be >= 0'),
    ('data.random_erasing', 1.5, r'data.random_erasing=1.5 must be in \[0, 1\]'),
    ('train.grad_clip_norm', -1.0, r'train.grad_clip_norm=-1.0 must be >= 0 \(0 = off\)'),
    ('train.learning_rate', -1e-3, r'train.learning_rate=-0.001 must be >= 0'),
    ('train.learning_rate', float('nan'), r'train.learning_rate=nan must be >= 0'),
    ('train.min_learning_rate', 0.01, r'train.min_learning_rate=0.01 must be <= '
                                      r'train.learning_rate=0.001: the cosine schedule would rise'),
    ('train.weight_decay', -0.1, r'train.weight_decay=-0.1 must be >= 0'),
    ('train.b2', 1.0, r'train.b2=1.0 must be in \[0, 1\)'),
    ('mesh.fsdp_min_size', -1, r'mesh.fsdp_min_size=-1 must be >= 0'),
    ('train.init_bias_table_resize', 'cubic',
     r"train.init_bias_table_resize='cubic' must be one of \['bicubic', 'geometric'\]"),
    ('seed', -1, r'seed=-1 must be in \[0, 2\*\*32\)'),
    ('train.num_epochs', float('nan'), r'train.num_epochs=nan must be finite'),
    ('train.warmup_epochs', float('inf'), r'train.warmup_epochs=inf must be finite and >= 0'),
    ('data.mixup_alpha', -0.8, r'data.mixup_alpha=-0.8 must be >= 0 \(0 = off\)'),
    ('data.cutmix_alpha', -1.0, r'data.cutmix_alpha=-1.0 must be >= 0 \(0 = off\)'),
    ('data.std', (0.2, 0.0, 0.2), r"data.std=\(0.2, 0.0, 0.2\) must be in \(0, 1\] in every "
                                  r"channel, on the \[0, 1\] pixel scale"),
    ('data.std', (58.395, 57.12, 57.375), r'data.std=\(58.395, 57.12, 57.375\) must be in'),
    ('data.mean', (123.675, 116.28, 103.53), r'data.mean=\(123.675, 116.28, 103.53\) must be '
                                             r'in \[0, 1\] in every channel'),
    ('model.name', 'unet', r"model.name='unet' cannot train task='classification'; "
                           r"valid: model.name='classifier'"),
    ('task', 'segmentation', r"model.name='classifier' cannot train task='segmentation'; "
                             r"valid: model.name='unet'"),
])
def test_config_that_does_not_fit_the_data_is_refused(field, value, message):
  config = cifar.get_config('cifar10,cifar_small')
  *sections, key = field.split('.')
  functools.reduce(lambda node, name: node[name], sections, config)[key] = value
  with pytest.raises(ValueError, match=message):
    trainer.check_config(config, _info(cifar.get_config()), process_count=2)


def test_segmentation_refuses_mixing_before_a_run_starts():
  config = segmentation.get_config()
  config.data.cutmix_alpha = 1.0
  with pytest.raises(ValueError, match=r"data.cutmix_alpha=1.0 is not supported for task "
                                       r"'segmentation'; valid: 0.0"):
    trainer.check_config(config, _info(config))
  trainer.check_config(config, _info(config), training=False)  # eval.py mixes nothing.


def test_batches_that_do_not_split_over_the_devices_are_refused():
  config = cifar.get_config('cifar10,cifar_small')
  config.train.update(batch_size=128, grad_accum_steps=4, eval_batch_size=64)
  trainer.check_config(config, _info(config), device_count=8)  # 32 and 64 split.
  config.train.batch_size = 144
  with pytest.raises(ValueError, match=r'train.batch_size // train.grad_accum_steps=36 must '
                                       r'be divisible by the device count \(8\)'):
    trainer.check_config(config, _info(config), device_count=8)
  config.train.update(batch_size=128, eval_batch_size=60)
  with pytest.raises(ValueError, match=r'train.eval_batch_size=60 must be divisible by the '
                                       r'device and process counts \(8\)'):
    trainer.check_config(config, _info(config), process_count=2, device_count=8)


def test_evaluation_checks_only_what_it_runs():
  # A run trained with batch 144 on 2 devices, evaluated on 8 (eval.py).
  config = cifar.get_config('cifar10,cifar_small')
  config.train.update(batch_size=144, grad_accum_steps=1, eval_batch_size=64,
                      log_every_steps=0)
  trainer.check_config(config, _info(config), device_count=8, training=False)
  with pytest.raises(ValueError, match='train.log_every_steps=0'):
    trainer.check_config(config, _info(config), device_count=8)
  config.train.ema_decay = 2.0  # Training-only, like log_every_steps.
  trainer.check_config(config, _info(config), device_count=8, training=False)
  config.train.eval_batch_size = 60
  with pytest.raises(ValueError, match=r'train.eval_batch_size=60 must be divisible'):
    trainer.check_config(config, _info(config), device_count=8, training=False)
  config.train.eval_batch_size = 0
  with pytest.raises(ValueError, match=r'train.eval_batch_size=0 must be >= 1'):
    trainer.check_config(config, _info(config), device_count=8, training=False)
  config.model.num_classes = 100
  with pytest.raises(ValueError, match='model.num_classes=100 does not match'):
    trainer.check_config(config, _info(config), training=False)


def _config_json(workdir: str) -> str:
  with open(os.path.join(workdir, 'config.json')) as f:
    return f.read()


def test_resuming_under_another_config_is_refused_and_changes_nothing(trained, tmp_path):
  config, workdir, _ = trained
  saved = _config_json(workdir)
  longer = config.copy_and_resolve_references()
  longer.train.num_steps = 12  # Would stretch the cosine schedule mid-run.
  with pytest.raises(ValueError, match=r'another config \(train.num_steps: 6 -> 12\)'):
    trainer.train_and_evaluate(longer, workdir)
  wrong = config.copy_and_resolve_references()
  wrong.model.num_classes = 100  # Refused by check_config, before anything is written.
  with pytest.raises(ValueError, match='model.num_classes=100'):
    trainer.train_and_evaluate(wrong, workdir)
  assert _config_json(workdir) == saved
  assert not glob.glob(os.path.join(workdir, '*.tmp'))


def test_saved_config_resumes_and_evaluates_with_overrides(trained, tmp_path):
  """configs/saved.py:WORKDIR is the run's own config: train.py accepts it for
  the run, and eval.py takes --config.* overrides on it."""
  config, workdir, _ = trained
  run = str(tmp_path / 'run')
  shutil.copytree(workdir, run)
  proc = run_script(['train.py', f'--config=configs/saved.py:{run}', f'--workdir={run}'])
  out = finish(proc, 300)
  assert proc.returncode == 0, out
  assert trainer.load_config(run).to_dict() == config.to_dict()
  proc = run_script(['eval.py', f'--config=configs/saved.py:{run}', f'--workdir={run}',
                     '--config.train.eval_batch_size=32'])
  out = finish(proc, 300)
  assert proc.returncode == 0, out
  report = json.load(open(os.path.join(run, 'eval_test_6.json')))
  assert report['num_examples'] == 256
  with pytest.raises(ValueError, match=f'--config=configs/saved.py:{run}'):
    trainer.check_resumable(tiny_config(config.data.data_dir, num_steps=7), run)


def test_a_bad_model_field_is_refused_before_the_workdir_is_written(data_dir, tmp_path):
  config = tiny_config(data_dir, num_steps=2)
  config.model.depths = (2, 0)
  workdir = tmp_path / 'never'
  with pytest.raises(ValueError, match=r'model.depths=\(2, 0\) must be'):
    trainer.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_a_workdir_without_checkpoints_takes_a_new_config(data_dir, tmp_path):
  """A run that failed before its first checkpoint has nothing to resume."""
  workdir = str(tmp_path / 'fresh')
  os.makedirs(workdir)
  trainer.save_config(tiny_config(data_dir, num_steps=12), workdir)
  final = trainer.train_and_evaluate(tiny_config(data_dir, num_steps=2,
                                                 checkpoint_every_steps=1), workdir)
  assert final['step'] == 2
  assert trainer.load_config(workdir).train.num_steps == 2


def test_where_data_is_read_and_how_the_run_is_executed_may_change_on_resume(trained):
  config, workdir, _ = trained
  moved = config.copy_and_resolve_references()
  moved.data.data_dir = '/elsewhere'
  moved.train.update(log_every_steps=7, checkpoint_every_steps=5, keep_checkpoints=4,
                     eval_batch_size=2 * config.train.eval_batch_size)
  moved.mesh.strategy = 'fsdp'
  moved.model.remat = 'block'  # Memory for compute, same function.
  trainer.check_resumable(moved, workdir)
  moved.train.learning_rate *= 2
  with pytest.raises(ValueError, match=r'train.learning_rate'):
    trainer.check_resumable(moved, workdir)


def test_a_checkpoint_names_the_sampler_of_its_data_position(trained):
  """What _resume compares before restoring the iterator: the sampler (grain's
  repr) of the run that saved, read from this process's data file."""
  config, workdir, _ = trained
  manager = checkpointing.create_checkpoint_manager(workdir, 3, read_only=True)
  fresh = data.create_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                     seed=config.seed)
  saved = checkpointing.saved_data_sampler(manager, manager.latest_step(), 0, 1)
  assert saved == json.loads(fresh.get_state())['sampler']
  assert saved.startswith('IndexSampler(num_records=')  # No workers: grain's own.


def test_resuming_with_another_worker_count_is_refused_by_name(trained):
  """grain restores its iterator state only into the same worker count."""
  config, workdir, _ = trained
  workers = config.copy_and_resolve_references()
  workers.data.num_workers = 2
  with pytest.raises(ValueError, match=r'data.num_workers: 0 -> 2'):
    trainer.check_resumable(workers, workdir)
  two = data.create_train_iterator(workers.data, global_batch_size=8, seed=0)
  next(two)
  state = two.get_state()
  with pytest.raises(ValueError, match='Worker count'):  # What the check saves users from.
    data.create_train_iterator(config.data, global_batch_size=8, seed=0).set_state(state)


def test_eval_runs_data_parallel_on_the_devices_it_has(trained):
  """Weights are restored replicated, so a run trained on a (2, 4) FSDP mesh
  over two hosts evaluates on this machine's devices (eval.py, and the
  analysis tools through restore_trained's default mesh)."""
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.mesh.update(strategy='fsdp', shape=(2, 4), dcn_shape=(2, 1))
  with pytest.raises(ValueError, match=r'mesh.dcn_shape=\(2, 1\) is not valid'):
    parallel.create_mesh(config.mesh)
  mesh = trainer.eval_mesh(config.mesh)
  assert dict(mesh.shape) == {'data': jax.device_count(), 'fsdp': 1}
  restored = trainer.restore_trained(config, workdir)
  assert restored.step == 6
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(restored.params))


def _jitted_step(config):
  """(jitted make_train_step, initial params, rest, optimizer) of config, with
  the schedule of 10 steps per epoch and 100 in all."""
  graphdef, _, params, rest = trainer.init_model(config)
  schedule = optimizer_lib.create_learning_rate_schedule(config.train, 10, 100)
  tx = optimizer_lib.create_optimizer(config.train, schedule)
  return jax.jit(trainer.make_train_step(graphdef, tx, schedule, config)), params, rest, tx


def _run_steps(config, images, labels, steps: int) -> tuple[list[dict], list[dict]]:
  """States (the initial one first) and metrics of each optimizer step of
  make_train_step on one fixed batch."""
  train_step, params, rest, tx = _jitted_step(config)
  state = trainer.create_train_state(config, params, tx)
  states, logged = [state], []
  for _ in range(steps):
    state, metrics = train_step(state, {'image': images, 'label': labels}, rest)
    states.append(jax.device_get(state))
    logged.append(jax.device_get(metrics))
  return states, logged


def test_logged_train_metrics_against_numpy():
  """The step's train/loss (label-smoothed cross-entropy) and train/accuracy
  over the whole batch and train/learning_rate of the optimizer step, with 2
  micro-batches, recomputed in numpy from the model's logits before the update."""
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(16, 32, 32, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
  config = tiny_config('', grad_accum_steps=2, label_smoothing=0.1, warmup_epochs=0.5)
  config.model.drop_path_rate = 0.0  # Deterministic: the logits below are the step's.
  graphdef, _, params, rest = trainer.init_model(config)
  logits = np.asarray(nnx.merge(graphdef, params, rest)(images), np.float64)
  states, logged = _run_steps(config, images, labels, steps=3)
  schedule = optimizer_lib.create_learning_rate_schedule(config.train, 10, 100)
  targets = np.eye(10)[np.asarray(labels)] * 0.9 + 0.1 / 10
  log_softmax = logits - logits.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  np.testing.assert_allclose(logged[0]['train/loss'], -(targets * log_softmax).sum(-1).mean(),
                             rtol=1e-5)
  assert logged[0]['train/accuracy'] == pytest.approx(
      np.mean(logits.argmax(-1) == np.asarray(labels)))
  lrs = [float(m['train/learning_rate']) for m in logged]  # Warmup: rising.
  assert lrs == pytest.approx([float(schedule(0)), float(schedule(1)), float(schedule(2))])
  assert lrs[2] > lrs[1] > lrs[0]
  assert int(states[-1]['step']) == 3


def test_accumulation_equals_the_big_batch_and_ema_follows_the_params():
  """2 micro-batches of 16 take the step one batch of 32 takes and log its
  metrics, mixup / cutmix pairs (the batch is mixed before it is split) and
  dropout masks (drawn per example) included, and the EMA is
  ema <- d * ema + (1 - d) * params once per step."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(32, 32, 32, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 32), jnp.int32)
  decay = 0.9
  runs = {}
  for accum, rate in itertools.product((1, 2), (0.0, 0.3)):
    config = tiny_config('', grad_accum_steps=accum, ema_decay=decay, warmup_epochs=0.0)
    config.model.update(drop_path_rate=rate, drop_rate=rate / 2, attn_drop_rate=rate / 2)
    config.data.update(mixup_alpha=0.8, cutmix_alpha=1.0)
    runs[accum, rate] = _run_steps(config, images, labels, steps=3)
  dropout_mattered = jax.tree.map(lambda x, y: np.abs(x - y).max(),
                                  runs[1, 0.3][0][-1]['params'], runs[1, 0.0][0][-1]['params'])
  assert max(jax.tree.leaves(dropout_mattered)) > 1e-3
  # With dropout, summation order alone moves a param by ~2e-6 over 3 Adam
  # steps; other masks would move it by as much as dropping nothing does.
  for rate, atol in ((0.0, 2e-6), (0.3, 1e-5)):
    (big, big_logged), (accumulated, accumulated_logged) = runs[1, rate], runs[2, rate]
    for a, b in zip(big_logged, accumulated_logged):
      for name in ('train/loss', 'train/accuracy', 'train/grad_norm', 'train/param_norm'):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)
    for a, b in zip(big[1:], accumulated[1:]):
      jax.tree.map(lambda x, y, atol=atol: np.testing.assert_allclose(x, y, atol=atol),
                   a['params'], b['params'])
      jax.tree.map(lambda x, y, atol=atol: np.testing.assert_allclose(x, y, atol=atol),
                   a['ema_params'], b['ema_params'])
  big, accumulated = runs[1, 0.3][0], runs[2, 0.3][0]
  ema = big[0]['params']
  for state in big[1:]:
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, state['params'])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
                 ema, state['ema_params'])
  assert int(accumulated[-1]['step']) == int(big[-1]['step']) == 3
  moved = jax.tree.map(lambda x, y: np.abs(x - y).max(), big[0]['params'], big[-1]['params'])
  assert max(jax.tree.leaves(moved)) > 1e-3  # The steps did train.


_ACCUMULATE_ON_EIGHT_DEVICES = """
import json
import jax, numpy as np
from tests.training.conftest import tiny_config
from hierarchical_vit import parallel
from hierarchical_vit.training import optimizer as optimizer_lib
from hierarchical_vit.training import trainer

config = tiny_config('', grad_accum_steps=2, warmup_epochs=0.0)
graphdef, _, params, rest = trainer.init_model(config)
schedule = optimizer_lib.create_learning_rate_schedule(config.train, 10, 100)
tx = optimizer_lib.create_optimizer(config.train, schedule)
rng = np.random.default_rng(0)
batch = {'image': rng.normal(size=(32, 32, 32, 1)).astype(np.float32),
         'label': rng.integers(0, 10, 32).astype(np.int32)}
step = jax.jit(trainer.make_train_step(graphdef, tx, schedule, config))
one, one_metrics = step(trainer.create_train_state(config, params, tx), batch, rest)
leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
results = {}
for strategy, shape in (('data_parallel', ()), ('fsdp', (2, 4))):
  config.mesh.update(strategy=strategy, shape=shape, fsdp_min_size=16)
  mesh = parallel.create_mesh(config.mesh)
  args = (trainer.shard_train_state(config, params, tx, mesh),
          parallel.shard_batch(batch, parallel.batch_sharding(mesh)),
          parallel.put_global(rest, parallel.replicated(mesh)))
  hlo = step.lower(*args).compile().as_text()
  eight, eight_metrics = step(*args)
  results[strategy] = {
      'devices': int(mesh.devices.size),
      'sharded_params': sum(not x.sharding.is_fully_replicated
                            for x in jax.tree.leaves(args[0]['params'])),
      'differ': max(float(np.abs(a - b).max())
                    for a, b in zip(leaves(one['params']), leaves(eight['params']))),
      'moved': max(float(np.abs(a - b).max())
                   for a, b in zip(leaves(one['params']), leaves(params))),
      'metrics': [[float(m[k]) for k in ('train/loss', 'train/grad_norm')]
                  for m in (one_metrics, eight_metrics)],
      'collectives': sorted(op for op in ('all-gather', 'all-to-all', 'collective-permute',
                                          'all-reduce') if op in hlo)}
print(json.dumps(results))
"""


def test_accumulation_over_eight_devices_is_the_one_device_step(tmp_path):
  """grad_accum_steps=2 with the batch split over 8 devices, data parallel and
  FSDP (2 x 4): the step of one device; the micro-batches come from each
  device's own rows (data parallel's only collective is the gradient
  all-reduce: no data moves between devices)."""
  script = tmp_path / 'accumulate.py'
  script.write_text(_ACCUMULATE_ON_EIGHT_DEVICES)
  proc = run_script([str(script)],
                    env={'XLA_FLAGS': xla_flags('--xla_force_host_platform_device_count=8'),
                         'JAX_PLATFORMS': 'cpu'})
  out = finish(proc, 600)
  assert proc.returncode == 0, out[-3000:]
  # The last JSON line: C++ lines on stderr can follow the script's own.
  results = json.loads([line for line in out.splitlines() if line.startswith('{')][-1])
  for result in results.values():
    assert result['devices'] == 8
    assert result['moved'] > 1e-4 and result['differ'] < 1e-5
    np.testing.assert_allclose(*result['metrics'], rtol=1e-5)  # Loss and grad norm.
  assert results['data_parallel']['collectives'] == ['all-reduce']
  assert results['fsdp']['sharded_params'] > 0


def _step_temp_mib(batch_size: int, accum: int) -> float:
  """XLA's temporary memory (activations, gradients) of the compiled train step."""
  config = tiny_config('', grad_accum_steps=accum)
  train_step, params, rest, tx = _jitted_step(config)
  state = jax.eval_shape(lambda p: trainer.create_train_state(config, p, tx), params)
  batch = {'image': jax.ShapeDtypeStruct((batch_size, 32, 32, 1), jnp.float32),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  compiled = train_step.lower(state, batch, rest).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def test_accumulation_holds_one_micro_batch_of_activations():
  """Batch 256 in 4 micro-batches needs the memory of batch 64, not of 256
  (XLA:CPU, 2026-11-27: 15.0 MiB, against 13.9 and 59.2)."""
  small, whole, accumulated = _step_temp_mib(64, 1), _step_temp_mib(256, 1), _step_temp_mib(256, 4)
  assert whole > 3 * small
  assert accumulated < 1.2 * small


def test_ema_warmup_follows_tensorflows_num_updates_rule():
  """With train.ema_warmup, optimizer update n (from 0) uses decay
  min(ema_decay, (1 + n) / (10 + n)); with 2 micro-batches n counts optimizer
  updates, not micro-batches, and the EMA moves once per update."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(16, 32, 32, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
  config = tiny_config('', grad_accum_steps=2, ema_decay=0.99, ema_warmup=True,
                       warmup_epochs=0.0)
  config.model.drop_path_rate = 0.0
  states, _ = _run_steps(config, images, labels, steps=3)
  ema = states[0]['params']
  for n, state in enumerate(states[1:]):
    d = min(0.99, (1 + n) / (10 + n))  # 0.1, 0.18, 0.25: far from 0.99.
    ema = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, ema, state['params'])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
                 ema, state['ema_params'])
  assert float(trainer.ema_decay(config.train, 10**6)) == pytest.approx(0.99)
  config.train.ema_warmup = False
  assert float(trainer.ema_decay(config.train, 0)) == pytest.approx(0.99)


def test_ema_weights_are_what_is_evaluated_and_restored(data_dir, tmp_path):
  """With train.ema_decay > 0, the in-training eval, restore_trained (eval.py)
  and its report use the EMA weights, not the raw params."""
  workdir = str(tmp_path / 'ema')
  config = tiny_config(data_dir, num_steps=3, checkpoint_every_steps=3, ema_decay=0.5,
                       learning_rate=1e-2, warmup_epochs=0.0)
  final = trainer.train_and_evaluate(config, workdir)

  _, eval_graphdef, params, rest = trainer.init_model(config)
  manager = checkpointing.create_checkpoint_manager(workdir, 3, read_only=True)
  saved = checkpointing.restore_weights(
      manager, 3, jax.device_put({'params': params, 'ema_params': params}))
  leaves = lambda tree: jax.tree.leaves(jax.tree.map(np.asarray, tree))
  assert any(not np.allclose(e, p) for e, p in zip(leaves(saved['ema_params']),
                                                   leaves(saved['params'])))

  restored = trainer.restore_trained(config, workdir)
  assert restored.weights == 'ema_params' and restored.step == 3
  jax.tree.map(np.testing.assert_array_equal, leaves(restored.params),
               leaves(saved['ema_params']))
  images = next(iter(data.create_eval_iterator(config.data, batch_size=8)))['image']
  ema_model = nnx.merge(eval_graphdef, saved['ema_params'], rest)
  np.testing.assert_array_equal(restored.predict(images), np.argmax(ema_model(images), -1))

  mesh = parallel.create_mesh(config.mesh)
  eval_step = jax.jit(trainer.make_eval_step(eval_graphdef, config.model.num_classes))

  def eval_loss(weights) -> float:
    batches = data.create_eval_iterator(config.data, batch_size=config.train.eval_batch_size)
    return trainer.evaluate(eval_step, weights, rest, batches,
                            parallel.batch_sharding(mesh))['eval/loss']

  ema_loss, raw_loss = eval_loss(saved['ema_params']), eval_loss(saved['params'])
  assert abs(ema_loss - raw_loss) > 1e-4  # The check below can tell them apart.
  np.testing.assert_allclose(final['eval/loss'], ema_loss, rtol=1e-5)


def test_a_missing_init_from_fails_before_the_workdir_is_written(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  with pytest.raises(FileNotFoundError, match=r"train.init_from='nope.npz': no such file"):
    trainer.train_and_evaluate(tiny_config(data_dir, init_from='nope.npz'), workdir)
  assert not os.path.exists(os.path.join(workdir, 'config.json'))


def test_weights_that_do_not_load_are_named_by_field_and_leave_no_config(data_dir, tmp_path):
  """A workdir (not a weights file) as train.init_from: refused by field,
  before config.json is written, so that a corrected command starts afresh."""
  workdir, weights = str(tmp_path / 'run'), tmp_path / 'another_run'
  weights.mkdir()
  with pytest.raises(ValueError, match=re.escape(f"train.init_from='{weights}': {weights}: "
                                                 "unknown weights format ''; expected .npz")):
    trainer.train_and_evaluate(tiny_config(data_dir, init_from=str(weights)), workdir)
  assert not os.path.exists(os.path.join(workdir, 'config.json'))


@pytest.mark.parametrize('overrides, message', [
    (dict(resize_mode='crop'), r"data.resize_mode='crop' is not valid; valid choices: "),
    (dict(augment='randaugment2'), r"data.augment='randaugment2' is not valid"),
    (dict(augment='randaugment', randaugment_magnitude=11),
     r'data.randaugment_magnitude=11 is not valid'),
    (dict(mean=(0.5, 0.5)), r'data.mean=\(0.5, 0.5\) has 2 values; expected 1'),
])
def test_a_bad_preprocessing_field_fails_before_the_workdir_is_written(data_dir, tmp_path,
                                                                        overrides, message):
  config = tiny_config(data_dir)
  config.data.update(overrides)
  workdir = str(tmp_path / 'run')
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)


def _assert_resume_seeks_past_3_batches(config, monkeypatch) -> None:
  """_resume of a step-3 checkpoint (the caller patches what it reads of it)
  leaves a fresh iterator where one that read 3 global batches stands."""
  make = lambda: data.create_train_iterator(
      config.data, global_batch_size=config.train.batch_size, seed=config.seed)
  reader = make()
  for _ in range(3):
    next(reader)
  monkeypatch.setattr(checkpointing, 'restore', lambda manager, step, state: {'step': 3})
  resumed = make()
  assert trainer._resume(None, 3, {}, resumed, config.train.batch_size) == {'step': 3}
  np.testing.assert_array_equal(next(resumed)['image'], next(reader)['image'])


def test_a_resume_under_another_process_count_seeks_past_every_batch(data_dir, monkeypatch):
  """Saved by 2 processes at step 3, resumed by 1: the iterator continues
  where one that read 3 global batches stands, as the same point of the epoch
  (with accumulation too: a step reads one global batch)."""
  monkeypatch.setattr(checkpointing, 'saved_process_count', lambda manager, step: 2)
  _assert_resume_seeks_past_3_batches(tiny_config(data_dir, grad_accum_steps=2), monkeypatch)


def test_a_resume_from_an_older_data_sampler_seeks_past_every_batch(data_dir, monkeypatch):
  """A checkpoint whose data position an older release's sampler wrote (with
  2 grain workers: before batches stopped depending on the worker count) is
  not restored into today's sampler, whose positions hold other examples:
  the iterator continues where one that read 3 batches stands."""
  config = tiny_config(data_dir)
  config.data.num_workers = 2
  monkeypatch.setattr(checkpointing, 'saved_process_count', lambda manager, step: 1)
  monkeypatch.setattr(checkpointing, 'saved_data_sampler',
                      lambda manager, step, index, count: 'IndexSampler(num_records=60000)')
  _assert_resume_seeks_past_3_batches(config, monkeypatch)


def test_evaluating_an_empty_split_is_refused_by_name():
  with pytest.raises(ValueError, match=r'the split \(data.eval_split, or eval.py --split\) has no'):
    trainer.evaluate(lambda *args: None, {}, {}, iter([]), sharding=None)
