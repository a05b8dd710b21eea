"""Helpers shared by the test packages."""

import importlib
import os
from types import ModuleType

import pytest

from hierarchical_vit.data import prepare


def import_optional(name: str) -> ModuleType:
  """Imports an optional dependency (the interop extra, scipy), skipping the
  calling test module where it is missing; on CI (.ci/run sets CI), which
  installs every extra, a missing one fails instead of silently skipping the
  tests that compare against timm and scipy."""
  if os.environ.get('CI'):
    return importlib.import_module(name)
  return pytest.importorskip(name)


def prepare_slice(tmp_path_factory, dataset: str, limit: int) -> str:
  """Writes the first `limit` examples per split of `dataset` into a new tfds dir.

  Needs Debian's dataset-fashion-mnist (CI installs it): a missing source
  fails the tests that need it rather than skipping them.
  """
  directory = tmp_path_factory.mktemp(f'tfds_{dataset}')
  prepare.prepare(dataset, directory, limit=limit)
  return str(directory)
