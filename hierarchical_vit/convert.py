r"""Converts Swin weights between timm, the official Swin-Transformer and ours.

The model a preset (plus overrides) describes checks the conversion: every
parameter must be present with its shape. The input format follows its
suffix (.npz ours; .pth/.pt/.bin/.safetensors timm or official, told apart by
their keys), and so does the output's (.npz ours; .pth/.safetensors timm).

  # timm / official checkpoint -> ours (for config.train.init_from):
  python -m hierarchical_vit.convert --input=swin_tiny_patch4_window7_224.pth \
      --output=swin_t.npz --preset=swin_t
  # ours -> timm (loads with timm.create_model(...).load_state_dict(strict=True)):
  python -m hierarchical_vit.convert --input=swin_t.npz --output=swin_t.safetensors \
      --preset=swin_t
  # a CIFAR-scale model: override the preset's fields.
  python -m hierarchical_vit.convert --input=ours.npz --output=timm.pth \
      --preset=cifar_small --num_classes=100
  # a train.py run (its config.json is the architecture; the weights eval.py
  # uses, EMA where the run kept one): latest, a --step, or --step=best.
  python -m hierarchical_vit.convert --workdir=workdirs/run1 --output=run1.safetensors

Weights carry no activation: timm's and the official Swin use the exact (erf)
GELU, so a model trained with model.gelu_approximate=True (the tanh form, as
configs/cifar.py does) gives logits that differ at ~1e-3 in timm.
"""

import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging
from flax import nnx

from configs import base
from hierarchical_vit import cli
from hierarchical_vit import interop
from hierarchical_vit.models import build_model
from hierarchical_vit.presets import PRESETS, apply_preset
from hierarchical_vit.training import trainer

# Overrides of the preset's config.model fields (flags of the same names); None
# keeps the preset's value.
_OVERRIDE_FIELDS = ('num_classes', 'img_size', 'in_chans', 'window_size', 'patch_size',
                    'embed_dim', 'depths', 'num_heads', 'mlp_ratio', 'qkv_bias')


def model_config(preset: str, **overrides: object) -> ml_collections.ConfigDict:
  """config.model for a preset with overridden fields (None = keep the preset's)."""
  config = apply_preset(base.get_model_config(), preset)
  config.update({k: v for k, v in overrides.items() if v is not None})
  return config


def convert(input_path: str, output_path: str, config: ml_collections.ConfigDict) -> None:
  """Reads input_path strictly into the model config describes; writes output_path."""
  model = build_model(config, rngs=nnx.Rngs(0))
  interop.load_weights(model, input_path)
  interop.save_weights(model, output_path)


def export_run(workdir: str, output_path: str, step: int | str = -1) -> None:
  """Writes checkpoint `step` of a train.py run (the weights eval.py uses) to output_path."""
  trained = trainer.restore_trained(trainer.load_config(workdir), workdir, step)
  interop.save_weights(trained.model(), output_path)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  if args.workdir is not None:
    export_run(args.workdir, args.output, cli.checkpoint_step('--step', args.step))
    logging.info('Wrote %s.', args.output)
    return
  overrides = {name: args[name].value for name in _OVERRIDE_FIELDS}
  for name in ('depths', 'num_heads'):
    if overrides[name] is not None:
      overrides[name] = tuple(int(v) for v in overrides[name])
  convert(args.input, args.output, model_config(args.preset, **overrides))
  logging.info('Wrote %s.', args.output)


# Each mode's flags are refused in the other, not silently ignored: a run's
# checkpoint carries its own architecture, and a weights file has no steps.
def workdir_takes_no_model_flags(values: dict[str, Any]) -> bool:
  return values['workdir'] is None or (
      values['preset'] == 'swin_t' and all(values[name] is None for name in _OVERRIDE_FIELDS))


def input_takes_no_step(values: dict[str, Any]) -> bool:
  return values['input'] is None or values['step'] == '-1'


def _ints(values: list[str] | None) -> bool:
  return values is None or all(v.strip().isdigit() for v in values)


def define_flags() -> None:
  """The CLI's flags; defined when run, not at import, since importers (the
  tests, scripts beside eval.py) have flags of their own (--workdir, --step)."""
  flags.DEFINE_string('input', None, 'Weights to read (or --workdir).')
  flags.DEFINE_string('workdir', None, 'A train.py run to export (or --input).')
  flags.DEFINE_string('step', '-1', "With --workdir: a saved step, -1 = the latest, "
                      "'best' = the kept best.")
  flags.DEFINE_string('output', None, 'Weights to write.', required=True)
  flags.DEFINE_enum('preset', 'swin_t', sorted(PRESETS), 'Architecture (--input).')
  flags.DEFINE_integer('num_classes', None, 'Classes of the head.')
  flags.DEFINE_integer('img_size', None, 'Input height = width.')
  flags.DEFINE_integer('in_chans', None, 'Input channels (e.g. 1 for Fashion-MNIST models).')
  flags.DEFINE_float('mlp_ratio', None, 'MLP width / model width.')
  flags.DEFINE_boolean('qkv_bias', None, 'Whether q, k, v have biases.')
  flags.DEFINE_integer('window_size', None, 'Attention window.')
  flags.DEFINE_integer('patch_size', None, 'Stem stride.')
  flags.DEFINE_integer('embed_dim', None, 'Width of stage 0.')
  flags.DEFINE_list('depths', None, 'Blocks per stage, e.g. 2,2,6,2.')
  flags.DEFINE_list('num_heads', None, 'Heads per stage, e.g. 3,6,12,24.')
  flags.register_validator('input', lambda path: path is None or os.path.isfile(path),
                           message='--input: no such file.')
  flags.register_multi_flags_validator(
      ['input', 'workdir'], lambda f: (f['input'] is None) != (f['workdir'] is None),
      message='Give exactly one of --input (a weights file) and --workdir (a train.py run).')
  flags.register_multi_flags_validator(
      ['workdir', 'preset', *_OVERRIDE_FIELDS], workdir_takes_no_model_flags,
      message='With --workdir the architecture is the run\'s own: drop --preset and the '
      f'model flags (--{", --".join(_OVERRIDE_FIELDS)}).')
  flags.register_multi_flags_validator(
      ['input', 'step'], input_takes_no_step,
      message='--step selects a checkpoint of --workdir; a weights file (--input) has none.')
  flags.register_validator('depths', _ints, message='--depths must be comma-separated ints, '
                           'e.g. 2,2,6,2.')
  flags.register_validator('num_heads', _ints, message='--num_heads must be comma-separated '
                           'ints, e.g. 3,6,12,24.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
