"""Command line: python -m foundation.main --config=configs/lm/shakespeare.py[:variant] --workdir=DIR [--config.x=v]

Rerunning the same command on the same workdir resumes from its latest checkpoint; adding --eval_only [--eval_step=N]
evaluates a saved checkpoint instead, with test splits, and trains nothing. Multi-host: start one process
per host with --coordinator_address=HOST:PORT --num_processes=N --process_id=I, or the same in the environment
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); on a Cloud TPU pod slice or in a SLURM step nothing
is needed.

Exit status: 0 when the run finished or was stopped by SIGTERM/SIGINT after saving; 2 for a config, flag or workdir
that cannot run (one line on stderr, nothing written; --verbose adds the traceback); 1 when a non-finite loss
stopped the run (the line says which checkpoint is kept and how to go on).
"""

import os

from absl import app, flags, logging

from foundation import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and outputs.')
_ALLOW_CHANGE = flags.DEFINE_list(
    'allow_config_change', [], 'Config fields (top-level like optim, or dotted like optim.lr) that a resumed run may '
    'change; the change is recorded in the workdir\'s config_history.jsonl.')
_EVAL_ONLY = flags.DEFINE_bool(
    'eval_only', False, 'Evaluate a checkpoint of the run in --workdir (the same --config as its training command) '
    'as its final evaluation, test splits included, without training; results in WORKDIR/eval_only/step_N.json.')
_EVAL_STEP = flags.DEFINE_integer('eval_step', 0, 'With --eval_only: the checkpoint step (0: the step the run '
                                  'selected by early stopping, else its newest).')
_DRY_RUN = flags.DEFINE_bool(
    'dry_run', False, 'Check the config and compile its train step for this machine\'s devices, then print the '
    'step\'s memory per device, FLOPs and collectives (foundation.plan) without training; --workdir is not needed.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show the full traceback of a config error.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0, for multi-host runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index in a multi-host run.')


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; config fields are set with --config.name=value.', 2)
  if cli.CONFIG.value is None or not (_WORKDIR.value or _DRY_RUN.value):
    cli.fail('both --config=configs/....py[:variant] and --workdir=DIR are needed (--dry_run needs no workdir).', 2)
  if _EVAL_STEP.value and not _EVAL_ONLY.value:
    cli.fail(f'--eval_step={_EVAL_STEP.value} names the checkpoint that --eval_only evaluates: add --eval_only (a '
             'run without it trains on).', 2)
  if _EVAL_ONLY.value and _DRY_RUN.value:
    cli.fail('--eval_only and --dry_run are two modes (evaluate a checkpoint; compile the train step): pick one.', 2)
  from foundation import host
  host.keep_freed_memory()  # CPU only; before jax starts its threads and allocates
  # Imported here so that --help and flag errors do not pay for importing jax.
  import jax
  # Compiled programs persist across runs: a rerun, a resume or a sweep's next cell at the same shapes loads its
  # step instead of compiling it. $JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/foundation/jax;
  # FOUNDATION_COMPILATION_CACHE=0 turns it off.
  if not jax.config.jax_compilation_cache_dir and os.environ.get('FOUNDATION_COMPILATION_CACHE') != '0':
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser('~/.cache/foundation/jax'))
  from foundation import sharding, train
  try:
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    cli.fail(str(e), 2)
  logging.set_verbosity(logging.WARNING)
  try:
    if _DRY_RUN.value:
      from foundation import plan
      if _WORKDIR.value:  # the checks a start in that workdir would make (a resume's config, pinned sources)
        train.prepare(cli.CONFIG.value, _WORKDIR.value, dry=True, allow_config_change=_ALLOW_CHANGE.value)
      result, _, _ = plan.run(cli.CONFIG.value, propose=False)
      if not result.fits:
        cli.fail('the train step does not fit in this machine\'s memory; python -m foundation.plan proposes changes '
                 'that do.', 2)
    elif _EVAL_ONLY.value:
      results = train.evaluate_checkpoint(cli.CONFIG.value, _WORKDIR.value, step=_EVAL_STEP.value)
      if jax.process_index() == 0:
        print('\n'.join(f'{k} {v:.6g}' for k, v in sorted(results.items())), flush=True)
    else:
      train.train_and_evaluate(cli.CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)
  except train.ConfigError as e:
    if _VERBOSE.value:
      raise
    cli.fail(f'{e} (nothing was written; --verbose shows the traceback)', 2)
  except train.NonFiniteError as e:
    if _VERBOSE.value:
      raise
    cli.fail(str(e), 1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
