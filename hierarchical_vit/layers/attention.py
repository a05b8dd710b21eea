"""Window multi-head self-attention with a learned relative position bias."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from hierarchical_vit.layers import windows as win
from hierarchical_vit.layers.common import TRUNC_NORMAL, dense, on_tokens


class WindowAttention(nnx.Module):
  """W-MSA of Swin: attention inside each (wh, ww) window, plus a bias per head
  looked up from `relative_position_bias_table` by the tokens' offset.

  Parameter names and layouts (qkv packed as (3, heads, head_dim) on the
  output axis) follow Swin/timm so that weights convert one to one.
  """

  def __init__(self, dim: int, num_heads: int, window: win.Window, *, rngs: nnx.Rngs,
               qkv_bias: bool = True, attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
               dtype: DTypeLike | None = None):
    if dim % num_heads:
      raise ValueError(f'num_heads={num_heads} does not divide the width {dim}')
    self.num_heads = num_heads
    self.window = tuple(window)
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = dense(dim, 3 * dim, use_bias=qkv_bias, rngs=rngs, dtype=dtype)
    self.proj = dense(dim, dim, rngs=rngs, dtype=dtype)
    table_size = (2 * window[0] - 1) * (2 * window[1] - 1)
    self.relative_position_bias_table = nnx.Param(
        TRUNC_NORMAL(rngs.params(), (table_size, num_heads), jnp.float32))
    self.attn_drop = nnx.Dropout(attn_drop_rate, rngs=rngs)
    self.proj_drop = nnx.Dropout(proj_drop_rate, rngs=rngs)

  def relative_position_bias(self) -> jax.Array:
    """(heads, N, N) bias, N = wh * ww."""
    index = win.relative_position_index(self.window)
    bias = self.relative_position_bias_table[...][index.reshape(-1)]
    n = index.shape[0]
    return bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)

  def __call__(self, x: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
    """x: (B * nW, N, C) windows; mask: (nW, N, N) additive or None."""
    bw, n, c = x.shape
    qkv = on_tokens(self.qkv, x).reshape(bw, n, 3, self.num_heads, c // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B * nW, N, heads, head_dim)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q * self.scale, k)
    logits = logits.astype(jnp.float32) + self.relative_position_bias()
    if mask is not None:
      nw = mask.shape[0]
      logits = logits.reshape(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
      logits = logits.reshape(bw, self.num_heads, n, n)
    probs = self.attn_drop(jax.nn.softmax(logits, axis=-1).astype(v.dtype))
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(bw, n, c)
    return self.proj_drop(on_tokens(self.proj, out))
