"""Downsampler ablation: how should a hierarchical ViT halve its resolution?

Usage (see hierarchical_vit/ablate.py):
  python -m hierarchical_vit.ablate \
      --config=configs/ablations/downsample.py:fashion_mnist --workdir=workdirs/downsample
  (data set: fashion_mnist (offline default) | cifar10 | cifar100 | imagenet2012)

Every variant changes only config.model.downsample; the rest is the data set's
experiment config. patch_merge is the reference the others are compared with.
space_to_depth (the lossless rearrangement alone, 4x the width per stage) is
the upper reference where affordable: not for imagenet2012, where Swin-T's
widths would grow 96 -> 6144 and the parameters ~30x.
"""

import ml_collections

from configs import cifar, quickstart, swin_imagenet

DATASETS = ('fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012')
DOWNSAMPLERS = ('patch_merge', 'avg_pool', 'max_pool', 'conv', 'depthwise_conv_pool',
                'soft_pool', 'conv_max_pool')
# What makes NesT's aggregation work: (variant, downsampler, its options) for its
# overlapping 3x3 max pool without the conv, its conv with a plain 2x2 pool, and
# a stride-2 3x3 conv with the same parameters in place of conv + pool.
NEST_PARTS = (('max_pool_3x3', 'max_pool', {'kernel_size': 3}),
              ('conv_max_pool_2x2', 'conv_max_pool', {'pool_size': 2}),
              ('conv_3x3', 'conv', {'kernel_size': 3}))


def _experiment(dataset: str) -> ml_collections.ConfigDict:
  if dataset == 'fashion_mnist':
    # The quickstart model (conv stem to 8x8 tokens, two downsamplings) for
    # 1 epoch: ~2 min a run on 2 CPU cores (measured: docs/results/README.md),
    # so ~75 min for the 33 runs with --runs_at_once=2. Two evaluations per
    # epoch give the learning curves a second point.
    config = quickstart.get_config()
    config.train.num_epochs = 1.0
    config.train.warmup_epochs = 0.1
    config.train.eval_every_steps = 234
    return config
  if dataset in ('cifar10', 'cifar100'):
    return cifar.get_config(f'{dataset},cifar_small')
  return swin_imagenet.get_config('swin_t')


def get_config(arg: str = 'fashion_mnist') -> ml_collections.ConfigDict:
  if arg not in DATASETS:
    raise ValueError(f'config arg data set {arg!r} is not one of {list(DATASETS)}')
  config = _experiment(arg)
  names = DOWNSAMPLERS + (() if arg == 'imagenet2012' else ('space_to_depth',))
  variants = [{'name': n, 'overrides': {'model.downsample': n}} for n in names]
  variants += [{'name': variant, 'overrides': {
      'model.downsample': name,
      **{f'model.downsample_options.{name}.{k}': v for k, v in options.items()}}}
               for variant, name, options in NEST_PARTS]
  config.sweep = ml_collections.ConfigDict({
      'name': f'downsample_{arg}',
      'seeds': (0, 1, 2),
      'variants': tuple(variants),
      # Merging vs every alternative (a - b > 0: patch merging is better), and
      # NesT's aggregation vs each NEST_PARTS variant.
      'comparisons': tuple(('patch_merge', n) for n in names[1:])
                     + tuple(('conv_max_pool', v) for v, _, _ in NEST_PARTS),
      'metric': 'eval/accuracy',
  })
  return config
