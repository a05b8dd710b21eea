"""The training loop: `train_and_evaluate(config, workdir)`.

Performance: the NNX model is split once into (graphdef, params, rest) and the
hot path is a plain `jax.jit` of a pure function on pytrees of arrays (no
nnx.jit graph traversal per step), with the train state donated so XLA updates
it in place. The train state is a dict of arrays:

  step:       int32, optimizer steps taken (= global batches read);
  params:     the model's nnx.Param values as a nested dict;
  opt_state:  optax state of AdamW;
  ema_params: exponential moving average of params (only if ema_decay > 0);
  rng:        uint32 key data of the base key; step keys are folded in from it,
              so resuming at step s reproduces dropout and mixing exactly.
"""

import dataclasses
import functools
import json
import math
import os
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx, traverse_util

from hierarchical_vit import data
from hierarchical_vit import files
from hierarchical_vit import interop
from hierarchical_vit import parallel
from hierarchical_vit.layers import reseed_per_example
from hierarchical_vit.models import abstract_model, build_model, input_shape
from hierarchical_vit.training import checkpointing
from hierarchical_vit.training import config_history
from hierarchical_vit.training import metrics as metrics_lib
from hierarchical_vit.training import optimizer as optimizer_lib
from hierarchical_vit.training import tasks

State = dict[str, Any]
Batch = tasks.Batch


def compute_steps(train_config: ml_collections.ConfigDict,
                  num_train_examples: int) -> tuple[int, int]:
  """Returns (optimizer steps per epoch, total optimizer steps)."""
  steps_per_epoch = num_train_examples // train_config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'train.batch_size={train_config.batch_size} exceeds the '
                     f'{num_train_examples} training examples.')
  if train_config.num_steps > 0:
    return steps_per_epoch, train_config.num_steps
  return steps_per_epoch, max(1, int(train_config.num_epochs * steps_per_epoch))


