"""A fused window-attention kernel for NVIDIA GPUs, written in Pallas (Triton).

softmax(q k^T * scale + bias) v for every (window, head) in one kernel: the
(windows, heads, N, N) logits and weights never leave the chip, where XLA's
einsum core writes and reads them four times per step (forward and backward;
on an H100 the core's batched GEMMs and softmax took 9 of a Swin-T step's
38 ms, docs/performance.md). A window's N tokens fit one tile (N <= 128 for
the default 7 x 7 and 8 x 8 windows), so unlike flash attention no online
softmax is needed: a program holds whole rows.

The backward recomputes the weights from q, k and the bias (only the inputs
are saved), and reduces the bias gradient over the windows that share a bias
inside each program (`_WINDOWS_PER_PROGRAM` of them), leaving XLA a small sum
over programs instead of a (windows, heads, N, N) reduction.

XLA cannot partition a Triton call, so both kernels carry a
custom_partitioning rule: under a mesh that splits the batch, each device
runs its own windows and the bias gradient is summed over the devices.

Triton tiles must be powers of two (and >= 16 for its dot): tokens and head
dims are padded up inside the kernel by masked loads, never in memory (only
the small bias table is padded, so that its rows load whole). Float32 inputs
multiply in TF32, as XLA's default precision does on NVIDIA GPUs. On a CPU the
kernel runs in Pallas' interpreter (slow; for tests). Its Triton lowering can
be checked without a GPU where jaxlib lowers Pallas to Triton IR itself (0.10;
later versions compile it at lowering, with a CUDA build): see
tests/test_layers.py.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

# Windows sharing a bias (one head) per backward program: its bias-gradient
# partial sum covers this many, so the partials are <= 1/16 of the logits.
_WINDOWS_PER_PROGRAM = 16
# Added to the logits of padded keys (finite: no inf - inf anywhere).
_NEG_INF = -1e30
# A program holds (tile, tile) float32 blocks of logits and weights in
# registers: at 128 x 128 the backward already spills a little for sm_90a
# (benchmarks/kernel_resources.py); beyond it would spill heavily.
MAX_TOKENS = 128


def _tile(n: int) -> int:
  """Triton tile length for n: a power of two, >= 16 for tl.dot."""
  return max(16, 1 << (n - 1).bit_length())


def _num_warps(tile: int) -> int:
  """Warps per program: 8 for 128-token tiles halves each thread's share."""
  return 4 if tile <= 64 else 8


def _valid(shape: tuple[int, int], n: int, d: int) -> jax.Array:
  """(P, Pd) mask of the (n, d) slab inside a padded tile."""
  return (jnp.arange(shape[0])[:, None] < n) & (jnp.arange(shape[1])[None, :] < d)


def _load(ref, n: int, d: int) -> jax.Array:
  """ref: (P, Pd) tile of an (n, d) slab; zeros beyond it."""
  return plgpu.load(ref, mask=_valid(ref.shape, n, d), other=0)


def _weights(q: jax.Array, k: jax.Array, bias_ref, scale: float):
  """Unnormalized softmax weights and row sums of one window and head.

  q, k: (P, Pd) zero-padded; bias_ref: (P, P) tile of the padded bias, whose
  padded keys hold _NEG_INF. Returns p = exp(s - rowmax s): (P, P) float32
  (zero on padded keys) and its row sums l: (P,).
  """
  logits = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale + bias_ref[...]
  p = jnp.exp(logits - logits.max(axis=1, keepdims=True))
  return p, p.sum(axis=1)


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, o_ref, *, n: int, d: int, scale: float):
  """One window and head. q/k/v/o_ref: (P, Pd) tiles of (n, d); bias_ref: (P, P)."""
  q, k, v = (_load(r, n, d) for r in (q_ref, k_ref, v_ref))
  p, l = _weights(q, k, bias_ref, scale)
  o = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32) / l[:, None]
  plgpu.store(o_ref, o.astype(o_ref.dtype), mask=_valid(o.shape, n, d))


