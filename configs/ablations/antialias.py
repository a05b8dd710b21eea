"""Anti-aliasing ablation: does blurring before each downsampling help a hierarchical ViT?

Usage (see hierarchical_vit/ablate.py):
  python -m hierarchical_vit.ablate \
      --config=configs/ablations/antialias.py:fashion_mnist --workdir=workdirs/antialias
  (data set: fashion_mnist (offline default) | cifar10 | cifar100 | imagenet2012)

Each of merging, average and max pooling runs as is and with Zhang (2019)'s
binomial blur before its subsampling (blur_merge, blur_pool, max_blur_pool;
filter size: model.downsample_options.<name>.filter_size, 3 by default). The
training recipe is the downsample ablation's, so its runs compare with these.
`python -m hierarchical_vit.shift_consistency` then measures how stable each
trained model's prediction is under small shifts of its input.
"""

import ml_collections

from configs.ablations import downsample

DATASETS = downsample.DATASETS
# (plain, anti-aliased) pairs.
PAIRS = (('patch_merge', 'blur_merge'), ('avg_pool', 'blur_pool'), ('max_pool', 'max_blur_pool'))


def get_config(arg: str = 'fashion_mnist') -> ml_collections.ConfigDict:
  config = downsample.get_config(arg)
  names = [name for pair in PAIRS for name in pair]
  config.sweep = ml_collections.ConfigDict({
      'name': f'antialias_{arg}',
      'seeds': (0, 1, 2),
      'variants': tuple({'name': n, 'overrides': {'model.downsample': n}} for n in names),
      # Anti-aliased vs plain: a - b > 0 means the blur helps.
      'comparisons': tuple((blurred, plain) for plain, blurred in PAIRS),
      'metric': 'eval/accuracy',
  })
  return config
