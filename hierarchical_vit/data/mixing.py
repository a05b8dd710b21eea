"""On-device batch mixup / cutmix (jax.numpy, jit-compatible).

As in timm's Mixup(mode='batch') and big_vision: one mixing coefficient per
batch, and each example is mixed with its mirror in the batch (the batch in
reverse order), which needs no extra randomness and no gather.
"""

import jax
import jax.numpy as jnp


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array, *,
              mixup_alpha: float, cutmix_alpha: float,
              mix_prob: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Mixes a batch with its reverse by mixup or cutmix.

  The alphas and mix_prob are Python floats (static under jit, e.g. bind them
  with functools.partial). With both alphas > 0, each batch uses cutmix or
  mixup with probability 1/2; with probability 1 - mix_prob it is unchanged.

  Args:
    rng: a PRNG key.
    images: (B, H, W, C) floats.
    labels: (B, K) one-hot (or already smoothed) targets.
    mixup_alpha: Beta(alpha, alpha) of the mixup weight; 0 disables mixup.
    cutmix_alpha: Beta(alpha, alpha) of the cutmix area; 0 disables cutmix.
    mix_prob: probability that the batch is mixed at all.

  Returns:
    (images (B, H, W, C), labels (B, K)); label weights equal the pixel
    fractions each source contributes, so label rows still sum to 1.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, labels
  k_apply, k_choice, k_mixup, k_cutmix = jax.random.split(rng, 4)
  other_images, other_labels = images[::-1], labels[::-1]

  if cutmix_alpha > 0:
    cut_images, cut_lam = _cutmix(k_cutmix, images, other_images, cutmix_alpha)
  if mixup_alpha > 0:
    lam = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha)
    mix_images = lam * images + (1 - lam) * other_images
  if cutmix_alpha > 0 and mixup_alpha > 0:
    use_cutmix = jax.random.bernoulli(k_choice, 0.5)
    mixed = jnp.where(use_cutmix, cut_images, mix_images)
    lam = jnp.where(use_cutmix, cut_lam, lam)
  elif cutmix_alpha > 0:
    mixed, lam = cut_images, cut_lam
  else:
    mixed = mix_images

  if mix_prob < 1.0:
    apply = jax.random.bernoulli(k_apply, mix_prob)
    mixed = jnp.where(apply, mixed, images)
    lam = jnp.where(apply, lam, 1.0)
  lam = lam.astype(labels.dtype)
  return mixed.astype(images.dtype), lam * labels + (1 - lam) * other_labels


def cutmix_box(rng: jax.Array, height: int, width: int,
               lam: jax.Array) -> jax.Array:
  """A random box mask (H, W), True inside, covering about 1 - lam of the image.

  The box centre is uniform and the box is clipped at the borders (as in the
  CutMix paper), so the true area is smaller near edges; callers must use the
  mask's actual area for the labels.
  """
  k_y, k_x = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = (height * ratio).astype(jnp.int32)
  cut_w = (width * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  rows = jnp.arange(height)
  cols = jnp.arange(width)
  in_rows = (rows >= cy - cut_h // 2) & (rows < cy - cut_h // 2 + cut_h)
  in_cols = (cols >= cx - cut_w // 2) & (cols < cx - cut_w // 2 + cut_w)
  return in_rows[:, None] & in_cols[None, :]


def _cutmix(rng: jax.Array, images: jax.Array, other_images: jax.Array,
            alpha: float) -> tuple[jax.Array, jax.Array]:
  """Pastes a box of other_images into images; returns (images, kept fraction)."""
  k_lam, k_box = jax.random.split(rng)
  _, height, width, _ = images.shape
  lam = jax.random.beta(k_lam, alpha, alpha)
  box = cutmix_box(k_box, height, width, lam)
  kept = 1.0 - box.mean()
  return jnp.where(box[None, :, :, None], other_images, images), kept
