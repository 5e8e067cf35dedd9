"""Command line: python -m foundation.main --config=configs/lm/shakespeare.py[:variant] --workdir=DIR [--config.x=v]

Rerunning the same command on the same workdir resumes from its latest checkpoint; adding --eval_only [--eval_step=N]
evaluates a saved checkpoint instead, with test splits, and trains nothing. Multi-host: start one process
per host with --coordinator_address=HOST:PORT --num_processes=N --process_id=I (on a Cloud TPU pod slice no flags
are needed).

Exit status: 0 when the run finished or was stopped by SIGTERM/SIGINT after saving; 2 for a config, flag or workdir
that cannot run (one line on stderr, nothing written; --verbose adds the traceback); 1 when a non-finite loss
stopped the run (the line says which checkpoint is kept and how to go on).
"""

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file, optionally with :variant.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and outputs.')
_ALLOW_CHANGE = flags.DEFINE_list(
    'allow_config_change', [], 'Config fields (top-level like optim, or dotted like optim.lr) that a resumed run may '
    'change; the change is recorded in the workdir\'s config_history.jsonl.')
_EVAL_ONLY = flags.DEFINE_bool(
    'eval_only', False, 'Evaluate a checkpoint of the run in --workdir (the same --config as its training command) '
    'as its final evaluation, test splits included, without training; results in WORKDIR/eval_only/step_N.json.')
_EVAL_STEP = flags.DEFINE_integer('eval_step', 0, 'With --eval_only: the checkpoint step (0: the step the run '
                                  'selected by early stopping, else its newest).')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show the full traceback of a config error.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0, for multi-host runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index in a multi-host run.')


def _fail(message: str, status: int):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with each mistake (an unknown --config. key, a wrong type, a missing file or variant) reported
  as one line and exit status 2 instead of a traceback through ml_collections."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e).strip()
    _fail(re.sub(r'^\w+Error: ', '', message.splitlines()[-1]) if '--verbose' not in argv else message, 2)
  except Exception as e:  # pylint: disable=broad-except  (a config file's get_config, or an unknown field)
    if '--verbose' in argv:
      raise
    text = str(e).strip().strip("'").replace('\\n', '\n').replace("\\'", "'")
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    if suggestion:
      wrong = [a.split('=')[0] for a in argv if re.match(rf'--config\.(.+\.)?{re.escape(suggestion[2])}(=|$)', a)]
      _fail(f'{wrong[0] if wrong else suggestion[2]} is not a field of the config; did you mean '
            f'"{suggestion[1]}"?', 2)
    if isinstance(e, (AttributeError, KeyError)):
      _fail(f'{text.splitlines()[0].strip(chr(34) + chr(39))!r} is not a field of the config.', 2)
    _fail(text.splitlines()[-1] if text else type(e).__name__, 2)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; config fields are set with --config.name=value.', 2)
  if _CONFIG.value is None or not _WORKDIR.value:
    _fail('both --config=configs/....py[:variant] and --workdir=DIR are needed.', 2)
  from foundation import host
  host.keep_freed_memory()  # CPU only; before jax starts its threads and allocates
  # Imported here so that --help and flag errors do not pay for importing jax.
  import jax
  from foundation import sharding, train
  try:
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    _fail(str(e), 2)
  logging.set_verbosity(logging.WARNING)
  try:
    if _EVAL_ONLY.value:
      results = train.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, step=_EVAL_STEP.value)
      if jax.process_index() == 0:
        print('\n'.join(f'{k} {v:.6g}' for k, v in sorted(results.items())), flush=True)
    else:
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)
  except train.ConfigError as e:
    if _VERBOSE.value:
      raise
    _fail(f'{e} (nothing was written; --verbose shows the traceback)', 2)
  except train.NonFiniteError as e:
    if _VERBOSE.value:
      raise
    _fail(str(e), 1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
