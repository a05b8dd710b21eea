"""What the train/eval loop does differently per `config.task`: TASKS[name].

A task turns a batch into training targets, scores logits against them (the
summed loss and the count of correct predictions), sums eval statistics over
batches and turns the totals into the final eval metrics. The trainer calls
only these functions:

  classification: logits (B, K), batch['label'] (B,); targets one-hot (B, K)
                  (mixed by mixup / cutmix if enabled).
  segmentation:   logits (B, H, W, K), batch['label'] (B, H, W) class ids, or
                  IGNORE_INDEX for pixels that count nowhere; targets = labels.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hierarchical_vit import data

Batch = dict[str, jax.Array]
# (batch, rng) -> (images, targets), built once per config.
TargetsFn = Callable[[Batch, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Task:
  """The task-specific pieces of the loop (see the module docstring)."""
  # The models.MODELS entry whose outputs the loss reads: image logits (B, K)
  # or per-pixel logits (B, H, W, K).
  model_name: str
  # Eval metric (higher is better) that picks the best checkpoint.
  best_metric: str
  # The scalar eval metrics `summarize` returns that a sweep may compare.
  eval_metrics: tuple[str, ...]
  # config -> TargetsFn; raises ValueError on options the task cannot use.
  make_targets: Callable[[ml_collections.ConfigDict], TargetsFn]
  # (logits, targets, label_smoothing) -> the summed training loss and the
  # int32 count it averages over (images, or labelled pixels): sums, so that
  # the micro-batches of an accumulated step add up to the whole batch's mean.
  loss_sums: Callable[[jax.Array, jax.Array, float], tuple[jax.Array, jax.Array]]
  # (logits, targets) -> how many of that count are predicted correctly (int32).
  correct: Callable[[jax.Array, jax.Array], jax.Array]
  # (logits, batch with 'mask' (B,), num_classes, confusion) -> sums to add
  # over batches ('confusion' (K, K), rows = true class, if asked).
  eval_sums: Callable[[jax.Array, Batch, int, bool], dict[str, jax.Array]]
  # Totals (numpy) -> {'eval/...': float} (+ 'confusion' if summed).
  summarize: Callable[[dict[str, Any]], dict[str, Any]]


# ---------------------------------------------------------------------------
# Classification.


def _classification_targets(config: ml_collections.ConfigDict) -> TargetsFn:
  dc, num_classes = config.data, config.model.num_classes
  mixing = dc.mixup_alpha > 0 or dc.cutmix_alpha > 0

  def targets(batch: Batch, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    images = batch['image']
    labels = jax.nn.one_hot(batch['label'], num_classes)
    if mixing:
      images, labels = data.mixing.mix_batch(
          rng, images, labels, mixup_alpha=dc.mixup_alpha,
          cutmix_alpha=dc.cutmix_alpha, mix_prob=dc.mix_prob)
    return images, labels

  return targets


def classification_loss_sums(logits: jax.Array, labels: jax.Array,
                             label_smoothing: float) -> tuple[jax.Array, jax.Array]:
  """Summed softmax cross-entropy and the image count B.
  logits, labels (one-hot/mixed): (B, K)."""
  labels = optax.smooth_labels(labels, label_smoothing)
  return (optax.softmax_cross_entropy(logits, labels).sum(),
          jnp.asarray(logits.shape[0], jnp.int32))


def _classification_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.sum(jnp.argmax(logits, -1) == jnp.argmax(labels, -1), dtype=jnp.int32)


def _classification_sums(logits: jax.Array, batch: Batch, num_classes: int,
                         confusion: bool) -> dict[str, jax.Array]:
  """{'loss', 'top1', 'top5', 'count'} sums over unmasked examples."""
  k = min(5, num_classes)
  labels = jax.nn.one_hot(batch['label'], num_classes)
  mask = batch['mask'].astype(jnp.float32)
  top_k = jax.lax.top_k(logits, k)[1]
  in_top_k = jnp.any(top_k == batch['label'][:, None], axis=-1)
  sums = {
      'loss': jnp.sum(optax.softmax_cross_entropy(logits, labels) * mask),
      'top1': jnp.sum((top_k[:, 0] == batch['label']) * mask),
      'top5': jnp.sum(in_top_k * mask),
      'count': jnp.sum(mask),
  }
  if confusion:
    predicted = jax.nn.one_hot(top_k[:, 0], num_classes)
    sums['confusion'] = jnp.einsum('bi,bj->ij', labels * mask[:, None],
                                   predicted)
  return sums


def _classification_summary(totals: dict[str, Any]) -> dict[str, Any]:
  count = max(float(totals['count']), 1.0)
  results = {'eval/loss': float(totals['loss']) / count,
             'eval/accuracy': float(totals['top1']) / count,
             'eval/top5_accuracy': float(totals['top5']) / count,
             'eval/num_examples': float(totals['count'])}
  if 'confusion' in totals:
    results['confusion'] = np.asarray(totals['confusion'])
  return results


# ---------------------------------------------------------------------------
# Segmentation.


def _segmentation_targets(config: ml_collections.ConfigDict) -> TargetsFn:
  for field in ('mixup_alpha', 'cutmix_alpha'):
    if config.data[field] > 0:
      raise ValueError(f"data.{field}={config.data[field]} is not supported "
                       "for task 'segmentation'; valid: 0.0.")
  return lambda batch, rng: (batch['image'], batch['label'])


def _pixel_cross_entropy(logits: jax.Array, labels: jax.Array,
                         label_smoothing: float = 0.0) -> jax.Array:
  """Per-pixel softmax cross-entropy: logits (..., K), labels (...) -> (...).

  Pixels labelled IGNORE_INDEX (one_hot gives them all zeros) get 0.
  """
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  valid = labels != data.IGNORE_INDEX
  targets = optax.smooth_labels(targets, label_smoothing) * valid[..., None]
  return optax.softmax_cross_entropy(logits, targets)


def segmentation_loss_sums(logits: jax.Array, labels: jax.Array,
                           label_smoothing: float) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy summed over labelled pixels, and their count.
  logits (B, H, W, K), labels (B, H, W)."""
  valid = labels != data.IGNORE_INDEX
  return (jnp.sum(_pixel_cross_entropy(logits, labels, label_smoothing)),
          jnp.sum(valid, dtype=jnp.int32))


