"""Upsamplers: x: (B, H, W, C) -> (B, f*H, f*W, C_out), f = `factor` (default 2).

C_out defaults to C/2 (the decoder halves the width per stage). Every upsampler
ends in LayerNorm(C_out) so that ablations differ only in how they resample.
The decoder's final return to input resolution uses the same classes with
factor = patch size (Swin-Unet's x4 expand is patch_expand with factor 4).
"""

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from hierarchical_vit.layers.common import conv_operands, dense, layer_norm, on_tokens
from hierarchical_vit.resampling.rearrange import expand_patches

INTERPOLATION_METHODS = ('bilinear', 'nearest', 'bicubic')


def _out(in_features: int, out_features: int | None) -> int:
  """The output width: out_features, or the registry's convention C/2."""
  if out_features is None:
    return max(in_features // 2, 1)
  if out_features < 1:
    raise ValueError(f'an upsampler\'s out_features={out_features} must be >= 1')
  return out_features


class Upsampler(nnx.Module):
  """Base: a subclass's `resample(x)`, (B, H, W, C) -> (B, f*H, f*W, C_out),
  then its LayerNorm `norm`.

  `resample` is public so that a per-pixel head can fold the LayerNorm into
  itself (models.UNet, layers.common.norm_dense).
  """
  norm: nnx.LayerNorm
  resample: Callable[[jax.Array], jax.Array]

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, f*H, f*W, C_out)."""
    return on_tokens(self.norm, self.resample(x))


class PatchExpand(Upsampler):
  """Swin-Unet's patch expanding: Linear C -> f*f*C_out (no bias), rearrange
  'b h w (p1 p2 c) -> b (h p1) (w p2) c', LayerNorm(C_out). With f = 2 and
  C_out = C/2 the Linear is C -> 2C; with f = 4 and C_out = C it is Swin-Unet's
  final x4 expand (C -> 16C)."""

  def __init__(self, in_features: int, out_features: int | None = None, *, rngs: nnx.Rngs,
               factor: int = 2, dtype: DTypeLike | None = None):
    out_features = _out(in_features, out_features)
    self.out_features = out_features
    self.factor = factor
    self.expand = dense(in_features, factor * factor * out_features, use_bias=False,
                        rngs=rngs, dtype=dtype)
    self.norm = layer_norm(out_features, rngs=rngs, dtype=dtype)

  def resample(self, x: jax.Array) -> jax.Array:
    return expand_patches(on_tokens(self.expand, x), self.factor)


class Interpolate(Upsampler):
  """jax.image.resize by `factor` (method bilinear | nearest | bicubic) and a
  Linear C -> C_out, then LayerNorm.

  Half-pixel centres, as torch's align_corners=False; bicubic is Keys' cubic
  with a = -0.5 (PIL's and TensorFlow's), where torch's bicubic uses -0.75.

  The Linear (no bias) runs before the resize: both are linear, so they
  commute, and projecting first runs the Linear on f*f times fewer pixels and
  resizes C_out channels instead of C.
  """

  def __init__(self, in_features: int, out_features: int | None = None, *, rngs: nnx.Rngs,
               factor: int = 2, method: str = 'bilinear', dtype: DTypeLike | None = None):
    if method not in INTERPOLATION_METHODS:
      raise ValueError(f'model.upsample_options.interpolate.method={method!r} is not one of '
                       f'{list(INTERPOLATION_METHODS)}')
    out_features = _out(in_features, out_features)
    self.out_features = out_features
    self.factor = factor
    self.method = method
    self.proj = dense(in_features, out_features, use_bias=False, rngs=rngs, dtype=dtype)
    self.norm = layer_norm(out_features, rngs=rngs, dtype=dtype)

  def resample(self, x: jax.Array) -> jax.Array:
    x = on_tokens(self.proj, x)
    b, h, w, c = x.shape
    return jax.image.resize(x, (b, h * self.factor, w * self.factor, c), self.method)


class TransposedConv(Upsampler):
  """Transposed convolution, kernel = stride = factor, C -> C_out, then LayerNorm.

  The parameters are nnx.ConvTranspose's, but with kernel = stride the output
  windows do not overlap, so it runs as one (tokens, C) x (C, f*f*C_out) matmul
  and a rearrange: XLA:CPU's transposed convolution made a x8 decoder step ~3.5x
  slower (the segmentation UNet: 61 vs ~210 img/s).
  """

  def __init__(self, in_features: int, out_features: int | None = None, *, rngs: nnx.Rngs,
               factor: int = 2, dtype: DTypeLike | None = None):
    out_features = _out(in_features, out_features)
    self.out_features = out_features
    self.conv = nnx.ConvTranspose(in_features, out_features, (factor, factor), (factor, factor),
                                  padding='VALID', dtype=dtype, rngs=rngs)
    self.norm = layer_norm(out_features, rngs=rngs, dtype=dtype)

  def resample(self, x: jax.Array) -> jax.Array:
    x, kernel, bias = conv_operands(self.conv, x)  # kernel (f, f, C, C_out), bias (C_out,)
    f, _, c, c_out = kernel.shape
    # ConvTranspose applies the kernel flipped: output offset (i, j) reads kernel[f-1-i, f-1-j].
    kernel = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(c, f * f * c_out)
    return expand_patches(on_tokens(lambda t: t @ kernel, x), f) + bias


class PixelShuffle(Upsampler):
  """Sub-pixel convolution (Shi et al. 2016): 3x3 conv C -> f*f*C_out, then
  depth-to-space by f, then LayerNorm.

  Depth-to-space in TensorFlow's channel order, (dy, dx, c) (expand_patches),
  where torch.nn.PixelShuffle reads (c, dy, dx): conv weights from torch need
  their output channels permuted.

  The conv (nnx.Conv's params) runs as one matmul over the 3x3 neighbourhoods
  (im2col): at f = 8 it maps 64 channels to 4096 and is FLOP-bound, and XLA:CPU's
  convolution took 2x the matmul's time for it (fwd + bwd, batch 32 of 8x8 tokens).
  """

  def __init__(self, in_features: int, out_features: int | None = None, *, rngs: nnx.Rngs,
               factor: int = 2, dtype: DTypeLike | None = None):
    out_features = _out(in_features, out_features)
    self.out_features = out_features
    self.factor = factor
    self.conv = nnx.Conv(in_features, factor * factor * out_features, (3, 3),
                         padding=((1, 1), (1, 1)), dtype=dtype, rngs=rngs)
    self.norm = layer_norm(out_features, rngs=rngs, dtype=dtype)

  def resample(self, x: jax.Array) -> jax.Array:
    x, kernel, bias = conv_operands(self.conv, x)  # kernel (3, 3, C, f*f*C_out)
    _, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # (B, H, W, 9C), neighbourhoods in the kernel's (dy, dx, c) order.
    columns = jnp.concatenate([padded[:, dy:dy + h, dx:dx + w]
                               for dy in range(3) for dx in range(3)], axis=-1)
    y = on_tokens(lambda t: t @ kernel.reshape(9 * c, -1), columns) + bias
    return expand_patches(y, self.factor)


UPSAMPLERS = {
    'patch_expand': PatchExpand,
    'interpolate': Interpolate,
    'transposed_conv': TransposedConv,
    'pixel_shuffle': PixelShuffle,
}
