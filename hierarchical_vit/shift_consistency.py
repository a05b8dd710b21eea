r"""Shift consistency (Zhang 2019): does a prediction survive small input shifts?

Subsampling without a low-pass filter aliases, so a hierarchical model's output
can change when its input moves by a pixel. Zhang's measure, *consistency*, is
the fraction of held-out images whose predicted class is the same for two
random shifts of the image. How an image is shifted (`--shift`):

  circular  jnp.roll: the image keeps its size and what leaves one edge
            re-enters at the other. Keep max_shift within the images' blank
            border, so that only background wraps: the Fashion-MNIST configs
            pad 28x28 to 32x32 with 2 black pixels per side, hence the
            default 2 (at 4, objects that fill the 28 pixels would wrap).
  edge      translation, what enters filled with the nearest edge pixel (no
            seam, but what leaves is lost): for natural images at their
            stored size (CIFAR).
  crop      Zhang's ImageNet protocol: shifted crops of a wider view. Each
            image is loaded max_shift pixels wider per side at the eval scale
            (data.load_eval_examples' margin), and the model sees its
            image_size crops; offset (0, 0) is the usual centre view. For
            ImageNet at 224, max_shift=16 gives Zhang's random 224 crops of
            the 256 resize. Fixed-size data (resize_mode 'pad') get a black
            margin, with real pixels only where the stored image is larger
            than image_size.

Offsets are drawn uniformly from {-max_shift, ..., max_shift} per axis and
image, from `seed`, so every run is measured on the same shifted images.

Per run, on the first `num_images` images of the eval split:

  consistency       P(class(shift_a(x)) == class(shift_b(x)))
  accuracy          top-1 on x
  shifted_accuracy  top-1 on shift_a(x) and shift_b(x), averaged
  diagonal          [P(class(shift(x, (s, s))) == class(x)) for s = 1..max_shift]

and per variant (runs named `<variant>-seed<seed>`, as hierarchical_vit.ablate
names them) the mean and standard deviation over seeds.

  python -m hierarchical_vit.shift_consistency \
      --run_dirs='workdirs/antialias/runs/*' \
      --output=docs/results/antialias_fashion_mnist_2ep/shift_consistency.json
  # Zhang's ImageNet protocol:
  python -m hierarchical_vit.shift_consistency --run_dirs=workdirs/swin_t \
      --shift=crop --max_shift=16 --num_images=50000
"""

import collections
import dataclasses
import json
import os
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from hierarchical_vit import cli, data, files
from hierarchical_vit.analysis import stats
from hierarchical_vit.training import trainer

Array = np.ndarray
METRICS = ('consistency', 'accuracy', 'shifted_accuracy')


def roll_images(images: Array, dy: Array, dx: Array) -> jax.Array:
  """Circular shift of each image: images (N, H, W, C), dy and dx (N,) ints;
  out[n] = roll(images[n], (dy[n], dx[n]), axes (H, W))."""
  roll = lambda image, a, b: jnp.roll(image, (a, b), axis=(0, 1))
  return jax.vmap(roll)(jnp.asarray(images), jnp.asarray(dy), jnp.asarray(dx))


def crop_views(canvases: Array, dy: Array, dx: Array, margin: int) -> jax.Array:
  """The views of each canvas moved by (dy[n], dx[n]): canvases (N, H + 2 margin,
  W + 2 margin, C) -> (N, H, W, C), out[n, y, x] = canvases[n, margin + y - dy[n],
  margin + x - dx[n]]; |dy|, |dx| <= margin."""
  size = (canvases.shape[1] - 2 * margin, canvases.shape[2] - 2 * margin, canvases.shape[3])
  crop = lambda canvas, a, b: jax.lax.dynamic_slice(canvas, (margin - a, margin - b, 0), size)
  return jax.vmap(crop)(jnp.asarray(canvases), jnp.asarray(dy), jnp.asarray(dx))


def translate_images(images: Array, dy: Array, dx: Array, margin: int) -> jax.Array:
  """Each image moved by (dy[n], dx[n]) pixels, |dy|, |dx| <= margin, what
  leaves lost and what enters filled with the nearest edge pixel: out[n, y, x] =
  images[n, clip(y - dy[n]), clip(x - dx[n])]."""
  padded = jnp.pad(jnp.asarray(images), ((0, 0), (margin, margin), (margin, margin), (0, 0)),
                   mode='edge')
  return crop_views(padded, dy, dx, margin)


