"""The public pipeline: shapes, determinism, checkpoints, sharding, eval masks."""

import itertools
import re
import subprocess
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
import tensorflow_datasets as tfds
from tests.conftest import REPO, prepare_slice

from configs import base
from configs import segmentation
from hierarchical_vit import data
from hierarchical_vit.data import sources, transforms
from hierarchical_vit.training import tasks


def _config(data_dir, name='fashion_mnist', **overrides):
  config = base.get_data_config()
  config.name = name
  config.data_dir = str(data_dir)
  config.update(overrides)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  for a, b in zip(batches_a, batches_b, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_dataset_info(fashion_mnist_dir):
  info = data.get_dataset_info(_config(fashion_mnist_dir))
  assert info == data.DatasetInfo(
      name='fashion_mnist', num_classes=10, num_train_examples=60000,
      num_eval_examples=10000, image_shape=(32, 32, 1),
      class_names=info.class_names)
  assert info.class_names[-1] == 'Ankle boot'


def test_fashion_mnist_train_batches(fashion_mnist_dir):
  iterator = data.create_train_iterator(
      _config(fashion_mnist_dir, augment='randaugment', random_erasing=0.5),
      global_batch_size=32, seed=0)
  batch = next(iterator)
  assert batch['image'].shape == (32, 32, 32, 1)
  assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
  assert 0 <= batch['label'].min() and batch['label'].max() < 10
  # Normalized: roughly zero mean, unit variance.
  assert abs(batch['image'].mean()) < 0.5 and 0.5 < batch['image'].std() < 1.5


def test_same_seed_same_batches_other_seed_differs(fashion_mnist_dir):
  config = _config(fashion_mnist_dir, augment='trivial_augment')
  first = _take(data.create_train_iterator(config, global_batch_size=16, seed=3), 3)
  again = _take(data.create_train_iterator(config, global_batch_size=16, seed=3), 3)
  other = _take(data.create_train_iterator(config, global_batch_size=16, seed=4), 1)
  _assert_same(first, again)
  assert not np.array_equal(first[0]['image'], other[0]['image'])


@pytest.mark.parametrize('num_workers', [0, 2])
def test_get_state_set_state_resumes_exactly(fake_data_dir, num_workers):
  config = _config(fake_data_dir, 'cifar10', augment='randaugment',
                   random_erasing=0.5, num_workers=num_workers)
  iterator = data.create_train_iterator(config, global_batch_size=8, seed=0)
  # 5 x 8 = 40 of the 64-example epoch: the 6 batches compared below cross
  # into the reshuffled second epoch.
  _take(iterator, 5)
  state = iterator.get_state()
  expected = _take(iterator, 6)
  restored = data.create_train_iterator(config, global_batch_size=8, seed=0)
  restored.set_state(state)
  _assert_same(_take(restored, 6), expected)


def test_orbax_checkpoint_roundtrip(fake_data_dir, tmp_path):
  config = _config(fake_data_dir, 'cifar10')
  iterator = data.create_train_iterator(config, global_batch_size=8, seed=0)
  _take(iterator, 3)
  with ocp.CheckpointManager(
      tmp_path / 'ckpt',
      item_handlers={'data': grain.checkpoint.CheckpointHandler()}) as manager:
    manager.save(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = _take(iterator, 4)
    restored = data.create_train_iterator(config, global_batch_size=8, seed=0)
    manager.restore(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(restored)))
  _assert_same(_take(restored, 4), expected)


def _image_keys(batches):
  return [b['image'][i].tobytes() for b in batches for i in range(len(b['label']))]


def test_processes_read_disjoint_shards(fake_data_dir):
  config = _config(fake_data_dir, 'cifar10', crop_padding=0, hflip=False)
  shards = [_image_keys(_take(data.create_train_iterator(
      config, global_batch_size=16, seed=0, process_index=i, process_count=2), 4))
            for i in range(2)]
  # 64 examples, 2 processes, 8 per batch: 4 batches are one epoch of a shard.
  assert len(set(shards[0])) == len(set(shards[1])) == 32
  assert not set(shards[0]) & set(shards[1])


def test_batch_size_must_divide(fake_data_dir):
  with pytest.raises(ValueError, match='divisible'):
    data.create_train_iterator(_config(fake_data_dir, 'cifar10'),
                               global_batch_size=10, seed=0, process_count=3)


@pytest.mark.parametrize('field, value, message', [
    ('augment', 'autoaugment',
     r"data.augment='autoaugment' is not valid; valid choices: \['randaugment', "
     r"'randaugment_timm', 'trivial_augment', 'trivial_augment_wide'\], or '' \(off\)"),
    ('resize_mode', 'crop',
     r"data.resize_mode='crop' is not valid; valid choices: \['pad', 'resize'\]"),
])
def test_bad_choices_fail_when_the_pipeline_is_built(fake_data_dir, field, value, message):
  # Not per example inside a grain worker, where the message gets buried.
  with pytest.raises(ValueError, match=message):
    data.create_train_iterator(_config(fake_data_dir, 'cifar10', **{field: value}),
                               global_batch_size=8, seed=0)


@pytest.mark.parametrize('field, value, valid', [
    ('randaugment_num_ops', -1, 'an integer >= 0'),
    ('randaugment_magnitude', -5, 'a number in [0, 10]'),
    ('crop_padding', -2, 'an integer >= 0'),
])
def test_bad_augmentation_values_fail_when_the_pipeline_is_built(
    fake_data_dir, field, value, valid):
  config = _config(fake_data_dir, 'cifar10', augment='randaugment',
                   **{field: value})
  with pytest.raises(ValueError, match=re.escape(
      f'data.{field}={value!r} is not valid; valid: {valid}')):
    data.create_train_iterator(config, global_batch_size=8, seed=0)


@pytest.mark.parametrize('field', ['mean', 'std'])
def test_mean_std_must_match_the_image_channels(fashion_mnist_dir, field):
  # ImageNet statistics on 1-channel images would broadcast to 3 channels.
  config = _config(fashion_mnist_dir, **{field: (0.485, 0.456, 0.406)})
  message = (f'data.{field}=(0.485, 0.456, 0.406) has 3 values; expected 1 '
             "(one per image channel of 'fashion_mnist', or one for all)")
  for create in (
      lambda: data.create_train_iterator(config, global_batch_size=8, seed=0),
      lambda: data.create_eval_iterator(config, batch_size=8)):
    with pytest.raises(ValueError, match=re.escape(message)):
      create()


def test_one_mean_std_value_serves_all_channels(fake_data_dir):
  config = _config(fake_data_dir, 'cifar10', mean=(0.5,), std=(0.25,))
  batch = next(iter(data.create_eval_iterator(config, batch_size=8)))
  assert batch['image'].shape == (8, 32, 32, 3)


# With grain workers, one case (uneven shards): each process's iterator starts
# its own worker processes, ~10 s a case on 2 cores.
@pytest.mark.parametrize('process_count,batch_size,num_workers',
                         [(1, 8, 0), (3, 8, 0), (4, 50, 0), (3, 8, 2)])
def test_eval_sees_every_example_once(fake_data_dir, process_count, batch_size,
                                      num_workers):
  # grain batches inside each worker: without care the last ones come out short.
  config = _config(fake_data_dir, 'cifar10', num_workers=num_workers)
  runs = [list(data.create_eval_iterator(config, batch_size=batch_size,
                                         process_index=i,
                                         process_count=process_count))
          for i in range(process_count)]
  assert len({len(batches) for batches in runs}) == 1  # Same step count.
  masked = [b['image'][i].tobytes() for batches in runs for b in batches
            for i in np.nonzero(b['mask'])[0]]
  all_batches = list(itertools.chain(*runs))
  assert all(b['image'].shape == (batch_size, 32, 32, 3) for b in all_batches)
  assert all(b['mask'].dtype == np.bool_ for b in all_batches)
  reference = list(data.create_eval_iterator(
      _config(fake_data_dir, 'cifar10'), batch_size=50))[0]
  assert sorted(masked) == sorted(_image_keys([reference]))


def test_imagenet_train_and_eval(fake_data_dir):
  config = _config(fake_data_dir, 'imagenet2012', image_size=24,
                   eval_split='validation', augment='randaugment')
  info = data.get_dataset_info(config)
  assert info.num_classes == 1000 and info.image_shape == (24, 24, 3)
  train = next(data.create_train_iterator(config, global_batch_size=4, seed=0))
  assert train['image'].shape == (4, 24, 24, 3)
  assert train['image'].dtype == np.float32
  assert ((0 <= train['label']) & (train['label'] < 1000)).all()
  batches = list(data.create_eval_iterator(config, batch_size=4))
  assert [b['mask'].sum() for b in batches] == [4, 4, 2]
  assert set(batches[0].keys()) == {'image', 'label', 'mask'}


@pytest.mark.parametrize('create', [
    lambda config: data.get_dataset_info(config),
    lambda config: data.create_train_iterator(config, global_batch_size=8,
                                              seed=0),
    lambda config: data.create_eval_iterator(config, batch_size=8),
])
def test_pipeline_reports_missing_data(tmp_path, create):
  with pytest.raises(data.MissingDataError) as error:
    create(_config(tmp_path))
  message = str(error.value)
  assert "'fashion_mnist'" in message and str(tmp_path) in message
  assert sources.prepare_command('fashion_mnist', tmp_path) in message


# ---------------------------------------------------------------------------
# Which transforms the config switches on.


@pytest.mark.parametrize('overrides', [{'augment': 'trivial_augment'},
                                       {'augment': 'randaugment'},
                                       {'augment': 'randaugment_timm'}])
def test_augment_changes_training_images(fake_data_dir, overrides):
  # Same seed, same crop/flip: only the augmentation differs.
  plain = _take(data.create_train_iterator(
      _config(fake_data_dir, 'cifar10'), global_batch_size=16, seed=0), 2)
  augmented = _take(data.create_train_iterator(
      _config(fake_data_dir, 'cifar10', **overrides), global_batch_size=16,
      seed=0), 2)
  changed = 0
  for a, b in zip(plain, augmented):
    np.testing.assert_array_equal(a['label'], b['label'])  # Same examples.
    changed += sum(not np.array_equal(a['image'][i], b['image'][i])
                   for i in range(16))
  assert changed > 16  # Most of the 32 (Identity or a weak level keeps some).


def test_timm_randaugment_fills_with_the_configured_mean(monkeypatch, fake_data_dir):
  fills = set()
  monkeypatch.setattr(transforms, 'apply_op',
                      lambda image, name, level, rng, space=None, mean_fill=None: fills.add(
                          (space, mean_fill)) or image)
  config = _config(fake_data_dir, 'cifar10', augment='randaugment_timm', mean=(0.5, 0.25, 1.0))
  next(data.create_train_iterator(config, global_batch_size=16, seed=0))
  assert fills == {(transforms.TIMM_SPACE, (128, 64, 255))}


def test_random_erasing_replaces_one_box_per_image(fake_data_dir):
  plain = next(data.create_train_iterator(
      _config(fake_data_dir, 'cifar10'), global_batch_size=16, seed=0))
  erased = next(data.create_train_iterator(
      _config(fake_data_dir, 'cifar10', random_erasing=1.0),
      global_batch_size=16, seed=0))
  np.testing.assert_array_equal(plain['label'], erased['label'])
  noise = []
  for a, b in zip(plain['image'], erased['image']):
    # Every image (prob 1) differs from the plain one inside one box only.
    rows, cols = np.nonzero((a != b).any(-1))
    assert rows.size
    box = np.zeros(a.shape[:2], bool)
    box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    np.testing.assert_array_equal(a[~box], b[~box])
    assert box.mean() < 0.5
    noise.append(b[box].ravel())
  # The box holds N(0, 1) noise in normalized units: erasing runs after
  # Normalize (noise written into uint8 pixels would come out near +-2).
  noise = np.concatenate(noise)
  assert abs(noise.mean()) < 0.1 and 0.9 < noise.std() < 1.1


# cifar10's statistics, typed from the usual published values.
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465])
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616])


