"""Upsampler x downsampler ablation for segmentation (configs/segmentation.py).

Usage:
  python -m hierarchical_vit.ablate --config=configs/ablations/upsample.py \
      --workdir=workdirs/upsample

Each decoder upsampler (patch_expand, interpolate bilinear / nearest,
transposed_conv, pixel_shuffle) is crossed with the encoder's patch_merge and
avg_pool. Comparisons: merging against pooling under the same upsampler, and
each other upsampler against patch_expand, both with patch_merge.
"""

import ml_collections

from configs import segmentation

UPSAMPLERS = {
    'patch_expand': {'model.upsample': 'patch_expand'},
    'bilinear': {'model.upsample': 'interpolate',
                 'model.upsample_options.interpolate.method': 'bilinear'},
    'nearest': {'model.upsample': 'interpolate',
                'model.upsample_options.interpolate.method': 'nearest'},
    'transposed_conv': {'model.upsample': 'transposed_conv'},
    'pixel_shuffle': {'model.upsample': 'pixel_shuffle'},
}
DOWNSAMPLERS = ('patch_merge', 'avg_pool')


def get_config() -> ml_collections.ConfigDict:
  config = segmentation.get_config()
  # 2 epochs (1250 steps of 32 canvases) per run, evaluated after each epoch.
  # On 2 CPU cores with --runs_at_once=2 (one core per run) the grid takes
  # ~1 h 35 min: runs of 5-6 min two at a time, pixel_shuffle's ~9.5 min (its
  # x8 final step, a 3x3 conv to 4096 channels, is 3.4x the model's FLOPs).
  # Measured: docs/results/README.md.
  config.train.num_epochs = 2.0
  config.train.eval_every_steps = 625
  config.sweep = ml_collections.ConfigDict({
      'name': 'upsample_segmentation',
      'seeds': (0, 1, 2),
      'variants': tuple(
          {'name': f'{down}+{up}', 'overrides': {'model.downsample': down, **overrides}}
          for up, overrides in UPSAMPLERS.items() for down in DOWNSAMPLERS),
      # Merging vs pooling under each upsampler, then each upsampler against
      # Swin-Unet's patch_expand (with patch_merge).
      'comparisons': tuple((f'patch_merge+{up}', f'avg_pool+{up}') for up in UPSAMPLERS) + tuple(
          ('patch_merge+patch_expand', f'patch_merge+{up}') for up in list(UPSAMPLERS)[1:]),
      'grid': {'rows': tuple(UPSAMPLERS), 'columns': DOWNSAMPLERS, 'cell': '{column}+{row}'},
      'metric': 'eval/miou',  # Mean IoU over the classes (the trainer's eval).
  })
  return config