def check_config(config: ml_collections.ConfigDict, info: data.DatasetInfo,
                 process_count: int = 1, device_count: int = 1, training: bool = True,
                 check_backend: bool = True) -> None:
  """Raises ValueError, naming the field, where config cannot run on the data set
  and devices or a field is out of its range; with training=False (eval.py), the
  training-only fields are not checked. check_backend=False leaves out whether
  this process's backend runs model.attention (asking starts the backend).

  A model with fewer outputs than the data has classes would train on
  all-zero one-hot targets without an error, so the shapes must match exactly.
  Batches are split over every device, so they must divide evenly: checked
  here, before a first evaluation could fail an epoch into the run.
  """
  m, tc = config.model, config.train
  model_name = tasks.get_task(config.task).model_name
  if m.name != model_name:
    # The logits' shape would be wrong for the loss, and can broadcast against
    # the targets silently (a UNet's (B, H, W, K) against (B, K) when W = K).
    raise ValueError(f'model.name={m.name!r} cannot train task={config.task!r}; '
                     f'valid: model.name={model_name!r}')
  got = {'model.num_classes': m.num_classes, 'model.in_chans': m.in_chans,
         'model.img_size': input_shape(m)[1:3]}
  want = {'model.num_classes': info.num_classes, 'model.in_chans': info.image_shape[2],
          'model.img_size': info.image_shape[:2]}
  for field, value in got.items():
    if value != want[field]:
      raise ValueError(f'{field}={value} does not match data {info.name!r} '
                       f'(data.image_size={config.data.image_size}), which needs '
                       f'{field}={want[field]}')
  ranges = {**_EVAL_RANGES, **(_TRAIN_RANGES if training else {})}
  for field, (rule, valid) in ranges.items():
    value = functools.reduce(lambda node, key: node[key], field.split('.'), config)
    if not valid(value):
      raise ValueError(f'{field}={value!r} must be {rule}')
  if training:
    # Building the targets is how a task refuses the options it cannot train
    # with (segmentation: mixup); the train step would build them only after
    # the workdir is written.
    tasks.get_task(config.task).make_targets(config)
  if training and tc.init_from is None:
    raise ValueError('train.init_from is not set, and this config fine-tunes pretrained '
                     'weights: pass --config.train.init_from=PATH (ours .npz, or a timm / '
                     'official Swin .pth / .safetensors)')
  if training and tc.num_steps == 0 and tc.num_epochs <= 0:
    raise ValueError(f'train.num_epochs={tc.num_epochs} must be > 0 (or train.num_steps > 0)')
  if training and tc.min_learning_rate > tc.learning_rate:
    raise ValueError(f'train.min_learning_rate={tc.min_learning_rate} must be <= '
                     f'train.learning_rate={tc.learning_rate}: the cosine schedule would rise')
  divisible = {}
  if training:
    divisible['train.batch_size'] = (tc.batch_size, 'train.grad_accum_steps',
                                     tc.grad_accum_steps)
    divisible['train.batch_size // train.grad_accum_steps'] = (
        tc.batch_size // tc.grad_accum_steps, 'the device count', device_count)
  divisible['train.eval_batch_size'] = (tc.eval_batch_size, 'the device and process counts',
                                        math.lcm(device_count, process_count))
  for field, (value, by, divisor) in divisible.items():
    if value % divisor:
      raise ValueError(f'{field}={value} must be divisible by {by} ({divisor})')
  # The model checks its own fields (depths, heads, windows) as it is built:
  # built abstractly here, a bad one fails before a workdir is written.
  abstract_model(m, check_backend)


def check_run(config: ml_collections.ConfigDict, process_count: int = 1,
              device_count: int = 1, check_backend: bool = True) -> tuple[int, int]:
  """All that a training run checks before it writes its workdir: its data
  is prepared (MissingDataError says how), the config fits the data and
  devices (check_config), the preprocessing builds, and the run has steps.
  Returns (steps per epoch, total steps)."""
  info = data.get_dataset_info(config.data, task=config.task)
  check_config(config, info, process_count, device_count, check_backend=check_backend)
  data.check_preprocessing(config.data, config.task)
  return compute_steps(config.train, info.num_train_examples)


# field: (the rule, as the error states it; whether a value keeps it). Outside
# these a run would fail late (an evaluation dividing by a zero batch), keep
# too few checkpoints to resume, or silently train something else (an EMA
# decay above 1 extrapolates).
_Range = tuple[str, Callable[[Any], bool]]
_EVAL_RANGES: dict[str, _Range] = {
    'train.eval_batch_size': ('>= 1', lambda v: v >= 1),
    'data.num_workers': ('>= 0', lambda v: v >= 0),
    # On the [0, 1] scale of the pixels they normalize: 0-255 values (mmcv's
    # 123.675, 58.395) would leave every image a near-constant.
    'data.mean': ("in [0, 1] in every channel, on the [0, 1] pixel scale (() = the data "
                  "set's)", lambda v: all(0 <= m <= 1 for m in v)),
    'data.std': ("in (0, 1] in every channel, on the [0, 1] pixel scale (() = the data "
                 "set's)", lambda v: all(0 < s <= 1 for s in v)),
}
_TRAIN_RANGES: dict[str, _Range] = {
    'train.batch_size': ('>= 1', lambda v: v >= 1),
    'train.grad_accum_steps': ('>= 1', lambda v: v >= 1),
    'train.log_every_steps': ('>= 1', lambda v: v >= 1),
    'train.checkpoint_every_steps': ('>= 1', lambda v: v >= 1),
    'train.keep_checkpoints': ('>= 1', lambda v: v >= 1),
    'train.eval_every_steps': ('>= 0 (0 = at the end of each epoch)', lambda v: v >= 0),
    'train.num_steps': ('>= 0 (0 = train.num_epochs decides)', lambda v: v >= 0),
    'train.num_epochs': ('finite', math.isfinite),
    'train.warmup_epochs': ('finite and >= 0', lambda v: math.isfinite(v) and v >= 0),
    'train.label_smoothing': ('in [0, 1)', lambda v: 0 <= v < 1),
    'train.ema_decay': ('in [0, 1) (0 = off)', lambda v: 0 <= v < 1),
    'train.learning_rate': ('>= 0', lambda v: v >= 0),
    'train.min_learning_rate': ('>= 0', lambda v: v >= 0),
    'train.weight_decay': ('>= 0', lambda v: v >= 0),
    'train.b1': ('in [0, 1)', lambda v: 0 <= v < 1),
    'train.b2': ('in [0, 1)', lambda v: 0 <= v < 1),
    'train.grad_clip_norm': ('>= 0 (0 = off)', lambda v: v >= 0),
    'data.mixup_alpha': ('>= 0 (0 = off)', lambda v: v >= 0),
    'data.cutmix_alpha': ('>= 0 (0 = off)', lambda v: v >= 0),
    'data.mix_prob': ('in [0, 1]', lambda v: 0 <= v <= 1),
    'data.random_erasing': ('in [0, 1]', lambda v: 0 <= v <= 1),
    'mesh.fsdp_min_size': ('>= 0', lambda v: v >= 0),
    'train.init_bias_table_resize': (f'one of {sorted(interop.BIAS_TABLE_RESIZES)}',
                                     lambda v: v in interop.BIAS_TABLE_RESIZES),
    # grain's samplers take an unsigned 32-bit seed and say so without the field.
    'seed': ('in [0, 2**32)', lambda v: 0 <= v < 2**32),
}


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ValueError if workdir's run (its config.json) was trained with
  another config. Called when there is a checkpoint to resume from.

  Resuming under a changed config would silently change the run (a longer
  num_steps stretches the cosine schedule mid-run) or fail to restore its
  state; only where the data is read from and how the run is executed
  (EXECUTION_FIELDS) may differ.
  """
  diffs = _changes_from_run(config, workdir, lambda k: not k.startswith(EXECUTION_FIELDS))
  if diffs:
    raise ValueError(
        f'{workdir} holds a run trained with another config ({diffs}). Resume it '
        f'with its own config (--config=configs/saved.py:{workdir}) or start this one '
        'in a new workdir.')


# Model fields that may differ between a run and the config it is evaluated
# with: how the same weights are computed (attention core, precision,
# recomputation), and dropouts, which evaluation does not apply.
EVAL_FREE_MODEL_FIELDS = ('model.remat', 'model.attention', 'model.dtype', 'model.drop_rate',
                          'model.attn_drop_rate', 'model.drop_path_rate')


def check_evaluable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ValueError if config describes another model than workdir's run
  (its config.json), or other weights (train.ema_decay picks EMA or raw).

  Two architectures can share every parameter shape (avg_pool and max_pool),
  so a restore alone would not notice; where the run has no config.json
  there is nothing to compare.
  """
  compared = lambda k: (k == 'task' or k == 'train.ema_decay'
                        or (k.startswith('model.') and not k.startswith(EVAL_FREE_MODEL_FIELDS)))
  diffs = _changes_from_run(config, workdir, compared)
  if diffs:
    raise ValueError(f'{workdir} holds a run of another model or weights ({diffs}): evaluate '
                     f'it with its own config (--config=configs/saved.py:{workdir}, or no '
                     f'--config), changing only data.*, mesh.*, train.eval_batch_size or '
                     f'{", ".join(EVAL_FREE_MODEL_FIELDS)}.')


# Config fields (prefixes of flattened keys) that say where the data is read
# from and how a run executes, not what it trains: they may change on resume,
# and a sweep's results do not depend on them (ablate.config_fingerprint). Not
# data.num_workers: grain's checkpointed iterator state is per worker (it
# refuses another count), and the count decides which examples share a batch.
EXECUTION_FIELDS = ('data.data_dir', 'mesh.', 'sweep.', 'train.log_every_steps',
                    'train.checkpoint_every_steps', 'train.keep_checkpoints',
                    'train.eval_batch_size', 'model.remat')


def _changes_from_run(config: ml_collections.ConfigDict, workdir: str,
                      compared: Callable[[str], bool]) -> str:
  """'field: saved -> given, ...' over the compared flattened fields where
  config differs from workdir's config.json; '' if none or it has none."""
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    return ''
  saved, given = _flat(load_config(workdir)), _flat(config)
  changed = sorted(k for k in saved.keys() | given.keys()
                   if compared(k) and saved.get(k) != given.get(k))
  return ', '.join(f'{k}: {saved.get(k)!r} -> {given.get(k)!r}' for k in changed)


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'a.b': value} of a config, with lists as tuples (as load_config gives)."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()}


