"""Hierarchical ViT models: Encoder, Decoder, Classifier, UNet, build_model.

Config objects stop at `build_model`: it validates `config.model` once, naming
the offending field, and passes plain arguments down, so every module below can
be built and tested alone.
"""

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from hierarchical_vit import resampling
from hierarchical_vit.layers import STEMS, SwinStage, dense, layer_norm, on_tokens
from hierarchical_vit.layers import attention_kernel
from hierarchical_vit.layers.attention import FUSED_CORES
from hierarchical_vit.layers.common import Dropout, is_int, norm_dense, resolve_dtype
from hierarchical_vit.layers.windows import stage_window

Resolution = tuple[int, int]


def _pair(size: int | Sequence[int]) -> Resolution:
  return (size, size) if isinstance(size, int) else tuple(size)


def stage_resolutions(img_size: Resolution, patch_size: int, num_stages: int) -> list[Resolution]:
  """Token map size of each encoder stage: the stem's ceil(size / patch), then
  halved (rounding up, as the downsamplers pad) once per stage."""
  res = (math.ceil(img_size[0] / patch_size), math.ceil(img_size[1] / patch_size))
  resolutions = [res]
  for _ in range(num_stages - 1):
    res = (math.ceil(res[0] / 2), math.ceil(res[1] / 2))
    resolutions.append(res)
  return resolutions


class Encoder(nnx.Module):
  """Stem, then stages of Swin blocks joined by the configured downsampler.

  Stage i runs at ceil(H / (p * 2^i)) x ceil(W / (p * 2^i)) tokens; its width is
  embed_dim for stage 0 and whatever the downsampler produces after that
  (2C by the registry's convention, 4C for space_to_depth).
  """

  def __init__(self, *, img_size: Resolution, in_chans: int, stem: str, patch_size: int,
               embed_dim: int, depths: Sequence[int], num_heads: Sequence[int],
               window_size: int, global_attention: Sequence[int], downsample: str,
               downsample_options: dict, drop_path_rate: float, rngs: nnx.Rngs,
               dtype: DTypeLike | None = None, **block_kwargs):
    self.in_chans, self.img_size = in_chans, tuple(img_size)
    self.stem = STEMS[stem](in_chans, embed_dim, patch_size, rngs=rngs, dtype=dtype)
    rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    self.resolutions = stage_resolutions(img_size, patch_size, len(depths))
    dim = embed_dim
    self.dims, self.drop_path_rates = [], []
    stages, downsamplers = [], []
    for i, (depth, heads, res) in enumerate(zip(depths, num_heads, self.resolutions)):
      if i > 0:
        down = resampling.make_downsampler(downsample, dim, rngs=rngs, dtype=dtype,
                                           **downsample_options)
        dim = down.out_features
        downsamplers.append(down)
      if dim % heads:
        raise ValueError(f'model.num_heads[{i}]={heads} does not divide stage {i} width {dim}')
      self.dims.append(dim)
      self.drop_path_rates.append(rates[sum(depths[:i]):sum(depths[:i + 1])])
      stages.append(SwinStage(dim, depth, heads, res, window_size, rngs=rngs,
                              drop_path_rates=self.drop_path_rates[i],
                              global_attention=i in global_attention, dtype=dtype,
                              **block_kwargs))
    self.stages = nnx.List(stages)
    self.downsamplers = nnx.List(downsamplers)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """x: (B, H, W, C_in) -> per stage i: (B, H_i, W_i, C_i)."""
    if x.ndim != 4 or x.shape[-1] != self.in_chans:
      raise ValueError(f'the model takes (B, H, W, {self.in_chans}) images, channels last '
                       f'(model.in_chans={self.in_chans}); got an input of shape {x.shape}')
    x = self.stem(x)
    outputs = []
    for i, stage in enumerate(self.stages):
      if i > 0:
        x = self.downsamplers[i - 1](x)
      x = stage(x)
      outputs.append(x)
    return outputs


