"""Weights from and to timm / the official Swin: same logits, round trips, errors.

timm is the independent reference: its randomly initialized Swin models, with
every parameter perturbed (so that LayerNorm scales and biases are not their
trivial 1 / 0 init), must give our converted model's logits.
"""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from tests.conftest import REPO, import_optional

torch = import_optional('torch')
timm = import_optional('timm')
safetensors_torch = import_optional('safetensors.torch')

from configs import base  # noqa: E402
from hierarchical_vit import convert, interop  # noqa: E402
from hierarchical_vit.models import abstract_model, build_model  # noqa: E402
from hierarchical_vit.resampling import DOWNSAMPLERS  # noqa: E402
from hierarchical_vit.training import trainer  # noqa: E402

# timm's Swin-T with the fields of our 'cifar_small' preset.
SMALL = dict(patch_size=2, window_size=4, embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12))


def timm_swin(**kwargs) -> torch.nn.Module:
  """A timm Swin (Swin-T unless kwargs say otherwise) in eval mode, params perturbed."""
  torch.manual_seed(0)
  model = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, **kwargs).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def our_swin(preset: str, seed: int = 0, **overrides) -> nnx.Module:
  """Our classifier for a preset (exact GELU, as timm), in eval mode."""
  model = build_model(convert.model_config(preset, **overrides), rngs=nnx.Rngs(seed))
  model.eval()
  return model


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in model.state_dict().items()}


def assert_same_logits(timm_model: torch.nn.Module, model: nnx.Module, img_size: int,
                       batch: int = 2, in_chans: int = 3) -> None:
  """Logits of both models on the same random NCHW / NHWC images agree to 1e-4."""
  x = np.random.RandomState(0).randn(batch, in_chans, img_size, img_size).astype(np.float32)
  with torch.no_grad():
    expected = timm_model(torch.from_numpy(x)).numpy()
  logits = nnx.jit(lambda m, images: m(images))(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_swin_t_224_matches_timm():
  timm_model = timm_swin()
  model = our_swin('swin_t')
  interop.assign(model, interop.from_timm(numpy_state_dict(timm_model)))
  assert_same_logits(timm_model, model, 224, batch=1)


@pytest.mark.parametrize('img_size,num_classes', [
    (32, 1000),  # 16 -> 8 -> 4 tokens, window 4.
    # 3 -> 2 -> 1 tokens: the first merge pads 3 -> 4. (Windows that pad are
    # not compared: timm pads them after the shift, ours before, as the Swin
    # authors' backbone does; see layers/swin.py and tests/test_layers.py.)
    (6, 1000),
    (32, 7),  # A non-default head.
], ids=['patch2_window4', 'merge_padding', 'head7'])
def test_small_swin_matches_timm(img_size, num_classes):
  timm_model = timm_swin(img_size=img_size, num_classes=num_classes, **SMALL)
  model = our_swin('cifar_small', img_size=img_size, num_classes=num_classes)
  interop.assign(model, interop.from_timm(numpy_state_dict(timm_model)))
  assert_same_logits(timm_model, model, img_size)


@pytest.mark.parametrize('suffix', ['.npz', '.pth', '.safetensors'])
def test_save_then_load_is_identity(tmp_path, suffix):
  path = str(tmp_path / f'weights{suffix}')
  source = our_swin('cifar_small', seed=1)
  interop.save_weights(source, path)
  model = our_swin('cifar_small', seed=2)
  interop.load_weights(model, path)
  assert_same_weights(interop.get_weights(model), interop.get_weights(source))


def test_export_loads_into_timm_strictly(tmp_path):
  # Import perturbed timm weights (non-trivial norms), export, load back into
  # a fresh timm model with strict=True: it must compute the same function.
  source = timm_swin(img_size=32, num_classes=10, **SMALL)
  model = our_swin('cifar_small')
  interop.assign(model, interop.from_timm(numpy_state_dict(source)))
  path = str(tmp_path / 'timm.safetensors')
  interop.save_weights(model, path)
  target = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, img_size=32,
                             num_classes=10, **SMALL).eval()
  target.load_state_dict(safetensors_torch.load_file(path), strict=True)
  assert_same_weights(numpy_state_dict(target), numpy_state_dict(source))


