r"""Evaluates a checkpoint of a workdir on a data split.

  python eval.py --workdir=workdirs/run1 [--step=1000] [--split=test]

Writes eval_<split>_<step>.json (top-1, top-5, loss, per-class accuracy) and
confusion_<split>_<step>.png into the workdir, and prints the accuracy. The
config is the workdir's config.json (written by train.py) unless --config is
given. Uses the EMA weights when the run kept them.
"""

import json
import os

import jax
import matplotlib
matplotlib.use('Agg')  # Headless: write PNGs, never open a window.
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from hierarchical_vit import data
from hierarchical_vit import parallel
from hierarchical_vit.training import checkpointing
from hierarchical_vit.training import trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file; default: the workdir\'s config.json.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir.',
                               required=True)
_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step; -1 = latest.')
_SPLIT = flags.DEFINE_string('split', '', "Split; '' = config.data.eval_split.")


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads workdir/config.json; JSON lists become tuples, as in configs/."""
  def tuples(x):
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x
  with open(os.path.join(workdir, 'config.json')) as f:
    return ml_collections.ConfigDict(tuples(json.load(f)))


def plot_confusion(confusion: np.ndarray, class_names: tuple[str, ...],
                   title: str, path: str) -> None:
  """Row-normalized confusion matrix (rows: true class) as a PNG."""
  rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  size = max(6, 0.4 * len(class_names))
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
  fig.savefig(path, dpi=100)
  plt.close(fig)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int = -1, split: str = '') -> dict:
  """Evaluates checkpoint `step` (-1 = latest) of workdir; writes JSON + PNG."""
  split = split or config.data.eval_split
  mesh = parallel.create_mesh(config.mesh)
  info = data.get_dataset_info(config.data)
  _, eval_graphdef, params, rest = trainer.init_model(config)
  key = 'ema_params' if config.train.ema_decay > 0 else 'params'
  manager = checkpointing.create_checkpoint_manager(
      workdir, config.train.keep_checkpoints, read_only=True)
  step = manager.latest_step() if step < 0 else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {workdir}/checkpoints.')
  weights = jax.device_put({key: params}, parallel.replicated(mesh))
  params = checkpointing.restore_weights(manager, step, weights)[key]
  rest = jax.device_put(rest, parallel.replicated(mesh))

  eval_step = jax.jit(trainer.make_eval_step(
      eval_graphdef, config.model.num_classes, confusion=True))
  batches = data.create_eval_iterator(
      config.data, batch_size=config.train.eval_batch_size // jax.process_count(),
      split=split, process_index=jax.process_index(),
      process_count=jax.process_count())
  results = trainer.evaluate(eval_step, params, rest, batches,
                             parallel.batch_sharding(mesh))
  confusion = results.pop('confusion')
  per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
  report = {
      'step': step, 'split': split, 'weights': key,
      'accuracy': results['eval/accuracy'],
      'top5_accuracy': results['eval/top5_accuracy'],
      'loss': results['eval/loss'],
      'num_examples': int(results['eval/num_examples']),
      'per_class_accuracy': dict(zip(info.class_names, per_class.tolist())),
      'confusion_matrix': confusion.astype(int).tolist(),
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f'eval_{split}_{step}.json'), 'w') as f:
      json.dump(report, f, indent=2)
    plot_confusion(confusion, info.class_names,
                   f'{info.name} {split} @ step {step}: '
                   f'top-1 {report["accuracy"]:.4f}',
                   os.path.join(workdir, f'confusion_{split}_{step}.png'))
  return report


def main(argv):
  del argv
  config = _CONFIG.value or load_config(_WORKDIR.value)
  report = evaluate_checkpoint(config, _WORKDIR.value, _STEP.value, _SPLIT.value)
  print(f'{report["split"]} accuracy (step {report["step"]}): '
        f'{report["accuracy"]:.4f}  top-5 {report["top5_accuracy"]:.4f}  '
        f'loss {report["loss"]:.4f}')


if __name__ == '__main__':
  app.run(main)
