"""Shared fixtures: a small real Fashion-MNIST slice and a tiny model config."""

import os
import sys

import ml_collections
import pytest
from tests.conftest import REPO, prepare_slice

sys.path.insert(0, REPO)  # configs/ is not an installed package.

from configs import base  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
  """Fashion-MNIST with 256 train and 256 test examples, written once."""
  return prepare_slice(tmp_path_factory, 'fashion_mnist', 256)


def tiny_config(data_dir: str, **train) -> ml_collections.ConfigDict:
  """Tiny Swin (embed 16, depths (1, 1), window 4) on 32x32 Fashion-MNIST."""
  config = base.get_config()
  config.model.update(embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                      img_size=32, patch_size=4, window_size=4, in_chans=1,
                      gelu_approximate=True, drop_path_rate=0.1)
  config.data.update(data_dir=data_dir, hflip=False)
  config.train.update(batch_size=32, num_steps=6, warmup_epochs=0.25,
                      log_every_steps=1, checkpoint_every_steps=3,
                      keep_checkpoints=3, eval_batch_size=64)
  config.train.update(**train)
  return config


def write_config_file(path, data_dir: str, **train) -> str:
  """A config file for train.py/eval.py --config that returns tiny_config."""
  path = os.path.join(path, 'tiny_config.py')
  with open(path, 'w') as f:
    f.write(f'import sys\nsys.path.insert(0, {REPO!r})\n'
            'from tests.training.conftest import tiny_config\n\n'
            f'def get_config():\n  return tiny_config({data_dir!r}, **{train!r})\n')
  return path


def run_script(args: list[str], env: dict[str, str] | None = None,
               **kwargs):
  """Runs a repo script (train.py, eval.py) in a fresh Python process."""
  import subprocess
  env = {**os.environ, 'PYTHONPATH': REPO, **(env or {})}
  return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kwargs)


def finish(proc, timeout_s: float) -> str:
  """The output of a run_script process once it exits. One still running
  after timeout_s is killed, not left to load the box and write into shared
  run directories while the next tests run."""
  import subprocess
  try:
    return proc.communicate(timeout=timeout_s)[0]
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail(f'still running after {timeout_s} s:\n{proc.communicate()[0][-3000:]}')


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl's records as written, repeats included (ablate.read_metrics
  merges them): what the tests of the writer check."""
  import json
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]
