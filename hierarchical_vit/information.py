r"""Does pooling lose information that patch merging keeps? A linear-inverse test.

A 2x2 stride-2 downsampler maps each input block x[2i:2i+2, 2j:2j+2] (4C
values) to one output token (i, j). We fit, by least squares on training
images, the best affine map from output tokens back to their input blocks and
report on held-out images the relative reconstruction error

    ||X - X_hat||_F / ||X - mean(X)||_F

(0: the output determines the input; 1: no better than the mean block).
Centring makes the number independent of the data's normalization.

Each downsampler is represented by its parameter-free resampling, or, where
its reduction is learned, by the best any learned map of its shape can do:

  space_to_depth       the 2x2 rearrangement alone (4C): lossless.
  patch_merge, conv    rearrangement + linear 4C -> 2C (Swin's reduction; a
                       kernel-2 conv is the same map): the best such map keeps
                       the top 2C principal components of the blocks, so PCA
                       bounds what any trained weights keep. Full rank 4C -> 2C
                       still drops half of the dimensions: not lossless.
                       (Their LayerNorm, which removes each token's mean and
                       scale, is left out: it acts on the 4C or 2C features,
                       where it costs 2 of 4C dimensions.)
  avg_pool, max_pool   the 2x2 mean / maximum per channel (C).
  depthwise_conv_pool  PiT: per channel, 2 learned linear maps of the 3x3
                       window around the block; reduced-rank regression
                       (rank 2) per channel, each channel's block rebuilt from
                       its own 2 features: the bound at C = 1; above, an
                       upper bound, as an inverse could also read the other
                       channels' features (and a joint fit has no closed form).
  blur_merge           a 3-tap binomial blur, then merging: the best rank-2C
                       map of the blurred block (reduced-rank regression);
                       never below patch_merge's PCA bound.
  blur_pool,           the 3-tap binomial blur at stride 2 (C), after the
  max_blur_pool        2x2 maximum at stride 1 for max_blur_pool.
  soft_pool            the 2x2 softmax-weighted mean per channel (C).
  conv_max_pool        NesT: the 3x3 maximum at stride 2 per channel (C), with
                       its learned 3x3 conv left out: a reference point, not
                       a bound (the conv may keep more or less).

  python -m hierarchical_vit.information \
      --config=configs/ablations/downsample.py:fashion_mnist \
      --config.data.data_dir=data \
      --output=docs/results/downsample_fashion_mnist/information.json

With the output next to a sweep's results, `hierarchical_vit.ablate` adds the
pixel errors to results.md beside accuracy. `--run_dirs=WORKDIR/runs/NAME,...`
also measures trained models: the same on their stage-0 features (the first
downsampler's real input) and their own trained first downsampler.
"""

import os
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from hierarchical_vit import cli, data, files, resampling
from hierarchical_vit.resampling import antialias, downsample
from hierarchical_vit.training import trainer

Array = np.ndarray


def blocks(x: Array) -> Array:
  """(N, H, W, C), H and W even -> (N, H/2, W/2, 4C): the 2x2 blocks each
  output token is reconstructed to, in Swin's channel order (space_to_depth
  stays in numpy and float64 here)."""
  if x.shape[1] % 2 or x.shape[2] % 2:
    raise ValueError(f'blocks needs even height and width, got shape {x.shape}')
  return resampling.space_to_depth(x)


