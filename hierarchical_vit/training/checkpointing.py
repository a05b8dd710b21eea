"""Checkpoints: the train state (orbax, async) and the data iterator (grain).

A checkpoint `workdir/checkpoints/<step>/` holds two items:
  state: {'step', 'params', 'opt_state', 'rng'[, 'ema_params']} as arrays
         (tensorstore / OCDBT, no pickles), restored with the shardings of the
         freshly initialized state;
  data:  the grain iterator position (one small JSON file per process).
Orbax writes each checkpoint into a temporary directory and renames it once
complete, so a run killed mid-save leaves the previous checkpoint as latest.
"""

import functools
import json
import os
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

# Default metric (from the eval results passed to `save`) that picks the best
# checkpoint; each task names its own (tasks.Task.best_metric).
BEST_METRIC = 'eval/accuracy'


def _metric(metrics: dict[str, float], name: str) -> float:
  return metrics[name]


def create_checkpoint_manager(workdir: str, keep: int,
                              read_only: bool = False,
                              best_metric: str = BEST_METRIC
                              ) -> ocp.CheckpointManager:
  """Keeps the latest `keep` checkpoints plus the best by `best_metric`."""
  best_fn = functools.partial(_metric, name=best_metric)
  policy = preservation_policy.AnyPreservationPolicy([
      preservation_policy.LatestN(n=keep),
      # BestN sorts ascending and keeps the last n: the highest metric.
      preservation_policy.BestN(get_metric_fn=best_fn, n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, enable_async_checkpointing=True,
      # best_fn makes the manager write the metrics and answer best_step().
      best_fn=best_fn,
      read_only=read_only, create=not read_only)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      item_names=('state', 'data'), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: dict[str, Any],
         data_iterator: grain.DatasetIterator,
         metrics: dict[str, float] | None = None) -> None:
  """Starts an async save; returns once arrays are copied off the device."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator)),
      metrics=metrics, force=True)


def _abstract(state: dict[str, Any]) -> dict[str, Any]:
  """Shapes, dtypes and shardings to restore into."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)


def restore(manager: ocp.CheckpointManager, step: int,
            state: dict[str, Any],
            data_iterator: grain.DatasetIterator | None = None
            ) -> dict[str, Any]:
  """Restores checkpoint `step` into the structure/shardings of `state`.

  The data iterator, if given, is moved to its saved position in place.
  """
  _check_state_fits(manager, step, state)
  items = {'state': ocp.args.StandardRestore(_abstract(state))}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored['state']


def saved_process_count(manager: ocp.CheckpointManager, step: int) -> int:
  """How many processes wrote checkpoint `step` (its data item holds one
  process_<i>-of-<n>.json each)."""
  names = os.listdir(os.path.join(os.fspath(manager.directory), str(step), 'data'))
  counts = {int(m.group(1)) for name in names
            if (m := re.fullmatch(r'process_\d+-of-(\d+)\.json', name))}
  if len(counts) != 1:
    raise ValueError(f'checkpoint {step} in {manager.directory}: no single process count '
                     f'in its data files {sorted(names)}')
  return counts.pop()


def saved_data_sampler(manager: ocp.CheckpointManager, step: int, process_index: int,
                       process_count: int) -> str:
  """The sampler (grain's repr of it) whose position this process saved at `step`."""
  name = f'process_{process_index}-of-{process_count}.json'
  with open(os.path.join(os.fspath(manager.directory), str(step), 'data', name)) as f:
    return json.load(f)['sampler']


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/encoder/0/...': shape} for each leaf, whatever the key types
  (orbax's metadata names list indices as strings)."""
  def part(key) -> str:
    return str(getattr(key, 'key', getattr(key, 'idx', getattr(key, 'name', key))))
  return {'/'.join(map(part, path)): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _saved_tree(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The metadata tree (shapes, no values) of checkpoint `step`'s train state."""
  metadata = ocp.PyTreeCheckpointer().metadata(
      os.path.join(os.fspath(manager.directory), str(step), 'state'))
  return metadata.item_metadata.tree


def _differences(saved: Any, wanted: Any, ours: str) -> list[str]:
  """'path: saved shape, <ours> shape' for each leaf where two trees differ."""
  saved, wanted = _leaf_shapes(saved), _leaf_shapes(wanted)
  differ = [f'{k}: saved {saved[k] if k in saved else "nowhere"}, {ours} {shape}'
            for k, shape in sorted(wanted.items()) if saved.get(k) != shape]
  return differ + [f'{k}: saved {shape}, not in {ours}'
                   for k, shape in sorted(saved.items()) if k not in wanted]


def _check_state_fits(manager: ocp.CheckpointManager, step: int, state: dict[str, Any]) -> None:
  """ValueError naming the arrays of the train state that checkpoint `step`
  holds otherwise (orbax would fail on the tree structure and name none)."""
  saved = _saved_tree(manager, step)
  differ = _differences(saved, state, 'this run')
  if differ:
    hint = (' It was trained with gradient accumulation before 2026-11-27 (its optimizer '
            'state holds optax.MultiSteps accumulators): eval.py reads its weights, but '
            'training cannot resume it.'
            if any(k.startswith('opt_state/acc_grads') for k in _leaf_shapes(saved)) else '')
    raise ValueError(f'checkpoint {step} in {manager.directory} holds another train state than '
                     f'this run builds ({len(differ)} arrays; {"; ".join(differ[:4])}).{hint}')


def _check_weights_fit(manager: ocp.CheckpointManager, step: int,
                       weights: dict[str, Any]) -> None:
  """ValueError naming what is missing or shaped otherwise: orbax would hand
  back placeholders for a missing entry, and name no config for a shape."""
  where = f'checkpoint {step} in {manager.directory}'
  saved_tree = _saved_tree(manager, step)
  missing = sorted(set(weights) - set(saved_tree))
  if missing:
    hint = (' Runs keep EMA weights only when trained with train.ema_decay > 0: evaluate '
            'this one with --config.train.ema_decay=0.' if 'ema_params' in missing else '')
    raise ValueError(f'{where} holds no {missing} (it holds {sorted(saved_tree)}).{hint}')
  differ = _differences({k: saved_tree[k] for k in weights}, weights, 'this model')
  if differ:
    raise ValueError(f'{where} does not fit the model of this config ({len(differ)} arrays; '
                     f'{"; ".join(differ[:4])}). Evaluate a run with its own config: '
                     '--config=configs/saved.py:WORKDIR.')


def restore_weights(manager: ocp.CheckpointManager, step: int,
                    weights: dict[str, Any]) -> dict[str, Any]:
  """Restores only some entries of the state (e.g. {'params', 'ema_params'}).

  For evaluation: no optimizer state or data iterator is needed or read.
  Raises ValueError if the checkpoint lacks an entry or its arrays have
  other paths or shapes than `weights`.
  """
  _check_weights_fit(manager, step, weights)
  abstract = _abstract(weights)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item=abstract,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
          partial_restore=True)))
  return restored['state']
