"""Aggregates a sweep's run results (result.json dicts) into tables and plots.

  results.csv                 one row per run
  results.md                  per variant: metric mean ± std over seeds, n,
                              params, GFLOPs, train img/s (and the information
                              loss of its resampling and its shift consistency
                              if information.json / shift_consistency.json are
                              there); the sweep's grid, if it has one; its
                              comparisons a - b with Welch 95% confidence
                              intervals, and paired-by-seed ones, and
                              Holm-adjusted t-test p-values
  metric_vs_params.png        metric vs parameters, ±1 sample std error bars
  metric_vs_gflops.png        metric vs forward GFLOPs per image
  learning_curves.png         eval metric per epoch, mean ± std over seeds
  grid.png                    (sweeps with a grid) metric per cell, bars
                              grouped by row, ±1 sample std error bars

A crossed sweep (e.g. upsampler x downsampler) names its layout in
`sweep.grid`: {'rows': (...), 'columns': (...), 'cell': '{column}+{row}'},
`cell` formatting each (row, column) into the name of that cell's variant.
"""

import csv
import io
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use('Agg')  # Headless: no display on training machines.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib import ticker  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np

from hierarchical_vit import files, shift_consistency
from hierarchical_vit.analysis import stats

Result = dict[str, Any]
# The sweep's metric is a column too, named after it (e.g. 'eval/miou').
CSV_COLUMNS = ('run', 'variant', 'seed', 'test_loss', 'params', 'gflops',
               'train_img_per_sec', 'wall_time_s', 'steps', 'date', 'overrides')


def metric_of(result: Result, metric: str) -> float:
  if metric not in result['eval']:
    raise ValueError(f'sweep.metric={metric!r} is not among run {result["run"]}\'s '
                     f'final eval metrics {sorted(result["eval"])}')
  return float(result['eval'][metric])


def grid_cells(grid: ml_collections.ConfigDict) -> dict[tuple[str, str], str]:
  """{(row, column): variant name} of a sweep.grid."""
  try:
    return {(row, column): grid.cell.format(row=row, column=column)
            for row in grid.rows for column in grid.columns}
  except (KeyError, IndexError) as e:
    raise ValueError(f'sweep.grid.cell={grid.cell!r} may only use the placeholders '
                     '{row} and {column}') from e


def by_variant(results: Sequence[Result]) -> dict[str, list[Result]]:
  """Results grouped by variant, in order of first appearance."""
  groups: dict[str, list[Result]] = {}
  for result in results:
    groups.setdefault(result['variant'], []).append(result)
  return groups


def variant_table(results: Sequence[Result], metric: str) -> list[dict[str, Any]]:
  """Per variant: n, mean and std of the metric, params, GFLOPs, mean img/s."""
  rows = []
  for variant, group in by_variant(results).items():
    mean, std = stats.mean_std([metric_of(r, metric) for r in group])
    speeds = [r['train_img_per_sec'] for r in group if r['train_img_per_sec'] is not None]
    rows.append({'variant': variant, 'n': len(group), 'mean': mean, 'std': std,
                 'params': group[0]['params'], 'gflops': group[0]['gflops'],
                 'train_img_per_sec': float(np.mean(speeds)) if speeds else None})
  return rows


