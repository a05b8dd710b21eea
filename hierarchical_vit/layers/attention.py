"""Window multi-head self-attention with a learned relative position bias.

The attention core (softmax(q k^T * scale + bias) v) is picked by name from
ATTENTION_CORES (config.model.attention):

  einsum:       two einsums, an f32 softmax normalized after the value product,
                any backend, with attention dropout.
  einsum_lowp:  the same with the logits stored in the compute dtype, as under
                torch.autocast (bfloat16 models; float32 ones are unchanged).
  cudnn:        cuDNN's fused attention through jax.nn.dot_product_attention;
                NVIDIA GPUs, bfloat16, no attention dropout.
  pallas:       our fused Pallas (Triton) kernel, layers/attention_kernel.py;
                NVIDIA GPUs (split over a mesh by batch), no attention
                dropout, windows of <= 128 tokens.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from hierarchical_vit.layers import attention_kernel
from hierarchical_vit.layers import windows as win
from hierarchical_vit.layers.common import TRUNC_NORMAL, Dropout, dense, on_tokens

# core(q, k, v, bias, scale, dropout) -> (B', N, heads, d), for q, k, v:
# (B', N, heads, d) windows, bias: (G, heads, N, N) float32, G dividing B'
# (window b uses bias[b % G]: the shift mask repeats per image), and dropout
# applied to the attention weights.
AttentionCore = Callable[..., jax.Array]


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, scale: float,
                     dropout: Callable[[jax.Array], jax.Array],
                     logits_dtype: DTypeLike | None = jnp.float32) -> jax.Array:
  """Softmax attention with the normalization after the value product.

  softmax(s) v = (exp(s - max s) v) / sum exp(s - max s): dividing the
  (N, head_dim) output instead of the (N, N) weights lets XLA:CPU fuse the
  core better (eval 1.2x faster on the small preset, 1.1x on Swin-T at 32x32;
  training unchanged). Dropout on the weights commutes with the division, and
  the max is a constant to autodiff because the softmax ignores shifts.
  The first product writes its logits in `logits_dtype` (None: q's dtype);
  the bias, exponentials and row sums are float32 whatever it is, and the
  weights enter the value product in v's dtype.
  """
  b, n, h, _ = q.shape
  g = bias.shape[0]
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * scale, k, preferred_element_type=logits_dtype)
  logits = logits.astype(jnp.float32)
  logits = (logits.reshape(b // g, g, h, n, n) + bias).reshape(b, h, n, n)
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  out = jnp.einsum('bhqk,bkhd->bqhd', dropout(weights.astype(v.dtype)), v)
  return out / weights.sum(axis=-1).transpose(0, 2, 1)[..., None].astype(out.dtype)


def lowp_einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                          scale: float, dropout: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """einsum_attention with the logits rounded to the compute dtype, as
  torch.autocast rounds its `q @ k^T`.

  In bfloat16 the (windows, heads, N, N) logits, the largest tensor of the core,
  take 2 bytes where einsum's take 4: on an H100 the einsum core's float32
  softmax and small batched products took 9 of a Swin-T train step's 38 ms
  (docs/performance.md). The price is the logits' precision (8 bits of mantissa).
  """
  return einsum_attention(q, k, v, bias, scale, dropout, logits_dtype=None)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, scale: float,
                    dropout: Callable[[jax.Array], jax.Array],
                    implementation: str = 'cudnn') -> jax.Array:
  """cuDNN's fused attention kernel through jax.nn.dot_product_attention.

  The kernel takes no dropout, and trains with a bias only on even window
  lengths (Swin's 7 x 7 = 49), so an odd window gets one zero token that no
  query attends to, cropped after. implementation='xla' runs the same call on
  any backend (tests).
  """
  del dropout  # WindowAttention refuses attn_drop_rate > 0 with this core.
  b, n = q.shape[:2]
  g = bias.shape[0]
  if n % 2:
    q, k, v = (jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0))) for t in (q, k, v))
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 1), (0, 1))).at[..., n].set(win.MASK_VALUE)
  if g > 1:  # Tiled to one bias per window: the kernel only broadcasts size-1 dims.
    bias = jnp.broadcast_to(bias, (b // g, *bias.shape)).reshape(b, *bias.shape[1:])
  out = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), scale=scale,
                                     implementation=implementation)
  return out[:, :n]


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, scale: float,
                     dropout: Callable[[jax.Array], jax.Array],
                     interpret: bool = False) -> jax.Array:
  """The fused kernel of layers/attention_kernel.py: no (windows, heads, N, N)
  tensor in memory. The kernel reads q, k and v packed as (B', N, 3, heads, d):
  stacking the slices of WindowAttention's qkv gives its output back, which
  XLA's simplifier sees, so nothing is copied. interpret=True runs it in
  Pallas' interpreter on any backend (tests)."""
  del dropout  # WindowAttention refuses attn_drop_rate > 0 with this core.
  b, n, h, d = q.shape
  g = bias.shape[0]
  qkv = jnp.stack([q, k, v], axis=2).reshape(b // g, g, n, 3, h, d)
  return attention_kernel.window_attention(qkv, bias, scale, interpret).reshape(b, n, h, d)


ATTENTION_CORES: dict[str, AttentionCore] = {
    'einsum': einsum_attention,
    'einsum_lowp': lowp_einsum_attention,
    'cudnn': cudnn_attention,
    'pallas': pallas_attention,
}


# The fused kernels take no dropout; cuDNN's flash attention takes head widths
# that are multiples of 8, up to 256 on Hopper (128 before it).
FUSED_CORES = ('cudnn', 'pallas')
_CUDNN_MAX_HEAD_DIM = 256


def _check_core_fits(attention: str, head_dim: int, attn_drop_rate: float) -> None:
  """Refused here, when the model is built, rather than inside the kernel at
  the first traced step, after a workdir is written (or, built alone, with the
  dropout silently skipped)."""
  if attention in FUSED_CORES and attn_drop_rate:
    raise ValueError(f'model.attention={attention!r} has no attention dropout: '
                     f'model.attn_drop_rate={attn_drop_rate} must be 0')
  if attention == 'cudnn' and (head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM):
    raise ValueError(f"model.attention='cudnn' needs a head width (stage width / "
                     f'model.num_heads) that is a multiple of 8 and at most '
                     f'{_CUDNN_MAX_HEAD_DIM}, got {head_dim}: change model.embed_dim or '
                     "model.num_heads, or use model.attention='einsum'")


class WindowAttention(nnx.Module):
  """W-MSA of Swin: attention inside each (wh, ww) window, plus a bias per head
  looked up from `relative_position_bias_table` by the tokens' offset.

  Parameter names and layouts (qkv packed as (3, heads, head_dim) on the
  output axis) follow Swin/timm so that weights convert one to one.
  """

  def __init__(self, dim: int, num_heads: int, window: win.Window, *, rngs: nnx.Rngs,
               qkv_bias: bool = True, attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
               attention: str = 'einsum', dtype: DTypeLike | None = None):
    if dim % num_heads:
      raise ValueError(f'num_heads={num_heads} does not divide the width {dim}')
    if attention not in ATTENTION_CORES:
      raise ValueError(f'model.attention={attention!r} is not one of {sorted(ATTENTION_CORES)}')
    _check_core_fits(attention, dim // num_heads, attn_drop_rate)
    self.core = ATTENTION_CORES[attention]
    self.num_heads = num_heads
    self.window = tuple(window)
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = dense(dim, 3 * dim, use_bias=qkv_bias, rngs=rngs, dtype=dtype)
    self.proj = dense(dim, dim, rngs=rngs, dtype=dtype)
    table_size = (2 * window[0] - 1) * (2 * window[1] - 1)
    self.relative_position_bias_table = nnx.Param(
        TRUNC_NORMAL(rngs.params(), (table_size, num_heads), jnp.float32))
    self.attn_drop = Dropout(attn_drop_rate, rngs=rngs)
    self.proj_drop = Dropout(proj_drop_rate, rngs=rngs)

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
    bias = self.relative_position_bias()[None]  # (1, heads, N, N)
    if mask is not None:
      bias = bias + mask[:, None]  # (nW, heads, N, N)
    out = self.core(q, k, v, bias, self.scale, self.attn_drop).reshape(bw, n, c)
    return self.proj_drop(on_tokens(self.proj, out))
