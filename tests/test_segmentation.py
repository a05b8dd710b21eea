"""Segmentation: metrics by hand, canvas labels, data loaders, train + eval.py."""

import contextlib
import io
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tests.conftest import free_port, prepare_slice, spawn, wait_all
import tensorflow_datasets as tfds
from PIL import Image

from configs import segmentation
from hierarchical_vit import data
from hierarchical_vit.data import canvas
from hierarchical_vit.data import prepare
from hierarchical_vit.data import transforms
from hierarchical_vit.training import tasks
from hierarchical_vit.training import trainer

IGNORE = data.IGNORE_INDEX
SEG = tasks.TASKS['segmentation']


# ---------------------------------------------------------------------------
# Metrics, worked out by hand.


def test_miou_of_a_hand_computed_confusion_matrix():
  # Rows: true class, columns: predicted. IoU_k = TP / (row + column - TP):
  #   class 0: 3 / (4 + 4 - 3) = 0.6
  #   class 1: 2 / (4 + 3 - 2) = 0.4
  #   class 2: 1 / (2 + 3 - 1) = 0.25     -> mIoU 1.25 / 3, pixel acc 6 / 10.
  confusion = np.array([[3, 1, 0],
                        [0, 2, 2],
                        [1, 0, 1]])
  np.testing.assert_allclose(tasks.iou_per_class(confusion), [0.6, 0.4, 0.25])
  metrics = tasks.segmentation_metrics(confusion)
  assert metrics['miou'] == pytest.approx(1.25 / 3)
  assert metrics['pixel_accuracy'] == pytest.approx(0.6)
  # A class neither present nor predicted has no IoU and is left out.
  padded = np.pad(confusion, ((0, 1), (0, 1)))
  assert np.isnan(tasks.iou_per_class(padded)[3])
  assert tasks.segmentation_metrics(padded)['miou'] == pytest.approx(1.25 / 3)


def _logits_for(predicted: np.ndarray, num_classes: int) -> jax.Array:
  return jnp.asarray(np.eye(num_classes)[predicted] * 5.0, jnp.float32)


def test_eval_sums_confusion_ignores_border_and_padding():
  labels = np.array([[[0, 1, IGNORE],
                      [2, 2, 1]],
                     [[1, 1, 1],        # A padding example (mask False).
                      [1, 1, 1]]])
  predicted = np.array([[[0, 2, 1],
                         [2, 0, 1]],
                        [[0, 0, 0],
                         [0, 0, 0]]])
  batch = {'label': jnp.asarray(labels), 'mask': jnp.array([True, False])}
  sums = SEG.eval_sums(_logits_for(predicted, 3), batch, 3, False)
  # The 5 labelled pixels of example 0: (true, predicted) = (0, 0), (1, 2),
  # (2, 2), (2, 0), (1, 1).
  np.testing.assert_array_equal(sums['confusion'], [[1, 0, 0],
                                                    [0, 1, 1],
                                                    [1, 0, 1]])
  assert int(sums['pixels']) == 5 and int(sums['count']) == 1
  logits = np.asarray(_logits_for(predicted, 3), np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  labelled = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 1, 2)]
  expected_loss = -sum(log_probs[b, i, j, labels[b, i, j]] for b, i, j in labelled)
  np.testing.assert_allclose(sums['loss'], expected_loss, rtol=1e-5)
  results = SEG.summarize(jax.device_get(sums))
  # IoU: 1 / (1 + 2 - 1), 1 / (2 + 1 - 1), 1 / (2 + 2 - 1).
  assert results['eval/miou'] == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
  assert results['eval/pixel_accuracy'] == pytest.approx(3 / 5)
  assert results['eval/loss'] == pytest.approx(expected_loss / 5, rel=1e-5)  # Per labelled pixel.


