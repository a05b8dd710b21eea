"""Lossless 2-D <-> channel rearrangements shared by down- and upsamplers."""

import jax


def space_to_depth(x: jax.Array, factor: int = 2) -> jax.Array:
  """x: (B, H, W, C), H and W multiples of factor -> (B, H/f, W/f, f*f*C).

  Channel blocks follow Swin's patch merging: column offset major, row offset
  minor, i.e. for f = 2 the order x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2],
  x[1::2, 1::2], so official Swin merging weights apply unchanged.
  """
  b, h, w, c = x.shape
  f = factor
  x = x.reshape(b, h // f, f, w // f, f, c)  # (b, h', dy, w', dx, c)
  return x.transpose(0, 1, 3, 4, 2, 5).reshape(b, h // f, w // f, f * f * c)


def expand_patches(x: jax.Array, factor: int) -> jax.Array:
  """Swin-Unet's rearrange 'b h w (p1 p2 c) -> b (h p1) (w p2) c' with p1 = p2 = factor."""
  b, h, w, fc = x.shape
  f = factor
  c = fc // (f * f)
  x = x.reshape(b, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5)  # (b, h, p1, w, p2, c)
  return x.reshape(b, h * f, w * f, c)
