"""Swin Transformer block and stage (a run of blocks at one resolution)."""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from hierarchical_vit.layers import windows as win
from hierarchical_vit.layers.attention import WindowAttention
from hierarchical_vit.layers.common import DropPath, Mlp, layer_norm, on_tokens, pad_to_multiple


class SwinBlock(nnx.Module):
  """Pre-norm block: x + DropPath(W-MSA(LN(x))), then x + DropPath(MLP(LN(x))).

  W-MSA runs in windows cyclically shifted by `shift` (SW-MSA) when any shift is
  non-zero, with Swin's mask. Maps that are not a multiple of the window are
  zero-padded at the bottom/right *before* the shift and cropped back after it,
  as in the Swin authors' detection/segmentation backbone: the mask, built on
  the padded map, then separates exactly the tokens that the shift wrapped
  around. timm pads after the shift, so on such maps its mask lets tokens from
  opposite edges attend to each other (e.g. 8 x 8 tokens, window 7, shift 3);
  on maps that are window multiples the two orders are the same function.
  """

  def __init__(self, dim: int, num_heads: int, window: win.Window, shift: win.Window, *,
               rngs: nnx.Rngs, mlp_ratio: float = 4.0, qkv_bias: bool = True,
               drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
               gelu_approximate: bool = False, attention: str = 'einsum',
               dtype: DTypeLike | None = None):
    self.window = tuple(window)
    self.shift = tuple(shift)
    self.norm1 = layer_norm(dim, rngs=rngs, dtype=dtype)
    self.attn = WindowAttention(dim, num_heads, self.window, rngs=rngs, qkv_bias=qkv_bias,
                                attn_drop_rate=attn_drop_rate, proj_drop_rate=drop_rate,
                                attention=attention, dtype=dtype)
    self.norm2 = layer_norm(dim, rngs=rngs, dtype=dtype)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, drop_rate=drop_rate,
                   gelu_approximate=gelu_approximate, dtype=dtype)
    self.drop_path = DropPath(drop_path_rate, rngs=rngs)

  def _attention(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, H, W, C), attention within (shifted) windows."""
    _, h, w, _ = x.shape
    x = pad_to_multiple(x, self.window)
    _, hp, wp, _ = x.shape
    shifted = any(self.shift)
    if shifted:
      x = jnp.roll(x, (-self.shift[0], -self.shift[1]), axis=(1, 2))
    mask = win.shifted_window_mask(hp, wp, self.window, self.shift) if shifted else None
    x = win.window_reverse(self.attn(win.window_partition(x, self.window), mask),
                           self.window, hp, wp)
    if shifted:
      x = jnp.roll(x, self.shift, axis=(1, 2))
    return x[:, :h, :w]

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, H, W, C)."""
    x = x + self.drop_path(self._attention(on_tokens(self.norm1, x)))
    return x + self.drop_path(self.mlp(on_tokens(self.norm2, x)))


# What each block keeps for the backward pass (config.model.remat): 'none'
# keeps every activation; the others wrap the block in jax.checkpoint and
# recompute its forward during the backward pass, keeping only the block's
# input ('block') or also its Linear layers' outputs ('block_save_dots': the
# recomputation is then LayerNorm, GELU and the attention core).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    'none': None,
    'block': jax.checkpoint_policies.nothing_saveable,
    'block_save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class SwinStage(nnx.Module):
  """`depth` Swin blocks at one resolution; every second block is shifted.

  The window is fixed here from the stage's nominal `resolution` (it sizes the
  relative position tables); a stage marked global attends over the whole map.
  remat names a REMAT_POLICIES entry, applied to each block.
  """

  def __init__(self, dim: int, depth: int, num_heads: int, resolution: tuple[int, int],
               window_size: int, *, rngs: nnx.Rngs, drop_path_rates: Sequence[float],
               global_attention: bool = False, remat: str = 'none', **block_kwargs):
    if remat not in REMAT_POLICIES:
      raise ValueError(f'model.remat={remat!r} is not one of {sorted(REMAT_POLICIES)}')
    self.remat = remat
    self.window_size = window_size
    self.global_attention = global_attention
    window, shift = win.stage_window(resolution, window_size, window_size // 2,
                                     global_attention)
    self.blocks = nnx.List([
        SwinBlock(dim, num_heads, window, shift if i % 2 else (0, 0), rngs=rngs,
                  drop_path_rate=drop_path_rates[i], **block_kwargs)
        for i in range(depth)
    ])

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, H, W, C)."""
    run = lambda block, x: block(x)
    if self.remat != 'none':
      run = nnx.remat(run, policy=REMAT_POLICIES[self.remat])
    for block in self.blocks:
      x = run(block, x)
    return x
