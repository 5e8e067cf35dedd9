"""The one training loop, shared by every method. It knows nothing about any method: a Task supplies the parts.

Read top to bottom: `prepare` checks everything that depends on the config (mesh, task, data, model shapes, the
optimizer, the step's shapes, the workdir's earlier config) and writes nothing; then the workdir -> sharded state
(restored if the workdir has a checkpoint) -> compiled step -> loop (log, check for non-finite numbers, evaluate,
checkpoint, stop on SIGTERM) -> final evaluation.

Exact resume: the step's randomness is `fold_in(seed, step)`, and the data iterator's state (and the metrics of a
log interval cut short by a stop) are saved with the params, so a run restarted from a checkpoint computes and logs
the same numbers as one that never stopped.

A checkpoint of step s holds the params after update s, whose own loss is only computed at step s + 1: the loop
counts a checkpoint as good once that loss was seen finite, never prunes the newest good one, and when it meets a
non-finite loss it moves the checkpoints it can no longer vouch for aside before stopping.
"""

import contextlib
import dataclasses
import datetime
import json
import math
import os
import signal
import subprocess
import threading
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import grain
import numpy as np
import optax
from jax.experimental import multihost_utils

from foundation import checkpoint, files, host, metrics, optim, sharding, tasks
from foundation.data import text

# Bumped whenever the saved state changes; a workdir of a format this code does not read is refused with a message
# instead of an orbax tree-structure error. Format 3 saves version-2 checksums (checkpoint.CHECKSUM_VERSION), which
# code of format 2 would take for damage; this code reads both.
CHECKPOINT_FORMAT = 3
READABLE_FORMATS = (2, 3)


class ConfigError(ValueError):
  """A config that cannot run, found before anything is written. `foundation.main` prints it as one line."""


class NonFiniteError(FloatingPointError):
  """A non-finite loss, gradient norm or parameter stopped the run."""


def validate(config, num_devices: int, processes: int | None = None) -> None:
  """Every check that needs no data and no compilation, so a bad config fails before anything is written; for a run
  of `processes` processes (default: this one's)."""
  processes = processes or jax.process_count()
  if config.parallelism not in ('jit', 'pmap'):
    raise ValueError(f'config.parallelism={config.parallelism!r}; choose jit or pmap.')
  for name in ('log_every', 'eval_every', 'checkpoint_every', 'grad_accum_steps', 'global_batch_size',
               'max_checkpoints'):
    if not isinstance(config[name], int) or config[name] < 1:
      raise ValueError(f'config.{name}={config[name]!r} must be a whole number of at least 1.')
  for name in ('restore_step', 'prefetch_batches', 'num_train_steps'):  # 0 steps: evaluate only
    if not isinstance(config[name], int) or config[name] < 0:
      raise ValueError(f'config.{name}={config[name]!r} must be a whole number of at least 0.')
  data, fsdp, tensor = sharding.mesh_shape(config.mesh, num_devices)
  if config.parallelism == 'pmap' and (fsdp, tensor) != (1, 1):
    raise ValueError('config.parallelism=pmap is data-parallel only: set --config.mesh.fsdp=1 --config.mesh.tensor=1 '
                     '(use parallelism=jit to shard parameters).')
  replicas = data * fsdp
  per_replica = config.global_batch_size * 1.0 / replicas
  if config.global_batch_size % replicas:
    raise ValueError(f'config.global_batch_size={config.global_batch_size} is not divisible by the data-parallel '
                     f'size {replicas} (mesh data={data} x fsdp={fsdp}); use a multiple of {replicas}.')
  if config.global_batch_size % processes:
    raise ValueError(f'config.global_batch_size={config.global_batch_size} is not divisible by the '
                     f'{processes} processes.')
  if replicas % processes:  # else processes that feed different rows would share one batch shard
    raise ValueError(f'the mesh has {replicas} data-parallel replicas (data={data} x fsdp={fsdp}) for '
                     f'{processes} processes, each of which feeds rows of its own: make data x fsdp a '
                     f'multiple of the process count (config.mesh.tensor={tensor} spans processes).')
  if per_replica % config.grad_accum_steps:
    raise ValueError(f'config.grad_accum_steps={config.grad_accum_steps} does not divide the {int(per_replica)} '
                     'examples each data-parallel replica gets per step.')
  if config.checkpoint_every % config.log_every:
    raise ValueError(f'config.checkpoint_every={config.checkpoint_every} must be a multiple of config.log_every='
                     f'{config.log_every}, so a resumed run logs the same averages as an uninterrupted one.')
  eval_batch = config.get('eval', {}).get('batch_size')
  if eval_batch is not None and (not isinstance(eval_batch, int) or eval_batch < 1 or eval_batch % replicas):
    raise ValueError(f'config.eval.batch_size={eval_batch!r} must be a positive multiple of the data-parallel size '
                     f'{replicas}: evaluation batches are split over it too.')
  skip = config.optim.get('skip_nonfinite', 0)
  if not isinstance(skip, int) or skip < 0:
    raise ValueError(f'config.optim.skip_nonfinite={skip!r} must be a whole number of at least 0.')
  lr = config.optim.get('lr')
  if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
    raise ValueError(f'config.optim.lr={lr!r} must be a finite number of at least 0.')
  profile = tuple(config.get('profile_steps') or ())
  if profile and not (len(profile) == 2 and all(isinstance(s, int) for s in profile)
                      and 1 <= profile[0] <= profile[1] <= config.num_train_steps):
    raise ValueError(f'config.profile_steps={profile!r} must be (first, last) steps with 1 <= first <= last <= '
                     f'num_train_steps={config.num_train_steps}, e.g. (10, 12); () profiles nothing.')
  early = config.get('early_stopping') or {}
  if early.get('metric'):
    if not str(early['metric']).startswith('eval/'):
      raise ValueError(f'config.early_stopping.metric={early["metric"]!r} must name an evaluation metric, such as '
                       "'eval/validation/accuracy' (one the task's evaluation writes).")
    if early.get('mode') not in ('max', 'min'):
      raise ValueError(f'config.early_stopping.mode={early.get("mode")!r}; choose max (accuracy) or min (loss).')
    patience = early.get('patience')
    if not isinstance(patience, int) or isinstance(patience, bool) or patience < 0:
      raise ValueError(f'config.early_stopping.patience={patience!r} must be a whole number of evaluations, at '
                       'least 0 (0: never stop early, only keep the best step).')


# How a run executes, or where it reads from, not what it computes: a resumed run may change these (move to another
# mesh, machine or account). Dotted names are fields inside a section.
RUNTIME_FIELDS = ('mesh', 'parallelism', 'prefetch_batches', 'restore_step', 'data.data_dir', 'profile_steps',
                  'energy')
# Fields of a run's record that each process may set for itself: where its host finds the data, how far ahead it
# reads, what it profiles, what its reports assume about power.
PER_PROCESS_FIELDS = ('data.data_dir', 'prefetch_batches', 'profile_steps', 'energy')

# Where config.profile_steps writes its jax.profiler trace, inside the workdir (TensorBoard's profile tab reads it).
PROFILE_DIR = 'profile'

# Where --eval_only writes its results (step_<N>.json), inside the workdir.
EVAL_ONLY_DIR = 'eval_only'
# Written into config.json beside the config, never compared as config fields.
RECORD_FIELDS = ('frozen_sources', 'foundation_version', 'data_version')