class Decoder(nnx.Module):
  """Swin-Unet-style decoder: from the deepest stage up, upsample, concatenate
  the encoder's stage output at that level (skip), project 2C -> C, run Swin
  blocks; finally upsample by the patch size back to input resolution.

  Upsampled maps are cropped to the skip's size, so odd sizes (where the
  encoder rounded up) line up. As in Swin-Unet, level i's blocks take the
  encoder stage i's drop-path rates (`drop_path_rates[i]`, its last repeated
  where the level is deeper), so stochastic depth is highest at the deep
  levels. One difference from Swin-Unet, which skips each stage's input: the
  skips here are the stages' outputs (level 0's is stage 0's output, not the
  raw patch embedding), so every skip has been through its stage's attention.
  """

  def __init__(self, *, dims: Sequence[int], resolutions: Sequence[Resolution],
               depths: Sequence[int], num_heads: Sequence[int], window_size: int,
               patch_size: int, upsample: str, upsample_options: dict,
               drop_path_rates: Sequence[Sequence[float]], rngs: nnx.Rngs,
               dtype: DTypeLike | None = None, **block_kwargs):
    levels = len(dims) - 1  # Decoder levels n-2 .. 0, stored deepest first.
    self.bottleneck_norm = layer_norm(dims[-1], rngs=rngs, dtype=dtype)
    ups, projs, stages = [], [], []
    for k in range(levels):
      i = levels - 1 - k
      ups.append(resampling.make_upsampler(upsample, dims[i + 1], dims[i], rngs=rngs,
                                           dtype=dtype, **upsample_options))
      projs.append(dense(2 * dims[i], dims[i], rngs=rngs, dtype=dtype))
      level_rates = drop_path_rates[i]
      rates = [level_rates[min(j, len(level_rates) - 1)] for j in range(depths[k])]
      stages.append(SwinStage(dims[i], depths[k], num_heads[i], resolutions[i], window_size,
                              rngs=rngs, drop_path_rates=rates, dtype=dtype, **block_kwargs))
    self.upsamplers = nnx.List(ups)
    self.skip_projections = nnx.List(projs)
    self.stages = nnx.List(stages)
    self.norm = layer_norm(dims[0], rngs=rngs, dtype=dtype)
    self.final_upsampler = resampling.make_upsampler(
        upsample, dims[0], dims[0], rngs=rngs, dtype=dtype,
        **{**upsample_options, 'factor': patch_size})

  def __call__(self, features: Sequence[jax.Array], size: Resolution,
               final_norm: bool = True) -> jax.Array:
    """features: encoder outputs per stage, (B, H_i, W_i, C_i); -> (B, *size, C_0).

    final_norm=False leaves out the final upsampler's LayerNorm, for a head
    that folds it in (UNet).
    """
    x = on_tokens(self.bottleneck_norm, features[-1])
    for up, proj, stage, skip in zip(self.upsamplers, self.skip_projections, self.stages,
                                     reversed(features[:-1])):
      x = up(x)[:, :skip.shape[1], :skip.shape[2]]
      x = stage(on_tokens(proj, jnp.concatenate([x, skip], axis=-1)))
    up = self.final_upsampler
    x = on_tokens(self.norm, x)
    x = up(x) if final_norm else up.resample(x)
    return x[:, :size[0], :size[1]]


class Classifier(nnx.Module):
  """Encoder -> LayerNorm -> global average pool -> dropout -> Linear head."""

  def __init__(self, *, num_classes: int, drop_rate: float, rngs: nnx.Rngs,
               dtype: DTypeLike | None = None, **encoder_kwargs):
    self.encoder = Encoder(drop_rate=drop_rate, rngs=rngs, dtype=dtype, **encoder_kwargs)
    width = self.encoder.dims[-1]
    self.norm = layer_norm(width, rngs=rngs, dtype=dtype)
    self.head_drop = Dropout(drop_rate, rngs=rngs)
    self.head = dense(width, num_classes, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C_in) -> logits (B, num_classes) in float32."""
    x = on_tokens(self.norm, self.encoder(x)[-1])
    x = self.head_drop(jnp.mean(x, axis=(1, 2)))
    return self.head(x).astype(jnp.float32)


class UNet(nnx.Module):
  """Encoder + Decoder with skips -> per-pixel Linear head."""

  def __init__(self, *, num_classes: int, decoder_depths: Sequence[int], upsample: str,
               upsample_options: dict, rngs: nnx.Rngs, dtype: DTypeLike | None = None,
               **encoder_kwargs):
    self.encoder = Encoder(rngs=rngs, dtype=dtype, **encoder_kwargs)
    block_keys = ('mlp_ratio', 'qkv_bias', 'drop_rate', 'attn_drop_rate', 'gelu_approximate',
                  'attention', 'remat', 'window_size', 'num_heads', 'patch_size')
    self.decoder = Decoder(dims=self.encoder.dims, resolutions=self.encoder.resolutions,
                           drop_path_rates=self.encoder.drop_path_rates,
                           depths=decoder_depths, upsample=upsample,
                           upsample_options=upsample_options, rngs=rngs, dtype=dtype,
                           **{k: encoder_kwargs[k] for k in block_keys})
    self.head = dense(self.encoder.dims[0], num_classes, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C_in) -> per-pixel logits (B, H, W, num_classes) in float32."""
    y = self.decoder(self.encoder(x), x.shape[1:3], final_norm=False)
    # Full-resolution LayerNorm + head as one fold: see norm_dense.
    head = functools.partial(norm_dense, self.decoder.final_upsampler.norm, self.head)
    return on_tokens(head, y).astype(jnp.float32)