def test_segmentation_loss_sums_over_labelled_pixels_and_counts_them():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  labels = rng.integers(0, 4, (2, 3, 3))
  labels[0, 0, :] = IGNORE
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  valid = labels != IGNORE
  expected = -np.take_along_axis(
      log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0][valid].mean()
  loss, count = SEG.loss_sums(jnp.asarray(logits), jnp.asarray(labels), 0.0)
  assert count == valid.sum() == 15
  np.testing.assert_allclose(loss / count, expected, rtol=1e-5)
  correct = SEG.correct(jnp.asarray(logits), jnp.asarray(labels))
  assert correct == ((logits.argmax(-1) == labels) & valid).sum()


# ---------------------------------------------------------------------------
# Canvas generator.


def _items(n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Random 28x28 items: half the pixels 0, the rest anywhere in 1..255."""
  rng = np.random.default_rng(seed)
  images = rng.integers(1, 256, (n, 28, 28)) * (rng.random((n, 28, 28)) < 0.5)
  return images.astype(np.uint8), rng.integers(0, 10, n)


def test_canvas_labels_match_the_items_pasted():
  images, labels = _items()
  for seed in range(30):
    image, mask, placements = canvas.make_canvas(
        images, labels, np.random.default_rng(seed))
    assert image.shape == mask.shape == (64, 64)
    assert 2 <= len(placements) <= 4
    # Each item's intensity on the canvas, -1 where it does not reach.
    layers = np.full((len(placements), 64, 64), -1)
    for k, p in enumerate(placements):
      assert 0 <= p.y <= 36 and 0 <= p.x <= 36
      layers[k, p.y:p.y + 28, p.x:p.x + 28] = images[p.item]
    above = layers > canvas.THRESHOLD
    # Background exactly where no item is above threshold.
    np.testing.assert_array_equal(mask == 0, ~above.any(0))
    assert (image[mask == 0] <= canvas.THRESHOLD).all()
    # Elsewhere: the class of the topmost item above threshold, whose own
    # intensity is what the canvas shows.
    top = len(placements) - 1 - np.argmax(above[::-1], axis=0)
    item_class = np.array([labels[p.item] for p in placements])
    labelled = mask > 0
    np.testing.assert_array_equal(mask[labelled], item_class[top][labelled] + 1)
    shown = np.take_along_axis(layers, top[None], 0)[0]
    np.testing.assert_array_equal(image[labelled], shown[labelled])


def test_canvas_is_determined_by_the_seed():
  images, labels = _items()
  first = canvas.make_canvas(images, labels, np.random.default_rng(7))
  again = canvas.make_canvas(images, labels, np.random.default_rng(7))
  other = canvas.make_canvas(images, labels, np.random.default_rng(8))
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], other[0])


# ---------------------------------------------------------------------------
# Prepared canvases: pipeline, training, eval.py.


@pytest.fixture(scope='module')
def canvas_dir(tmp_path_factory) -> str:
  """fashion_mnist_canvas with 64 train and 64 test canvases."""
  return prepare_slice(tmp_path_factory, 'fashion_mnist_canvas', 64)


def test_prepared_canvases_are_the_generators(canvas_dir):
  source_dir = prepare.find_source('fashion_mnist')
  images = prepare.read_idx(source_dir / 't10k-images-idx3-ubyte.gz')
  labels = prepare.read_idx(source_dir / 't10k-labels-idx1-ubyte.gz')
  expected = {canvas.make_canvas(images, labels,
                                 np.random.default_rng((0, 1, i)))[0].tobytes()
              for i in range(64)}
  stored = tfds.builder('fashion_mnist_canvas', data_dir=canvas_dir
                        ).as_data_source('test')
  assert {stored[i]['image'][..., 0].tobytes() for i in range(64)} == expected


def test_each_stored_canvas_pairs_its_image_and_mask_with_its_own_seed(canvas_dir):
  """Canvas `index` of split `split_id` (train 0, test 1, in SPLIT_SIZES order) comes
  from its own generator seeded (SEED=0, split_id, index), and its image and mask are
  one make_canvas call's pair. tfds stores examples in its key-hash shuffle order, so
  each stored example is matched to its index by its image (all distinct); every index
  must be stored once, with that index's mask. A mask from another index or from a
  second call on the same generator fails (the image-set test above would not see it)."""
  source_dir = prepare.find_source('fashion_mnist_canvas')
  for split_id, (split, prefix) in enumerate([('train', 'train'), ('test', 't10k')]):
    images = prepare.read_idx(source_dir / f'{prefix}-images-idx3-ubyte.gz')
    labels = prepare.read_idx(source_dir / f'{prefix}-labels-idx1-ubyte.gz')
    expected = [canvas.make_canvas(images, labels,
                                   np.random.default_rng((0, split_id, index)))[:2]
                for index in range(64)]
    index_of_image = {image.tobytes(): index for index, (image, _) in enumerate(expected)}
    assert len(index_of_image) == 64  # Distinct, so the match is unambiguous.
    stored = tfds.builder('fashion_mnist_canvas', data_dir=canvas_dir).as_data_source(split)
    assert len(stored) == 64
    found = []
    for position in range(64):
      example = stored[position]
      assert example['image'].shape == example['segmentation_mask'].shape == (64, 64, 1)
      index = index_of_image.get(example['image'][..., 0].tobytes())
      assert index is not None, f'{split} example {position} is no canvas of its seeds'
      np.testing.assert_array_equal(example['segmentation_mask'][..., 0], expected[index][1],
                                    err_msg=f'{split} canvas {index}')
      found.append(index)
    assert sorted(found) == list(range(64))


def _tiny_config(data_dir: str, **train):
  """A tiny UNet (16 x 16 tokens, 2 stages) on the canvases."""
  config = segmentation.get_config()
  config.model.update(patch_size=4, embed_dim=16, depths=(1, 1),
                      num_heads=(1, 2), window_size=4, drop_path_rate=0.0)
  config.data.data_dir = data_dir
  config.train.update(batch_size=16, num_steps=4, warmup_epochs=0.0,
                      learning_rate=3e-3, log_every_steps=1,
                      checkpoint_every_steps=4, eval_batch_size=32)
  config.train.update(**train)
  return config


def test_canvas_batches(canvas_dir):
  config = _tiny_config(canvas_dir).data
  info = data.get_dataset_info(config, task='segmentation')
  assert info.num_classes == 11 and info.class_names[0] == 'background'
  batch = next(data.create_train_iterator(config, global_batch_size=8, seed=0,
                                          task='segmentation'))
  assert batch['image'].shape == (8, 64, 64, 1)
  assert batch['label'].shape == (8, 64, 64) and batch['label'].dtype == np.int32
  assert 0 <= batch['label'].min() and batch['label'].max() <= 10
  with pytest.raises(ValueError, match="no image-level 'label'"):
    data.get_dataset_info(config)  # Classification needs image labels.


def test_unet_train_steps_decrease_loss(canvas_dir):
  config = _tiny_config(canvas_dir)
  graphdef, _, params, rest = trainer.init_model(config)
  schedule = optax.constant_schedule(3e-3)
  tx = optax.adamw(schedule)
  state = trainer.create_train_state(config, params, tx)
  step = jax.jit(trainer.make_train_step(graphdef, tx, schedule, config),
                 donate_argnums=0)
  batch = next(data.create_train_iterator(config.data, global_batch_size=16,
                                          seed=0, task='segmentation'))
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch, rest)
    losses.append(float(metrics['train/loss']))
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < 0.85 * losses[0], losses


def test_accumulated_step_weighs_every_labelled_pixel_alike(canvas_dir):
  """With 2 micro-batches, one of them mostly unlabelled, the step is the
  whole batch's: the loss is a mean over all its labelled pixels, not a mean
  of the micro-batches' means, and the stochastic-depth masks of encoder and
  decoder are the whole batch's. SGD(1), so the params move by the gradient."""
  batch = next(data.create_train_iterator(_tiny_config(canvas_dir).data, global_batch_size=8,
                                          seed=0, task='segmentation'))
  labels = np.array(batch['label'])
  # Micro-batch 0 (rows 0, 2, ...) keeps only the 8 x 8 corner of its 64 x 64.
  labels[0::2, :, 8:] = IGNORE
  labels[0::2, 8:] = IGNORE
  batch = {'image': jnp.asarray(batch['image']), 'label': jnp.asarray(labels)}
  runs = {}
  for accum in (1, 2):
    config = _tiny_config(canvas_dir, grad_accum_steps=accum)
    config.model.drop_path_rate = 0.5
    graphdef, _, params, rest = trainer.init_model(config)
    schedule = optax.constant_schedule(1.0)
    tx = optax.sgd(schedule)
    step = jax.jit(trainer.make_train_step(graphdef, tx, schedule, config))
    state, metrics = step(trainer.create_train_state(config, params, tx), batch, rest)
    runs[accum] = jax.device_get((params, state['params'], metrics))
  (before, whole, whole_metrics), (_, accumulated, accumulated_metrics) = runs[1], runs[2]
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), before, whole)
  assert max(jax.tree.leaves(moved)) > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               whole, accumulated)
  for name in ('train/loss', 'train/accuracy', 'train/grad_norm'):
    np.testing.assert_allclose(accumulated_metrics[name], whole_metrics[name], rtol=1e-5)


