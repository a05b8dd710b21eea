"""The package installs as pyproject.toml says, not only from the source tree."""

import os
import shutil
import subprocess
import sys

from tests.conftest import REPO


def test_a_regular_install_holds_every_module_the_package_imports(tmp_path):
  """hierarchical_vit.convert and the benchmarks build on configs/base.py, so a
  regular (non-editable) install must carry configs/ too. Built from a copy:
  setuptools writes build/ next to the sources."""
  source, target = tmp_path / 'source', tmp_path / 'site'
  source.mkdir()
  for name in ('pyproject.toml', 'requirements.txt'):
    shutil.copy(os.path.join(REPO, name), source / name)
  for package in ('hierarchical_vit', 'configs'):
    shutil.copytree(os.path.join(REPO, package), source / package,
                    ignore=shutil.ignore_patterns('__pycache__'))
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps',
                  '--no-build-isolation', '--target', str(target), str(source)],
                 check=True, capture_output=True, cwd=tmp_path)
  for module in ('hierarchical_vit/convert.py', 'hierarchical_vit/layers/attention_kernel.py',
                 'configs/base.py', 'configs/ablations/downsample.py'):
    assert (target / module).is_file(), module
