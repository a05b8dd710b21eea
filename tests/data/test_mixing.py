"""Mixup / cutmix: label weights equal the pixel fractions that were mixed."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hierarchical_vit.data import mixing

B, H, W = 6, 16, 12


def _identity_batch():
  """Image i has the one-hot of i in every pixel, so pixel means reveal sources."""
  labels = jnp.eye(B)
  images = jnp.broadcast_to(labels[:, None, None, :], (B, H, W, B))
  return images, labels


@pytest.mark.parametrize('mixup_alpha,cutmix_alpha', [(0.8, 0.0), (0.0, 1.0),
                                                      (0.8, 1.0)])
def test_label_weights_equal_pixel_fractions(mixup_alpha, cutmix_alpha):
  images, labels = _identity_batch()
  mix = jax.jit(functools.partial(mixing.mix_batch, mixup_alpha=mixup_alpha,
                                  cutmix_alpha=cutmix_alpha))
  for seed in range(6):
    mixed, mixed_labels = mix(jax.random.key(seed), images, labels)
    np.testing.assert_allclose(mixed.mean(axis=(1, 2)), mixed_labels,
                               atol=1e-5)
    np.testing.assert_allclose(mixed_labels.sum(-1), 1.0, atol=1e-6)
    # Each example mixes only with its mirror in the batch.
    partners = np.asarray(mixed_labels > 1e-6)
    assert all(set(np.nonzero(partners[i])[0]) <= {i, B - 1 - i}
               for i in range(B))


def test_cutmix_pastes_a_rectangle():
  images, labels = _identity_batch()
  mixed, _ = mixing.mix_batch(jax.random.key(1), images, labels,
                              mixup_alpha=0.0, cutmix_alpha=1.0)
  pasted = np.asarray(mixed[0, :, :, B - 1] == 1)
  rows, cols = np.nonzero(pasted)
  if rows.size:
    assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_disabled_and_zero_prob_leave_batch_unchanged():
  images, labels = _identity_batch()
  for kwargs in ({'mixup_alpha': 0.0, 'cutmix_alpha': 0.0},
                 {'mixup_alpha': 1.0, 'cutmix_alpha': 1.0, 'mix_prob': 0.0}):
    out_images, out_labels = mixing.mix_batch(jax.random.key(0), images,
                                              labels, **kwargs)
    np.testing.assert_array_equal(out_images, images)
    np.testing.assert_array_equal(out_labels, labels)
