"""Atomic writes: the new file whole, or the old one untouched."""

import json
import os

import pytest

from hierarchical_vit import files


def test_write_json_creates_directories_and_replaces_whole(tmp_path):
  path = str(tmp_path / 'a' / 'b' / 'result.json')
  files.write_json(path, {'x': 1})
  files.write_json(path, {'y': [1, 2]})
  with open(path, encoding='utf-8') as f:
    assert json.load(f) == {'y': [1, 2]}
  assert os.listdir(tmp_path / 'a' / 'b') == ['result.json']  # No temporary left.


def test_a_failed_write_leaves_the_old_file(tmp_path):
  path = str(tmp_path / 'result.json')
  files.write_json(path, {'x': 1})
  with pytest.raises(TypeError):
    files.write_json(path, {'x': object()})  # Not serializable: fails before any write.
  with pytest.raises(TypeError):
    files.write_text(path, None)  # Fails while writing the temporary file.
  with open(path, encoding='utf-8') as f:
    assert json.load(f) == {'x': 1}
  os.mkdir(tmp_path / 'taken')
  with pytest.raises(IsADirectoryError):  # Fails at the rename.
    files.write_text(str(tmp_path / 'taken'), 'x')
  assert sorted(os.listdir(tmp_path)) == ['result.json', 'taken']  # No temporary left.


def test_the_data_and_the_rename_reach_the_disk_before_returning(tmp_path, monkeypatch):
  synced = []
  real_fsync = os.fsync
  monkeypatch.setattr(os, 'fsync', lambda fd: synced.append(os.path.realpath(
      f'/proc/self/fd/{fd}')) or real_fsync(fd))
  path = str(tmp_path / 'run' / 'config.json')
  files.write_text(path, 'x')
  assert synced == [f'{path}.{os.getpid()}.tmp', str(tmp_path / 'run')]


@pytest.mark.parametrize('suffix, magic', [('png', b'\x89PNG'), ('pdf', b'%PDF')])
def test_figures_are_written_whole_through_a_synced_temporary_file(tmp_path, monkeypatch,
                                                                   suffix, magic):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  synced = []
  real_fsync = os.fsync
  monkeypatch.setattr(os, 'fsync', lambda fd: synced.append(os.path.realpath(
      f'/proc/self/fd/{fd}')) or real_fsync(fd))
  fig, ax = plt.subplots()
  ax.plot([0, 1], [1, 0])
  path = tmp_path / f'curve.{suffix}'
  files.save_figure(fig, str(path), dpi=50)
  plt.close(fig)
  assert path.read_bytes().startswith(magic) and os.listdir(tmp_path) == [path.name]
  assert synced == [f'{path}.{os.getpid()}.tmp', str(tmp_path)]