# The loop dispatches steps ahead of the device and fetches their metrics once per log interval; it waits for a
# step once this many newer ones are queued behind it. Enough to hide dispatch on any accelerator, and a bound is
# needed on CPU: with several CPU devices sharing one thread pool, an unbounded queue of steps deadlocked in an
# all-reduce ("Expected 2 threads to join the rendezvous", benchmarks/README.md) while 4 queued steps never did.
MAX_STEPS_IN_FLIGHT = 4


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, name + '.'))
    else:
      flat[name] = value
  return flat


def _is_within(name: str, fields) -> bool:
  return any(name == f or name.startswith(f + '.') for f in fields)


def config_differences(recorded: dict, resolved: dict, *, new_fields: bool = True) -> dict[str, list]:
  """Dotted field -> [recorded value, resolved value] for each field in which a run's config.json and a resolved
  config (as JSON) differ, sorted; runtime fields and the record's own fields are not the config's. new_fields=False
  leaves out the fields the record lacks (added to the code after the run)."""
  old, new = _flatten({k: v for k, v in recorded.items() if k not in RECORD_FIELDS}), _flatten(resolved)
  return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new) if new_fields else set(old))
          if old.get(k) != new.get(k) and not _is_within(k, RUNTIME_FIELDS)}


def _code_version() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=os.path.dirname(__file__), text=True,
                          capture_output=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


@dataclasses.dataclass
class Prepared:
  """What `prepare` found: everything the loop needs before it writes its first file."""
  task: tasks.Task
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: Any
  shardings: Any
  frozen: Any             # host arrays (abstract when dry)
  frozen_shardings: Any   # laid out by the same rules as trained params where the task boxed them with axis names
  init_params: tuple[str, Any] | None   # config.init_from: (target subtree, host arrays), on a first start only
  record: dict            # the config.json to write: the resolved config plus RECORD_FIELDS
  changes: dict           # field -> [old, new] accepted through allow_config_change
  state_bytes_per_device: int  # params and optimizer state (activations come on top)
  batch: Any              # the global batch's shapes and dtypes (jax.ShapeDtypeStruct)
  abstract_state: Any     # the train state's shapes and dtypes (jax.ShapeDtypeStruct), without shardings
  traced_step: jax.stages.Traced | None  # the jit path's train step, traced for these shapes and shardings
  restore_step: int = 0   # the checkpoint to go back to (config.restore_step, unless a run already went back to it)


def prepare(config, workdir: str, allow_config_change=(), *, dry: bool = False,
            devices: Sequence[jax.Device] | None = None, resume: bool = True) -> Prepared:
  """Every check that can fail because of the config, data or workdir, before anything is written.

  Raises ConfigError with one line that says what to change. In a multi-process run every process prepares and
  they agree: if one refuses, all do. `dry=True` reads no other run's checkpoint (frozen sources stay abstract),
  for checking configs whose sources do not exist here. `devices` (default: all of this run's) are those the mesh
  spans: foundation.plan passes a TPU topology's, whose memory it checks itself against the chip's. `resume=False`
  (an evaluation of a saved checkpoint) skips what only resuming training needs: the restore step and the saved
  training state's structure.
  """
  error = None
  try:
    prepared = _prepare(config, workdir, tuple(allow_config_change), dry, devices, resume)
  except ConfigError as e:
    error = e
  except (ValueError, TypeError, KeyError, AttributeError, FileNotFoundError, NotADirectoryError) as e:
    error = ConfigError(str(e).strip().replace('\n', ' '))
    error.__cause__ = e
  except MemoryError as e:  # a size so large that building one batch or table of it fails
    error = ConfigError(f'the config asks for more host memory than there is ({e}); look for a size with an extra '
                        'digit.')
    error.__cause__ = e
  sharding.raise_where_any_failed(error, lambda failed: ConfigError(
      f'process(es) {[process for process, _ in failed]} refused this run; their output says why.'))
  if jax.process_count() > 1:
    _check_processes_agree(prepared.record)
  return prepared


def _check_processes_agree(record: dict) -> None:
  """Raises ConfigError on every process unless all of them are about to run the same thing: the same config,
  code and data version, and the same checkpoints of the runs they read (a launcher that gives one host other flags
  or another checkout, or a source run that saves a newer checkpoint while the processes read its newest, would
  otherwise have them compute different things in one program, silently or until a collective hangs). A source's
  path as each host spells it may differ (checkouts at other places), its step and content hash may not; the code
  version is compared where every host knows it. A collective: every process calls it after prepare's agreement."""
  flat = {k: v for k, v in _flatten(json.loads(json.dumps(record, default=str))).items()
          if not _is_within(k, PER_PROCESS_FIELDS) and not (k.startswith('frozen_sources.')
                                                             and k.rsplit('.', 1)[-1] in ('workdir', 'file'))}
  commit = 'foundation_version.commit'
  flat[commit] = str(flat.get(commit))[:7]  # git's short hash grows with a clone's object count
  records = [json.loads(text) for text in sharding.gather_texts(json.dumps(flat, sort_keys=True))]
  if any(theirs.get(commit) == 'unknown' for theirs in records):
    records = [{k: v for k, v in theirs.items() if k != commit} for theirs in records]
  for process, theirs in enumerate(records[1:], 1):
    # Compared as JSON text: a NaN in the config equals itself.
    differing = [k for k in sorted(set(theirs) | set(records[0]))
                 if json.dumps(theirs.get(k)) != json.dumps(records[0].get(k))]
    if differing:
      shown = ', '.join(f'{k}: {records[0].get(k)!r} vs {theirs.get(k)!r}' for k in differing[:4])
      raise ConfigError(f'process {process} would not run what process 0 runs ({shown}); start every process from '
                        'the same checkout with the same config and flags (where only a frozen_sources step differs, '
                        'that run saved a checkpoint while this one started: start this one again).')


