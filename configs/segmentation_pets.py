"""Oxford-IIIT Pet foreground segmentation: {background, pet} at 128x128.

The trimap's border pixels (unsure annotations) are ignored in loss and
metrics; images are resized whole (aspect ratio not kept), train and test
alike, and metrics are computed at 128x128. Needs tfds `oxford_iiit_pet` as
array_record in data_dir (`tfds build oxford_iiit_pet --file_format=array_record`
on a machine with internet and TensorFlow).

  python train.py --config=configs/segmentation_pets.py --workdir=workdirs/pets
"""

import ml_collections

from configs import segmentation


def get_config() -> ml_collections.ConfigDict:
  config = segmentation.get_config()
  m = config.model
  m.img_size = 128
  m.in_chans = 3
  m.num_classes = 2  # background, pet.
  m.patch_size = 4
  m.embed_dim = 48
  m.num_heads = (3, 6, 12)
  d = config.data
  d.name = 'oxford_iiit_pet'
  d.data_dir = ''  # $TFDS_DATA_DIR or ~/tensorflow_datasets.
  d.image_size = 128
  d.resize_mode = 'resize'
  d.hflip = True
  t = config.train
  t.batch_size = 32
  t.num_epochs = 30.0
  t.warmup_epochs = 2.0
  t.eval_batch_size = 64
  return config