def _backward_kernel(qkv_ref, bias_ref, do_ref, dqkv_ref, dbias_ref, *, n: int, d: int, m: int,
                     scale: float):
  """One head over up to `chunk` windows that share a bias: their d(q, k, v)
  and the sum of their bias gradients.

  qkv_ref, dqkv_ref: (chunk, P, 3, Pd) and do_ref: (chunk, P, Pd) tiles of
  windows s * chunk + i (m in all); bias_ref, dbias_ref: (P, P).
  """
  chunk = qkv_ref.shape[0]
  windows = jnp.minimum(chunk, m - pl.program_id(0) * chunk)  # The last program may hold fewer.
  # Integer slot indices must be arrays for Pallas' Triton lowering.
  slot = lambda ref, i, t: ref.at[i, :, jnp.int32(t), :]

  def window(i, dbias):
    q, k, v = (_load(slot(qkv_ref, i, t), n, d) for t in range(3))
    do = _load(do_ref.at[i], n, d)
    p, l = _weights(q, k, bias_ref, scale)
    p = p / l[:, None]
    dv = jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - (p * dp).sum(axis=1, keepdims=True))  # d logits: softmax's Jacobian
    ds_low = ds.astype(q.dtype)
    dq = jnp.dot(ds_low, k, preferred_element_type=jnp.float32) * scale
    dk = jnp.dot(ds_low.T, q, preferred_element_type=jnp.float32) * scale
    for t, grad in enumerate((dq, dk, dv)):
      plgpu.store(slot(dqkv_ref, i, t), grad.astype(dqkv_ref.dtype), mask=_valid(grad.shape, n, d))
    return dbias + ds

  dbias_ref[...] = jax.lax.fori_loop(0, windows, window, jnp.zeros(dbias_ref.shape, jnp.float32))


def _padded_bias(bias: jax.Array, tile: int) -> jax.Array:
  """(G, heads, N, N) -> (G, heads, P, P), padded keys at _NEG_INF: the kernels
  then load whole, aligned rows and need no key mask."""
  n = bias.shape[-1]
  bias = jnp.pad(bias, ((0, 0), (0, 0), (0, tile - n), (0, 0)))
  return jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, tile - n)), constant_values=_NEG_INF)


def _forward(qkv: jax.Array, bias: jax.Array, scale: float, interpret: bool) -> jax.Array:
  """qkv: (M, G, N, 3, heads, d), window m * G + g using bias[g]: (G, heads, N, N).
  Returns (M, G, N, heads, d)."""
  m, g, n, _, h, d = qkv.shape
  if n > MAX_TOKENS:
    raise ValueError(f'the pallas attention kernel takes windows of up to {MAX_TOKENS} tokens, '
                     f'got {n}: use a smaller model.window_size or model.attention=\'einsum\'')
  tile, dtile = _tile(n), _tile(d)
  # q, k and v are read in place from the packed array: one BlockSpec per slot.
  slots = [pl.BlockSpec((None, None, tile, None, None, dtile),
                        lambda i, j, c, t=t: (i, j, 0, t, c, 0)) for t in range(3)]
  out = pl.BlockSpec((None, None, tile, None, dtile), lambda i, j, c: (i, j, 0, c, 0))
  return pl.pallas_call(
      functools.partial(_forward_kernel, n=n, d=d, scale=scale),
      grid=(m, g, h),
      in_specs=slots + [pl.BlockSpec((None, None, tile, tile), lambda i, j, c: (j, c, 0, 0))],
      out_specs=out,
      out_shape=jax.ShapeDtypeStruct((m, g, n, h, d), qkv.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=_num_warps(tile), num_stages=1),
      interpret=interpret, name='window_attention_fwd',
  )(qkv, qkv, qkv, _padded_bias(bias, tile))


