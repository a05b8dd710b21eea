"""Models, presets, configs and the report."""

import importlib
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from hierarchical_vit import presets, report, resampling
from hierarchical_vit.layers import reseed_per_example
from hierarchical_vit.layers.attention import ATTENTION_CORES, WindowAttention
from hierarchical_vit.models import Classifier, abstract_model, build_model, encoder_kwargs
from hierarchical_vit.report import count_params, forward_flops, matmul_flops, model_report

CONFIG_DIR = pathlib.Path(__file__).parent.parent / 'configs'


def tiny_model_config(**overrides):
  m = base.get_model_config()
  m.update(dict(img_size=16, in_chans=1, patch_size=2, embed_dim=16, depths=(1, 1, 1),
                num_heads=(2, 2, 4), window_size=4, num_classes=5))
  m.update(overrides)
  return m


def test_swin_t_has_official_parameter_count():
  m = presets.apply_preset(base.get_model_config(), 'swin_t')
  model = nnx.eval_shape(lambda: build_model(m, rngs=nnx.Rngs(0)))
  assert count_params(model) == 28_288_354


def test_swin_s_swin_b_parameter_counts_without_allocating():
  for name, expected in [('swin_s', 49_606_258), ('swin_b', 87_768_224)]:
    m = presets.apply_preset(base.get_model_config(), name)
    model = nnx.eval_shape(lambda: build_model(m, rngs=nnx.Rngs(0)))
    assert count_params(model) == expected


@pytest.mark.parametrize('size', [(16, 16), (15, 17), (13, 9)])
def test_classifier_forward_any_size(size):
  model = build_model(tiny_model_config(), rngs=nnx.Rngs(0))
  model.eval()
  logits = nnx.jit(lambda m, x: m(x))(model, jnp.ones((2, *size, 1)))
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize('name', ['classifier', 'unet'])
def test_inputs_of_the_wrong_layout_are_refused_by_name(name):
  """Wrong channels, NCHW and a missing batch axis name model.in_chans and the
  expected layout (not a convolution's shape error from inside lax)."""
  model = build_model(tiny_model_config(name=name), rngs=nnx.Rngs(0))
  for shape in [(2, 16, 16, 3), (2, 1, 16, 16), (16, 16, 1)]:
    with pytest.raises(ValueError, match=re.escape(
        f'the model takes (B, H, W, 1) images, channels last (model.in_chans=1); '
        f'got an input of shape {shape}')):
      model(jnp.ones(shape))


@pytest.mark.parametrize('upsample', ['patch_expand', 'interpolate'])
@pytest.mark.parametrize('size', [(16, 16), (15, 17)])
def test_unet_forward_any_size(upsample, size):
  model = build_model(tiny_model_config(name='unet', upsample=upsample), rngs=nnx.Rngs(0))
  model.eval()
  y = model(jax.random.normal(jax.random.key(0), (2, *size, 1)))
  assert y.shape == (2, *size, 5) and bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize('upsample', sorted(resampling.UPSAMPLERS))
def test_unet_head_folds_the_final_norm_exactly(upsample):
  """UNet's folded head equals head(final upsampler's LayerNorm(...)), unfolded."""
  model = build_model(tiny_model_config(name='unet', upsample=upsample), rngs=nnx.Rngs(0))
  model.eval()
  up = model.decoder.final_upsampler
  keys = iter(jax.random.split(jax.random.key(1), 3))
  up.norm.scale[...] = 1.0 + jax.random.normal(next(keys), up.norm.scale.shape)
  up.norm.bias[...] = jax.random.normal(next(keys), up.norm.bias.shape)
  model.head.bias[...] = jax.random.normal(next(keys), model.head.bias.shape)
  x = jax.random.normal(jax.random.key(0), (2, 15, 17, 1))
  unfolded = model.head(model.decoder(model.encoder(x), (15, 17)))
  np.testing.assert_allclose(model(x), unfolded, rtol=1e-4, atol=1e-4)