def ema_decay(train_config: ml_collections.ConfigDict, num_updates: jax.Array) -> jax.Array:
  """The EMA decay of the optimizer update after `num_updates` earlier ones.

  With train.ema_warmup, min(ema_decay, (1 + n) / (10 + n)) as in TensorFlow's
  ExponentialMovingAverage(num_updates=n): without it, a 0.9998 average stays
  mostly the random initialization for the first few thousand updates.
  """
  decay = jnp.asarray(train_config.ema_decay, jnp.float32)
  if train_config.ema_warmup:
    n = jnp.asarray(num_updates, jnp.float32)
    decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  return decay


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule,
                    config: ml_collections.ConfigDict
                    ) -> Callable[[State, Batch, nnx.State], tuple[State, dict]]:
  """Builds the pure train step: one optimizer step on one global batch.

  Returned fn: (state, batch {'image': (B,H,W,C), 'label': (B,) or
  (B,H,W) for segmentation}, rest) -> (new state, metrics of the batch).
  `rest` is the model's non-Param state (its RNG streams, reseeded here from
  the step key). Targets, loss and accuracy are config.task's.

  With train.grad_accum_steps = k > 1 the forward and backward run over k
  micro-batches of B / k in turn (`lax.scan`: one micro-batch's activations
  in memory at a time), their summed losses and gradients are added up and
  divided once by the batch's count (images, or labelled pixels): the step is
  the whole batch's, mixup pairs and dropout masks included (each example's
  masks come from its row in the batch: layers.reseed_per_example).
  """
  tc = config.train
  task = tasks.get_task(config.task)
  make_targets = task.make_targets(config)
  k = tc.grad_accum_steps

  def micro_sums(params, rest: nnx.State, images: jax.Array, targets: jax.Array,
                 rows: jax.Array, key: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
    """Gradients of the summed loss of one micro-batch (rows: its examples'
    rows in the batch), and its sums."""
    # Reseeded outside of value_and_grad: NNX variables may only be mutated
    # at their trace level.
    model = nnx.merge(graphdef, params, rest)
    reseed_per_example(model, key, rows)
    step_rest = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))

    def loss_fn(params):
      logits = nnx.merge(graphdef, params, step_rest)(images)
      loss, count = task.loss_sums(logits, targets, tc.label_smoothing)
      return loss, (count, task.correct(logits, targets))

    (loss, (count, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, {'loss': loss, 'count': count, 'correct': correct}

  def batch_sums(params, rest: nnx.State, images: jax.Array, targets: jax.Array,
                 key: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
    rows = jnp.arange(images.shape[0])
    if k == 1:
      return micro_sums(params, rest, images, targets, rows, key)
    # Micro-batch j is rows j, j + k, ...: each device keeps its own rows.
    split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    def add(total, micro):
      return jax.tree.map(jnp.add, total, micro_sums(params, rest, *micro, key)), None

    zeros = (jax.tree.map(jnp.zeros_like, params),
             {'loss': jnp.zeros((), jnp.float32), 'count': jnp.zeros((), jnp.int32),
              'correct': jnp.zeros((), jnp.int32)})
    total, _ = jax.lax.scan(add, zeros, (split(images), split(targets), split(rows)))
    return total

  def train_step(state: State, batch: Batch, rest: nnx.State):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']),
                             state['step'])
    dropout_rng, mix_rng = jax.random.split(rng)
    images, targets = make_targets(batch, mix_rng)
    grads, sums = batch_sums(state['params'], rest, images, targets, dropout_rng)
    count = jnp.maximum(sums['count'], 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new_state = {**state, 'step': state['step'] + 1, 'params': params,
                 'opt_state': opt_state}
    if 'ema_params' in state:
      decay = ema_decay(tc, state['step'])
      new_state['ema_params'] = optax.incremental_update(
          params, state['ema_params'], step_size=1.0 - decay)
    metrics = {
        'train/loss': sums['loss'] / count,
        'train/accuracy': sums['correct'] / count,
        'train/learning_rate': schedule(state['step']),
        'train/grad_norm': optax.tree.norm(grads),  # The batch's, before clipping.
        # Of the updated params: the finiteness check before a save needs it.
        'train/param_norm': optax.tree.norm(params),
    }
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, num_classes: int,
                   confusion: bool = False, task: str = 'classification'
                   ) -> Callable[[Any, Batch, nnx.State], dict[str, jax.Array]]:
  """Builds the pure eval step: the task's sums over a batch's unmasked examples.

  Returned fn: (params, batch {'image', 'label', 'mask': (B,) bool}, rest) ->
  sums, e.g. {'loss', 'top1', 'top5', 'count'} for classification (+
  'confusion' (K, K), rows = true class, if asked; segmentation always sums
  it). Sums, not means, so batches (and padding) add up exactly.
  """
  eval_sums = tasks.get_task(task).eval_sums

  def eval_step(params, batch: Batch, rest: nnx.State):
    logits = nnx.merge(graphdef, params, rest)(batch['image'])
    return eval_sums(logits, batch, num_classes, confusion)

  return eval_step


def evaluate(eval_step: Callable, params: nnx.State | dict, rest: nnx.State,
             batches: Iterable[dict[str, np.ndarray]],
             sharding: jax.sharding.NamedSharding,
             task: str = 'classification') -> dict[str, Any]:
  """Runs eval_step over all batches; returns the task's eval/... metrics.

  Classification: eval/{loss,accuracy,top5_accuracy,num_examples};
  segmentation: eval/{loss,miou,pixel_accuracy,num_examples}; plus
  'confusion' (K, K) when the step summed it.
  """
  totals = None
  for batch in batches:
    sums = eval_step(params, parallel.shard_batch(batch, sharding), rest)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError('no eval batches: the split (data.eval_split, or eval.py --split) has no '
                     'examples')
  return tasks.get_task(task).summarize(jax.device_get(totals))


def init_model(config: ml_collections.ConfigDict, init_from: str = ''
               ) -> tuple[nnx.GraphDef, nnx.GraphDef, dict, dict]:
  """Builds the model; returns (train graphdef, eval graphdef, params, rest).

  Train and eval graphdefs differ only in the static `deterministic`
  attributes. params (nnx.Param) and rest (RNG streams) are pure dicts of
  arrays: NNX Variables must not cross jit/grad boundaries. Weights at
  init_from (see hierarchical_vit.interop) replace the initial params, with
  a fresh head and resized bias tables where the shapes call for them.
  """
  model = build_model(config.model, rngs=nnx.Rngs(params=config.seed,
                                                  dropout=config.seed + 1))
  if init_from:
    try:
      interop.load_weights(model, init_from, finetune=True,
                           bias_table_resize=config.train.init_bias_table_resize)
    except ValueError as error:
      raise ValueError(f'train.init_from={init_from!r}: {error}') from error
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return (graphdef, eval_graphdef, nnx.to_pure_dict(params),
          nnx.to_pure_dict(rest))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in workdir was trained with (its config.json), in
  today's fields (config_history.upgrade); JSON lists become tuples, as in
  configs/."""
  def tuples(x):
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{workdir} is not a train.py workdir: it has no config.json.')
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(tuples(config_history.upgrade(json.load(f))))


@dataclasses.dataclass(frozen=True)
class Trained:
  """A checkpoint's weights as evaluation uses them, with the eval-mode graph."""
  eval_graphdef: nnx.GraphDef
  params: dict      # The EMA weights if the run kept them, else the params.
  rest: dict        # Non-Param state (RNG streams).
  step: int
  weights: str      # Which: 'ema_params' or 'params'.

  def model(self) -> nnx.Module:
    return nnx.merge(self.eval_graphdef, self.params, self.rest)

  @functools.cached_property
  def predict(self) -> Callable[[jax.Array], jax.Array]:
    """Jitted images (B, H, W, C) -> argmax classes: (B,), or (B, H, W) per pixel."""
    graphdef = self.eval_graphdef
    predict = jax.jit(lambda params, rest, x: nnx.merge(graphdef, params, rest)(x).argmax(-1))
    return functools.partial(predict, self.params, self.rest)


def eval_mesh(mesh_config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """Data parallel over every process's devices (jax.devices()).

  Trained weights are restored replicated, so the training run's mesh (its
  strategy, shape and DCN layout) does not matter.
  """
  return parallel.create_mesh(ml_collections.ConfigDict(
      {**mesh_config.to_dict(), 'strategy': 'data_parallel', 'shape': (), 'dcn_shape': ()}))


def restore_trained(config: ml_collections.ConfigDict, workdir: str, step: int | str = -1,
                    mesh: jax.sharding.Mesh | None = None) -> Trained:
  """Checkpoint `step` of the run in workdir, replicated over mesh (default:
  `eval_mesh`, whatever mesh the run trained on). step: a saved step, -1 = the
  latest, or 'best' = the kept best by the task's metric on data.eval_split.
  Refuses a config of another model or weights than the run's (check_evaluable)."""
  check_evaluable(config, workdir)
  manager = checkpointing.create_checkpoint_manager(
      workdir, config.train.keep_checkpoints, read_only=True,
      best_metric=tasks.get_task(config.task).best_metric)
  if step == 'best':
    found = manager.best_step()
  elif isinstance(step, int) and step >= -1:
    found = manager.latest_step() if step == -1 else step
  else:
    raise ValueError(f"step={step!r} is not valid: a saved step, -1 (the latest) or 'best'.")
  # Every process restores the step process 0 found (-2: none), and each
  # checks it against a fresh listing: another's may have been newer.
  found = parallel.process_zero_value(-2 if found is None else found)
  if found == -2:
    raise FileNotFoundError(f'No checkpoint in {workdir}/checkpoints' + (
        ' was saved with eval metrics to pick the best by.' if step == 'best' else '.'))
  step = found
  if step not in manager.all_steps():
    manager.reload()
  # All refuse together: one process raising alone leaves the others waiting
  # in the restore's collectives.
  if not parallel.on_all_processes(step in manager.all_steps()):
    raise ValueError(f'step={step} has no checkpoint in {workdir}/checkpoints; saved steps: '
                     f"{sorted(manager.all_steps())} (-1 = the latest, 'best' = the best).")
  _, eval_graphdef, params, rest = init_model(config)
  key = 'ema_params' if config.train.ema_decay > 0 else 'params'
  mesh = mesh or eval_mesh(config.mesh)
  weights = parallel.put_global({key: params}, parallel.replicated(mesh))
  params = checkpointing.restore_weights(manager, step, weights)[key]
  rest = parallel.put_global(rest, parallel.replicated(mesh))
  return Trained(eval_graphdef, params, rest, step, key)


def create_train_state(config: ml_collections.ConfigDict, params: nnx.State | dict,
                       tx: optax.GradientTransformation) -> State:
  """The initial train state (host-agnostic; shard_train_state lays it out on a mesh)."""
  state = {
      'step': jnp.zeros((), jnp.int32),
      'params': params,
      'opt_state': tx.init(params),
      'rng': jax.random.key_data(jax.random.key(config.seed)),
  }
  if config.train.ema_decay > 0:
    state['ema_params'] = jax.tree.map(jnp.copy, params)
  return state


def shard_train_state(config: ml_collections.ConfigDict, params: nnx.State | dict,
                      tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> State:
  """create_train_state, laid out over mesh by config.mesh's strategy.

  Only the params go through the host; the optimizer moments and the EMA are
  created in place on their shards, so under FSDP no device ever holds the
  whole state (4x the params with Adam and an EMA).
  """
  create = functools.partial(create_train_state, config, tx=tx)
  shardings = parallel.state_shardings(mesh, jax.eval_shape(create, params), config.mesh)
  params = parallel.put_global(params, shardings['params'])
  return jax.jit(create, out_shardings=shardings)(params)


# train.py's exit status when SIGTERM stopped a run after its checkpoint
# (sysexits' EX_TEMPFAIL): a scheduler that retries failed jobs (Kubernetes'
# restartPolicy OnFailure, a shell until-loop) must not take it for finished.
EXIT_PREEMPTED = os.EX_TEMPFAIL


class _PreemptionFlag:
  """Set by SIGTERM; the loop saves and exits at the next step boundary.

  Across processes the flag is agreed on by an all-gather, which makes the
  host wait for the step in flight, so it is polled only every
  `poll_every_steps` steps: a signal then stops the run within that many.
  """

  poll_every_steps = 10

  def __init__(self):
    self._event = threading.Event()
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning('Received signal %d: checkpointing at the next step.', signum)
    self._event.set()

  def is_set(self, step: int) -> bool:
    """Whether to stop after `step` (the same answer in every process)."""
    # Across processes only every few steps: each poll waits for the step in flight.
    if jax.process_count() > 1 and step % self.poll_every_steps:
      return False
    return parallel.on_any_process(self._event.is_set())

  def restore(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)


def _check_finite(step: int, scalars: dict[str, float], last_saved: int | None):
  """Raises (before any save) if loss, gradients or params are non-finite.

  Checked at log and save steps only (fetching blocks the pipeline). NaNs
  never disappear from the params once there, so checking the param norm
  after the latest step guarantees that no non-finite state is saved.
  """
  bad = {k: v for k, v in scalars.items()
         if k in ('train/loss', 'train/grad_norm', 'train/param_norm')
         and not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f'Non-finite training metrics at step {step}: {bad}. Stopping; the last '
        f'good checkpoint (step {last_saved}) is kept. Lower the learning rate, '
        'enable grad_clip_norm or use float32.')


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes workdir/config.json atomically: a killed write leaves the old one."""
  if jax.process_index() == 0:
    files.write_text(os.path.join(workdir, 'config.json'), config.to_json(indent=2))


def _resume(manager, step: int, state: State, train_iter, batch_size: int) -> State:
  """Restores checkpoint `step`. The data iterator returns to its saved
  position; under another process count (whose shards differ), or where an
  older release wrote another data order (its sampler), it continues at the
  same point of the epoch instead (data.seek_train_iterator)."""
  saved = checkpointing.saved_process_count(manager, step)
  if saved != jax.process_count():
    why = f'was written by {saved} processes, this run has {jax.process_count()}'
  elif (checkpointing.saved_data_sampler(manager, step, jax.process_index(), saved)
        != json.loads(train_iter.get_state())['sampler']):
    why = 'was written with another data sampler (an older release)'
  else:
    return checkpointing.restore(manager, step, state, train_iter)
  state = checkpointing.restore(manager, step, state)
  logging.warning('Checkpoint %d %s: the data order restarts from the same point of the '
                  'epoch.', step, why)
  data.seek_train_iterator(train_iter, int(state['step']), batch_size // jax.process_count(),
                           jax.process_index(), jax.process_count())
  return state


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, float]:
  """Trains (resuming from workdir's latest checkpoint) and evaluates.

  Returns the final train and eval metrics, plus 'step' and 'preempted'
  (SIGTERM stopped the run early, after saving its checkpoint).
  """
  tc = config.train
  mesh = parallel.create_mesh(config.mesh)
  batch_sharding = parallel.batch_sharding(mesh)
  task = tasks.get_task(config.task)
  steps_per_epoch, total_steps = check_run(config, jax.process_count(), jax.device_count())

  os.makedirs(workdir, exist_ok=True)
  manager = checkpointing.create_checkpoint_manager(
      workdir, tc.keep_checkpoints, best_metric=task.best_metric)
  last_saved = manager.latest_step()
  if last_saved is not None:
    check_resumable(config, workdir)
  elif tc.init_from and not os.path.exists(tc.init_from):
    raise FileNotFoundError(f'train.init_from={tc.init_from!r}: no such file')
  # Pretrained weights only start a run: a resumed one restores its own.
  # Loaded before config.json is written: weights that do not load leave none.
  graphdef, eval_graphdef, params, rest = init_model(
      config, tc.init_from if last_saved is None else '')
  save_config(config, workdir)

  schedule = optimizer_lib.create_learning_rate_schedule(
      tc, steps_per_epoch, total_steps)
  tx = optimizer_lib.create_optimizer(tc, schedule)
  state = shard_train_state(config, params, tx, mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  parallel.log_memory(state)
  rest = parallel.put_global(rest, parallel.replicated(mesh))

  train_iter = data.create_train_iterator(
      config.data, global_batch_size=tc.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      task=config.task)
  if last_saved is not None:
    logging.info('Resuming from checkpoint at step %d.', last_saved)
    state = _resume(manager, last_saved, state, train_iter, tc.batch_size)
  start_step = int(state['step'])

  train_step = jax.jit(
      make_train_step(graphdef, tx, schedule, config), donate_argnums=0,
      out_shardings=(state_shardings, parallel.replicated(mesh)))
  eval_step = jax.jit(make_eval_step(eval_graphdef, config.model.num_classes,
                                     task=config.task))
  eval_every = tc.eval_every_steps or steps_per_epoch
  ema = 'ema_params' in state

  def run_eval() -> dict[str, float]:
    batches = data.create_eval_iterator(
        config.data, batch_size=tc.eval_batch_size // jax.process_count(),
        process_index=jax.process_index(), process_count=jax.process_count(),
        task=config.task)
    results = evaluate(eval_step, state['ema_params' if ema else 'params'],
                       rest, batches, batch_sharding, task=config.task)
    results.pop('confusion', None)  # Not a scalar; eval.py reports it.
    return results

  writer = metrics_lib.MetricWriter(workdir, start_step)
  progress = metrics_lib.Progress(total_steps, start_step)
  preemption = _PreemptionFlag()
  train_scalars, eval_scalars = {}, {}
  step, preempted = start_step, False
  logging.info('Training %d steps (%d per epoch) from step %d on %s.',
               total_steps, steps_per_epoch, start_step, mesh)
  try:
    for step in range(start_step + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = parallel.shard_batch(next(train_iter), batch_sharding)
        state, train_metrics = train_step(state, batch, rest)
      preempted = preemption.is_set(step)
      is_last = step == total_steps
      is_eval = step % eval_every == 0 or is_last
      is_save = (is_eval or preempted or is_last
                 or step % tc.checkpoint_every_steps == 0)

      # Fetching metrics blocks on the step, so only at log/save steps.
      if step % tc.log_every_steps == 0 or is_save:
        train_scalars = {k: float(v) for k, v in
                         jax.device_get(train_metrics).items()}
        _check_finite(step, train_scalars, last_saved)
        train_scalars.update(progress.update(step, tc.batch_size))
        train_scalars['train/epoch'] = step / steps_per_epoch
        writer.write_scalars(step, train_scalars)
        metrics_lib.log_progress(step, total_steps, train_scalars)
      eval_metrics = None
      if is_eval:
        eval_scalars = run_eval()
        writer.write_scalars(step, eval_scalars)
        logging.info('step %d eval: %s', step, eval_scalars)
        eval_metrics = {task.best_metric: eval_scalars[task.best_metric]}
      if is_save:
        checkpointing.save(manager, step, state, train_iter, eval_metrics)
        last_saved = step
      if preempted:
        logging.warning('Preempted: saved step %d, exiting.', step)
        break
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
    preemption.restore()
  return {'step': step, 'preempted': preempted, **train_scalars, **eval_scalars}
