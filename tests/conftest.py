"""Helpers shared by the test packages."""

import atexit
import contextlib
import glob
import importlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from types import ModuleType

# One persistent XLA compilation cache for the whole run, set before jax is
# imported: the pytest workers (which inherit this environment) and every
# train.py / eval.py / benchmark child compile the same small programs over and
# over (the suite ran in 14:21 with it, 15:39 without, back to back). Every
# program is cached, however quick to compile: each process that initializes a
# model eagerly compiles one truncated-normal program per parameter shape
# (~0.25 s each, ~10 s for the small preset), which the others then read
# (14:53 caching compiles over 0.5 s only, 12:49 caching all, 2026-11-27).
# A cache the user set is kept; the one made here goes with the process that made it.
_CACHE_PREFIX = os.path.join(tempfile.gettempdir(), 'hierarchical_vit_tests_xla_')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  for stale in glob.glob(_CACHE_PREFIX + '*'):  # Left by a killed run a day or more ago.
    if time.time() - os.path.getmtime(stale) > 86400:
      shutil.rmtree(stale, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix=os.path.basename(_CACHE_PREFIX))
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

# XLA:CPU's LLVM backend at its cheapest, for the workers and every child:
# the suite compiles hundreds of small programs and runs most of them a few
# times, so compiling is most of its CPU time (on 28 of its slowest tests run
# one by one: 220 s, 131 s with these flags; 2026-11-27). XLA's HLO passes
# and its library kernels (the dots) are the ones users run; only LLVM's
# machine-code optimization of the fused loops is skipped, which can round
# differently (fused multiply-adds), within the tests' tolerances.
SUITE_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAGS}".strip()


def xla_flags(*flags: str) -> str:
  """XLA_FLAGS for a child process: the suite's (above) and `flags`."""
  return ' '.join((os.environ['XLA_FLAGS'], *flags))


import pytest  # pylint: disable=wrong-import-position

from hierarchical_vit.data import prepare  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Fixtures that take 10-45 s to build (the full Fashion-MNIST prepared, a
# trained run). --dist loadgroup hands out tests one by one, so without a group
# each pytest worker that drew one of their tests would build its own copy.
_COSTLY_FIXTURES = ('fashion_mnist_dir', 'trained')


@pytest.hookimpl(tryfirst=True)  # Before xdist's own hook reads the groups.
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """Puts the tests of each costly fixture in one xdist group: one worker
  builds it once. A module-scoped fixture's group is its module's."""
  for item in items:
    for name in _COSTLY_FIXTURES:
      if name in item.fixturenames and not item.get_closest_marker('xdist_group'):
        fixture = item._fixtureinfo.name2fixturedefs[name][-1]  # pylint: disable=protected-access
        group = name if fixture.scope == 'session' else f'{item.module.__name__}.{name}'
        item.add_marker(pytest.mark.xdist_group(group))
        break


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


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now: for a jax.distributed coordinator.

  Drawn below the kernel's ephemeral range: the coordinator binds it only
  seconds later (after its imports), and in between the kernel could hand an
  ephemeral port to another socket (the other pytest worker's gloo, gRPC).
  """
  low = 32768
  if os.path.exists('/proc/sys/net/ipv4/ip_local_port_range'):
    with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
      low = int(f.read().split()[0])
  for port in random.Random().sample(range(10000, low), 100):
    with socket.socket() as s:
      try:
        s.bind(('127.0.0.1', port))
      except OSError:
        continue
      return port
  raise RuntimeError(f'no free port in [10000, {low})')


@contextlib.contextmanager
def spawn(cmd: list[str], devices: int, log_path: str) -> Iterator[subprocess.Popen]:
  """Runs cmd in the repo with `devices` CPU devices, in its own process group,
  output to log_path; kills it (and anything it started) on exit."""
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': xla_flags(f'--xla_force_host_platform_device_count={devices}')}
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
  try:
    yield proc
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_all(procs: list[subprocess.Popen], logs: list[str], timeout_s: float = 600) -> None:
  """Waits for every process; fails with the log of the first to fail (the
  others may then wait in a collective) or of one still running after
  timeout_s (all together; a 2-core CI box compiles slowly)."""
  deadline = time.time() + timeout_s
  while True:
    for proc, log in zip(procs, logs):
      if proc.poll() not in (None, 0):
        pytest.fail(f'{log} exited with {proc.returncode}:\n{open(log).read()[-5000:]}')
    running = [log for proc, log in zip(procs, logs) if proc.poll() is None]
    if not running:
      return
    if time.time() > deadline:
      pytest.fail(f'{running[0]} timed out:\n{open(running[0]).read()[-3000:]}')
    time.sleep(0.2)