def test_unet_decoder_mirrors_encoder():
  model = build_model(tiny_model_config(name='unet', decoder_depths=(2, 1)), rngs=nnx.Rngs(0))
  assert [len(s.blocks) for s in model.decoder.stages] == [2, 1]
  assert [u.out_features for u in model.decoder.upsamplers] == [32, 16]
  # By default each level repeats its encoder stage's depth, deepest level first.
  default = nnx.eval_shape(lambda: build_model(
      tiny_model_config(name='unet', depths=(1, 2, 3)), rngs=nnx.Rngs(0)))
  assert [len(s.blocks) for s in default.decoder.stages] == [2, 1]


def test_dropout_and_drop_path_follow_train_eval():
  model = build_model(tiny_model_config(drop_rate=0.3, drop_path_rate=0.3), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))
  call = nnx.jit(lambda m, x: m(x))  # Eagerly, ~15 s of op-by-op compiles here.
  model.train()
  assert not np.allclose(call(model, x), call(model, x))  # The RNG streams advance.
  model.eval()
  np.testing.assert_array_equal(call(model, x), call(model, x))


@pytest.mark.parametrize('name', ['classifier', 'unet'])
def test_train_mode_outputs_per_example_do_not_depend_on_the_batch(name):
  """With the dropout streams reseeded per example (as the train step does),
  every dropout site (head, MLP, attention on shifted windows, projection,
  drop path, the decoder's) draws an example's mask from its own key: images
  1 and 3 alone get the outputs they get among 4, and other rows' keys other
  outputs."""
  model = build_model(tiny_model_config(name=name, drop_rate=0.2, attn_drop_rate=0.2,
                                        drop_path_rate=0.3), rngs=nnx.Rngs(params=0, dropout=1))
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))

  @nnx.jit
  def call(model, x, rows):
    reseed_per_example(model, 3, rows)
    return model(x)

  whole = call(model, x, jnp.arange(4))
  part = call(model, x[1::2], jnp.arange(1, 4, 2))
  np.testing.assert_allclose(part, whole[1::2], rtol=1e-5, atol=1e-5)
  as_rows_0_and_2 = call(model, x[1::2], jnp.arange(0, 4, 2))  # Other keys, other masks.
  assert not np.allclose(part, as_rows_0_and_2, atol=1e-3)


@pytest.mark.parametrize('drop_path_rate', [0.0, 0.5])
def test_drop_path_alone_makes_training_stochastic(drop_path_rate):
  """With every dropout off, train and eval differ exactly when drop path is on."""
  model = build_model(tiny_model_config(drop_rate=0.0, attn_drop_rate=0.0,
                                        drop_path_rate=drop_path_rate), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))
  call = nnx.jit(lambda m, x: m(x))
  model.train()
  train = call(model, x)
  model.eval()
  assert np.allclose(train, call(model, x), rtol=1e-6, atol=1e-6) == (drop_path_rate == 0.0)


def test_drop_path_rates_rise_linearly_over_all_blocks_like_timm():
  """timm: torch.linspace(0, drop_path_rate, sum(depths)), block by block across stages."""
  model = build_model(tiny_model_config(depths=(2, 1, 3), drop_path_rate=0.25), rngs=nnx.Rngs(0))
  rates = [0.0 if block.drop_path.dropout is None else block.drop_path.dropout.rate
           for stage in model.encoder.stages for block in stage.blocks]
  np.testing.assert_allclose(rates, np.linspace(0.0, 0.25, 6))


def test_decoder_drop_path_rates_mirror_the_encoders_like_swin_unet():
  """Level i takes encoder stage i's rates; a deeper level repeats the last."""
  model = build_model(tiny_model_config(name='unet', depths=(2, 2, 2), drop_path_rate=0.3,
                                        decoder_depths=(3, 1)), rngs=nnx.Rngs(0))
  rate = lambda block: 0.0 if block.drop_path.dropout is None else block.drop_path.dropout.rate
  encoder = np.linspace(0.0, 0.3, 6)
  deep, shallow = ([rate(b) for b in stage.blocks] for stage in model.decoder.stages)
  np.testing.assert_allclose(deep, [encoder[2], encoder[3], encoder[3]])  # Level 1, 3 blocks.
  np.testing.assert_allclose(shallow, [encoder[0]])  # Level 0, 1 block.


