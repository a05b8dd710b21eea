"""Learning-rate schedule and weight-decay mask."""

import jax
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


def test_warmup_longer_than_the_run_warns_that_it_never_decays(caplog):
  """warmup 5 epochs of a 3-epoch run: the updates (counts 0..29) only warm
  up, the last at the peak; the log says so."""
  tc = base.get_train_config()
  tc.update(learning_rate=1e-3, min_learning_rate=1e-5, warmup_epochs=5.0)
  with caplog.at_level('WARNING'):
    schedule = optimizer.create_learning_rate_schedule(tc, steps_per_epoch=10, total_steps=30)
  assert 'train.warmup_epochs=5.0 is 50 steps, not fewer than the run\'s 30' in caplog.text
  np.testing.assert_allclose(schedule(14.5), 5e-4, rtol=1e-6)  # Half of 29 warmup steps.
  np.testing.assert_allclose(schedule(29), 1e-3, rtol=1e-6)  # The last update.


def test_warmup_shorter_than_the_run_does_not_warn(caplog):
  tc = base.get_train_config()
  tc.update(warmup_epochs=2.9)
  with caplog.at_level('WARNING'):
    optimizer.create_learning_rate_schedule(tc, steps_per_epoch=10, total_steps=30)
  assert 'warmup_epochs' not in caplog.text


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


# ---------------------------------------------------------------------------
# Clipping + AdamW against numpy, step by step.

# b1 != b2 (and both far from optax's defaults) so that swapping them shows.
_B1, _B2, _EPS = 0.8, 0.95, 1e-8  # eps: optax.adamw's default; no config field.
_PEAK, _FLOOR, _WD, _CLIP = 0.1, 0.01, 0.2, 1.0
_WARMUP, _TOTAL = 2, 10  # steps_per_epoch 2 x warmup_epochs 1.0; 10 steps.


def _train_config():
  tc = base.get_train_config()
  tc.update(b1=_B1, b2=_B2, learning_rate=_PEAK, min_learning_rate=_FLOOR,
            weight_decay=_WD, grad_clip_norm=_CLIP, warmup_epochs=1.0,
            grad_accum_steps=1)
  return tc


def _hand_learning_rate(step: int) -> float:
  """Linear warmup from 0, then cosine from the peak to the floor."""
  if step < _WARMUP:
    return _PEAK * step / _WARMUP
  progress = (step - _WARMUP) / (_TOTAL - _WARMUP)
  return _FLOOR + (_PEAK - _FLOOR) * 0.5 * (1 + np.cos(np.pi * progress))


def _params():
  rng = np.random.default_rng(1)
  return {'dense': {'kernel': rng.normal(size=(2, 3)),
                    'bias': rng.normal(size=(3,))},
          'relative_position_bias_table': rng.normal(size=(4, 2))}


# Per the weight_decay_mask docstring: matrices only, not bias tables.
_DECAYED = {'dense': {'kernel': True, 'bias': False},
            'relative_position_bias_table': False}


def _grads(global_norms):
  """One gradient tree per step, scaled to the given global norms."""
  rng = np.random.default_rng(2)
  out = []
  for norm in global_norms:
    g = jax.tree.map(lambda p: rng.normal(size=p.shape), _params())
    scale = norm / np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(g)))
    out.append(jax.tree.map(lambda x, s=scale: x * s, g))
  return out


def _numpy_adamw(params, grads_per_step):
  """Reference: clip by global norm, then AdamW, written out per leaf."""
  leaves, treedef = jax.tree.flatten(params)
  decayed = jax.tree.leaves(_DECAYED)
  p = [np.array(x, np.float64) for x in leaves]
  m = [np.zeros_like(x) for x in p]
  v = [np.zeros_like(x) for x in p]
  history = []
  for step, grads in enumerate(grads_per_step):
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    norm = np.sqrt(sum(np.sum(x**2) for x in g))
    if norm >= _CLIP:  # Below the clip norm gradients pass unchanged.
      g = [x * _CLIP / norm for x in g]
    t = step + 1  # Bias correction counts this update.
    lr = _hand_learning_rate(step)  # The schedule at the update count before it.
    for i in range(len(p)):
      m[i] = _B1 * m[i] + (1 - _B1) * g[i]
      v[i] = _B2 * v[i] + (1 - _B2) * g[i]**2
      m_hat = m[i] / (1 - _B1**t)
      v_hat = v[i] / (1 - _B2**t)
      update = m_hat / (np.sqrt(v_hat) + _EPS)
      if decayed[i]:
        update = update + _WD * p[i]  # Decoupled: of the old param, times lr.
      p[i] = p[i] - lr * update
    history.append(jax.tree.unflatten(treedef, [x.copy() for x in p]))
  return history


