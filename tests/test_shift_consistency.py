"""Shift consistency: the shifts, the measures against numpy, the batched classifier."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from hierarchical_vit import cli
from hierarchical_vit import shift_consistency as sc
from hierarchical_vit.models import build_model
from hierarchical_vit.training import trainer
from tests.test_models import tiny_model_config


def _images(n=40, size=6, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 2)).astype(np.float32)


def test_roll_images_shifts_each_image_by_its_own_offsets():
  images = _images(5)
  dy, dx = np.array([0, 1, -2, 5, 3]), np.array([2, 0, -1, -3, 6])
  expected = np.stack([np.roll(im, (a, b), axis=(0, 1)) for im, a, b in zip(images, dy, dx)])
  np.testing.assert_array_equal(sc.roll_images(images, dy, dx), expected)


def _numpy_translate(image, a, b, margin):
  """out[y, x] = image[clip(y - a), clip(x - b)], by explicit index clipping."""
  del margin  # Pads as far as the offsets need.
  h, w = image.shape[:2]
  rows = np.clip(np.arange(h) - a, 0, h - 1)
  cols = np.clip(np.arange(w) - b, 0, w - 1)
  return image[rows][:, cols]


def _numpy_crop(canvas, a, b, margin):
  """The (H - 2 margin, W - 2 margin) window whose corner sits at (margin - a, margin - b)."""
  h, w = canvas.shape[0] - 2 * margin, canvas.shape[1] - 2 * margin
  return canvas[margin - a:margin - a + h, margin - b:margin - b + w]


_NUMPY_SHIFTS = {'circular': lambda image, a, b, _: np.roll(image, (a, b), axis=(0, 1)),
                 'edge': _numpy_translate, 'crop': _numpy_crop}


def test_translate_images_moves_and_fills_with_the_edge():
  images = _images(5)
  dy, dx = np.array([0, 1, -2, 5, 3]), np.array([2, 0, -1, -3, 6])
  expected = np.stack([_numpy_translate(im, a, b, 6) for im, a, b in zip(images, dy, dx)])
  np.testing.assert_array_equal(sc.translate_images(images, dy, dx, 6), expected)
  # A shift by (1, 0): row 0 repeats the old row 0, the old last row is gone.
  moved = np.asarray(sc.translate_images(images[:1], np.array([1]), np.array([0]), 1))[0]
  np.testing.assert_array_equal(moved[0], images[0, 0])
  np.testing.assert_array_equal(moved[1:], images[0, :-1])


def test_crop_views_cut_each_canvas_at_its_own_offset():
  canvases = _images(5, size=10)
  dy, dx = np.array([0, 1, -2, 3, 3]), np.array([2, 0, -1, -3, 3])
  views = np.asarray(sc.crop_views(canvases, dy, dx, 3))
  assert views.shape == (5, 4, 4, 2)
  np.testing.assert_array_equal(
      views, np.stack([_numpy_crop(c, a, b, 3) for c, a, b in zip(canvases, dy, dx)]))
  # Offset (0, 0) is the centre; (1, 0) shows the content one row lower.
  centre = np.asarray(sc.crop_views(canvases[:1], np.array([0]), np.array([0]), 3))[0]
  np.testing.assert_array_equal(centre, canvases[0, 3:7, 3:7])
  lower = np.asarray(sc.crop_views(canvases[:1], np.array([1]), np.array([0]), 3))[0]
  np.testing.assert_array_equal(lower[1:], centre[:-1])


def test_random_offsets_cover_the_range_and_repeat_with_the_seed():
  offsets = sc.random_offsets(500, 3, seed=1)
  assert offsets.shape == (2, 2, 500)
  assert set(np.unique(offsets)) == set(range(-3, 4))
  np.testing.assert_array_equal(offsets, sc.random_offsets(500, 3, seed=1))
  assert not np.array_equal(offsets, sc.random_offsets(500, 3, seed=2))
  with pytest.raises(ValueError, match='max_shift=0'):
    sc.random_offsets(5, 0, seed=0)
  with pytest.raises(ValueError,
                     match=r"shift='wrap' is not one of \['circular', 'crop', 'edge'\]"):
    sc.shift_metrics(lambda x: np.zeros(len(x)), [(_images(3), np.zeros(3))], 3, 1,
                     shift='wrap')


def test_a_shift_invariant_classifier_is_fully_consistent():
  images = _images()
  classify = lambda x: np.asarray(jnp.sum(x, axis=(1, 2, 3)) > 0).astype(int)
  labels = np.arange(len(images)) % 2
  metrics = sc.shift_metrics(classify, [(images, labels)], len(images), max_shift=2)
  assert metrics['consistency'] == 1.0 and metrics['diagonal'] == [1.0, 1.0]
  expected_accuracy = np.mean((images.sum(axis=(1, 2, 3)) > 0) == labels)
  assert metrics['accuracy'] == metrics['shifted_accuracy'] == pytest.approx(expected_accuracy)


@pytest.mark.parametrize('shift', sorted(sc.SHIFTS))
def test_a_position_dependent_classifier_against_numpy(shift):
  """class = sign of the pixel at (1, 1): every shift reads another pixel.
  For 'crop' the 6x6 images are canvases of 2x2 views."""
  images = _images(200)
  labels = np.random.default_rng(3).integers(0, 2, len(images))
  corner = lambda x: (np.asarray(x)[:, 1, 1, 0] > 0).astype(int)
  metrics = sc.shift_metrics(corner, [(images, labels)], len(images), max_shift=2, seed=5,
                             shift=shift)
  chunks = [(images[i:i + 37], labels[i:i + 37]) for i in range(0, len(images), 37)]
  # Read in chunks (a large eval set), each image keeps its offsets.
  assert sc.shift_metrics(corner, chunks, len(images), max_shift=2, seed=5,
                          shift=shift) == metrics
  (ay, ax), (by, bx) = sc.random_offsets(len(images), 2, seed=5)
  roll = lambda dy, dx: np.stack([_NUMPY_SHIFTS[shift](im, a, b, 2)
                                  for im, a, b in zip(images, dy, dx)])
  a, b = corner(roll(ay, ax)), corner(roll(by, bx))
  zero = np.zeros(len(images), int)
  plain = corner(roll(zero, zero))
  assert metrics['consistency'] == pytest.approx(np.mean(a == b))
  assert metrics['accuracy'] == pytest.approx(np.mean(plain == labels))
  assert metrics['shifted_accuracy'] == pytest.approx((np.mean(a == labels)
                                                       + np.mean(b == labels)) / 2)
  ones = np.ones(len(images), int)
  assert metrics['diagonal'] == pytest.approx(
      [np.mean(corner(roll(s * ones, s * ones)) == plain) for s in (1, 2)])
  assert 0.3 < metrics['consistency'] < 0.8  # Not trivially 0 or 1.


def test_classifier_batches_pad_and_crop():
  config = tiny_model_config()
  model = build_model(config, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  trained = trainer.Trained(graphdef, params, rest, step=0, weights='params')
  images = jax.random.normal(jax.random.key(1), (7, config.img_size, config.img_size,
                                                 config.in_chans))
  expected = np.asarray(jnp.argmax(nnx.jit(lambda m, x: m(x))(model, images), axis=-1))
  np.testing.assert_array_equal(sc.classifier(trained, batch_size=3)(images), expected)


def test_by_variant_means_and_sample_std_over_seeds():
  runs = {f'blur_pool-seed{i}': {'consistency': c, 'accuracy': a, 'shifted_accuracy': s}
          for i, (c, a, s) in enumerate([(0.9, 0.8, 0.7), (0.8, 0.6, 0.5), (0.7, 0.7, 0.6)])}
  runs['max-blur-seed0'] = {'consistency': 0.5, 'accuracy': 0.4, 'shifted_accuracy': 0.3}
  summary = sc.by_variant(runs)
  assert set(summary) == {'blur_pool', 'max-blur'}
  assert summary['blur_pool']['num_runs'] == 3
  assert summary['blur_pool']['consistency'] == pytest.approx(0.8)
  assert summary['blur_pool']['accuracy_std'] == pytest.approx(np.std([0.8, 0.6, 0.7], ddof=1))
  assert summary['max-blur']['shifted_accuracy_std'] == 0.0
  table = sc.markdown_table(summary)
  assert '| blur_pool | 3 | 80.00 ± 10.00 | 70.00 ± 10.00 | 60.00 ± 10.00 |' in table
  assert '| max-blur | 1 | 50.00 | 40.00 | 30.00 |' in table  # One run: no spread to show.


def test_expand_run_dirs_globs_dedupes_and_checks(tmp_path):
  for name in ('b-seed0', 'a-seed0'):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'config.json').write_text(json.dumps({}))
  (tmp_path / 'notes').mkdir()
  dirs = cli.expand_run_dirs([str(tmp_path / '*-seed0'), str(tmp_path / 'a-seed0')])
  assert dirs == [str(tmp_path / 'a-seed0'), str(tmp_path / 'b-seed0')]
  with pytest.raises(FileNotFoundError, match='notes'):
    cli.expand_run_dirs([str(tmp_path / '*')])
  with pytest.raises(FileNotFoundError, match='missing'):
    cli.expand_run_dirs([os.path.join(tmp_path, 'missing')])
  (tmp_path / 'other' / 'a-seed0').mkdir(parents=True)
  (tmp_path / 'other' / 'a-seed0' / 'config.json').write_text(json.dumps({}))
  with pytest.raises(ValueError, match=r"several runs named \['a-seed0'\]"):
    cli.expand_run_dirs([str(tmp_path / '*-seed0'), str(tmp_path / 'other' / '*')])


def _fake_run(path, task: str = 'classification', name: str = 'fashion_mnist',
              image_size: int = 32) -> str:
  os.makedirs(path)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    data = {**base.get_data_config().to_dict(), 'name': name, 'image_size': image_size}
    json.dump({'task': task, 'data': data}, f)
  return str(path)


def test_runs_are_refused_up_front_by_task(tmp_path):
  assert sc.classifier_config(_fake_run(tmp_path / 'a-seed0')).task == 'classification'
  with pytest.raises(ValueError, match=r"seg-seed0: task='segmentation'; shift consistency "
                                       'needs a classifier'):
    sc.classifier_config(_fake_run(tmp_path / 'seg-seed0', task='segmentation'))
  with pytest.raises(FileNotFoundError, match='is not a train.py workdir: it has no config.json'):
    trainer.load_config(str(tmp_path))