@pytest.mark.parametrize('downsample', sorted(set(DOWNSAMPLERS) - {'patch_merge'}))
def test_export_to_timm_refuses_other_downsamplers(tmp_path, downsample):
  # The pools name their params `norm` and `reduction` like patch merging but
  # with other shapes; blur_merge has merging's shapes but blurs first, which
  # timm would drop; space_to_depth has none: all must be refused.
  model = our_swin('cifar_small', downsample=downsample)
  path = str(tmp_path / 'timm.safetensors')
  with pytest.raises(ValueError, match=f"model.downsample='{downsample}' has no timm Swin"):
    interop.save_weights(model, path)
  interop.save_weights(model, str(tmp_path / 'ours.npz'))  # Our own format still works.


def test_export_to_timm_refuses_maps_that_pad_to_shifted_windows(tmp_path, caplog):
  """Stage 1 of a 24x24 input (patch 2) is 6x6 tokens under shifted 4x4
  windows: timm would mask it otherwise. A tanh GELU exports with a warning."""
  model = our_swin('cifar_small', img_size=24)
  with pytest.raises(ValueError, match=r"stage 1's 6x6 token map does not tile into its "
                                       r'shifted 4x4 windows'):
    interop.save_weights(model, str(tmp_path / 'timm.safetensors'))
  interop.save_weights(model, str(tmp_path / 'ours.npz'))
  tanh = our_swin('cifar_small', gelu_approximate=True)
  with caplog.at_level('WARNING'):
    interop.save_weights(tanh, str(tmp_path / 'tanh.safetensors'))
  assert 'tanh GELU' in caplog.text


def test_export_to_timm_refuses_an_image_that_pads_to_its_patches(tmp_path):
  """63 pixels at patch 2: our 32 tokens a side tile every stage's windows, and
  timm (31, flooring) would still load the tables, then compute otherwise."""
  model = our_swin('cifar_small', img_size=63)
  with pytest.raises(ValueError, match=r'model.img_size=63x63 is not a multiple of '
                                       r"model.patch_size=2: ours pads the last patches"):
    interop.save_weights(model, str(tmp_path / 'timm.safetensors'))
  interop.save_weights(model, str(tmp_path / 'ours.npz'))


def timm_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """microsoft/Swin-Transformer's layout: downsample at the END of stage i - 1,
  head 'head.*', and the persistent index / mask buffers it saves."""
  out = {}
  for key, value in state_dict.items():
    key = re.sub(r'^layers\.(\d+)\.downsample\.',
                 lambda m: f'layers.{int(m[1]) - 1}.downsample.', key)
    out[key.replace('head.fc.', 'head.')] = value
  out['layers.0.blocks.0.attn.relative_position_index'] = torch.zeros(16, 16, dtype=torch.long)
  out['layers.0.blocks.1.attn_mask'] = torch.zeros(16, 16, 16)
  return out


def test_official_layout_helper_gives_the_published_swin_t_keys():
  """Keys and shapes of microsoft/Swin-Transformer's swin_tiny_patch4_window7_224
  checkpoint, written out here, so that the import test below reads a layout
  that is the official one and not only the inverse of our own renaming."""
  official = timm_to_official(timm_swin().state_dict())
  published = {
      'patch_embed.proj.weight': (96, 3, 4, 4), 'patch_embed.norm.weight': (96,),
      'layers.0.blocks.0.attn.qkv.weight': (288, 96),
      'layers.0.blocks.0.attn.relative_position_bias_table': (169, 3),
      'layers.0.downsample.norm.weight': (384,),
      'layers.0.downsample.reduction.weight': (192, 384),
      'layers.2.blocks.5.mlp.fc1.weight': (1536, 384),
      'layers.2.downsample.reduction.weight': (768, 1536),
      'layers.3.blocks.1.mlp.fc2.weight': (768, 3072),
      'norm.weight': (768,), 'head.weight': (1000, 768), 'head.bias': (1000,),
  }
  for key, shape in published.items():
    assert tuple(official[key].shape) == shape, key
  assert not any(k.startswith('layers.3.downsample') for k in official)