def comparison_table(results: Sequence[Result], metric: str,
                     comparisons: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
  """Per (a, b) with >= 2 runs each: mean(a) - mean(b), its std error, Welch
  95% CI and t-test p-value; with >= 2 seeds run by both, also the paired-by-
  seed interval and p-value (n_pairs, paired_std_error, paired_ci_low,
  paired_ci_high, paired_p_value). p_holm / paired_p_holm adjust the p-values
  over the table's comparisons (stats.holm): a sweep makes many, and at 5%
  each, one in twenty true nulls would read as a difference."""
  groups = by_variant(results)
  rows = []
  for a, b in comparisons:
    by_seed_a = {r['seed']: metric_of(r, metric) for r in groups.get(a, [])}
    by_seed_b = {r['seed']: metric_of(r, metric) for r in groups.get(b, [])}
    if len(by_seed_a) < 2 or len(by_seed_b) < 2:
      continue  # Not enough seeds finished yet for an interval.
    diff = stats.welch_difference(list(by_seed_a.values()), list(by_seed_b.values()))
    row = {'a': a, 'b': b, 'n_a': len(by_seed_a), 'n_b': len(by_seed_b), **vars(diff)}
    seeds = sorted(by_seed_a.keys() & by_seed_b.keys())
    if len(seeds) >= 2:
      paired = stats.paired_difference([by_seed_a[s] for s in seeds],
                                       [by_seed_b[s] for s in seeds])
      row.update(n_pairs=len(seeds), paired_std_error=paired.std_error,
                 paired_ci_low=paired.ci_low, paired_ci_high=paired.ci_high,
                 paired_p_value=paired.p_value)
    rows.append(row)
  for p_key, holm_key in (('p_value', 'p_holm'), ('paired_p_value', 'paired_p_holm')):
    tested = [row for row in rows if p_key in row]
    for row, adjusted in zip(tested, stats.holm([row[p_key] for row in tested])):
      row[holm_key] = adjusted
  return rows


def write_csv(results: Sequence[Result], metric: str, path: str) -> None:
  columns = CSV_COLUMNS[:3] + (metric,) + CSV_COLUMNS[3:]
  text = io.StringIO()
  writer = csv.DictWriter(text, columns)
  writer.writeheader()
  for r in results:
    writer.writerow({**{k: r.get(k) for k in CSV_COLUMNS}, metric: metric_of(r, metric),
                     'overrides': json.dumps(r['overrides'], sort_keys=True)})
  files.write_text(path, text.getvalue())


def _percent(x: float) -> str:
  return f'{100 * x:.2f}'


def metric_scale(metric: str) -> tuple[float, str, str]:
  """(factor, unit suffix, unit of differences) a metric is shown in: the
  fractions (accuracies, IoU) in %, a loss as it is."""
  if metric.endswith('loss'):
    return 1.0, '', 'absolute'
  return 100.0, ' (%)', 'percentage points'


def _information_error(information: dict[str, float], overrides: dict) -> float | None:
  """The variant's downsampler's error: measured with the registry's default
  options, so none for a variant that changes them (e.g. a 3x3 max_pool)."""
  name = overrides.get('model.downsample', '')
  if any(key.startswith(f'model.downsample_options.{name}.') for key in overrides):
    return None
  return information.get(name)


def markdown(results: Sequence[Result], sweep: ml_collections.ConfigDict,
             information: dict[str, float] | None = None,
             shift: dict | None = None) -> str:
  """results.md: the variant table, the comparisons and what they mean.

  information: {downsampler: reconstruction error}; shift: a
  hierarchical_vit.shift_consistency result ({'variants': {variant: by_variant
  entry}, 'shift', 'max_shift', 'num_images'}); each adds a column.
  """
  metric = sweep.metric
  factor, unit, difference_unit = metric_scale(metric)
  show = lambda x: f'{factor * x:.{2 if factor > 1 else 4}f}'
  extra_header = (' recon. error |' if information else '') + (
      ' shift consistency (%) |' if shift else '')
  lines = [f'# Sweep `{sweep.name}`', '',
           f'Metric: final `{metric}`{" (in %)" if unit else ""}, mean ± sample std over seeds '
           f'{tuple(sweep.seeds)} (the value alone for n = 1); n = finished runs.', '',
           f'| variant | n | {metric}{unit} | params | GFLOPs/img | train img/s |{extra_header}',
           '|---|---|---|---|---|---|' + '---|' * (bool(information) + bool(shift))]
  overrides = {v['name']: v['overrides'] for v in sweep.variants}
  for row in variant_table(results, metric):
    speed = '' if row['train_img_per_sec'] is None else f'{row["train_img_per_sec"]:.0f}'
    extra = ''
    if information:
      error = _information_error(information, overrides[row['variant']])
      extra += ' – |' if error is None else f' {error:.3f} |'
    if shift:
      measured = shift['variants'].get(row['variant'])
      extra += ' – |' if measured is None else ' ' + stats.mean_std_text(
          measured['consistency'], measured['consistency_std'], measured['num_runs'],
          _percent) + ' |'
    lines.append(f'| {row["variant"]} | {row["n"]} | '
                 f'{stats.mean_std_text(row["mean"], row["std"], row["n"], show)} | '
                 f'{row["params"]:,} | {row["gflops"]:.4f} | {speed} |{extra}')
  if information:
    lines += ['', 'recon. error: ‖x − x̂‖ / ‖x − mean(x)‖ of the best affine inverse (least '
              'squares) from each output token to its 2x2 input block, on held-out images, '
              "for the variant's downsampler: its parameter-free resampling, or the best any "
              'learned map of its shape can do (hierarchical_vit/information.py; '
              "information.json); measured with the downsampler's default options, so – "
              'for a variant that changes them.']
  if shift:
    kind = shift_consistency.SHIFTS[shift['shift']].description
    lines += ['', 'shift consistency: how often the predicted class is the same for two random '
              f"{kind} of a held-out image by up to {shift['max_shift']} pixels per axis, on "
              f"{shift['num_images']} images (Zhang 2019; hierarchical_vit/shift_consistency.py; "
              'shift_consistency.json).']
  if 'grid' in sweep:
    lines += ['', f'## Grid: {metric}{unit}, mean ± std (n)', ''] + _grid_markdown(
        results, metric, sweep.grid, show)
  rows = comparison_table(results, metric, sweep.comparisons)
  if rows:
    lines += ['', f'## Differences a − b of {metric} ({difference_unit})', '',
              'Δ ± standard error, Welch t 95% confidence interval (df = Welch–Satterthwaite) '
              "and the Welch t-test's p-value. Paired: the same over the per-seed differences "
              '(df = n − 1) of the seeds both ran; runs of one seed share data order and '
              'augmentation, so it can be tighter. Each interval is for its comparison alone; '
              f'the p-values are Holm-adjusted over the {len(rows)} comparisons of the table, so '
              'read a difference as shown where its adjusted p < 0.05 (the chance that any '
              'of them is a false one then stays under 5%).', '',
              '| a − b | n | Δ ± s.e. | 95% CI | df | p (Holm) | paired 95% CI (n) | '
              'paired p (Holm) |',
              '|---|---|---|---|---|---|---|---|']
    for r in rows:
      paired, paired_p = '–', '–'
      if 'n_pairs' in r:
        paired = f'[{show(r["paired_ci_low"])}, {show(r["paired_ci_high"])}] ({r["n_pairs"]})'
        paired_p = f'{r["paired_p_holm"]:.2g}'
      lines.append(f'| {r["a"]} − {r["b"]} | {r["n_a"]}, {r["n_b"]} | '
                   f'{show(r["mean"])} ± {show(r["std_error"])} | '
                   f'[{show(r["ci_low"])}, {show(r["ci_high"])}] | {r["df"]:.1f} | '
                   f'{r["p_holm"]:.2g} | {paired} | {paired_p} |')
  return '\n'.join(lines) + '\n'


def _grid_markdown(results: Sequence[Result], metric: str, grid: ml_collections.ConfigDict,
                   show: Callable[[float], str]) -> list[str]:
  """Rows x columns table of the cells' mean ± std (n); '–' for cells not run yet."""
  table = {row['variant']: row for row in variant_table(results, metric)}
  lines = ['| | ' + ' | '.join(grid.columns) + ' |', '|---|' + '---|' * len(grid.columns)]
  cells = grid_cells(grid)
  for row_name in grid.rows:
    entries = []
    for column in grid.columns:
      row = table.get(cells[row_name, column])
      entries.append('–' if row is None else
                     f'{stats.mean_std_text(row["mean"], row["std"], row["n"], show)} ({row["n"]})')
    lines.append(f'| {row_name} | ' + ' | '.join(entries) + ' |')
  return lines


def plot_grid(results: Sequence[Result], metric: str, grid: ml_collections.ConfigDict,
              path: str) -> None:
  """Bars of each cell's mean ± std: one group per row, one colour per column."""
  table = {row['variant']: row for row in variant_table(results, metric)}
  cells = grid_cells(grid)
  factor, unit, _ = metric_scale(metric)
  fig, ax = plt.subplots(figsize=(1.6 * len(grid.rows) + 2, 4))
  width = 0.8 / len(grid.columns)
  for j, column in enumerate(grid.columns):
    rows = [table.get(cells[r, column]) for r in grid.rows]
    x = np.arange(len(grid.rows)) + (j - (len(grid.columns) - 1) / 2) * width
    ax.bar(x, [factor * r['mean'] if r else np.nan for r in rows], width,
           yerr=[factor * r['std'] if r else 0 for r in rows], capsize=3, label=column)
  ax.set_xticks(np.arange(len(grid.rows)), grid.rows, rotation=15)
  ax.set_ylabel(f'{metric}{unit}')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis='y')
  fig.tight_layout()
  files.save_figure(fig, path, dpi=120)
  plt.close(fig)


