"""prepare.py writes Fashion-MNIST as tfds does; sources.py opens or explains."""

import collections
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.data.conftest import FASHION_MNIST_SOURCE
from hierarchical_vit.data import prepare
from hierarchical_vit.data import sources


def _rows(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
  """Examples as sortable byte strings, to compare order-free."""
  return sorted(image.tobytes() + bytes([label])
                for image, label in zip(images, labels))


@pytest.mark.parametrize('split,prefix,count,stride', [('train', 'train', 60000, 10),
                                                       ('test', 't10k', 10000, 1)])
def test_prepared_fashion_mnist_equals_idx(fashion_mnist_dir, split, prefix, count, stride):
  """The test split record for record; of the train split (the same code, 6x
  the PNGs to decode: ~20 s), the count and every 10th record."""
  source = tfds.data_source('fashion_mnist', split=split,
                            data_dir=fashion_mnist_dir, download=False)
  assert len(source) == count
  records = source.__getitems__(range(0, count, stride))
  images = np.stack([r['image'] for r in records])
  labels = np.array([r['label'] for r in records])
  assert images.shape == (count // stride, 28, 28, 1) and images.dtype == np.uint8
  idx_images = prepare.read_idx(f'{FASHION_MNIST_SOURCE}/{prefix}-images-idx3-ubyte.gz')
  idx_labels = prepare.read_idx(f'{FASHION_MNIST_SOURCE}/{prefix}-labels-idx1-ubyte.gz')
  expected = _rows(idx_images, idx_labels)
  if stride == 1:
    assert _rows(images[..., 0], labels) == expected
  else:  # A sub-multiset: no record dropped for a copy of another.
    assert not collections.Counter(_rows(images[..., 0], labels)) - collections.Counter(expected)


def test_prepared_layout_matches_upstream(fashion_mnist_dir):
  version_dir = Path(fashion_mnist_dir) / 'fashion_mnist' / '3.0.1'
  assert (version_dir / 'fashion_mnist-train.array_record-00000-of-00001').exists()
  info = tfds.builder('fashion_mnist', data_dir=fashion_mnist_dir).info
  assert info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert {k: v.num_examples for k, v in info.splits.items()} == {
      'train': 60000, 'test': 10000}
  assert info.features['image'].shape == (28, 28, 1)
  assert info.features['label'].names[:2] == ['T-shirt/top', 'Trouser']
  assert info.supervised_keys == ('image', 'label')


def _split_sizes(builder) -> dict[str, int]:
  return {k: v.num_examples for k, v in builder.info.splits.items()}


def test_prepare_reuses_only_a_data_set_of_the_same_limit(tmp_path, capsys,
                                                          monkeypatch):
  args = ['prepare', '--dataset=fashion_mnist', f'--data_dir={tmp_path}',
          f'--source={FASHION_MNIST_SOURCE}', '--limit=20']
  monkeypatch.setattr('sys.argv', args)
  prepare.main()
  assert 'Wrote fashion_mnist/3.0.1' in capsys.readouterr().out
  prepare.main()  # Same limit: reused, and says so.
  out = capsys.readouterr().out
  assert 'Wrote' not in out and 'already prepared' in out
  builder = prepare.prepare('fashion_mnist', tmp_path, FASHION_MNIST_SOURCE,
                            limit=20)
  assert _split_sizes(builder) == {'train': 20, 'test': 20}
  version_dir = str(tmp_path / 'fashion_mnist' / '3.0.1')
  for limit, asked in ((30, '--limit=30'), (None, 'no --limit')):
    with pytest.raises(ValueError, match=re.escape(asked) + '.*Delete '
                       + re.escape(version_dir)):
      prepare.prepare('fashion_mnist', tmp_path, FASHION_MNIST_SOURCE, limit)
  # Refusing left the existing data set as it was.
  assert _split_sizes(tfds.builder('fashion_mnist', data_dir=tmp_path)) == {
      'train': 20, 'test': 20}


def test_read_idx_parses_header(tmp_path):
  data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  header = bytes([0, 0, 8, 3]) + np.array([2, 3, 4], '>u4').tobytes()
  (tmp_path / 'x-idx3-ubyte').write_bytes(header + data.tobytes())
  np.testing.assert_array_equal(prepare.read_idx(tmp_path / 'x-idx3-ubyte'), data)
  (tmp_path / 'cut-idx3-ubyte').write_bytes(header + data.tobytes()[:20])
  with pytest.raises(ValueError, match=r'header gives shape \(2, 3, 4\) \(24 bytes\) but 20 '
                                       r'bytes follow \(truncated\?\)'):
    prepare.read_idx(tmp_path / 'cut-idx3-ubyte')
  (tmp_path / 'y-idx3-ubyte').write_bytes(bytes([0, 0, 9, 3]) + header[4:] + data.tobytes())
  with pytest.raises(ValueError, match='is not a uint8 IDX file'):
    prepare.read_idx(tmp_path / 'y-idx3-ubyte')


def _write_idx(path: Path, array: np.ndarray) -> None:
  header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, '>u4').tobytes()
  path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_images_and_labels_that_do_not_pair_up_are_refused(tmp_path):
  for prefix in ('train', 't10k'):
    _write_idx(tmp_path / f'{prefix}-images-idx3-ubyte', np.zeros((5, 28, 28)))
    _write_idx(tmp_path / f'{prefix}-labels-idx1-ubyte', np.zeros(3))
  with pytest.raises(Exception, match=r'images \(5, 28, 28\) and labels \(3,\) do not pair up'):
    prepare.prepare('fashion_mnist', tmp_path / 'data', tmp_path)


def test_a_prepared_data_set_is_reused_without_its_source(fashion_mnist_dir, tmp_path,
                                                          monkeypatch):
  """README's command re-run on a machine that has data/ but not the Debian
  package: nothing to write, so nothing to read."""
  monkeypatch.setitem(prepare.DEFAULT_SOURCES, 'fashion_mnist', (str(tmp_path / 'none'),))
  reused, wrote = prepare._prepare('fashion_mnist', fashion_mnist_dir, None, None)
  assert not wrote and _split_sizes(reused) == {'train': 60000, 'test': 10000}
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    prepare.prepare('fashion_mnist', tmp_path / 'elsewhere')


@pytest.mark.parametrize('name', ['fashion_mnist', 'mnist', 'cifar10',
                                  'imagenet2012'])
def test_missing_data_is_refused_before_tfds_and_says_how_to_fix(tmp_path, name, monkeypatch):
  def ask_tfds(*args, **kwargs):
    raise AssertionError('tfds was asked: it would look for the data elsewhere (GCS)')
  monkeypatch.setattr(sources.tfds, 'builder', ask_tfds)  # Fast: refused before tfds.
  with pytest.raises(sources.MissingDataError) as error:
    sources.get_builder(name, tmp_path)
  assert isinstance(error.value, FileNotFoundError)
  message = str(error.value)
  assert repr(name) in message and str(tmp_path) in message
  assert sources.prepare_command(name, tmp_path) in message
  if name in ('fashion_mnist', 'mnist'):
    assert f'hierarchical_vit.data.prepare --dataset={name}' in message
  else:
    assert f'tfds build {name}' in message


def test_unknown_dataset_lists_supported(tmp_path):
  with pytest.raises(ValueError, match='cifar100.*imagenet2012'):
    sources.get_builder('svhn', tmp_path)


def test_a_tfrecord_copy_gets_advice_that_works(fashion_mnist_dir, tmp_path):
  """A tfds download (tfrecord) where training looks: tfds will not write
  array_record beside it, so the advice is to move it, not to prepare."""
  import json
  import shutil
  version_dir = tmp_path / 'fashion_mnist' / '3.0.1'
  shutil.copytree(Path(fashion_mnist_dir) / 'fashion_mnist' / '3.0.1', version_dir)
  info = json.loads((version_dir / 'dataset_info.json').read_text())
  info['fileFormat'] = 'tfrecord'
  (version_dir / 'dataset_info.json').write_text(json.dumps(info))
  with pytest.raises(sources.MissingDataError, match=r"stored as tfrecord.*Move '.*fashion_mnist' "
                                                     r'away'):
    sources.get_builder('fashion_mnist', tmp_path)
  with pytest.raises(ValueError, match=r'already holds fashion_mnist in another file format'):
    prepare.prepare('fashion_mnist', tmp_path, FASHION_MNIST_SOURCE)
