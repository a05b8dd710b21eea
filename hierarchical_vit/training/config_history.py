"""Config fields added or removed since runs were saved.

A run's config.json is the config it trained with, so a workdir saved before a
field was added lacks it, and one saved before a field was removed still has
it. `upgrade` brings such a saved config to today's fields, so that eval.py and
the analyses load old runs; `ablate.config_fingerprint` uses the same tables so
that committed sweep results stay valid. Fields are paths into the config's
nested dicts, e.g. ('model', 'attention').
"""

import copy
from typing import Any

Path = tuple[str, ...]

# Fields added after runs were saved, with the value that trains exactly what
# the code did before the field existed. The options of a downsampler that did
# not exist yet change nothing a run with another downsampler trains.
ADDED_FIELDS: dict[Path, Any] = {
    ('model', 'attention'): 'einsum',
    ('model', 'downsample_options', 'blur_merge'): {'filter_size': 3},
    ('model', 'downsample_options', 'blur_pool'): {'filter_size': 3},
    ('model', 'downsample_options', 'max_blur_pool'): {'filter_size': 3},
    ('model', 'downsample_options', 'avg_pool'): {'kernel_size': 2},
    ('model', 'downsample_options', 'max_pool'): {'kernel_size': 2},
    ('model', 'downsample_options', 'conv_max_pool'): {'pool_size': 3},
    ('model', 'downsample_options', 'depthwise_conv_pool', 'norm'): True,
    ('mesh', 'dcn_shape'): (),
    ('model', 'remat'): 'none',
    ('train', 'ema_warmup'): False,
    ('data', 'randaugment_prob'): 1.0,
    ('data', 'randaugment_magnitude_std'): 0.0,
    ('train', 'init_bias_table_resize'): 'bicubic',
}
# Fields removed since runs were saved, none of which changed what a run
# trained, with the one value they ever had.
REMOVED_FIELDS: dict[Path, Any] = {('data', 'shuffle_buffer'): 0}


def parent(config: dict[str, Any], path: Path) -> dict[str, Any] | None:
  """The dict that holds field `path` (path[-1]) in config; None where a dict
  on the way is missing."""
  for key in path[:-1]:
    config = config.get(key)
    if not isinstance(config, dict):
      return None
  return config


def upgrade(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config (as a dict) in today's fields: missing ADDED_FIELDS at their
  old behaviour, REMOVED_FIELDS dropped; every other value as saved."""
  config = copy.deepcopy(saved)
  for path, old_behaviour in ADDED_FIELDS.items():
    if (holder := parent(config, path)) is not None:
      holder.setdefault(path[-1], copy.deepcopy(old_behaviour))
  for path in REMOVED_FIELDS:
    if (holder := parent(config, path)) is not None:
      holder.pop(path[-1], None)
  return config
