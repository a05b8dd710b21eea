"""Helpers shared by the test packages."""

from hierarchical_vit.data import prepare


def prepare_slice(tmp_path_factory, dataset: str, limit: int) -> str:
  """Writes the first `limit` examples per split of `dataset` into a new tfds dir.

  Needs Debian's dataset-fashion-mnist (CI installs it): a missing source
  fails the tests that need it rather than skipping them.
  """
  directory = tmp_path_factory.mktemp(f'tfds_{dataset}')
  prepare.prepare(dataset, directory, limit=limit)
  return str(directory)
