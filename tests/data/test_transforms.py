"""Per-example transforms against plain numpy references."""

import numpy as np
import pytest
from PIL import Image

from hierarchical_vit.data import prepare, transforms
from tests.data.conftest import FASHION_MNIST_SOURCE


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


ALL_OPS = sorted(set(transforms.RA_SPACE.ops) | set(transforms.TIMM_SPACE.ops))


@pytest.mark.parametrize('name', ALL_OPS)
@pytest.mark.parametrize('channels', [1, 3])
def test_augment_ops_keep_shape_and_dtype(name, channels):
  image = _image(32, 32, channels)
  out = transforms.apply_op(image, name, 1.0, np.random.default_rng(0), transforms.TIMM_SPACE,
                            (120, 110, 100))
  assert out.shape == image.shape and out.dtype == np.uint8


# Ops whose strength grows from nothing at level 0 (AutoContrast and Equalize
# take no level): the module's table says Rotate/Shear/Translate 0,
# SolarizeIncreasing threshold 256, SolarizeAdd 0, Posterize 8 bits and
# enhancer factor 1 at level 0. (torchvision's Solarize, threshold 255 at level
# 0, inverts the 255s; timm's PosterizeIncreasing keeps 4 bits.)
LEVELLED_OPS = ('Identity', 'Rotate', 'SolarizeIncreasing', 'SolarizeAdd', 'Posterize',
                'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
                'TranslateX', 'TranslateY', 'TranslateXRel', 'TranslateYRel')


class _Draw:
  """Stands in for the generator: its random() decides a signed op's sign."""

  def __init__(self, value):
    self.value = value

  def random(self):
    return self.value


def _both_signs(image, name, level, space=transforms.RA_SPACE):
  """The op's outputs for a low and a high random draw (one per sign)."""
  return [transforms.apply_op(image, name, level, _Draw(u), space) for u in (0.1, 0.9)]


def _assert_one_each(outs, expected_a, expected_b, atol=0):
  """outs are the two signs' outputs: one matches each expectation."""
  def close(x, y):
    return np.abs(x.astype(int) - y.astype(int)).max() <= atol
  assert ((close(outs[0], expected_a) and close(outs[1], expected_b)) or
          (close(outs[0], expected_b) and close(outs[1], expected_a)))


@pytest.mark.parametrize('name', LEVELLED_OPS)
def test_ops_at_level_zero_are_identity(name):
  image = _image(16, 16, 3)
  for out in _both_signs(image, name, 0.0):
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize('channels', [1, 3])
def test_solarize_inverts_pixels_at_or_above_the_threshold(channels):
  image = _image(16, 16, channels)
  # Level 0.25: threshold 256 * (1 - 0.25) = 192 (an inverted level gives 64).
  expected = np.where(image >= 192, 255 - image, image)
  for out in _both_signs(image, 'Solarize', 0.25):
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize('channels', [1, 3])
def test_posterize_keeps_the_top_bits(channels):
  image = _image(16, 16, channels)
  # Level 0.75: 8 - round(4 * 0.75) = 5 bits kept (an inverted level keeps 7).
  for out in _both_signs(image, 'Posterize', 0.75):
    np.testing.assert_array_equal(out, image & 0b11111000)


def _narrow_image(channels, size=16):
  """Pixels in [60, 180), per channel ranges differing, so contrast ops act."""
  rng = np.random.default_rng(3)
  image = rng.integers(60, 180, (size, size, channels))
  return (image - np.arange(channels) * 20).astype(np.uint8)


@pytest.mark.parametrize('channels', [1, 3])
def test_autocontrast_stretches_each_channel_to_0_255(channels):
  image = _narrow_image(channels)
  x = image.astype(np.float64)
  low, high = x.min((0, 1)), x.max((0, 1))
  # PIL's lookup, int(v * scale + offset), can give 254 for the top value.
  scale = 255 / (high - low)
  expected = np.clip(np.floor(x * scale - low * scale), 0, 255)
  np.testing.assert_array_equal(
      transforms.apply_op(image, 'AutoContrast', 0.6, _Draw(0.1)), expected)


