"""Flag parsing shared by the command-line entry points.

absl reports a bad flag in one line, but a `--config.a.b=v` override that names
no config field fails inside ml_collections with a traceback (AttributeError,
KeyError). `parse_flags` reports those like any bad flag: the override and
ml_collections' own hint ('Did you mean ...').

  app.run(main, flags_parser=cli.parse_flags)

and the multi-process flags of train.py and eval.py (`define_distributed_flags`).
"""

import glob
import os
import re
import sys
from collections.abc import Callable, Sequence

from absl import app
from absl import flags

from hierarchical_vit import parallel

# How ml_collections' config flags accept an override: -config.x=1, --noconfig.flag.
_OVERRIDE = re.compile(r'^--?(?:no)?config\.')


def override_error(argv: list[str], error: Exception) -> str | None:
  """One line naming the override that `error` (raised while parsing argv)
  is about, or None when it names none: then it came from elsewhere, such as
  the config file's own code, and keeps its traceback."""
  # ml_collections' messages arrive repr-quoted, with escaped newlines.
  message = ' '.join(str(error).strip('\'"').replace('\\n', '\n').replace("\\'", "'").split())
  # The missing key is the message's first quoted word; the hint after it
  # ('Did you mean "name"') names real fields, which must not blame others.
  quoted = re.search(r"'([^']+)'", message)
  keys = [quoted.group(1)] if quoted else re.findall(r'\w+', message)
  named = [arg for arg in argv[1:] if _OVERRIDE.match(arg)
           and set(keys) & set(_OVERRIDE.sub('', arg).split('=', 1)[0].split('.'))]
  if not named:
    return None
  return f'FATAL Flags parsing error: {", ".join(named)}: no such config field: {message}'


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser (app.parse_flags_with_usage), with config overrides that name
  no field reported in one line and exit status 1."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:
    line = override_error(argv, error)
    if line is None:
      raise
    sys.stderr.write(line + '\nPass --helpshort or --helpfull to see help on flags.\n')
    sys.exit(1)


def checkpoint_step(flag: str, text: str) -> int | str:
  """A --step flag's value: a saved step (-1 = the latest) or 'best'."""
  if text == 'best':
    return text
  try:
    step = int(text)
  except ValueError:
    step = None
  if step is None or step < -1:
    raise app.UsageError(f"{flag}={text!r} is not valid: a saved step, -1 (the latest) or "
                         "'best'.")
  return step


def define_distributed_flags() -> Callable[[], None]:
  """Defines --coordinator_address, --num_processes, --process_id and
  --distributed_timeout (docs/scaling.md); returns the call that connects the
  processes with their values, before anything touches a device."""
  coordinator = flags.DEFINE_string(
      'coordinator_address', '', "host:port of process 0; 'auto' = detected by "
      "JAX (Cloud TPU, SLURM, Open MPI); '' = $JAX_COORDINATOR_ADDRESS, else "
      'auto on a TPU VM or in a multi-task srun step, else single process.')
  num_processes = flags.DEFINE_integer(
      'num_processes', 0, 'With a host:port coordinator; 0 = $JAX_NUM_PROCESSES.')
  process_id = flags.DEFINE_integer(
      'process_id', -1, 'With a host:port coordinator; -1 = $JAX_PROCESS_ID.')
  timeout = flags.DEFINE_integer(
      'distributed_timeout', 300, 'Seconds to wait for all processes to join.')
  return lambda: parallel.initialize_distributed(coordinator.value, num_processes.value,
                                                 process_id.value, timeout.value)


def expand_run_dirs(patterns: Sequence[str]) -> list[str]:
  """Run directories from paths or glob patterns, in order, each once; only
  those with a config.json (a train.py workdir)."""
  dirs = []
  for pattern in patterns:
    matches = sorted(glob.glob(pattern)) or [pattern]
    dirs += [d for d in matches if d not in dirs]
  missing = [d for d in dirs if not os.path.isfile(os.path.join(d, 'config.json'))]
  if missing:
    raise FileNotFoundError(f'--run_dirs: no config.json (not a train.py workdir) in {missing}')
  names = [os.path.basename(os.path.normpath(d)) for d in dirs]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    # Results are keyed by the directory's name: one would overwrite another.
    raise ValueError(f'--run_dirs: several runs named {repeated}; measure them separately')
  return dirs