def _run_optax(params, grads_per_step):
  tc = _train_config()
  schedule = optimizer.create_learning_rate_schedule(
      tc, steps_per_epoch=2, total_steps=_TOTAL)
  tx = optimizer.create_optimizer(tc, schedule)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(params)
  history = []
  for grads in grads_per_step:
    grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history


def test_clip_then_adamw_matches_numpy_over_steps():
  # Steps 0 and 2 are clipped (norms 10 and 3 > 1), steps 1, 3 and 4 are not
  # (0.5, 0.2, 0.7). The learning rate is 0 at step 0, then 0.05, the peak,
  # and down the cosine: every step's schedule value and both moment rates
  # change the result, and since Adam is scale-invariant only in a single
  # step, the clipping shows through the changing norms.
  norms = [10.0, 0.5, 3.0, 0.2, 0.7]
  grads = _grads(norms)
  expected = _numpy_adamw(_params(), grads)
  actual = _run_optax(_params(), grads)
  for step, (want, got) in enumerate(zip(expected, actual)):
    jax.tree.map(
        lambda w, g, s=step: np.testing.assert_allclose(
            g, w, rtol=2e-5, atol=1e-6, err_msg=f'step {s}'), want, got)


def test_first_update_is_zero_at_the_start_of_warmup():
  # Warmup starts at 0, so the first update leaves the params alone (the
  # moments it updates are checked by the next steps against numpy above).
  grads = _grads([10.0])
  actual = _run_optax(_params(), grads)[0]
  jax.tree.map(lambda w, g: np.testing.assert_allclose(g, w, rtol=1e-6),
               _params(), actual)


def test_gradient_below_clip_norm_is_not_rescaled():
  # One step at the peak learning rate on a tiny gradient (norm ~1e-8, far
  # below the clip norm of 1). Adam's first step is g / (|g| + eps), so the
  # absolute size of the gradient shows against eps = 1e-8: rescaling it to
  # the clip norm would give -lr * sign(g) instead.
  tc = _train_config()
  tc.update(weight_decay=0.0)
  tx = optimizer.create_optimizer(tc, optax.constant_schedule(_PEAK))
  params = {'kernel': jnp.zeros((2, 2))}
  g = np.array([[1e-8, -2e-8], [3e-8, -0.5e-8]])
  updates, _ = tx.update({'kernel': jnp.asarray(g, jnp.float32)},
                         tx.init(params), params)
  # m_hat = g, sqrt(v_hat) = |g| on the first step.
  expected = -_PEAK * g / (np.abs(g) + _EPS)  # -0.05, +0.0667, -0.075, +0.0333.
  np.testing.assert_allclose(updates['kernel'], expected, rtol=1e-4)


def test_gradient_above_clip_norm_is_rescaled_to_it():
  # Adam's first step alone hides any rescaling (it is ~sign(g)); the second
  # step mixes a clipped and an unclipped gradient, so there the clip shows.
  tc = _train_config()
  tc.update(weight_decay=0.0)
  tx = optimizer.create_optimizer(tc, optax.constant_schedule(_PEAK))
  params = {'w': jnp.zeros((2,))}
  state = tx.init(params)
  # Step 1: [6, 8] (norm 10) is clipped to [0.6, 0.8]. Step 2: [0.3, 0] (norm
  # 0.3) passes. By hand with b1 = 0.8, b2 = 0.95:
  #   m = 0.8 * 0.2 * [0.6, 0.8] + 0.2 * [0.3, 0] = [0.156, 0.128]
  #   v = 0.95 * 0.05 * [0.36, 0.64] + 0.05 * [0.09, 0] = [0.0216, 0.0304]
  #   m_hat = m / (1 - 0.64) = m / 0.36,  v_hat = v / (1 - 0.9025) = v / 0.0975
  _, state = tx.update({'w': jnp.array([6.0, 8.0])}, state, params)
  updates, _ = tx.update({'w': jnp.array([0.3, 0.0])}, state, params)
  m_hat = np.array([0.156, 0.128]) / 0.36
  v_hat = np.array([0.0216, 0.0304]) / 0.0975
  np.testing.assert_allclose(updates['w'], -_PEAK * m_hat / np.sqrt(v_hat),
                             rtol=1e-5)