def plot_cost(results: Sequence[Result], metric: str, cost: str, path: str) -> None:
  """Metric (mean ± std over seeds) against a cost column, one point per variant."""
  factor, unit, _ = metric_scale(metric)
  fig, ax = plt.subplots(figsize=(6, 4))
  for row in variant_table(results, metric):
    ax.errorbar(row[cost], factor * row['mean'], yerr=factor * row['std'], fmt='o', capsize=3)
    ax.annotate(row['variant'], (row[cost], factor * row['mean']), textcoords='offset points',
                xytext=(5, 5), fontsize=8)
  ax.set_xlabel({'params': 'parameters', 'gflops': 'forward GFLOPs per image'}[cost])
  # Variants often differ by < 1% in cost: few ticks keep the labels apart.
  ax.xaxis.set_major_locator(ticker.MaxNLocator(4))
  ax.set_ylabel(f'{metric}{unit}')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=120)
  plt.close(fig)


def curve_value(point: dict[str, float], metric: str) -> float:
  """`metric` at a point of a result's 'curve'. Results written before curves
  kept every eval metric (docs/results/) have 'value', the sweep.metric of
  then (every committed sweep's current one), and 'loss'."""
  if metric in point:
    return point[metric]
  return point['loss'] if metric == 'eval/loss' else point['value']


