"""The entry points re-execute themselves under tcmalloc."""

import os
import subprocess
import sys

import pytest

from hierarchical_vit import tcmalloc

_PRINT_MAPS = ('from hierarchical_vit import tcmalloc; tcmalloc.reexec_with_tcmalloc(); '
               'import os; maps = open("/proc/self/maps").read(); '
               'print("tcmalloc" in maps, os.environ.get("LD_PRELOAD", ""))')


# A platform guard: CI (Linux) installs libtcmalloc-minimal4, so these run there.
_NEEDS_TCMALLOC = pytest.mark.skipif(
    tcmalloc.find_tcmalloc() is None or not sys.platform.startswith('linux'),
    reason='needs libtcmalloc-minimal4 (apt-get; .ci/run installs it)')


def test_preload_env_puts_tcmalloc_first_and_keeps_other_preloads():
  env = tcmalloc.preload_env({'LD_PRELOAD': 'libfoo.so:libbar.so', 'X': '1'}, 'libtc.so')
  assert env == {'LD_PRELOAD': 'libtc.so:libfoo.so:libbar.so', 'X': '1'}
  assert tcmalloc.preload_env({}, 'libtc.so')['LD_PRELOAD'] == 'libtc.so'


def _calls_to_execve(monkeypatch, environ: dict[str, str], library: str | None) -> list:
  calls = []
  monkeypatch.setattr(os, 'environ', environ)
  monkeypatch.setattr(tcmalloc, 'find_tcmalloc', lambda: library)
  monkeypatch.setattr(os, 'execve', lambda *args: calls.append(args))
  tcmalloc.reexec_with_tcmalloc()
  return calls


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='LD_PRELOAD is Linux')
def test_reexecs_the_same_command_line_with_the_library_preloaded(monkeypatch):
  calls = _calls_to_execve(monkeypatch, {'PATH': '/bin'}, 'libtcmalloc_minimal.so.4')
  assert calls == [(sys.executable, sys.orig_argv,
                    {'PATH': '/bin', 'LD_PRELOAD': 'libtcmalloc_minimal.so.4'})]


@pytest.mark.parametrize('environ, library', [
    ({'LD_PRELOAD': '/usr/lib/libtcmalloc.so.4'}, 'libtcmalloc_minimal.so.4'),  # Done already.
    ({tcmalloc.SWITCH: '0'}, 'libtcmalloc_minimal.so.4'),  # Turned off.
    ({}, None),  # Not installed.
])
def test_does_not_reexec(monkeypatch, environ, library):
  assert _calls_to_execve(monkeypatch, environ, library) == []


def test_warns_with_the_package_name_when_missing(monkeypatch):
  warnings = []
  monkeypatch.setattr(tcmalloc.logging, 'warning', lambda msg, *a: warnings.append(msg % a))
  _calls_to_execve(monkeypatch, {}, None)
  assert len(warnings) == 1 and 'libtcmalloc-minimal4' in warnings[0]


@_NEEDS_TCMALLOC
def test_a_real_process_ends_up_with_tcmalloc_mapped():
  env = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', tcmalloc.SWITCH)}
  out = subprocess.run([sys.executable, '-c', _PRINT_MAPS], env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  assert out[0] == 'True' and 'tcmalloc' in out[1]
  env[tcmalloc.SWITCH] = '0'
  out = subprocess.run([sys.executable, '-c', _PRINT_MAPS], env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  assert out == ['False']


@_NEEDS_TCMALLOC
@pytest.mark.parametrize('script', ['train.py', 'eval.py'])
def test_entry_points_reexec_before_their_heavy_imports(script):
  """-X importtime survives the re-exec (it is in sys.orig_argv): jax must be
  imported by the re-executed process only, not by both."""
  env = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', tcmalloc.SWITCH)}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  stderr = subprocess.run([sys.executable, '-X', 'importtime', script, '--helpshort'],
                          cwd=repo, env=env, capture_output=True, text=True).stderr
  imported = [line.split('|')[-1].strip() for line in stderr.splitlines()]
  assert imported.count('hierarchical_vit.tcmalloc') == 2  # Both processes ran.
  assert imported.count('jax') == 1