@dataclasses.dataclass(frozen=True)
class Shift:
  """move(images, dy, dx, max_shift) -> the shifted model inputs; with_margin:
  whether images come max_shift pixels wider per side than those inputs;
  description: what a shift is, in results tables."""
  move: Callable[[Array, Array, Array, int], jax.Array]
  with_margin: bool
  description: str


# The module docstring's --shift choices.
SHIFTS = {
    'circular': Shift(lambda images, dy, dx, _: roll_images(images, dy, dx), False,
                      'circular shifts'),
    'edge': Shift(translate_images, False, 'translations (edge pixels fill in)'),
    'crop': Shift(crop_views, True, "crops of a wider view (Zhang's ImageNet protocol)"),
}


def random_offsets(num_images: int, max_shift: int, seed: int) -> Array:
  """(2 draws, 2 axes, num_images) ints, uniform in [-max_shift, max_shift]."""
  if max_shift < 1:
    raise ValueError(f'max_shift={max_shift} must be at least 1 pixel')
  rng = np.random.default_rng(seed)
  return rng.integers(-max_shift, max_shift + 1, size=(2, 2, num_images))


def _agreements(classify: Callable[[jax.Array], Array], images: Array, labels: Array,
                offsets: Array, max_shift: int, shift: str) -> dict[str, Array]:
  """Per image: whether the plain and the two shifted predictions are right,
  whether the shifted two agree, and whether each diagonal shift (s, s)
  keeps the plain prediction ('diagonal': (max_shift, N))."""
  same = np.ones(len(images), int)
  move = lambda s_y, s_x: SHIFTS[shift].move(images, s_y, s_x, max_shift)
  plain = classify(move(0 * same, 0 * same))
  a, b = (classify(move(dy, dx)) for dy, dx in offsets)
  return {'consistency': a == b, 'accuracy': plain == labels,
          'shifted_accuracy': ((a == labels).astype(float) + (b == labels)) / 2,
          'diagonal': np.stack([classify(move(s * same, s * same)) == plain
                                for s in range(1, max_shift + 1)])}


def shift_metrics(classify: Callable[[jax.Array], Array],
                  examples: Iterable[tuple[Array, Array]], num_images: int, max_shift: int,
                  seed: int = 0, shift: str = 'circular') -> dict:
  """The module docstring's measures for one classifier over `num_images`
  examples, read as (images, labels) chunks in order (so that a large eval
  set is never in memory at once): classify maps model inputs (N, H, W, C)
  to predicted classes (N,); shift names a SHIFTS entry; images are (N, H, W,
  C), or max_shift pixels wider per side for a shift with_margin. Each image
  gets its offsets by its position, whatever the chunks."""
  if shift not in SHIFTS:
    raise ValueError(f'shift={shift!r} is not one of {sorted(SHIFTS)}')
  offsets = random_offsets(num_images, max_shift, seed)
  parts, start = [], 0
  for images, labels in examples:
    stop = start + len(images)
    parts.append(_agreements(classify, images, labels, offsets[..., start:stop], max_shift,
                             shift))
    start = stop
  if start != num_images:
    raise ValueError(f'num_images={num_images} but the examples held {start}')
  joined = {k: np.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}
  return {**{m: float(np.mean(joined[m])) for m in METRICS},
          'diagonal': [float(v) for v in joined['diagonal'].mean(axis=1)]}


def classifier(trained: trainer.Trained, batch_size: int = 500) -> Callable[[jax.Array], Array]:
  """Predicted classes of a restored classifier, in batches of batch_size
  (the last one padded, so one program serves every call)."""
  def classify(images: jax.Array) -> Array:
    out = []
    for start in range(0, len(images), batch_size):
      chunk = jnp.asarray(images[start:start + batch_size])
      pad = batch_size - len(chunk)
      chunk = jnp.pad(chunk, ((0, pad),) + ((0, 0),) * (chunk.ndim - 1))
      out.append(np.asarray(trained.predict(chunk))[:batch_size - pad])
    return np.concatenate(out)
  return classify