def _loss_grads_residual_bytes(remat: str):
  """A training-mode loss (drop path on), its gradients, and the bytes the
  forward keeps for the backward (the residuals jax.vjp closes over)."""
  model = build_model(tiny_model_config(img_size=32, depths=(2, 2, 2), drop_path_rate=0.3,
                                        remat=remat), rngs=nnx.Rngs(0))
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rest = nnx.to_pure_dict(rest)
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 1))
  loss_fn = lambda p: nnx.merge(graphdef, p, rest)(x).sum()
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  # The vjp closure's leaves are its residuals; their shapes suffice (no run).
  vjp = jax.eval_shape(lambda p: jax.vjp(loss_fn, p)[1], params)
  return loss, grads, sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp))


def test_remat_keeps_the_function_and_drops_the_residuals():
  loss, grads, kept = _loss_grads_residual_bytes('none')
  saved = {}
  for remat in ('block', 'block_save_dots'):
    remat_loss, remat_grads, saved[remat] = _loss_grads_residual_bytes(remat)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)  # Same drop-path draws.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), remat_grads, grads)
  # Measured: 16.2 MiB kept without remat, 2.3 with 'block', 5.8 with 'block_save_dots'.
  assert saved['block'] < saved['block_save_dots'] < kept / 2
  assert saved['block'] < kept / 5
  with pytest.raises(ValueError, match=r"model.remat='all' is not one of \['block', "):
    build_model(tiny_model_config(remat='all'), rngs=nnx.Rngs(0))
  unet = abstract_model(tiny_model_config(name='unet', remat='block'))
  assert {stage.remat for stage in [*unet.encoder.stages, *unet.decoder.stages]} == {'block'}


def _matmul_operand_dtypes(jaxpr) -> set[np.dtype]:
  """The dtypes of the operands of every dot_general and convolution on
  activations, sub-jaxprs included. Left out: products with a 1-D left
  operand, norm_dense's fold of a norm's bias into the next kernel
  ((C,) x (C, C_out)), arithmetic on the float32 parameters."""
  dtypes = set()
  for eqn in jaxpr.eqns:
    if (eqn.primitive.name in ('dot_general', 'conv_general_dilated')
        and eqn.invars[0].aval.ndim > 1):
      dtypes.update(v.aval.dtype for v in eqn.invars[:2])
    for sub in report._sub_jaxprs(eqn.params.values()):
      dtypes |= _matmul_operand_dtypes(sub)
  return dtypes


@pytest.mark.parametrize('name, upsample', [('classifier', 'patch_expand'),
                                            ('unet', 'patch_expand'), ('unet', 'interpolate'),
                                            ('unet', 'transposed_conv'),
                                            ('unet', 'pixel_shuffle')])
def test_bfloat16_computes_every_matmul_in_bfloat16_with_float32_params_and_logits(
    name, upsample):
  """dtype reaches every layer (stem, stages, downsamplers, decoder, head):
  no matmul or convolution gets a float32 operand."""
  model = abstract_model(tiny_model_config(name=name, upsample=upsample, dtype='bfloat16',
                                           downsample='conv'))
  graphdef, state = nnx.split(model)
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype(np.float32)}
  forward = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))
  closed = forward(state, jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32))
  assert _matmul_operand_dtypes(closed.jaxpr) == {jnp.dtype(jnp.bfloat16)}
  assert closed.out_avals[0].dtype == jnp.float32


def test_global_attention_stage_uses_whole_map_as_window():
  # At img_size 32, stage 1 is 8 x 8 tokens: larger than window_size 4.
  config = tiny_model_config(img_size=32, global_attention=(1,))
  model = build_model(config, rngs=nnx.Rngs(0))
  model.eval()
  block = model.encoder.stages[1].blocks[0]
  assert block.window == (8, 8) and model.encoder.stages[0].blocks[0].window == (4, 4)
  # Its attention is plain attention over all 64 tokens as one window.
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
  full = block.attn(x.reshape(2, 64, 32)).reshape(x.shape)
  np.testing.assert_allclose(block._attention(x), full, rtol=1e-5, atol=1e-5)
  model = build_model(tiny_model_config(img_size=32, depths=(2, 1, 1), global_attention=(0,)),
                      rngs=nnx.Rngs(0))
  assert model.encoder.stages[0].blocks[0].window == (16, 16)
  assert model.encoder.stages[0].blocks[1].shift == (0, 0)


