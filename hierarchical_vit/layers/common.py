"""Small shared layers: Dense/LayerNorm factories, MLP, dropout, stochastic depth."""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

# Swin/timm initialise every Linear and the relative position tables this way.
TRUNC_NORMAL = nnx.initializers.truncated_normal(stddev=0.02)
# PyTorch's LayerNorm epsilon: keeps outputs interchangeable with Swin/timm.
LN_EPS = 1e-5


def pad_to_multiple(x: jax.Array, multiple: int | tuple[int, int],
                    value: float = 0.0) -> jax.Array:
  """Pads x: (B, H, W, C) at the bottom/right with `value` to multiples of
  `multiple` (one for both axes, or (for H, for W))."""
  mh, mw = (multiple, multiple) if isinstance(multiple, int) else multiple
  _, h, w, _ = x.shape
  return jnp.pad(x, ((0, 0), (0, -h % mh), (0, -w % mw), (0, 0)), constant_values=value)


def conv_operands(conv: nnx.Conv | nnx.ConvTranspose, x: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x, kernel, bias) in the conv's compute dtype, as its own call would
  cast them: for layers that run a conv's parameters as matmuls or
  multiply-adds (XLA:CPU runs those faster than its grouped or transposed
  convolutions)."""
  operands = (x, conv.kernel[...], conv.bias[...])
  return tuple(nnx.nn.dtypes.promote_dtype(operands, dtype=conv.dtype))


def dense(in_features: int, out_features: int, *, rngs: nnx.Rngs,
          use_bias: bool = True, dtype: DTypeLike | None = None) -> nnx.Linear:
  """A Linear layer initialised as Swin/timm do (trunc-normal 0.02, zero bias)."""
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    kernel_init=TRUNC_NORMAL, rngs=rngs)


def layer_norm(num_features: int, *, rngs: nnx.Rngs,
               dtype: DTypeLike | None = None) -> nnx.LayerNorm:
  return nnx.LayerNorm(num_features, epsilon=LN_EPS, dtype=dtype, rngs=rngs)


def norm_dense(norm: nnx.LayerNorm, linear: nnx.Linear, x: jax.Array) -> jax.Array:
  """linear(norm(x)) for x: (N, C) -> (N, C_out), with the norm's affine folded into linear.

  LayerNorm(x) @ W + b = x_hat @ (scale[:, None] * W) + (bias @ W + b), x_hat
  the normalized x. Same params, same values; what changes is the backward:
  the scale and bias gradients become (C, C_out)-sized products instead of
  column sums over all N rows, which on a full-resolution segmentation head
  (N = B*H*W pixels) made XLA:CPU's LayerNorm + head fwd+bwd 1.5x slower.
  """
  kernel = linear.kernel[...]
  bias = linear.bias[...] if linear.bias is not None else jnp.zeros(kernel.shape[1], kernel.dtype)
  kernel, bias = norm.scale[...][:, None] * kernel, norm.bias[...] @ kernel + bias
  x32 = x.astype(jnp.float32)  # Statistics in float32, as nnx.LayerNorm computes them.
  centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
  x_hat = centered * jax.lax.rsqrt(variance + norm.epsilon)
  x_hat, kernel, bias = nnx.nn.dtypes.promote_dtype((x_hat, kernel, bias), dtype=linear.dtype)
  return x_hat @ kernel + bias


def on_tokens(layer: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """Applies a per-token layer to x: (..., C) through a flat (tokens, C) view.

  XLA:CPU runs Dense layers ~1.4x faster on 2-D operands than on (B, H, W, C)
  ones; on accelerators the reshapes are free.
  """
  y = layer(x.reshape(-1, x.shape[-1]))
  return y.reshape(*x.shape[:-1], y.shape[-1])


def reseed_per_example(module: nnx.Module, key: jax.Array | int, rows: jax.Array) -> None:
  """Reseeds module's 'dropout' streams from `key`, one key per example: the
  example in row r of the global batch gets fold_in(layer key, r), (n,) keys
  for rows: (n,). Every Dropout then draws per-example masks."""
  per_example = lambda path, layer_key, shape: jax.vmap(
      jax.random.fold_in, in_axes=(None, 0))(layer_key, rows)
  nnx.reseed(module, dropout=key, policy=per_example)


class Dropout(nnx.Dropout):
  """nnx.Dropout that also draws one mask per example.

  While its stream holds one key per example, (n,) (reseed_per_example), an
  example's mask depends on its own key alone: it stays the same when the
  batch is cut into micro-batches or spread over devices, so gradient
  accumulation takes the whole batch's step, dropout included. x's leading
  axis must then hold the n examples' rows in order, (n * m, ...), as images
  (B, H, W, C) and windows (B * nW, N, C) do. With a scalar key (a model
  called directly), or a call's own `rngs`, it is nnx.Dropout.
  """

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None) -> jax.Array:
    off = self.deterministic if deterministic is None else deterministic
    if (off or self.rate in (0.0, 1.0) or rngs is not None or self.rngs is None
        or self.rngs.key[...].ndim != 1):
      return super().__call__(x, deterministic=deterministic, rngs=rngs)
    keys, counts = self.rngs.key[...], self.rngs.count[...]
    n, rows = keys.shape[0], x.shape[0]
    if rows % n:
      raise ValueError(f'Dropout got {n} example keys for an input of {rows} rows {x.shape}: '
                       f'per-example masks need the rows of whole examples, n * m')
    self.rngs.count[...] = counts + 1
    shape = [1 if d in self.broadcast_dims else size for d, size in enumerate(x.shape)]
    shape[0] = rows // n
    keep = 1.0 - self.rate
    draw = lambda key, count: jax.random.bernoulli(jax.random.fold_in(key, count), keep, shape)
    mask = jax.vmap(draw)(keys, counts).reshape(rows, *shape[1:])
    return jax.lax.select(jnp.broadcast_to(mask, x.shape), x / keep, jnp.zeros_like(x))


class DropPath(nnx.Module):
  """Stochastic depth: drops the whole residual branch per sample.

  Dropout whose mask is shared by every non-batch axis, scaled by 1/(1-rate),
  which is exactly timm's DropPath.
  """

  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    self.dropout = Dropout(rate, broadcast_dims=(1, 2, 3), rngs=rngs) if rate > 0 else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C)."""
    return x if self.dropout is None else self.dropout(x)


class Mlp(nnx.Module):
  """fc1 -> GELU -> dropout -> fc2 -> dropout, on x: (..., C)."""

  def __init__(self, features: int, hidden_features: int, *, rngs: nnx.Rngs,
               drop_rate: float = 0.0, gelu_approximate: bool = False,
               dtype: DTypeLike | None = None):
    self.fc1 = dense(features, hidden_features, rngs=rngs, dtype=dtype)
    self.fc2 = dense(hidden_features, features, rngs=rngs, dtype=dtype)
    self.drop = Dropout(drop_rate, rngs=rngs)
    self.gelu_approximate = gelu_approximate

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(on_tokens(self.fc1, x), approximate=self.gelu_approximate)
    return self.drop(on_tokens(self.fc2, self.drop(h)))


def is_int(value: object) -> bool:
  """An int config value (numpy's too), bools excluded: True == 1 and 2.0 == 2
  would pass as sizes, where they are typos."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def resolve_dtype(name: str | None) -> type[jnp.floating] | None:
  """Maps a config string ('float32', 'bfloat16') to a jnp dtype."""
  choices = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, '': None}
  if name is None:
    return None
  if name not in choices:
    raise ValueError(f'model.dtype={name!r} is not one of {sorted(k for k in choices if k)}')
  return choices[name]
