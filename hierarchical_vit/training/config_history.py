"""Config fields added or removed since runs were saved.

A run's config.json is the config it trained with, so a workdir saved before a
field was added lacks it, and one saved before a field was removed still has
it. `upgrade` brings such a saved config to today's fields, so that eval.py and
the analyses load old runs; `ablate.config_fingerprint` uses the same tables so
that committed sweep results stay valid.
"""

from typing import Any

# Fields added after runs were saved, with the value that trains exactly what
# the code did before the field existed.
ADDED_FIELDS: dict[tuple[str, str], Any] = {('model', 'attention'): 'einsum'}
# Fields removed since runs were saved, none of which changed what a run
# trained, with the one value they ever had.
REMOVED_FIELDS: dict[tuple[str, str], Any] = {('data', 'shuffle_buffer'): 0}


def upgrade(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config (as a dict) in today's fields: missing ADDED_FIELDS at their
  old behaviour, REMOVED_FIELDS dropped; every other value as saved."""
  config = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
  for (section, field), old_behaviour in ADDED_FIELDS.items():
    if section in config:
      config[section].setdefault(field, old_behaviour)
  for section, field in REMOVED_FIELDS:
    config.get(section, {}).pop(field, None)
  return config
