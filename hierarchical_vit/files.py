"""Atomic file writes: a reader, or a run killed mid-write, finds the old file
or the new one, never half of either (results, reports and configs are read
back by resumed runs and sweeps)."""

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def _replacing(path: str, tmp: str) -> Iterator[None]:
  """Renames `tmp` over `path` once the block has written it, and flushes the
  rename to disk; removes `tmp` if the block fails."""
  directory = os.path.dirname(path) or '.'
  os.makedirs(directory, exist_ok=True)
  try:
    yield
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  dir_fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)


def write_text(path: str, text: str) -> None:
  """Writes text to path (creating its directory) via a temporary file of this
  process beside it and an atomic rename; a failed write removes the temporary.

  The data and then the rename are flushed to disk (fsync): without it, a
  machine that crashes soon after can leave the renamed file empty.
  """
  tmp = f'{path}.{os.getpid()}.tmp'
  with _replacing(path, tmp):
    with open(tmp, 'w', encoding='utf-8', newline='') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())


def save_figure(figure: Any, path: str, **savefig_kwargs: Any) -> None:
  """figure.savefig(path) as write_text writes: a temporary file beside it,
  flushed to disk, and an atomic rename. The format is path's suffix."""
  tmp = f'{path}.{os.getpid()}.tmp'
  with _replacing(path, tmp):
    with open(tmp, 'wb') as f:
      figure.savefig(f, format=os.path.splitext(path)[1][1:], **savefig_kwargs)
      f.flush()
      os.fsync(f.fileno())


def write_json(path: str, value: Any, indent: int = 1) -> None:
  """write_text of json.dumps(value, indent=indent)."""
  write_text(path, json.dumps(value, indent=indent))
