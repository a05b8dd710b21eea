"""Classification task: eval sums, their summary and the training loss.

Every expectation is worked out here in numpy (or by hand), never by calling
the code under test.
"""

import importlib

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from hierarchical_vit.data import pipeline
from hierarchical_vit.training import tasks

CLS = tasks.TASKS['classification']
NUM_CLASSES = 6

# Seven examples over six classes, no ties within a row. Rows 3 and 4 are eval
# padding (mask False) and must count nowhere. Two top-1 hits but one label
# ranked last, so the top-k of -logits (bottom-k) gives other counts.
#   row  label  ranking of the label    top1  top5  (true, predicted)
#   0    2      1st                     yes   yes   (2, 2)
#   1    0      2nd (argmax 3)          no    yes   (0, 3)
#   2    5      6th, last (argmax 0)    no    no    (5, 0)
#   3    1      2nd (argmax 4)          padding
#   4    4      1st                     padding
#   5    3      3rd (argmax 1)          no    yes   (3, 1)
#   6    4      1st                     yes   yes   (4, 4)
LOGITS = np.array([
    [0.1, -1.0, 3.0, 0.5, -0.5, 1.0],
    [2.0, -2.0, 0.3, 2.5, 1.0, -0.7],
    [1.5, 0.2, -0.3, 0.9, 0.4, -3.0],
    [-1.0, 1.2, 0.0, 0.3, 2.2, -0.4],
    [0.0, 0.1, 0.2, 0.3, 5.0, -0.1],
    [-0.2, 2.0, 0.6, 1.1, 1.4, -1.5],
    [0.4, -0.8, 1.3, 0.2, 1.9, 0.6],
], np.float32)
LABELS = np.array([2, 0, 5, 1, 4, 3, 4], np.int32)
MASK = np.array([True, True, True, False, False, True, True])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _batch(logits=LOGITS, labels=LABELS, mask=MASK):
  return jnp.asarray(logits), {'label': jnp.asarray(labels),
                               'mask': jnp.asarray(mask)}


def _numpy_sums(logits, labels, mask):
  """Reference sums over rows with mask True, one example at a time."""
  loss = top1 = top5 = count = 0.0
  confusion = np.zeros((NUM_CLASSES, NUM_CLASSES))
  log_probs = _log_softmax(logits)
  for row, label, keep in zip(range(len(labels)), labels, mask):
    if not keep:
      continue
    ranked = np.argsort(-logits[row])  # Class ids, highest logit first.
    loss += -log_probs[row, label]
    top1 += ranked[0] == label
    top5 += label in ranked[:5]
    count += 1
    confusion[label, ranked[0]] += 1  # Row = true class, column = predicted.
  return {'loss': loss, 'top1': top1, 'top5': top5, 'count': count,
          'confusion': confusion}


def test_eval_sums_skip_masked_rows_and_match_numpy():
  logits, batch = _batch()
  sums = CLS.eval_sums(logits, batch, NUM_CLASSES, True)
  expected = _numpy_sums(LOGITS, LABELS, MASK)
  np.testing.assert_allclose(sums['loss'], expected['loss'], rtol=1e-5)
  # The same counts by hand from the table above: padding rows 3 and 4 would
  # add a top-1 hit (row 4) and a top-5 hit (rows 3 and 4) if they counted.
  assert (float(sums['top1']), float(sums['top5']),
          float(sums['count'])) == (2.0, 4.0, 5.0)
  assert (expected['top1'], expected['top5'], expected['count']) == (2, 4, 5)


def test_eval_loss_sum_is_plain_cross_entropy_of_unmasked_rows():
  # Eval loss is unsmoothed; padding rows 3 and 4 are left out.
  logits, batch = _batch()
  sums = CLS.eval_sums(logits, batch, NUM_CLASSES, False)
  log_probs = _log_softmax(LOGITS)
  expected = -sum(log_probs[i, LABELS[i]] for i in (0, 1, 2, 5, 6))
  np.testing.assert_allclose(sums['loss'], expected, rtol=1e-5)
  assert 'confusion' not in sums  # Only summed when asked for.


def test_eval_confusion_rows_are_true_classes_columns_predictions():
  logits, batch = _batch()
  confusion = np.asarray(CLS.eval_sums(logits, batch, NUM_CLASSES, True)[
      'confusion'])
  # (true, predicted) of the unmasked rows, from the table above. Both
  # off-diagonal cells have an empty mirror cell, so a transpose shows.
  expected = np.zeros((NUM_CLASSES, NUM_CLASSES))
  for true, predicted in [(2, 2), (0, 3), (5, 0), (3, 1), (4, 4)]:
    expected[true, predicted] += 1
  np.testing.assert_array_equal(confusion, expected)
  np.testing.assert_array_equal(
      confusion, _numpy_sums(LOGITS, LABELS, MASK)['confusion'])


def test_eval_sums_of_all_padding_are_zero():
  logits, batch = _batch(mask=np.zeros(7, bool))
  sums = CLS.eval_sums(logits, batch, NUM_CLASSES, True)
  for name in ('loss', 'top1', 'top5', 'count'):
    assert float(sums[name]) == 0.0, name
  assert not np.asarray(sums['confusion']).any()


def test_top5_with_fewer_than_five_classes_is_top_k():
  # With 3 classes every label is in the top min(5, K) = 3: top5 == count.
  logits = np.array([[0.0, 1.0, 2.0], [3.0, 1.0, 2.0]], np.float32)
  sums = CLS.eval_sums(jnp.asarray(logits),
                       {'label': jnp.array([0, 1]),
                        'mask': jnp.array([True, True])}, 3, False)
  assert (float(sums['top1']), float(sums['top5'])) == (0.0, 2.0)


