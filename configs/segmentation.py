"""Semantic segmentation with a Swin-Unet-style UNet (encoder + decoder + skips).

Trains out of the box on the offline Fashion-MNIST canvases (11 classes:
background + 10 item classes, labels derived from item intensities; see
hierarchical_vit/data/canvas.py). Prepare them once (~10 s):

  python -m hierarchical_vit.data.prepare --dataset=fashion_mnist_canvas --data_dir=data
  python train.py --config=configs/segmentation.py --workdir=workdirs/seg
  python eval.py --workdir=workdirs/seg   # mIoU, per-class IoU, overlay PNGs

The resampling on both sides is a config choice:
  --config.model.downsample=avg_pool --config.model.upsample=interpolate
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.task = 'segmentation'
  m = config.model
  m.name = 'unet'
  m.img_size = 64
  m.in_chans = 1
  m.num_classes = 11  # 10 item classes + background.
  # 8x8 tokens of width 64: on the canvases this learns item classes much
  # faster than 16x16 tokens of width 32 (patch 4) at the same CPU time per
  # image; measured recipes: docs/results/README.md (segmentation grid).
  m.patch_size = 8
  m.embed_dim = 64
  m.depths = (2, 2, 2)
  m.num_heads = (2, 4, 8)
  m.window_size = 8
  m.gelu_approximate = True
  m.drop_path_rate = 0.0  # Runs of a few epochs: stochastic depth only slows them.
  m.downsample = 'patch_merge'
  m.upsample = 'patch_expand'
  d = config.data
  d.name = 'fashion_mnist_canvas'
  d.data_dir = 'data'
  d.image_size = 64
  d.hflip = True       # A mirrored item is still its class; mask flips along.
  d.crop_padding = 0   # Item positions are already random.
  t = config.train
  # Batch 32 at 3e-3: twice the steps of batch 64 in the same time, and the
  # best mIoU after 2 epochs of the recipes tried.
  t.batch_size = 32
  t.num_epochs = 2.0
  t.warmup_epochs = 0.1
  t.learning_rate = 3e-3
  t.label_smoothing = 0.0  # Per-pixel targets: no smoothing (as in Swin-Unet).
  t.eval_batch_size = 256  # Divides by 8 devices: a host of 8 GPUs evaluates too.
  t.log_every_steps = 50
  return config