def _prepare(config, workdir: str, allow_config_change: tuple, dry: bool, devices, resume: bool) -> Prepared:
  files.require(workdir)  # its ValueError becomes prepare's one-line ConfigError
  local = devices is None
  devices = jax.devices() if local else list(devices)
  # The hosts the devices span: this run's processes, or a planned topology's (each host runs one process).
  processes = len({d.process_index for d in devices})
  validate(config, len(devices), processes)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.get('sharding_rules'))
  if config.parallelism == 'pmap':
    rules = tuple((name, None) for name, _ in rules)  # pmap replicates everything
  task = tasks.build(config)  # checks that its data is prepared
  metric = (config.get('early_stopping') or {}).get('metric')
  if metric and task.evaluate is None:
    raise ConfigError(f'config.early_stopping.metric is set, but task {config.task!r} has no evaluation to select '
                      "a step by; set --config.early_stopping.metric=''.")
  if metric and config.num_train_steps and task.selection_metrics is not None and metric not in task.selection_metrics:
    given = ', '.join(task.selection_metrics) or 'none: no evaluation before the end reads a validation split'
    raise ConfigError(f'config.early_stopping.metric={metric!r} is not among the metrics that the evaluations before '
                      f"the end give ({given}); name one of them, or set --config.early_stopping.metric=''.")
  if task.batch_coupled_loss and (config.parallelism == 'pmap' or config.grad_accum_steps > 1):
    raise ConfigError(f'config.task={config.task!r} contrasts every example with the whole global batch, but '
                      f'parallelism={config.parallelism!r} with grad_accum_steps={config.grad_accum_steps} would '
                      'compute its loss on a slice of it: set --config.parallelism=jit --config.grad_accum_steps=1.')

  previous = None
  config_path = os.path.join(workdir, 'config.json')
  if files.exists(config_path):
    previous = json.loads(files.read_text(config_path))
    version = previous.get('foundation_version', {})
    if version.get('checkpoint_format') not in READABLE_FORMATS:
      raise ConfigError(f'{workdir} was written by foundation {version.get("commit", "(an older version)")} with '
                        f'checkpoint format {version.get("checkpoint_format", 1)}; this code ({_code_version()}) '
                        f'reads formats {READABLE_FORMATS}. Resume it with that version, or pick a new --workdir.')

  # Model shapes, the optimizer (names, regexes), the frozen sources and the step's shapes: all traced abstractly.
  abstract_params = jax.eval_shape(task.init, jax.random.key(config.seed))
  tx, schedule = optim.make_optimizer(config.optim, nn.unbox(abstract_params), config.num_train_steps)
  shardings = _state_shardings(abstract_params, tx, mesh, rules)
  # From the params' shapes: tracing task.init again costs seconds for a 30-layer model.
  abstract_state = jax.eval_shape(lambda params: _state_of(params, tx), nn.unbox(abstract_params))
  state_bytes = _check_memory(abstract_state, shardings) if local else _bytes_per_device(abstract_state, shardings)
  sources = checkpoint.Sources(previous.get('frozen_sources') if previous else None, dry=dry)
  frozen = task.frozen(sources) if task.frozen else {}
  frozen_shardings = sharding.param_shardings(frozen, mesh, rules)
  frozen = nn.unbox(frozen)
  saved = checkpoint.saved_steps(workdir)
  init_params = None if saved else _init_from(config, task, abstract_params, sources)
  try:
    batch = task.train_batches(jax.process_index() if local else 0, processes)[0]  # checks shards, the batch
  except MemoryError as e:
    raise ConfigError(f'one batch of config.global_batch_size={config.global_batch_size} does not fit in host '
                      f'memory ({e}); lower it.') from e
  global_batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((x.shape[0] * processes, *x.shape[1:]), x.dtype), batch)
  traced_step = None
  if config.num_train_steps:  # an evaluation-only run never takes a step: tracing one would only cost time
    step_fn = make_train_step(task, tx, schedule, config, axis_name=None)
    if config.parallelism == 'jit':  # traced as the run compiles it, which then reuses this trace
      traced_step = _trace_jit_step(step_fn, mesh, rules, shardings, abstract_state, frozen, frozen_shardings,
                                    global_batch)
    else:
      with _mesh_context(mesh, rules):
        jax.eval_shape(step_fn, abstract_state, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                             frozen), global_batch)

  resolved = json.loads(config.to_json_best_effort())
  data = config.get('data') or {}
  # The dataset's version: another one (a builder that changed) may hold other examples or order them otherwise, so
  # the run would not go on with the batches it would have seen.
  data_version = text.prepared_version(data.name, data.data_dir) if data.get('name') and data.get('data_dir') else None
  changes = {}
  if previous is not None:
    # An evaluation of a saved checkpoint leaves out the fields its config.json lacks (added to the code after the
    # run): were one to change the model, the checkpoint's structure would say so.
    changes = config_differences(previous, resolved, new_fields=resume)
    if previous.get('data_version', data_version) != data_version:  # a record from before versions were has none
      changes['data.version'] = [previous['data_version'], data_version]
    refused = [k for k in changes if not _is_within(k, allow_config_change)]
    if 'data.version' in refused:
      raise ConfigError(f'{workdir} holds a run that read version {changes["data.version"][0]} of {data.name}, but '
                        f'{data.data_dir} now gives version {data_version}, whose examples may differ or come in '
                        'another order. Resume it with the code that builds the version it read, pick a new '
                        '--workdir, or accept the change with --allow_config_change=data.')
    if refused:
      shown = ', '.join(f'{k}: {changes[k][0]!r} -> {changes[k][1]!r}' for k in refused[:6])
      raise ConfigError(f'{workdir} holds a run with a different config ({shown}). Rerun with the same config to '
                        f'resume it, pick a new --workdir, or accept the change with '
                        f'--allow_config_change={",".join(sorted({k.split(".")[0] for k in refused}))}.')
  restore_step = _check_resume(workdir, config.restore_step, saved, abstract_state) if resume else 0
  record = {**resolved, 'frozen_sources': {**(previous or {}).get('frozen_sources', {}), **sources.recorded},
            'foundation_version': {'checkpoint_format': CHECKPOINT_FORMAT, 'commit': _code_version()},
            'data_version': data_version}
  return Prepared(task=task, mesh=mesh, rules=rules, tx=tx, schedule=schedule, shardings=shardings, frozen=frozen,
                  frozen_shardings=frozen_shardings, init_params=init_params, record=record, changes=changes,
                  traced_step=traced_step, state_bytes_per_device=state_bytes, batch=global_batch,
                  abstract_state=abstract_state, restore_step=restore_step)


def _check_resume(workdir: str, restore_step: int, saved: list[int], abstract_state) -> int:
  """The checkpoint step to go back to (0: resume the newest readable one), checked before anything is written.

  config.restore_step must name a saved checkpoint; but once a run has gone back to it and trained on (its newer
  checkpoints record that), the same command resumes that run's newest checkpoint instead of going back again: a
  preempted job rerun as it was launched must keep its progress. And the checkpoint must hold the training state
  that this config builds: a change accepted by --allow_config_change that alters the state (a step added to the
  optimizer, a frozen part, a shape) is refused here, rather than taken for damage and its checkpoints set aside.
  """
  if restore_step and saved and saved[-1] > restore_step and (
      checkpoint.saved_record(workdir, saved[-1]).get('restored_from') == restore_step):
    if jax.process_index() == 0:
      print(f'config.restore_step={restore_step} was applied by an earlier run of {workdir}, which trained on to step '
            f'{saved[-1]}: resuming from there (to go back to step {restore_step} again, move the newer checkpoints '
            'out of checkpoints/).')
    restore_step = 0
  if restore_step and restore_step not in saved:
    raise ConfigError(f'config.restore_step={restore_step}: {workdir} has no checkpoint of that step (it has '
                      f'{saved or "none"}); name one of those, or 0 for the newest.')
  if saved:
    step = restore_step or saved[-1]
    differences = checkpoint.state_differences(workdir, step, abstract_state)
    if differences:
      raise ConfigError(f'the checkpoint of step {step} in {workdir} holds another training state than this config '
                        f'builds ({differences}), so the run cannot resume with this change. Pick a new --workdir, '
                        f'with --config.init_from.source={workdir} to start from its params.')
  return restore_step


def _subtree(tree: Any, target: str, what: str) -> Any:
  for key in [k for k in target.split('/') if k]:
    if not isinstance(tree, dict) or key not in tree:
      raise ValueError(f'{what}: the params have no {key!r} (at this level: '
                       f'{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}).')
    tree = tree[key]
  return tree


def _with_subtree(tree: dict, target: str, value: Any) -> dict:
  keys = [k for k in target.split('/') if k]
  if not keys:
    return value
  return {**tree, keys[0]: _with_subtree(tree[keys[0]], '/'.join(keys[1:]), value)}