def _backward(qkv: jax.Array, bias: jax.Array, do: jax.Array, scale: float,
              interpret: bool) -> tuple[jax.Array, jax.Array]:
  """Gradients of _forward's inputs; do: (M, G, N, heads, d) like its output."""
  m, g, n, _, h, d = qkv.shape
  tile, dtile = _tile(n), _tile(d)
  chunk = _WINDOWS_PER_PROGRAM  # A block may overhang m: the kernel stops at m.
  programs = pl.cdiv(m, chunk)
  packed = pl.BlockSpec((chunk, None, tile, 3, None, dtile), lambda s, j, c: (s, j, 0, 0, c, 0))
  out = pl.BlockSpec((chunk, None, tile, None, dtile), lambda s, j, c: (s, j, 0, c, 0))
  bias_spec = pl.BlockSpec((None, None, tile, tile), lambda s, j, c: (j, c, 0, 0))
  partial_spec = pl.BlockSpec((None, None, None, tile, tile), lambda s, j, c: (s, j, c, 0, 0))
  dqkv, dbias = pl.pallas_call(
      functools.partial(_backward_kernel, n=n, d=d, m=m, scale=scale),
      grid=(programs, g, h),
      in_specs=[packed, bias_spec, out],
      out_specs=[packed, partial_spec],
      out_shape=[jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),
                 jax.ShapeDtypeStruct((programs, g, h, tile, tile), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=_num_warps(tile), num_stages=1),
      interpret=interpret, name='window_attention_bwd',
  )(qkv, _padded_bias(bias, tile), do)
  return dqkv, dbias.sum(axis=0)[..., :n, :n]


def _batch_sharded(sharding: jax.sharding.NamedSharding, ndim: int) -> jax.sharding.NamedSharding:
  """`sharding`'s split of the leading (window batch) axis only, over `ndim` axes."""
  batch = tuple(sharding.spec)[0] if len(sharding.spec) else None
  return jax.sharding.NamedSharding(sharding.mesh, P(batch, *[None] * (ndim - 1)))


@functools.partial(custom_partitioning, static_argnums=(2, 3))
def _forward_sharded(qkv: jax.Array, bias: jax.Array, scale: float, interpret: bool) -> jax.Array:
  """_forward, split over the devices by window batch (each runs its own windows)."""
  return _forward(qkv, bias, scale, interpret)


def _forward_partition(scale, interpret, mesh, arg_shapes, result_shape):
  del mesh, result_shape
  qkv = _batch_sharded(arg_shapes[0].sharding, 6)
  replicated = jax.sharding.NamedSharding(qkv.mesh, P())
  lower = lambda qkv, bias: _forward(qkv, bias, scale, interpret)
  return qkv.mesh, lower, _batch_sharded(qkv, 5), (qkv, replicated)


_forward_sharded.def_partition(partition=_forward_partition,
                               sharding_rule='m g n t h d, g h i j -> m g n h d')


@functools.partial(custom_partitioning, static_argnums=(3, 4))
def _backward_sharded(qkv: jax.Array, bias: jax.Array, do: jax.Array, scale: float,
                      interpret: bool) -> tuple[jax.Array, jax.Array]:
  """_backward, split by window batch; the bias gradient summed over devices."""
  return _backward(qkv, bias, do, scale, interpret)


def _backward_partition(scale, interpret, mesh, arg_shapes, result_shape):
  del mesh, result_shape
  qkv = _batch_sharded(arg_shapes[0].sharding, 6)
  replicated = jax.sharding.NamedSharding(qkv.mesh, P())
  axes = qkv.spec[0]

  def lower(qkv, bias, do):
    dqkv, dbias = _backward(qkv, bias, do, scale, interpret)
    return dqkv, jax.lax.psum(dbias, axes) if axes else dbias

  return qkv.mesh, lower, (qkv, replicated), (qkv, replicated, _batch_sharded(qkv, 5))


_backward_sharded.def_partition(
    partition=_backward_partition,
    sharding_rule='m g n t h d, g h i j, m g n h d -> m g n t h d, g h i j')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def window_attention(qkv: jax.Array, bias: jax.Array, scale: float,
                     interpret: bool = False) -> jax.Array:
  """softmax(q k^T * scale + bias) v per window and head.

  qkv: (M, G, N, 3, heads, d) windows with q, k, v packed as the qkv Linear
  writes them; bias: (G, heads, N, N) float32, window (m, g) using bias[g].
  Returns (M, G, N, heads, d) in qkv's dtype. Under a mesh the windows split
  over the devices that split M (the batch). interpret=True runs Pallas'
  interpreter instead of Triton (any backend).
  """
  return _forward_sharded(qkv, bias, scale, interpret)


def _window_attention_fwd(qkv, bias, scale, interpret):
  return _forward_sharded(qkv, bias, scale, interpret), (qkv, bias)


def _window_attention_bwd(scale, interpret, residuals, do):
  qkv, bias = residuals
  return _backward_sharded(qkv, bias, do, scale, interpret)


window_attention.defvjp(_window_attention_fwd, _window_attention_bwd)