def _pad(image, size):
  """Centre zero-pad (size > 32) or centre crop (size < 32) of a 32 x 32 image."""
  if size >= 32:
    p = (size - 32) // 2
    return np.pad(image, ((p, p), (p, p), (0, 0)))
  c = (32 - size) // 2
  return image[c:c + size, c:c + size]


def _resize(image, size):
  return np.asarray(Image.fromarray(image).resize((size, size),
                                                  Image.BILINEAR))


@pytest.mark.parametrize('resize_mode, size, reference', [
    ('pad', 36, _pad), ('pad', 28, _pad), ('resize', 40, _resize)])
def test_eval_batches_are_sized_and_normalized_only(fake_data_dir, resize_mode,
                                                    size, reference):
  # Even with every augmentation switched on: they are training-only.
  config = _config(fake_data_dir, 'cifar10', resize_mode=resize_mode,
                   image_size=size, augment='randaugment',
                   random_erasing=1.0, mixup_alpha=0.8, cutmix_alpha=1.0)
  batch = next(iter(data.create_eval_iterator(config, batch_size=8)))
  records = tfds.builder('cifar10', data_dir=str(fake_data_dir)
                         ).as_data_source('test')
  for i in range(8):  # Eval reads the split in order.
    image = records[i]['image']
    expected = (reference(image, size) / 255.0 - CIFAR10_MEAN) / CIFAR10_STD
    np.testing.assert_allclose(batch['image'][i], expected, atol=1e-5)
    assert batch['label'][i] == records[i]['label'] and batch['mask'][i]


