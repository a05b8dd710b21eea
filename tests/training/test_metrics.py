"""metrics.jsonl survives a run killed mid-write; TensorBoard starts without torch."""

import json
import os
import subprocess
import sys

import pytest
import tensorboardX

from hierarchical_vit import ablate
from hierarchical_vit.training import metrics
from tests.conftest import REPO, import_optional

_WRITE_WITHOUT_TORCH = """
import sys
from hierarchical_vit.training import metrics
print('torch' in sys.modules)
writer = metrics.MetricWriter(sys.argv[1])
writer.write_scalars(1, {'train/loss': 0.5})
writer.close()
import torch  # Still importable: the stand-in that kept it out is gone.
print(torch.__name__)
"""


def test_the_writer_starts_without_importing_torch(tmp_path):
  """tensorboardX's writer imports torch when it is installed (~2 s at every
  train.py start); metrics keeps it out, and TensorBoard is still written."""
  import_optional('torch')  # Without torch there is nothing to keep out.
  out = subprocess.run([sys.executable, '-c', _WRITE_WITHOUT_TORCH, str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, check=True).stdout.split()
  assert out == ['False', 'torch']
  (events,) = os.listdir(tmp_path / 'tensorboard')
  assert events.startswith('events.out.tfevents.')
  assert (tmp_path / 'tensorboard' / events).stat().st_size > 0


def test_a_resumed_run_cuts_the_unfinished_line_and_appends_whole_records(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')  # Killed here.
  writer = metrics.MetricWriter(str(tmp_path), start_step=1)
  writer.write_scalars(2, {'train/loss': 1.5})
  writer.close()
  assert [json.loads(line) for line in path.read_text().splitlines()] == [
      {'step': 1, 'train/loss': 2.0}, {'step': 2, 'train/loss': 1.5}]


def test_a_resumed_run_drops_the_records_after_its_checkpoint(tmp_path, monkeypatch):
  """Resumed from step 4, a run logs 5 and 6 again: their old records go
  (the eval record of step 4 stays), here and in TensorBoard (purge_step)."""
  path = tmp_path / 'metrics.jsonl'
  records = [{'step': s, 'train/loss': 1.0 / s} for s in range(1, 7)]
  records.insert(4, {'step': 4, 'eval/accuracy': 0.5})
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  purge_steps = []
  real_writer = tensorboardX.SummaryWriter
  monkeypatch.setattr(tensorboardX, 'SummaryWriter', lambda logdir, purge_step=None: (
      purge_steps.append(purge_step) or real_writer(logdir, purge_step=purge_step)))
  writer = metrics.MetricWriter(str(tmp_path), start_step=4)
  writer.write_scalars(5, {'train/loss': 0.3})
  writer.close()
  assert [json.loads(line) for line in path.read_text().splitlines()] == [
      *records[:5], {'step': 5, 'train/loss': 0.3}]
  assert purge_steps == [5]
  metrics.MetricWriter(str(tmp_path)).close()  # A fresh run (no checkpoint) starts over.
  assert path.read_text() == '' and purge_steps == [5, 1]


def test_read_metrics_skips_an_unfinished_last_line_only(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')
  assert ablate.read_metrics(str(tmp_path)) == [{'step': 1, 'train/loss': 2.0}]
  path.write_text('{"step": 1, "train/lo\n{"step": 2, "train/loss": 2.0}\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl, line 1, is not a JSON record'):
    ablate.read_metrics(str(tmp_path))