def pool(x: Array, reduce: Callable[..., Array]) -> Array:
  """2x2 stride-2 pooling of (N, H, W, C) with reduce = np.mean, np.max or _soft_mean."""
  n, h, w, c = x.shape
  return reduce(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _windows3(x: Array) -> Array:
  """(N, H, W, C) -> (N, H/2, W/2, 9, C): 3x3 windows at stride 2, zero padding 1
  (the receptive field of a kernel-3, stride-2, padding-1 convolution)."""
  n, h, w, c = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return np.stack([padded[:, dy:dy + h:2, dx:dx + w:2] for dy in range(3) for dx in range(3)],
                  axis=3)


def _tokens(x: Array) -> Array:
  """(..., D) -> (rows, D) float64."""
  return x.reshape(-1, x.shape[-1]).astype(np.float64)


def fit_linear_inverse(outputs: Array, targets: Array) -> Array:
  """Least-squares affine map (rows, D) -> (rows, T): (D + 1, T), bias last."""
  design = np.concatenate([outputs, np.ones((len(outputs), 1))], axis=1)
  return np.linalg.lstsq(design, targets, rcond=None)[0]


def apply_linear(weights: Array, outputs: Array) -> Array:
  return outputs @ weights[:-1] + weights[-1]


def relative_error(targets: Array, predictions: Array) -> float:
  """||targets - predictions||_F / ||targets - column means||_F."""
  return float(np.linalg.norm(targets - predictions)
               / np.linalg.norm(targets - targets.mean(0)))


def reconstruction_error(down: Callable[[Array], Array], train: Array, test: Array) -> float:
  """Relative error of the best affine inverse of a parameter-free `down`
  ((N, H, W, C) -> (N, H/2, W/2, D)), fitted on train, measured on test."""
  weights = fit_linear_inverse(_tokens(down(train)), _tokens(blocks(train)))
  return relative_error(_tokens(blocks(test)), apply_linear(weights, _tokens(down(test))))


def pca_error(train: Array, test: Array, rank_per_channel: int = 2) -> float:
  """Best linear 4C -> rank*C reduction (top principal components of the
  blocks), then its best inverse (the same components)."""
  x_train, x_test = _tokens(blocks(train)), _tokens(blocks(test))
  mean = x_train.mean(0)
  components = np.linalg.svd(x_train - mean, full_matrices=False)[2]
  basis = components[:rank_per_channel * train.shape[-1]]
  reconstruction = (x_test - mean) @ basis.T @ basis + mean
  return relative_error(x_test, reconstruction)


def _reduced_rank_prediction(x_train: Array, y_train: Array, x_test: Array, rank: int) -> Array:
  """Reduced-rank regression: the OLS fit of y on x, projected onto the top
  `rank` principal directions of its training predictions; applied to x_test."""
  weights = fit_linear_inverse(x_train, y_train)
  fitted = apply_linear(weights, x_train)
  directions = np.linalg.svd(fitted - fitted.mean(0), full_matrices=False)[2][:rank]
  return (apply_linear(weights, x_test) - fitted.mean(0)) @ directions.T @ directions + fitted.mean(0)


def reduced_rank_error(train: Array, test: Array, rank: int = 2) -> float:
  """Per channel: the best rank-`rank` linear map of the 3x3 window, then its
  best inverse to the channel's 2x2 block (from that channel's features only:
  an upper bound of depthwise_conv_pool's loss at C > 1, see the module
  docstring)."""
  squared, total = 0.0, 0.0
  for c in range(train.shape[-1]):
    x_train = _tokens(_windows3(train[..., c:c + 1])[..., 0])
    y_train = _tokens(blocks(train[..., c:c + 1]))
    x_test = _tokens(_windows3(test[..., c:c + 1])[..., 0])
    y_test = _tokens(blocks(test[..., c:c + 1]))
    prediction = _reduced_rank_prediction(x_train, y_train, x_test, rank)
    squared += np.sum((y_test - prediction) ** 2)
    total += np.sum((y_test - y_test.mean(0)) ** 2)
  return float(np.sqrt(squared / total))


def _blur(x: Array, stride: int = 1) -> Array:
  """The anti-aliased downsamplers' default binomial blur (3 taps) in numpy."""
  return np.asarray(antialias.blur(x, 3, stride), np.float64)


def _soft_mean(x: Array, axis: tuple[int, ...]) -> Array:
  """SoftPool's reduction: sum e^x x / sum e^x over `axis`."""
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return (e * x).sum(axis=axis) / e.sum(axis=axis)


def _max_3x3_stride_2(x: Array) -> Array:
  """conv_max_pool's pooling on even sizes: the maximum of rows 2i..2i+2 and
  columns 2j..2j+2, the last ones edge-padded (padding never wins)."""
  _, h, w, _ = x.shape
  x = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), mode='edge')
  return np.max([x[:, dy:dy + h:2, dx:dx + w:2] for dy in range(3) for dx in range(3)], axis=0)


def blurred_merge_error(train: Array, test: Array) -> float:
  """blur_merge: the best rank-2C linear map of the blurred 2x2 block (4C),
  then its best inverse to the original block."""
  prediction = _reduced_rank_prediction(_tokens(blocks(_blur(train))), _tokens(blocks(train)),
                                        _tokens(blocks(_blur(test))), 2 * train.shape[-1])
  return relative_error(_tokens(blocks(test)), prediction)


def downsampler_errors(train: Array, test: Array) -> dict[str, float]:
  """Relative reconstruction error per DOWNSAMPLERS name (see module docstring)."""
  merge = pca_error(train, test)
  return {
      'space_to_depth': reconstruction_error(blocks, train, test),
      'patch_merge': merge,
      'conv': merge,
      'avg_pool': reconstruction_error(lambda x: pool(x, np.mean), train, test),
      'max_pool': reconstruction_error(lambda x: pool(x, np.max), train, test),
      'depthwise_conv_pool': reduced_rank_error(train, test),
      'blur_merge': blurred_merge_error(train, test),
      'blur_pool': reconstruction_error(lambda x: _blur(x, stride=2), train, test),
      'max_blur_pool': reconstruction_error(
          lambda x: np.asarray(downsample.max_blur_pool(x), np.float64), train, test),
      'soft_pool': reconstruction_error(lambda x: pool(x, _soft_mean), train, test),
      'conv_max_pool': reconstruction_error(_max_3x3_stride_2, train, test),
  }