@pytest.fixture(scope='module')
def canvas_dir(tmp_path_factory):
  """4 train and 4 test segmentation canvases."""
  return prepare_slice(tmp_path_factory, 'fashion_mnist_canvas', 4)


@pytest.mark.parametrize('field, value, valid', [
    ('augment', 'trivial_augment', "''"),
    ('random_erasing', 0.25, '0.0'),
])
def test_segmentation_refuses_photometric_augmentation(canvas_dir, field,
                                                        value, valid):
  # They would change what a pixel shows without changing its label.
  config = _config(canvas_dir, 'fashion_mnist_canvas', image_size=64)
  data.create_train_iterator(config, global_batch_size=2, seed=0,
                             task='segmentation')  # Builds with them off.
  config[field] = value
  with pytest.raises(ValueError, match=re.escape(
      f"data.{field}={value!r} is not supported for task 'segmentation'; "
      f'valid: {valid}.')):
    data.create_train_iterator(config, global_batch_size=2, seed=0,
                               task='segmentation')


@pytest.mark.parametrize('field', ['mixup_alpha', 'cutmix_alpha'])
def test_segmentation_refuses_mixup_and_cutmix(field):
  config = segmentation.get_config()
  make_targets = tasks.get_task('segmentation').make_targets
  make_targets(config)  # Fine with both off.
  config.data[field] = 0.5
  with pytest.raises(ValueError, match=re.escape(
      f"data.{field}=0.5 is not supported for task 'segmentation'; "
      'valid: 0.0.')):
    make_targets(config)


