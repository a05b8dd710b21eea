"""Swin-T/S/B on ImageNet-1k at 224x224, the recipe of Liu et al. 2021.

Its augmentation is timm's rand-m9-mstd0.5-inc1 ('randaugment_timm'): two
RandAugment ops of timm's increasing set, each applied with probability 0.5 at a
magnitude drawn from N(9, 0.5), geometry bicubic and filled with the data mean;
bicubic Inception crops.

Usage: --config=configs/swin_imagenet.py:swin_t   (or swin_s, swin_b)
"""

import ml_collections

from configs import base
from hierarchical_vit.presets import apply_preset


def get_config(arg: str = 'swin_t') -> ml_collections.ConfigDict:
  config = base.get_config()
  apply_preset(config.model, arg)
  config.data.name = 'imagenet2012'
  config.data.eval_split = 'validation'
  config.data.image_size = 224
  config.data.crop_padding = 0  # imagenet2012 uses random-resized crops instead.
  config.data.augment = 'randaugment_timm'
  config.data.randaugment_prob = 0.5
  config.data.randaugment_magnitude_std = 0.5
  config.data.mixup_alpha = 0.8
  config.data.cutmix_alpha = 1.0
  config.data.random_erasing = 0.25
  config.train.batch_size = 1024
  config.train.num_epochs = 300.0
  config.train.warmup_epochs = 20.0
  config.train.learning_rate = 1e-3
  config.train.weight_decay = 0.05
  config.train.label_smoothing = 0.1
  config.train.eval_batch_size = 1024
  config.train.checkpoint_every_steps = 2000
  return config
