"""The config a run was trained with: its workdir's config.json, in today's
fields (hierarchical_vit.training.config_history), with --config.* overrides
on top:

  # Evaluate with another batch size (e.g. on a machine with other devices):
  python eval.py --workdir=W --config=configs/saved.py:W --config.train.eval_batch_size=64
  # Resume a run with its own config (train.py refuses a changed one):
  python train.py --workdir=W --config=configs/saved.py:W
"""

import ml_collections

from hierarchical_vit.training import trainer


def get_config(workdir: str) -> ml_collections.ConfigDict:
  return trainer.load_config(workdir)