def _equalize_channel(channel):
  """PIL's equalize on one uint8 channel, step by step: the lookup maps value
  v to (step // 2 + #pixels below v) // step (at most 255), where step is the
  pixel count without the top value's, over 255."""
  counts = np.bincount(channel.ravel(), minlength=256)
  present = counts[counts > 0]
  step = (present.sum() - present[-1]) // 255
  assert step > 0  # PIL leaves the channel as it is otherwise.
  below = np.concatenate([[0], np.cumsum(counts)[:-1]])
  return np.minimum((step // 2 + below) // step, 255)[channel]


@pytest.mark.parametrize('channels', [1, 3])
def test_equalize_flattens_each_channels_histogram(channels):
  image = _narrow_image(channels, size=48)  # Enough pixels for step > 1.
  expected = np.stack([_equalize_channel(image[..., c])
                       for c in range(channels)], -1)
  out = transforms.apply_op(image, 'Equalize', 0.6, _Draw(0.1))
  np.testing.assert_array_equal(out, expected)
  assert out.min() == 0 and out.max() > 240  # Spread over the full range.


def _luma(x):
  """PIL's 'L' conversion (ITU-R 601-2) of float pixels (H, W, C)."""
  if x.shape[2] == 1:
    return x
  return (x * np.array([0.299, 0.587, 0.114])).sum(-1, keepdims=True)


def _blend(degenerate, x, factor):
  """ImageEnhance: degenerate + factor * (x - degenerate), truncated, clipped."""
  return np.clip(np.floor(degenerate + factor * (x - degenerate)), 0, 255)


def _smooth(x):
  """PIL's SMOOTH filter (3x3, centre 5, others 1, / 13, rounded); the border
  pixels stay as they are."""
  kernel = np.ones((3, 3))
  kernel[1, 1] = 5
  out = x.copy()
  h, w = x.shape[:2]
  out[1:-1, 1:-1] = np.round(sum(
      kernel[i, j] * x[i:i + h - 2, j:j + w - 2]
      for i in range(3) for j in range(3)) / 13)
  return out


# Each enhancer's degenerate image (what factor 0 gives), from float pixels.
DEGENERATE = {
    'Brightness': np.zeros_like,
    'Contrast': lambda x: np.full_like(x, np.round(_luma(x).mean())),
    'Color': _luma,
    'Sharpness': _smooth,
}


@pytest.mark.parametrize('name', sorted(DEGENERATE))
@pytest.mark.parametrize('channels', [1, 3])
def test_enhancers_scale_by_one_plus_or_minus_0_9_level(name, channels):
  image = _narrow_image(channels)
  x = image.astype(np.float64)
  degenerate = DEGENERATE[name](x)
  # Level 0.6: factors 1 + 0.54 and 1 - 0.54 (an inverted level, 0.4, gives
  # 1 +- 0.36). atol 1: PIL blends in float32 and rounds luma in integers.
  _assert_one_each(_both_signs(image, name, 0.6),
                   _blend(degenerate, x, 1.54), _blend(degenerate, x, 0.46),
                   atol=1)


def _shift(image, dy, dx):
  """out[y, x] = image[y + dy, x + dx], zero outside (content moves by -d)."""
  h, w = image.shape[:2]
  padded = np.zeros((h + 2 * abs(dy), w + 2 * abs(dx), image.shape[2]),
                    image.dtype)
  padded[abs(dy):abs(dy) + h, abs(dx):abs(dx) + w] = image
  return padded[abs(dy) + dy:abs(dy) + dy + h, abs(dx) + dx:abs(dx) + dx + w]


@pytest.mark.parametrize('channels', [1, 3])
def test_translate_moves_by_0_45_level_of_its_own_side(channels):
  # 20 rows x 30 columns at level 2/3: 0.45 * 2/3 of the side is 9 columns
  # (TranslateX) or 6 rows (TranslateY), either direction. atol 1: the
  # offsets are 9 and 6 only up to float rounding.
  image = _image(20, 30, channels)
  _assert_one_each(_both_signs(image, 'TranslateX', 2 / 3),
                   _shift(image, 0, 9), _shift(image, 0, -9), atol=1)
  _assert_one_each(_both_signs(image, 'TranslateY', 2 / 3),
                   _shift(image, 6, 0), _shift(image, -6, 0), atol=1)


def _pil(image):
  return Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)


def _array(pil, channels):
  array = np.asarray(pil)
  return array[..., None] if channels == 1 else array


@pytest.mark.parametrize('channels', [1, 3])
def test_shear_matches_pil_affine_on_its_own_axis(channels):
  # Level 0.6: shear 0.3 * 0.6 = 0.18 either way. Output (x, y) samples input
  # (x + s * y, y) for ShearX and (x, s * x + y) for ShearY.
  image = _image(20, 30, channels)
  def sheared(coeffs):
    return _array(_pil(image).transform((30, 20), Image.AFFINE, coeffs,
                                        Image.NEAREST, fillcolor=0), channels)
  _assert_one_each(_both_signs(image, 'ShearX', 0.6),
                   sheared((1, 0.18, 0, 0, 1, 0)),
                   sheared((1, -0.18, 0, 0, 1, 0)), atol=1)
  _assert_one_each(_both_signs(image, 'ShearY', 0.6),
                   sheared((1, 0, 0, 0.18, 1, 0)),
                   sheared((1, 0, 0, -0.18, 1, 0)), atol=1)


@pytest.mark.parametrize('channels', [1, 3])
def test_rotate_turns_by_30_level_degrees(channels):
  image = _image(20, 30, channels)
  def rotated(degrees):
    return _array(_pil(image).rotate(degrees, Image.NEAREST, fillcolor=0),
                  channels)
  # Level 0.6: 18 degrees either way (an inverted level gives 12).
  _assert_one_each(_both_signs(image, 'Rotate', 0.6), rotated(18),
                   rotated(-18), atol=1)


def test_rand_augment_applies_num_ops_at_magnitude_over_10(monkeypatch):
  calls = []
  monkeypatch.setattr(transforms, 'apply_op',
                      lambda image, name, level, rng, space=None, mean_fill=None: calls.append(
                          (name, level)) or image)
  image = _image(8, 8)
  for seed in range(10):
    transforms.rand_augment(image, np.random.default_rng(seed), num_ops=3,
                            magnitude=7)
  assert len(calls) == 30 and {level for _, level in calls} == {0.7}
  assert len({name for name, _ in calls}) > 5  # Random ops, not a fixed one.


@pytest.mark.parametrize('policy', ['trivial_augment', 'randaugment'])
def test_auto_augment_is_deterministic_given_rng(policy):
  image = _image(32, 32, 3)
  op = transforms.AutoAugment(policy, num_ops=2, magnitude=9)
  runs = [op.random_map({'image': image, 'label': 0}, np.random.default_rng(s))['image']
          for s in (5, 5, 6, 7, 8)]
  np.testing.assert_array_equal(runs[0], runs[1])
  assert any((r != image).any() for r in runs)


def test_random_erasing_fills_one_box_with_standard_normal_noise():
  """timm's mode='pixel': one box per image, area in [2%, 1/3] of it, aspect
  in [0.3, 1/0.3], filled with N(0, 1) per pixel and channel (over 200 images:
  mean 0, std 1, and the boxes' aspects spread over the range)."""
  image = np.zeros((32, 32, 3), np.float32)
  rng = np.random.default_rng(1)
  noise, aspects = [], []
  for _ in range(200):
    out = transforms.RandomErasing(1.0).random_map({'image': image, 'label': 0}, rng)['image']
    rows, cols = np.nonzero((out != 0).any(-1))
    box = out[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    # The sides are rounded: a 4 x 5 box of a 20.5-pixel target reads 1.95%.
    assert (box != 0).all() and 0.015 <= box[..., 0].size / (32 * 32) <= 0.36
    noise.append(box.ravel())
    aspects.append(box.shape[0] / box.shape[1])
  noise = np.concatenate(noise)
  assert abs(noise.mean()) < 0.02 and noise.std() == pytest.approx(1.0, abs=0.02)
  assert 0.25 < min(aspects) < 0.45 and 2.2 < max(aspects) < 4.0


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
  def recording_resize(crop, height, width, resample):
    assert resample == Image.BICUBIC  # As Swin's and DeiT's ImageNet pipelines.
    boxes.append(crop)
    return real_resize(crop, height, width, resample)
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


def test_fashion_mnist_mean_std_are_the_train_splits():
  pixels = prepare.read_idx(f'{FASHION_MNIST_SOURCE}/train-images-idx3-ubyte.gz') / 255.0
  (mean,), (std,) = transforms.MEAN_STD['fashion_mnist']
  assert (mean, std) == pytest.approx((pixels.mean(), pixels.std()), abs=6e-5)


def test_trivial_augment_draws_one_op_at_one_of_31_levels(monkeypatch):
  calls = []
  monkeypatch.setattr(transforms, 'apply_op',
                      lambda image, name, level, rng, space=None, mean_fill=None: calls.append(
                          (name, level, space)) or image)
  rng = np.random.default_rng(0)
  for _ in range(2000):
    transforms.trivial_augment(np.zeros((4, 4, 1), np.uint8), rng)
  assert {level for _, level, _ in calls} == {k / 30 for k in range(31)}
  assert {name for name, _, _ in calls} == set(transforms.RA_SPACE.ops)
  assert {space for _, _, space in calls} == {transforms.RA_SPACE}
  calls.clear()
  op = transforms.AutoAugment('trivial_augment_wide')
  op.random_map({'image': np.zeros((4, 4, 1), np.uint8), 'label': 0}, rng)
  assert [space for _, _, space in calls] == [transforms.WIDE_SPACE]


@pytest.mark.parametrize('channels', [1, 3])
def test_wide_ranges_are_trivial_augments_published_ones(channels):
  """TrivialAugment's wide space at level 2/3: rotate 90 degrees, shear 0.66,
  enhance 1 +- 0.66, posterize to 4 bits; at level 3/4, translate 24 pixels
  whatever the side."""
  wide, level = transforms.WIDE_SPACE, 2 / 3
  image = _image(40, 30, channels)
  rotated = lambda deg: _array(_pil(image).rotate(deg, Image.NEAREST, fillcolor=0), channels)
  _assert_one_each(_both_signs(image, 'Rotate', level, wide), rotated(90), rotated(-90), atol=1)
  sheared = lambda c: _array(_pil(image).transform((30, 40), Image.AFFINE, c, Image.NEAREST,
                                                   fillcolor=0), channels)
  _assert_one_each(_both_signs(image, 'ShearX', level, wide),
                   sheared((1, 0.66, 0, 0, 1, 0)), sheared((1, -0.66, 0, 0, 1, 0)), atol=1)
  _assert_one_each(_both_signs(image, 'TranslateX', 0.75, wide),
                   _shift(image, 0, 24), _shift(image, 0, -24), atol=1)
  _assert_one_each(_both_signs(image, 'TranslateY', 0.75, wide),
                   _shift(image, 24, 0), _shift(image, -24, 0), atol=1)
  for out in _both_signs(image, 'Posterize', level, wide):
    np.testing.assert_array_equal(out, image & 0b11110000)
  narrow = _narrow_image(channels)
  x = narrow.astype(np.float64)
  _assert_one_each(_both_signs(narrow, 'Brightness', level, wide),
                   _blend(DEGENERATE['Brightness'](x), x, 1.66),
                   _blend(DEGENERATE['Brightness'](x), x, 0.34), atol=1)


def test_rand_augment_op_probability_and_magnitude_noise(monkeypatch):
  """timm's recipe: each op applied with probability prob, at a magnitude drawn
  from N(m, std) and clipped to [0, 10]."""
  calls = []
  monkeypatch.setattr(transforms, 'apply_op',
                      lambda image, name, level, rng, space=None, mean_fill=None:
                      calls.append(level) or image)
  rng = np.random.default_rng(0)
  for _ in range(2000):
    transforms.rand_augment(_image(4, 4), rng, num_ops=2, magnitude=9, prob=0.5,
                            magnitude_std=0.5)
  levels = np.array(calls)
  assert 1900 < len(levels) < 2100  # Half of 4000 ops.
  assert levels.max() == 1.0 and 0.4 < levels.min()  # Clipped at 10; N(9, 0.5) above 6.
  # Below the clip, N(9, 0.5) truncated at 10 has mean 9 - 0.5 phi(2) / Phi(2) = 8.972.
  assert abs(np.mean(levels[levels < 1.0]) - 0.8972) < 0.005 and 0.04 < levels.std() < 0.055


@pytest.mark.parametrize('field, value', [('prob', 1.5), ('magnitude_std', -1.0),
                                          ('magnitude', 11.0)])
def test_rand_augment_options_are_checked_by_name(field, value):
  with pytest.raises(ValueError, match=rf'data.randaugment_{field}={value} is not valid'):
    transforms.AutoAugment('randaugment', **{field: value})
  with pytest.raises(ValueError, match=r"data.augment='ra' is not valid; valid choices: "
                                       r"\['randaugment', 'randaugment_timm', 'trivial_augment', "
                                       r"'trivial_augment_wide'\], or '' \(off\)"):
    transforms.AutoAugment('ra')


def test_random_resized_crop_falls_back_to_the_clamped_central_box(monkeypatch):
  """No box of the whole area fits a 10 x 200 image: torchvision's fallback
  takes the central 10 x 13 box (aspect clamped to 4/3)."""
  image = _image(10, 200, 3)
  boxes = []
  real_resize = transforms.resize
  monkeypatch.setattr(transforms, 'resize', lambda crop, h, w, resample: boxes.append(
      crop) or real_resize(crop, h, w, resample))
  out = transforms.random_resized_crop(image, 16, np.random.default_rng(0), scale=(1.0, 1.0))
  assert out.shape == (16, 16, 3)
  np.testing.assert_array_equal(boxes[-1], image[:, 93:106])


@pytest.mark.parametrize('policy, space, mean_fill', [
    ('randaugment', transforms.RA_SPACE, (0,)),
    ('randaugment_timm', transforms.TIMM_SPACE, (124, 116, 104)),
])
def test_randaugment_policies_use_their_space(monkeypatch, policy, space, mean_fill):
  calls = []
  monkeypatch.setattr(transforms, 'apply_op',
                      lambda image, name, level, rng, space=None, mean_fill=None: calls.append(
                          (name, space, mean_fill)) or image)
  op = transforms.AutoAugment(policy, num_ops=2, magnitude=9, mean_fill=(124, 116, 104))
  rng = np.random.default_rng(0)
  for _ in range(200):
    op.random_map({'image': np.zeros((4, 4, 3), np.uint8), 'label': 0}, rng)
  assert {name for name, _, _ in calls} == set(space.ops)
  assert {(s, f) for _, s, f in calls} == {(space, mean_fill)}


def test_random_resized_crops_differ_between_draws():
  """The Inception crop is random: not a fixed (e.g. centre) view."""
  image = _image(60, 90, 3)
  crops = [transforms.random_resized_crop(image, 32, np.random.default_rng(seed))
           for seed in range(8)]
  assert len({c.tobytes() for c in crops}) == 8
