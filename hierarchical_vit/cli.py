"""Flag parsing shared by the command-line entry points.

absl reports a bad flag in one line, but a `--config.a.b=v` override that names
no config field fails inside ml_collections with a traceback (AttributeError,
KeyError). `parse_flags` reports those like any bad flag: the override and
ml_collections' own hint ('Did you mean ...').

  app.run(main, flags_parser=cli.parse_flags)
"""

import re
import sys

from absl import app


def _overrides(argv: list[str]) -> list[str]:
  """The --config.* overrides on a command line."""
  return [arg for arg in argv[1:] if arg.startswith('--config.')]


def override_error(argv: list[str], error: Exception) -> str:
  """One line naming the override a parse error came from (all of them where
  the message names none) and what was wrong."""
  # ml_collections' messages arrive repr-quoted, with escaped newlines.
  message = ' '.join(str(error).strip('\'"').replace('\\n', '\n').replace("\\'", "'").split())
  overrides = _overrides(argv)
  named = [arg for arg in overrides
           if any(re.search(rf'\b{re.escape(field)}\b', message)
                  for field in arg.split('=', 1)[0].split('.')[1:])]
  culprit = ', '.join(named or overrides) or 'the config'
  return f'FATAL Flags parsing error: {culprit}: no such config field: {message}'


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser (app.parse_flags_with_usage), with config overrides that name
  no field reported in one line and exit status 1."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:
    if not _overrides(argv):
      raise
    sys.stderr.write(override_error(argv, error) + '\n')
    sys.stderr.write('Pass --helpshort or --helpfull to see help on flags.\n')
    sys.exit(1)
