"""Resampler registries: shared contract for every entry, plus numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hierarchical_vit import resampling
from hierarchical_vit.resampling import DOWNSAMPLERS, UPSAMPLERS, space_to_depth
from hierarchical_vit.resampling import antialias, downsample
from hierarchical_vit.resampling.downsample import soft_pool_2x2
from hierarchical_vit.resampling.rearrange import expand_patches

SIZES = [(8, 8), (7, 9)]  # even and odd


def _ln(x, scale, bias, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _assert_gradients_flow(module, x, has_params: bool = True):
  """The gradients of the parameters and of the input (to earlier stages),
  in one pass: finite (the -inf paddings of the max and soft pools must not
  leak NaNs), and the input's non-zero."""
  # Jitted: eager differentiation compiles every op alone, ~7x slower here.
  grad = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2), argnums=(0, 1)))
  params, inputs = grad(module, x)
  leaves = jax.tree.leaves(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves) and (len(leaves) > 0) == has_params
  assert bool(jnp.all(jnp.isfinite(inputs))) and bool(jnp.any(inputs != 0))


@pytest.mark.parametrize('name', sorted(DOWNSAMPLERS))
@pytest.mark.parametrize('size', SIZES)
def test_downsampler_contract(name, size):
  c = 8
  module = DOWNSAMPLERS[name](c, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, *size, c))
  y = module(x)
  expected_c = 4 * c if name == 'space_to_depth' else 2 * c
  assert y.shape == (2, -(-size[0] // 2), -(-size[1] // 2), expected_c)
  assert module.out_features == expected_c
  assert bool(jnp.all(jnp.isfinite(y)))
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(module, x), y, rtol=1e-5, atol=1e-5)
  _assert_gradients_flow(module, x, has_params=name != 'space_to_depth')  # Parameter-free.


@pytest.mark.parametrize('name', sorted(DOWNSAMPLERS))
def test_downsampler_out_features(name):
  if name == 'space_to_depth':
    with pytest.raises(ValueError, match='space_to_depth'):
      DOWNSAMPLERS[name](8, 12, rngs=nnx.Rngs(0))
    return
  assert DOWNSAMPLERS[name](8, 24, rngs=nnx.Rngs(0))(jnp.ones((1, 4, 4, 8))).shape[-1] == 24


@pytest.mark.parametrize('name', sorted(set(DOWNSAMPLERS) - {'space_to_depth'}))
def test_a_zero_width_is_refused_not_taken_for_the_default(name):
  with pytest.raises(ValueError, match=r"a downsampler's out_features=0 must be >= 1"):
    DOWNSAMPLERS[name](8, 0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('name', sorted(UPSAMPLERS))
def test_a_zero_upsampler_width_is_refused(name):
  with pytest.raises(ValueError, match=r"an upsampler's out_features=0 must be >= 1"):
    UPSAMPLERS[name](8, 0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('name', sorted(UPSAMPLERS))
@pytest.mark.parametrize('size', SIZES)
def test_upsampler_contract(name, size):
  c = 8
  module = UPSAMPLERS[name](c, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, *size, c))
  y = module(x)
  assert y.shape == (2, 2 * size[0], 2 * size[1], c // 2)
  assert module.out_features == c // 2
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(module, x), y, rtol=1e-5, atol=1e-5)
  _assert_gradients_flow(module, x)
  # factor and out_features are part of every upsampler's contract (the
  # decoder's final x4 step uses them).
  y4 = UPSAMPLERS[name](c, 5, factor=4, rngs=nnx.Rngs(0))(x)
  assert y4.shape == (2, 4 * size[0], 4 * size[1], 5)


def test_patch_merge_matches_numpy_swin_order():
  c, out = 3, 5
  module = DOWNSAMPLERS['patch_merge'](c, out, rngs=nnx.Rngs(0))
  module.norm.scale[...] = jax.random.normal(jax.random.key(2), (4 * c,))
  module.norm.bias[...] = jax.random.normal(jax.random.key(3), (4 * c,))
  for h, w in [(6, 4), (5, 7)]:
    x = np.random.default_rng(0).normal(size=(2, h, w, c)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    merged = np.concatenate(
        [xp[:, 0::2, 0::2], xp[:, 1::2, 0::2], xp[:, 0::2, 1::2], xp[:, 1::2, 1::2]], axis=-1)
    ref = _ln(merged, np.asarray(module.norm.scale[...]), np.asarray(module.norm.bias[...]))
    ref = ref @ np.asarray(module.reduction.kernel[...])
    np.testing.assert_allclose(module(jnp.asarray(x)), ref, rtol=1e-4, atol=1e-4)


def test_space_to_depth_matches_numpy_slices_in_swin_order():
  x = np.random.default_rng(0).normal(size=(2, 6, 9, 3)).astype(np.float32)
  for f, xf in [(2, x[:, :, :8]), (3, x)]:
    # Column offset major, row offset minor: Swin's x0, x1, x2, x3 for f = 2.
    ref = np.concatenate([xf[:, dy::f, dx::f] for dx in range(f) for dy in range(f)], -1)
    np.testing.assert_array_equal(space_to_depth(jnp.asarray(xf), f), ref)


def test_space_to_depth_module_keeps_every_value():
  x = jax.random.normal(jax.random.key(0), (1, 5, 5, 2))
  y = DOWNSAMPLERS['space_to_depth'](2, rngs=nnx.Rngs(0))(x)
  # Padded to 6x6 with zeros: the 25 * 2 inputs plus 11 * 2 zeros.
  assert sorted(np.asarray(y).ravel().tolist()) == sorted(
      np.asarray(x).ravel().tolist() + [0.0] * 22)


def test_pooling_matches_numpy():
  x = np.random.default_rng(0).normal(size=(1, 5, 4, 2)).astype(np.float32)
  for name, reduce in [('avg_pool', np.mean), ('max_pool', np.max)]:
    module = DOWNSAMPLERS[name](2, 3, rngs=nnx.Rngs(0))
    pooled = np.zeros((1, 3, 2, 2), np.float32)
    for i in range(3):
      for j in range(2):
        pooled[0, i, j] = reduce(x[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(-1, 2), axis=0)
    ref = _ln(pooled, 1.0, 0.0) @ np.asarray(module.reduction.kernel[...])
    np.testing.assert_allclose(module(jnp.asarray(x)), ref, rtol=1e-4, atol=1e-4)


def test_patch_expand_matches_numpy_rearrange():
  c = 8
  for factor, out in [(2, 4), (4, 8)]:
    module = UPSAMPLERS['patch_expand'](c, out, factor=factor, rngs=nnx.Rngs(0))
    assert module.expand.kernel.shape == (c, factor * factor * out)
    x = np.random.default_rng(1).normal(size=(2, 3, 5, c)).astype(np.float32)
    y = x @ np.asarray(module.expand.kernel[...])
    b, h, w, _ = y.shape
    ref = np.zeros((b, h * factor, w * factor, out), np.float32)
    for p1 in range(factor):
      for p2 in range(factor):
        block = y[..., (p1 * factor + p2) * out:(p1 * factor + p2 + 1) * out]
        ref[:, p1::factor, p2::factor] = block
    np.testing.assert_allclose(module(jnp.asarray(x)), _ln(ref, 1.0, 0.0), rtol=1e-4, atol=1e-4)


def _pil_resize(x: np.ndarray, factor: int, method: str) -> np.ndarray:
  """Reference resize of x: (B, H, W, C) with Pillow, channel by channel."""
  resample = {'bilinear': Image.BILINEAR, 'nearest': Image.NEAREST, 'bicubic': Image.BICUBIC}
  b, h, w, c = x.shape
  out = np.zeros((b, h * factor, w * factor, c), np.float32)
  for i in range(b):
    for k in range(c):
      img = Image.fromarray(x[i, :, :, k], mode='F')
      out[i, :, :, k] = np.asarray(img.resize((w * factor, h * factor), resample[method]))
  return out


@pytest.mark.parametrize('method', ['bilinear', 'nearest', 'bicubic'])
def test_interpolate_matches_reference_resize(method):
  c, out = 3, 2
  module = UPSAMPLERS['interpolate'](c, out, method=method, rngs=nnx.Rngs(0))
  x = np.random.default_rng(2).normal(size=(2, 5, 6, c)).astype(np.float32)
  ref = _pil_resize(x, 2, method) @ np.asarray(module.proj.kernel[...])
  np.testing.assert_allclose(module(jnp.asarray(x)), _ln(ref, 1.0, 0.0), rtol=2e-3, atol=2e-3)


def test_unknown_names_list_choices():
  with pytest.raises(ValueError, match=r"model.downsample='bogus'.*avg_pool.*patch_merge"):
    resampling.make_downsampler('bogus', 8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model.upsample='bogus'.*interpolate.*patch_expand"):
    resampling.make_upsampler('bogus', 8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"method='cubic'.*bilinear"):
    UPSAMPLERS['interpolate'](8, method='cubic', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'kernel_size=5'):
    DOWNSAMPLERS['conv'](8, kernel_size=5, rngs=nnx.Rngs(0))
  for bad in (4, True, 3.0):
    with pytest.raises(ValueError, match=rf'depthwise_conv_pool.kernel_size={bad!r} must be an '
                                         'odd positive integer'):
      DOWNSAMPLERS['depthwise_conv_pool'](8, kernel_size=bad, rngs=nnx.Rngs(0))


def _numpy_depthwise_conv_stride_2(x, kernel, bias):
  """Direct loops: out[b, i, j, c*m + q] = bias + sum_{dy,dx} xpad[b, 2i+dy, 2j+dx, c] * w."""
  k = kernel.shape[0]
  b, h, w, c = x.shape
  m = kernel.shape[-1] // c
  pad = k // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = (h + 2 * pad - k) // 2 + 1, (w + 2 * pad - k) // 2 + 1
  out = np.zeros((b, ho, wo, c * m), np.float64)
  for i in range(ho):
    for j in range(wo):
      window = xp[:, 2 * i:2 * i + k, 2 * j:2 * j + k]  # (b, k, k, c)
      for ch in range(c):
        for q in range(m):
          out[:, i, j, ch * m + q] = (window[..., ch] * kernel[:, :, ch * m + q]).sum((1, 2))
  return out + bias


@pytest.mark.parametrize('h, w, c, out, k', [(8, 8, 4, 8, 3), (7, 9, 3, 6, 3), (6, 5, 2, 2, 5)])
def test_depthwise_conv_pool_is_the_grouped_conv(h, w, c, out, k):
  """The tap implementation equals numpy loops and XLA's grouped conv on the same weights."""
  module = DOWNSAMPLERS['depthwise_conv_pool'](c, out, kernel_size=k, rngs=nnx.Rngs(0))
  module.conv.bias[...] = jax.random.normal(jax.random.key(1), (out,))
  x = jax.random.normal(jax.random.key(2), (2, h, w, c))
  kernel = module.conv.kernel[...][:, :, 0]
  # Jitted: eagerly, each of the k * k strided slices compiles on its own (~5 s).
  taps = jax.jit(resampling.downsample.depthwise_conv_stride_2)(x, kernel, module.conv.bias[...])
  expected = _numpy_depthwise_conv_stride_2(np.asarray(x, np.float64), np.asarray(kernel),
                                            np.asarray(module.conv.bias[...]))
  np.testing.assert_allclose(taps, expected, atol=1e-5)
  np.testing.assert_allclose(taps, module.conv(x), atol=1e-5)
  call = nnx.jit(lambda m, x: m(x))
  np.testing.assert_allclose(call(module, x), module.norm(module.conv(x)), atol=1e-3)
  # norm=False: PiT's pooling exactly, the conv alone.
  pit = DOWNSAMPLERS['depthwise_conv_pool'](c, out, kernel_size=k, norm=False, rngs=nnx.Rngs(0))
  assert pit.norm is None
  np.testing.assert_allclose(call(pit, x), pit.conv(x), atol=1e-5)


@pytest.mark.parametrize('factor', [2, 3, 8])
def test_transposed_conv_equals_xla_conv_transpose(factor):
  """The matmul + rearrange form computes nnx.ConvTranspose on the same params."""
  c, out = 4, 5
  module = UPSAMPLERS['transposed_conv'](c, out, factor=factor, rngs=nnx.Rngs(0))
  module.conv.bias[...] = jax.random.normal(jax.random.key(1), (out,))
  x = jax.random.normal(jax.random.key(2), (2, 3, 2, c))
  reference = module.norm(module.conv(x))  # XLA's transposed convolution.
  np.testing.assert_allclose(module(x), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('factor', [2, 8])
def test_pixel_shuffle_conv_equals_xla_convolution(factor):
  """The im2col matmul computes nnx.Conv (3x3, padding 1) on the same params."""
  c, out = 4, 3
  module = UPSAMPLERS['pixel_shuffle'](c, out, factor=factor, rngs=nnx.Rngs(0))
  module.conv.bias[...] = jax.random.normal(jax.random.key(1), module.conv.bias.shape)
  x = jax.random.normal(jax.random.key(2), (2, 3, 5, c))
  reference = module.norm(expand_patches(module.conv(x), factor))  # XLA's convolution.
  np.testing.assert_allclose(module(x), reference, rtol=1e-4, atol=1e-4)


def test_expand_patches_reads_channels_in_p1_p2_c_order():
  """One pixel of 8 channels 0..7 at factor 2 and C = 2: output (dy, dx, c)
  is channel (2 dy + dx) * 2 + c, Swin-Unet's '(p1 p2 c)' (TensorFlow's
  depth_to_space; torch.nn.PixelShuffle would put c first)."""
  x = jnp.arange(8.0).reshape(1, 1, 1, 8)
  out = np.asarray(expand_patches(x, 2))[0]
  expected = np.array([[[(2 * dy + dx) * 2 + c for c in range(2)] for dx in range(2)]
                       for dy in range(2)], np.float32)
  np.testing.assert_array_equal(out, expected)


def _random_conv_downsample(c, out, kernel_size):
  """ConvDownsample with random conv bias and norm affine (zeros and ones at init,
  which would hide a missing bias or a norm applied in the wrong place)."""
  module = DOWNSAMPLERS['conv'](c, out, kernel_size=kernel_size, rngs=nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(4), 3))
  module.conv.bias[...] = jax.random.normal(next(keys), (out,))
  module.norm.scale[...] = 1.0 + jax.random.normal(next(keys), (out,))
  module.norm.bias[...] = jax.random.normal(next(keys), (out,))
  return module


@pytest.mark.parametrize('h, w', [(6, 4), (5, 7)])
def test_conv_downsample_kernel_2_is_space_to_depth_then_matmul_then_norm(h, w):
  """Kernel 2 = stride 2: each output pixel sees exactly its own 2x2 block, so the conv
  is the (dy, dx, c)-ordered block flattened times the (2, 2, C, C_out) kernel flattened
  the same way, plus bias; LayerNorm comes after. Odd sizes are zero-padded bottom/right."""
  c, out = 3, 5
  module = _random_conv_downsample(c, out, 2)
  kernel = np.asarray(module.conv.kernel[...])
  assert kernel.shape == (2, 2, c, out)
  x = np.random.default_rng(3).normal(size=(2, h, w, c)).astype(np.float32)
  xp = np.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  b, hp, wp, _ = xp.shape
  blocks = xp.reshape(b, hp // 2, 2, wp // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  conv = blocks.reshape(b, hp // 2, wp // 2, 4 * c) @ kernel.reshape(4 * c, out)
  conv += np.asarray(module.conv.bias[...])
  ref = _ln(conv, np.asarray(module.norm.scale[...]), np.asarray(module.norm.bias[...]))
  np.testing.assert_allclose(module(jnp.asarray(x)), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('h, w', [(7, 7), (8, 8), (7, 8)])
def test_conv_downsample_kernel_3_pads_one_on_every_side(h, w):
  """Kernel 3, stride 2, padding 1 all round: ceil(H/2) x ceil(W/2) outputs, output
  (i, j) reading padded rows 2i..2i+2 and columns 2j..2j+2. 'SAME' would pad only the
  bottom/right at even sizes, so the even size tells the two apart."""
  c, out = 2, 4
  module = _random_conv_downsample(c, out, 3)
  kernel = np.asarray(module.conv.kernel[...])
  x = np.random.default_rng(4).normal(size=(2, h, w, c)).astype(np.float32)
  y = np.asarray(module(jnp.asarray(x)))
  ho, wo = -(-h // 2), -(-w // 2)
  assert y.shape == (2, ho, wo, out)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  scale, bias = np.asarray(module.norm.scale[...]), np.asarray(module.norm.bias[...])
  # The top-left pixel reads the top/left padding, the bottom-right one the bottom/right
  # padding at odd sizes; an interior one reads none.
  for i, j in [(0, 0), (ho - 1, wo - 1), (1, 2)]:
    window = xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3]  # (b, 3, 3, c)
    conv = np.einsum('byxc,yxco->bo', window, kernel) + np.asarray(module.conv.bias[...])
    np.testing.assert_allclose(y[:, i, j], _ln(conv, scale, bias), rtol=1e-4, atol=1e-4)


# Anti-aliased downsamplers (resampling/antialias.py).

def _numpy_binomial(size):
  """size - 1 convolutions of the box [1, 1] / 2, from the identity."""
  taps = np.ones(1)
  for _ in range(size - 1):
    taps = np.convolve(taps, [0.5, 0.5])
  return taps


def _numpy_blur(x, size, stride):
  """Direct 2-D loops over output pixels: reflect pad ((size-1)//2, size//2),
  then sum of outer(taps, taps) * the window at (stride*i, stride*j)."""
  taps = _numpy_binomial(size)
  weights = np.outer(taps, taps)
  before, after = (size - 1) // 2, size // 2
  xp = np.pad(x, ((0, 0), (before, after), (before, after), (0, 0)), mode='reflect')
  h, w = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
  out = np.zeros((x.shape[0], h, w, x.shape[3]))
  for i in range(h):
    for j in range(w):
      window = xp[:, stride * i:stride * i + size, stride * j:stride * j + size]
      out[:, i, j] = np.einsum('byxc,yx->bc', window, weights)
  return out


def _numpy_zhang_max_blur_pool(x, size):
  """Zhang's MaxBlurPool (antialiased-cnns): MaxPool2d(2, stride=1) without
  padding, (H - 1, W - 1), then BlurPool (reflect pad, stride 2)."""
  h, w = x.shape[1:3]
  maxima = np.max([x[:, dy:dy + h - 1, dx:dx + w - 1] for dy in (0, 1) for dx in (0, 1)], axis=0)
  return _numpy_blur(maxima, size, 2)


@pytest.mark.parametrize('size', range(1, 8))
def test_binomial_filter_is_the_repeated_box(size):
  np.testing.assert_allclose(antialias.binomial_filter(size), _numpy_binomial(size), atol=1e-15)


def test_binomial_filter_known_rows():
  np.testing.assert_array_equal(antialias.binomial_filter(3), [0.25, 0.5, 0.25])
  np.testing.assert_array_equal(antialias.binomial_filter(5), np.array([1, 4, 6, 4, 1]) / 16)
  with pytest.raises(ValueError, match='filter_size=0'):
    antialias.binomial_filter(0)


@pytest.mark.parametrize('shape', [(8, 8), (7, 9), (2, 3), (1, 1)])
@pytest.mark.parametrize('size', [1, 2, 3, 4, 5])
@pytest.mark.parametrize('stride', [1, 2])
def test_blur_matches_numpy_loops(shape, size, stride):
  x = np.random.default_rng(size).normal(size=(2, *shape, 3)).astype(np.float32)
  np.testing.assert_allclose(antialias.blur(jnp.asarray(x), size, stride),
                             _numpy_blur(x, size, stride), rtol=1e-5, atol=1e-5)


def test_blur_removes_what_subsampling_aliases():
  """The checkerboard (-1)^(i+j), at the Nyquist frequency: subsampled every
  second pixel it becomes the constant +1 (aliased onto the mean); the
  binomial filter's response there is zero, so blurred first it is 0."""
  rows, cols = np.indices((8, 8))
  board = jnp.asarray(((-1.0) ** (rows + cols))[None, :, :, None])
  np.testing.assert_array_equal(antialias.blur(board, 1, stride=2), jnp.ones((1, 4, 4, 1)))
  for size in (2, 3, 5):
    np.testing.assert_allclose(antialias.blur(board, size, stride=2), 0.0, atol=1e-6)


def _ln_reduction(module, pooled):
  return _ln(pooled, 1.0, 0.0) @ np.asarray(module.reduction.kernel[...])


@pytest.mark.parametrize('shape', [(8, 8), (5, 7)])
@pytest.mark.parametrize('size', [1, 3, 4])
def test_blur_pools_match_numpy(shape, size):
  x = np.random.default_rng(0).normal(size=(2, *shape, 4)).astype(np.float32)
  blur_pool = DOWNSAMPLERS['blur_pool'](4, 6, filter_size=size, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(blur_pool(jnp.asarray(x)),
                             _ln_reduction(blur_pool, _numpy_blur(x, size, 2)),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('shape', [(8, 8), (5, 7), (2, 3)])
@pytest.mark.parametrize('size', [1, 3, 4, 6, 7])
def test_max_blur_pool_is_zhangs_where_zhangs_has_an_output(shape, size):
  """ceil(H/2) x ceil(W/2) out; its first floor rows / columns on odd sides
  (all of them on even ones) are Zhang's."""
  x = np.random.default_rng(0).normal(size=(2, *shape, 4)).astype(np.float32)
  max_blur = DOWNSAMPLERS['max_blur_pool'](4, 6, filter_size=size, rngs=nnx.Rngs(1))
  out = np.asarray(max_blur(jnp.asarray(x)))
  assert out.shape == (2, -(-shape[0] // 2), -(-shape[1] // 2), 6)
  zhang = _ln_reduction(max_blur, _numpy_zhang_max_blur_pool(x, size))
  zh, zw = zhang.shape[1:3]
  assert (zh, zw) == (shape[0] // 2, shape[1] // 2)
  np.testing.assert_allclose(out[:, :zh, :zw], zhang, rtol=1e-4, atol=1e-4)


def test_max_blur_pool_odd_sides_reflect_one_more_row_of_maxima():
  """On a 5 x 1 map the maxima are x0 v x1, ..., x3 v x4 (a side of 1 is its
  own maximum). One reflection pads them to m1 | m0 m1 m2 m3 | m2 m1 (Zhang's
  pad, and one more row), and the 3-tap blur at stride 2 reads rows
  (m1, m0, m1), (m1, m2, m3) (Zhang's two outputs) and (m3, m2, m1)."""
  x = np.array([0.0, 3.0, -1.0, 2.0, 5.0], np.float32).reshape(1, 5, 1, 1)
  m = [3.0, 3.0, 2.0, 5.0]
  expected = [(m[1] + 2 * m[0] + m[1]) / 4, (m[1] + 2 * m[2] + m[3]) / 4,
              (m[3] + 2 * m[2] + m[1]) / 4]
  pooled = downsample.MaxBlurPool(1, rngs=nnx.Rngs(0), filter_size=3).pool(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(pooled).ravel(), expected, rtol=1e-6)


@pytest.mark.parametrize('shape', [(8, 8), (5, 7)])
def test_blur_merge_is_patch_merge_of_the_blurred_input(shape):
  x = np.random.default_rng(0).normal(size=(2, *shape, 4)).astype(np.float32)
  blur_merge = DOWNSAMPLERS['blur_merge'](4, filter_size=3, rngs=nnx.Rngs(0))
  merge = DOWNSAMPLERS['patch_merge'](4, rngs=nnx.Rngs(0))
  assert nnx.state(blur_merge, nnx.Param).keys() == nnx.state(merge, nnx.Param).keys()
  nnx.update(merge, nnx.state(blur_merge, nnx.Param))
  blurred = jnp.asarray(_numpy_blur(x, 3, 1), jnp.float32)
  np.testing.assert_allclose(blur_merge(jnp.asarray(x)), merge(blurred), rtol=1e-5, atol=1e-5)
  assert not np.allclose(blur_merge(jnp.asarray(x)), merge(jnp.asarray(x)), atol=1e-2)


def test_blur_pool_with_the_box_filter_is_avg_pool():
  x = jax.random.normal(jax.random.key(0), (2, 8, 6, 4))
  box = DOWNSAMPLERS['blur_pool'](4, filter_size=2, rngs=nnx.Rngs(0))
  avg = DOWNSAMPLERS['avg_pool'](4, rngs=nnx.Rngs(0))
  nnx.update(avg, nnx.state(box, nnx.Param))
  np.testing.assert_allclose(box(x), avg(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['blur_merge', 'blur_pool', 'max_blur_pool'])
@pytest.mark.parametrize('size', [0, -1, 2.5])
def test_blur_filter_size_errors_name_the_field(name, size):
  with pytest.raises(ValueError, match=rf'model.downsample_options.{name}.filter_size={size}'):
    DOWNSAMPLERS[name](8, filter_size=size, rngs=nnx.Rngs(0))


# SoftPool and NesT's block aggregation.

def _numpy_soft_pool(x):
  """Per 2x2 window (only the in-bounds values at odd sizes), per channel:
  sum_i e^(x_i) x_i / sum_j e^(x_j), in float64."""
  b, h, w, c = x.shape
  out = np.zeros((b, -(-h // 2), -(-w // 2), c))
  for i in range(out.shape[1]):
    for j in range(out.shape[2]):
      window = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(b, -1, c).astype(np.float64)
      e = np.exp(window)
      out[:, i, j] = (e * window).sum(1) / e.sum(1)
  return out


@pytest.mark.parametrize('shape', [(8, 8), (5, 7)])
def test_soft_pool_matches_numpy(shape):
  x = np.random.default_rng(0).normal(size=(2, *shape, 4)).astype(np.float32)
  module = DOWNSAMPLERS['soft_pool'](4, 6, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(module(jnp.asarray(x)), _ln_reduction(module, _numpy_soft_pool(x)),
                             rtol=1e-4, atol=1e-4)


def test_soft_pool_lies_between_the_mean_and_the_max():
  """Scaling the input by t: SoftPool(t x) / t tends to the mean as t -> 0 and to
  the maximum as t grows; in between it never leaves [mean, max]."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 6, 3)), jnp.float32)
  blocks = np.asarray(x).reshape(2, 3, 2, 3, 2, 3)
  mean, maximum = blocks.mean(axis=(2, 4)), blocks.max(axis=(2, 4))
  np.testing.assert_allclose(soft_pool_2x2(1e-4 * x) / 1e-4, mean, atol=1e-3)
  np.testing.assert_allclose(soft_pool_2x2(1e3 * x) / 1e3, maximum, atol=1e-3)
  pooled = np.asarray(soft_pool_2x2(x))
  assert np.all(pooled >= mean - 1e-6) and np.all(pooled <= maximum + 1e-6)
  assert np.all(np.isfinite(np.asarray(soft_pool_2x2(jnp.full((1, 2, 2, 1), 1e4)))))


def _numpy_same_pool(x, k, reduce):
  """k x k windows at stride 2 with TF 'SAME' padding, reduced over the in-bounds
  values only: ceil(H/2) rows, the pad split (k - 2 + H % 2) // 2 before the map."""
  b, h, w, c = x.shape
  ho, wo = -(-h // 2), -(-w // 2)
  top = (max((ho - 1) * 2 + k - h, 0)) // 2
  left = (max((wo - 1) * 2 + k - w, 0)) // 2
  out = np.zeros((b, ho, wo, c))
  for i in range(ho):
    for j in range(wo):
      rows = slice(max(2 * i - top, 0), 2 * i - top + k)
      cols = slice(max(2 * j - left, 0), 2 * j - left + k)
      out[:, i, j] = reduce(x[:, rows, cols], axis=(1, 2))
  return out


@pytest.mark.parametrize('shape', [(8, 8), (7, 9)])
@pytest.mark.parametrize('k', [2, 3, 4])
def test_pooling_kernel_sizes_match_numpy(shape, k):
  x = np.random.default_rng(7).normal(size=(2, *shape, 3)).astype(np.float32)
  for name, reduce in [('avg_pool', np.mean), ('max_pool', np.max)]:
    module = DOWNSAMPLERS[name](3, 5, kernel_size=k, rngs=nnx.Rngs(0))
    expected = _ln_reduction(module, _numpy_same_pool(x, k, reduce))
    np.testing.assert_allclose(module(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('h, w', [(8, 8), (7, 9)])
@pytest.mark.parametrize('pool_size', [3, 2])
def test_conv_max_pool_is_nest_block_aggregation(h, w, pool_size):
  """3x3 conv (zero 'SAME' padding), LayerNorm, then the maximum over pool_size
  windows at stride 2 ('SAME'; NesT's 3: rows 2i..2i+2 at even sizes, 2i-1..2i+1
  at odd ones); out-of-bounds never wins."""
  c, out = 3, 4
  module = DOWNSAMPLERS['conv_max_pool'](c, out, pool_size=pool_size, rngs=nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(5), 3))
  module.conv.bias[...] = jax.random.normal(next(keys), (out,))
  module.norm.scale[...] = 1.0 + jax.random.normal(next(keys), (out,))
  module.norm.bias[...] = jax.random.normal(next(keys), (out,))
  x = np.random.default_rng(6).normal(size=(2, h, w, c)).astype(np.float32)
  kernel = np.asarray(module.conv.kernel[...])  # (3, 3, c, out)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = sum(np.einsum('bhwc,co->bhwo', xp[:, dy:dy + h, dx:dx + w], kernel[dy, dx])
             for dy in range(3) for dx in range(3)) + np.asarray(module.conv.bias[...])
  normed = _ln(conv, np.asarray(module.norm.scale[...]), np.asarray(module.norm.bias[...]))
  np.testing.assert_allclose(module(jnp.asarray(x)), _numpy_same_pool(normed, pool_size, np.max),
                             rtol=1e-4, atol=1e-4)
  if pool_size == 3 and h % 2:  # The odd size's pad is split: window 0 is rows 0..1.
    np.testing.assert_allclose(module(jnp.asarray(x))[:, 0, 0],
                               normed[:, :2, :2].max(axis=(1, 2)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name, field', [('avg_pool', 'kernel_size'), ('max_pool', 'kernel_size'),
                                         ('conv_max_pool', 'pool_size')])
@pytest.mark.parametrize('value', [1, 2.5])
def test_pool_window_errors_name_the_field(name, field, value):
  with pytest.raises(ValueError, match=rf'downsample_options\.{name}\.{field}={value}'):
    DOWNSAMPLERS[name](8, **{field: value}, rngs=nnx.Rngs(0))
