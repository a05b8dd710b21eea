"""Checkpoint retention: the latest `keep` plus the best by the task's metric."""

import os
import re

import grain
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hierarchical_vit.training import checkpointing


def _iterator(position: int) -> grain.DatasetIterator:
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  for _ in range(position):
    next(iterator)
  return iterator


def _save_all(workdir: str, metrics: dict[int, float], keep: int, best_metric: str):
  manager = checkpointing.create_checkpoint_manager(workdir, keep, best_metric=best_metric)
  for step, value in metrics.items():
    state = {'step': jnp.asarray(step), 'params': {'w': jnp.full((3,), float(step))}}
    checkpointing.save(manager, step, state, _iterator(step), {best_metric: value})
  manager.wait_until_finished()
  return manager


def _steps_on_disk(workdir: str) -> list[int]:
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


def test_keeps_the_latest_n_and_the_best_not_the_worst(tmp_path):
  # Non-monotonic: the best (step 20) is neither the first nor among the latest.
  metrics = {10: 0.50, 20: 0.90, 30: 0.30, 40: 0.40, 50: 0.20}
  manager = _save_all(str(tmp_path), metrics, keep=2, best_metric='eval/accuracy')
  assert _steps_on_disk(str(tmp_path)) == [20, 40, 50]
  assert manager.best_step() == 20
  assert manager.latest_step() == 50


def test_best_follows_the_named_metric(tmp_path):
  # Segmentation names eval/miou; a run must not look for eval/accuracy.
  metrics = {1: 0.2, 2: 0.1, 3: 0.7, 4: 0.6}
  manager = _save_all(str(tmp_path), metrics, keep=1, best_metric='eval/miou')
  assert _steps_on_disk(str(tmp_path)) == [3, 4]
  assert manager.best_step() == 3


def test_restore_returns_that_step_and_moves_the_data_iterator(tmp_path):
  manager = _save_all(str(tmp_path), {1: 0.1, 2: 0.2}, keep=2, best_metric='eval/accuracy')
  template = {'step': jnp.asarray(0), 'params': {'w': jnp.zeros((3,))}}
  iterator = _iterator(0)
  state = checkpointing.restore(manager, 1, template, iterator)
  assert int(state['step']) == 1
  np.testing.assert_array_equal(state['params']['w'], [1.0, 1.0, 1.0])
  assert next(iterator) == 1  # Saved after one element: the next is the second.
  # As eval.py reads: a fresh read-only manager, only the weights.
  reader = checkpointing.create_checkpoint_manager(str(tmp_path), 2, read_only=True)
  weights = checkpointing.restore_weights(reader, 2, {'params': template['params']})
  assert set(weights) == {'params'}
  np.testing.assert_array_equal(weights['params']['w'], [2.0, 2.0, 2.0])


def test_the_best_survives_a_restart_and_saves_without_metrics(tmp_path):
  """A resumed run opens a new manager, and saves at checkpoint_every_steps or
  on SIGTERM carry no metrics: neither may cost the best checkpoint."""
  workdir = str(tmp_path)
  _save_all(workdir, {10: 0.9, 20: 0.1}, keep=1, best_metric='eval/accuracy').close()
  manager = checkpointing.create_checkpoint_manager(workdir, 1)
  for step, metrics in ((30, None), (40, {'eval/accuracy': 0.2}), (50, None)):
    state = {'step': jnp.asarray(step), 'params': {'w': jnp.full((3,), float(step))}}
    checkpointing.save(manager, step, state, _iterator(step), metrics)
  manager.wait_until_finished()
  assert _steps_on_disk(workdir) == [10, 50]
  assert manager.best_step() == 10 and manager.latest_step() == 50


def test_restore_weights_names_what_the_checkpoint_lacks_or_shapes_otherwise(tmp_path):
  """orbax's partial restore hands back placeholders for a missing entry, and
  a shape mismatch names no config: both are refused here, by name."""
  _save_all(str(tmp_path), {1: 0.1}, keep=1, best_metric='eval/accuracy')
  reader = checkpointing.create_checkpoint_manager(str(tmp_path), 1, read_only=True)
  with pytest.raises(ValueError, match=re.escape(
      "holds no ['ema_params'] (it holds ['params', 'step']). Runs keep EMA weights only "
      'when trained with train.ema_decay > 0')):
    checkpointing.restore_weights(reader, 1, {'ema_params': {'w': jnp.zeros((3,))}})
  with pytest.raises(ValueError, match=re.escape(
      'does not fit the model of this config (2 arrays; params/v: saved nowhere, this model '
      '(2,); params/w: saved (3,), this model (4,)')):
    checkpointing.restore_weights(reader, 1, {'params': {'w': jnp.zeros((4,)),
                                                         'v': jnp.zeros((2,))}})


def test_restore_names_the_arrays_of_another_train_state(tmp_path):
  """A train state of another layout (here a run saved with optax.MultiSteps,
  the gradient accumulation before 2026-11-27) is refused by name, not by
  orbax's tree-structure error; its weights still restore for eval."""
  manager = checkpointing.create_checkpoint_manager(str(tmp_path), 1)
  params = {'w': jnp.ones((3,))}
  tx = optax.adamw(1e-3)
  old = {'step': jnp.asarray(4), 'params': params,
         'opt_state': optax.MultiSteps(tx, every_k_schedule=2).init(params)}
  checkpointing.save(manager, 2, old, _iterator(2))
  manager.wait_until_finished()
  state = {'step': jnp.asarray(0), 'params': params, 'opt_state': tx.init(params)}
  with pytest.raises(ValueError, match=r'checkpoint 2 in .* holds another train state than '
                                       r'this run builds \(\d+ arrays; opt_state/0/count: saved '
                                       r'nowhere.*optax.MultiSteps accumulators'):
    checkpointing.restore(manager, 2, state, _iterator(0))
  assert int(checkpointing.restore(manager, 2, old)['step']) == 4  # Its own layout restores.
  reader = checkpointing.create_checkpoint_manager(str(tmp_path), 1, read_only=True)
  weights = checkpointing.restore_weights(reader, 2, {'params': params})
  np.testing.assert_array_equal(weights['params']['w'], [1.0, 1.0, 1.0])