def input_shape(cfg: ml_collections.ConfigDict, batch: int = 1) -> tuple[int, int, int, int]:
  """(batch, H, W, in_chans): the images a model of config.model `cfg` takes."""
  return (batch, *_pair(cfg.img_size), cfg.in_chans)


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def _check_positive_int(value: object, field: str) -> None:
  _check(is_int(value) and value >= 1,
         f'{field}={value!r} must be a positive int')


def encoder_kwargs(cfg: ml_collections.ConfigDict) -> dict:
  """Validates config.model's encoder fields and returns Encoder's arguments."""
  depths, heads = tuple(cfg.depths), tuple(cfg.num_heads)
  n = len(depths)
  _check(n >= 1 and all(is_int(d) and d >= 1 for d in depths),
         f'model.depths={depths} must be a non-empty tuple of positive ints')
  _check(len(heads) == n, f'model.num_heads={heads} has {len(heads)} entries but '
         f'model.depths={depths} has {n}')
  for i, h in enumerate(heads):
    _check_positive_int(h, f'model.num_heads[{i}]')
  _check(cfg.stem in STEMS, f'model.stem={cfg.stem!r} is not one of {sorted(STEMS)}')
  for field in ('in_chans', 'embed_dim', 'patch_size', 'window_size'):
    _check_positive_int(cfg[field], f'model.{field}')
  img_size = _pair(cfg.img_size)
  _check(min(img_size) >= 1, f'model.img_size={cfg.img_size} must be positive')
  global_attention = tuple(cfg.global_attention)
  _check(all(is_int(i) and 0 <= i < n for i in global_attention),
         f'model.global_attention={global_attention} must name stages by int in 0..{n - 1}')
  for field in ('drop_rate', 'attn_drop_rate', 'drop_path_rate'):
    _check(0.0 <= cfg[field] < 1.0, f'model.{field}={cfg[field]} must be in [0, 1)')
  _check(cfg.mlp_ratio > 0, f'model.mlp_ratio={cfg.mlp_ratio} must be > 0')
  # Stage 0 is the narrowest (every downsampler widens), so its MLP empties first.
  hidden = int(cfg.embed_dim * cfg.mlp_ratio)
  _check(hidden >= 1, f'model.mlp_ratio={cfg.mlp_ratio} gives stage 0 an MLP hidden width of '
         f'int({cfg.embed_dim} * {cfg.mlp_ratio}) = {hidden}; it must be >= 1')
  _check_attention(cfg, stage_resolutions(img_size, cfg.patch_size, n), global_attention)
  # Also for one stage, which never downsamples: the typo would resurface with more stages.
  downsample_options = resampling.selected_options('downsample', cfg.downsample,
                                                   cfg.downsample_options)
  return dict(
      img_size=img_size, in_chans=cfg.in_chans, stem=cfg.stem, patch_size=cfg.patch_size,
      embed_dim=cfg.embed_dim, depths=depths, num_heads=heads, window_size=cfg.window_size,
      global_attention=global_attention, downsample=cfg.downsample,
      downsample_options=downsample_options,
      drop_path_rate=cfg.drop_path_rate, drop_rate=cfg.drop_rate,
      attn_drop_rate=cfg.attn_drop_rate, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
      gelu_approximate=cfg.gelu_approximate, attention=cfg.attention, remat=cfg.remat)


