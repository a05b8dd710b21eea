"""The input pipeline the training loop uses: tfds array_record + grain.

    info = get_dataset_info(config.data)
    train_iter = create_train_iterator(config.data, global_batch_size=128,
                                       seed=config.seed,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
    batch = next(train_iter)  # {'image': f32 (b, H, W, C), 'label': i32 (b,)}
    for batch in create_eval_iterator(config.data, batch_size=256, ...):
      ...                     # plus 'mask': bool (b,), False on padding

`task='segmentation'` (all three functions) reads per-pixel labels instead:
'label' is int32 (b, H, W), class ids or IGNORE_INDEX (see SEGMENTATION_LABELS
for the data sets that have them). Geometry (resize, crop, flip) moves image
and label map together; augmentations that would change what a pixel shows
(augment, random_erasing, mixup, cutmix) are refused.

The train iterator is a `grain.DataLoaderIterator`: checkpoint it with orbax
through `grain.checkpoint.CheckpointSave(iterator)` /
`grain.checkpoint.CheckpointRestore(iterator)` (handler
`grain.checkpoint.CheckpointHandler`), or get_state() / set_state() directly.
Mixup / cutmix run on device afterwards: see `mixing.mix_batch`.
"""

import dataclasses
import json
import math
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator

from absl import flags
import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from hierarchical_vit.data import canvas
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


@dataclasses.dataclass(frozen=True)
class SegmentationLabels:
  """A data set's per-pixel classes, read from its 'segmentation_mask'.

  lookup maps stored mask values to class ids (IGNORE_INDEX: no label);
  None means the stored values are the class ids.
  """
  class_names: tuple[str, ...]
  lookup: tuple[int, ...] | None = None


_IGNORE = transforms.IGNORE_INDEX
SEGMENTATION_LABELS: dict[str, SegmentationLabels] = {
    'fashion_mnist_canvas': SegmentationLabels(canvas.CLASS_NAMES),
    # Trimap 1 = pet, 2 = background, 3 = border (unsure, ignored); 0 unused.
    # The 37 breeds are the image-level 'label', not part of the mask.
    'oxford_iiit_pet': SegmentationLabels(('background', 'pet'),
                                          (_IGNORE, 1, 0, _IGNORE)),
}


def get_dataset_info(data_config: ml_collections.ConfigDict,
                     task: str = 'classification') -> DatasetInfo:
  """Reads the metadata of config.data's data set (MissingDataError if absent).

  num_classes / class_names are those of `task`'s labels: image classes, or
  per-pixel classes for segmentation.
  """
  builder = sources.get_builder(data_config.name, data_config.data_dir)
  info = builder.info
  for field in ('train_split', 'eval_split'):
    _check_split(info, data_config[field], f'data.{field}')
  class_names = _task(task).class_names(data_config.name, info)
  channels = info.features['image'].shape[-1]
  return DatasetInfo(
      name=data_config.name,
      num_classes=len(class_names),
      num_train_examples=info.splits[data_config.train_split].num_examples,
      num_eval_examples=info.splits[data_config.eval_split].num_examples,
      image_shape=(data_config.image_size, data_config.image_size, channels),
      class_names=class_names,
  )


def check_preprocessing(data_config: ml_collections.ConfigDict,
                        task: str = 'classification') -> None:
  """Builds `task`'s train and eval transforms, whose constructors check
  data.resize_mode, augment, randaugment_*, crop_padding, mean and std: a
  bad value fails before a run writes its workdir and builds its model, not
  when its first batch is read. (Classification of variable-size data, whose
  crops decide the size, ignores resize_mode and crop_padding.)"""
  info = sources.get_builder(data_config.name, data_config.data_dir).info
  task_data = _task(task)
  task_data.train_ops(data_config, info)
  task_data.eval_ops(data_config, info)


def check_split(data_config: ml_collections.ConfigDict, split: str, field: str) -> None:
  """ValueError naming `field` unless `split` (a tfds split, slices such as
  'train[:90%]' included) exists in config.data's prepared data set."""
  _check_split(sources.get_builder(data_config.name, data_config.data_dir).info, split, field)


def _check_split(info: tfds.core.DatasetInfo, split: str, field: str) -> None:
  try:
    info.splits[split]
  except (KeyError, ValueError) as error:
    # tfds' message lists the valid splits (or says how a slice is wrong).
    raise ValueError(f'{field}={split!r} is not a split of {info.name!r}: {error}') from None


