"""Per-example transforms against plain numpy references."""

import numpy as np
import pytest

from hierarchical_vit.data import transforms


def _image(h, w, c=1, seed=0):
  return np.random.default_rng(seed).integers(1, 256, (h, w, c), dtype=np.uint8)


def test_pad_28_to_32_is_centred_zero_padding():
  image = _image(28, 28)
  np.testing.assert_array_equal(transforms.pad_or_crop(image, 32),
                                np.pad(image, ((2, 2), (2, 2), (0, 0))))


def test_pad_or_crop_crops_centre():
  image = _image(32, 30, 3)
  np.testing.assert_array_equal(transforms.pad_or_crop(image, 28),
                                np.pad(image[2:30], ((0, 0), (0, 0), (0, 0)))[:, 1:29])


def test_resize_mode_shape_and_constant_preserved():
  image = np.full((28, 28, 1), 77, np.uint8)
  out = transforms.ToSize(32, 'resize').map({'image': image, 'label': 0})['image']
  assert out.shape == (32, 32, 1) and (out == 77).all()


def test_crop_is_a_window_of_the_padded_image():
  image = _image(32, 32, 3)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  op = transforms.CropFlip(padding=4, hflip=False)
  windows = set()
  for seed in range(20):
    out = op.random_map({'image': image, 'label': 0}, np.random.default_rng(seed))['image']
    assert out.shape == image.shape
    windows.add(next((y, x) for y in range(9) for x in range(9)
                     if (padded[y:y + 32, x:x + 32] == out).all()))
  assert len(windows) > 5  # The offset is random, not fixed.


def test_crop_flip_flips_horizontally_about_half_the_time():
  image = _image(8, 8)
  op = transforms.CropFlip(padding=0, hflip=True)
  outs = [op.random_map({'image': image, 'label': 0}, np.random.default_rng(s))['image']
          for s in range(200)]
  flipped = sum((o == image[:, ::-1]).all() for o in outs)
  assert all((o == image).all() or (o == image[:, ::-1]).all() for o in outs)
  assert 60 < flipped < 140


def test_normalize_matches_reference():
  image = _image(4, 4, 3)
  mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
  out = transforms.Normalize(mean, std).map({'image': image, 'label': 7})
  expected = (image / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(out['image'], expected, rtol=1e-6, atol=1e-6)
  assert out['image'].dtype == np.float32 and out['label'].dtype == np.int32


@pytest.mark.parametrize('name', transforms.OP_NAMES)
@pytest.mark.parametrize('channels', [1, 3])
def test_augment_ops_keep_shape_and_dtype(name, channels):
  image = _image(32, 32, channels)
  out = transforms.apply_op(image, name, 1.0, np.random.default_rng(0))
  assert out.shape == image.shape and out.dtype == np.uint8


def test_geometric_ops_at_level_zero_are_identity():
  image = _image(16, 16, 3)
  for name in ('Identity', 'Rotate', 'ShearX', 'TranslateY', 'Brightness'):
    out = transforms.apply_op(image, name, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(out, image, err_msg=name)


@pytest.mark.parametrize('policy', ['trivial_augment', 'randaugment'])
def test_auto_augment_is_deterministic_given_rng(policy):
  image = _image(32, 32, 3)
  op = transforms.AutoAugment(policy, num_ops=2, magnitude=9)
  runs = [op.random_map({'image': image, 'label': 0}, np.random.default_rng(s))['image']
          for s in (5, 5, 6, 7, 8)]
  np.testing.assert_array_equal(runs[0], runs[1])
  assert any((r != image).any() for r in runs)


def test_random_erasing_changes_one_box_only():
  image = np.zeros((32, 32, 3), np.float32)
  out = transforms.RandomErasing(1.0).random_map(
      {'image': image, 'label': 0}, np.random.default_rng(1))['image']
  rows, cols = np.nonzero((out != 0).any(-1))
  box = out[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  assert (box != 0).all() and 0.02 <= box[..., 0].size / (32 * 32) <= 1 / 3


def test_centre_crop_and_random_resized_crop_shapes():
  image = _image(60, 90, 3)
  assert transforms.centre_crop(image, 32).shape == (32, 32, 3)
  out = transforms.random_resized_crop(image, 32, np.random.default_rng(0))
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_centre_crop_keeps_the_centre():
  """An image whose only marked pixels lie outside the centre square that a
  crop_fraction of 1 keeps (of the shorter side's size) loses them all."""
  image = np.zeros((40, 80, 1), np.uint8)
  image[:, :18] = image[:, -18:] = 255  # Left and right margins outside the 40x40 centre.
  image[10:30, 30:50] = 100  # Inside it.
  out = transforms.centre_crop(image, 40, crop_fraction=1.0)
  assert out.max() == 100 and (out == 100).sum() == 20 * 20


def test_random_resized_crop_samples_a_box_within_scale_and_ratio(monkeypatch):
  """Inception crop: a sub-array of the image with area fraction in scale and
  aspect ratio in ratio (up to rounding), resized to size."""
  image = _image(60, 90, 3)
  boxes = []
  real_resize = transforms.resize
  def recording_resize(crop, height, width):
    boxes.append(crop)
    return real_resize(crop, height, width)
  monkeypatch.setattr(transforms, 'resize', recording_resize)
  for seed in range(200):
    transforms.random_resized_crop(image, 32, np.random.default_rng(seed),
                                   scale=(0.2, 0.5), ratio=(0.5, 2.0))
  areas, aspects = [], []
  for crop in boxes:
    ch, cw = crop.shape[:2]
    assert np.shares_memory(crop, image)  # A view: a box of the image itself.
    areas.append(ch * cw / (60 * 90))
    aspects.append(cw / ch)
  assert 0.2 - 0.02 <= min(areas) and max(areas) <= 0.5 + 0.02
  assert 0.5 - 0.05 <= min(aspects) and max(aspects) <= 2.0 + 0.1
  assert max(areas) - min(areas) > 0.2 and max(aspects) / min(aspects) > 3  # Spread.