@pytest.mark.parametrize('global_attention', [(), (1,)])
def test_global_attention_reaches_across_the_map(global_attention):
  """In an unshifted 4 x 4-window block, token (7, 7) of an 8 x 8 map ignores
  token (0, 0); in a global stage it attends to it."""
  model = build_model(tiny_model_config(img_size=32, global_attention=global_attention),
                      rngs=nnx.Rngs(0))
  model.eval()
  block = model.encoder.stages[1].blocks[0]
  x, dx = jax.random.normal(jax.random.key(0), (2, 1, 8, 8, 32))
  moved = block(x.at[:, 0, 0].add(10 * dx[:, 0, 0]))[:, 7, 7] - block(x)[:, 7, 7]
  assert bool(jnp.any(jnp.abs(moved) > 1e-6)) == bool(global_attention)


def test_num_heads_are_checked_against_their_own_stage_width():
  # Stage 1 is 2 * 16 = 32 wide after patch merging, so 32 heads divide it.
  model = build_model(tiny_model_config(num_heads=(2, 32, 4)), rngs=nnx.Rngs(0))
  assert model.encoder.dims[1] == 32 and model.encoder.stages[1].blocks[0].attn.num_heads == 32


@pytest.mark.parametrize('overrides, message', [
    (dict(name='vit'), r"model.name='vit'.*'classifier', 'unet'"),
    (dict(downsample='strided'), r"model.downsample='strided'.*avg_pool.*patch_merge"),
    (dict(name='unet', upsample='deconv'), r"model.upsample='deconv'.*patch_expand"),
    (dict(num_heads=(3, 2, 4)), r'model.num_heads\[0\]=3 does not divide stage 0 width 16'),
    (dict(num_heads=(2, 3, 4)), r'model.num_heads\[1\]=3 does not divide stage 1 width 32'),
    (dict(downsample='space_to_depth', num_heads=(2, 2, 3)),
     r'model.num_heads\[2\]=3 does not divide stage 2 width 256'),
    (dict(num_heads=(2, 2)), r'model.num_heads=\(2, 2\) has 2 entries'),
    (dict(num_heads=(2, 0, 4)), r'model.num_heads\[1\]=0 must be a positive int'),
    (dict(embed_dim=0), r'model.embed_dim=0 must be a positive int'),
    (dict(embed_dim=-16), r'model.embed_dim=-16 must be a positive int'),
    (dict(in_chans=0), r'model.in_chans=0 must be a positive int'),
    (dict(num_classes=0), r'model.num_classes=0 must be a positive int'),
    (dict(name='unet', num_classes=0), r'model.num_classes=0 must be a positive int'),
    (dict(mlp_ratio=0.01),
     r'model.mlp_ratio=0.01 gives stage 0 an MLP hidden width of int\(16 \* 0.01\) = 0'),
    (dict(window_size=0), r'model.window_size=0'),
    # bools are ints to Python (True == 1): typos here.
    (dict(window_size=True), r'model.window_size=True must be a positive int'),
    (dict(depths=(1, True, 1)), r'model.depths=\(1, True, 1\) must be a non-empty tuple'),
    (dict(downsample='blur_pool', downsample_options={'blur_pool': {'filter_size': True}}),
     r'model.downsample_options.blur_pool.filter_size=True must be a positive integer'),
    (dict(stem='hybrid'), r"model.stem='hybrid'.*'conv', 'patch'"),
    (dict(global_attention=(3,)), r'model.global_attention=\(3,\)'),
    (dict(global_attention=('1',)), r"model.global_attention=\('1',\) must name stages by int"),
    (dict(depths=(1.5, 1, 1)), r'model.depths=\(1.5, 1, 1\) must be a non-empty tuple of '
                               r'positive ints'),
    (dict(name='unet', decoder_depths=(1.5, 1)), r'model.decoder_depths=\(1.5, 1\) must hold'),
    (dict(drop_path_rate=1.0), r'model.drop_path_rate=1.0'),
    (dict(dtype='float16'), r"model.dtype='float16'.*bfloat16"),
    (dict(name='unet', decoder_depths=(1,)), r'model.decoder_depths=\(1,\)'),
    (dict(downsample='conv', downsample_options={'conv': {'kernel_size': 4}}),
     r'model.downsample_options.conv.kernel_size=4'),
    (dict(downsample_options={'patch_merge': {'kernel_size': 3}}),
     r"model.downsample_options.patch_merge.kernel_size is not an option of downsampler "
     r"'patch_merge'; valid keys: \[\]"),
    # Options of another registered downsampler are kept for an ablation to switch to.
    (dict(downsample_options={'blurpool': {'filter_size': 5}, 'conv': {'kernel_size': 3}}),
     r"model.downsample_options has options for \['blurpool'\], not registered downsamplers; "
     r"valid choices: \['avg_pool', "),
    (dict(name='unet', upsample_options={'interp': {'method': 'nearest'}}),
     r"model.upsample_options has options for \['interp'\], not registered upsamplers"),
    (dict(downsample='blur_merge', downsample_options={'blur_merge': {'filter_size': 0}}),
     r'model.downsample_options.blur_merge.filter_size=0 must be a positive integer'),
    (dict(downsample='conv', downsample_options={'conv': {'kernel': 3}}),
     r"model.downsample_options.conv.kernel is not .*valid keys: \['kernel_size'\]"),
    (dict(name='unet', upsample='interpolate', upsample_options={'interpolate': {'mode': 'x'}}),
     r"model.upsample_options.interpolate.mode is not .*valid keys: \['method'\]"),
    # The decoder sets the factor: 1 broke the skip concat, 4 silently cropped.
    (dict(name='unet', upsample_options={'patch_expand': {'factor': 1}}),
     r'model.upsample_options.patch_expand.factor=1 cannot be set: the decoder sets it'),
    (dict(name='unet', upsample_options={'patch_expand': {'factor': 4}}),
     r'model.upsample_options.patch_expand.factor=4 cannot be set'),
])
def test_config_errors_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    build_model(tiny_model_config(**overrides), rngs=nnx.Rngs(0))