def create_train_iterator(data_config: ml_collections.ConfigDict, *,
                          global_batch_size: int, seed: int,
                          process_index: int = 0,
                          process_count: int = 1,
                          task: str = 'classification'
                          ) -> grain.DataLoaderIterator:
  """An endless, checkpointable iterator over this process's training batches.

  Each process reads a disjoint shard of the train split, reshuffled every
  epoch. Batches (which examples, in which order, with which augmentation)
  depend only on `seed` and the sharding, not on data.num_workers (see
  _SameBatchesForAnyWorkers). grain seeds the augmentation of the i-th
  example read with seed + i, so seeds s and s + 1 draw the same random
  numbers one position apart (on differently shuffled examples): seeds of a
  sweep are replicates of the data order more than of the augmentation.

  Returns:
    An iterator of {'image': float32 (b, H, W, C), 'label': int32 (b,)} (for
    segmentation 'label' is int32 (b, H, W)) with
    b = global_batch_size // process_count; it has get_state() / set_state().
  """
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible '
                     f'by process_count {process_count}.')
  task_data = _task(task)
  builder = sources.get_builder(data_config.name, data_config.data_dir)
  source = task_data.records(
      builder.as_data_source(split=data_config.train_split), data_config.name)
  shard_options = grain.sharding.ShardOptions(
      shard_index=process_index, shard_count=process_count, drop_remainder=True)
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=shard_options,
      shuffle=True, num_epochs=None, seed=seed)
  batch_size = global_batch_size // process_count
  if data_config.num_workers > 1:
    sampler = _SameBatchesForAnyWorkers(sampler, shard_options, data_config.num_workers,
                                        batch_size)
  operations = task_data.train_ops(data_config, builder.info) + [
      grain.transforms.Batch(batch_size, drop_remainder=True)]
  return iter(_loader(source, sampler, operations, data_config.num_workers, shard_options))


class _SameBatchesForAnyWorkers:
  """A train sampler whose batches are the single-process loader's for W workers.

  grain gives worker w of W the positions w, w + W, w + 2W, ... of this
  process's stream (process p of P reads the sampler's positions p + P m) and
  batches inside each worker, handing the batches out by worker in turn: batch
  j comes from worker j % W. Left alone, a batch would gather every W-th
  example. This sampler permutes each block of W * b positions so that worker
  w's k-th batch reads what positions (k W + w) b ... (k W + w + 1) b - 1 hold
  without workers: the same examples, in the same order, with the same
  augmentation draws (grain seeds them by position; each record keeps its
  unpermuted position's seed).
  """

  def __init__(self, sampler, shard_options: grain.sharding.ShardOptions, workers: int,
               batch_size: int):
    self._sampler = sampler
    self._process_index = shard_options.shard_index
    self._process_count = shard_options.shard_count
    self._workers, self._batch_size = workers, batch_size

  def __len__(self) -> int:
    return len(self._sampler)

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    m = (index - self._process_index) // self._process_count  # This process's m-th.
    worker, read = m % self._workers, m // self._workers
    k, i = divmod(read, self._batch_size)  # The worker's k-th batch, its i-th example.
    unpermuted = (k * self._workers + worker) * self._batch_size + i
    metadata = self._sampler[self._process_index + self._process_count * unpermuted]
    return dataclasses.replace(metadata, index=index)

  def __repr__(self) -> str:
    return (f'_SameBatchesForAnyWorkers({self._sampler!r}, workers={self._workers}, '
            f'batch_size={self._batch_size})')


