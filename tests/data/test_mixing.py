"""Mixup / cutmix: label weights equal the pixel fractions that were mixed."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from hierarchical_vit.data import mixing
from hierarchical_vit.training import tasks

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
  # Seed 1 pastes a box (140 of 192 pixels): an empty paste would pass a
  # rectangle check vacuously, so it fails here instead.
  mixed, _ = mixing.mix_batch(jax.random.key(1), images, labels,
                              mixup_alpha=0.0, cutmix_alpha=1.0)
  pasted = np.asarray(mixed[0, :, :, B - 1] == 1)
  rows, cols = np.nonzero(pasted)
  assert 0 < rows.size < H * W
  assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


# Labels in no particular order, so the mirror's class is not a fixed function
# of the own class (e.g. not B - 1 - own).
CLASSES = np.array([3, 0, 5, 1, 4, 2])


def _source_batch():
  """Image i holds i + noise in [0, 0.5): floor(pixel) names its source image."""
  noise = np.random.default_rng(0).uniform(0, 0.5, (B, H, W, 3))
  images = (np.arange(B)[:, None, None, None] + noise).astype(np.float32)
  return images, np.eye(B, dtype=np.float32)[CLASSES]


def _mix(seed, **alphas):
  images, labels = _source_batch()
  mixed, mixed_labels = mixing.mix_batch(jax.random.key(seed), images, labels,
                                         **alphas)
  return images, np.asarray(mixed), np.asarray(mixed_labels)


def _own_and_partner_weights(mixed_labels):
  """(own class weight, weight on the mirror's class) per row, checking that
  no other class gets any weight."""
  own = mixed_labels[np.arange(B), CLASSES]
  partner = mixed_labels[np.arange(B), CLASSES[::-1]]
  np.testing.assert_allclose(own + partner, 1.0, atol=1e-6)
  return own, partner


def test_mixup_mixes_each_image_with_its_mirror():
  """The documented partner of example i is example B - 1 - i (the batch in
  reverse). Pairing an image with itself would keep one-hot rows."""
  for seed in range(4):
    images, mixed, mixed_labels = _mix(seed, mixup_alpha=0.8, cutmix_alpha=0.0)
    own, _ = _own_and_partner_weights(mixed_labels)
    lam = own[0]
    assert 0.0 < lam < 1.0, seed
    np.testing.assert_allclose(own, lam, atol=1e-6)  # One lam per batch.
    expected = lam * images + (1 - lam) * images[::-1]
    np.testing.assert_allclose(mixed, expected, atol=1e-5)


def test_cutmix_pastes_the_mirrors_pixels():
  for seed in range(4):
    images, mixed, mixed_labels = _mix(seed, mixup_alpha=0.0, cutmix_alpha=1.0)
    own, _ = _own_and_partner_weights(mixed_labels)
    source = np.floor(mixed).astype(int)
    box = source[0, :, :, 0] == B - 1  # Where image 0 shows its mirror.
    rows, cols = np.nonzero(box)
    assert 0 < rows.size < H * W, seed  # Each of these seeds pastes a box.
    assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    # The same box in every example, filled with its own mirror's pixels
    # (all channels), and the label weight is the area kept.
    expected = np.where(box[None, :, :, None], images[::-1], images)
    np.testing.assert_array_equal(mixed, expected)
    np.testing.assert_allclose(own, 1.0 - box.mean(), atol=1e-6)
    assert 0.0 < own[0] < 1.0


def test_disabled_and_zero_prob_leave_batch_unchanged():
  images, labels = _identity_batch()
  for kwargs in ({'mixup_alpha': 0.0, 'cutmix_alpha': 0.0},
                 {'mixup_alpha': 1.0, 'cutmix_alpha': 1.0, 'mix_prob': 0.0}):
    out_images, out_labels = mixing.mix_batch(jax.random.key(0), images,
                                              labels, **kwargs)
    np.testing.assert_array_equal(out_images, images)
    np.testing.assert_array_equal(out_labels, labels)


@pytest.mark.parametrize('mixup_alpha,cutmix_alpha', [(0.8, 0.0), (0.0, 1.0)])
def test_classification_targets_are_mixed_when_enabled(mixup_alpha,
                                                       cutmix_alpha):
  """The train step's targets (tasks.make_targets) go through the mixing: with
  either alpha on, the targets are no longer one_hot(label)."""
  config = base.get_config()
  config.model.num_classes = B
  config.data.update(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)
  images, one_hot = _source_batch()
  batch = {'image': images, 'label': CLASSES}
  out_images, targets = tasks.get_task('classification').make_targets(config)(
      batch, jax.random.key(1))
  assert not np.allclose(targets, one_hot)
  own, _ = _own_and_partner_weights(np.asarray(targets))
  assert ((0.0 < own) & (own < 1.0)).all()
  assert not np.array_equal(np.asarray(out_images), images)


def test_classification_targets_are_one_hot_without_mixing():
  config = base.get_config()
  config.model.num_classes = B
  images, one_hot = _source_batch()
  out_images, targets = tasks.get_task('classification').make_targets(config)(
      {'image': images, 'label': CLASSES}, jax.random.key(1))
  np.testing.assert_array_equal(targets, one_hot)
  np.testing.assert_array_equal(out_images, images)


def test_both_alphas_use_both_methods_and_mix_prob_skips_batches():
  """With both alphas each batch is cutmix (pixels from one source: 0/1 in the
  identity batch) or mixup (every pixel blended), about half each; mix_prob =
  0.25 leaves about 3 batches in 4 unchanged."""
  images, labels = _identity_batch()
  kinds = []
  for seed in range(40):
    mixed, _ = mixing.mix_batch(jax.random.key(seed), images, labels,
                                mixup_alpha=0.8, cutmix_alpha=1.0)
    binary = np.all(np.isin(np.asarray(mixed), (0.0, 1.0)))
    kinds.append('cutmix' if binary else 'mixup')
  assert 10 <= kinds.count('cutmix') <= 30, kinds
  unchanged = sum(
      bool(np.array_equal(mixing.mix_batch(jax.random.key(seed), images, labels,
                                           mixup_alpha=0.8, cutmix_alpha=0.0,
                                           mix_prob=0.25)[0], images))
      for seed in range(40))
  assert 22 <= unchanged <= 38, unchanged


def test_each_method_draws_its_weight_from_its_own_beta():
  """Over 4000 batches with both methods on (mixup_alpha 0.2, cutmix_alpha 8):
  mixup's weights have Beta(0.2, 0.2)'s variance 1 / (4 (2 alpha + 1)) =
  0.179 (Beta(8, 8)'s is 0.0147); cutmix's pasted areas, clipped at the
  borders, vary by 0.014 here, 0.060 with cutmix_alpha 0.2 (measured), so a
  swap of the alphas, or one alpha for both, fails."""
  ones = jnp.ones((2, 16, 16, 1)).at[1].set(0.0)  # Example 0 is 1s, its mirror 0s.
  labels = jnp.eye(2)

  def draw(key):
    mixed, mixed_labels = mixing.mix_batch(key, ones, labels, mixup_alpha=0.2, cutmix_alpha=8.0)
    return mixed[0], mixed_labels[0, 0]

  mixed, weights = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(0), 4000))
  mixed, weights = np.asarray(mixed), np.asarray(weights)
  cutmix = np.all(np.isin(mixed, (0.0, 1.0)), axis=(1, 2, 3))
  assert 0.45 < cutmix.mean() < 0.55
  mixup_weights = weights[~cutmix]
  assert mixup_weights.var(ddof=1) == pytest.approx(1 / (4 * 1.4), rel=0.1)
  assert mixup_weights.mean() == pytest.approx(0.5, abs=0.03)
  pasted = 1.0 - weights[cutmix]  # The mirror's share: the clipped box's area.
  assert pasted.var(ddof=1) < 0.03
