"""Semantic segmentation with a Swin-Unet-style UNet (encoder + decoder + skips).

The resampling on both sides is a config choice:
  --config.model.downsample=avg_pool --config.model.upsample=interpolate
"""

from configs import base

def get_config():
  config = base.get_config()
  config.task = 'segmentation'
  m = config.model
  m.name = 'unet'
  m.img_size = 64
  m.in_chans = 1
  m.num_classes = 11  # 10 item classes + background.
  m.patch_size = 2
  m.embed_dim = 32
  m.depths = (2, 2, 2)
  m.num_heads = (2, 4, 8)
  m.window_size = 8
  m.gelu_approximate = True
  m.downsample = 'patch_merge'
  m.upsample = 'patch_expand'
  config.data.image_size = 64
  config.data.hflip = False
  config.data.crop_padding = 0
  return config
