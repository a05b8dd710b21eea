"""Swin weights in and out: timm, official microsoft/Swin-Transformer, ours.

One Swin classifier's weights exist in three layouts:

  ours      flat nnx.Param paths of `build_model`'s Classifier, e.g.
            'encoder.stages.0.blocks.1.attn.qkv.kernel' (in, out), saved as a
            .npz of float arrays (numpy only, read with allow_pickle=False);
  timm 1.x  'layers.0.blocks.1.attn.qkv.weight' (out, in); stage i > 0 starts
            with its downsample 'layers.i.downsample.*'; head 'head.fc.*';
  official  the 'model' entry of a microsoft/Swin-Transformer checkpoint: as
            timm but the downsample ends stage i ('layers.i.downsample.*', i < last)
            and the head is 'head.*'.

Conversion: Linear weight (out, in) <-> kernel (in, out); conv weight
(O, I, kh, kw) <-> kernel (kh, kw, I, O); LayerNorm weight <-> scale. The qkv
output axis is packed (3, heads, head_dim) on both sides, and patch merging
concatenates in Swin's order, so nothing else is permuted. Derived buffers
(relative_position_index, attn_mask) are recomputed by either side: skipped on
import, never exported (timm 1.x registers them non-persistent). The same
weights give the same logits on both sides wherever every stage's map is a
multiple of its window (every standard Swin resolution); elsewhere ours pads
windows before the shift, as the Swin authors' backbone does, and timm after
it (see layers/swin.py).

Entry points: `load_weights(model, path)` reads any of the three formats
(.npz = ours; .pth/.pt/.bin/.safetensors = timm or official, told apart by
their keys) and `save_weights(model, path)` writes ours (.npz) or timm's
(.pth/.safetensors). `load_weights(..., finetune=True)` is `train.init_from`.
"""

import argparse
import math
import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from hierarchical_vit.layers.attention import WindowAttention
from hierarchical_vit.layers.common import Mlp
from hierarchical_vit.resampling.downsample import DOWNSAMPLERS, PatchMerge

Weights = dict[str, np.ndarray]

# Buffers both sides derive from the window geometry.
_DERIVED = ('relative_position_index', 'attn_mask')
_TORCH_SUFFIXES = ('.pth', '.pt', '.bin')


# ----------------------------------------------------------------------------
# Key and layout mapping.
# ----------------------------------------------------------------------------


def _timm_module_to_ours(module: str) -> str | None:
  """'layers.2.downsample.norm' -> 'encoder.downsamplers.1.norm' etc.; None if unknown."""
  if m := re.fullmatch(r'layers\.(\d+)\.downsample\.(norm|reduction)', module):
    return f'encoder.downsamplers.{int(m[1]) - 1}.{m[2]}'
  rules = ((r'layers\.(\d+)\.blocks\.(.+)', r'encoder.stages.\1.blocks.\2'),
           (r'patch_embed\.(proj|norm)', r'encoder.stem.\1'),
           (r'head\.fc', 'head'), (r'norm', 'norm'))
  for pattern, replacement in rules:
    if re.fullmatch(pattern, module):
      return re.sub(pattern, replacement, module)
  return None


def _our_module_to_timm(module: str) -> str | None:
  """Inverse of _timm_module_to_ours; None for modules timm's Swin lacks."""
  if m := re.fullmatch(r'encoder\.downsamplers\.(\d+)\.(norm|reduction)', module):
    return f'layers.{int(m[1]) + 1}.downsample.{m[2]}'
  rules = ((r'encoder\.stages\.(\d+)\.blocks\.(.+)', r'layers.\1.blocks.\2'),
           (r'encoder\.stem\.(proj|norm)', r'patch_embed.\1'),
           (r'head', 'head.fc'), (r'norm', 'norm'))
  for pattern, replacement in rules:
    if re.fullmatch(pattern, module):
      return re.sub(pattern, replacement, module)
  return None


