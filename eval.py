r"""Evaluates a checkpoint of a workdir on a data split.

  python eval.py --workdir=workdirs/run1 [--step=1000|best] [--split=test]

Writes eval_<split>_<step>.json and confusion_<split>_<step>.png into the
workdir and prints the headline metrics; what the JSON holds depends on
config.task:
  classification: top-1, top-5, loss, per-class accuracy, confusion matrix;
  segmentation:   mIoU, pixel accuracy, loss, per-class IoU, pixel confusion
                  matrix, plus overlay_<split>_<step>_<i>.png (input, ground
                  truth, prediction, colour-coded) for --num_overlays images.
The config is the workdir's config.json (written by train.py) unless --config
is given; --config=configs/saved.py:WORKDIR loads that same config.json and
takes --config.* overrides (e.g. --config.train.eval_batch_size=64). Uses the
EMA weights when the run kept them. A --config of another model or EMA setting
than the run's is refused (trainer.check_evaluable).

Multi-process, as train.py (every process runs the same command; each reads
its share of the split, process 0 writes the files; docs/scaling.md):

  python eval.py --workdir=... --coordinator_address=host0:1234 \
      --num_processes=2 --process_id=$i
"""

# pylint: disable=wrong-import-position
from hierarchical_vit import tcmalloc

if __name__ == '__main__':
  # Before the imports below: the re-executed process imports them again,
  # and jax, tfds, orbax and tensorboardX (torch, where installed) take ~4 s.
  tcmalloc.reexec_with_tcmalloc()

import dataclasses
import os
from collections.abc import Callable

import jax
import matplotlib
matplotlib.use('Agg')  # Headless: write PNGs, never open a window.
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from absl import app
from absl import flags
from matplotlib import patches
from ml_collections import config_flags

from hierarchical_vit import cli
from hierarchical_vit import data
from hierarchical_vit import files
from hierarchical_vit import parallel
from hierarchical_vit.training import tasks
from hierarchical_vit.training import trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file; default: the workdir\'s config.json.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir.',
                               required=True)
_STEP = flags.DEFINE_string(
    'step', '-1', "Checkpoint step; -1 = the latest, 'best' = the kept best by the task's "
    'metric on data.eval_split (select on a held-out split, not on test: configs/base.py).')
_SPLIT = flags.DEFINE_string('split', '', "Split; '' = config.data.eval_split.")
_NUM_OVERLAYS = flags.DEFINE_integer(
    'num_overlays', 4, 'Segmentation: eval images to write overlay PNGs for.')
_INITIALIZE_DISTRIBUTED = cli.define_distributed_flags()


def plot_confusion(confusion: np.ndarray, class_names: tuple[str, ...],
                   title: str, path: str) -> None:
  """Row-normalized confusion matrix (rows: true class) as a PNG."""
  rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  # At most 30 inches (3000 pixels): 0.4 per class would make ImageNet's 40000.
  size = min(max(6, 0.4 * len(class_names)), 30)
  fig, ax = plt.subplots(figsize=(size, size))
  ax.imshow(rates, cmap='Blues', vmin=0, vmax=1)
  if len(class_names) <= 30:  # Beyond that, tick labels are unreadable.
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=90)
    ax.set_yticks(ticks, class_names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(title)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)
  plt.close(fig)


def class_colours(num_classes: int) -> np.ndarray:
  """Distinct RGB colours in [0, 1] per class: (num_classes, 3)."""
  if num_classes > 20:
    return plt.get_cmap('hsv')(np.arange(num_classes) / num_classes)[:, :3]
  # tab20 pairs a dark and a light shade per hue: all dark shades first.
  order = [*range(0, 20, 2), *range(1, 20, 2)][:num_classes]
  return np.asarray(plt.get_cmap('tab20').colors)[order]


def colourize(image: np.ndarray, labels: np.ndarray, colours: np.ndarray,
              alpha: float = 0.5) -> np.ndarray:
  """Blends class colours over an image; IGNORE_INDEX pixels are white.

  image: float (H, W, 3) in [0, 1]; labels: int (H, W) -> float (H, W, 3).
  """
  known = labels < len(colours)
  tint = np.where(known[..., None], colours[np.where(known, labels, 0)], 1.0)
  return (1 - alpha) * image + alpha * tint


def _displayable(image: np.ndarray) -> np.ndarray:
  """A normalized (H, W, C) image, min-max scaled to [0, 1], as RGB."""
  image = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def plot_overlay(image: np.ndarray, truth: np.ndarray, predicted: np.ndarray,
                 class_names: tuple[str, ...], path: str) -> None:
  """Input | ground truth | prediction (colour-coded over the input) as a PNG.

  image: normalized float (H, W, C); truth, predicted: int (H, W).
  """
  colours = class_colours(len(class_names))
  rgb = _displayable(image)
  fig, axes = plt.subplots(1, 3, figsize=(10, 3.8))
  panels = (('input', rgb), ('ground truth', colourize(rgb, truth, colours)),
            ('prediction', colourize(rgb, predicted, colours)))
  for ax, (title, picture) in zip(axes, panels):
    ax.imshow(picture, interpolation='nearest')
    ax.set_title(title)
    ax.axis('off')
  shown = sorted(set(np.unique(truth)) | set(np.unique(predicted)))
  handles = [patches.Patch(color=colours[k], label=class_names[k])
             for k in shown if k < len(class_names)]
  fig.legend(handles=handles, loc='lower center', ncol=min(len(handles), 6),
             fontsize='small')
  fig.tight_layout(rect=(0, 0.1, 1, 1))
  files.save_figure(fig, path, dpi=100, bbox_inches='tight')
  plt.close(fig)


