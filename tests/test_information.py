"""The linear-inverse information-loss measure of the downsamplers."""

import subprocess
import sys

import flax.linen as nn
import numpy as np
import pytest

from configs import quickstart
from hierarchical_vit import information
from hierarchical_vit.resampling import DOWNSAMPLERS
from tests.conftest import REPO
from tests.test_resampling import _numpy_blur, _numpy_soft_pool, _numpy_zhang_max_blur_pool
from tests.test_shift_consistency import _fake_run


def _rows(features: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Explicit 2x2 loops: ([feature token, 1] rows, flattened 2x2 block rows)."""
  n, h, w, _ = images.shape
  rows_in, rows_out = [], []
  for b in range(n):
    for i in range(h // 2):
      for j in range(w // 2):
        rows_out.append(images[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2].ravel())
        rows_in.append(np.append(features[b, i, j], 1.0))
  return np.array(rows_in), np.array(rows_out)


def _reference_error(features: np.ndarray, images: np.ndarray,
                     test_features: np.ndarray | None = None,
                     test_images: np.ndarray | None = None) -> float:
  """Independent reference: lstsq fit on (features, images), error on the test
  pair (the same data if none is given)."""
  x, y = _rows(features, images)
  if test_images is not None:
    x_test, y_test = _rows(test_features, test_images)
  else:
    x_test, y_test = x, y
  fit = x_test @ np.linalg.lstsq(x, y, rcond=None)[0]
  return np.linalg.norm(y_test - fit) / np.linalg.norm(y_test - y_test.mean(0))


def _reference_reduced_rank_sse(x: np.ndarray, y: np.ndarray, rank: int) -> tuple[float, float]:
  """(residual, total) sums of squares of the best rank-`rank` affine map from
  rows x (with a ones column) to y, fitted and measured on the same rows, by
  Pythagoras: the OLS residual plus the fitted values' discarded variance (the
  smallest eigenvalues of their covariance), instead of projecting."""
  fitted = x @ np.linalg.lstsq(x, y, rcond=None)[0]
  centred = fitted - fitted.mean(0)
  eigenvalues = np.sort(np.linalg.eigvalsh(centred.T @ centred))[::-1]
  residual = np.sum((y - fitted) ** 2) + eigenvalues[rank:].sum()
  return residual, np.sum((y - y.mean(0)) ** 2)


def _windows_3x3(channel: np.ndarray) -> np.ndarray:
  """(N, H, W) -> (N, H/2, W/2, 9): the 3x3 window around (2i, 2j) at stride
  2, zeros outside, by explicit loops."""
  n, h, w = channel.shape
  out = np.zeros((n, h // 2, w // 2, 9))
  for i in range(h // 2):
    for j in range(w // 2):
      for k, (dy, dx) in enumerate((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
        y, x = 2 * i + dy, 2 * j + dx
        if 0 <= y < h and 0 <= x < w:
          out[:, i, j, k] = channel[:, y, x]
  return out


@pytest.fixture
def images() -> np.ndarray:
  return np.random.default_rng(0).normal(size=(16, 8, 8, 3))


def test_blocks_stay_float64_numpy_and_need_even_sizes(images):
  assert isinstance(information.blocks(images), np.ndarray)
  assert information.blocks(images).dtype == np.float64
  with pytest.raises(ValueError, match=r'even height and width.*\(16, 7, 8, 3\)'):
    information.blocks(images[:, :7])


def test_space_to_depth_is_lossless(images):
  assert information.reconstruction_error(information.blocks, images, images) < 1e-10


def test_pooling_loses_against_lstsq_reference(images):
  for reduce in (np.mean, np.max):
    features = information.pool(images, reduce)
    error = information.reconstruction_error(lambda x, r=reduce: information.pool(x, r),
                                             images, images)
    assert error == pytest.approx(_reference_error(features, images), rel=1e-9)
    assert error > 0.5  # i.i.d. pixels: the mean or max says little about the other 3.
  # Average pooling keeps exactly the block mean: 1 of 4 equal-variance directions.
  big = np.random.default_rng(1).normal(size=(64, 16, 16, 1))
  error = information.reconstruction_error(lambda x: information.pool(x, np.mean), big, big)
  assert error == pytest.approx(np.sqrt(3 / 4), abs=0.01)


def test_merge_bound_keeps_half_of_white_noise():
  big = np.random.default_rng(2).normal(size=(64, 16, 16, 2))
  assert information.pca_error(big, big) == pytest.approx(np.sqrt(1 / 2), abs=0.02)


def test_ordering_on_smooth_images():
  """Correlated neighbours (like real images): merging keeps far more than pooling."""
  rng = np.random.default_rng(3)
  noise = rng.normal(size=(64, 17, 17, 1))
  smooth = (noise[:, 1:, 1:] + noise[:, :-1, 1:] + noise[:, 1:, :-1] + noise[:, :-1, :-1])
  errors = information.downsampler_errors(smooth[:48], smooth[48:])
  assert errors['space_to_depth'] < 1e-6
  assert errors['patch_merge'] < errors['avg_pool'] < 1.0
  assert errors['patch_merge'] < errors['max_pool'] < 1.0
  # At C = 1, rank 2 per channel is the 4C -> 2C bound: features read from the
  # 3x3 window still give a rank-2 reconstruction, which cannot beat the
  # block's own top-2 principal components (Eckart-Young), and can reach them.
  assert errors['depthwise_conv_pool'] == pytest.approx(errors['patch_merge'], rel=1e-6)
  assert errors['depthwise_conv_pool'] > 0.1


def test_every_downsampler_has_a_measure_and_the_blurs_match_numpy():
  rng = np.random.default_rng(4)
  noise = rng.normal(size=(48, 13, 13, 2))
  smooth = noise[:, 1:, 1:] + noise[:, :-1, 1:] + noise[:, 1:, :-1] + noise[:, :-1, :-1]
  errors = information.downsampler_errors(smooth, smooth)
  assert set(errors) == set(DOWNSAMPLERS)
  assert errors['blur_pool'] == pytest.approx(
      _reference_error(_numpy_blur(smooth, 3, 2), smooth), rel=1e-4)
  # 12 x 12: even sides, where max_blur_pool is Zhang's whole.
  assert errors['max_blur_pool'] == pytest.approx(
      _reference_error(_numpy_zhang_max_blur_pool(smooth, 3), smooth), rel=1e-4)
  assert errors['soft_pool'] == pytest.approx(
      _reference_error(_numpy_soft_pool(smooth), smooth), rel=1e-4)
  nest_pool = np.asarray(nn.max_pool(smooth, (3, 3), (2, 2), padding='SAME'))
  assert errors['conv_max_pool'] == pytest.approx(_reference_error(nest_pool, smooth), rel=1e-4)
  # blur_merge: the best rank-2C map of the blurred 2x2 block (4C features).
  residual, total = _reference_reduced_rank_sse(*_rows(blocks_of(_numpy_blur(smooth, 3, 1)),
                                                       smooth), 2 * smooth.shape[-1])
  assert errors['blur_merge'] == pytest.approx(np.sqrt(residual / total), rel=1e-6)
  # conv (kernel 2) and patch_merge: the best rank-2C map of the block itself.
  residual, total = _reference_reduced_rank_sse(*_rows(blocks_of(smooth), smooth),
                                                2 * smooth.shape[-1])
  assert errors['conv'] == errors['patch_merge'] == pytest.approx(np.sqrt(residual / total),
                                                                  rel=1e-6)
  # Fitted and measured on the same images, no rank-2C map of any features
  # beats the blocks' own top 2C principal components (Eckart-Young); the
  # blur's zero at the Nyquist frequency loses what merging alone keeps.
  assert errors['patch_merge'] * 1.01 < errors['blur_merge'] < 1.0
  # depthwise_conv_pool at C = 2: per channel, rank 2 from its 3x3 window;
  # the channels' residuals and totals add up.
  sums = [_reference_reduced_rank_sse(*_rows(_windows_3x3(smooth[..., c]), smooth[..., c:c + 1]),
                                      2) for c in range(smooth.shape[-1])]
  assert errors['depthwise_conv_pool'] == pytest.approx(
      np.sqrt(sum(r for r, _ in sums) / sum(t for _, t in sums)), rel=1e-6)


def blocks_of(x: np.ndarray) -> np.ndarray:
  """(N, H, W, C) -> (N, H/2, W/2, 4C): each 2x2 block flattened (y, x, c), by slicing."""
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      n, h // 2, w // 2, 4 * c)


def test_fitted_on_train_measured_on_test():
  """The inverse is fitted on the first images only and judged on the others."""
  rng = np.random.default_rng(5)
  noise = rng.normal(size=(40, 9, 9, 1))
  smooth = noise[:, 1:, 1:] + noise[:, :-1, 1:] + noise[:, 1:, :-1] + noise[:, :-1, :-1]
  train, test = smooth[:30], smooth[30:]
  mean = lambda x: information.pool(x, np.mean)
  held_out = information.reconstruction_error(mean, train, test)
  assert held_out == pytest.approx(
      _reference_error(mean(train), train, mean(test), test), rel=1e-9)
  assert held_out != pytest.approx(_reference_error(mean(test), test), rel=1e-3)


def test_information_refuses_runs_of_other_data(tmp_path):
  config = quickstart.get_config()
  same = _fake_run(tmp_path / 'a-seed0')
  information.check_runs_match(config, [same])
  canvas = _fake_run(tmp_path / 'b-seed0', name='fashion_mnist_canvas', image_size=64)
  with pytest.raises(ValueError, match=r"b-seed0 trained with data.name='fashion_mnist_canvas' "
                                       r"\(--config: 'fashion_mnist'\), data.image_size=64 "
                                       r'\(--config: 32\); measure it with its own config'):
    information.check_runs_match(config, [same, canvas])
  config.data.update(mean=(0.3,), std=(0.4,))  # Normalized other than the run was.
  with pytest.raises(ValueError, match=r'a-seed0 trained with data.mean=\(\) \(--config: '
                                       r'\(0.3,\)\), data.std=\(\) \(--config: \(0.4,\)\)'):
    information.check_runs_match(config, [same])


@pytest.mark.parametrize('module', ['hierarchical_vit.report', 'hierarchical_vit.information'])
def test_analysis_clis_require_a_config(module):
  proc = subprocess.run([sys.executable, '-m', module], cwd=REPO, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode != 0
  assert 'Flag --config must have a value other than None' in proc.stderr, proc.stderr[-2000:]