def official_to_timm(state_dict: Weights) -> Weights:
  """Renames official Swin keys to timm's: downsample moves to the next stage."""
  out = {}
  for key, value in state_dict.items():
    key = re.sub(r'^layers\.(\d+)\.downsample\.',
                 lambda m: f'layers.{int(m[1]) + 1}.downsample.', key)
    out[re.sub(r'^head\.', 'head.fc.', key)] = value
  return out


def _is_official(state_dict: Weights) -> bool:
  # Official checkpoints downsample at the end of stage 0 and name the head
  # 'head'; timm has neither (its stage 0 starts without a downsample).
  return any(k.startswith('layers.0.downsample.') or k == 'head.weight'
             for k in state_dict)


def from_timm(state_dict: Weights) -> Weights:
  """timm (or official) state dict -> our flat weights; derived buffers dropped.

  Keys of no Swin module are kept as they are, for `assign` to report.
  """
  if _is_official(state_dict):
    state_dict = official_to_timm(state_dict)
  out = {}
  for key, value in state_dict.items():
    module, _, leaf = key.rpartition('.')
    if leaf in _DERIVED:
      continue
    ours = _timm_module_to_ours(module)
    if ours is None:
      out[key] = value
      continue
    if leaf == 'weight' and value.ndim == 4:  # Conv (O, I, kh, kw) -> (kh, kw, I, O).
      leaf, value = 'kernel', value.transpose(2, 3, 1, 0)
    elif leaf == 'weight' and value.ndim == 2:  # Linear (out, in) -> (in, out).
      leaf, value = 'kernel', value.T
    elif leaf == 'weight':  # LayerNorm.
      leaf = 'scale'
    out[f'{ours}.{leaf}'] = value
  return out


def to_timm(weights: Weights) -> Weights:
  """Our flat weights -> a state dict timm's SwinTransformer loads with strict=True.

  Raises ValueError listing every parameter whose name timm's Swin has no
  place for (e.g. a UNet decoder, a conv stem or a conv downsampler). Names
  alone cannot tell the pooling downsamplers and blur_merge from patch merging
  (same param names): `save_weights` checks the model's downsamplers for that.
  """
  out, unmapped = {}, []
  for key, value in weights.items():
    module, leaf = key.rsplit('.', 1)
    timm_module = _our_module_to_timm(module)
    if timm_module is None:
      unmapped.append(key)
      continue
    if leaf == 'kernel':
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    out[f'{timm_module}.{"weight" if leaf in ("kernel", "scale") else leaf}'] = value
  if unmapped:
    raise ValueError(f'{len(unmapped)} parameters have no timm Swin counterpart (only the '
                     "classifier with stem='patch' and downsample='patch_merge' converts): "
                     + ', '.join(sorted(unmapped)))
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------
# Model state.
# ----------------------------------------------------------------------------


def _key(path: tuple) -> str:
  return '.'.join(map(str, path))