def write_overlays(config: ml_collections.ConfigDict, trained: trainer.Trained, split: str,
                   class_names: tuple[str, ...], path_prefix: str, num_images: int) -> None:
  """Predicts the first `num_images` of `split`: path_prefix_<i>.png each,
  written by process 0. Every process calls it: the weights span all
  processes' devices, and on GPUs XLA shares compilation work (autotuning)
  between the processes of a program, so a program compiled by process 0
  alone can wait for the others forever."""
  images, labels = data.load_eval_examples(config.data, split, num_images, task=config.task)
  predicted = np.asarray(trained.predict(images))
  if jax.process_index() != 0:
    return
  for i, (image, label) in enumerate(zip(images, labels)):
    plot_overlay(image, label, predicted[i], class_names, f'{path_prefix}_{i}.png')


def _classification_fields(results: dict, confusion: np.ndarray,
                           class_names: tuple[str, ...]) -> dict:
  per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
  return {'accuracy': results['eval/accuracy'],
          'top5_accuracy': results['eval/top5_accuracy'],
          'loss': results['eval/loss'],
          'num_examples': int(results['eval/num_examples']),
          'per_class_accuracy': dict(zip(class_names, per_class.tolist()))}


def _segmentation_fields(results: dict, confusion: np.ndarray,
                         class_names: tuple[str, ...]) -> dict:
  iou = tasks.iou_per_class(confusion)
  return {'miou': results['eval/miou'],
          'pixel_accuracy': results['eval/pixel_accuracy'],
          'loss': results['eval/loss'],
          'num_examples': int(results['eval/num_examples']),
          # null: the class is neither in the ground truth nor predicted.
          'per_class_iou': {name: None if np.isnan(v) else float(v)
                            for name, v in zip(class_names, iou)}}


@dataclasses.dataclass(frozen=True)
class _TaskReport:
  """What eval.py writes and prints for one task."""
  # (evaluate()'s results, confusion, class names) -> JSON fields.
  fields: Callable[[dict, np.ndarray, tuple[str, ...]], dict]
  # JSON report -> the headline metric, e.g. 'top-1 0.9123'.
  short: Callable[[dict], str]
  # JSON report -> the line main() prints.
  headline: Callable[[dict], str]
  overlays: bool = False


_REPORTS = {
    'classification': _TaskReport(
        _classification_fields,
        short=lambda r: f'top-1 {r["accuracy"]:.4f}',
        headline=lambda r: (
            f'{r["split"]} accuracy (step {r["step"]}): {r["accuracy"]:.4f}  '
            f'top-5 {r["top5_accuracy"]:.4f}  loss {r["loss"]:.4f}')),
    'segmentation': _TaskReport(
        _segmentation_fields,
        short=lambda r: f'mIoU {r["miou"]:.4f}',
        headline=lambda r: (
            f'{r["split"]} mIoU (step {r["step"]}): {r["miou"]:.4f}  '
            f'pixel accuracy {r["pixel_accuracy"]:.4f}  loss {r["loss"]:.4f}'),
        overlays=True),
}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | str = -1, split: str = '',
                        num_overlays: int = 4) -> dict:
  """Evaluates checkpoint `step` (-1 = latest, 'best') of workdir; writes JSON + PNGs."""
  split = split or config.data.eval_split
  tasks.get_task(config.task)  # ValueError naming the valid tasks.
  task_report = _REPORTS[config.task]
  mesh = trainer.eval_mesh(config.mesh)
  info = data.get_dataset_info(config.data, task=config.task)
  data.check_split(config.data, split, '--split')
  trainer.check_config(config, info, jax.process_count(), jax.device_count(), training=False)
  trained = trainer.restore_trained(config, workdir, step, mesh)
  step = trained.step
  eval_step = jax.jit(trainer.make_eval_step(
      trained.eval_graphdef, config.model.num_classes, confusion=True,
      task=config.task))
  batches = data.create_eval_iterator(
      config.data, batch_size=config.train.eval_batch_size // jax.process_count(),
      split=split, process_index=jax.process_index(),
      process_count=jax.process_count(), task=config.task)
  results = trainer.evaluate(eval_step, trained.params, trained.rest, batches,
                             parallel.batch_sharding(mesh), task=config.task)
  confusion = results.pop('confusion')
  report = {
      'step': step, 'split': split, 'weights': trained.weights,
      **task_report.fields(results, confusion, info.class_names),
      'confusion_matrix': confusion.astype(int).tolist(),
  }
  # Overlays first: they run programs on every process, which must not wait
  # on a process 0 that failed writing the report.
  if task_report.overlays and num_overlays > 0:
    write_overlays(config, trained, split, info.class_names,
                   os.path.join(workdir, f'overlay_{split}_{step}'), num_overlays)
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, f'eval_{split}_{step}.json'), report, indent=2)
    plot_confusion(confusion, info.class_names,
                   f'{info.name} {split} @ step {step}: '
                   f'{task_report.short(report)}',
                   os.path.join(workdir, f'confusion_{split}_{step}.png'))
  return report


def main(argv):
  del argv
  _INITIALIZE_DISTRIBUTED()
  config = _CONFIG.value or trainer.load_config(_WORKDIR.value)
  step = cli.checkpoint_step('--step', _STEP.value)
  report = evaluate_checkpoint(config, _WORKDIR.value, step, _SPLIT.value,
                               _NUM_OVERLAYS.value)
  if jax.process_index() == 0:
    print(_REPORTS[config.task].headline(report))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