def test_official_checkpoint_imports(tmp_path):
  timm_model = timm_swin(img_size=32, num_classes=10, **SMALL)
  official = timm_to_official(timm_model.state_dict())
  assert 'layers.0.downsample.reduction.weight' in official and 'head.weight' in official
  path = str(tmp_path / 'swin_official.pth')
  torch.save({'model': official, 'epoch': 300}, path)
  model = our_swin('cifar_small')
  interop.load_weights(model, path)
  assert_same_weights(interop.get_weights(model),
                      interop.from_timm(numpy_state_dict(timm_model)))


def test_misfit_checkpoint_raises_one_error_listing_all():
  state_dict = numpy_state_dict(timm_swin(img_size=32, num_classes=10, **SMALL))
  del state_dict['norm.weight']
  state_dict['layers.1.blocks.0.attn.proj.weight'] = np.zeros((5, 96), np.float32)
  state_dict['head.fc.weight'] = np.zeros((3, 192), np.float32)
  state_dict['pre_logits.fc.weight'] = np.zeros((192, 192), np.float32)
  model = our_swin('cifar_small')
  before = interop.get_weights(model)
  with pytest.raises(ValueError) as error:
    interop.assign(model, interop.from_timm(state_dict))
  message = str(error.value)
  assert '1 missing: norm.scale' in message
  assert '1 unexpected: pre_logits.fc.weight' in message
  assert '2 with mismatched shapes' in message
  assert 'encoder.stages.1.blocks.0.attn.proj.kernel: checkpoint (96, 5) vs model (96, 96)' in message
  assert 'head.kernel: checkpoint (192, 3) vs model (192, 10)' in message
  assert_same_weights(interop.get_weights(model), before)  # Nothing was changed.


def flat(params: dict) -> dict[str, np.ndarray]:
  """A nested pure dict of params -> {'encoder.stem.proj.kernel': array, ...}."""
  return {'.'.join(map(str, path)): np.asarray(value)
          for path, value in traverse_util.flatten_dict(params).items()}


@pytest.mark.parametrize('window', [(12, 12), (4, 7), (7, 4)],
                         ids=['grow_224_to_384', 'wide', 'tall'])