def plot_learning_curves(results: Sequence[Result], metric: str, path: str) -> None:
  """The eval metric per epoch: mean over a variant's seeds, shaded ± std.

  Seeds share the eval schedule (same config but for the seed), so curves are
  averaged point by point over the steps all of them have.
  """
  factor, unit, _ = metric_scale(metric)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for variant, group in by_variant(results).items():
    length = min(len(r['curve']) for r in group)
    values = factor * np.array([[curve_value(p, metric) for p in r['curve'][:length]]
                                for r in group])
    curve = group[0]['curve'][:length]
    x = [p['epoch'] if p['epoch'] is not None else p['step'] for p in curve]
    mean, std = values.mean(0), values.std(0, ddof=1) if len(group) > 1 else 0
    ax.plot(x, mean, marker='.', label=f'{variant} (n={len(group)})')
    ax.fill_between(x, mean - std, mean + std, alpha=0.2)
  uses_epochs = all(p['epoch'] is not None for r in results for p in r['curve'])
  ax.set_xlabel('epoch' if uses_epochs else 'step')
  ax.set_ylabel(f'{metric}{unit}')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=120)
  plt.close(fig)


def _read_json(path: str, key: str | None = None) -> dict | None:
  """The JSON object at path (its entry `key`, if given); None if no file."""
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    content = json.load(f)
  return content if key is None else content[key]


def write_all(results: Sequence[Result], sweep: ml_collections.ConfigDict,
              output_dir: str) -> list[str]:
  """Writes every aggregate of `results` into output_dir; returns the paths.

  Reads, if present, output_dir/information.json ({'errors': {downsampler:
  error}}, from hierarchical_vit.information) and shift_consistency.json
  (from hierarchical_vit.shift_consistency) for results.md's columns.
  """
  if not results:
    return []
  os.makedirs(output_dir, exist_ok=True)
  information = _read_json(os.path.join(output_dir, 'information.json'), 'errors')
  shift = _read_json(os.path.join(output_dir, 'shift_consistency.json'))
  names = ['results.csv', 'results.md', 'metric_vs_params.png', 'metric_vs_gflops.png',
           'learning_curves.png'] + (['grid.png'] if 'grid' in sweep else [])
  paths = {name: os.path.join(output_dir, name) for name in names}
  write_csv(results, sweep.metric, paths['results.csv'])
  files.write_text(paths['results.md'], markdown(results, sweep, information, shift))
  plot_cost(results, sweep.metric, 'params', paths['metric_vs_params.png'])
  plot_cost(results, sweep.metric, 'gflops', paths['metric_vs_gflops.png'])
  plot_learning_curves(results, sweep.metric, paths['learning_curves.png'])
  if 'grid' in sweep:
    plot_grid(results, sweep.metric, sweep.grid, paths['grid.png'])
  return list(paths.values())
