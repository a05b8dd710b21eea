"""Named architectures: values for config.model fields.

`apply_preset(config.model, 'swin_t')` sets the architecture fields; the
resampling choices stay as configured, so a preset can be ablated like any
other model.
"""

import ml_collections

_SWIN_IMAGENET = dict(img_size=224, in_chans=3, num_classes=1000, stem='patch', patch_size=4,
                      window_size=7)
_CIFAR = dict(img_size=32, in_chans=3, num_classes=10, stem='patch', patch_size=2,
              window_size=4)

PRESETS = {
    # Swin-T/S/B of Liu et al. 2021 (ImageNet-1k, 224x224). With patch_merge,
    # swin_t has exactly the official 28,288,354 parameters.
    'swin_t': dict(_SWIN_IMAGENET, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                   drop_path_rate=0.2),
    'swin_s': dict(_SWIN_IMAGENET, embed_dim=96, depths=(2, 2, 18, 2),
                   num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    'swin_b': dict(_SWIN_IMAGENET, embed_dim=128, depths=(2, 2, 18, 2),
                   num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    # CIFAR-scale (32x32, patch 2, window 4): a small 3-stage model and a
    # Swin-T-shaped one.
    'cifar_small': dict(_CIFAR, embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12),
                        drop_path_rate=0.1),
    'cifar_swin_t': dict(_CIFAR, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                         drop_path_rate=0.2),
}


def apply_preset(model_config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Overwrites model_config's architecture fields with PRESETS[name]; returns it."""
  if name not in PRESETS:
    raise ValueError(f'preset {name!r} is not one of {sorted(PRESETS)}')
  model_config.update(PRESETS[name])
  return model_config
