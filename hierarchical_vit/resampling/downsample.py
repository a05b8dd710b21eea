"""Downsamplers: x: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out).

Odd H or W: patch merging, space_to_depth and the 2x2 conv zero-pad the
bottom/right; the 3x3 conv and depthwise_conv_pool zero-pad k // 2 on every
side, conv_max_pool's conv and pool pad 'SAME'; pooling ignores its pad; the
anti-aliased (blur) entries reflect (resampling/antialias.py).
Adding one: write a module with the registry's constructor signature, add a line
to DOWNSAMPLERS; the shared shape/gradient tests pick it up.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from hierarchical_vit.layers.common import (conv_operands, dense, is_int, layer_norm,
                                            on_tokens, pad_to_multiple)
from hierarchical_vit.resampling.antialias import blur, blur_padded, reflect_pad
from hierarchical_vit.resampling.rearrange import space_to_depth


def _out(in_features: int, out_features: int | None) -> int:
  """The output width: out_features, or the registry's convention 2C."""
  if out_features is None:
    return 2 * in_features
  if out_features < 1:
    raise ValueError(f'a downsampler\'s out_features={out_features} must be >= 1')
  return out_features


class PatchMerge(nnx.Module):
  """Swin's 2x2 patch merging: space_to_depth (Swin's channel order),
  LayerNorm(4C), Linear 4C -> C_out without bias. Names match Swin/timm
  (`norm`, `reduction`)."""

  def __init__(self, in_features: int, out_features: int | None = None, *, rngs: nnx.Rngs,
               dtype: DTypeLike | None = None):
    out_features = _out(in_features, out_features)
    self.out_features = out_features
    self.norm = layer_norm(4 * in_features, rngs=rngs, dtype=dtype)
    self.reduction = dense(4 * in_features, out_features, use_bias=False, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = space_to_depth(pad_to_multiple(x, 2))
    return on_tokens(self.reduction, on_tokens(self.norm, x))


class _Blurred(nnx.Module):
  """Mixin, listed before the downsampler it blurs for: adds the `filter_size`
  option (binomial taps per axis), checked and named by `registry_name`."""
  registry_name: str

  def __init__(self, in_features: int, out_features: int | None = None, *, rngs: nnx.Rngs,
               filter_size: int = 3, dtype: DTypeLike | None = None):
    if not is_int(filter_size) or filter_size < 1:
      raise ValueError(
          f'model.downsample_options.{self.registry_name}.filter_size={filter_size!r} must be '
          'a positive integer (1: no blur, 2: box, 3: [1, 2, 1] / 4, ...)')
    super().__init__(in_features, out_features, rngs=rngs, dtype=dtype)
    self.filter_size = filter_size


class BlurMerge(_Blurred, PatchMerge):
  """Anti-aliased patch merging: the blur at stride 1, then Swin's 2x2 merge
  (the parameters are PatchMerge's)."""
  registry_name = 'blur_merge'

  def __call__(self, x: jax.Array) -> jax.Array:
    return super().__call__(blur(x, self.filter_size))


class SpaceToDepth(nnx.Module):
  """The lossless 2x2 rearrangement alone (C_out = 4C): the reference point
  that keeps every input value."""

  def __init__(self, in_features: int, out_features: int | None = None, *, rngs: nnx.Rngs,
               dtype: DTypeLike | None = None):
    del rngs, dtype  # No parameters.
    if out_features not in (None, 4 * in_features):
      raise ValueError(f'space_to_depth outputs 4 * in_features = {4 * in_features} '
                       f'channels, got out_features={out_features}')
    self.out_features = 4 * in_features

  def __call__(self, x: jax.Array) -> jax.Array:
    return space_to_depth(pad_to_multiple(x, 2))


class _Pool(nnx.Module):
  """Parameter-free stride-2 pooling, then LayerNorm(C) and Linear C -> C_out
  (no bias).

  Subclasses supply `pool(x)`: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C).
  """

  def __init__(self, in_features: int, out_features: int | None = None, *, rngs: nnx.Rngs,
               dtype: DTypeLike | None = None):
    out_features = _out(in_features, out_features)
    self.out_features = out_features
    self.norm = layer_norm(in_features, rngs=rngs, dtype=dtype)
    self.reduction = dense(in_features, out_features, use_bias=False, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return on_tokens(self.reduction, on_tokens(self.norm, self.pool(x)))


class _WindowPool(_Pool):
  """avg_pool / max_pool over a kernel_size x kernel_size window at stride 2,
  'SAME' padding that never counts: 2 pools each 2x2 block (odd sizes padded
  at the bottom/right), 3 overlapping windows as NesT's aggregation does."""
  registry_name: str

  def __init__(self, in_features: int, out_features: int | None = None, *, rngs: nnx.Rngs,
               kernel_size: int = 2, dtype: DTypeLike | None = None):
    if not is_int(kernel_size) or kernel_size < 2:
      raise ValueError(f'model.downsample_options.{self.registry_name}.kernel_size='
                       f'{kernel_size!r} must be an integer >= 2 (2: 2x2 blocks, 3: overlapping)')
    super().__init__(in_features, out_features, rngs=rngs, dtype=dtype)
    self.kernel_size = kernel_size


class AvgPool(_WindowPool):
  """Average over each window (padding excluded from the mean)."""
  registry_name = 'avg_pool'

  def pool(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    return nn.avg_pool(x, (k, k), (2, 2), padding='SAME', count_include_pad=False)


class MaxPool(_WindowPool):
  """Maximum over each window (padding never wins)."""
  registry_name = 'max_pool'

  def pool(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    return nn.max_pool(x, (k, k), (2, 2), padding='SAME')


class BlurPool(_Blurred, _Pool):
  """Zhang (2019)'s BlurPool: the blur at stride 2 (an anti-aliased avg_pool;
  filter_size 2 equals avg_pool on even sizes, 1 is plain subsampling
  x[::2, ::2])."""
  registry_name = 'blur_pool'

  def pool(self, x: jax.Array) -> jax.Array:
    return blur(x, self.filter_size, stride=2)


def max_blur_pool(x: jax.Array, filter_size: int = 3) -> jax.Array:
  """Zhang (2019)'s MaxBlurPool without its learned parts: the 2x2 maximum at
  stride 1, unpadded (H - 1 rows), then the blur at stride 2. x: (B, H, W, C)
  -> (B, ceil(H/2), ceil(W/2), C).

  Where Zhang's has an output it is exactly Zhang's. An odd side (H - 1 even
  rows, which Zhang's blurs to floor(H/2)) gets one more row of the maxima's
  reflection, so that the output is ceil(H/2) like every downsampler's; a side
  of 1 is its own maximum. (One reflect pad: reflecting the extra row again
  would change Zhang's last output for filter sizes from 6 on.)
  """
  _, h, w, _ = x.shape
  x = jnp.pad(x, ((0, 0), (0, int(h == 1)), (0, int(w == 1)), (0, 0)), mode='edge')
  x = nn.max_pool(x, (2, 2), (1, 1), padding='VALID')
  odd = lambda n: int(n % 2 == 1 and n > 1)
  return blur_padded(reflect_pad(x, filter_size, (odd(h), odd(w))), filter_size, stride=2)


class MaxBlurPool(_Blurred, _Pool):
  """max_blur_pool (Zhang's MaxBlurPool), then LayerNorm and Linear: an
  anti-aliased max_pool."""
  registry_name = 'max_blur_pool'

  def pool(self, x: jax.Array) -> jax.Array:
    return max_blur_pool(x, self.filter_size)


def soft_pool_2x2(x: jax.Array) -> jax.Array:
  """SoftPool (Stergiou et al. 2021): per channel, each 2x2 window's values
  weighted by their softmax, sum_i e^(x_i) x_i / sum_j e^(x_j), between the mean
  and the maximum. x: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C); odd sizes'
  padding gets weight 0."""
  b, h, w, c = x.shape
  x = pad_to_multiple(x, 2, -jnp.inf)
  windows = x.reshape(b, (h + 1) // 2, 2, (w + 1) // 2, 2, c)
  weights = jax.nn.softmax(windows, axis=(2, 4))
  return jnp.sum(weights * jnp.where(weights > 0, windows, 0), axis=(2, 4))


class SoftPool(_Pool):
  """SoftPool: softmax-weighted 2x2 pooling (soft_pool_2x2), parameter-free
  like avg_pool and max_pool, whose two extremes it sits between."""

  def pool(self, x: jax.Array) -> jax.Array:
    return soft_pool_2x2(x)


class ConvMaxPool(nnx.Module):
  """NesT's block aggregation (Zhang et al. 2022, "Nested Hierarchical
  Transformer"): a 3x3 conv C -> C_out at full resolution ('SAME'), LayerNorm,
  then a pool_size x pool_size max pool at stride 2 ('SAME': the bottom/right
  pad, or one row on each side of an odd size, never wins). NesT pools 3x3;
  pool_size 2 takes the 2x2 blocks, without overlap."""

  def __init__(self, in_features: int, out_features: int | None = None, *, rngs: nnx.Rngs,
               pool_size: int = 3, dtype: DTypeLike | None = None):
    if not is_int(pool_size) or pool_size < 2:
      raise ValueError(f'model.downsample_options.conv_max_pool.pool_size={pool_size!r} '
                       'must be an integer >= 2 (3: NesT, 2: 2x2 blocks)')
    out_features = _out(in_features, out_features)
    self.out_features = out_features
    self.pool_size = pool_size
    self.conv = nnx.Conv(in_features, out_features, (3, 3), padding='SAME', dtype=dtype,
                         rngs=rngs)
    self.norm = layer_norm(out_features, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = on_tokens(self.norm, self.conv(x))
    k = self.pool_size
    return nn.max_pool(x, (k, k), (2, 2), padding='SAME')


class ConvDownsample(nnx.Module):
  """Strided convolution C -> C_out, then LayerNorm. kernel_size 2 (stride 2,
  odd sizes zero-padded) or 3 (stride 2, padding 1, overlapping)."""

  def __init__(self, in_features: int, out_features: int | None = None, *, rngs: nnx.Rngs,
               kernel_size: int = 2, dtype: DTypeLike | None = None):
    if not is_int(kernel_size) or kernel_size not in (2, 3):
      raise ValueError(f'model.downsample_options.conv.kernel_size={kernel_size!r} '
                       'is not one of [2, 3]')
    out_features = _out(in_features, out_features)
    self.out_features = out_features
    self.kernel_size = kernel_size
    padding = 'VALID' if kernel_size == 2 else ((1, 1), (1, 1))
    self.conv = nnx.Conv(in_features, out_features, (kernel_size, kernel_size), 2,
                         padding=padding, dtype=dtype, rngs=rngs)
    self.norm = layer_norm(out_features, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kernel_size == 2:
      x = pad_to_multiple(x, 2)
    return on_tokens(self.norm, self.conv(x))


class DepthwiseConvPool(nnx.Module):
  """PiT's pooling (Heo et al. 2021, "Rethinking spatial dimensions of ViTs"):
  a depthwise stride-2 conv (kernel 3, padding 1) with channel multiplier
  C_out / C. C_out must be a multiple of C. PiT has no norm there (norm=False);
  by default a LayerNorm follows, as it ends every other downsampler here, so
  that an ablation compares the resampling, not the normalization.

  The conv's parameters are nnx.Conv's (kernel (k, k, 1, C_out)), but it runs as
  k*k strided multiply-adds: XLA:CPU executes grouped convolutions ~8x slower
  (a quickstart-sized train step went from 750 to 99 img/s with them).
  """

  def __init__(self, in_features: int, out_features: int | None = None, *, rngs: nnx.Rngs,
               kernel_size: int = 3, norm: bool = True, dtype: DTypeLike | None = None):
    if not is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
      # An even kernel with padding k // 2 gives H/2 + 1 rows, not ceil(H/2).
      raise ValueError(f'model.downsample_options.depthwise_conv_pool.kernel_size={kernel_size!r} '
                       'must be an odd positive integer (e.g. 3, 5)')
    out_features = _out(in_features, out_features)
    self.out_features = out_features
    if out_features % in_features:
      raise ValueError(f'depthwise_conv_pool needs out_features ({out_features}) to be a '
                       f'multiple of in_features ({in_features})')
    pad = kernel_size // 2
    self.conv = nnx.Conv(in_features, out_features, (kernel_size, kernel_size), 2,
                         padding=((pad, pad), (pad, pad)), feature_group_count=in_features,
                         dtype=dtype, rngs=rngs)
    self.norm = layer_norm(out_features, rngs=rngs, dtype=dtype) if norm else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C_out)."""
    x, kernel, bias = conv_operands(self.conv, x)
    y = depthwise_conv_stride_2(x, kernel[:, :, 0], bias)
    return y if self.norm is None else on_tokens(self.norm, y)


def depthwise_conv_stride_2(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """Depthwise conv, stride 2, 'same'-style padding k // 2, as k*k multiply-adds.

  x: (B, H, W, C); kernel: (k, k, C * m), output channel c * m + j reading input
  channel c (nnx.Conv's order with feature_group_count=C); bias: (C * m,).
  Returns (B, Ho, Wo, C * m), Ho = (H + 2 * (k // 2) - k) // 2 + 1.
  """
  k = kernel.shape[0]
  _, h, w, c = x.shape
  multiplier = kernel.shape[-1] // c
  pad = k // 2
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = (h + 2 * pad - k) // 2 + 1, (w + 2 * pad - k) // 2 + 1
  if multiplier > 1:
    x = jnp.repeat(x, multiplier, axis=-1)
  out = bias
  for dy in range(k):
    for dx in range(k):
      tap = x[:, dy:dy + 2 * ho - 1:2, dx:dx + 2 * wo - 1:2]
      out = out + tap * kernel[dy, dx]
  return out


DOWNSAMPLERS = {
    'patch_merge': PatchMerge,
    'blur_merge': BlurMerge,
    'space_to_depth': SpaceToDepth,
    'avg_pool': AvgPool,
    'blur_pool': BlurPool,
    'max_pool': MaxPool,
    'max_blur_pool': MaxBlurPool,
    'soft_pool': SoftPool,
    'conv': ConvDownsample,
    'depthwise_conv_pool': DepthwiseConvPool,
    'conv_max_pool': ConvMaxPool,
}