@pytest.mark.parametrize('name, options, message', [
    # Floats compare equal to ints (2.0 == 2) but are no size; ConfigDict stops
    # them in the base config's int fields, not in a plain dict of options.
    ('conv', {'kernel_size': 2.0}, r'conv.kernel_size=2.0 is not one of \[2, 3\]'),
    ('avg_pool', {'kernel_size': 3.0}, r'avg_pool.kernel_size=3.0 must be an integer >= 2'),
    ('conv_max_pool', {'pool_size': True}, r'conv_max_pool.pool_size=True must be an integer'),
    ('depthwise_conv_pool', {'kernel_size': 3.0}, r'kernel_size=3.0 must be an odd positive'),
])
def test_downsampler_size_options_refuse_floats_and_bools(name, options, message):
  with pytest.raises(ValueError, match=message):
    resampling.make_downsampler(name, 8, rngs=nnx.Rngs(0), **options)


def test_unknown_preset_lists_choices():
  with pytest.raises(ValueError, match=r"'swin_xl'.*swin_b.*swin_t"):
    presets.apply_preset(base.get_model_config(), 'swin_xl')


def test_resampler_options_reach_the_module():
  model = build_model(tiny_model_config(
      downsample='conv', downsample_options={'conv': {'kernel_size': 3}}), rngs=nnx.Rngs(0))
  assert model.encoder.downsamplers[0].conv.kernel.shape[:2] == (3, 3)
  model = build_model(tiny_model_config(
      downsample='blur_pool', downsample_options={'blur_pool': {'filter_size': 5}}),
      rngs=nnx.Rngs(0))
  assert [d.filter_size for d in model.encoder.downsamplers] == [5, 5]


# saved.py reads a run's workdir (tests/training/test_trainer.py runs it).
_CONFIGS = sorted(p.relative_to(CONFIG_DIR.parent).with_suffix('').as_posix().replace('/', '.')
                  for p in CONFIG_DIR.rglob('*.py') if p.stem not in ('__init__', 'saved'))


def test_config_list_covers_ablations():
  assert {'configs.quickstart', 'configs.ablations.downsample', 'configs.ablations.antialias',
          'configs.ablations.precision', 'configs.ablations.upsample'} <= set(_CONFIGS)


@pytest.mark.parametrize('name', _CONFIGS)
def test_every_config_builds(name):
  config = importlib.import_module(name).get_config()
  model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
  assert count_params(model) > 0