@pytest.fixture(scope='module')
def trained(canvas_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('seg_run'))
  final = trainer.train_and_evaluate(_tiny_config(canvas_dir), workdir)
  return workdir, final


def test_train_and_evaluate_reports_miou(trained):
  workdir, final = trained
  assert final['step'] == 4 and final['eval/num_examples'] == 64
  assert 0.0 <= final['eval/miou'] <= final['eval/pixel_accuracy'] <= 1.0
  # The best checkpoint is chosen by mIoU.
  metrics = json.load(open(os.path.join(workdir, 'checkpoints', '4', 'metrics',
                                        'metrics')))
  assert metrics == {'eval/miou': final['eval/miou']}


def test_eval_script_writes_miou_json_and_overlays(trained, tmp_path, monkeypatch):
  """On 2 processes (1 device each): each evaluates half of the split, both
  compile and run the same programs (overlay predictions included: on GPUs a
  program compiled by one process alone can hang in shared autotuning), and
  process 0 alone writes and prints."""
  workdir, final = trained
  monkeypatch.setenv('JAX_LOG_COMPILES', '1')
  coordinator = f'--coordinator_address=127.0.0.1:{free_port()}'
  logs = [str(tmp_path / f'log{i}.txt') for i in range(2)]
  with contextlib.ExitStack() as stack:
    # --step=best: the best by eval/miou, the task's metric (step 4 has the only one).
    procs = [stack.enter_context(spawn(
        [sys.executable, 'eval.py', f'--workdir={workdir}', '--num_overlays=3', '--step=best',
         coordinator, '--num_processes=2', f'--process_id={i}'], 1, logs[i]))
             for i in range(2)]
    wait_all(procs, logs)
  report = json.load(open(os.path.join(workdir, 'eval_test_4.json')))
  np.testing.assert_allclose(report['miou'], final['eval/miou'], rtol=1e-6)
  assert report['num_examples'] == 64
  assert list(report['per_class_iou']) == list(canvas.CLASS_NAMES)
  assert np.array(report['confusion_matrix']).shape == (11, 11)
  for name in ('confusion_test_4.png', 'overlay_test_4_0.png',
               'overlay_test_4_2.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  outputs = [open(log).read() for log in logs]
  assert 'test mIoU (step 4)' in outputs[0] and 'test mIoU' not in outputs[1]
  compiled = [sorted(re.findall(r'Finished XLA compilation of (\S+)', out)) for out in outputs]
  assert compiled[0] == compiled[1] and compiled[0], compiled


# ---------------------------------------------------------------------------
# oxford_iiit_pet (small fake data written by tfds' real builder) and joint
# geometry.


def _png(array: np.ndarray, fmt: str = 'png') -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


class _FakePets(tfds.builder_cls('oxford_iiit_pet'), skip_registration=True):
  """Random pets of random size; trimap: top half pet, a border band."""
  name = 'oxford_iiit_pet'
  code_path = None  # Nothing to download, so no checksums file.

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate(6, 0), 'test': self._generate(3, 1)}

  def _generate(self, n: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
      h, w = rng.integers(40, 90, 2)
      trimap = np.full((h, w), 2, np.uint8)  # Background ...
      trimap[:h // 2] = 1                    # ... pet on top ...
      trimap[h // 2 - 1:h // 2 + 2] = 3       # ... and a 3-row border between.
      yield i, {
          'image': _png(rng.integers(0, 256, (h, w, 3), np.uint8), 'jpeg'),
          'label': int(rng.integers(37)), 'species': int(rng.integers(2)),
          'file_name': f'pet_{i}.jpg', 'segmentation_mask': _png(trimap),
          'head_bbox': tfds.features.BBox(0.1, 0.2, 0.5, 0.6)}


def test_oxford_iiit_pet_shapes_and_labels(tmp_path):
  _FakePets(data_dir=str(tmp_path), file_format='array_record'
            ).download_and_prepare(download_config=tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP))
  config = segmentation.get_config().data
  config.update(name='oxford_iiit_pet', data_dir=str(tmp_path), image_size=32,
                resize_mode='resize', hflip=True)
  info = data.get_dataset_info(config, task='segmentation')
  assert info.class_names == ('background', 'pet')
  assert (info.num_train_examples, info.num_eval_examples) == (6, 3)
  batch = next(data.create_train_iterator(config, global_batch_size=4, seed=0,
                                          task='segmentation'))
  assert batch['image'].shape == (4, 32, 32, 3)
  assert batch['label'].shape == (4, 32, 32) and batch['label'].dtype == np.int32
  # Rows: pet (1) on top, background (0) below, ignored border in between;
  # flips keep rows, so every row is one value.
  labels = batch['label']
  assert (labels[:, :14] == 1).all() and (labels[:, 18:] == 0).all()
  assert (labels == IGNORE).any() and (labels == labels[:, :, :1]).all()
  evals = list(data.create_eval_iterator(config, batch_size=2,
                                         task='segmentation'))
  assert [b['mask'].sum() for b in evals] == [2, 1]
  assert set(np.unique(evals[0]['label'])) == {0, 1, IGNORE}


def test_crop_flip_moves_image_and_label_together():
  rng = np.random.default_rng(0)
  image = rng.integers(1, 256, (16, 16, 1), np.uint8)
  label = image % 5  # Any function of the pixel: it must travel with it.
  op = transforms.CropFlip(padding=3, hflip=True, dense_label=True)
  for seed in range(20):
    out = op.random_map({'image': image, 'label': label},
                        np.random.default_rng(seed))
    padding = out['label'] == IGNORE
    np.testing.assert_array_equal(padding, out['image'] == 0)
    np.testing.assert_array_equal(out['label'][~padding],
                                  out['image'][~padding] % 5)


def test_to_size_keeps_label_values():
  label = np.zeros((20, 30, 1), np.uint8)
  label[:, 15:] = 7
  resized = transforms.ToSize(32, 'resize', dense_label=True).map(
      {'image': np.zeros((20, 30, 3), np.uint8), 'label': label})
  assert set(np.unique(resized['label'])) == {0, 7}  # Nearest: no blending.
  padded = transforms.ToSize(32, 'pad', dense_label=True).map(
      {'image': np.zeros((20, 30, 3), np.uint8), 'label': label})['label']
  assert padded.shape == (32, 32, 1) and (padded[:6] == IGNORE).all()
