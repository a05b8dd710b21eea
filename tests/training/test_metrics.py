"""metrics.jsonl survives a run killed mid-write."""

import json

import pytest

from hierarchical_vit import ablate
from hierarchical_vit.training import metrics


def test_a_resumed_run_cuts_the_unfinished_line_and_appends_whole_records(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')  # Killed here.
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write_scalars(2, {'train/loss': 1.5})
  writer.close()
  assert [json.loads(line) for line in path.read_text().splitlines()] == [
      {'step': 1, 'train/loss': 2.0}, {'step': 2, 'train/loss': 1.5}]
  metrics.drop_partial_last_line(str(path))  # Whole lines are left alone.
  assert len(path.read_text().splitlines()) == 2


def test_read_metrics_skips_an_unfinished_last_line_only(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')
  assert ablate.read_metrics(str(tmp_path)) == [{'step': 1, 'train/loss': 2.0}]
  path.write_text('{"step": 1, "train/lo\n{"step": 2, "train/loss": 2.0}\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl, line 1, is not a JSON record'):
    ablate.read_metrics(str(tmp_path))
