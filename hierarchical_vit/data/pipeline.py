"""The input pipeline the training loop uses: tfds array_record + grain.

    info = get_dataset_info(config.data)
    train_iter = create_train_iterator(config.data, global_batch_size=128,
                                       seed=config.seed,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
    batch = next(train_iter)  # {'image': f32 (b, H, W, C), 'label': i32 (b,)}
    for batch in create_eval_iterator(config.data, batch_size=256, ...):
      ...                     # plus 'mask': bool (b,), False on padding

The train iterator is a `grain.DataLoaderIterator`: checkpoint it with orbax
through `grain.checkpoint.CheckpointSave(iterator)` /
`grain.checkpoint.CheckpointRestore(iterator)` (handler
`grain.checkpoint.CheckpointHandler`), or get_state() / set_state() directly.
Mixup / cutmix run on device afterwards: see `mixing.mix_batch`.
"""

import dataclasses
import math

from absl import flags
import grain
import ml_collections
import numpy as np

from hierarchical_vit.data import sources
from hierarchical_vit.data import transforms

# grain's defaults (16 threads, 500 prefetched records) halve throughput on
# small images: every element scans the whole prefetch buffer, under the GIL.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)

@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the loop need to know about a data set.

  image_shape is (H, W, C) after preprocessing, i.e. what batches contain.
  """
  name: str
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]


def get_dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
  """Reads the metadata of config.data's data set (MissingDataError if absent)."""
  info = sources.get_builder(data_config.name, data_config.data_dir).info
  channels = info.features['image'].shape[-1]
  return DatasetInfo(
      name=data_config.name,
      num_classes=info.features['label'].num_classes,
      num_train_examples=info.splits[data_config.train_split].num_examples,
      num_eval_examples=info.splits[data_config.eval_split].num_examples,
      image_shape=(data_config.image_size, data_config.image_size, channels),
      class_names=tuple(info.features['label'].names),
  )


def create_train_iterator(data_config: ml_collections.ConfigDict, *,
                          global_batch_size: int, seed: int,
                          process_index: int = 0,
                          process_count: int = 1) -> grain.DataLoaderIterator:
  """An endless, checkpointable iterator over this process's training batches.

  Each process reads a disjoint shard of the train split, reshuffled every
  epoch; order and augmentation depend only on `seed`.

  Returns:
    An iterator of {'image': float32 (b, H, W, C), 'label': int32 (b,)} with
    b = global_batch_size // process_count; it has get_state() / set_state().
  """
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible '
                     f'by process_count {process_count}.')
  source = _ImageLabel(sources.open_split(
      data_config.name, data_config.train_split, data_config.data_dir))
  sampler = grain.samplers.IndexSampler(
      num_records=len(source),
      shard_options=grain.sharding.ShardOptions(
          shard_index=process_index, shard_count=process_count,
          drop_remainder=True),
      shuffle=True, num_epochs=None, seed=seed)
  operations = _train_ops(data_config, _variable_size(data_config)) + [
      grain.transforms.Batch(global_batch_size // process_count,
                             drop_remainder=True)]
  return iter(_loader(source, sampler, operations, data_config.num_workers))


def create_eval_iterator(data_config: ml_collections.ConfigDict, *,
                         batch_size: int, split: str | None = None,
                         process_index: int = 0,
                         process_count: int = 1) -> grain.DataLoader:
  """One pass over an eval split in fixed-size, masked batches.

  Process i reads the i-th contiguous 1/process_count of the split. Every
  process yields the same number of batches (so collectives line up); padding
  entries repeat a real example with mask False, so across processes each
  example has mask True exactly once. Iterating again makes another pass.

  Yields:
    {'image': float32 (batch_size, H, W, C), 'label': int32 (batch_size,),
     'mask': bool (batch_size,)}.
  """
  split = split or data_config.eval_split
  split_source = sources.open_split(data_config.name, split,
                                    data_config.data_dir)
  per_process = math.ceil(len(split_source) / process_count)
  start = min(process_index * per_process, len(split_source))
  stop = min(start + per_process, len(split_source))
  num_batches = math.ceil(per_process / batch_size)
  source = _PaddedRange(split_source, start, stop, num_batches * batch_size)
  sampler = grain.samplers.IndexSampler(num_records=len(source), shuffle=False,
                                        num_epochs=1)
  operations = _eval_ops(data_config, _variable_size(data_config)) + [
      grain.transforms.Batch(batch_size)]
  return _loader(source, sampler, operations, data_config.num_workers)


def _loader(source, sampler, operations, num_workers: int) -> grain.DataLoader:
  if num_workers and not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside absl.app (tests,
    # notebooks) they would be unparsed and every worker would fail.
    flags.FLAGS.mark_as_parsed()
  return grain.DataLoader(data_source=source, sampler=sampler,
                          operations=operations, worker_count=num_workers,
                          read_options=_READ_OPTIONS)


def _variable_size(data_config: ml_collections.ConfigDict) -> bool:
  """Whether images vary in size (ImageNet), needing crops instead of padding."""
  info = sources.get_builder(data_config.name, data_config.data_dir).info
  return None in info.features['image'].shape


def _mean_std(data_config: ml_collections.ConfigDict
              ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  default_mean, default_std = transforms.MEAN_STD[data_config.name]
  return (tuple(data_config.mean) or default_mean,
          tuple(data_config.std) or default_std)


def _train_ops(data_config: ml_collections.ConfigDict,
               variable_size: bool) -> list[grain.transforms.Transformation]:
  size = data_config.image_size
  if variable_size:
    # The Inception crop already randomizes position and scale.
    ops = [transforms.RandomResizedCrop(size),
           transforms.CropFlip(padding=0, hflip=data_config.hflip)]
  else:
    ops = [transforms.ToSize(size, data_config.resize_mode),
           transforms.CropFlip(data_config.crop_padding, data_config.hflip)]
  if data_config.augment:
    ops.append(transforms.AutoAugment(data_config.augment,
                                      data_config.randaugment_num_ops,
                                      data_config.randaugment_magnitude))
  ops.append(transforms.Normalize(*_mean_std(data_config)))
  if data_config.random_erasing > 0:
    ops.append(transforms.RandomErasing(data_config.random_erasing))
  return ops


def _eval_ops(data_config: ml_collections.ConfigDict,
              variable_size: bool) -> list[grain.transforms.Transformation]:
  size = data_config.image_size
  resize = (transforms.CentreCrop(size) if variable_size else
            transforms.ToSize(size, data_config.resize_mode))
  return [resize, transforms.Normalize(*_mean_std(data_config))]


class _ImageLabel:
  """A source's records reduced to {'image', 'label'} (drops e.g. file names)."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = self._source[index]
    return {'image': record['image'], 'label': record['label']}

  def __repr__(self) -> str:
    # grain compares repr(data_source) on restore: must name the data.
    return f'_ImageLabel({self._source!r})'


class _PaddedRange:
  """Records [start, stop) of a source, padded to `length` with mask False."""

  def __init__(self, source, start: int, stop: int, length: int):
    self._source = source
    self._start, self._stop, self._length = start, stop, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict:
    position = self._start + index
    mask = position < self._stop
    # Padding repeats a real record so that it preprocesses like the others.
    record = self._source[position if mask else min(self._start,
                                                    len(self._source) - 1)]
    return {'image': record['image'], 'label': record['label'],
            'mask': np.bool_(mask)}

  def __repr__(self) -> str:
    return (f'_PaddedRange({self._source!r}, {self._start}, {self._stop}, '
            f'{self._length})')
