"""Every experiment config, as its file's get_config() gives it by default."""

import importlib

import pytest

# configs/saved.py is left out: it reads a run's config.json.
CONFIGS = ['base', 'cifar', 'fashion_mnist', 'quickstart', 'segmentation', 'segmentation_pets',
           'swin_finetune_cifar10', 'swin_imagenet', 'ablations.antialias',
           'ablations.downsample', 'ablations.precision', 'ablations.upsample']


@pytest.mark.parametrize('name', CONFIGS)
def test_batches_divide_by_a_host_of_8_devices(name):
  """train.py and eval.py refuse a global batch that 8 GPUs (or a TPU host's
  8 cores) cannot split evenly: every config runs on one such host as it is."""
  config = importlib.import_module(f'configs.{name}').get_config()
  for field in ('batch_size', 'eval_batch_size'):
    assert config.train[field] % 8 == 0, f'configs/{name}: train.{field}={config.train[field]}'