def seek_train_iterator(iterator: grain.DataLoaderIterator, batches: int, batch_size: int,
                        process_index: int = 0, process_count: int = 1) -> None:
  """Moves a fresh create_train_iterator iterator (same process layout) to
  where it stands after `batches` batches of `batch_size`, without reading them.

  For a resume under another process count, whose saved per-process positions
  do not apply: each process continues its own shard at the same position in
  the epoch, so the rest of that epoch follows the new shards' orders (some
  examples repeat, others are skipped, until the epoch ends).
  """
  state = json.loads(iterator.get_state())  # grain's state is JSON bytes.
  workers = state['worker_count']
  # grain's sampler gives process p the indices p, p + P, p + 2P, ...; with W
  # workers, worker w reads every W-th of those from the w-th on, one batch per
  # worker in turn. last_seen_indices are each worker's last index read.
  if workers == 0:
    seen = {'0': process_index + process_count * (batches * batch_size - 1)}
    last_worker = -1
  else:
    seen = {}
    for w in range(workers):
      read = (batches // workers + (w < batches % workers)) * batch_size
      seen[str(w)] = process_index + process_count * (w + workers * (read - 1))
    last_worker = (batches - 1) % workers
  iterator.set_state(json.dumps(
      {**state, 'last_seen_indices': seen, 'last_worker_index': last_worker}).encode())


def create_eval_iterator(data_config: ml_collections.ConfigDict, *,
                         batch_size: int, split: str | None = None,
                         process_index: int = 0,
                         process_count: int = 1,
                         task: str = 'classification',
                         margin: int = 0) -> grain.DataLoader:
  """One pass over an eval split in fixed-size, masked batches.

  Process i reads the i-th contiguous 1/process_count of the split. Every
  process yields the same number of batches (so collectives line up), a
  multiple of max(data.num_workers, 1); padding entries repeat a real example
  with mask False, so across processes each example has mask True exactly
  once. Iterating again makes another pass.

  margin > 0 (classification only) widens each image to H + 2 margin pixels
  per side, at the scale of the usual view, which is its centre: the context
  that shifted crops of the view are taken from (shift_consistency).

  Yields:
    {'image': float32 (batch_size, H, W, C), 'label': int32 (batch_size,)
     (segmentation: (batch_size, H, W)), 'mask': bool (batch_size,)}.
  """
  if batch_size < 1:
    raise ValueError(f'eval batch_size={batch_size} must be >= 1')
  split = split or data_config.eval_split
  task_data = _task(task)
  builder = sources.get_builder(data_config.name, data_config.data_dir)
  split_source = task_data.records(builder.as_data_source(split=split),
                                   data_config.name)
  per_process = math.ceil(len(split_source) / process_count)
  start = min(process_index * per_process, len(split_source))
  stop = min(start + per_process, len(split_source))
  # grain batches inside each worker, and worker w reads records w, w + W, ...:
  # only a whole number of batches per worker keeps every batch full (the
  # extra batches are all padding).
  workers = max(data_config.num_workers, 1)
  num_batches = math.ceil(per_process / (batch_size * workers)) * workers
  source = _PaddedRange(split_source, start, stop, num_batches * batch_size)
  sampler = grain.samplers.IndexSampler(num_records=len(source), shuffle=False,
                                        num_epochs=1)
  operations = task_data.eval_ops(data_config, builder.info, margin) + [
      grain.transforms.Batch(batch_size)]
  return _loader(source, sampler, operations, data_config.num_workers)


def iter_eval_examples(data_config: ml_collections.ConfigDict, split: str, count: int,
                       margin: int = 0, task: str = 'classification', batch_size: int = 500
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The first `count` eval-preprocessed examples of a split, in order, as
  (images, labels) chunks of at most batch_size (see load_eval_examples): for
  analyses whose examples would not fit in memory at once. Read in this
  process: grain workers would interleave records."""
  if count < 1:
    raise ValueError(f'count={count} examples must be >= 1')
  in_order = data_config.copy_and_resolve_references()
  in_order.num_workers = 0
  left = count
  for batch in create_eval_iterator(in_order, batch_size=min(count, batch_size), split=split,
                                    task=task, margin=margin):
    images, labels = batch['image'][batch['mask']][:left], batch['label'][batch['mask']][:left]
    if len(images):
      yield images, labels
    left -= len(images)
    if left <= 0 or not batch['mask'].all():  # A padded batch is the split's last.
      return


def load_eval_examples(data_config: ml_collections.ConfigDict, split: str, count: int,
                       margin: int = 0, task: str = 'classification'
                       ) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` eval-preprocessed examples of a split, in order, in
  memory, for analyses: images float32 (n, H + 2 margin, W + 2 margin, C)
  (margin: see create_eval_iterator) and the task's labels, int32 (n,) or
  (n, H, W), n = min(count, split size)."""
  chunks = list(iter_eval_examples(data_config, split, count, margin, task))
  return (np.concatenate([images for images, _ in chunks]),
          np.concatenate([labels for _, labels in chunks]))


def _loader(source, sampler, operations, num_workers: int,
            shard_options: grain.sharding.ShardOptions | None = None) -> grain.DataLoader:
  """shard_options=None: the sampler's own (an IndexSampler's)."""
  if num_workers and not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside absl.app (tests,
    # notebooks) they would be unparsed and every worker would fail.
    flags.FLAGS.mark_as_parsed()
  return grain.DataLoader(data_source=source, sampler=sampler,
                          operations=operations, worker_count=num_workers,
                          shard_options=shard_options, read_options=_READ_OPTIONS)


def _variable_size(info: tfds.core.DatasetInfo) -> bool:
  """Whether images vary in size (ImageNet), needing crops instead of padding."""
  return None in info.features['image'].shape


def _mean_std(data_config: ml_collections.ConfigDict,
              info: tfds.core.DatasetInfo
              ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """data.mean / data.std, each () meaning the data set's default."""
  channels = info.features['image'].shape[-1]
  valid = ' or '.join(map(str, sorted({1, channels})))
  values = []
  for field, default in zip(('mean', 'std'),
                            transforms.MEAN_STD[data_config.name]):
    value = tuple(data_config[field])
    # normalize() broadcasts: a wrong length would silently change the
    # number of channels the model sees.
    if value and len(value) not in (1, channels):
      raise ValueError(
          f'data.{field}={value!r} has {len(value)} values; expected {valid} '
          f'(one per image channel of {data_config.name!r}, or one for all).')
    values.append(value or default)
  return tuple(values)


def _train_ops(data_config: ml_collections.ConfigDict,
               info: tfds.core.DatasetInfo
               ) -> list[grain.transforms.Transformation]:
  size = data_config.image_size
  if _variable_size(info):
    # The Inception crop already randomizes position and scale.
    ops = [transforms.RandomResizedCrop(size),
           transforms.CropFlip(padding=0, hflip=data_config.hflip)]
  else:
    ops = [transforms.ToSize(size, data_config.resize_mode),
           transforms.CropFlip(data_config.crop_padding, data_config.hflip)]
  mean, std = _mean_std(data_config, info)
  if data_config.augment:
    ops.append(transforms.AutoAugment(data_config.augment,
                                      data_config.randaugment_num_ops,
                                      data_config.randaugment_magnitude,
                                      data_config.randaugment_prob,
                                      data_config.randaugment_magnitude_std,
                                      tuple(min(255, round(255 * m)) for m in mean)))
  ops.append(transforms.Normalize(mean, std))
  if data_config.random_erasing > 0:
    ops.append(transforms.RandomErasing(data_config.random_erasing))
  return ops


def _eval_ops(data_config: ml_collections.ConfigDict,
              info: tfds.core.DatasetInfo, margin: int = 0
              ) -> list[grain.transforms.Transformation]:
  size = data_config.image_size
  view = size + 2 * margin
  if _variable_size(info):
    # The resize of the plain view (shorter side to size / CROP_FRACTION),
    # then its centre crop `margin` pixels wider each side.
    room = (math.floor(size / transforms.CROP_FRACTION) - size) // 2
    if margin > room:
      raise ValueError(
          f'margin={margin} is too large for data.image_size={size}: the resized image '
          f'has at most {room} pixels each side of the view.')
    resize = [transforms.CentreCrop(size, transforms.CROP_FRACTION, margin)]
  elif margin:
    if data_config.resize_mode != 'pad':
      raise ValueError(f'margin={margin} needs data.resize_mode=\'pad\' (a resize would '
                       f'change the scale); got {data_config.resize_mode!r}.')
    resize = [transforms.ZeroBorder(margin), transforms.ToSize(view, 'pad')]
  else:
    resize = [transforms.ToSize(size, data_config.resize_mode)]
  return resize + [transforms.Normalize(*_mean_std(data_config, info))]


def _segmentation_train_ops(data_config: ml_collections.ConfigDict,
                            info: tfds.core.DatasetInfo
                            ) -> list[grain.transforms.Transformation]:
  """Joint geometry only: photometric ops and erasing would need label rules."""
  # No joint Inception crop: variable-size images go through ToSize too, so
  # 'pad' centre-crops (or pads) them and 'resize' squashes them whole.
  # (mixup / cutmix run on device: tasks.py refuses them.)
  for field, off in (('augment', ''), ('random_erasing', 0.0)):
    if data_config[field]:
      raise ValueError(
          f'data.{field}={data_config[field]!r} is not supported for task '
          f"'segmentation'; valid: {off!r}.")
  return [transforms.ToSize(data_config.image_size, data_config.resize_mode,
                            dense_label=True),
          transforms.CropFlip(data_config.crop_padding, data_config.hflip,
                              dense_label=True),
          transforms.Normalize(*_mean_std(data_config, info),
                               dense_label=True)]


def _segmentation_eval_ops(data_config: ml_collections.ConfigDict,
                           info: tfds.core.DatasetInfo, margin: int = 0
                           ) -> list[grain.transforms.Transformation]:
  """Metrics are computed at image_size x image_size, after ToSize."""
  if margin:
    raise ValueError(f"margin={margin} is not supported for task 'segmentation'; valid: 0.")
  return [transforms.ToSize(data_config.image_size, data_config.resize_mode,
                            dense_label=True),
          transforms.Normalize(*_mean_std(data_config, info),
                               dense_label=True)]


def _classification_names(name: str,
                          info: tfds.core.DatasetInfo) -> tuple[str, ...]:
  if 'label' not in info.features:
    raise ValueError(
        f"data.name={name!r} has no image-level 'label' for task "
        f"'classification'; its features: {sorted(info.features)}.")
  return tuple(info.features['label'].names)


def _segmentation_names(name: str,
                        info: tfds.core.DatasetInfo) -> tuple[str, ...]:
  del info
  return _segmentation_labels(name).class_names


def _segmentation_labels(name: str) -> SegmentationLabels:
  if name not in SEGMENTATION_LABELS:
    raise ValueError(
        f"data.name={name!r} has no segmentation masks for task "
        f"'segmentation'; valid choices: {sorted(SEGMENTATION_LABELS)}.")
  return SEGMENTATION_LABELS[name]


_Ops = list[grain.transforms.Transformation]
# (data config, tfds info) and, for eval, the margin (create_eval_iterator).
_TrainOps = Callable[[ml_collections.ConfigDict, tfds.core.DatasetInfo], _Ops]
_EvalOps = Callable[[ml_collections.ConfigDict, tfds.core.DatasetInfo, int], _Ops]


@dataclasses.dataclass(frozen=True)
class _TaskData:
  """How one task reads records and preprocesses them."""
  # (split source, data set name) -> a source of {'image', 'label'}.
  records: Callable[[object, str], object]
  # (data set name, tfds info) -> the names of the task's classes.
  class_names: Callable[[str, tfds.core.DatasetInfo], tuple[str, ...]]
  train_ops: _TrainOps
  eval_ops: _EvalOps


class _Records:
  """Base of the task sources, which grain pickles into its worker processes.

  Unpickled in a worker's main thread (data.num_workers > 0), it makes the
  worker ignore SIGTERM: schedulers signal a whole process group (SLURM's
  --signal and scancel, a VM's shutdown), and the trainer still needs batches
  until the step at which its processes agree to save (up to
  _PreemptionFlag.poll_every_steps later). grain stops its workers itself: a
  stop event, then SIGKILL. A worker still starting (importing the main
  module, a few seconds after the first batch is asked of a loader) has not
  run this yet, and SIGTERM kills it: the run then fails and resumes from its
  last checkpoint. grain spawns its workers from its own threads and takes no
  initializer, and a spawned process inherits only an ignored disposition (not
  a blocked mask), so nothing can ignore the signal for it any earlier.
  """

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    if (multiprocessing.parent_process() is not None
        and threading.current_thread() is threading.main_thread()):
      signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _ImageLabel(_Records):
  """A source's records reduced to {'image', 'label'} (drops e.g. file names)."""

  def __init__(self, source, name: str):
    del name  # Image-level labels need no per-data-set mapping.
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = self._source[index]
    return {'image': record['image'], 'label': record['label']}

  def __repr__(self) -> str:
    # grain compares repr(data_source) on restore: must name the data.
    return f'_ImageLabel({self._source!r})'


class _ImageMask(_Records):
  """Records as {'image', 'label': uint8 (H, W, 1) class ids or IGNORE_INDEX}."""

  def __init__(self, source, name: str):
    self._source = source
    lookup = _segmentation_labels(name).lookup
    self._lookup = None if lookup is None else np.asarray(lookup, np.uint8)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = self._source[index]
    mask = record['segmentation_mask']
    return {'image': record['image'],
            'label': mask if self._lookup is None else self._lookup[mask]}

  def __repr__(self) -> str:
    return f'_ImageMask({self._source!r})'


_TASKS = {
    'classification': _TaskData(_ImageLabel, _classification_names,
                                _train_ops, _eval_ops),
    'segmentation': _TaskData(_ImageMask, _segmentation_names,
                              _segmentation_train_ops, _segmentation_eval_ops),
}


def _task(task: str) -> _TaskData:
  if task not in _TASKS:
    raise ValueError(f'task={task!r} is not valid; valid choices: '
                     f'{sorted(_TASKS)}.')
  return _TASKS[task]


class _PaddedRange:
  """Records [start, stop) of a task's source, padded to `length` (mask False)."""

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
    return {**record, 'mask': np.bool_(mask)}

  def __repr__(self) -> str:
    return (f'_PaddedRange({self._source!r}, {self._start}, {self._stop}, '
            f'{self._length})')