def by_variant(runs: dict[str, dict]) -> dict[str, dict]:
  """Mean and sample standard deviation over a variant's seeds of each METRIC."""
  groups = collections.defaultdict(list)
  for name, result in runs.items():
    groups[name.rsplit('-seed', 1)[0]].append(result)
  summary = {}
  for variant, results in groups.items():
    summary[variant] = {'num_runs': len(results)}
    for metric in METRICS:
      summary[variant][metric], summary[variant][f'{metric}_std'] = stats.mean_std(
          [r[metric] for r in results])
  return summary


def markdown_table(summary: dict[str, dict]) -> str:
  lines = ['| variant | runs | consistency (%) | accuracy (%) | shifted accuracy (%) |',
           '|---|---|---|---|---|']
  for variant, s in summary.items():
    cells = [stats.mean_std_text(s[m], s[f'{m}_std'], s['num_runs'], lambda x: f'{100 * x:.2f}')
             for m in METRICS]
    lines.append(f"| {variant} | {s['num_runs']} | " + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def classifier_config(run_dir: str) -> ml_collections.ConfigDict:
  """The config of a classification run; ValueError for another task."""
  config = trainer.load_config(run_dir)
  if config.task != 'classification':
    raise ValueError(f'{run_dir}: task={config.task!r}; shift consistency needs a classifier')
  return config


def measure_run(run_dir: str, num_images: int, max_shift: int, seed: int = 0,
                shift: str = 'circular') -> dict:
  """shift_metrics of a finished classification run (its latest checkpoint,
  EMA weights if it kept them), plus the checkpoint's 'step'."""
  config = classifier_config(run_dir)
  margin = max_shift if SHIFTS[shift].with_margin else 0
  # The offsets are drawn for the images there are: as many as asked, or the split.
  count = min(num_images, data.get_dataset_info(config.data).num_eval_examples)
  examples = data.iter_eval_examples(config.data, config.data.eval_split, count, margin)
  trained = trainer.restore_trained(config, run_dir)
  return {**shift_metrics(classifier(trained), examples, count, max_shift, seed, shift),
          'step': trained.step, 'num_images': count}


def main(argv):
  del argv
  runs = {}
  run_dirs = cli.expand_run_dirs(_RUN_DIRS.value)
  for run_dir in run_dirs:  # All refused up front, not after minutes of measuring.
    classifier_config(run_dir)
  for run_dir in run_dirs:
    name = os.path.basename(os.path.normpath(run_dir))
    runs[name] = measure_run(run_dir, _NUM_IMAGES.value, _MAX_SHIFT.value, _SEED.value,
                             _SHIFT.value)
    print(name, json.dumps(runs[name]), flush=True)
  summary = by_variant(runs)
  print(markdown_table(summary))
  if _OUTPUT.value:
    files.write_json(_OUTPUT.value, {
        # What every run was measured on: --num_images, or a smaller split.
        'num_images': min(run['num_images'] for run in runs.values()),
        'max_shift': _MAX_SHIFT.value, 'seed': _SEED.value,
        'shift': _SHIFT.value, 'runs': runs, 'variants': summary})
    print(f'Wrote {_OUTPUT.value}')


if __name__ == '__main__':
  # Defined here, not at import, so that the functions above can be imported
  # next to other modules' flags.
  _RUN_DIRS = flags.DEFINE_list(
      'run_dirs', None, 'Finished classification runs (train.py workdirs), or glob '
      "patterns such as 'WORKDIR/runs/*'.", required=True)
  _NUM_IMAGES = flags.DEFINE_integer('num_images', 2000, 'Eval-split images to measure on.',
                                     lower_bound=1)
  _MAX_SHIFT = flags.DEFINE_integer(
      'max_shift', 2, 'Largest shift, in pixels, per axis (circular: within the blank '
      'border; crop: 16 for ImageNet at 224).', lower_bound=1)
  _SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random offsets.')
  _SHIFT = flags.DEFINE_enum('shift', 'circular', sorted(SHIFTS),
                             'circular (wrap around), edge (translate, fill with the edge) '
                             'or crop (crops of a wider view).')
  _OUTPUT = flags.DEFINE_string('output', '', 'Where to write the JSON result (optional).')
  app.run(main)