def _init_from(config, task: tasks.Task, abstract_params, sources: checkpoint.Sources) -> tuple[str, Any] | None:
  """config.init_from read and shape-checked against the params it replaces: (target, host arrays) or None."""
  spec = config.get('init_from') or {}
  source = spec.get('source', '')
  if not source:
    return None
  target = spec.get('target', '')
  want = _subtree(nn.unbox(abstract_params), target, f'config.init_from.target={target!r}')
  if files.isdir(source):
    if not files.isdir(os.path.join(source, 'checkpoints')):
      raise ValueError(f'config.init_from.source={source!r} is a directory without checkpoints/: name a workdir '
                       'of a run that saved a checkpoint.')
    _check_source_run(source, sources, config, task.init_from_fields)
    tree = sources.load('init_from', source, spec.get('params_path', 'params'), want, step=spec.get('step') or None)
  elif task.import_params is None:
    raise ValueError(f'config.init_from.source={source!r} is not a workdir, and task {config.task!r} imports no '
                     'weight files.')
  else:
    tree = task.import_params(source, sources, want)
  differences = checkpoint.tree_differences(tree, want)
  if differences:
    raise ValueError(f'config.init_from.source={source!r} does not fit config.init_from.target={target!r}: '
                     f'{differences}.')
  return target, tree


def _check_source_run(source: str, sources: checkpoint.Sources, config, fields: Sequence[str]) -> None:
  """Params trained on top of frozen ones (an adapter on its base model) only mean something on the same frozen
  params, and with the config `fields` the task names (task.init_from_fields): a source run whose frozen source of
  the same name had other contents, or whose config.json has another value of one of the fields, is refused."""
  try:
    theirs = json.loads(files.read_text(os.path.join(source, 'config.json')))
  except FileNotFoundError:
    return
  frozen = theirs.get('frozen_sources', {})
  for name, ours in sources.recorded.items():
    if name in frozen and frozen[name].get('hash') != ours.get('hash'):
      where = lambda r: r.get('file') or f'{r.get("workdir")} step {r.get("step")}'
      raise ValueError(f'config.init_from.source={source!r} was trained with frozen {name!r} = {where(frozen[name])} '
                       f'(hash {frozen[name].get("hash")}), but this run\'s is {where(ours)} (hash '
                       f'{ours.get("hash")}): its params belong to that base. Use the same base, or start fresh.')
  # Fields its config.json lacks (added to the code after that run) are not compared.
  differ = {k: v for k, v in config_differences(theirs, json.loads(config.to_json_best_effort()),
                                                new_fields=False).items() if _is_within(k, fields)}
  if differ:
    shown = '; '.join(f'{k}={a!r} (here {b!r})' for k, (a, b) in differ.items())
    raise ValueError(f'config.init_from.source={source!r} was trained with {shown}: its params mean the same only '
                     'with those settings; set them as it did, or start fresh.')


def _check_memory(abstract_state, shardings) -> int:
  """Refuses a train state that cannot fit: per device, the parameters and optimizer state alone (activations
  come on top) against the device's memory, or on CPU against the machine's RAM shared by its devices. Returns
  those bytes per device."""
  per_device = _bytes_per_device(abstract_state, shardings)
  limit, where = device_memory(jax.local_devices())
  if per_device > limit:
    raise ConfigError(f'the parameters and optimizer state need {per_device / 2**30:.1f} GiB per device, more than '
                      f'the {limit / 2**30:.1f} GiB of {where}; shrink the model, or shard it with '
                      '--config.mesh.fsdp (or tensor) over more devices.')
  return per_device


def device_memory(devices: Sequence[jax.Device]) -> tuple[float, str]:
  """(bytes, what they are) a device of this host may use: an accelerator's own memory, or on CPU the machine's RAM
  shared by its `devices`."""
  device = devices[0]
  stats = device.memory_stats() if device.platform != 'cpu' else None
  if stats and stats.get('bytes_limit'):
    return stats['bytes_limit'], f'{device.device_kind} memory'
  return (os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / len(devices),
          f'this machine\'s RAM shared by {len(devices)} CPU devices')


def _bytes_per_device(abstract: Any, shardings: Any) -> int:
  return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
             for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))


def _write_config(prepared: Prepared, workdir: str, resume_step: int | None) -> None:
  """config.json (atomically); an accepted change of config is appended to config_history.jsonl."""
  if jax.process_index() != 0:
    return
  if prepared.changes:
    entry = {'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
             'resumed_from_step': resume_step, 'changes': prepared.changes}
    files.append(os.path.join(workdir, 'config_history.jsonl'), json.dumps(entry) + '\n')
  files.write_atomically(os.path.join(workdir, 'config.json'),
                         json.dumps(prepared.record, indent=2, sort_keys=True) + '\n')


def _split_microbatches(batch: Any, n: int) -> Any:
  # Microbatch i takes every n-th row, so each device keeps its own rows and no data moves between devices.
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


def _init_state(task, tx, rng):
  return _state_of(nn.unbox(task.init(rng)), tx)


def _state_of(params, tx):
  """The train state around `params`: step 0, the optimizer's initial state, no skipped updates."""
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
          'skipped_updates': jnp.zeros((), jnp.int32)}


def make_train_step(task: tasks.Task, tx: optax.GradientTransformation, schedule, config, axis_name: str | None):
  """(state, frozen, batch) -> (state, metrics). `axis_name` is set on the pmap path, where devices average.

  Devices (pmap) and microbatches (accumulation) each compute a mean over their share; the shares are combined
  weighted by the task's aux['weight'] (tokens, for padded text), so every path computes the global batch's mean.
  """
  base_rng = jax.random.key(config.seed)
  skip_budget = config.optim.get('skip_nonfinite', 0)

  def loss_and_grads(params, frozen, batch, rng):
    """The gradients of the parameters that train (optim.zero_frozen): no gradient work for the frozen ones, and
    train/grad_norm is the norm of what trains."""
    (loss, aux), grads = jax.value_and_grad(task.loss, has_aux=True)(params, frozen, batch, rng)
    return (loss, aux), optim.zero_frozen(config.optim, grads, params)

  def weighted(params, frozen, batch, rng):
    (loss, aux), grads = loss_and_grads(params, frozen, batch, rng)
    aux = dict(aux)
    weight = jax.lax.stop_gradient(jnp.asarray(aux.pop('weight', 1.0), jnp.float32))
    return jax.tree.map(lambda x: x * weight, (loss, aux, grads)), weight

  def step(state, frozen, batch):
    rng = jax.random.fold_in(base_rng, state['step'])
    if config.grad_accum_steps == 1 and not axis_name:
      (loss, aux), grads = loss_and_grads(state['params'], frozen, batch, rng)
      aux = {k: v for k, v in aux.items() if k != 'weight'}
    else:
      if config.grad_accum_steps == 1:
        sums, weight = weighted(state['params'], frozen, batch, rng)
      else:
        micro = _split_microbatches(batch, config.grad_accum_steps)

        def accumulate(carry, micro_batch):
          # The same rng for every microbatch: examples key their randomness by their global position.
          return jax.tree.map(jnp.add, carry, weighted(state['params'], frozen, micro_batch, rng)), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
            weighted, state['params'], frozen, jax.tree.map(lambda x: x[0], micro), rng))
        (sums, weight), _ = jax.lax.scan(accumulate, zeros, micro)
      if axis_name:
        sums, weight = jax.lax.psum((sums, weight), axis_name)
      loss, aux, grads = jax.tree.map(lambda x: x / jnp.maximum(weight, 1e-12), sums)
    grad_norm = optim.global_norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    skipped = state['skipped_updates']
    if skip_budget:  # a non-finite update leaves params and optimizer state as they were, while budget remains
      skip = ~finite & (skipped < skip_budget)
      params, opt_state = jax.tree.map(lambda new, old: jnp.where(skip, old, new), (params, opt_state),
                                       (state['params'], state['opt_state']))
      skipped = skipped + skip.astype(jnp.int32)
    out = {'update_skipped': skip} if skip_budget else {}
    # The optimizer's own step count (and so its learning rate) does not advance over a skipped update.
    out |= {'train/loss': loss, 'train/grad_norm': grad_norm,
            'train/lr': schedule(state['step'] - state['skipped_updates']),
           **{f'train/{k}': v for k, v in aux.items()}}
    if skip_budget:
      out['train/skipped_updates'] = skipped
    return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state, 'skipped_updates': skipped}, out

  return step


