"""A CIFAR-scale hierarchical ViT on Fashion-MNIST (28x28 padded to 32x32, 1 channel).

The real data set available offline; prepare it once with
`python -m hierarchical_vit.data.prepare --dataset=fashion_mnist --data_dir=data`
and train with `--config.data.data_dir=data` (or set $TFDS_DATA_DIR).
"""

import ml_collections

from configs import base
from hierarchical_vit.presets import apply_preset


def get_config(arg: str = 'cifar_small') -> ml_collections.ConfigDict:
  config = base.get_config()
  apply_preset(config.model, arg)
  config.model.in_chans = 1
  config.model.num_classes = 10
  config.model.gelu_approximate = True
  config.data.name = 'fashion_mnist'
  config.data.image_size = 32
  config.data.resize_mode = 'pad'
  config.train.num_epochs = 10.0
  return config
