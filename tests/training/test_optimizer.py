"""Learning-rate schedule and weight-decay mask."""

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs import base
from hierarchical_vit.training import optimizer


def test_schedule_warmup_then_cosine():
  tc = base.get_train_config()
  tc.update(learning_rate=1e-3, min_learning_rate=1e-5, warmup_epochs=2.0)
  schedule = optimizer.create_learning_rate_schedule(
      tc, steps_per_epoch=10, total_steps=100)
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(10), 5e-4, rtol=1e-6)  # Half of warmup.
  np.testing.assert_allclose(schedule(20), 1e-3, rtol=1e-6)  # Peak.
  midpoint = 1e-5 + 0.5 * (1e-3 - 1e-5)  # Cosine half-way through the decay.
  np.testing.assert_allclose(schedule(60), midpoint, rtol=1e-5)
  np.testing.assert_allclose(schedule(100), 1e-5, rtol=1e-6)


class _Block(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.dense = nnx.Linear(8, 8, rngs=rngs)
    self.relative_position_bias_table = nnx.Param(jnp.zeros((9, 2)))


def test_weight_decay_mask():
  params = nnx.to_pure_dict(nnx.state(_Block(nnx.Rngs(0)), nnx.Param))
  mask = optimizer.weight_decay_mask(params)
  assert mask == {'norm': {'scale': False, 'bias': False},
                  'dense': {'kernel': True, 'bias': False},
                  'relative_position_bias_table': False}


def test_weight_decay_applies_to_masked_params_only():
  tc = base.get_train_config()
  tc.update(weight_decay=0.5, grad_clip_norm=0.0)
  tx = optimizer.create_optimizer(tc, optax.constant_schedule(0.1))
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}
  zero_grads = {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros((2,))}
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates['kernel'], -0.05)  # -lr * wd * param.
  np.testing.assert_allclose(updates['bias'], 0.0)