def test_resize_bias_table_matches_torch_bicubic(window):
  """A 7x7-window table (13 x 13 offsets) to other windows, as torch resizes it
  (the Swin authors' fine-tuning recipe; timm 1.x resamples tables otherwise):
  growing, and non-square both ways round."""
  table = np.random.default_rng(0).normal(size=(13 * 13, 3)).astype(np.float32)
  out_h, out_w = 2 * window[0] - 1, 2 * window[1] - 1
  grid = torch.from_numpy(table).T.reshape(1, 3, 13, 13)
  expected = torch.nn.functional.interpolate(grid, size=(out_h, out_w), mode='bicubic',
                                             align_corners=False)
  np.testing.assert_allclose(interop.resize_bias_table(table, window),
                             expected.reshape(3, out_h * out_w).T.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('side, window', [(7, (12, 12)), (7, (4, 4)), (4, (7, 7)), (7, (8, 6)),
                                          (12, (7, 7)), (1, (3, 3)), (1, (2, 2)), (7, (7, 14))])
def test_geometric_bias_table_resize_matches_timm(side, window):
  """timm's resize_rel_pos_bias_table (BEiT's geometric offsets, linear, as
  timm >= 0.9 loads Swin checkpoints) on the same table: growing, shrinking,
  non-square (its unchanged axis is not left as it was, in timm either), and
  from a one-token window (a 1x1 last stage's table)."""
  from timm.layers.pos_embed_rel import resize_rel_pos_bias_table
  table = np.random.default_rng(0).normal(size=((2 * side - 1) ** 2, 3)).astype(np.float32)
  shape = ((2 * window[0] - 1) * (2 * window[1] - 1), 3)
  expected = resize_rel_pos_bias_table(torch.from_numpy(table), new_window_size=window,
                                       new_bias_shape=shape).numpy()
  np.testing.assert_allclose(interop.resize_bias_table(table, window, 'geometric'), expected,
                             atol=2e-6)


def test_geometric_positions_keep_the_near_offsets_and_reach_the_new_edge():
  """BEiT's placement of a 13-offset table (window 7) among 23 (window 12): unit
  steps near the centre growing by one ratio, symmetric, ending at +-11."""
  positions = interop._geometric_positions(13, 23)  # pylint: disable=protected-access
  steps = np.diff(positions[6:])
  np.testing.assert_allclose(positions, -positions[::-1])
  assert positions[6] == 0 and steps[0] == 1 and np.allclose(steps[1:] / steps[:-1], steps[1])
  assert positions[-1] == pytest.approx(11, abs=1e-4)


def test_init_from_resizes_bias_tables_as_timm_loads_them(tmp_path):
  """train.init_bias_table_resize='geometric': the tables timm's own
  checkpoint filter gives a window-4 model from a window-7 checkpoint."""
  from timm.models.swin_transformer import checkpoint_filter_fn
  source = timm_swin(img_size=56, num_classes=10, **{**SMALL, 'window_size': 7})
  path = str(tmp_path / 'swin_w7.pth')
  torch.save(source.state_dict(), path)
  target = timm_swin(img_size=56, num_classes=10, **SMALL)
  filtered = checkpoint_filter_fn(source.state_dict(), target)
  expected = interop.from_timm({k: v.numpy() for k, v in filtered.items()})
  config = base.get_config()
  config.model = convert.model_config('cifar_small', img_size=56, num_classes=10)
  config.train.init_bias_table_resize = 'geometric'
  loaded = flat(trainer.init_model(config, init_from=path)[2])
  tables = [k for k in loaded if k.endswith('relative_position_bias_table')]
  assert len(tables) == 6 and loaded[tables[0]].shape[0] == 7 * 7
  for key in tables:
    np.testing.assert_allclose(loaded[key], expected[key], atol=2e-6, err_msg=key)


def test_init_from_resizes_bias_tables_and_reinitializes_head(tmp_path):
  # timm at 56 px, patch 2: 28 -> 14 -> 7 tokens, all in windows of 7, 7
  # classes; ours: window 4, so (2 * 4 - 1)^2 = 49-entry tables instead of
  # 13^2 = 169, and 10 classes. Loaded as config.train.init_from.
  source = timm_swin(img_size=56, num_classes=7, **{**SMALL, 'window_size': 7})
  path = str(tmp_path / 'swin_w7.pth')
  torch.save(source.state_dict(), path)
  config = base.get_config()
  config.model = convert.model_config('cifar_small', img_size=56, num_classes=10)
  fresh = flat(trainer.init_model(config)[2])
  loaded = flat(trainer.init_model(config, init_from=path)[2])

  converted = interop.from_timm(numpy_state_dict(source))
  tables = [k for k in loaded if k.endswith('relative_position_bias_table')]
  assert len(tables) == 6
  for key in tables:
    heads = loaded[key].shape[1]
    assert converted[key].shape == (13 * 13, heads) and loaded[key].shape == (7 * 7, heads)
    grid = torch.from_numpy(converted[key]).T.reshape(1, heads, 13, 13)
    expected = torch.nn.functional.interpolate(grid, size=(7, 7), mode='bicubic',
                                               align_corners=False)
    np.testing.assert_allclose(loaded[key], expected.reshape(heads, 49).T.numpy(),
                               rtol=1e-5, atol=1e-6, err_msg=key)
  for key, value in loaded.items():
    if key.startswith('head.'):
      np.testing.assert_array_equal(value, fresh[key], err_msg=key)
    elif key not in tables:
      np.testing.assert_array_equal(value, converted[key], err_msg=key)


def _convert(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'hierarchical_vit.convert', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=180, check=False)


def test_convert_refuses_the_flags_of_the_other_mode():
  """--workdir exports a run's own architecture: a --preset or model flag
  would be ignored; --input is a weights file, which has no --step."""
  run = {'workdir': 'w', 'preset': 'swin_t', **{k: None for k in convert._OVERRIDE_FIELDS}}
  assert convert.workdir_takes_no_model_flags(run)
  assert not convert.workdir_takes_no_model_flags({**run, 'num_classes': 10})
  assert not convert.workdir_takes_no_model_flags({**run, 'preset': 'cifar_small'})
  assert convert.workdir_takes_no_model_flags({**run, 'workdir': None, 'num_classes': 10})
  assert convert.input_takes_no_step({'input': 'a.npz', 'step': '-1'})
  assert not convert.input_takes_no_step({'input': 'a.npz', 'step': 'best'})
  assert convert.input_takes_no_step({'input': None, 'step': 'best'})


def test_convert_cli_writes_what_timm_loads_and_refuses_bad_flags(tmp_path):
  # A 1-channel model (Fashion-MNIST's): the preset's in_chans=3 overridden.
  model = our_swin('cifar_small', img_size=32, num_classes=10, in_chans=1)
  ours, theirs = str(tmp_path / 'ours.npz'), str(tmp_path / 'timm.safetensors')
  interop.save_weights(model, ours)
  proc = _convert(f'--input={ours}', f'--output={theirs}', '--preset=cifar_small',
                  '--img_size=32', '--num_classes=10', '--in_chans=1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  timm_model = timm_swin(img_size=32, num_classes=10, in_chans=1, **SMALL)
  timm_model.load_state_dict(safetensors_torch.load_file(theirs), strict=True)
  assert_same_logits(timm_model, model, 32, in_chans=1)
  missing = _convert(f'--input={tmp_path / "nope.npz"}', f'--output={theirs}')
  assert missing.returncode != 0 and '--input: no such file.' in missing.stderr
  typo = _convert(f'--input={ours}', f'--output={theirs}', '--depths=2,2,x')
  assert typo.returncode != 0 and '--depths must be comma-separated ints' in typo.stderr
  both = _convert(f'--input={ours}', f'--workdir={tmp_path}', f'--output={theirs}')
  assert both.returncode != 0 and 'Give exactly one of --input' in both.stderr


@pytest.mark.parametrize('in_chans', [1, 2, 4, 7])
def test_stem_adapts_to_other_input_channels_as_timm(in_chans):
  """timm's adapt_input_conv (OIHW) on the same kernel, ours in (kh, kw, C, E)."""
  from timm.models._manipulate import adapt_input_conv
  kernel = np.random.default_rng(0).normal(size=(2, 2, 3, 8)).astype(np.float32)
  expected = adapt_input_conv(in_chans, torch.from_numpy(kernel.transpose(3, 2, 0, 1))).numpy()
  np.testing.assert_allclose(interop.adapt_input_channels(kernel, in_chans),
                             expected.transpose(2, 3, 1, 0), rtol=1e-6)


@pytest.mark.parametrize('old, new', [((4, 4), (2, 2)), ((2, 2), (4, 4)), ((16, 16), (14, 14)),
                                      ((4, 4), (3, 5))])
def test_patch_kernel_resamples_as_timm(old, new):
  """timm's resample_patch_embed (OIHW) on the same kernel, ours in (kh, kw, C, E)."""
  from timm.layers import resample_patch_embed
  kernel = np.random.default_rng(0).normal(size=(*old, 3, 8)).astype(np.float32)
  expected = resample_patch_embed(torch.from_numpy(kernel.transpose(3, 2, 0, 1)), list(new))
  np.testing.assert_allclose(interop.resample_patch_kernel(kernel, new),
                             expected.numpy().transpose(2, 3, 1, 0), atol=2e-5)


def test_a_resampled_patch_kernel_embeds_an_upsized_patch_as_the_original():
  """FlexiViT's defining property: <resize(x), w'> = <x, w> when the patch grows."""
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(2, 3, 3, 8))
  patches = rng.normal(size=(5, 2, 3, 3))
  upsized = np.asarray(jax.image.resize(patches, (5, 4, 6, 3), 'bicubic', antialias=True))
  np.testing.assert_allclose(
      np.einsum('bhwc,hwce->be', upsized, interop.resample_patch_kernel(kernel, (4, 6))),
      np.einsum('bhwc,hwce->be', patches, kernel), rtol=1e-4, atol=1e-4)


def _finetune_config(**model):
  config = base.get_config()
  config.model = convert.model_config('cifar_small', img_size=32, **model)
  return config


def test_finetuning_from_rgb_to_gray_and_from_a_headless_checkpoint(tmp_path):
  """An RGB checkpoint without a head (timm num_classes=0) fine-tunes a
  1-channel classifier: a gray image gives the stem what (x, x, x) gave the
  RGB one, and the head keeps its fresh initialization."""
  source = timm_swin(img_size=32, num_classes=0, **SMALL)
  path = str(tmp_path / 'headless.pth')
  torch.save(source.state_dict(), path)
  config = _finetune_config(in_chans=1, num_classes=10)
  fresh = flat(trainer.init_model(config)[2])
  loaded = flat(trainer.init_model(config, init_from=path)[2])
  converted = interop.from_timm(numpy_state_dict(source))
  for key in ('head.kernel', 'head.bias'):
    np.testing.assert_array_equal(loaded[key], fresh[key])
  gray = np.random.default_rng(1).normal(size=(2, 2, 1)).astype(np.float32)
  stem = 'encoder.stem.proj.kernel'
  np.testing.assert_allclose(np.einsum('hwc,hwce->e', gray, loaded[stem]),
                             np.einsum('hwc,hwce->e', np.repeat(gray, 3, -1), converted[stem]),
                             rtol=1e-5, atol=1e-5)
  for key in converted:
    if key != stem:
      np.testing.assert_array_equal(loaded[key], converted[key], err_msg=key)
  # A misspelt resize is refused even where no bias table needs resizing.
  with pytest.raises(ValueError, match=r"init_bias_table_resize='cubic' is not one of"):
    interop.adapt_for_finetuning(abstract_model(config.model), converted, 'cubic')


def test_finetuning_to_another_patch_size_and_channel_count_resamples_the_stem(tmp_path):
  """An RGB patch-2 checkpoint fine-tunes a 1-channel patch-4 classifier: the
  stem is summed over channels, then resampled to 4x4 patches; the rest loads
  as converted (bias tables resized where the coarser grid shrinks a window)."""
  source = timm_swin(img_size=32, num_classes=10, **SMALL)
  path = str(tmp_path / 'patch2.pth')
  torch.save(source.state_dict(), path)
  config = _finetune_config(in_chans=1, patch_size=4, num_classes=10)
  loaded = flat(trainer.init_model(config, init_from=path)[2])
  converted = interop.from_timm(numpy_state_dict(source))
  stem = 'encoder.stem.proj.kernel'
  np.testing.assert_allclose(loaded[stem], interop.resample_patch_kernel(
      converted[stem].sum(axis=2, keepdims=True), (4, 4)), rtol=1e-6)
  assert loaded[stem].shape == (4, 4, 1, 48)
  same = [k for k in converted if k != stem and loaded[k].shape == converted[k].shape]
  assert len(same) > len(converted) - 6  # Only the stem and a few bias tables change.
  for key in same:
    np.testing.assert_array_equal(loaded[key], converted[key], err_msg=key)


def test_a_conv_stem_fine_tunes_from_gray_to_rgb(tmp_path):
  """model.stem='conv': its first conv takes the channel adaptation (RGB
  repeats the gray filters, scaled by 1/3), the rest loads as saved."""
  gray = trainer.init_model(_finetune_config(stem='conv', in_chans=1, num_classes=10))
  model = nnx.merge(gray[0], gray[2], gray[3])
  path = str(tmp_path / 'gray_conv_stem.npz')
  interop.save_weights(model, path)
  saved = flat(gray[2])
  loaded = flat(trainer.init_model(_finetune_config(stem='conv', in_chans=3, num_classes=10),
                                   init_from=path)[2])
  first = 'encoder.stem.convs.0.kernel'
  np.testing.assert_allclose(loaded[first], np.tile(saved[first], (1, 1, 3, 1)) / 3, rtol=1e-6)
  for key in saved:
    if key != first:
      np.testing.assert_array_equal(loaded[key], saved[key], err_msg=key)


def test_a_unet_fine_tunes_from_a_classifiers_encoder(tmp_path):
  """As Swin-Unet starts from ImageNet Swin: the encoder from the checkpoint,
  the decoder and per-pixel head fresh, the classifier's norm and head unused."""
  source = timm_swin(img_size=32, num_classes=10, **SMALL)
  path = str(tmp_path / 'classifier.pth')
  torch.save(source.state_dict(), path)
  config = _finetune_config(name='unet', in_chans=3, num_classes=5)
  config.task = 'segmentation'
  fresh = flat(trainer.init_model(config)[2])
  loaded = flat(trainer.init_model(config, init_from=path)[2])
  converted = interop.from_timm(numpy_state_dict(source))
  for key, value in loaded.items():
    expected = converted[key] if key.startswith('encoder.') else fresh[key]
    np.testing.assert_array_equal(value, expected, err_msg=key)
  assert any(k.startswith('decoder.') for k in loaded)


def test_export_to_timm_refuses_global_attention(tmp_path):
  model = our_swin('cifar_small', img_size=32, global_attention=(1,))
  with pytest.raises(ValueError, match=r'stage 1 attends globally over its 8x8 tokens '
                                       r'\(model.global_attention\), where timm attends in 4x4'):
    interop.save_weights(model, str(tmp_path / 'global.pth'))


def test_timm_training_checkpoints_load(tmp_path):
  """timm's train.py writes x.pth.tar holding 'state_dict' and its argparse args."""
  import argparse
  source = timm_swin(img_size=32, num_classes=10, **SMALL)
  path = str(tmp_path / 'model_best.pth.tar')
  torch.save({'epoch': 3, 'state_dict': source.state_dict(),
              'args': argparse.Namespace(lr=1e-3)}, path)
  model = our_swin('cifar_small', img_size=32)
  interop.load_weights(model, path)
  assert_same_logits(source, model, 32)


def test_a_checkpoint_of_another_architecture_names_the_file_briefly(tmp_path):
  source = timm_swin(img_size=32, num_classes=10, **SMALL)
  path = str(tmp_path / 'small.pth')
  torch.save(source.state_dict(), path)
  with pytest.raises(ValueError) as error:
    interop.load_weights(our_swin('swin_t', img_size=32, num_classes=10), path)
  message = str(error.value)
  assert message.startswith(f'{path}: Checkpoint does not fit the model') and 'model.*' in message
  assert len(message) < 2500 and 'more)' in message
