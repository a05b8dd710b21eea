r"""Trains a hierarchical ViT; re-running with the same workdir resumes.

On SIGTERM it saves a checkpoint and exits with status 75 (EX_TEMPFAIL):
unfinished, to be resumed.

A resume must use the config the run started with (the workdir's config.json):
only where the data is read from and how the run is executed (data_dir, mesh,
sweep, logging and checkpoint intervals, keep_checkpoints, eval_batch_size,
model.remat) may change; anything else is refused, since it would silently
change what is trained (data.num_workers included: grain's saved iterator
state is per worker).

  python train.py --config=configs/base.py --workdir=workdirs/run1 \
      --config.data.data_dir=data --config.train.num_epochs=5

Multi-process (every process runs the same command; docs/scaling.md):

  python train.py --config=... --workdir=... --coordinator_address=host0:1234 \
      --num_processes=2 --process_id=$i
"""

# pylint: disable=wrong-import-position
from hierarchical_vit import tcmalloc

if __name__ == '__main__':
  # Before the imports below: the re-executed process imports them again,
  # and jax, tfds, orbax and tensorboardX (torch, where installed) take ~4 s.
  tcmalloc.reexec_with_tcmalloc()

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hierarchical_vit import cli
from hierarchical_vit.training import trainer

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/base.py',
                                          'Training configuration file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, logs, config.json.',
                               required=True)
# Multi-process runs (docs/scaling.md); see parallel.distributed_args.
_INITIALIZE_DISTRIBUTED = cli.define_distributed_flags()


def main(argv):
  del argv
  _INITIALIZE_DISTRIBUTED()
  results = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if results['preempted']:
    sys.exit(trainer.EXIT_PREEMPTED)
  logging.info('Final metrics: %s', results)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
