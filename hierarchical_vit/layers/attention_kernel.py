"""A fused window-attention kernel for NVIDIA GPUs, written in Pallas (Triton).

softmax(q k^T * scale + bias) v for every (window, head) in one kernel: the
(windows, heads, N, N) logits and weights never leave the chip, where XLA's
einsum core writes and reads them four times per step (forward and backward;
on an H100 the core's batched GEMMs and softmax took 9 of a Swin-T step's
38 ms, docs/performance.md). A window's N tokens fit one tile (N <= 128 for
the default 7 x 7 and 8 x 8 windows), so unlike flash attention no online
softmax is needed: a program holds whole rows.

The backward recomputes the weights from q, k and the bias (nothing but the
output is saved), and reduces the bias gradient over the windows that share a
bias inside each program (`_WINDOWS_PER_PROGRAM` of them), leaving XLA a small
sum over programs instead of a (windows, heads, N, N) reduction.

Triton tiles must be powers of two (and >= 16 for its dot): tokens and head
dims are padded up inside the kernel by masked loads, never in memory. On a
CPU the kernel runs in Pallas' interpreter (slow; for tests), and its Triton
lowering can be checked without a GPU (`jax.jit(f).trace(...).lower(
lowering_platforms=('cuda',))`, see tests/test_layers.py).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Windows sharing a bias (one head) per backward program: its bias-gradient
# partial sum covers this many, so the partials are 1/16 of the logits' size.
_WINDOWS_PER_PROGRAM = 16
_NEG_INF = -1e30  # Finite: padded query rows then see a finite max, not NaN.
# A program holds a (tile, tile) float32 block of weights in registers: 128 x
# 128 over 8 warps is 64 per thread; a 256 tile would spill.
MAX_TOKENS = 128


def _tile(n: int) -> int:
  """Triton tile length for n: a power of two, >= 16 for tl.dot."""
  return max(16, 1 << (n - 1).bit_length())


def _num_warps(tile: int) -> int:
  return 4 if tile <= 64 else 8


def _load_rows(ref, n: int, d: int) -> jax.Array:
  """ref: (P, Pd) tile of an (n, d) slab; zeros beyond it."""
  rows = jnp.arange(ref.shape[0])[:, None] < n
  cols = jnp.arange(ref.shape[1])[None, :] < d
  return plgpu.load(ref, mask=rows & cols, other=0)


def _weights(q, k, bias_ref, n: int, scale: float):
  """Unnormalized softmax weights and row sums of one window and head.

  q, k: (P, Pd); returns p: (P, P) float32, with exp(s - rowmax s), and l: (P,).
  """
  logits = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
  logits = logits + _load_rows(bias_ref, n, n)
  logits = jnp.where(jnp.arange(logits.shape[1])[None, :] < n, logits, _NEG_INF)
  p = jnp.exp(logits - logits.max(axis=1, keepdims=True))
  return p, p.sum(axis=1)


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, o_ref, *, n: int, d: int, scale: float):
  q, k, v = (_load_rows(r, n, d) for r in (q_ref, k_ref, v_ref))
  p, l = _weights(q, k, bias_ref, n, scale)
  o = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32) / l[:, None]
  mask = (jnp.arange(o.shape[0])[:, None] < n) & (jnp.arange(o.shape[1])[None, :] < d)
  plgpu.store(o_ref, o.astype(o_ref.dtype), mask=mask)


def _backward_kernel(q_ref, k_ref, v_ref, bias_ref, do_ref, dq_ref, dk_ref, dv_ref, dbias_ref, *,
                     n: int, d: int, scale: float, windows: int):
  """One head over `windows` windows that share a bias: their dq, dk, dv and
  the sum of their bias gradients."""
  tile = bias_ref.shape[0]
  mask = (jnp.arange(q_ref.shape[1])[:, None] < n) & (jnp.arange(q_ref.shape[2])[None, :] < d)

  def window(i, dbias):
    q, k, v, do = (_load_rows(r.at[i], n, d) for r in (q_ref, k_ref, v_ref, do_ref))
    p, l = _weights(q, k, bias_ref, n, scale)
    p = p / l[:, None]
    dv = jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - (p * dp).sum(axis=1, keepdims=True))  # d logits: softmax's Jacobian
    ds_low = ds.astype(q.dtype)
    dq = jnp.dot(ds_low, k, preferred_element_type=jnp.float32) * scale
    dk = jnp.dot(ds_low.T, q, preferred_element_type=jnp.float32) * scale
    for ref, grad in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv)):
      plgpu.store(ref.at[i], grad.astype(ref.dtype), mask=mask)
    return dbias + ds

  dbias = jax.lax.fori_loop(0, windows, window, jnp.zeros((tile, tile), jnp.float32))
  square = (jnp.arange(tile)[:, None] < n) & (jnp.arange(tile)[None, :] < n)
  plgpu.store(dbias_ref, dbias, mask=square)


def _forward(q5: jax.Array, k5: jax.Array, v5: jax.Array, bias: jax.Array, scale: float,
             interpret: bool) -> jax.Array:
  """q5, k5, v5: (M, G, N, heads, d), window m * G + g using bias[g]: (G, heads, N, N)."""
  m, g, n, h, d = q5.shape
  if n > MAX_TOKENS:
    raise ValueError(f'the pallas attention kernel takes windows of up to {MAX_TOKENS} tokens, '
                     f'got {n}: use a smaller model.window_size or model.attention=\'einsum\'')
  tile, dtile = _tile(n), _tile(d)
  window = pl.BlockSpec((None, None, tile, None, dtile), lambda i, j, c: (i, j, 0, c, 0))
  return pl.pallas_call(
      functools.partial(_forward_kernel, n=n, d=d, scale=scale),
      grid=(m, g, h),
      in_specs=[window] * 3 + [pl.BlockSpec((None, None, tile, tile), lambda i, j, c: (j, c, 0, 0))],
      out_specs=window,
      out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=_num_warps(tile), num_stages=1),
      interpret=interpret, name='window_attention_fwd',
  )(q5, k5, v5, bias)


def _chunk(m: int) -> int:
  """Windows per backward program: the largest power of two dividing m, capped."""
  return min(m & -m, _WINDOWS_PER_PROGRAM)


def _backward(q5, k5, v5, bias, do5, scale: float, interpret: bool):
  m, g, n, h, d = q5.shape
  tile, dtile = _tile(n), _tile(d)
  chunk = _chunk(m)
  windows = pl.BlockSpec((chunk, None, tile, None, dtile), lambda s, j, c: (s, j, 0, c, 0))
  bias_spec = pl.BlockSpec((None, None, tile, tile), lambda s, j, c: (j, c, 0, 0))
  partial_spec = pl.BlockSpec((None, None, None, tile, tile), lambda s, j, c: (s, j, c, 0, 0))
  dq, dk, dv, dbias = pl.pallas_call(
      functools.partial(_backward_kernel, n=n, d=d, scale=scale, windows=chunk),
      grid=(m // chunk, g, h),
      in_specs=[windows] * 3 + [bias_spec, windows],
      out_specs=[windows] * 3 + [partial_spec],
      out_shape=[jax.ShapeDtypeStruct(q5.shape, q5.dtype)] * 3
      + [jax.ShapeDtypeStruct((m // chunk, g, h, n, n), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=_num_warps(tile), num_stages=1),
      interpret=interpret, name='window_attention_bwd',
  )(q5, k5, v5, bias, do5)
  return dq, dk, dv, dbias.sum(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def window_attention(q5: jax.Array, k5: jax.Array, v5: jax.Array, bias: jax.Array,
                     scale: float, interpret: bool = False) -> jax.Array:
  """softmax(q k^T * scale + bias) v per window and head.

  q5, k5, v5: (M, G, N, heads, d) windows; bias: (G, heads, N, N) float32,
  window (m, g) using bias[g]. Returns (M, G, N, heads, d) in q's dtype.
  interpret=True runs Pallas' interpreter instead of Triton (any backend).
  """
  return _forward(q5, k5, v5, bias, scale, interpret)


def _window_attention_fwd(q5, k5, v5, bias, scale, interpret):
  return _forward(q5, k5, v5, bias, scale, interpret), (q5, k5, v5, bias)


def _window_attention_bwd(scale, interpret, residuals, do5):
  q5, k5, v5, bias = residuals
  return _backward(q5, k5, v5, bias, do5, scale, interpret)


window_attention.defvjp(_window_attention_fwd, _window_attention_bwd)