def test_summary_of_two_batches_is_the_mean_over_real_examples():
  # Sums over two batches add up to the means over the 5 + 5 real examples.
  rng = np.random.default_rng(0)
  logits_b = rng.normal(size=(6, NUM_CLASSES)).astype(np.float32) * 2
  labels_b = rng.integers(0, NUM_CLASSES, size=6).astype(np.int32)
  mask_b = np.array([True, True, True, True, True, False])
  totals = None
  for batch in (_batch(), _batch(logits_b, labels_b, mask_b)):
    sums = CLS.eval_sums(*batch, NUM_CLASSES, True)
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
  summary = CLS.summarize({k: np.asarray(v) for k, v in totals.items()})

  first = _numpy_sums(LOGITS, LABELS, MASK)
  second = _numpy_sums(logits_b, labels_b, mask_b)
  count = first['count'] + second['count']
  assert count == 10
  assert summary['eval/num_examples'] == 10.0
  assert summary['eval/loss'] == pytest.approx(
      (first['loss'] + second['loss']) / count, rel=1e-5)
  assert summary['eval/accuracy'] == pytest.approx(
      (first['top1'] + second['top1']) / count)
  assert summary['eval/top5_accuracy'] == pytest.approx(
      (first['top5'] + second['top5']) / count)
  np.testing.assert_array_equal(summary['confusion'],
                                first['confusion'] + second['confusion'])


def test_summary_of_hand_totals():
  # 3 of 8 right, 7 of 8 in the top 5, loss sum 12 -> mean 1.5.
  summary = CLS.summarize({'loss': np.float32(12.0), 'top1': np.float32(3.0),
                           'top5': np.float32(7.0), 'count': np.float32(8.0)})
  assert summary == {'eval/loss': 1.5, 'eval/accuracy': 0.375,
                     'eval/top5_accuracy': 0.875, 'eval/num_examples': 8.0}


# ---------------------------------------------------------------------------
# Training loss with label smoothing.

TRAIN_LOGITS = np.array([[2.0, -1.0, 0.5, 0.0],
                         [-0.3, 1.5, 0.2, -2.0],
                         [0.7, 0.7, -1.2, 3.0]], np.float32)
ONE_HOT = np.eye(4, dtype=np.float32)[[0, 2, 3]]
# Mixup / cutmix targets: convex mixes of two one-hots, not one-hot.
MIXED = np.array([[0.7, 0.0, 0.3, 0.0],
                  [0.0, 0.25, 0.0, 0.75],
                  [0.5, 0.5, 0.0, 0.0]], np.float32)


def _numpy_smoothed_loss(logits, targets, eps):
  num_classes = targets.shape[-1]
  smoothed = (1 - eps) * np.asarray(targets, np.float64) + eps / num_classes
  per_example = -(smoothed * _log_softmax(logits)).sum(-1)
  return per_example.mean()


@pytest.mark.parametrize('eps', [0.0, 0.1])
@pytest.mark.parametrize('targets', [ONE_HOT, MIXED], ids=['one_hot', 'mixed'])
def test_loss_is_cross_entropy_of_smoothed_targets(targets, eps):
  loss, count = CLS.loss_sums(jnp.asarray(TRAIN_LOGITS), jnp.asarray(targets), eps)
  assert count == len(TRAIN_LOGITS)
  np.testing.assert_allclose(
      loss / count, _numpy_smoothed_loss(TRAIN_LOGITS, targets, eps), rtol=1e-5)


def test_smoothing_spreads_eps_over_all_classes_including_the_true_one():
  # By hand for one example with equal logits over K = 4 classes: log p = -log 4
  # for every class, so any targets summing to 1 give log 4, smoothed or not.
  # With unequal logits [log 3, 0, 0, 0] (p = 1/2, 1/6, 1/6, 1/6) and eps 0.2,
  # targets are 0.8 + 0.05 = 0.85 on class 0 and 0.05 elsewhere:
  #   loss = 0.85 * log 2 + 3 * 0.05 * log 6.
  logits = jnp.array([[np.log(3.0), 0.0, 0.0, 0.0]], jnp.float32)
  loss, _ = CLS.loss_sums(logits, jnp.array([[1.0, 0.0, 0.0, 0.0]]), 0.2)
  np.testing.assert_allclose(
      loss, 0.85 * np.log(2.0) + 0.15 * np.log(6.0), rtol=1e-6)


def test_every_task_has_its_data_and_eval_report():
  """A task is three entries, one per layer: its loss and metrics (TASKS), its
  records and transforms (the data pipeline) and its eval.py report. One added
  to TASKS alone would fail in the pipeline or in eval.py with a bare KeyError."""
  eval_script = importlib.import_module('eval')
  assert set(pipeline._TASKS) == set(tasks.TASKS) == set(eval_script._REPORTS)


def test_confusion_figure_of_many_classes_stays_a_readable_size(tmp_path):
  """ImageNet's 1000 classes at 0.4 inch each would be a 40000-pixel canvas."""
  eval_script = importlib.import_module('eval')
  path = str(tmp_path / 'confusion.png')
  eval_script.plot_confusion(np.eye(1000), tuple(map(str, range(1000))), 'ImageNet', path)
  with Image.open(path) as image:
    assert max(image.size) <= 3000 and min(image.size) >= 600
