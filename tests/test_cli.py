"""Config overrides that name no field fail in one line, like any bad flag."""

import os
import subprocess
import sys

import ml_collections
import pytest
from absl import app

from hierarchical_vit import cli

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_override_error_names_the_override_and_keeps_the_hint():
  # A valid override of the field the hint names is not blamed with it.
  argv = ['train.py', '--config=configs/quickstart.py', '--config.train.num_epochs=2',
          '--config.model.downsample=conv', '--config.model.downsampel=avg_pool']
  with pytest.raises(AttributeError) as error:  # ml_collections' own error.
    ml_collections.ConfigDict({'downsample': 'patch_merge'}).downsampel
  error = error.value
  assert cli.override_error(argv, error) == (
      'FATAL Flags parsing error: --config.model.downsampel=avg_pool: no such config field: '
      '\'downsampel\' Did you mean "downsample" instead of "downsampel"?')


def test_an_error_that_names_no_override_keeps_its_traceback(monkeypatch):
  argv = ['train.py', '--config.a.b=1', '-config.c=2']
  assert cli.override_error(argv, KeyError('unhashable')) is None
  def config_file_raises(argv):  # Its get_config() raised while absl parsed the overrides.
    raise KeyError('unhashable')
  monkeypatch.setattr(cli.app, 'parse_flags_with_usage', config_file_raises)
  with pytest.raises(KeyError, match='unhashable'):
    cli.parse_flags(argv)


def test_override_error_reads_every_override_form():
  argv = ['train.py', '-config.model.remat=block', '--noconfig.train.use_ema']
  message = cli.override_error(argv, AttributeError("'use_ema'"))
  assert message.startswith('FATAL Flags parsing error: --noconfig.train.use_ema: ')


@pytest.mark.parametrize('entry_point', ['train.py', 'eval.py'])
def test_a_misspelt_override_exits_with_one_line_and_writes_nothing(entry_point, tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, entry_point, '--config=configs/quickstart.py', f'--workdir={workdir}',
       '--config.nope.x=1'], cwd=_ROOT, capture_output=True, text=True,
      env=dict(os.environ, HIERARCHICAL_VIT_TCMALLOC='0'), check=False)
  assert result.returncode == 1
  assert 'FATAL Flags parsing error: --config.nope.x=1: no such config field: nope' in result.stderr
  assert 'Traceback' not in result.stderr
  assert not workdir.exists()


def test_checkpoint_step_takes_a_step_or_best_and_names_the_flag():
  assert cli.checkpoint_step('--step', '-1') == -1
  assert cli.checkpoint_step('--step', '300') == 300
  assert cli.checkpoint_step('--step', 'best') == 'best'
  with pytest.raises(app.UsageError, match=r"--step='last' is not valid: a saved step, -1 "):
    cli.checkpoint_step('--step', 'last')
  with pytest.raises(app.UsageError, match=r"--step='-7' is not valid: a saved step, -1 "):
    cli.checkpoint_step('--step', '-7')  # Not the latest in disguise.
