"""Atomic file writes: a reader, or a run killed mid-write, finds the old file
or the new one, never half of either (results, reports and configs are read
back by resumed runs and sweeps)."""

import contextlib
import json
import os
from collections.abc import Iterator
from typing import IO, Any


@contextlib.contextmanager
def _atomic(path: str, mode: str, **open_kwargs: Any) -> Iterator[IO]:
  """A file of this process beside `path` (creating its directory), opened in
  `mode`, renamed over `path` once the block has written it; removed if the
  block fails.

  The data and then the rename are flushed to disk (fsync): without it, a
  machine that crashes soon after can leave the renamed file empty.
  """
  directory = os.path.dirname(path) or '.'
  os.makedirs(directory, exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'
  try:
    with open(tmp, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
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
  """Writes text to path atomically (_atomic)."""
  with _atomic(path, 'w', encoding='utf-8', newline='') as f:
    f.write(text)


def save_figure(figure: Any, path: str, **savefig_kwargs: Any) -> None:
  """figure.savefig(path) atomically (_atomic); the format is path's suffix."""
  with _atomic(path, 'wb') as f:
    figure.savefig(f, format=os.path.splitext(path)[1][1:], **savefig_kwargs)


def write_json(path: str, value: Any, indent: int = 1) -> None:
  """write_text of json.dumps(value, indent=indent)."""
  write_text(path, json.dumps(value, indent=indent))
