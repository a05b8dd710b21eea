"""CIFAR-10/100 from scratch at 32x32 (patch 2, window 4).

Usage: --config=configs/cifar.py:cifar10,cifar_small
       (data set: cifar10 | cifar100; preset: cifar_small | cifar_swin_t)
"""

import ml_collections

from configs import base
from hierarchical_vit.presets import apply_preset

_NUM_CLASSES = {'cifar10': 10, 'cifar100': 100}


def get_config(arg: str = 'cifar10,cifar_small') -> ml_collections.ConfigDict:
  dataset, preset = (arg.split(',') + ['cifar_small'])[:2]
  if dataset not in _NUM_CLASSES:
    raise ValueError(f'config arg data set {dataset!r} is not one of {sorted(_NUM_CLASSES)}')
  config = base.get_config()
  apply_preset(config.model, preset)
  config.model.num_classes = _NUM_CLASSES[dataset]
  config.model.gelu_approximate = True
  config.data.name = dataset
  config.data.augment = 'trivial_augment_wide'  # TrivialAugment's published default.
  config.data.mixup_alpha = 0.8
  config.data.cutmix_alpha = 1.0
  config.train.num_epochs = 100.0
  config.train.warmup_epochs = 5.0
  config.train.batch_size = 128
  return config
