"""Augmentations against the libraries they reproduce: TIMM_SPACE's ops
against timm's own RandAugment ops, WIDE_SPACE's against torchvision's
TrivialAugmentWide, the eval centre crop against torchvision's (all from the
interop extra)."""

import numpy as np
import pytest
from PIL import Image

from hierarchical_vit.data import transforms
from tests.conftest import import_optional

timm_aa = import_optional('timm.data.auto_augment')
tv_aa = import_optional('torchvision.transforms.autoaugment')
tv_transforms = import_optional('torchvision.transforms')

# Our name -> timm's, where they differ (same level rule, timm's name says
# 'increasing').
TIMM_NAMES = {'Color': 'ColorIncreasing', 'Contrast': 'ContrastIncreasing',
              'Brightness': 'BrightnessIncreasing', 'Sharpness': 'SharpnessIncreasing'}
IMAGENET_FILL = tuple(min(255, round(255 * m)) for m in transforms.MEAN_STD['imagenet2012'][0])


class _Draw:
  """Stands in for the generator: random() below 0.5 picks the positive sign."""

  def __init__(self, value):
    self.value = value

  def random(self):
    return self.value


def _image(h, w, c, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def test_timm_space_is_timms_increasing_randaugment_set():
  assert ([TIMM_NAMES.get(n, n) for n in transforms.TIMM_SPACE.ops]
          == timm_aa._RAND_INCREASING_TRANSFORMS)


@pytest.mark.parametrize('name', transforms.TIMM_SPACE.ops)
@pytest.mark.parametrize('magnitude', [3, 6.5, 9])
def test_timm_space_ops_are_timms(monkeypatch, name, magnitude):
  """Each op at magnitude m (level m / 10, positive sign) gives timm's pixels,
  with the fill and interpolation that timm's ImageNet transforms configure
  (Swin's: bicubic, fill = the data mean)."""
  monkeypatch.setattr(timm_aa, '_randomly_negate', lambda v: v)
  image = _image(40, 30, 3)
  timm_op = timm_aa.AugmentOp(TIMM_NAMES.get(name, name), prob=1.0, magnitude=magnitude,
                              hparams=dict(img_mean=IMAGENET_FILL, interpolation=Image.BICUBIC))
  expected = np.asarray(timm_op(Image.fromarray(image)))
  ours = transforms.apply_op(image, name, magnitude / 10, _Draw(0.1), transforms.TIMM_SPACE,
                             IMAGENET_FILL)
  np.testing.assert_array_equal(ours, expected)
  if name not in ('AutoContrast', 'Equalize'):
    assert (ours != image).any()  # The op acts at this magnitude.


def test_timm_posterize_at_full_magnitude_keeps_no_bits():
  """At m10 timm's PosterizeIncreasing keeps 0 bits (which Pillow >= 10
  refuses): every pixel goes to black."""
  image = _image(8, 8, 3)
  out = transforms.apply_op(image, 'PosterizeIncreasing', 1.0, _Draw(0.1), transforms.TIMM_SPACE)
  assert (out == 0).all()


def test_timm_space_fills_with_the_data_mean():
  image = np.full((16, 16, 1), 200, np.uint8)
  out = transforms.apply_op(image, 'Rotate', 1.0, _Draw(0.1), transforms.TIMM_SPACE, (73,))
  assert out[0, 0, 0] == 73 and out[8, 8, 0] == 200  # A corner leaves the image.
  out = transforms.apply_op(image, 'Rotate', 1.0, _Draw(0.1), transforms.RA_SPACE, (73,))
  assert out[0, 0, 0] == 0  # torchvision's spaces fill with 0.


def _tv_outputs(image, name, bin_, space=None):
  """torchvision's op at magnitude bin `bin_` of 31, both signs; `space` is
  torchvision's op space (default: TrivialAugmentWide's)."""
  space = space or tv_aa.TrivialAugmentWide()._augmentation_space(31)
  magnitudes, signed = space[name]
  magnitude = float(magnitudes[bin_]) if magnitudes.ndim else 0.0
  pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
  outs = []
  for m in ((magnitude, -magnitude) if signed else (magnitude,)):
    out = np.asarray(tv_aa._apply_op(pil, name, m, tv_aa.InterpolationMode.NEAREST, None))
    outs.append(out[..., None] if image.shape[2] == 1 else out)
  return outs


@pytest.mark.parametrize('name', transforms.WIDE_SPACE.ops)
@pytest.mark.parametrize('bin_', [4, 13, 22, 29])
@pytest.mark.parametrize('channels', [1, 3])
def test_wide_space_ops_are_torchvisions(name, bin_, channels):
  """Level k / 30 of each op gives torchvision's pixels at magnitude bin k,
  each of our two signs one of torchvision's two."""
  image = _image(40, 30, channels)
  expected = _tv_outputs(image, name, bin_)
  for u in (0.1, 0.9):
    ours = transforms.apply_op(image, name, bin_ / 30, _Draw(u), transforms.WIDE_SPACE)
    assert any(np.array_equal(ours, e) for e in expected), (name, u)
  if len(expected) == 2 and not np.array_equal(*expected):
    signs = [transforms.apply_op(image, name, bin_ / 30, _Draw(u), transforms.WIDE_SPACE)
             for u in (0.1, 0.9)]
    assert not np.array_equal(*signs)  # Both of torchvision's signs, not one twice.


@pytest.mark.parametrize('name', sorted(set(transforms.RA_SPACE.ops) - {'TranslateX',
                                                                        'TranslateY'}))
@pytest.mark.parametrize('bin_', [4, 22])
def test_ra_space_ops_are_torchvisions_randaugment(name, bin_):
  """RA_SPACE (randaugment, trivial_augment) at level k / 30, i.e. magnitude
  10 k / 30 on its 0-10 scale, is torchvision's RandAugment at bin k of 31;
  translations are timm's 0.45 of the side, not torchvision's 150 / 331."""
  image = _image(40, 30, 3)
  space = tv_aa.RandAugment()._augmentation_space(31, (40, 30))
  expected = _tv_outputs(image, name, bin_, space)
  for u in (0.1, 0.9):
    ours = transforms.apply_op(image, name, bin_ / 30, _Draw(u), transforms.RA_SPACE)
    assert any(np.array_equal(ours, e) for e in expected), (name, u)


@pytest.mark.parametrize('shape', [(300, 451), (451, 300), (257, 259), (224, 224), (100, 80)])
def test_centre_crop_is_torchvisions_imagenet_eval_view(shape):
  """Resize(256) (shorter side, bicubic) then CenterCrop(224): the 0.875 crop
  of timm's and torchvision's ImageNet evaluation, pixel for pixel."""
  image = _image(*shape, 3)
  view = tv_transforms.Compose([
      tv_transforms.Resize(256, interpolation=tv_transforms.InterpolationMode.BICUBIC),
      tv_transforms.CenterCrop(224)])
  np.testing.assert_array_equal(transforms.centre_crop(image, 224),
                                np.asarray(view(Image.fromarray(image))))