def stage0_features(encoder: nnx.Module) -> Callable[[Array], jax.Array]:
  """Jitted images (N, H, W, C) -> stage 0's output, the first downsampler's input."""
  return jax.jit(lambda x: encoder.stages[0](encoder.stem(x)))


def trained_errors(run_dir: str, train: Array, test: Array) -> dict[str, float]:
  """The measure on a trained model's stage-0 features (the first downsampler's
  real input) instead of pixels: every parameter-free downsampler, plus
  'trained' = the run's own first downsampler module with its learned weights."""
  model = trainer.restore_trained(trainer.load_config(run_dir), run_dir).model()
  encoder = model.encoder
  features = stage0_features(encoder)
  down = jax.jit(lambda x: encoder.downsamplers[0](x))
  f_train, f_test = np.asarray(features(train)), np.asarray(features(test))
  errors = downsampler_errors(f_train, f_test)
  errors['trained'] = reconstruction_error(lambda x: np.asarray(down(x)), f_train, f_test)
  return errors


def _print_table(title: str, errors: dict[str, float]) -> None:
  print(title)
  for name, error in errors.items():
    print(f'  {name:>20}: {error:.4f}')


# The data fields that decide what images a model sees at evaluation.
_IMAGE_FIELDS = ('name', 'image_size', 'resize_mode', 'mean', 'std')


def check_runs_match(config: ml_collections.ConfigDict, run_dirs: Sequence[str]) -> None:
  """ValueError unless every run trained on the images config gives (data set,
  size, resize and normalization): they are loaded once, from config, for all."""
  image_fields = lambda c: {f: tuple(v) if isinstance(v, (list, tuple)) else v
                            for f, v in ((f, c.data[f]) for f in _IMAGE_FIELDS)}
  want = image_fields(config)
  for run_dir in run_dirs:
    got = image_fields(trainer.load_config(run_dir))
    diffs = [f'data.{f}={got[f]!r} (--config: {want[f]!r})' for f in _IMAGE_FIELDS
             if got[f] != want[f]]
    if diffs:
      raise ValueError(
          f'--run_dirs: {run_dir} trained with {", ".join(diffs)}; measure it with its own '
          f'config (--config=configs/saved.py:{run_dir}).')


def main(argv):
  del argv
  config = _CONFIG.value
  run_dirs = cli.expand_run_dirs(_RUN_DIRS.value)
  check_runs_match(config, run_dirs)  # Before the measures, which take minutes.
  train = data.load_eval_examples(config.data, config.data.train_split, _NUM_TRAIN.value)[0]
  test = data.load_eval_examples(config.data, config.data.eval_split, _NUM_TEST.value)[0]
  result = {'data': config.data.name, 'input_shape': train.shape[1:],
            'num_train': len(train), 'num_test': len(test),
            'measure': 'relative error of the best affine inverse on held-out images '
                       '(see hierarchical_vit/information.py)',
            'errors': downsampler_errors(train, test), 'trained': {}}
  _print_table('Pixels:', result['errors'])
  for run_dir in run_dirs:
    name = os.path.basename(os.path.normpath(run_dir))
    result['trained'][name] = trained_errors(run_dir, train, test)
    _print_table(f'Stage-0 features of {name}:', result['trained'][name])
  if _OUTPUT.value:
    files.write_json(_OUTPUT.value, result)
    print(f'Wrote {_OUTPUT.value}')

if __name__ == '__main__':
  # Defined here, not at import, so that the library functions above can be
  # imported next to other modules' flags.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment (or sweep) config.')
  flags.mark_flag_as_required('config')
  _OUTPUT = flags.DEFINE_string('output', '', 'Where to write the JSON result (optional).')
  _NUM_TRAIN = flags.DEFINE_integer('num_train', 2000, 'Training-split images to fit on.',
                                    lower_bound=1)
  _NUM_TEST = flags.DEFINE_integer('num_test', 1000, 'Held-out eval-split images to measure on.',
                                   lower_bound=1)
  _RUN_DIRS = flags.DEFINE_list(
      'run_dirs', [], 'Finished runs or glob patterns (e.g. WORKDIR/runs/avg_pool-seed0) '
      'whose stage-0 features and trained first downsampler to measure too.')
  app.run(main, flags_parser=cli.parse_flags)