def test_report_counts_params_and_flops():
  m = tiny_model_config()
  model = build_model(m, rngs=nnx.Rngs(0))
  report = model_report(model, (2, 16, 16, 1))
  assert report['params'] == sum(report['params_by_module'].values()) == count_params(model)
  # Lower bound: the MLPs alone do 2 * 2 * C * 4C FLOPs per token in each block.
  mlp_flops = sum(2 * 2 * 4 * d * d * r[0] * r[1]
                  for d, r in zip(model.encoder.dims, model.encoder.resolutions))
  assert report['gflops_per_image'] * 1e9 > mlp_flops


def test_report_counts_an_eval_forward_and_keeps_the_model_mode():
  model = build_model(tiny_model_config(drop_rate=0.1, drop_path_rate=0.1), rngs=nnx.Rngs(0))
  shape = (2, 16, 16, 1)
  model.eval()
  eval_flops = forward_flops(model, shape)
  model.train()
  assert forward_flops(model, shape) == eval_flops  # Not the dropout masks' work too.
  report = model_report(model, shape)
  assert report['gflops_per_image'] == pytest.approx(eval_flops / 2 / 1e9)
  assert not model.head_drop.deterministic  # Still in train mode.


def test_forward_flops_match_swin_t_matmul_count():
  """Counted FLOPs = the published step-by-step matmul count of Swin-T at 224, plus a
  few % of elementwise work (LayerNorm, softmax, GELU); a backend that hid its GEMMs
  from the count (as compiled GPU executables do) would fail the lower bound."""
  m = presets.apply_preset(base.get_model_config(), 'swin_t')
  model = nnx.eval_shape(lambda: build_model(m, rngs=nnx.Rngs(0)))
  window_tokens = 7 * 7
  expected = 2 * 56 * 56 * (4 * 4 * 3) * 96  # patch embedding
  for i, (res, dim, depth) in enumerate(zip((56, 28, 14, 7), (96, 192, 384, 768), (2, 2, 6, 2))):
    tokens = res * res
    per_block = (2 * tokens * dim * 3 * dim + 2 * tokens * dim * dim      # qkv, proj
                 + 2 * 2 * tokens * window_tokens * dim                    # q.k, p.v
                 + 2 * 2 * tokens * dim * 4 * dim)                         # MLP
    expected += depth * per_block
    if i < 3:  # 2x2 merge: (tokens / 4, 4C) -> 2C
      expected += 2 * tokens // 4 * 4 * dim * 2 * dim
  expected += 2 * 768 * 1000  # head
  counted = forward_flops(model, (1, 224, 224, 3))
  assert expected <= counted <= 1.05 * expected, (counted, expected)
  # The matmuls and convolutions alone are exactly the published count, with
  # either GELU (whose elementwise work forward_flops counts differently).
  assert matmul_flops(model, (1, 224, 224, 3)) == expected
  m.gelu_approximate = True
  tanh = nnx.eval_shape(lambda: build_model(m, rngs=nnx.Rngs(0)))
  assert matmul_flops(tanh, (1, 224, 224, 3)) == expected != forward_flops(tanh, (1, 224, 224, 3))