def _check_attention(cfg: ml_collections.ConfigDict, resolutions: Sequence[Resolution],
                     global_attention: Sequence[int]) -> None:
  """A fused attention core can run this config (WindowAttention checks the
  name, dropout and head width; build_model the backend)."""
  if cfg.attention == 'pallas':
    _check_pallas_windows(cfg.window_size, resolutions, global_attention)
  if cfg.attention == 'cudnn':
    _check(cfg.dtype == 'bfloat16',
           f"model.attention='cudnn' needs model.dtype='bfloat16', got {cfg.dtype!r}")


def _check_backend(cfg: ml_collections.ConfigDict) -> None:
  _check(cfg.attention not in FUSED_CORES or jax.default_backend() == 'gpu',
         f'model.attention={cfg.attention!r} needs an NVIDIA GPU; this backend is '
         f"{jax.default_backend()!r}: use 'einsum'")


def _check_pallas_windows(window_size: int, resolutions: Sequence[Resolution],
                          global_attention: Sequence[int]) -> None:
  """Every stage's window fits the kernel's tile, refused here rather than at the
  first traced step, after the workdir is written."""
  limit = attention_kernel.MAX_TOKENS
  for i, res in enumerate(resolutions):
    window = stage_window(res, window_size, 0, i in global_attention)[0]
    fix = (f'drop {i} from model.global_attention' if i in global_attention
           else 'use a smaller model.window_size')
    _check(window[0] * window[1] <= limit,
           f"model.attention='pallas' takes windows of up to {limit} tokens, but stage {i}'s "
           f'{window[0]}x{window[1]} window has {window[0] * window[1]}: {fix}, or use '
           "model.attention='einsum'")


def _build_classifier(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs,
                      dtype: DTypeLike | None) -> Classifier:
  return Classifier(num_classes=cfg.num_classes, rngs=rngs, dtype=dtype, **encoder_kwargs(cfg))


def _build_unet(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs, dtype: DTypeLike | None) -> UNet:
  kwargs = encoder_kwargs(cfg)
  levels = len(kwargs['depths']) - 1
  decoder_depths = tuple(cfg.decoder_depths) or tuple(reversed(kwargs['depths'][:-1]))
  _check(levels >= 1, f'model.depths={kwargs["depths"]}: a UNet needs at least 2 stages')
  _check(len(decoder_depths) == levels
         and all(is_int(d) and d >= 1 for d in decoder_depths),
         f'model.decoder_depths={tuple(cfg.decoder_depths)} must hold {levels} positive ints '
         '(deepest level first)')
  upsample_options = resampling.selected_options(
      'upsample', cfg.upsample, cfg.upsample_options,
      reserved={'factor': 'the decoder sets it (2 between levels, model.patch_size for the last)'})
  return UNet(num_classes=cfg.num_classes, decoder_depths=decoder_depths,
              upsample=cfg.upsample, upsample_options=upsample_options,
              rngs=rngs, dtype=dtype, **kwargs)


# Model registry, selected by config.model.name.
MODELS = {'classifier': _build_classifier, 'unet': _build_unet}


def build_model(model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs,
                check_backend: bool = True) -> nnx.Module:
  """Builds the model `model_config.name` names; bad fields raise ValueError naming them.

  check_backend=False builds a GPU attention core's model on any backend: its
  parameters and FLOPs are the einsum core's (report.py, a sweep's cost).
  """
  if check_backend:
    _check_backend(model_config)
  if model_config.name not in MODELS:
    raise ValueError(f'model.name={model_config.name!r} is not a registered model; '
                     f'valid choices: {sorted(MODELS)}')
  _check_positive_int(model_config.num_classes, 'model.num_classes')
  return MODELS[model_config.name](model_config, rngs, resolve_dtype(model_config.dtype))


def abstract_model(model_config: ml_collections.ConfigDict,
                   check_backend: bool = True) -> nnx.Module:
  """The model with shapes for values (nnx.eval_shape): checks the config and
  counts parameters and FLOPs without initializing anything (check_backend as
  in build_model)."""
  return nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(0),
                                            check_backend=check_backend))
