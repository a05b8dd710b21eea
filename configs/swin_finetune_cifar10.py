"""Swin-T fine-tuned on CIFAR-10 at 224x224 from ImageNet weights.

Convert a timm or official Swin-T checkpoint once (or point init_from at the
.pth/.safetensors directly: load_weights reads those too):
  python -m hierarchical_vit.convert --input=swin_tiny_patch4_window7_224.pth \
      --output=swin_t.npz --preset=swin_t
then:
  python train.py --config=configs/swin_finetune_cifar10.py \
      --config.train.init_from=swin_t.npz --workdir=workdirs/swin_finetune_cifar10
The 1000-class head is replaced by a fresh 10-class one; with
--config.model.window_size=W != 7 the bias tables are resized bicubically, and
with --config.model.patch_size=P != 4 the patch stem is resampled (FlexiViT's
pseudo-inverse resize, as timm's resample_patch_embed).
"""

import ml_collections

from configs import base
from hierarchical_vit.presets import apply_preset


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  apply_preset(config.model, 'swin_t')
  config.model.num_classes = 10
  config.model.drop_path_rate = 0.1
  config.model.gelu_approximate = False  # The exact GELU the weights were trained with.
  config.data.name = 'cifar10'
  config.data.image_size = 224
  config.data.resize_mode = 'resize'  # Upsample 32 -> 224 to match the pretraining scale.
  config.data.crop_padding = 28       # 4 px at 32x32, scaled to 224.
  # ImageNet statistics: the pretrained stem expects them.
  config.data.mean = (0.485, 0.456, 0.406)
  config.data.std = (0.229, 0.224, 0.225)
  config.train.batch_size = 128
  config.train.num_epochs = 10.0
  config.train.warmup_epochs = 1.0
  config.train.learning_rate = 1e-4
  config.train.min_learning_rate = 1e-6
  config.train.weight_decay = 0.05
  config.train.label_smoothing = 0.1
  config.train.eval_batch_size = 256
  # Required: without it the run would train Swin-T from scratch (check_config refuses).
  config.train.init_from = ml_collections.config_dict.placeholder(str)
  return config
