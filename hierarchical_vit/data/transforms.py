"""Per-example preprocessing as grain transforms (numpy + pillow).

Examples are dicts {'image': (H, W, C), 'label': int}, or for segmentation
{'image': (H, W, C), 'label': uint8 (H, W, 1)}: geometric transforms built with
`dense_label=True` move such per-pixel labels with the image (nearest
neighbour, IGNORE_INDEX where they pad). Random transforms are
`grain.transforms.RandomMap`s: grain hands them an `np.random.Generator` seeded
from the pipeline seed and the example's position, so augmentation is
reproducible and resumes exactly from a checkpointed iterator state.

Order for training: to_size (or random_resized_crop for variable-size images)
-> random crop + flip -> TrivialAugment / RandAugment (on uint8) -> normalize
-> random erasing (on normalized floats, as timm does).
"""

import dataclasses
import math
from collections.abc import Callable, Sequence

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# Per-channel mean / std in [0, 1] units.
MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    'fashion_mnist': ((0.2860,), (0.3530,)),
    'mnist': ((0.1307,), (0.3081,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'imagenet2012': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Measured on 2000 train canvases (mostly black background).
    'fashion_mnist_canvas': ((0.1375,), (0.2839,)),
    'oxford_iiit_pet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Per-pixel label of pixels that count for neither loss nor metrics: padding,
# and unsure annotations (oxford_iiit_pet's trimap border).
IGNORE_INDEX = 255
# Eval resize: the shorter side goes to image_size / CROP_FRACTION, then the
# centre image_size square is kept (the standard ImageNet protocol).
CROP_FRACTION = 0.875


# ---------------------------------------------------------------------------
# Geometry (pure functions on arrays).


def pad_or_crop(image: np.ndarray, size: int, fill: int = 0) -> np.ndarray:
  """Centre pads (with fill) or centre-crops: (H, W, C) -> (size, size, C)."""
  out = np.full((size, size, image.shape[2]), fill, image.dtype)
  (src_y, dst_y), (src_x, dst_x) = (_centre_slices(n, size)
                                    for n in image.shape[:2])
  out[dst_y, dst_x] = image[src_y, src_x]
  return out


def _centre_slices(n: int, size: int) -> tuple[slice, slice]:
  """(source, destination) slices centring a length-n axis in length size."""
  if n >= size:
    start = (n - size) // 2
    return slice(start, start + size), slice(0, size)
  start = (size - n) // 2
  return slice(0, n), slice(start, start + n)


def resize(image: np.ndarray, height: int, width: int,
           resample: Image.Resampling = Image.BILINEAR) -> np.ndarray:
  """Resizes a uint8 image: (H, W, C) -> (height, width, C)."""
  if image.shape[:2] == (height, width):
    return image
  pil = _to_pil(image).resize((width, height), resample)
  return _from_pil(pil, image.shape[2])


RESIZE_MODES = ('pad', 'resize')


def _check_choice(field: str, value: str, choices) -> None:
  if value not in choices:
    raise ValueError(f'{field}={value!r} is not valid; valid choices: {sorted(choices)}.')


def _check_count(field: str, value: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f'{field}={value!r} is not valid; valid: an integer >= 0.')


def to_size(image: np.ndarray, size: int, mode: str,
            dense_label: bool = False) -> np.ndarray:
  """(H, W, C) -> (size, size, C) by 'pad' (centre pad / crop) or 'resize'.

  dense_label: the array is a per-pixel label map, so it is resized by nearest
  neighbour (no blended class ids) and padded with IGNORE_INDEX.
  """
  _check_choice('data.resize_mode', mode, RESIZE_MODES)
  if mode == 'pad':
    return pad_or_crop(image, size, IGNORE_INDEX if dense_label else 0)
  return resize(image, size, size, Image.NEAREST if dense_label else Image.BILINEAR)


def pad_crop(image: np.ndarray, padding: int, y: int, x: int,
             fill: int = 0) -> np.ndarray:
  """Pads each side by `padding` with fill, then takes the (H, W) window at (y, x)."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)),
                  constant_values=fill)
  return padded[y:y + h, x:x + w]


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)
                        ) -> np.ndarray:
  """Inception crop (torchvision's RandomResizedCrop): (H, W, C) -> (size, size, C).

  Bicubic, as Swin's and DeiT's ImageNet pipelines resize.
  """
  h, w = image.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw = round(math.sqrt(area * aspect))
    ch = round(math.sqrt(area / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      y = rng.integers(0, h - ch + 1)
      x = rng.integers(0, w - cw + 1)
      return resize(image[y:y + ch, x:x + cw], size, size, Image.BICUBIC)
  # Rare fallback for extreme aspect ratios, as torchvision's: the central box
  # of the whole image with its aspect ratio clamped into `ratio`.
  ch, cw = h, w
  if w / h < ratio[0]:
    ch = round(w / ratio[0])
  elif w / h > ratio[1]:
    cw = round(h * ratio[1])
  y, x = (h - ch) // 2, (w - cw) // 2
  return resize(image[y:y + ch, x:x + cw], size, size, Image.BICUBIC)


def centre_crop(image: np.ndarray, size: int, crop_fraction: float = CROP_FRACTION,
                margin: int = 0) -> np.ndarray:
  """torchvision's (and timm's) eval view: Resize(floor(size / crop_fraction)),
  bicubic, on the shorter side (the longer one truncated to keep the aspect),
  then CenterCrop(size), offsets rounded. (H, W, C) -> (size, size, C).

  margin > 0 widens that crop by `margin` pixels per side around it:
  (size + 2 margin, size + 2 margin, C), whose centre is the plain view.
  """
  h, w = image.shape[:2]
  short = math.floor(size / crop_fraction)
  height, width = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
  image = resize(image, height, width, Image.BICUBIC)
  top, left = round((height - size) / 2) - margin, round((width - size) / 2) - margin
  view = size + 2 * margin
  if min(top, left) < 0 or top + view > height or left + view > width:
    raise ValueError(f'margin={margin} does not fit around the {size}-pixel view of a '
                     f'{height} x {width} resize')
  return image[top:top + view, left:left + view]


def normalize(image: np.ndarray, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """uint8 (H, W, C) -> float32 (x / 255 - mean) / std per channel."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (image.astype(np.float32) / 255.0 - mean) / std


def random_erase(image: np.ndarray, rng: np.random.Generator,
                 area: tuple[float, float] = (0.02, 1 / 3),
                 log_ratio: tuple[float, float] = (math.log(0.3),
                                                   math.log(1 / 0.3))
                 ) -> np.ndarray:
  """Replaces a random box of a normalized image with N(0, 1) noise.

  timm's RandomErasing(mode='pixel'): noise in normalized units looks like
  the data's own pixel statistics.
  """
  h, w, c = image.shape
  for _ in range(10):
    target = h * w * rng.uniform(*area)
    aspect = math.exp(rng.uniform(*log_ratio))
    eh = round(math.sqrt(target * aspect))
    ew = round(math.sqrt(target / aspect))
    if 0 < eh < h and 0 < ew < w:
      y = rng.integers(0, h - eh + 1)
      x = rng.integers(0, w - ew + 1)
      image = image.copy()
      image[y:y + eh, x:x + ew] = rng.standard_normal((eh, ew, c))
      return image
  return image


# ---------------------------------------------------------------------------
# TrivialAugment / RandAugment.
#
# Each op takes a strength level in [0, 1], scaled by an OpSpace; signed ops
# pick the sign at random. RandAugment applies `num_ops` random ops at level =
# magnitude / 10 (the paper's and timm's scale, so the usual m9 is 0.9);
# TrivialAugment applies one random op at a level drawn uniformly from 31 bins
# in [0, 1].


@dataclasses.dataclass(frozen=True)
class OpSpace:
  """An augmentation space: its ops, what level 1 means for each, and how the
  geometric ops (Rotate, Shear, Translate) resample and fill."""
  ops: tuple[str, ...]
  rotate: float            # Degrees.
  shear: float
  translate: float         # A fraction of the side, or pixels with translate_pixels.
  translate_pixels: bool
  enhance: float           # Color, Contrast, Brightness, Sharpness: factor 1 +- this.
  posterize: int           # Posterize: bits dropped (of 8); PosterizeIncreasing: bits kept at level 0.
  resample: Image.Resampling
  fill_mean: bool          # Uncovered pixels get the data mean (timm), else 0 (torchvision).


# torchvision's RandAugment / TrivialAugmentWide ops, with its defaults:
# nearest-neighbour geometry filled with 0.
_TORCHVISION_OPS = ('Identity', 'AutoContrast', 'Equalize', 'Rotate', 'Solarize', 'Posterize',
                    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
                    'TranslateX', 'TranslateY')
# RandAugment's ranges (timm's, on the 0-10 scale) in torchvision's ops, under
# torchvision's rules (e.g. posterize rounds, enhancers are 1 +- 0.9 level);
# TrivialAugment in it is close to the paper's "TA (RA)", not its code's rules.
RA_SPACE = OpSpace(_TORCHVISION_OPS, rotate=30.0, shear=0.3, translate=0.45,
                   translate_pixels=False, enhance=0.9, posterize=4,
                   resample=Image.NEAREST, fill_mean=False)
# TrivialAugment's own wide space (Mueller & Hutter 2021, Table 2; torchvision's
# TrivialAugmentWide): translations in pixels whatever the image size.
WIDE_SPACE = OpSpace(_TORCHVISION_OPS, rotate=135.0, shear=0.99, translate=32.0,
                     translate_pixels=True, enhance=0.99, posterize=6,
                     resample=Image.NEAREST, fill_mean=False)
# timm's increasing RandAugment ('rand-m*-inc1', Swin's and DeiT's recipes):
# Invert and SolarizeAdd instead of Identity, posterize to 4 down to 0 bits,
# solarize and translate as timm rounds them, geometry bicubic (their configured
# interpolation) filled with the data mean.
TIMM_SPACE = OpSpace(('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
                      'SolarizeIncreasing', 'SolarizeAdd', 'Color', 'Contrast', 'Brightness',
                      'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'),
                     rotate=30.0, shear=0.3, translate=0.45, translate_pixels=False,
                     enhance=0.9, posterize=4, resample=Image.BICUBIC, fill_mean=True)


def _signed(level: float, rng: np.random.Generator) -> float:
  return level if rng.random() < 0.5 else -level


def _affine(img: Image.Image, coeffs: tuple[float, ...], space: OpSpace, fill) -> Image.Image:
  return img.transform(img.size, Image.AFFINE, coeffs, space.resample, fillcolor=fill)


def _enhance(enhancer) -> Callable:
  return lambda img, level, rng, s, fill: enhancer(img).enhance(
      1.0 + s.enhance * _signed(level, rng))


def _translate(img: Image.Image, axis: int, level: float, rng: np.random.Generator,
               space: OpSpace, fill, whole_pixels: bool) -> Image.Image:
  side = 1.0 if space.translate_pixels else img.size[axis]
  offset = space.translate * _signed(level, rng) * side  # timm's rounding order.
  if whole_pixels:
    offset = int(offset)
  coeffs = (1, 0, offset, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, offset)
  return _affine(img, coeffs, space, fill)


def _solarize_add(img: Image.Image, level: float) -> Image.Image:
  """Adds int(110 level) to pixels below 128, clipped at 255 (timm's SolarizeAdd)."""
  add = int(110 * level)
  return img.point([min(255, i + add) if i < 128 else i for i in range(256)] * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
  """Keeps the top `bits` bits; 0 bits gives black (PIL >= 10 refuses 0)."""
  return ImageOps.posterize(img, bits) if bits else img.point([0] * 256 * len(img.getbands()))


# Op(img, level, rng, space, fill) -> img; fill is the PIL fill colour of geometric ops.
_OPS: dict[str, Callable[[Image.Image, float, np.random.Generator, OpSpace, object],
                         Image.Image]] = {
    'Identity': lambda img, level, rng, s, fill: img,
    'AutoContrast': lambda img, level, rng, s, fill: ImageOps.autocontrast(img),
    'Equalize': lambda img, level, rng, s, fill: ImageOps.equalize(img),
    'Invert': lambda img, level, rng, s, fill: ImageOps.invert(img),
    'Rotate': lambda img, level, rng, s, fill: img.rotate(
        s.rotate * _signed(level, rng), s.resample, fillcolor=fill),
    # Pixels at or above the threshold are inverted: torchvision's 255 (1 - level)
    # (255s invert at level 0; rounded so that whole thresholds stay whole),
    # timm's 256 - int(256 level).
    'Solarize': lambda img, level, rng, s, fill: ImageOps.solarize(
        img, round(255.0 * (1.0 - level), 6)),
    'SolarizeIncreasing': lambda img, level, rng, s, fill: ImageOps.solarize(
        img, 256 - int(256 * level)),
    'SolarizeAdd': lambda img, level, rng, s, fill: _solarize_add(img, level),
    # torchvision's: 8 - round(posterize * level) bits kept.
    'Posterize': lambda img, level, rng, s, fill: ImageOps.posterize(
        img, 8 - round(s.posterize * level)),
    # timm's: posterize - int(posterize * level) bits kept (4 at level 0, 1 at m9).
    'PosterizeIncreasing': lambda img, level, rng, s, fill: _posterize(
        img, s.posterize - int(s.posterize * level)),
    'Color': _enhance(ImageEnhance.Color),
    'Contrast': _enhance(ImageEnhance.Contrast),
    'Brightness': _enhance(ImageEnhance.Brightness),
    'Sharpness': _enhance(ImageEnhance.Sharpness),
    'ShearX': lambda img, level, rng, s, fill: _affine(
        img, (1, s.shear * _signed(level, rng), 0, 0, 1, 0), s, fill),
    'ShearY': lambda img, level, rng, s, fill: _affine(
        img, (1, 0, 0, s.shear * _signed(level, rng), 1, 0), s, fill),
    # torchvision's move by whole pixels (truncated), timm's Rel ones by fractions.
    'TranslateX': lambda img, level, rng, s, fill: _translate(img, 0, level, rng, s, fill, True),
    'TranslateY': lambda img, level, rng, s, fill: _translate(img, 1, level, rng, s, fill, True),
    'TranslateXRel': lambda img, level, rng, s, fill: _translate(img, 0, level, rng, s, fill,
                                                                 False),
    'TranslateYRel': lambda img, level, rng, s, fill: _translate(img, 1, level, rng, s, fill,
                                                                 False),
}


def apply_op(image: np.ndarray, name: str, level: float, rng: np.random.Generator,
             space: OpSpace = RA_SPACE, mean_fill: tuple[int, ...] = (0,)) -> np.ndarray:
  """Applies augmentation op `name` at strength level in [0, 1] to uint8 (H, W, C).

  mean_fill: the data mean in 0-255, one value per channel or one for all;
  geometric ops fill with it in spaces with fill_mean.
  """
  channels = image.shape[2]
  fill = 0
  if space.fill_mean:
    fill = mean_fill[0] if channels == 1 else tuple(np.broadcast_to(mean_fill, channels).tolist())
  return _from_pil(_OPS[name](_to_pil(image), level, rng, space, fill), channels)


def rand_augment(image: np.ndarray, rng: np.random.Generator, num_ops: int,
                 magnitude: float, prob: float = 1.0, magnitude_std: float = 0.0,
                 space: OpSpace = RA_SPACE, mean_fill: tuple[int, ...] = (0,)) -> np.ndarray:
  """RandAugment (Cubuk et al. 2020): num_ops random ops of `space` at magnitude / 10.

  As in timm's recipes (rand-m9-mstd0.5, Swin's), each op may apply only with
  probability `prob`, at a magnitude drawn from N(magnitude, magnitude_std)
  and clipped to [0, 10]; the defaults are the paper's fixed RandAugment.
  """
  for name in rng.choice(space.ops, size=num_ops):
    if prob < 1.0 and rng.random() >= prob:
      continue
    level = magnitude
    if magnitude_std > 0:
      level = float(np.clip(rng.normal(magnitude, magnitude_std), 0.0, 10.0))
    image = apply_op(image, str(name), level / 10.0, rng, space, mean_fill)
  return image


def trivial_augment(image: np.ndarray, rng: np.random.Generator,
                    space: OpSpace = RA_SPACE) -> np.ndarray:
  """TrivialAugment (Mueller & Hutter 2021): one random op at a random level."""
  name = str(rng.choice(space.ops))
  return apply_op(image, name, rng.integers(0, 31) / 30.0, rng, space)


# data.augment -> fn(image, rng, the AutoAugment transform holding its options).
AUGMENTS = {
    'trivial_augment': lambda image, rng, options: trivial_augment(image, rng, RA_SPACE),
    'trivial_augment_wide': lambda image, rng, options: trivial_augment(image, rng, WIDE_SPACE),
    'randaugment': lambda image, rng, options: rand_augment(
        image, rng, options.num_ops, options.magnitude, options.prob, options.magnitude_std),
    'randaugment_timm': lambda image, rng, options: rand_augment(
        image, rng, options.num_ops, options.magnitude, options.prob, options.magnitude_std,
        TIMM_SPACE, options.mean_fill),
}


def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)


def _from_pil(pil: Image.Image, channels: int) -> np.ndarray:
  array = np.asarray(pil)
  return array[..., None] if channels == 1 else array


# ---------------------------------------------------------------------------
# grain transforms.


@dataclasses.dataclass(frozen=True)
class ToSize(grain.transforms.Map):
  """Brings images (and dense labels) to (size, size): 'pad' or 'resize'."""
  size: int
  mode: str = 'pad'
  dense_label: bool = False

  def __post_init__(self):
    # Fails when the pipeline is built, not first inside a grain worker.
    _check_choice('data.resize_mode', self.mode, RESIZE_MODES)

  def map(self, example: dict) -> dict:
    out = {**example, 'image': to_size(example['image'], self.size, self.mode)}
    if self.dense_label:
      out['label'] = to_size(example['label'], self.size, self.mode,
                             dense_label=True)
    return out


@dataclasses.dataclass(frozen=True)
class ZeroBorder(grain.transforms.Map):
  """Zero-pads `width` pixels on every side of the image. Before ToSize(size +
  2 width, 'pad'), the result's centre size x size is exactly ToSize(size)'s
  view, whatever the parities (a centre crop alone can round the other way)."""
  width: int

  def map(self, example: dict) -> dict:
    w = self.width
    return {**example, 'image': np.pad(example['image'], ((w, w), (w, w), (0, 0)))}


@dataclasses.dataclass(frozen=True)
class CentreCrop(grain.transforms.Map):
  """Eval view of variable-size images (ImageNet): resize + centre crop
  (widened by `margin` pixels per side, see centre_crop)."""
  size: int
  crop_fraction: float = CROP_FRACTION
  margin: int = 0

  def map(self, example: dict) -> dict:
    return {**example, 'image': centre_crop(example['image'], self.size, self.crop_fraction,
                                            self.margin)}


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop(grain.transforms.RandomMap):
  """Train view of variable-size images (ImageNet): Inception crop."""
  size: int

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    return {**example,
            'image': random_resized_crop(example['image'], self.size, rng)}


@dataclasses.dataclass(frozen=True)
class CropFlip(grain.transforms.RandomMap):
  """Random crop with zero padding (0 = off) and random horizontal flip.

  With dense_label, the label map gets the same crop and flip.
  """
  padding: int
  hflip: bool
  dense_label: bool = False

  def __post_init__(self):
    _check_count('data.crop_padding', self.padding)

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    arrays = {'image': example['image']}
    if self.dense_label:
      arrays['label'] = example['label']
    if self.padding:
      y, x = rng.integers(0, 2 * self.padding + 1, size=2)
      arrays = {k: pad_crop(v, self.padding, y, x,
                            IGNORE_INDEX if k == 'label' else 0)
                for k, v in arrays.items()}
    if self.hflip and rng.random() < 0.5:
      arrays = {k: v[:, ::-1] for k, v in arrays.items()}
    return {**example, **arrays}


@dataclasses.dataclass(frozen=True)
class AutoAugment(grain.transforms.RandomMap):
  """AUGMENTS[policy] on uint8 images; the other fields are RandAugment's."""
  policy: str
  num_ops: int = 2
  magnitude: float = 9
  prob: float = 1.0
  magnitude_std: float = 0.0
  mean_fill: tuple[int, ...] = (0,)  # The data mean in 0-255, for TIMM_SPACE's fill.

  def __post_init__(self):
    if self.policy not in AUGMENTS:
      raise ValueError(f'data.augment={self.policy!r} is not valid; valid choices: '
                       f"{sorted(AUGMENTS)}, or '' (off).")
    _check_count('data.randaugment_num_ops', self.num_ops)
    # Levels are magnitude / 10 (see rand_augment): negative ones make invalid
    # op arguments, and above 10 they would be silently clipped.
    for field, value, low, high in (('randaugment_magnitude', self.magnitude, 0, 10),
                                    ('randaugment_prob', self.prob, 0, 1),
                                    ('randaugment_magnitude_std', self.magnitude_std, 0, 10)):
      if not low <= value <= high:
        raise ValueError(f'data.{field}={value!r} is not valid; valid: a number in '
                         f'[{low}, {high}].')

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    return {**example, 'image': AUGMENTS[self.policy](example['image'], rng, self)}


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """uint8 image -> normalized float32; label -> int32 (dense: (H, W, 1) -> (H, W))."""
  mean: tuple[float, ...]
  std: tuple[float, ...]
  dense_label: bool = False

  def map(self, example: dict) -> dict:
    label = example['label'][..., 0] if self.dense_label else example['label']
    return {**example, 'image': normalize(example['image'], self.mean, self.std),
            'label': np.int32(label)}


@dataclasses.dataclass(frozen=True)
class RandomErasing(grain.transforms.RandomMap):
  """Random erasing (Zhong et al. 2020) with probability `prob` per image."""
  prob: float

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    if rng.random() >= self.prob:
      return example
    return {**example, 'image': random_erase(example['image'], rng)}
