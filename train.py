r"""Trains a hierarchical ViT; re-running with the same workdir resumes.

  python train.py --config=configs/base.py --workdir=workdirs/run1 \
      --config.train.num_epochs=5
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hierarchical_vit import parallel
from hierarchical_vit.training import trainer

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/base.py',
                                          'Training configuration file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, logs, config.json.',
                               required=True)
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', '', 'host:port of process 0 for multi-process runs '
    "('auto' for SLURM / TPU pods); '' = $JAX_COORDINATOR_ADDRESS or single.")
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Multi-process only.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'Multi-process only.')


def main(argv):
  del argv
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  results = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info('Final metrics: %s', results)


if __name__ == '__main__':
  app.run(main)
