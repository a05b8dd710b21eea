"""Every experiment config, as its file's get_config() gives it by default."""

import glob
import importlib
import os

import pytest

from tests.conftest import REPO

# Every configs/**.py with a get_config, but saved.py (it reads a run's config.json).
CONFIGS = sorted(
    os.path.relpath(path, os.path.join(REPO, 'configs'))[:-3].replace(os.sep, '.')
    for path in glob.glob(os.path.join(REPO, 'configs', '**', '*.py'), recursive=True)
    if not path.endswith(('__init__.py', 'saved.py')))


def test_every_config_is_checked():
  assert {'base', 'segmentation', 'swin_imagenet', 'ablations.upsample'} <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_batches_divide_by_a_host_of_8_devices(name):
  """train.py and eval.py refuse a global batch (a micro-batch, with gradient
  accumulation) that 8 GPUs or a TPU host's 8 cores cannot split evenly: every
  config runs on one such host as it is."""
  train = importlib.import_module(f'configs.{name}').get_config().train
  micro_batch = train.batch_size // train.grad_accum_steps
  assert micro_batch % 8 == 0, f'configs/{name}: train.batch_size={train.batch_size}'
  assert train.eval_batch_size % 8 == 0, f'configs/{name}: train.eval_batch_size'