def _state_shardings(abstract_params, tx, mesh: jax.sharding.Mesh, rules) -> Any:
  """Optimizer-state leaves that mirror a parameter (Adam's moments) are sharded like it; the rest (counts) are
  replicated. A leaf mirrors the parameter whose dict-key path ends its own path with the same shape: this holds
  where optax.masked puts MaskedNode in place of the frozen parameters (config.optim.freeze), which optax's own
  tree_map_params cannot follow."""
  params = sharding.param_shardings(abstract_params, mesh, rules)
  unboxed = nn.unbox(abstract_params)
  by_path = {tuple(k.key for k in path): (x.shape, s) for (path, x), s in zip(
      jax.tree_util.tree_flatten_with_path(unboxed)[0], jax.tree.leaves(params))}

  def leaf_sharding(path, leaf):
    keys = []
    for entry in reversed(path):
      if not isinstance(entry, jax.tree_util.DictKey):
        break
      keys.insert(0, entry.key)
    shape, param_sharding = by_path.get(tuple(keys), (None, None))
    return param_sharding if shape == leaf.shape else sharding.replicated(mesh)

  opt = jax.tree_util.tree_map_with_path(leaf_sharding, jax.eval_shape(tx.init, unboxed))
  return {'step': sharding.replicated(mesh), 'params': params, 'opt_state': opt,
          'skipped_updates': sharding.replicated(mesh)}


class _Jit:
  """The sharded path: one jit over the mesh; the state is already in its global, checkpointable layout.

  Given the step `traced` by `prepare` for batches shaped like `traced_batch`, it compiles that trace at the first
  step of those shapes (one trace per run, not two) and runs it on them; a batch of other shapes (tasks that pad a
  batch to its longest example) goes through the jit, which traces and compiles once per shape."""

  def __init__(self, step_fn, mesh, rules, shardings, traced: jax.stages.Traced | None = None,
               traced_batch: Any = None):
    self.mesh, self.rules = mesh, rules
    self.jitted = jax.jit(step_fn, in_shardings=(shardings, None, sharding.batch_sharding(mesh)),
                          out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    self._traced, self._compiled = traced, None
    self._traced_for = _shapes(traced_batch) if traced is not None else None

  def step(self, state, frozen, batch):
    if self._traced is None or _shapes(batch) != self._traced_for:
      return self.jitted(state, frozen, batch)
    if self._compiled is None:  # the caller's mesh context is in place, as for the jit
      self._compiled = self._traced.lower().compile()
    return self._compiled(state, frozen, batch)

  def place(self, local_batch):
    return sharding.global_batch(local_batch, self.mesh)

  def to_devices(self, state):
    return state

  def to_global(self, tree):
    return tree

  def first(self, tree):
    return tree

  def context(self):
    return _mesh_context(self.mesh, self.rules)


def _shapes(tree: Any) -> tuple:
  """A batch's structure, shapes and dtypes as jax sees them (numpy's 64-bit types become 32-bit ones)."""
  leaves, structure = jax.tree.flatten(tree)
  return structure, [(tuple(x.shape), jax.dtypes.canonicalize_dtype(x.dtype)) for x in leaves]


def _trace_jit_step(step_fn, mesh, rules, shardings, abstract_state, frozen, frozen_shardings,
                    batch) -> jax.stages.Traced:
  """The jit path's step traced from shapes alone (nothing is allocated), with the shardings a run gives it."""
  runner = _Jit(step_fn, mesh, rules, shardings)
  with runner.context():
    return runner.jitted.trace(
        checkpoint.abstract_with_shardings(abstract_state, shardings),
        checkpoint.abstract_with_shardings(frozen, frozen_shardings),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh)), batch))


def lower_train_step(prepared: Prepared, config) -> jax.stages.Lowered:
  """The train step of the jit path, lowered for `prepared.mesh`: the program a run compiles, for foundation.plan
  to compile for devices this machine may not have. The step `prepare` traced if it traced one, else one traced
  here from `config` (an evaluation-only config)."""
  traced = prepared.traced_step or _trace_jit_step(
      make_train_step(prepared.task, prepared.tx, prepared.schedule, config, axis_name=None), prepared.mesh,
      prepared.rules, prepared.shardings, prepared.abstract_state, prepared.frozen, prepared.frozen_shardings,
      prepared.batch)
  with _mesh_context(prepared.mesh, prepared.rules):
    return traced.lower()


@contextlib.contextmanager
def _mesh_context(mesh, rules):
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


class _Pmap:
  """The data-parallel pmap path: state stacked per local device, moved to the global layout to save or evaluate."""

  def __init__(self, step_fn, mesh):
    self.mesh = mesh
    self.n = jax.local_device_count()
    self.step = jax.pmap(step_fn, axis_name='batch', in_axes=(0, None, 0), donate_argnums=(0,))

  def place(self, local_batch):
    return jax.tree.map(lambda x: np.asarray(x).reshape(self.n, -1, *x.shape[1:]), local_batch)

  def to_devices(self, state):
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (self.n, *x.shape)), state)

  def to_global(self, tree):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding.replicated(self.mesh), np.asarray(x[0])), tree)

  def first(self, tree):
    return jax.tree.map(lambda x: x[0], tree)

  def context(self):
    return contextlib.nullcontext()  # pmap fails inside jax.set_mesh, and it replicates everything anyway


