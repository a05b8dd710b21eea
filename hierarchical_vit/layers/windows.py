"""Window geometry for Swin attention: partition, reverse, bias index, shift mask.

Pure functions of static shapes; masks and indices are numpy constants that
XLA folds into the program, so they are recomputed, never stored or loaded.
"""

import jax
import numpy as np

Window = tuple[int, int]

# Swin's additive mask value: large enough to zero the softmax, small enough
# to stay finite in bfloat16.
MASK_VALUE = -100.0


def window_partition(x: jax.Array, window: Window) -> jax.Array:
  """x: (B, H, W, C), H and W multiples of window -> (B * nW, wh * ww, C)."""
  b, h, w, c = x.shape
  wh, ww = window
  x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, wh * ww, c)


def window_reverse(windows: jax.Array, window: Window, height: int, width: int) -> jax.Array:
  """windows: (B * nW, wh * ww, C) -> (B, height, width, C); inverts window_partition."""
  wh, ww = window
  c = windows.shape[-1]
  x = windows.reshape(-1, height // wh, width // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, height, width, c)


def relative_position_index(window: Window) -> np.ndarray:
  """(N, N) int32 index into a ((2wh-1) * (2ww-1), heads) bias table, N = wh * ww.

  Entry [i, j] encodes the offset of token i relative to token j, row-major in
  the (dy, dx) plane, as in Swin.
  """
  wh, ww = window
  coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing='ij')).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
  return ((rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)).astype(np.int32)


def shifted_window_mask(height: int, width: int, window: Window, shift: Window) -> np.ndarray:
  """(nW, N, N) additive mask for attention in cyclically shifted windows.

  After a cyclic shift by `shift`, a window may hold tokens from up to 3 x 3
  regions of the unshifted map that are not neighbours; tokens attend only
  within their own region. height and width are the (padded) map size.
  """

  def regions(size: int, win: int, sft: int) -> np.ndarray:
    ids = np.zeros(size, np.int32)
    if sft > 0:
      ids[size - win:size - sft] = 1
      ids[size - sft:] = 2
    return ids

  region = regions(height, window[0], shift[0])[:, None] * 3 + regions(width, window[1], shift[1])
  region_windows = window_partition(region[None, :, :, None], window)[..., 0]  # (nW, N)
  same = region_windows[:, :, None] == region_windows[:, None, :]
  return np.where(same, 0.0, MASK_VALUE).astype(np.float32)


def stage_window(resolution: tuple[int, int], window_size: int, shift_size: int,
                 global_attention: bool = False) -> tuple[Window, Window]:
  """Window and shift per axis for a stage of `resolution` tokens.

  As in Swin, an axis no longer than the window is covered by one window the
  size of the axis, and is not shifted; a global_attention stage's one window
  is the whole map.
  """
  if global_attention:
    return tuple(resolution), (0, 0)
  window, shift = [], []
  for size in resolution:
    if size <= window_size:
      window.append(size)
      shift.append(0)
    else:
      window.append(window_size)
      shift.append(shift_size)
  return tuple(window), tuple(shift)
