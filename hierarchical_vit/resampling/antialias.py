"""Low-pass filtering before subsampling (Zhang 2019, "Making Convolutional
Networks Shift-Invariant Again"): the binomial blur of anti-aliased downsamplers.

Subsampling by 2 folds every frequency above half the new sampling rate back
onto a lower one (aliasing), so a one-pixel shift of the input can change the
output completely. Blurring first with a binomial filter, whose response is
zero at the Nyquist frequency, removes the highest frequencies before they fold.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def binomial_filter(size: int) -> np.ndarray:
  """The 1-D binomial filter of `size` taps, summing to 1: row size-1 of
  Pascal's triangle / 2**(size-1), e.g. 3 -> [1, 2, 1] / 4 (Zhang's 'Tri-3').
  size 1 is the identity (no blur); size 2 is the 2-tap box [1, 1] / 2."""
  if size < 1:
    raise ValueError(f'filter_size={size} must be a positive integer')
  return np.array([math.comb(size - 1, i) for i in range(size)], np.float64) / 2 ** (size - 1)


def blur(x: jax.Array, filter_size: int, stride: int = 1) -> jax.Array:
  """Separable binomial blur of x: (B, H, W, C), sampled every `stride` pixels.

  Reflect-padded by (size - 1) // 2 before and size // 2 after (Zhang's
  BlurPool), so the output is (B, ceil(H / stride), ceil(W / stride), C).
  Runs as size strided multiply-adds per axis: XLA:CPU executes depthwise
  (grouped) convolutions several times slower.
  """
  return blur_padded(reflect_pad(x, filter_size), filter_size, stride)


def reflect_pad(x: jax.Array, filter_size: int, extra: tuple[int, int] = (0, 0)) -> jax.Array:
  """x: (B, H, W, C) reflect-padded as `blur` pads it, plus `extra` more rows
  and columns after (reflected in the same pass)."""
  before, after = (filter_size - 1) // 2, filter_size // 2
  return jnp.pad(x, ((0, 0), (before, after + extra[0]), (before, after + extra[1]), (0, 0)),
                 mode='reflect')


def blur_padded(x: jax.Array, filter_size: int, stride: int = 1) -> jax.Array:
  """The binomial blur of an already padded x: (B, H, W, C), valid positions
  only, every `stride` pixels."""
  taps = binomial_filter(filter_size)
  for axis in (1, 2):
    n_out = -(-(x.shape[axis] - filter_size + 1) // stride)
    span = stride * (n_out - 1) + 1
    x = sum(float(t) * jax.lax.slice_in_dim(x, i, i + span, stride, axis)
            for i, t in enumerate(taps))
  return x
