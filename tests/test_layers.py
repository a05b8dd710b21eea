"""Window attention and Swin blocks against step-by-step references."""

import functools
import itertools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hierarchical_vit.layers import (ConvStem, DropPath, Dropout, PatchEmbed, SwinBlock,
                                     WindowAttention, reseed_per_example)
from hierarchical_vit.layers import attention_kernel
from hierarchical_vit.layers import windows as win
from hierarchical_vit.layers.attention import (ATTENTION_CORES, cudnn_attention, einsum_attention,
                                               lowp_einsum_attention, pallas_attention)
from hierarchical_vit.layers.common import Mlp, dense, layer_norm, norm_dense
from hierarchical_vit.layers.swin import SwinStage
from tests.conftest import xla_flags


def test_relative_position_index_brute_force():
  wh, ww = 3, 4
  index = win.relative_position_index((wh, ww))
  coords = [(y, x) for y in range(wh) for x in range(ww)]
  for i, (yi, xi) in enumerate(coords):
    for j, (yj, xj) in enumerate(coords):
      assert index[i, j] == (yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1)
  assert index.max() == (2 * wh - 1) * (2 * ww - 1) - 1


@pytest.mark.parametrize('h, w, window, shift', [
    (12, 8, (4, 4), (2, 2)),
    (8, 14, (4, 7), (0, 3)),  # stage_window((4, 14), 7, 3)'s: one axis shifts.
    (12, 6, (6, 3), (3, 1)),
    (9, 8, (3, 4), (1, 0)),
])
def test_shift_mask_matches_swin_slice_construction(h, w, window, shift):
  """Swin's published construction, per axis as timm writes it: label 3x3
  slices, partition, compare labels. A 0 shift makes slice(-0, None) the whole
  axis, so the last labels overwrite the others along it."""
  (wh, ww), (sh, sw) = window, shift
  img = np.zeros((h, w))
  cnt = 0
  for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
    for wsl in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
      img[hs, wsl] = cnt
      cnt += 1
  labels = img.reshape(h // wh, wh, w // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
  ref = np.where(labels[:, None, :] - labels[:, :, None] != 0, -100.0, 0.0)
  np.testing.assert_array_equal(win.shifted_window_mask(h, w, window, shift), ref)


def test_window_partition_roundtrip():
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  parts = win.window_partition(x, (4, 3))
  assert parts.shape == (2 * 2 * 4, 12, 3)
  np.testing.assert_array_equal(parts[0].reshape(4, 3, 3), x[0, :4, :3])
  np.testing.assert_array_equal(win.window_reverse(parts, (4, 3), 8, 12), x)


def test_stage_window_shrinks_and_stops_shifting():
  assert win.stage_window((8, 8), 7, 3) == ((7, 7), (3, 3))
  assert win.stage_window((7, 7), 7, 3) == ((7, 7), (0, 0))
  assert win.stage_window((4, 14), 7, 3) == ((4, 7), (0, 3))
  assert win.stage_window((4, 14), 7, 3, global_attention=True) == ((4, 14), (0, 0))


def _numpy_window_attention(module: WindowAttention, x: np.ndarray, mask) -> np.ndarray:
  """Window attention of Swin written out in numpy from the module's weights."""
  bw, n, c = x.shape
  heads = module.num_heads
  hd = c // heads
  qkv = x @ np.asarray(module.qkv.kernel[...]) + np.asarray(module.qkv.bias[...])
  qkv = qkv.reshape(bw, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
  q, k, v = qkv[0] * hd ** -0.5, qkv[1], qkv[2]
  attn = q @ k.transpose(0, 1, 3, 2)
  table = np.asarray(module.relative_position_bias_table[...])
  idx = win.relative_position_index(module.window)
  attn = attn + table[idx.reshape(-1)].reshape(n, n, heads).transpose(2, 0, 1)[None]
  if mask is not None:
    nw = mask.shape[0]
    attn = (attn.reshape(bw // nw, nw, heads, n, n) + mask[None, :, None]).reshape(bw, heads, n, n)
  attn = np.exp(attn - attn.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  out = (attn @ v).transpose(0, 2, 1, 3).reshape(bw, n, c)
  return out @ np.asarray(module.proj.kernel[...]) + np.asarray(module.proj.bias[...])


@pytest.mark.parametrize('masked', [False, True])
def test_window_attention_matches_numpy(masked):
  module = WindowAttention(16, 4, (2, 3), rngs=nnx.Rngs(0))
  module.qkv.bias[...] = jax.random.normal(jax.random.key(5), (48,)) * 0.1
  x = np.random.default_rng(0).normal(size=(4, 6, 16)).astype(np.float32)
  mask = win.shifted_window_mask(4, 3, (2, 3), (1, 0)) if masked else None
  if masked:
    assert mask.shape == (2, 6, 6) and (mask != 0).any()
  np.testing.assert_allclose(module(jnp.asarray(x), mask), _numpy_window_attention(module, x, mask),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('masked', [False, True])
def test_cudnn_attention_core_matches_numpy(masked):
  """The cudnn core's padding, bias tiling and layout, through XLA's
  implementation of the same jax.nn.dot_product_attention call (cuDNN's needs a GPU)."""
  # 9 -> 10 tokens; heads 8 wide, as cuDNN needs.
  module = WindowAttention(32, 4, (3, 3), rngs=nnx.Rngs(0), attention='cudnn')
  assert module.core is ATTENTION_CORES['cudnn'] is cudnn_attention
  module.core = functools.partial(cudnn_attention, implementation='xla')
  x = np.random.default_rng(1).normal(size=(4, 9, 32)).astype(np.float32)
  mask = win.shifted_window_mask(6, 3, (3, 3), (1, 0)) if masked else None
  np.testing.assert_allclose(module(jnp.asarray(x), mask), _numpy_window_attention(module, x, mask),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('masked', [False, True])
def test_pallas_attention_core_matches_numpy(masked):
  """The fused kernel, in Pallas' interpreter: 9 tokens and head dim 4 padded to
  Triton's 16 x 16 tiles inside the kernel."""
  module = WindowAttention(16, 4, (3, 3), rngs=nnx.Rngs(0), attention='pallas')
  assert module.core is ATTENTION_CORES['pallas'] is pallas_attention
  module.core = functools.partial(pallas_attention, interpret=True)
  x = np.random.default_rng(1).normal(size=(4, 9, 16)).astype(np.float32)
  mask = win.shifted_window_mask(6, 3, (3, 3), (1, 0)) if masked else None
  np.testing.assert_allclose(module(jnp.asarray(x), mask), _numpy_window_attention(module, x, mask),
                             rtol=1e-4, atol=1e-5)


def _softmax_attention(q, k, v, bias, scale, dropout):
  """Textbook order: normalized weights, dropout, then the value product."""
  b, n, h, _ = q.shape
  g = bias.shape[0]
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * scale, k)
  logits = (logits.reshape(b // g, g, h, n, n) + bias).reshape(b, h, n, n)
  return jnp.einsum('bhqk,bkhd->bqhd', dropout(jax.nn.softmax(logits, axis=-1)), v)


def _attention_inputs(windows=8, n=9, heads=2, d=4, groups=4):
  keys = jax.random.split(jax.random.key(3), 4)
  q, k, v = (jax.random.normal(keys[i], (windows, n, heads, d)) * 3 for i in range(3))
  return q, k, v, jax.random.normal(keys[3], (groups, heads, n, n))


def test_einsum_core_dropout_on_unnormalized_weights_equals_dropout_on_softmax():
  """Normalizing after the value product commutes with dropout on the weights."""
  q, k, v, bias = _attention_inputs()
  keep = jax.random.bernoulli(jax.random.key(4), 0.7, (8, 2, 9, 9))
  dropout = lambda w: jnp.where(keep, w / 0.7, 0.0)
  np.testing.assert_allclose(einsum_attention(q, k, v, bias, 0.5, dropout),
                             _softmax_attention(q, k, v, bias, 0.5, dropout), rtol=1e-5, atol=1e-5)


def test_einsum_core_gradients_match_the_softmax_order():
  """The max subtracted before exp is a constant to autodiff: gradients are exact."""
  q, k, v, bias = _attention_inputs()
  loss = lambda core: lambda q, k, v, bias: jnp.sum(jnp.sin(core(q, k, v, bias, 0.5, lambda w: w)))
  ours = jax.grad(loss(einsum_attention), argnums=(0, 1, 2, 3))(q, k, v, bias)
  reference = jax.grad(loss(_softmax_attention), argnums=(0, 1, 2, 3))(q, k, v, bias)
  for a, b in zip(ours, reference):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('windows, groups', [(48, 1), (6, 2), (40, 2)])
def test_pallas_kernel_gradients_match_the_softmax_order(windows, groups):
  """Its own backward kernel against autodiff of the textbook softmax, with the
  windows that share a bias split over backward programs of up to 16: 48
  windows, one bias -> 3 full programs; 6 windows, 2 biases -> one program of
  3 windows per bias; 40 windows, 2 biases -> 16 + 4 windows per bias."""
  q, k, v, bias = _attention_inputs(windows=windows, groups=groups)
  loss = lambda core: lambda q, k, v, bias: jnp.sum(jnp.sin(core(q, k, v, bias, 0.5, lambda w: w)))
  core = functools.partial(pallas_attention, interpret=True)
  np.testing.assert_allclose(core(q, k, v, bias, 0.5, None),
                             _softmax_attention(q, k, v, bias, 0.5, lambda w: w),
                             rtol=1e-5, atol=1e-5)
  ours = jax.grad(loss(core), argnums=(0, 1, 2, 3))(q, k, v, bias)
  reference = jax.grad(loss(_softmax_attention), argnums=(0, 1, 2, 3))(q, k, v, bias)
  for a, b in zip(ours, reference):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_pallas_kernel_lowers_to_triton_for_a_gpu_without_one():
  """Triton's constraints (power-of-two tiles, dots >= 16) are checked when
  Pallas lowers: Swin-T's stage 1 at 224 in bfloat16, shifted (64 windows per
  image, 49 tokens, 3 heads of 32), forward and backward. jaxlib 0.10 writes
  the Triton IR into the HLO with no GPU; later versions compile it while
  lowering, with a CUDA build of jaxlib (then two kernel calls)."""
  q = jnp.zeros((2 * 64, 49, 3, 32), jnp.bfloat16)
  bias = jnp.zeros((64, 3, 49, 49), jnp.float32)
  loss = lambda q, k, v, bias: pallas_attention(q, k, v, bias, 0.2, None).astype(jnp.float32).sum()
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  try:
    hlo = step.trace(q, q, q, bias).lower(lowering_platforms=('cuda',)).as_text()
  except Exception as error:  # pylint: disable=broad-except
    # A CPU-only jaxlib that compiles while lowering stops at the compile,
    # after the Triton IR (where the tile constraints hold) was built.
    assert 'Triton compilation handler' in str(error), error
    return
  grids = re.findall(r'__gpu\$xla\.gpu\.triton.*?grid_x = (\d+) : i32, grid_y = (\d+) : i32, '
                     r'grid_z = (\d+)', hlo)
  if grids:
    # Forward: one program per (image, window, head); backward: per (image chunk, window, head).
    assert [tuple(map(int, g)) for g in grids] == [(2, 64, 3), (1, 64, 3)]
  else:
    assert hlo.count('triton_kernel_call') == 2, hlo[:2000]


def test_pallas_core_trains_a_shifted_remat_stage_as_the_einsum_core():
  """Inside the model: window masks, jax.checkpoint around the custom VJP,
  parameter gradients (the relative position tables through the bias)."""
  def loss_and_grads(attention):
    stage = SwinStage(16, 2, 2, (6, 6), 3, rngs=nnx.Rngs(0), drop_path_rates=[0.0, 0.0],
                      remat='block', attention=attention)
    if attention == 'pallas':
      for block in stage.blocks:
        block.attn.core = functools.partial(pallas_attention, interpret=True)
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 16))
    return nnx.jit(nnx.value_and_grad(lambda stage: jnp.sum(jnp.sin(stage(x)))))(stage)

  (loss, grads), (ref_loss, ref_grads) = loss_and_grads('pallas'), loss_and_grads('einsum')
  assert ref_grads['blocks'][1]['attn']['relative_position_bias_table'][...].any()
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads,
               ref_grads)


_SHARDED_STAGE = """
import functools
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from hierarchical_vit.layers.attention import pallas_attention
from hierarchical_vit.layers.swin import SwinStage

def run(attention, sharding=None):
  stage = SwinStage(16, 2, 2, (6, 6), 3, rngs=nnx.Rngs(0), drop_path_rates=[0.0, 0.0],
                    attention=attention)
  if attention == 'pallas':
    for block in stage.blocks:
      block.attn.core = functools.partial(pallas_attention, interpret=True)
  graphdef, params, rest = nnx.split(stage, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 16))
  if sharding is not None:
    x = jax.device_put(x, sharding)
  step = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)(x)))))
  lowered = step.lower(params, x)
  return step(params, x), lowered.as_text(), lowered.compile().as_text()

# The trainer's batch sharding: over every mesh axis.
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ('data', 'fsdp'))
(loss, grads), lowered, compiled = run('pallas', NamedSharding(mesh, P(('data', 'fsdp'))))
(ref_loss, ref_grads), _, _ = run('einsum')
np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, ref_grads)
# Two blocks, forward and backward each through the kernels' partitioning rule.
assert lowered.count('CustomSPMDPartitioning') == 4, lowered.count('CustomSPMDPartitioning')
assert 'all-gather' not in compiled
print('OK')
"""


def test_pallas_core_splits_a_shifted_stage_over_a_mesh_by_batch():
  """4 CPU devices on a (2, 2) mesh, the batch split over both axes: each
  device runs the kernels on its own windows (no operand is gathered) and the
  bias gradient is summed over devices; loss and gradients equal one device's
  einsum core."""
  env = dict(os.environ, XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=4'))
  result = subprocess.run([sys.executable, '-c', _SHARDED_STAGE], capture_output=True, text=True,
                          env=env, timeout=300)
  assert result.returncode == 0 and result.stdout.strip() == 'OK', result.stderr[-3000:]


def test_pallas_kernel_in_bfloat16_stays_within_bfloat16_error():
  """Swin's window (49 tokens, head dim 32: 64 x 32 tiles), values and
  gradients against float32 on the same bfloat16-rounded inputs."""
  q, k, v, bias = _attention_inputs(windows=4, n=49, heads=2, d=32, groups=2)
  low = tuple(t.astype(jnp.bfloat16) for t in (q, k, v))
  loss = lambda core: lambda q, k, v, bias: jnp.sum(
      jnp.sin(core(q, k, v, bias, 32 ** -0.5, lambda w: w).astype(jnp.float32)))
  core = functools.partial(pallas_attention, interpret=True)
  out = core(*low, bias, 32 ** -0.5, None)
  grads = jax.grad(loss(core), argnums=(0, 1, 2, 3))(*low, bias)
  assert out.dtype == jnp.bfloat16
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 3 + [jnp.float32]
  wide = tuple(t.astype(jnp.float32) for t in low)
  reference = (_softmax_attention(*wide, bias, 32 ** -0.5, lambda w: w),
               jax.grad(loss(_softmax_attention), argnums=(0, 1, 2, 3))(*wide, bias))
  errors = [np.abs(np.asarray(a, np.float32) - b).max() / np.abs(b).max()
            for a, b in zip((out, *grads), (reference[0], *reference[1]))]
  assert max(errors) < 0.01, errors


def test_pallas_kernel_refuses_windows_beyond_its_tile():
  n = attention_kernel.MAX_TOKENS + 1
  q = jnp.zeros((2, n, 1, 16))
  with pytest.raises(ValueError, match=f'windows of up to {n - 1} tokens, got {n}: use a smaller '
                                       r"model.window_size or model.attention='einsum'"):
    pallas_attention(q, q, q, jnp.zeros((1, 1, n, n)), 0.25, None, interpret=True)


def test_lowp_core_is_the_einsum_core_in_float32():
  q, k, v, bias = _attention_inputs()
  np.testing.assert_array_equal(lowp_einsum_attention(q, k, v, bias, 0.5, lambda w: w),
                                einsum_attention(q, k, v, bias, 0.5, lambda w: w))


def _logits_dtype(core, q, k, v, bias):
  """dtype of the (windows, heads, N, N) product in the core's program."""
  jaxpr = jax.make_jaxpr(lambda q, k, v: core(q, k, v, bias, 0.5, lambda w: w))(q, k, v)
  (dtype,) = {e.outvars[0].aval.dtype for e in jaxpr.eqns if e.primitive.name == 'dot_general'
              and e.outvars[0].aval.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[1])}
  return dtype


def test_lowp_core_stores_bfloat16_logits_and_stays_within_bfloat16_error():
  q, k, v, bias = _attention_inputs()
  low = tuple(t.astype(jnp.bfloat16) for t in (q, k, v))
  assert _logits_dtype(einsum_attention, *low, bias) == jnp.float32
  assert _logits_dtype(lowp_einsum_attention, *low, bias) == jnp.bfloat16
  # Against the float64 textbook softmax on the same bfloat16-rounded inputs.
  q64, k64, v64 = (np.asarray(t, np.float64) for t in low)
  logits = np.einsum('bqhd,bkhd->bhqk', q64 * 0.5, k64)
  logits = (logits.reshape(2, 4, 2, 9, 9) + np.asarray(bias)).reshape(8, 2, 9, 9)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  reference = np.einsum('bhqk,bkhd->bqhd', weights / weights.sum(-1, keepdims=True), v64)
  errors = {core.__name__: np.abs(np.asarray(core(*low, bias, 0.5, lambda w: w), np.float64)
                                  - reference).max()
            for core in (einsum_attention, lowp_einsum_attention)}
  # Logits up to ~35 here: rounding them to bfloat16 (8-bit mantissa) costs more
  # than einsum's rounding of the weights alone, and stays within 1% of the output.
  assert (errors['einsum_attention'] < errors['lowp_einsum_attention']
          < 0.01 * np.abs(reference).max())


def test_attention_cores_are_registered_and_unknown_names_are_refused():
  assert set(ATTENTION_CORES) == {'einsum', 'einsum_lowp', 'cudnn', 'pallas'}
  with pytest.raises(ValueError, match=r"model.attention='flash' is not one of "
                                       r"\['cudnn', 'einsum', 'einsum_lowp', 'pallas'\]"):
    WindowAttention(16, 4, (2, 3), rngs=nnx.Rngs(0), attention='flash')


def _affected_tokens(block: SwinBlock, size: int, token: tuple[int, int]) -> set:
  x = jax.random.normal(jax.random.key(0), (1, size, size, 8))
  y = block(x)
  # A non-constant perturbation: LayerNorm would erase a constant shift.
  y2 = block(x.at[0, token[0], token[1]].add(jnp.arange(8.0)))
  changed = np.abs(np.asarray(y2 - y))[0].max(-1) > 1e-5
  return {tuple(p) for p in np.argwhere(changed)}


@pytest.mark.parametrize('shift', [0, 2])
@pytest.mark.parametrize('token', [(0, 0), (1, 6), (5, 3), (7, 7)])
def test_perturbing_one_token_changes_exactly_its_window_region(shift, token):
  """A token may only influence tokens that share its (shifted) window and,
  when shifted, that were its neighbours before the cyclic shift (no wrap-around)."""
  size, ws = 8, 4
  block = SwinBlock(8, 2, (ws, ws), (shift, shift), rngs=nnx.Rngs(1))
  block.eval()

  def key(p):  # (window in shifted frame, wrapped-around rows?, wrapped cols?)
    r, c = (p[0] - shift) % size, (p[1] - shift) % size
    return (r // ws, c // ws, shift > 0 and r >= size - shift, shift > 0 and c >= size - shift)

  expected = {p for p in itertools.product(range(size), repeat=2) if key(p) == key(token)}
  assert _affected_tokens(block, size, token) == expected


def _numpy_layer_norm(x: np.ndarray, norm) -> np.ndarray:
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])


def _numpy_tanh_gelu(x: np.ndarray) -> np.ndarray:
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _numpy_swin_block(block: SwinBlock, x: np.ndarray) -> np.ndarray:
  """The Swin authors' padded block (their detection backbone) step by step:
  LN, zero pad bottom/right, cyclic shift, window attention with the
  shifted-window mask (built here with Swin's slices on the padded map),
  reverse, unshift, crop, residual; LN, MLP, residual."""
  b, h, w, c = x.shape
  (wh, ww), (sh, sw) = block.window, block.shift
  hp, wp = h + (-h % wh), w + (-w % ww)
  y = np.pad(_numpy_layer_norm(x, block.norm1), ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
  y = np.roll(y, (-sh, -sw), axis=(1, 2))
  mask = None
  if sh or sw:
    region, label = np.zeros((hp, wp)), 0
    for rows in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
      for cols in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
        region[rows, cols] = label
        label += 1
    ids = region.reshape(hp // wh, wh, wp // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
    mask = np.where(ids[:, :, None] == ids[:, None, :], 0.0, -100.0)
  windows = y.reshape(b, hp // wh, wh, wp // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
  out = _numpy_window_attention(block.attn, windows.reshape(-1, wh * ww, c), mask)
  out = out.reshape(b, hp // wh, wp // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
  x = x + np.roll(out.reshape(b, hp, wp, c), (sh, sw), axis=(1, 2))[:, :h, :w]
  mlp = block.mlp
  hidden = _numpy_layer_norm(x, block.norm2) @ np.asarray(mlp.fc1.kernel[...]) + np.asarray(
      mlp.fc1.bias[...])
  hidden = _numpy_tanh_gelu(hidden)
  return x + hidden @ np.asarray(mlp.fc2.kernel[...]) + np.asarray(mlp.fc2.bias[...])


@pytest.mark.parametrize('size, shift', [((8, 8), (2, 2)), ((6, 7), (2, 2)), ((6, 7), (0, 0))])
def test_block_matches_numpy_swin_block(size, shift):
  """The whole block, shifted and padded (6 x 7 is no multiple of the 4 x 4
  window), against an independent numpy block."""
  block = SwinBlock(8, 2, (4, 4), shift, rngs=nnx.Rngs(0), gelu_approximate=True)
  block.eval()
  rng = np.random.default_rng(0)
  for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
    layer.bias[...] = jnp.asarray(rng.normal(size=layer.bias.shape) * 0.1, jnp.float32)
  for norm in (block.norm1, block.norm2):
    norm.scale[...] = jnp.asarray(1 + rng.normal(size=8) * 0.1, jnp.float32)
    norm.bias[...] = jnp.asarray(rng.normal(size=8) * 0.1, jnp.float32)
  x = rng.normal(size=(2, *size, 8)).astype(np.float32)
  np.testing.assert_allclose(block(jnp.asarray(x)), _numpy_swin_block(block, x.astype(np.float64)),
                             rtol=1e-4, atol=1e-4)


# (shift, pairs of tokens that interact): per axis the shift of 3 splits the 8
# tokens into window groups of 3 and 5 (9 + 25 pairs), no shift into 7 and 1.
@pytest.mark.parametrize('shift, pairs', [((3, 3), 34 ** 2), ((0, 0), 50 ** 2)])
def test_padded_windows_never_attend_across_the_wrap(shift, pairs):
  """8 x 8 tokens in 7 x 7 windows (padded to 14 x 14): each token's attention
  output depends only on tokens less than a window apart in the unshifted map,
  never on one from the opposite edge (timm's pad-after-shift order fails this:
  token (2, 0) attends to (2, 7))."""
  block = SwinBlock(4, 1, (7, 7), shift, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
  jac = nnx.jit(lambda block, x: jax.jacrev(lambda x: block._attention(x).sum(-1))(x))(
      block, x)  # (1, 8, 8, 1, 8, 8, 4)
  depends = np.abs(np.asarray(jac)).sum(axis=(0, 3, 6)) > 0  # (8, 8) x (8, 8)
  pos = np.arange(8)
  far_rows = np.abs(pos[:, None, None, None] - pos[None, None, :, None]) >= 7
  far_cols = np.abs(pos[None, :, None, None] - pos[None, None, None, :]) >= 7
  assert not (depends & (far_rows | far_cols)).any()
  assert depends.sum() == pairs


def test_einsum_attention_keeps_bfloat16_logits_in_float32():
  """Logits 40 and 40.125 (exact in float32, one bfloat16 step apart is 0.25):
  rounded to bfloat16 they would tie and weigh the keys 0.5 / 0.5."""
  q = jnp.ones((1, 2, 1, 2), jnp.bfloat16)
  k = jnp.asarray([[40.0, 0.0], [40.0, 0.125]], jnp.bfloat16).reshape(1, 2, 1, 2)
  v = jnp.asarray([[0.0], [1.0]], jnp.bfloat16).reshape(1, 2, 1, 1)
  out = einsum_attention(q, k, v, jnp.zeros((1, 1, 2, 2)), 1.0, lambda w: w)
  exact = 1 / (1 + np.exp(-0.125))  # softmax([40, 40.125]) . [0, 1]
  np.testing.assert_allclose(np.asarray(out, np.float32).ravel(), [exact, exact], atol=4e-3)


def test_drop_path_drops_whole_samples_in_train_mode_only():
  dp = DropPath(0.5, rngs=nnx.Rngs(dropout=0))
  x = jnp.ones((64, 3, 3, 4))
  y = np.asarray(dp(x))
  per_sample = y.reshape(64, -1)
  assert set(np.unique(per_sample)) <= {0.0, 2.0}
  assert (per_sample.min(1) == per_sample.max(1)).all()  # Whole sample kept or dropped.
  assert 10 < (per_sample[:, 0] == 0).sum() < 54
  dp.eval()
  np.testing.assert_array_equal(dp(x), x)


def _reseeded(module: nnx.Module, rows) -> nnx.Module:
  """The module with its dropout streams reseeded as the train step does."""
  reseed_per_example(module, 7, jnp.asarray(rows))
  return module


def test_dropout_with_a_scalar_key_is_nnx_dropout():
  x = jnp.arange(1.0, 97.0).reshape(4, 6, 4)
  ours = Dropout(0.3, broadcast_dims=(1,), rngs=nnx.Rngs(dropout=3))
  theirs = nnx.Dropout(0.3, broadcast_dims=(1,), rngs=nnx.Rngs(dropout=3))
  for _ in range(2):  # The second call draws the stream's next key.
    np.testing.assert_array_equal(ours(x), theirs(x))


def test_dropout_masks_per_example_do_not_depend_on_the_batch():
  """Each example's mask comes from its own key: the odd rows alone get the
  masks they get inside the whole batch, call after call (the stream's count
  moves per example), with nnx.Dropout's 1/(1 - rate) scaling."""
  x = jnp.ones((8 * 3, 5, 16))  # 8 examples of 3 leading rows each (windows).
  whole = _reseeded(Dropout(0.4, rngs=nnx.Rngs(dropout=0)), np.arange(8))
  odd = _reseeded(Dropout(0.4, rngs=nnx.Rngs(dropout=0)), np.arange(1, 8, 2))
  x_odd = x.reshape(8, 3, 5, 16)[1::2].reshape(12, 5, 16)
  calls = []
  for _ in range(2):
    y, y_odd = np.asarray(whole(x)), np.asarray(odd(x_odd))
    np.testing.assert_array_equal(y.reshape(8, -1)[1::2], y_odd.reshape(4, -1))
    calls.append(y)
  assert set(np.unique(calls[0])) == {0.0, np.float32(1) / np.float32(0.6)}
  assert 0.5 < (calls[0] > 0).mean() < 0.7
  assert (calls[0] != calls[1]).any()  # A fresh mask per call.
  per_example = calls[0].reshape(8, -1)
  assert all((per_example[0] != row).any() for row in per_example[1:])


def test_drop_path_per_example_keeps_whole_samples():
  x = jnp.ones((64, 3, 3, 4))
  y = np.asarray(_reseeded(DropPath(0.5, rngs=nnx.Rngs(dropout=0)), np.arange(64))(x))
  per_sample = y.reshape(64, -1)
  assert (per_sample.min(1) == per_sample.max(1)).all()
  assert 10 < (per_sample[:, 0] == 0).sum() < 54


def test_dropout_refuses_rows_that_split_an_example():
  dropout = _reseeded(Dropout(0.5, rngs=nnx.Rngs(dropout=0)), np.arange(4))
  with pytest.raises(ValueError, match=r'4 example keys for an input of 6 rows'):
    dropout(jnp.ones((6, 2)))


def test_dropout_per_example_keeps_nnx_dropouts_call_arguments():
  """deterministic=True, or eval mode, turns it off; a call's own key draws
  nnx.Dropout's mask from it."""
  x = jnp.ones((4, 8))
  dropout = _reseeded(Dropout(0.5, rngs=nnx.Rngs(dropout=0)), np.arange(4))
  np.testing.assert_array_equal(dropout(x, deterministic=True), x)
  key = jax.random.key(5)
  np.testing.assert_array_equal(dropout(x, rngs=key), nnx.Dropout(0.5)(x, rngs=key))
  dropout.eval()
  np.testing.assert_array_equal(dropout(x), x)


@pytest.mark.parametrize('stem', [PatchEmbed, ConvStem])
@pytest.mark.parametrize('patch', [1, 2, 4])
def test_stems_reduce_by_patch_size_with_ceil(stem, patch):
  module = stem(3, 16, patch, rngs=nnx.Rngs(0))
  y = module(jnp.ones((2, 13, 16, 3)))
  assert y.shape == (2, -(-13 // patch), 16 // patch, 16)


def test_conv_stem_rejects_non_power_of_two():
  with pytest.raises(ValueError, match='model.patch_size=3'):
    ConvStem(3, 16, 3, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('patch, strides', [(1, [1]), (2, [2]), (4, [2, 2]), (8, [2, 2, 2])])
def test_conv_stem_downsamples_only_with_stride_2_convs(patch, strides):
  stem = ConvStem(1, 16, patch, rngs=nnx.Rngs(0))
  assert [conv.strides for conv in stem.convs] == strides
  assert [conv.kernel_size for conv in stem.convs] == [(3, 3)] * len(strides)
  assert stem.convs[-1].out_features == 16


def _random_norm_and_linear(c, out, bias):
  norm, linear = layer_norm(c, rngs=nnx.Rngs(0)), dense(c, out, use_bias=bias, rngs=nnx.Rngs(1))
  keys = iter(jax.random.split(jax.random.key(2), 3))
  norm.scale[...] = 1.0 + jax.random.normal(next(keys), (c,))
  norm.bias[...] = jax.random.normal(next(keys), (c,))
  if bias:
    linear.bias[...] = jax.random.normal(next(keys), (out,))
  return norm, linear


@pytest.mark.parametrize('bias', [True, False])
def test_norm_dense_is_layer_norm_then_linear(bias):
  c, out = 6, 3
  norm, linear = _random_norm_and_linear(c, out, bias)
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(10, c)).astype(np.float32)
  normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  expected = (normed * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])) @ np.asarray(
      linear.kernel[...]) + (np.asarray(linear.bias[...]) if bias else 0.0)
  np.testing.assert_allclose(norm_dense(norm, linear, jnp.asarray(x)), expected,
                             rtol=1e-4, atol=1e-4)


def test_norm_dense_gradients_match_the_unfolded_layers():
  norm, linear = _random_norm_and_linear(6, 3, True)
  graphdef, params = nnx.split((norm, linear))
  x = jax.random.normal(jax.random.key(3), (10, 6))
  target = jax.random.normal(jax.random.key(4), (10, 3))

  def loss(params, x, folded):
    n, l = nnx.merge(graphdef, params)
    y = norm_dense(n, l, x) if folded else l(n(x))
    return jnp.sum(jnp.sin(y) * target)

  folded = jax.grad(loss, argnums=(0, 1))(params, x, True)
  unfolded = jax.grad(loss, argnums=(0, 1))(params, x, False)
  for a, b in zip(jax.tree.leaves(folded), jax.tree.leaves(unfolded)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _numpy_conv3x3(x, kernel, bias, stride):
  """3x3 cross-correlation with one zero row/column on every side, by loops."""
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1  # (h + 2 - 3) // s + 1
  out = np.zeros((b, ho, wo, kernel.shape[-1]), np.float64)
  for i in range(ho):
    for j in range(wo):
      window = xp[:, stride * i:stride * i + 3, stride * j:stride * j + 3]
      out[:, i, j] = np.einsum('byxc,yxco->bo', window, kernel)
  return out + bias


@pytest.mark.parametrize('in_chans, embed_dim, patch', [(8, 8, 4), (3, 20, 8), (2, 16, 1)])
def test_conv_stem_matches_numpy_layer_by_layer(in_chans, embed_dim, patch):
  """Per layer: 3x3 conv (padding 1, stride 2; stride 1 for patch 1), LayerNorm (eps
  1e-5), then tanh GELU except after the last layer. With equal widths (8, 8, 4) a
  norm-before-conv stem would run too, and must still fail."""
  stem = ConvStem(in_chans, embed_dim, patch, rngs=nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(6), 3 * len(stem.convs)))
  for conv, norm in zip(stem.convs, stem.norms):  # Non-trivial biases and affines.
    conv.bias[...] = 0.3 * jax.random.normal(next(keys), conv.bias.shape)
    norm.scale[...] = 1.0 + 0.5 * jax.random.normal(next(keys), norm.scale.shape)
    norm.bias[...] = 0.5 * jax.random.normal(next(keys), norm.bias.shape)
  x = np.random.default_rng(5).normal(size=(2, 9, 7, in_chans)).astype(np.float32)
  ref = x.astype(np.float64)
  stride = 1 if patch == 1 else 2
  for k, (conv, norm) in enumerate(zip(stem.convs, stem.norms)):
    ref = _numpy_conv3x3(ref, np.asarray(conv.kernel[...]), np.asarray(conv.bias[...]), stride)
    ref = _numpy_layer_norm(ref, norm)
    if k < len(stem.convs) - 1:
      ref = _numpy_tanh_gelu(ref)
  assert ref.shape == (2, -(-9 // patch), -(-7 // patch), embed_dim)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(stem, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('patch', [2, 4])
def test_patch_embed_pads_odd_sizes_at_the_bottom_right_as_numpy(patch):
  """Zero rows/columns after the image (Swin's F.pad), never split around it as
  'SAME' would: each patch sees the same pixels as in the unpadded image."""
  stem = PatchEmbed(3, 8, patch, rngs=nnx.Rngs(0))
  stem.proj.bias[...] = 0.3 * jax.random.normal(jax.random.key(1), stem.proj.bias.shape)
  stem.norm.scale[...] = 1.0 + 0.5 * jax.random.normal(jax.random.key(2), (8,))
  stem.norm.bias[...] = 0.5 * jax.random.normal(jax.random.key(3), (8,))
  x = np.random.default_rng(4).normal(size=(2, 13, 11, 3)).astype(np.float32)
  ho, wo = -(-13 // patch), -(-11 // patch)
  padded = np.zeros((2, ho * patch, wo * patch, 3))
  padded[:, :13, :11] = x
  patches = padded.reshape(2, ho, patch, wo, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  kernel = np.asarray(stem.proj.kernel[...], np.float64)  # (p, p, 3, 8)
  ref = np.einsum('bhwyxc,yxco->bhwo', patches, kernel) + np.asarray(stem.proj.bias[...])
  ref = _numpy_layer_norm(ref, stem.norm)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(stem, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('approximate', [True, False])
def test_mlp_uses_the_configured_gelu(approximate):
  """fc1 -> GELU -> fc2, with tanh GELU or the exact erf one as configured."""
  from math import erf  # pylint: disable=import-outside-toplevel
  mlp = Mlp(4, 16, rngs=nnx.Rngs(0), gelu_approximate=approximate)
  x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  h = x.astype(np.float64) @ np.asarray(mlp.fc1.kernel[...]) * 40  # Large: the forms differ.
  if approximate:
    h = _numpy_tanh_gelu(h)
  else:
    h = 0.5 * h * (1 + np.vectorize(erf)(h / np.sqrt(2)))
  mlp.fc1.kernel[...] = mlp.fc1.kernel[...] * 40
  mlp.fc2.kernel[...] = jnp.eye(16, 4)  # Reads four hidden units directly.
  expected = h @ np.eye(16, 4)
  np.testing.assert_allclose(mlp(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


def test_window_attention_without_qkv_bias():
  module = WindowAttention(16, 4, (2, 2), rngs=nnx.Rngs(0), qkv_bias=False)
  assert module.qkv.bias is None
  x = np.random.default_rng(1).normal(size=(3, 4, 16)).astype(np.float32)
  # The numpy reference adds a bias: a zero one, which is what no bias means.
  module.qkv.bias = nnx.Param(jnp.zeros(48))
  expected = _numpy_window_attention(module, x, None)
  module.qkv.bias = None
  np.testing.assert_allclose(module(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-5)
