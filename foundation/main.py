"""Command line: python -m foundation.main --config=configs/lm/shakespeare.py[:variant] --workdir=DIR [--config.x=v]

Rerunning the same command on the same workdir resumes from its latest checkpoint. Multi-host: start one process
per host with --coordinator_address=HOST:PORT --num_processes=N --process_id=I (on a Cloud TPU pod slice no flags
are needed).
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file, optionally with :variant.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and outputs.', required=True)
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0, for multi-host runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index in a multi-host run.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments {argv[1:]}; config fields are set with --config.name=value.')
  from foundation import host
  host.keep_freed_memory()  # before jax starts its threads and allocates
  # Imported here so that --help and flag errors do not pay for importing jax.
  from foundation import sharding, train
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.set_verbosity(logging.WARNING)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
