"""Compute-precision ablation: what do bfloat16 compute and bfloat16 attention logits cost?

Usage (see hierarchical_vit/ablate.py):
  python -m hierarchical_vit.ablate \
      --config=configs/ablations/precision.py:fashion_mnist --workdir=workdirs/precision
  (data set: fashion_mnist (offline default) | cifar10 | cifar100 | imagenet2012)

Three variants of the downsample sweep's reference model (patch merging) and
recipe: float32 compute; bfloat16 compute (model.dtype) with the einsum
attention core, whose logits and softmax stay float32; and bfloat16 with
'einsum_lowp', whose logits are rounded to bfloat16 as under torch.autocast
(the faster-on-GPU candidate of docs/performance.md). Parameters, optimizer
state and the loss stay float32 in all three.
"""

import ml_collections

from configs.ablations import downsample

DATASETS = downsample.DATASETS
VARIANTS = (('float32', {'model.dtype': 'float32', 'model.attention': 'einsum'}),
            ('bfloat16', {'model.dtype': 'bfloat16', 'model.attention': 'einsum'}),
            ('bfloat16_lowp_logits', {'model.dtype': 'bfloat16',
                                      'model.attention': 'einsum_lowp'}))


def get_config(arg: str = 'fashion_mnist') -> ml_collections.ConfigDict:
  config = downsample.get_config(arg)
  config.sweep = ml_collections.ConfigDict({
      'name': f'precision_{arg}',
      'seeds': (0, 1, 2),
      'variants': tuple({'name': name, 'overrides': overrides} for name, overrides in VARIANTS),
      # a - b < 0: the lower precision costs accuracy.
      'comparisons': (('bfloat16', 'float32'), ('bfloat16_lowp_logits', 'bfloat16')),
      'metric': 'eval/accuracy',
  })
  return config
