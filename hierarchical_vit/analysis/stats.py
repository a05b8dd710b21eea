"""Small-sample statistics for seed sweeps.

With 3 seeds per variant a normal approximation understates the uncertainty
badly (z = 1.96 vs t = 4.30 at 2 degrees of freedom), so differences get
Welch's t interval, and where runs pair up by seed the paired t interval; each
difference also gets its t-test p-value, Holm-adjusted across a sweep's
comparisons.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import special


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof = 1; 0.0 for a single value)."""
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if values.size > 1 else 0.0
  return float(values.mean()), std


def mean_std_text(mean: float, std: float, n: int, show: Callable[[float], str] = str) -> str:
  """'mean ± std' as tables print it; the mean alone for one run, whose std
  (0.0 from mean_std) would read as a measured spread."""
  return f'{show(mean)} ± {show(std)}' if n > 1 else show(mean)


def t_quantile(p: float, df: float) -> float:
  """Student t quantile for p in [0.5, 1) (df may be fractional: Welch's)."""
  if not 0.5 <= p < 1:
    raise ValueError(f't_quantile needs 0.5 <= p < 1, got p={p}')
  if df <= 0:
    raise ValueError(f't_quantile needs df > 0, got df={df}')
  return float(special.stdtrit(df, p))


def two_sided_p(mean: float, std_error: float, df: float) -> float:
  """The two-sided p-value of the t statistic mean / std_error under `df`:
  I_{df / (df + t^2)}(df / 2, 1 / 2), the regularized incomplete beta.

  A zero standard error gives 0 for a nonzero mean (no spread, yet a
  difference) and 1 for a zero one.
  """
  if std_error == 0:
    return 1.0 if mean == 0 else 0.0
  t = mean / std_error
  return float(special.betainc(df / 2, 0.5, df / (df + t * t)))


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm's step-down adjustment of m p-values (Holm 1979), in their order.

  Rejecting where the adjusted p < alpha keeps the chance of any false
  rejection among the m at most alpha, as Bonferroni does, with more power:
  the i-th smallest p is multiplied by m - i (i from 0), and the adjusted
  values are made non-decreasing in that order.
  """
  m = len(p_values)
  adjusted = [0.0] * m
  running = 0.0
  for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
    running = max(running, min(1.0, (m - rank) * p_values[index]))
    adjusted[index] = running
  return adjusted


@dataclasses.dataclass(frozen=True)
class Difference:
  """mean(a) - mean(b) with its standard error, confidence interval and
  two-sided t-test p-value (unadjusted)."""
  mean: float
  std_error: float
  df: float
  ci_low: float
  ci_high: float
  p_value: float


def _difference(mean: float, std_error: float, df: float, confidence: float) -> Difference:
  """The t interval and p-value of `mean` (a point, without spread)."""
  half = t_quantile(0.5 + confidence / 2, df) * std_error if std_error else 0.0
  return Difference(mean, std_error, df, mean - half, mean + half,
                    two_sided_p(mean, std_error, df))


def welch_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                     confidence: float = 0.95) -> Difference:
  """Welch's unequal-variance t interval for mean(a) - mean(b).

  Needs >= 2 values on each side; with zero variance on both sides the
  interval collapses to the point difference.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.size < 2 or b.size < 2:
    raise ValueError(f'welch_difference needs >= 2 values per side, got '
                     f'{a.size} and {b.size}')
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  diff = float(a.mean() - b.mean())
  se = math.sqrt(va + vb)
  if se == 0:
    return _difference(diff, 0.0, math.inf, confidence)
  # Welch-Satterthwaite degrees of freedom.
  df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
  return _difference(diff, se, df, confidence)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                      confidence: float = 0.95) -> Difference:
  """The paired t interval for the mean of a[i] - b[i] (df = n - 1).

  For runs paired by seed: two variants trained with one seed see the same
  data order and augmentation, so what the seed adds to both cancels in their
  difference, and the interval can be tighter than Welch's, which ignores it.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.size < 2:
    raise ValueError(f'paired_difference needs two sequences of one length >= 2, got '
                     f'{a.size} and {b.size} values')
  d = a - b
  diff, df = float(d.mean()), d.size - 1
  se = float(d.std(ddof=1)) / math.sqrt(d.size)
  return _difference(diff, se, df, confidence)