class _StopRequest:
  """SIGTERM (preemption) or SIGINT (Ctrl-C) asks the loop to stop after the current step and save it.

  One process: a signal handler sets a flag (a second Ctrl-C interrupts at once). Several processes: JAX's
  preemption service (SIGTERM on any host) makes every process agree on the step to stop at, so they all save the
  same one; there the handlers are left to JAX.
  """

  def __init__(self, *, steps: bool = True):
    """steps=False: a run that takes no step (evaluation only) has nothing to save, so the signals keep their
    default effect and stop it at once, rather than after its evaluation (which then reported the run finished)."""
    self.signal_name = None
    self._previous = {}
    if steps and jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name

  def __call__(self, step: int) -> bool:
    if jax.process_count() > 1:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = 'a preemption notice'
        return True
      return False
    return self.signal_name is not None

  def close(self):
    """The signals' own handlers back: from here a signal stops the run at once."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


class _Best:
  """config.early_stopping: which evaluated step is best so far by a named validation metric, and whether the run
  has gone `patience` evaluations without a strict improvement. Its state travels in the checkpoint record, so a
  resumed run selects the same step."""

  def __init__(self, cfg, record: dict, at: int = 0, eval_every: int = 1):
    """record: the checkpoint record of step `at` the run resumes from ({} for a fresh start). A run that stopped
    early stays stopped only while its patience is still spent: a rerun given more patience trains on."""
    self.metric, self.mode, self.patience = cfg['metric'], cfg['mode'], cfg['patience']
    saved = record.get('best') or {}
    self.step, self.value = saved.get('step'), saved.get('value')
    self.stopped = bool(record.get('stopped_early')) and self.exhausted(at, eval_every)

  def update(self, step: int, results: dict) -> bool:
    """Records the evaluation of `step`; True when it is a strict improvement (the new best)."""
    if self.metric not in results:  # a task that does not declare its selection metrics: met at the first evaluation,
      # after steps were trained and written (not a ConfigError, whose message says nothing was)
      raise ValueError(f'config.early_stopping.metric={self.metric!r} is not among the evaluation\'s metrics '
                       f'({", ".join(sorted(results))}); name one of them.')
    value = float(results[self.metric])
    if not math.isfinite(value):
      return False
    better = self.value is None or (value > self.value if self.mode == 'max' else value < self.value)
    if better:
      self.step, self.value = step, value
    return better

  def exhausted(self, step: int, eval_every: int) -> bool:
    return bool(self.patience) and self.step is not None and step - self.step >= self.patience * eval_every

  def record(self) -> dict:
    return {'best': {'step': self.step, 'value': self.value}, 'stopped_early': self.stopped}


_params_finite = jax.jit(checkpoint.all_finite)


def train_and_evaluate(config, workdir: str, *, allow_config_change=()) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the last logged metrics.

  allow_config_change: top-level (or dotted) config fields a resumed run may change, e.g. ('optim',) to continue
  with a lower learning rate after a non-finite loss; the change is recorded in config_history.jsonl.
  """
  launched = time.perf_counter()
  prepared = prepare(config, workdir, allow_config_change)
  task, mesh, shardings, tx = prepared.task, prepared.mesh, prepared.shardings, prepared.tx
  is_writer = jax.process_index() == 0
  say = print if is_writer else (lambda *_: None)

  # From here on, files are written.
  files.makedirs(workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(files.absolute(workdir), 'checkpoints'))
  data_iter = iter(task.train_batches(jax.process_index(), jax.process_count()).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=config.prefetch_batches)))
  init_state = lambda rng: _init_state(task, tx, rng)
  abstract_state = checkpoint.abstract_with_shardings(prepared.abstract_state, shardings)
  restored = ckpt.restore_newest_readable(abstract_state, step=prepared.restore_step, warn=say)
  interval = []  # metrics of the steps since the last log line (restored when a stop cut an interval short)
  record = {}
  if restored is None:
    state = jax.jit(init_state, out_shardings=shardings)(jax.random.key(config.seed))
    start = 0
    if prepared.init_params:  # pretrained weights replace the initialised ones, placed as those were
      target, tree = prepared.init_params
      placed = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, s.dtype), s.sharding), tree,
                            _subtree(state['params'], target, 'init_from'))
      state['params'] = _with_subtree(state['params'], target, placed)
  else:
    start, state, record = restored
    data_iter.set_state(record['data'])
    interval = [(s, m, True) for s, m in record.get('interval', [])]
    later = [s for s in ckpt.steps() if s > start]
    if later:  # an explicit restore_step: the checkpoints after it are kept aside, not overwritten
      say(f'Checkpoints {later} are newer than restore_step={start}; moved to {ckpt.quarantine(later, "superseded")}.')
  # Carried in every later checkpoint, so that a rerun of the command that went back does not go back again.
  restored_from = {'restored_from': prepared.restore_step or record.get('restored_from')}
  best = _Best(config.early_stopping, record, start, config.eval_every) if config.early_stopping.get('metric') else None
  if best and best.step is not None and best.step not in ckpt.steps():
    # Retention keeps the best step's checkpoint, but a checkpoint saved before a better step (and resumed from
    # after a non-finite stop set that one aside) names a best step since deleted: selection starts over.
    say(f'WARNING: the checkpoint of the best step so far ({best.step}) is gone; the step to keep is chosen again '
        'from the evaluations after this one.')
    best = _Best(config.early_stopping, {})
  _write_config(prepared, workdir, start if restored else None)
  if is_writer and not (best and best.stopped) and start < config.num_train_steps:
    # Finished before and now trained further (more steps), or gone back to an older step: the end and the step
    # selected then are no longer this run's (best.json names the step that --eval_only and init_from read).
    for name in (files.FINISHED_FILE, checkpoint.BEST_FILE):
      if files.exists(os.path.join(workdir, name)):
        files.remove(os.path.join(workdir, name))
  frozen = jax.device_put(prepared.frozen, prepared.frozen_shardings) if prepared.frozen else {}
  if is_writer:
    sharding.warn_replicated(state['params'], mesh)

  writer = metrics.MetricWriter(workdir, enabled=is_writer, resume_step=start if start else None, warn=say)
  progress = metrics.Progress(config.num_train_steps, enabled=is_writer)
  counts = _param_counts(config, state['params'], prepared.frozen)
  devices = jax.devices()
  on_cpu = f' ({host.cpu_description()})' if devices[0].platform == 'cpu' else ''
  progress.message(
      f'foundation {prepared.record["foundation_version"]["commit"]} | {len(devices)} {devices[0].device_kind} '
      f'device(s){on_cpu}, {jax.process_count()} process(es) | mesh {dict(mesh.shape)} ({config.parallelism}) | params '
      f'{counts["params/trainable"]:,} trainable of {counts["params/total"]:,} | params + optimizer state '
      f'{prepared.state_bytes_per_device / 2**20:,.1f} MiB per device')
  if start:
    progress.message(f'Resuming from the checkpoint at step {start} in {workdir}.')
  else:
    writer.write(0, counts)
  model_key = 'model' if config.get('model') else 'lm'  # the LM classifier's model is `lm`
  model = config.get(model_key) or {}
  matmul_dtype = model.get('matmul_dtype') or model.get('dtype') or 'float32'
  slow_bf16 = devices[0].platform == 'cpu' and matmul_dtype == 'bfloat16' and host.slow_bf16_matmuls()
  # bf16 operands of float32 activations are multiplied as float32 there (transformer.low_precision_dot).
  widened = slow_bf16 and model.get('dtype', 'float32') != 'bfloat16'
  peak = metrics.peak_flops(jax.devices(), 'float32' if widened else matmul_dtype)
  flops_per_example = task.flops_per_example()
  if widened:
    say(f'This CPU has no bf16 dot-product instructions (AVX512_BF16, AMX): bf16 matmul operands are multiplied as '
        f'float32 here, at float32 speed (benchmarks/README.md); --config.{model_key}.matmul_dtype=float32 keeps '
        'full precision at the same speed.')
  elif slow_bf16:
    say(f'This CPU has no bf16 dot-product instructions (AVX512_BF16, AMX): bf16 matmuls run slower than float32 '
        f'here (benchmarks/README.md); --config.{model_key}.dtype=float32 computes in float32.')

  if config.parallelism == 'pmap':
    runner = _Pmap(make_train_step(task, tx, prepared.schedule, config, axis_name='batch'), mesh)
  else:
    runner = _Jit(make_train_step(task, tx, prepared.schedule, config, axis_name=None), mesh, prepared.rules,
                  shardings, prepared.traced_step, prepared.batch)
  state = runner.to_devices(state)
  eval_ctx = tasks.EvalContext(mesh=mesh, workdir=workdir, is_writer=is_writer)
  # Bookkeeping for non-finite numbers: every step up to `checked` had its metrics fetched; `good` is the newest
  # checkpoint whose own loss (logged one step later) was finite, the one retention must never delete.
  checked, good, nonfinite_steps = start, None, set()

  def stop_nonfinite(what: str, step: int, first_bad_params: int):
    """Moves aside every checkpoint whose params are not known good, then stops with a way forward."""
    ckpt.wait()
    suspect = [s for s in ckpt.steps() if s >= first_bad_params or s + 1 in nonfinite_steps]
    moved = ckpt.quarantine(suspect, 'nonfinite') if suspect else None
    kept = ckpt.latest_step()
    lower = config.optim.lr / 10
    raise NonFiniteError(
        f'{what} at step {step}; stopped without saving it. '
        + (f'Checkpoints {suspect} hold params that produced it and were moved to {moved}. ' if suspect else '')
        + (f'The newest good checkpoint is step {kept} (its loss at step {kept + 1} was finite). '
           if kept is not None else 'No good checkpoint is left: the rerun starts from step 0. ')
        + f'To continue with a lower learning rate: rerun with --allow_config_change=optim '
          f'--config.optim.lr={lower:g} (or skip rare bad batches with --config.optim.skip_nonfinite=N).')

  def check(pending: list[tuple[int, Any, bool]]) -> list[dict]:
    """Fetches the pending steps' metrics; stops at a non-finite step unless the step skipped its update."""
    nonlocal checked, good
    fetched = jax.device_get([m if on_host else runner.first(m) for _, m, on_host in pending])
    for (step, _, _), m in zip(pending, fetched):
      if not (math.isfinite(m['train/loss']) and math.isfinite(m['train/grad_norm'])):
        nonfinite_steps.add(step)
        if not m.get('update_skipped', False):
          stop_nonfinite(f'train/loss is {m["train/loss"]} (train/grad_norm {m["train/grad_norm"]})', step,
                         step - 1)
    checked = pending[-1][0] if pending else checked
    confirmed = [s for s in ckpt.steps() if s + 1 <= checked and s + 1 not in nonfinite_steps]
    if confirmed:
      good = max(confirmed)
    return fetched

  def check_params(step: int, why: str):
    if not bool(jax.device_get(_params_finite(runner.first(state['params'])))):
      stop_nonfinite(f'the params are not finite before {why}', step, step)

  paused = 0.0  # seconds this process spent evaluating and checkpointing, which perf/train_s leaves out

  def train_seconds() -> float:
    return time.perf_counter() - launched - paused

  def evaluate(step, *, final: bool) -> dict:
    """`final`: the evaluation whose numbers are the run's result (tasks then read their held-out test splits)."""
    nonlocal paused
    if task.evaluate is None:
      return {}
    began, trained = time.perf_counter(), train_seconds()
    check_params(step, 'evaluation')
    with runner.context():
      results = task.evaluate(runner.to_global(state['params']), frozen, step,
                              dataclasses.replace(eval_ctx, final=final))
    writer.write(step, {**results, 'perf/train_s': trained})
    progress.message(f'eval @ {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in sorted(results.items())))
    paused += time.perf_counter() - began
    return results

  def save(step, pending_interval):
    nonlocal paused
    began = time.perf_counter()
    record = {'data': data_iter.get_state(), 'interval': pending_interval, **(best.record() if best else {}),
              **restored_from}
    if not ckpt.save(step, runner.to_global(state), record):
      stop_nonfinite('the params or optimizer state are not finite at a checkpoint', step, step)
    ckpt.prune(config.max_checkpoints, {good, best.step if best else None})
    paused += time.perf_counter() - began

  def evaluate_best(at: int) -> dict:
    """The params of the selected step, restored from its checkpoint and evaluated as the run's result: written at
    step `at` (where the run ended) as best/<metric> and best/step, and into best.json."""
    ckpt.wait()
    stop.close()  # every step is saved: a signal during this evaluation stops the run at once (unfinished: its
    # rerun evaluates again), rather than after an evaluation that may take many minutes
    best_state, _ = ckpt.restore(best.step, abstract_state)
    with runner.context():
      results = task.evaluate(best_state['params'], frozen, best.step, dataclasses.replace(eval_ctx, final=True))
    out = {f'best/{k}': v for k, v in results.items()} | {'best/step': best.step}
    writer.write(at, out)
    progress.message(f'best step {best.step} by {best.metric} ({best.value:.4f}): '
                     + ', '.join(f'{k} {v:.4f}' for k, v in sorted(results.items())))
    if is_writer:
      files.write_atomically(os.path.join(workdir, checkpoint.BEST_FILE), json.dumps(
          {'step': best.step, 'metric': best.metric, 'value': best.value}) + '\n')
    return out

  end = start if best and best.stopped else config.num_train_steps  # a run that stopped early is finished
  stop = _StopRequest(steps=end > start)
  last = {}
  profile, tracing = tuple(config.get('profile_steps') or ()), False
  try:
    if start == 0 and (config.eval_at_start or config.num_train_steps == 0):
      results = evaluate(0, final=config.num_train_steps == 0)
      last.update(results)
      # The model before training (a frozen classifier without its prompt, pretrained weights as loaded) is a
      # candidate too: a run whose training never beats it on the selection metric selects step 0.
      if best and config.num_train_steps and best.update(0, results):
        save(0, [])
    reached, interrupted = start, False
    pending: list[tuple[int, Any, bool]] = list(interval)  # (step, metrics, already on the host)
    timed = False
    interval_start, interval_steps = time.perf_counter(), 0
    with runner.context():
      for step in range(start + 1, end + 1):  # `step` counts completed steps
        if profile and step == profile[0]:
          jax.profiler.start_trace(os.path.join(workdir, PROFILE_DIR))
          tracing = True
        state, step_metrics = runner.step(state, frozen, runner.place(next(data_iter)))
        if tracing and step == profile[1]:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          tracing = False
          progress.message(f'Profile of steps {profile[0]}-{profile[1]} in {os.path.join(workdir, PROFILE_DIR)} '
                           f'(tensorboard --logdir={workdir}, Profile tab).')
        if step == start + 1:  # checks, restore, data and compilation: what a user waits for before training
          jax.block_until_ready(step_metrics)
          first_step_s = time.perf_counter() - launched
          progress.message(f'First step done {first_step_s:.1f} s after start (checks, compilation included).')
        pending.append((step, step_metrics, False))
        if len(pending) > MAX_STEPS_IN_FLIGHT:
          jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1][1])
        interval_steps += 1
        is_last = step == config.num_train_steps
        if step % config.log_every == 0 or is_last:
          fetched = check(pending)
          elapsed = time.perf_counter() - interval_start
          # In float64: a resumed run averages the cut interval's values from its checkpoint (as Python floats)
          # with its own float32 ones, and must log the same number as the run that was not stopped.
          logged = {k: float(np.mean(np.asarray([m[k] for m in fetched], np.float64)))
                    for k in fetched[0] if k != 'update_skipped'}
          for k in ('train/lr', 'train/skipped_updates'):  # a value at the step, not an interval's average
            if k in logged:
              logged[k] = float(fetched[-1][k])
          if timed:  # the first interval after a (re)start includes compilation: not a throughput figure
            logged.update(_throughput(elapsed / interval_steps, task, flops_per_example, config, peak))
          else:
            logged['perf/first_step_s'] = first_step_s
          logged['perf/train_s'] = train_seconds()
          timed = True
          writer.write(step, logged)
          progress.update(step, logged, elapsed / interval_steps)
          last.update(logged)
          pending.clear()
          interval_start, interval_steps = time.perf_counter(), 0
        reached, improved = step, False
        if step % config.eval_every == 0 or is_last:
          results = evaluate(step, final=is_last and best is None)
          last.update(results)
          improved = best is not None and best.update(step, results)  # the best step always gets a checkpoint
          interval_start, interval_steps = time.perf_counter(), 0
        stopping = stop(step) and not is_last  # called every step: processes agree on the step through it
        if best and not is_last and best.exhausted(step, config.eval_every):
          best.stopped = True
        if step % config.checkpoint_every == 0 or is_last or stopping or improved or (best and best.stopped):
          # Metrics of an interval cut short travel with the checkpoint, so the resumed run logs what this one would.
          fetched = check(pending) if pending else []
          save(step, [(s, {k: float(v) for k, v in m.items()}) for (s, _, _), m in zip(pending, fetched)])
          interval_start, interval_steps = time.perf_counter(), 0
        if stopping:
          ckpt.wait()
          progress.message(f'Stopped by {stop.signal_name} after step {step}; saved its checkpoint in {workdir}. '
                           'Rerun the same command to resume.')
          interrupted = True
          break
        if best and best.stopped:
          progress.message(f'Early stopping after step {step}: {best.metric} has not improved on step {best.step} '
                           f'({best.value:.4f}) in {best.patience} evaluations.')
          break
    footprint = None
    if not interrupted and reached > start:  # what this process trained (a finished run's rerun trains nothing)
      footprint = metrics.footprint(devices, time.perf_counter() - launched, (reached - start)
                                    * config.global_batch_size * flops_per_example, config.energy)
      writer.write(reached, footprint)
    if best and best.step is not None and not interrupted:
      state = None  # the trained state is saved; the selected one takes its memory
      last.update(evaluate_best(reached))
    if not interrupted:
      results = {k: v for k, v in last.items() if k.startswith(('eval/', 'best/'))}
      progress.message(f'Done at step {reached} ({reached - start} steps in {time.perf_counter() - launched:,.0f} s in '
                       'this process' + (': ' + metrics.footprint_text(footprint) if footprint else '')
                       + '); results in ' + os.path.join(workdir, 'metrics.jsonl')
                       + (': ' + ', '.join(f'{k} {v:.4g}' for k, v in sorted(results.items())) if results else '.'))
  finally:  # an error must not leave an async save half-written
    if tracing:
      jax.profiler.stop_trace()
    stop.close()
    ckpt.close()
    writer.close()
  if is_writer and not interrupted:  # every save and record is written: the run is finished
    files.write_atomically(os.path.join(workdir, files.FINISHED_FILE), json.dumps(
        {'step': reached, 'stopped_early': bool(best and best.stopped)}) + '\n')
  return last