def get_weights(model: nnx.Module) -> Weights:
  """The model's nnx.Params as flat numpy arrays keyed by their dotted paths."""
  return {_key(path): np.asarray(var.get_value())
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _first(keys: list[str], count: int = 8) -> str:
  """The first `count` keys, and how many more: a wrong architecture can
  differ in hundreds."""
  more = f', ... ({len(keys) - count} more)' if len(keys) > count else ''
  return ', '.join(keys[:count]) + more


def assign(model: nnx.Module, weights: Weights) -> None:
  """Sets every nnx.Param of model from weights (cast to the param's dtype).

  Raises one ValueError listing all missing keys, unexpected keys and shape
  mismatches, and then changes nothing.
  """
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  expected = {_key(path): var.get_value().shape for path, var in flat}
  missing = sorted(expected.keys() - weights.keys())
  unexpected = sorted(weights.keys() - expected.keys())
  mismatched = [f'{k}: checkpoint {tuple(weights[k].shape)} vs model {expected[k]}'
                for k in sorted(expected.keys() & weights.keys())
                if tuple(weights[k].shape) != expected[k]]
  if missing or unexpected or mismatched:
    problems = [(f'{len(missing)} missing', missing),
                (f'{len(unexpected)} unexpected', unexpected),
                (f'{len(mismatched)} with mismatched shapes', mismatched)]
    raise ValueError('Checkpoint does not fit the model (keys after conversion to ours; '
                     'check model.* against the checkpoint\'s architecture):\n'
                     + '\n'.join(f'  {title}: {_first(keys)}' for title, keys in problems if keys))
  nnx.update(model, nnx.from_flat_state([
      (path, var.replace(jnp.asarray(weights[_key(path)], var.get_value().dtype)))
      for path, var in flat]))


# ----------------------------------------------------------------------------
# Fine-tuning: new windows, patch size, input channels; a new head.
# ----------------------------------------------------------------------------


def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of a 1-D bicubic resize.

  Matches torch.nn.functional.interpolate(mode='bicubic', align_corners=False),
  which Swin uses for window size changes: Keys' cubic with a = -0.75,
  half-pixel centres, edge taps clamped. (jax.image.resize uses a = -0.5 and
  antialiases when shrinking, so it differs.)
  """
  a = -0.75
  src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  left = np.floor(src)
  t = src - left

  def near(x):  # |x| <= 1.
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2.
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  taps = np.clip(left[:, None].astype(int) + np.arange(-1, 3), 0, in_size - 1)
  coeffs = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  matrix = np.zeros((out_size, in_size))
  np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), coeffs.ravel())
  return matrix


def _geometric_positions(side: int, out_size: int) -> np.ndarray:
  """Where BEiT places a table's `side` offsets among the new table's: spaced
  by a geometric progression from the centre, whose ratio (bisected within
  [1.01, 1.5]) makes a growing table's far offsets stretch to about
  +-(out_size // 2). A shrinking one keeps the ratio 1.01, so its far offsets
  fall outside the new table, which takes the central ones (as timm)."""
  half, target = side // 2, out_size // 2
  low, high = 1.01, 1.5
  while high - low > 1e-6:
    ratio = (low + high) / 2
    if (1 - ratio ** half) / (1 - ratio) > target:
      high = ratio
    else:
      low = ratio
  steps = np.cumsum([ratio ** i for i in range(half)])  # 1, 1 + q, 1 + q + q^2, ...
  return np.concatenate([-steps[::-1], [0.0], steps])


def _geometric_table_matrix(side: int, out_size: int) -> np.ndarray:
  """(out_size, side) weights of linear interpolation from BEiT's geometric
  positions to the integer offsets -out_size // 2 .. out_size // 2 (timm's
  resize_rel_pos_bias_table without scipy); beyond the ends, the end values."""
  targets = np.arange(-(out_size // 2), out_size // 2 + 1, dtype=np.float64)
  positions = _geometric_positions(side, out_size)
  return np.stack([np.interp(targets, positions, column) for column in np.eye(side)], axis=1)


# How a relative position bias table is resized to other windows when
# fine-tuning (config.train.init_bias_table_resize): (side, out_size) -> the
# (out_size, side) matrix applied along each axis of the table.
BIAS_TABLE_RESIZES: dict[str, Callable[[int, int], np.ndarray]] = {
    # The Swin authors' (and Swin V1 fine-tuning's) bicubic F.interpolate.
    'bicubic': _bicubic_matrix,
    # timm >= 0.9's load-time resize (BEiT's geometric spacing, linear).
    'geometric': _geometric_table_matrix,
}


def _check_bias_table_resize(method: str) -> None:
  if method not in BIAS_TABLE_RESIZES:
    raise ValueError(f'train.init_bias_table_resize={method!r} is not one of '
                     f'{sorted(BIAS_TABLE_RESIZES)}')


def resize_bias_table(table: np.ndarray, window: tuple[int, int],
                      method: str = 'bicubic') -> np.ndarray:
  """Resizes a square-window table (L, heads) to `window` by one of
  BIAS_TABLE_RESIZES.

  table: ((2s - 1)^2, heads) -> ((2wh - 1) * (2ww - 1), heads).
  """
  _check_bias_table_resize(method)
  side = math.isqrt(table.shape[0])
  if side * side != table.shape[0]:
    raise ValueError(f'relative position bias table of shape {table.shape} is not from a '
                     'square window; cannot resize it')
  out_h, out_w = 2 * window[0] - 1, 2 * window[1] - 1
  grid = table.reshape(side, side, -1).astype(np.float64)
  matrix = BIAS_TABLE_RESIZES[method]
  resized = np.einsum('ij,jkh,lk->ilh', matrix(side, out_h), grid, matrix(side, out_w))
  return resized.reshape(out_h * out_w, -1).astype(table.dtype)


def adapt_input_channels(kernel: np.ndarray, in_chans: int) -> np.ndarray:
  """A stem conv kernel (kh, kw, C, E) for in_chans input channels, as timm
  adapts pretrained RGB stems: one channel takes the sum of the filters (a gray
  image x gives what (x, x, x) gave); more channels repeat them, scaled by
  C / in_chans to keep the activations' scale."""
  channels = kernel.shape[2]
  if in_chans == 1:
    return kernel.sum(axis=2, keepdims=True)
  repeats = -(-in_chans // channels)
  return np.tile(kernel, (1, 1, repeats, 1))[:, :, :in_chans] * (channels / in_chans)


def _antialiased_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of a 1-D antialiased bicubic resize: Keys'
  cubic with a = -0.5, widened when shrinking, as jax.image.resize and torch's
  F.interpolate(mode='bicubic', antialias=True) (which timm's patch resampling
  uses) both compute it."""
  eye = jnp.eye(in_size, dtype=jnp.float32)
  return np.asarray(jax.image.resize(eye, (in_size, out_size), 'bicubic', antialias=True),
                    np.float64).T


def resample_patch_kernel(kernel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """A patch-embedding kernel (kh, kw, C, E) for patches of `size`, by
  FlexiViT's pseudo-inverse resize (Beyer et al. 2023), as timm's
  resample_patch_embed: with R the bicubic resize of a (kh, kw) patch to
  `size`, the new kernel is pinv(R)^T w, so that a patch x resized up embeds
  as x did, <R x, w'> = <x, w> (the least-squares best when shrinking)."""
  kh, kw = kernel.shape[:2]
  resize = np.kron(_antialiased_bicubic_matrix(kh, size[0]),
                   _antialiased_bicubic_matrix(kw, size[1]))  # (ph * pw, kh * kw)
  flat = kernel.reshape(kh * kw, -1).astype(np.float64)
  resampled = np.linalg.pinv(resize).T @ flat
  return resampled.reshape(*size, *kernel.shape[2:]).astype(kernel.dtype)


def adapt_for_finetuning(model: nnx.Module, weights: Weights,
                         bias_table_resize: str = 'bicubic') -> Weights:
  """Fits pretrained weights to model where fine-tuning changes shapes.

  Relative position bias tables are resized to the model's windows (window
  size or resolution changed) by BIAS_TABLE_RESIZES[bias_table_resize]; a stem
  for another number of input channels is adapted (adapt_input_channels), a
  patch stem for another patch size resampled (resample_patch_kernel); the
  parts fine-tuning trains from scratch keep the model's fresh initialization
  where the checkpoint has none or one of another shape: a classifier's head,
  a UNet's decoder and per-pixel head (a UNet takes a classifier's encoder, as
  Swin-Unet starts from ImageNet Swin; the classifier's final norm is
  dropped). Anything else that does not fit is left for `assign` to report.
  """
  _check_bias_table_resize(bias_table_resize)  # Even where no table needs it.
  weights = dict(weights)
  own = get_weights(model)
  for path, module in nnx.iter_graph(model):
    key = f'{_key(path)}.relative_position_bias_table'
    if not isinstance(module, WindowAttention) or key not in weights:
      continue
    table = weights[key]
    target = module.relative_position_bias_table.get_value().shape
    if table.shape != target and table.shape[1] == target[1]:
      weights[key] = resize_bias_table(table, module.window, bias_table_resize)
      logging.info('Resized %s from %s to %s.', key, table.shape, target)
  # The first kernel of each stem in layers/embedding.STEMS: the patch stem's
  # (its size is the patch size) and the conv stem's first 3x3 conv.
  for stem in ('encoder.stem.proj.kernel', 'encoder.stem.convs.0.kernel'):
    if stem not in weights or stem not in own or weights[stem].shape[3] != own[stem].shape[3]:
      continue
    kernel, target = weights[stem], own[stem].shape
    if kernel.shape[2] != target[2]:
      kernel = adapt_input_channels(kernel, target[2])
      logging.info('Adapted %s from %d to %d input channels.', stem, weights[stem].shape[2],
                   target[2])
    if kernel.shape[:2] != target[:2] and stem == 'encoder.stem.proj.kernel':
      logging.info('Resampled %s from %s to %s patches.', stem, kernel.shape[:2], target[:2])
      kernel = resample_patch_kernel(kernel, target[:2])
    weights[stem] = kernel
  unet = hasattr(model, 'decoder')
  fresh = ('head.', 'decoder.') if unet else ('head.',)
  renewed = [k for k in own if k.startswith(fresh)
             and (k not in weights or weights[k].shape != own[k].shape)]
  if renewed:
    logging.info('Training from scratch: %d arrays the checkpoint lacks or shapes otherwise '
                 '(%s).', len(renewed), ', '.join(sorted({k.split('.')[0] for k in renewed})))
    weights.update({k: own[k] for k in renewed})
  if unet:
    weights = {k: v for k, v in weights.items() if k in own or not k.startswith(('norm.', 'head.'))}
  return weights


# ----------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------


def _suffix(path: str) -> str:
  """'.pth' for timm's training checkpoints 'x.pth.tar' too."""
  lower = path.lower()
  return '.pth' if lower.endswith('.pth.tar') else os.path.splitext(lower)[1]


def _read_torch(path: str) -> Weights:
  import torch  # Only needed for .pth files.

  # timm's training checkpoints also hold their argparse arguments.
  with torch.serialization.safe_globals([argparse.Namespace]):
    state_dict = torch.load(path, map_location='cpu', weights_only=True)
  # Official checkpoints keep the weights under 'model', trainers under 'state_dict'.
  state_dict = state_dict.get('model', state_dict)
  state_dict = state_dict.get('state_dict', state_dict)
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state_dict.items()}


def read_weights(path: str) -> Weights:
  """Reads a checkpoint in any supported format as our flat weights (unchecked)."""
  suffix = _suffix(path)
  if suffix == '.npz':
    with np.load(path, allow_pickle=False) as data:
      return dict(data)
  if suffix == '.safetensors':
    from safetensors.numpy import load_file
    return from_timm(load_file(path))
  if suffix in _TORCH_SUFFIXES:
    return from_timm(_read_torch(path))
  raise ValueError(f'{path}: unknown weights format {suffix!r}; expected .npz (ours) or '
                   f'.safetensors / {" / ".join(_TORCH_SUFFIXES)} (timm or official Swin)')


def load_weights(model: nnx.Module, path: str, *, finetune: bool = False,
                 bias_table_resize: str = 'bicubic') -> None:
  """Loads weights from path (.npz ours; timm/official .pth/.safetensors) into model.

  Strict: every parameter must be present with its shape, or one ValueError
  lists all that differ. With finetune=True, bias tables are first resized
  to the model's windows (by `bias_table_resize`), the stem adapted and a head
  of another class count re-initialized (see adapt_for_finetuning).
  """
  weights = read_weights(path)
  if finetune:
    weights = adapt_for_finetuning(model, weights, bias_table_resize)
  try:
    assign(model, weights)
  except ValueError as error:
    raise ValueError(f'{path}: {error}') from None
  logging.info('Loaded %d arrays from %s.', len(weights), path)


def _check_timm_downsamplers(model: nnx.Module) -> None:
  """Raises ValueError unless every downsampler is Swin's patch merging.

  The pooling downsamplers also name their params `norm` and `reduction`, so
  `to_timm` maps them by name, but with LayerNorm(C) and C -> 2C shapes where
  timm expects LayerNorm(4C) and 4C -> 2C: timm's strict load would fail.
  blur_merge (a PatchMerge subclass) has timm's shapes but blurs first, which
  timm would silently leave out.
  """
  names = {cls: name for name, cls in DOWNSAMPLERS.items()}
  for down in getattr(getattr(model, 'encoder', None), 'downsamplers', ()):
    if type(down) is not PatchMerge:  # pylint: disable=unidiomatic-typecheck
      name = names.get(type(down), type(down).__name__)
      raise ValueError(f'model.downsample={name!r} has no timm Swin counterpart; only '
                       "model.downsample='patch_merge' exports to timm (save as .npz instead).")


def _check_timm_windows(model: nnx.Module) -> None:
  """Raises ValueError where an image pads to its patches, or a shifted
  block's token map to its windows.

  Ours pads before the shift (as the Swin authors' backbone), timm after it,
  so on such maps timm's mask lets other tokens meet (layers/swin.py) and the
  exported weights would compute another function, without an error.
  """
  encoder = getattr(model, 'encoder', None)
  patch = getattr(getattr(encoder, 'stem', None), 'patch_size', 1)
  size = getattr(encoder, 'img_size', (0, 0))
  if size[0] % patch or size[1] % patch:
    raise ValueError(f'model.img_size={size[0]}x{size[1]} is not a multiple of model.patch_size='
                     f"{patch}: ours pads the last patches, timm's patch embedding drops them, so "
                     'timm would compute another function. Save as .npz.')
  for i, (stage, res) in enumerate(zip(getattr(encoder, 'stages', ()),
                                       getattr(encoder, 'resolutions', ()))):
    if stage.global_attention and max(res) > stage.window_size:
      raise ValueError(f'stage {i} attends globally over its {res[0]}x{res[1]} tokens '
                       '(model.global_attention), where timm attends in '
                       f'{stage.window_size}x{stage.window_size} windows: save as .npz.')
    for block in stage.blocks:
      if any(block.shift) and (res[0] % block.window[0] or res[1] % block.window[1]):
        raise ValueError(
            f"stage {i}'s {res[0]}x{res[1]} token map does not tile into its shifted "
            f'{block.window[0]}x{block.window[1]} windows: timm pads it after the shift, we '
            'before, so timm would compute another function. Pick model.img_size, patch_size '
            'and window_size whose shifted stages tile, or save as .npz.')
  if any(isinstance(m, Mlp) and m.gelu_approximate for _, m in nnx.iter_graph(model)):
    logging.warning('The model uses the tanh GELU (model.gelu_approximate) and timm the exact '
                    'one: its logits will differ by ~1e-3 there.')


def save_weights(model: nnx.Module, path: str) -> None:
  """Writes model's params as ours (.npz) or as a timm state dict (.pth/.safetensors)."""
  suffix = _suffix(path)
  if suffix != '.npz':
    _check_timm_downsamplers(model)
    _check_timm_windows(model)
  weights = get_weights(model)
  if suffix == '.npz':
    np.savez(path, **weights)
  elif suffix == '.safetensors':
    from safetensors.numpy import save_file
    save_file(to_timm(weights), path)
  elif suffix in _TORCH_SUFFIXES:
    import torch

    torch.save({k: torch.tensor(v) for k, v in to_timm(weights).items()}, path)
  else:
    raise ValueError(f'{path}: unknown weights format {suffix!r}; expected .npz (ours) or '
                     f'.safetensors / {" / ".join(_TORCH_SUFFIXES)} (timm)')