def test_load_eval_examples_are_the_first_real_examples_in_order(fake_data_dir):
  config = _config(fake_data_dir, 'cifar10')
  (batch,) = list(data.create_eval_iterator(config, batch_size=64))
  real = np.nonzero(batch['mask'])[0]
  images, labels = data.load_eval_examples(config, 'test', 7)
  assert images.shape == (7, 32, 32, 3) and labels.shape == (7,)
  np.testing.assert_array_equal(images, batch['image'][real[:7]])
  np.testing.assert_array_equal(labels, batch['label'][real[:7]])
  # More than the split holds: all of it, once.
  images, labels = data.load_eval_examples(config, 'test', 10_000)
  assert len(images) == len(labels) == len(real)
  np.testing.assert_array_equal(labels, batch['label'][real])
  # In order even where training reads with grain workers (which interleave records).
  config.num_workers = 2
  images, labels = data.load_eval_examples(config, 'test', 7)
  np.testing.assert_array_equal(labels, batch['label'][real[:7]])
  np.testing.assert_array_equal(images, batch['image'][real[:7]])


_GROUP_SIGTERM = '''
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from configs import base
from hierarchical_vit import data

if __name__ == '__main__':
  config = base.get_data_config()
  config.update(name='cifar10', data_dir={data_dir!r}, num_workers=2)
  train = data.create_train_iterator(config, global_batch_size=4, seed=0)
  # Worker w makes batches w, w + 2, ...: after two, both have unpickled their
  # source and ignore SIGTERM (a worker still starting up would die of it).
  next(train), next(train)
  received = []
  signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  os.killpg(0, signal.SIGTERM)  # As a scheduler signals the whole process group.
  time.sleep(1)
  for _ in range(40):  # More than the workers' buffers hold.
    next(train)
  print('read after SIGTERM', received)
'''


def test_grain_workers_outlive_a_sigterm_to_the_process_group(fake_data_dir, tmp_path):
  """The trainer reads batches until its processes agree to save; workers that
  died with the group's SIGTERM would fail it first ("Worker process was
  terminated unexpectedly")."""
  script = tmp_path / 'group_sigterm.py'
  script.write_text(_GROUP_SIGTERM.format(repo=REPO, data_dir=str(fake_data_dir)))
  child = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, start_new_session=True, check=False)
  assert child.returncode == 0, child.stderr[-3000:]
  assert 'read after SIGTERM [15]' in child.stdout