def test_matmul_flops_count_grouped_convolutions_and_scanned_layers():
  """A depthwise conv does C / groups multiply-adds per output, and a layer
  under lax.scan runs once per step: counted by hand here."""

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.conv = nnx.Conv(8, 8, (3, 3), feature_group_count=4, padding='VALID', rngs=rngs)
      self.dense = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):  # (2, 6, 6, 8) -> (2, 4, 4, 8) -> 3 x (2, 16, 8) @ (8, 5)
      y = self.conv(x).reshape(2, 16, 8)
      return jax.lax.scan(lambda c, _: (c, self.dense(y)), 0.0, None, length=3)[1]

  conv = 2 * (2 * 4 * 4 * 8) * (3 * 3 * 8 // 4)
  dense = 3 * 2 * (2 * 16 * 5) * 8
  assert matmul_flops(Net(nnx.Rngs(0)), (2, 6, 6, 8)) == conv + dense


@pytest.mark.parametrize('overrides, message', [
    (dict(attention='flash'),
     r"model.attention='flash' is not one of \['cudnn', 'einsum', 'einsum_lowp', 'pallas'\]"),
    (dict(attention='cudnn'),
     r"model.attention='cudnn' needs model.dtype='bfloat16', got 'float32'"),
    (dict(attention='cudnn', dtype='bfloat16', attn_drop_rate=0.1),
     r"model.attention='cudnn' has no attention dropout: model.attn_drop_rate=0.1 must be 0"),
    (dict(attention='pallas', attn_drop_rate=0.2),
     r"model.attention='pallas' has no attention dropout: model.attn_drop_rate=0.2 must be 0"),
    # Stage 0 is 16x16 tokens: a 12x12 window, or the whole map, outgrows the kernel's tile.
    (dict(attention='pallas', img_size=32, window_size=12),
     r"model.attention='pallas' takes windows of up to 128 tokens, but stage 0's 12x12 window "
     r"has 144: use a smaller model.window_size, or use model.attention='einsum'"),
    (dict(attention='pallas', img_size=32, global_attention=(1, 0)),
     r"stage 0's 16x16 window has 256: drop 0 from model.global_attention"),
    # embed 24 over 2 heads: 12-wide heads; stage 1's 48 over 2 would pass.
    (dict(attention='cudnn', dtype='bfloat16', embed_dim=24),
     r"model.attention='cudnn' needs a head width \(stage width / model.num_heads\) that is a "
     r'multiple of 8 and at most 256, got 12'),
    (dict(attention='cudnn', dtype='bfloat16', embed_dim=1024, num_heads=(2, 4, 8)),
     r'multiple of 8 and at most 256, got 512'),
])
def test_attention_field_is_validated(overrides, message):
  """On any backend: the config is checked before the backend is."""
  with pytest.raises(ValueError, match=message):
    build_model(tiny_model_config(**overrides), rngs=nnx.Rngs(0), check_backend=False)


@pytest.mark.parametrize('core', ['cudnn', 'pallas'])
def test_a_fused_core_refuses_dropout_in_window_attention_built_alone(core):
  with pytest.raises(ValueError, match=f"model.attention='{core}' has no attention dropout"):
    WindowAttention(32, 4, (4, 4), attention=core, attn_drop_rate=0.1, rngs=nnx.Rngs(0))


def test_a_gpu_cores_config_is_counted_on_any_backend():
  """report.py and a sweep's cost count a pallas model's parameters and FLOPs
  on a CPU host: they are the einsum core's."""
  config = tiny_model_config(attention='pallas', img_size=32, global_attention=(1,))
  counted = abstract_model(config, check_backend=False)
  reference = abstract_model(tiny_model_config(img_size=32, global_attention=(1,)))
  assert counted.encoder.stages[0].blocks[0].attn.core is ATTENTION_CORES['pallas']
  assert count_params(counted) == count_params(reference) > 0
  assert forward_flops(counted, (1, 32, 32, 1)) == forward_flops(reference, (1, 32, 32, 1))


@pytest.mark.parametrize('core', ['cudnn', 'pallas'])
def test_gpu_attention_cores_build_only_on_a_gpu(core):
  # Stage 1's 8x8 map as one global window: 64 tokens fit the pallas tile.
  config = tiny_model_config(attention=core, dtype='bfloat16', img_size=32, global_attention=(1,))
  if jax.default_backend() == 'gpu':
    assert build_model(config, rngs=nnx.Rngs(0)).encoder.stages[0].blocks[0].attn.core is (
        ATTENTION_CORES[core])
  else:
    with pytest.raises(ValueError, match=f"model.attention='{core}' needs an NVIDIA GPU; this "
                                         r"backend is 'cpu': use 'einsum'"):
      build_model(config, rngs=nnx.Rngs(0))


def test_forward_flops_count_the_einsum_core_in_float32_whatever_the_model_runs():
  """cuDNN's kernel does not lower for XLA:CPU, where FLOPs are counted, and a
  bfloat16 model's casts are not its arithmetic."""
  kwargs = encoder_kwargs(tiny_model_config())
  counts = {}
  for core, dtype in [(core, None) for core in ATTENTION_CORES] + [('cudnn', jnp.bfloat16)]:
    model = Classifier(num_classes=5, rngs=nnx.Rngs(0), dtype=dtype,
                       **dict(kwargs, attention=core))
    counts[core, dtype] = forward_flops(model, (2, 16, 16, 1))
    # Counted on a copy: the model keeps its core and dtype.
    assert model.encoder.stages[0].blocks[0].attn.core is ATTENTION_CORES[core]
    assert model.head.dtype == dtype
  assert len(set(counts.values())) == 1 and counts['einsum', None] > 0


def _eval_unet_and_features(size=(15, 17)):
  """A tiny 3-stage UNet in eval mode, its encoder's features for one odd-sized input,
  and random skip projection biases (zero at init, which would hide a bias bug)."""
  model = build_model(tiny_model_config(name='unet'), rngs=nnx.Rngs(0))
  model.eval()
  for k, proj in enumerate(model.decoder.skip_projections):
    proj.bias[...] = 0.1 * jax.random.normal(jax.random.key(10 + k), proj.bias.shape)
  x = jax.random.normal(jax.random.key(0), (2, *size, 1))
  return model, model.encoder(x)


def test_unet_decoder_equals_its_sublayers_composed_by_hand():
  """Swin-Unet's order per level: upsample, crop to the skip, concatenate [x, skip]
  (x first, as Swin-Unet's torch.cat([x, skip], -1)), project 2C -> C, run the stage;
  then LayerNorm and the final upsampler. The concat and projection are numpy, so a
  swapped concat order, a dropped skip or a skip from another level fails."""
  model, features = _eval_unet_and_features()
  decoder = model.decoder
  # Stage outputs at 15 x 17 with patch 2: 8 x 9, 4 x 5, 2 x 3 tokens (ceil halving).
  assert [f.shape[1:3] for f in features] == [(8, 9), (4, 5), (2, 3)]
  x = decoder.bottleneck_norm(features[-1])
  # Deepest level first; upsampling doubles, then crops to the skip's size.
  for k, (skip, doubled) in enumerate([(features[1], (4, 6)), (features[0], (8, 10))]):
    up = np.asarray(decoder.upsamplers[k](x))
    assert up.shape[1:3] == doubled
    up = up[:, :skip.shape[1], :skip.shape[2]]
    joined = np.concatenate([up, np.asarray(skip)], axis=-1)
    proj = decoder.skip_projections[k]
    projected = joined @ np.asarray(proj.kernel[...]) + np.asarray(proj.bias[...])
    x = decoder.stages[k](jnp.asarray(projected))
  expected = decoder.final_upsampler(decoder.norm(x))[:, :15, :17]
  np.testing.assert_allclose(decoder(features, (15, 17)), expected, rtol=1e-4, atol=1e-4)


def test_unet_decoder_output_depends_on_each_skip():
  """Perturbing either encoder skip changes the decoder output, and differently for
  the two levels; a decoder that ignored its skips would only see the deepest stage."""
  model, features = _eval_unet_and_features()
  base = np.asarray(model.decoder(features, (15, 17)))
  changes = []
  for level in (0, 1):  # Stage outputs used as skips; stage 2 is the bottleneck.
    noise = jax.random.normal(jax.random.key(20 + level), features[level].shape)
    perturbed = list(features)
    perturbed[level] = features[level] + noise
    change = np.asarray(model.decoder(perturbed, (15, 17))) - base
    assert np.abs(change).max() > 1e-2, level
    changes.append(change)
  assert not np.allclose(changes[0], changes[1], atol=1e-3)


def test_matmul_flops_skip_equations_without_outputs_and_refuse_loops():
  """A debug print has no output; a while loop runs its body an unknown number
  of times, which a count would get wrong silently."""
  from hierarchical_vit import report
  w = jnp.ones((4, 3))
  def printed(x):
    jax.debug.print('{}', x.sum())
    return x @ w
  assert report._jaxpr_matmul_flops(jax.make_jaxpr(printed)(jnp.ones((2, 4))).jaxpr) == 2 * 2 * 3 * 4
  looped = lambda x: jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ jnp.eye(4), c[1] + 1),
                                        (x, 0))[0]
  with pytest.raises(ValueError, match="cannot count a 'while'"):
    report._jaxpr_matmul_flops(jax.make_jaxpr(looped)(jnp.ones((2, 4))).jaxpr)
