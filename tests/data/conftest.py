"""Fixtures: real Fashion-MNIST and small random cifar10 / imagenet2012 on disk."""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from hierarchical_vit.data import prepare

FASHION_MNIST_SOURCE = '/usr/share/datasets/fashion-mnist'
FAKE_SPLITS = {'cifar10': {'train': 64, 'test': 50},
               'imagenet2012': {'train': 24, 'validation': 10}}


@pytest.fixture(scope='session')
def fashion_mnist_dir(tmp_path_factory):
  """A tfds data dir holding the full Fashion-MNIST written by prepare.py."""
  data_dir = tmp_path_factory.mktemp('tfds_fashion_mnist')
  prepare.prepare('fashion_mnist', data_dir, FASHION_MNIST_SOURCE)
  return data_dir


@pytest.fixture(scope='session')
def fake_data_dir(tmp_path_factory):
  """cifar10 and imagenet2012 with random images, written as tfds would.

  On-disk fakes rather than tfds.testing.mock_data: mock_data bypasses the
  files, so it could not exercise the missing-data checks or PNG/JPEG decoding.
  """
  data_dir = tmp_path_factory.mktemp('tfds_fake')
  for name, splits in FAKE_SPLITS.items():
    builder = _fake_builder_cls(name, splits)(data_dir=str(data_dir),
                                             file_format='array_record')
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return data_dir


def _fake_builder_cls(name: str, splits: dict[str, int]):
  """The registered builder of `name`, generating random examples instead."""

  class Fake(tfds.builder_cls(name), skip_registration=True):
    code_path = None  # Nothing to download, so no checksums file.

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate(n, seed)
              for seed, (split, n) in enumerate(splits.items())}

    def _generate(self, n, seed):
      rng = np.random.default_rng(seed)
      features = self.info.features
      for i in range(n):
        yield i, {key: _random_value(features[key], rng, i) for key in features}

  Fake.name = name
  return Fake


def _random_value(feature, rng, index):
  if isinstance(feature, tfds.features.Image):
    h, w, c = feature.shape
    shape = (h or rng.integers(40, 90), w or rng.integers(40, 90), c)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=feature.encoding_format or 'png')
    return buffer.getvalue()
  if isinstance(feature, tfds.features.ClassLabel):
    return int(rng.integers(feature.num_classes))
  return f'example_{index}'