def _pixels_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  valid = labels != data.IGNORE_INDEX
  return jnp.sum((jnp.argmax(logits, -1) == labels) & valid, dtype=jnp.int32)


def _segmentation_sums(logits: jax.Array, batch: Batch, num_classes: int,
                       confusion: bool) -> dict[str, jax.Array]:
  """{'loss', 'pixels', 'count', 'confusion'} sums over labelled pixels.

  The confusion matrix (int32 (K, K), rows = true class) is always summed:
  mIoU needs it, so `confusion` changes nothing.
  """
  del confusion
  labels = batch['label']
  valid = (labels != data.IGNORE_INDEX) & batch['mask'][:, None, None]
  predicted = jnp.argmax(logits, -1)
  # One bincount over true * K + predicted: no (B, H, W, K) one-hots.
  index = jnp.where(valid, labels * num_classes + predicted, 0)
  counts = jnp.bincount(index.ravel(), weights=valid.ravel().astype(jnp.int32),
                        length=num_classes * num_classes)
  loss = _pixel_cross_entropy(logits, jnp.where(valid, labels, data.IGNORE_INDEX))
  return {'loss': jnp.sum(loss),
          'pixels': jnp.sum(valid.astype(jnp.int32)),
          'count': jnp.sum(batch['mask'].astype(jnp.int32)),
          'confusion': counts.reshape(num_classes, num_classes)}


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
  """IoU per class from a confusion matrix (rows = true, columns = predicted).

  IoU_k = TP / (TP + FP + FN); NaN for classes neither present nor predicted.
  """
  confusion = np.asarray(confusion, np.float64)
  true_positives = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - true_positives
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(union > 0, true_positives / union, np.nan)


def segmentation_metrics(confusion: np.ndarray) -> dict[str, float]:
  """mIoU (mean over classes with a non-empty union) and pixel accuracy."""
  confusion = np.asarray(confusion, np.float64)
  iou = iou_per_class(confusion)
  return {'miou': float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
          'pixel_accuracy': float(np.trace(confusion) / max(confusion.sum(), 1))}


def _segmentation_summary(totals: dict[str, Any]) -> dict[str, Any]:
  metrics = segmentation_metrics(totals['confusion'])
  return {'eval/loss': float(totals['loss']) / max(float(totals['pixels']), 1),
          'eval/miou': metrics['miou'],
          'eval/pixel_accuracy': metrics['pixel_accuracy'],
          'eval/num_examples': float(totals['count']),
          'confusion': np.asarray(totals['confusion'])}


TASKS: dict[str, Task] = {
    'classification': Task(
        model_name='classifier',
        best_metric='eval/accuracy',
        eval_metrics=('eval/accuracy', 'eval/top5_accuracy', 'eval/loss'),
        make_targets=_classification_targets,
        loss_sums=classification_loss_sums, correct=_classification_correct,
        eval_sums=_classification_sums, summarize=_classification_summary),
    'segmentation': Task(
        model_name='unet',
        best_metric='eval/miou',
        eval_metrics=('eval/miou', 'eval/pixel_accuracy', 'eval/loss'),
        make_targets=_segmentation_targets,
        loss_sums=segmentation_loss_sums, correct=_pixels_correct,
        eval_sums=_segmentation_sums, summarize=_segmentation_summary),
}


def get_task(name: str) -> Task:
  """TASKS[name]; ValueError naming the valid choices otherwise."""
  if name not in TASKS:
    raise ValueError(f'task={name!r} is not valid; valid choices: '
                     f'{sorted(TASKS)}.')
  return TASKS[name]