@pytest.mark.parametrize('name, split, image_size, margin', [
    ('imagenet2012', 'validation', 24, 1),  # Resized to 27.4 px: 1 real pixel each side.
    ('cifar10', 'test', 32, 4),  # Fixed size, 'pad': a black margin.
    # An odd excess: cropping 32 to 31 and padding 32 to 33 round the other way.
    ('cifar10', 'test', 31, 1),
])
def test_eval_margin_widens_the_view_around_the_same_centre(fake_data_dir, name, split,
                                                           image_size, margin):
  config = _config(fake_data_dir, name, image_size=image_size)
  plain, labels = data.load_eval_examples(config, split, 6)
  wide, wide_labels = data.load_eval_examples(config, split, 6, margin=margin)
  assert wide.shape == (6, image_size + 2 * margin, image_size + 2 * margin, 3)
  np.testing.assert_array_equal(wide[:, margin:-margin, margin:-margin], plain)
  np.testing.assert_array_equal(wide_labels, labels)
  rim = wide[:, 0].reshape(-1, 3)
  black = np.all(rim == rim[0], axis=1).all()
  assert black == (name == 'cifar10')  # ImageNet's margin is the photo's own pixels.


def test_eval_margin_is_refused_where_it_cannot_keep_the_scale(fake_data_dir, canvas_dir):
  imagenet = _config(fake_data_dir, 'imagenet2012', image_size=24)
  with pytest.raises(ValueError, match=r'margin=2 is too large for data.image_size=24: '
                                       r'the resized image has at most 1 pixels'):
    data.create_eval_iterator(imagenet, batch_size=2, split='validation', margin=2)
  cifar = _config(fake_data_dir, 'cifar10', resize_mode='resize')
  with pytest.raises(ValueError, match=r"margin=4 needs data.resize_mode='pad'.*'resize'"):
    data.create_eval_iterator(cifar, batch_size=2, margin=4)
  canvas = _config(canvas_dir, 'fashion_mnist_canvas', image_size=64)
  with pytest.raises(ValueError, match="margin=1 is not supported for task 'segmentation'"):
    data.create_eval_iterator(canvas, batch_size=2, task='segmentation', margin=1)


def test_splits_are_checked_by_field_and_slices_pass(fashion_mnist_dir):
  config = _config(fashion_mnist_dir)
  data.check_split(config, 'train[:90%]', '--split')
  with pytest.raises(ValueError, match=r"--split='validation' is not a split of "
                                       r"'fashion_mnist': Unknown split 'validation'.*'test'"):
    data.check_split(config, 'validation', '--split')
  config.train_split = 'trian'
  with pytest.raises(ValueError, match=r"data.train_split='trian' is not a split of"):
    data.get_dataset_info(config)


@pytest.mark.parametrize('workers', [0, 2])
@pytest.mark.parametrize('process_index, process_count', [(0, 1), (1, 3)])
def test_seek_lands_where_reading_would(fashion_mnist_dir, workers, process_index,
                                        process_count):
  """seek_train_iterator(fresh, n) leaves the iterator in the state that
  reading n batches does (grain's per-worker positions included)."""
  config = _config(fashion_mnist_dir, num_workers=workers)
  make = lambda: data.create_train_iterator(
      config, global_batch_size=4 * process_count, seed=0, process_index=process_index,
      process_count=process_count)
  read = make()
  for _ in range(5):
    next(read)
  sought = make()
  data.seek_train_iterator(sought, 5, 4, process_index, process_count)
  assert sought.get_state() == read.get_state()
  np.testing.assert_array_equal(next(sought)['label'], next(read)['label'])


@pytest.mark.parametrize('process_index, process_count', [(0, 1), (1, 3)])
def test_train_batches_do_not_depend_on_the_worker_count(fake_data_dir, process_index,
                                                         process_count):
  """With 2 or 3 grain workers each batch holds the examples, in the order and
  with the augmentation (random crop and flip here), that it holds without
  workers (unpermuted, a worker's batch would gather every W-th example).
  Another seed gives other batches: the comparison can tell them apart."""
  make = lambda workers, seed=0: data.create_train_iterator(
      _config(fake_data_dir, 'cifar10', num_workers=workers), global_batch_size=4 * process_count,
      seed=seed, process_index=process_index, process_count=process_count)
  alone = _take(make(0), 7)
  for workers in (2, 3):
    _assert_same(alone, _take(make(workers), 7))
  assert any((a['label'] != b['label']).any() for a, b in zip(alone, _take(make(0, seed=1), 7)))


def test_empty_eval_batches_and_counts_are_refused_by_name(fake_data_dir):
  config = _config(fake_data_dir, 'cifar10')
  with pytest.raises(ValueError, match='eval batch_size=0 must be >= 1'):
    data.create_eval_iterator(config, batch_size=0)
  with pytest.raises(ValueError, match='count=0 examples must be >= 1'):
    data.load_eval_examples(config, 'test', 0)