def evaluate_checkpoint(config, workdir: str, *, step: int = 0) -> dict[str, float]:
  """Evaluates a checkpoint of the run in `workdir` with that run's config, as its final evaluation (test splits
  included), and trains nothing: checkpoint `step`, by default the step the run selected by early stopping, else
  its newest. The results go to eval_only/step_<N>.json in the workdir (reports a task's evaluation writes, such as
  results.md or samples, are rewritten as for that step); nothing else is written."""
  try:
    files.require(workdir)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not files.exists(os.path.join(workdir, 'config.json')):
    raise ConfigError(f'{workdir} holds no run (no config.json): --eval_only evaluates a run that saved a checkpoint.')
  prepared = prepare(config, workdir, resume=False)  # reads params alone: a pruned run saved nothing else
  task = prepared.task
  if task.evaluate is None:
    raise ConfigError(f'task {config.task!r} has no evaluation.')
  saved = checkpoint.saved_steps(workdir)
  if not step:
    selected = checkpoint.selected_step(workdir)  # may be 0: training never beat the model it started from
    step = selected if selected is not None else (saved[-1] if saved else 0)
  if step not in saved:
    raise ConfigError(f'{workdir} has no checkpoint of step {step} (it has {saved or "none"}); name one with '
                      '--eval_step.')
  error = None
  try:
    params, _ = checkpoint.restore_params(workdir, 'params', prepared.abstract_state['params'], step=step)
  except Exception as e:  # pylint: disable=broad-except  (any fault here must reach the other processes)
    error = e
  try:
    checkpoint.raise_where_any_failed(error, f'the checkpoint of step {step} in {workdir}')
  except ValueError as e:  # damaged or unreadable, here or on another process: one line on every process
    raise ConfigError(str(e)) from e
  params = jax.device_put(params, prepared.shardings['params'])
  frozen = jax.device_put(prepared.frozen, prepared.frozen_shardings) if prepared.frozen else {}
  is_writer = jax.process_index() == 0
  ctx = tasks.EvalContext(mesh=prepared.mesh, workdir=workdir, is_writer=is_writer, final=True)
  with contextlib.nullcontext() if config.parallelism == 'pmap' else _mesh_context(prepared.mesh, prepared.rules):
    results = {k: float(v) for k, v in task.evaluate(params, frozen, step, ctx).items()}
  if is_writer:
    files.makedirs(os.path.join(workdir, EVAL_ONLY_DIR))
    files.write_atomically(os.path.join(workdir, EVAL_ONLY_DIR, f'step_{step}.json'),
                           json.dumps({'step': step, **results}, indent=1) + '\n')
  return results


def _param_counts(config, params, frozen) -> dict[str, int]:
  """params/trainable: the parameters the optimizer updates; params/total: those plus the ones config.optim.freeze
  keeps fixed and the task's frozen ones (a base model under an adapter, a teacher)."""
  fixed = jax.tree.leaves(optim.frozen_mask(config.optim, params))
  sizes = [x.size for x in jax.tree.leaves(params)]
  trainable = sum(size for size, f in zip(sizes, fixed) if not f)
  return {'params/trainable': trainable, 'params/total': sum(sizes) + sum(x.size for x in jax.tree.leaves(frozen))}


def _throughput(step_time: float, task: tasks.Task, flops_per_example: float, config, peak: float | None
                ) -> dict[str, float]:
  out = {'perf/step_time_s': step_time, 'perf/examples_per_sec': config.global_batch_size / step_time}
  if task.tokens_per_example:
    out['perf/tokens_per_sec'] = config.global_batch_size * task.tokens_per_example / step_time
  if peak and flops_per_example:
    out['perf/mfu'] = config.global_batch_size * flops_per_example / step_time / peak
  return out
