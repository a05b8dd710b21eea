"""Metric logging: TensorBoard (tensorboardX), metrics.jsonl and the console.

Only process 0 writes; on the others every method is a no-op.
"""

import json
import os
import sys
import time
from types import ModuleType

import jax
from absl import logging

from hierarchical_vit import files


def _import_tensorboardx() -> ModuleType:
  """tensorboardX, without the torch import its writer module makes when torch
  is installed (the interop extra): ~2 s at every train.py / eval.py start,
  only to accept torch tensors, which nothing here logs."""
  if 'torch' in sys.modules:
    import tensorboardX  # pylint: disable=import-outside-toplevel
    return tensorboardX
  sys.modules['torch'] = None  # `import torch` raises ImportError meanwhile.
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules['torch']
  return tensorboardX


tensorboardX = _import_tensorboardx()


class MetricWriter:
  """Writes scalars to `workdir/tensorboard/` and `workdir/metrics.jsonl`.

  A run resumed from its checkpoint at `start_step` logs the steps after it
  again: their earlier records are dropped from both (TensorBoard's purge
  step), so that each step appears once.
  """

  def __init__(self, workdir: str, start_step: int = 0):
    self._active = jax.process_index() == 0
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      # Also from step 1: a fresh start over a killed run's records (a workdir
      # without checkpoints) replaces them in TensorBoard as in metrics.jsonl.
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'),
                                            purge_step=start_step + 1)
      path = os.path.join(workdir, 'metrics.jsonl')
      keep_records_up_to(path, start_step)
      # Line buffered, appended: a resumed run continues the same file.
      self._jsonl = open(path, 'a', buffering=1, encoding='utf-8')

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')

  def close(self) -> None:
    if self._active:
      self._tb.close()
      self._jsonl.close()


def keep_records_up_to(path: str, step: int) -> None:
  """Rewrites path (atomically) without the records after `step`, and without
  a last line that a killed run left unfinished (appended to, it would swallow
  the next record into one line that no JSON reader parses)."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    text = f.read()
  # Only the piece after the last newline can be unfinished.
  kept = ''.join(line + '\n' for line in text.split('\n')[:-1]
                 if json.loads(line)['step'] <= step)
  if kept != text:
    files.write_text(path, kept)


class Progress:
  """Throughput and ETA between calls to `update`, for the console line."""

  def __init__(self, total_steps: int, start_step: int):
    self.total_steps = total_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def update(self, step: int, images_per_step: int) -> dict[str, float]:
    """Returns img/s and ETA (s) since the previous call; restarts the clock."""
    now = time.perf_counter()
    seconds_per_step = (now - self._last_time) / max(step - self._last_step, 1)
    self._last_step, self._last_time = step, now
    return {'img_per_sec': images_per_step / seconds_per_step,
            'eta_sec': seconds_per_step * (self.total_steps - step)}


def log_progress(step: int, total_steps: int, scalars: dict[str, float]) -> None:
  """One console line: step, loss, accuracy, learning rate, img/s, ETA."""
  if jax.process_index() != 0:
    return
  eta = time.strftime('%H:%M:%S', time.gmtime(scalars.get('eta_sec', 0.0)))
  logging.info(
      'step %d/%d  loss %.4f  acc %.4f  lr %.2e  %.0f img/s  ETA %s',
      step, total_steps, scalars['train/loss'], scalars['train/accuracy'],
      scalars['train/learning_rate'], scalars.get('img_per_sec', 0.0), eta)
