"""AdamW with linear warmup + cosine decay, as in Swin / DeiT."""

import jax
import ml_collections
import optax
from absl import logging


def create_learning_rate_schedule(train_config: ml_collections.ConfigDict,
                                  steps_per_epoch: int,
                                  total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to learning_rate, then cosine to min_learning_rate.

  Steps are optimizer steps, one per global batch.
  """
  warmup_steps = int(train_config.warmup_epochs * steps_per_epoch)
  if warmup_steps >= total_steps:
    # Updates use counts 0 .. total_steps - 1; optax's cosine needs a count
    # after the warmup, which the run never reaches.
    logging.warning(
        'train.warmup_epochs=%s is %d steps, not fewer than the run\'s %d: the learning '
        'rate only rises, to train.learning_rate=%g at the last update, and never decays.',
        train_config.warmup_epochs, warmup_steps, total_steps, train_config.learning_rate)
    warmup_steps = total_steps - 1
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=train_config.learning_rate,
      warmup_steps=warmup_steps,
      decay_steps=total_steps,
      end_value=train_config.min_learning_rate)


def weight_decay_mask(params: optax.Params) -> optax.Params:
  """True for parameters that get weight decay.

  Excluded: 1-D arrays (LayerNorm scale/bias, Linear biases) and relative
  position bias tables, whose decay only pulls attention towards uniform.
  """
  def decay(path, x) -> bool:
    names = [getattr(k, 'key', getattr(k, 'name', '')) for k in path]
    return x.ndim > 1 and 'relative_position_bias_table' not in names
  return jax.tree_util.tree_map_with_path(decay, params)


def create_optimizer(train_config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """Global-norm clipping + AdamW. (Gradient accumulation is the train step's.)"""
  tx = optax.adamw(schedule, b1=train_config.b1, b2=train_config.b2,
                   weight_decay=train_config.weight_decay,
                   mask=weight_decay_mask)
  if train_config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), tx)
  return tx
