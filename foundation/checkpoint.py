"""Checkpoints with orbax: the train state (sharded arrays) plus a JSON record (the data iterator's state and the
metrics of a log interval cut short by a stop), saved together.

Saves are asynchronous (training goes on while the arrays are written) and atomic (orbax writes to a temporary
directory and renames it when complete), so a kill -9 mid-save leaves the previous checkpoint as the latest one;
the temporary directories of killed saves are removed when the next run opens the directory. Restoring takes an
abstract target carrying the *current* shardings, so a run saved on one mesh resumes on another.

Nothing is deleted that might be the last good state: checkpoints that cannot be read, or whose parameters turned
out non-finite, are moved aside into `checkpoints_<reason>/` next to `checkpoints/`, and retention (`prune`) never
removes the newest checkpoint that the loop has confirmed good.
"""

import functools
import hashlib
import json
import os
import sys
from typing import Any, Callable, Collection

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # not re-exported by orbax

from foundation import files, sharding


class Checkpointer:

  def __init__(self, directory: str, *, async_save: bool = True):
    self.directory = directory
    # Orbax splits each replicated array into one slice per replica so that several hosts share its writes. With one
    # process every slice is written here anyway, and each distinct slice is a program compiled at the first save
    # (56 for the smoke LM on 8 devices, ~3 s in all); so one process registers orbax's default array handler with
    # that one option changed (the metadata store is what orbax's default registry gives it).
    if jax.process_count() == 1:
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                                    array_metadata_store=array_metadata_store.Store()),
          override=True)
    # Retention is ours (prune), not orbax's: it must know which checkpoints are confirmed good.
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save, create=True,
                                             cleanup_tmp_directories=True),
        item_names=('state', 'record'))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, record: dict) -> bool:
    """Saves asynchronously, unless a float in `state` is not finite: then nothing is written and False returned."""
    sums, finite = jax.device_get(_inspect(state))
    if not finite:
      return False
    record = {**record, 'checksums': [int(c) for c in sums], 'checksum_version': CHECKSUM_VERSION}
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     record=ocp.args.JsonSave(record)))
    return True

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """abstract_state: ShapeDtypeStructs with the target shardings (jax.eval_shape + shardings). Orbax reads
    damaged array bytes without complaint, so the state's checksums are compared with those saved beside it.

    Each process reads only its devices' shards, so one can fail where the others succeed. The processes agree on
    the outcome before anything collective runs, and a step that one of them cannot read fails on all: all then try
    the same older step together."""
    error = None
    try:
      state, record = _read(epath.Path(self.directory) / str(step), ocp.StandardCheckpointHandler(),
                            ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # pylint: disable=broad-except
      error = e
    raise_where_any_failed(error, 'its part of it')
    saved = record.get('checksums')
    version = record.get('checksum_version', 1)
    found = [int(c) for c in jax.device_get(checksums(state, version=version))]
    if saved != found:
      bad = [i for i, (a, b) in enumerate(zip(saved or [], found)) if a != b]
      raise ValueError(f'its arrays do not match the checksums saved with them (leaves {bad[:5]} differ)')
    return state, record

  def restore_newest_readable(self, abstract_state: Any, *, step: int = 0,
                              warn: Callable[[str], None]) -> tuple[int, Any, dict] | None:
    """The newest checkpoint that restores (or exactly `step` if nonzero), as (step, state, record); None if there
    is none. Newer ones that could not be read are then moved to checkpoints_unreadable/, each with a warning naming
    it, so the resumed run can write those steps again. If none can be read, none is moved (a fault that is not
    damage, such as memory or a lost connection, must not cost the run its checkpoints): the error says so."""
    steps = self.steps()
    if step:
      if step not in steps:
        raise ValueError(f'config.restore_step={step}: there is no checkpoint of that step in {self.directory} '
                         f'(it has {steps or "none"}).')
      try:
        return (step, *self.restore(step, abstract_state))
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f'config.restore_step={step}: the checkpoint of that step in {self.directory} cannot be '
                         f'read ({sharding.error_words(e)}); name another step, or 0 for the newest readable '
                         'one.') from e
    failed = []
    for candidate in reversed(steps):
      try:
        restored = (candidate, *self.restore(candidate, abstract_state))
      except Exception as e:  # pylint: disable=broad-except
        failed.append((candidate, e))
        continue
      for bad, e in failed:
        warn(f'WARNING: the checkpoint of step {bad} in {self.directory} cannot be read ({sharding.error_words(e)}); '
             f'moved to {self.quarantine([bad], "unreadable")}; resuming from step {candidate}.')
      return restored
    if failed:
      first, e = failed[0]
      raise ValueError(f'no checkpoint in {self.directory} can be read (steps {[s for s, _ in failed]}; step {first}: '
                       f'{sharding.error_words(e)}). They are left in place: if the fault is in them, move that '
                       'directory aside to start this run again, or use another --workdir.') from e
    return None

  def quarantine(self, steps: list[int], reason: str) -> str:
    """Moves the checkpoints of `steps` into checkpoints_<reason>/ beside this directory; returns that directory."""
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      target = self.directory.rstrip('/') + f'_{reason}'
      files.makedirs(target)
      for step in steps:
        destination = os.path.join(target, str(step))
        if files.exists(destination):  # an earlier quarantine of the same step: keep both
          destination += f'.{len(files.listdir(target))}'
        files.move(os.path.join(self.directory, str(step)), destination)
    if jax.process_count() > 1:  # the others must not list the directory before process 0 has moved them
      multihost_utils.sync_global_devices(f'quarantine {steps}')
    self._manager.reload()
    return self.directory.rstrip('/') + f'_{reason}'

  def prune(self, keep: int, protect: Collection[int | None]) -> None:
    """Deletes all but the newest `keep` finished checkpoints, and never those in `protect` (the newest confirmed
    good, the best step of early stopping)."""
    steps = self.steps()
    for step in steps[:max(len(steps) - keep, 0)]:
      if step not in protect:
        self._manager.delete(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _read(step_dir: epath.Path, handler: Any, state_args: Any) -> tuple[Any, dict]:
  """The state (through `handler`, with `state_args`) and the record of a step, read by this process with orbax's
  handlers: unlike orbax's Checkpointer, they end in no barrier (see raise_where_any_failed)."""
  _drop_reads_into_closed_loops()
  handlers = handler, ocp.JsonCheckpointHandler()
  try:
    return (handlers[0].restore(step_dir / 'state', args=state_args),
            handlers[1].restore(step_dir / 'record', args=ocp.args.JsonRestore()))
  finally:
    for each in handlers:
      each.close()


def _drop_reads_into_closed_loops() -> None:
  """Where one array (or its metadata) of a checkpoint cannot be read, orbax stops at the first error and closes its
  event loop while tensorstore still reads the others; each of those then completes into the closed loop, and
  Python prints a traceback for it from tensorstore's thread ("Event loop is closed"), during the failed read or
  after it. That says nothing about the run (the failed read is reported) and, printed beside the main thread's
  work, can trip Python 3.11's AST parser (which formats tracebacks) into a SystemError there. Called before each
  read: from the first on, this process drops exactly those tracebacks."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_reads_into_closed_loops', False):
    return

  def hook(unraisable):
    frames, tb = [], unraisable.exc_traceback
    while tb is not None:
      frames.append(tb.tb_frame.f_code.co_name)
      tb = tb.tb_next
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed'
            and 'call_soon_threadsafe' in frames):
      previous(unraisable)

  hook.drops_reads_into_closed_loops = True
  sys.unraisablehook = hook


def raise_where_any_failed(error: Exception | None, what: str) -> None:
  """sharding.raise_where_any_failed for a read of `what`: the processes that read it hear which one could not. Each
  process reads a checkpoint on its own and can fail where the others succeed (its shards damaged, its disk at
  fault); orbax's own restore would leave the others waiting in its closing barrier, which the failing process's
  next restore then releases, pairing different steps in what follows."""
  sharding.raise_where_any_failed(
      error, lambda failed: ValueError(f'process {failed[0][0]} could not read {what} ({failed[0][1]})'))


# Version 2 weights each element by an odd number (2 * position * 2654435761 + 1, mod 2**32), so that a change of
# any one bit of any element changes the sum (an odd weight is invertible mod 2**32). Version 1's weight,
# position * 2654435761 + 1, is even at odd positions and missed a sign flip there; records without a version are
# version 1 and are checked with it.
CHECKSUM_VERSION = 2


def _weights(position, version: int, uint32):
  if version not in (1, 2):
    raise ValueError(f'checksum_version {version} is newer than this code reads (1 and 2): resume it with the '
                     'version of foundation that wrote it.')
  if version == 1:
    return position * uint32(2654435761) + uint32(1)
  return position * uint32(2654435761) * uint32(2) + uint32(1)


@functools.partial(jax.jit, static_argnames='version')
def checksums(tree: Any, version: int = CHECKSUM_VERSION) -> list[jax.Array]:
  """One uint32 per leaf: the leaf's bits, weighted by position (`_weights`), summed with wrap-around. Integer sums
  do not depend on the order of reduction, so the value is the same on any mesh; computed on the devices, sharded
  as the leaf."""
  def one(x):
    if x.dtype == jnp.bool_:
      bits = x.astype(jnp.uint32)
    else:
      unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
      bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    position = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) if x.ndim else jnp.uint32(0)
    for axis in range(1, x.ndim):
      position = position * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    return jnp.sum(bits * _weights(position, version, jnp.uint32), dtype=jnp.uint32)
  return [one(x) for x in jax.tree.leaves(tree)]


def host_checksums(tree: Any, version: int = CHECKSUM_VERSION) -> list[int]:
  """`checksums` of host arrays, in numpy: the same bits, row-major positions and uint32 wrap-around, so the same
  numbers, without placing anything on a device (another run's weights are read whole, whatever mesh is current)."""
  sums = []
  for x in jax.tree.leaves(tree):
    x = np.asarray(x)
    bits = x.astype(np.uint32) if x.dtype == np.bool_ else x.view(
        {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint32)
    position = np.arange(x.size, dtype=np.uint32).reshape(x.shape)
    sums.append(int(np.sum(bits * _weights(position, version, np.uint32), dtype=np.uint32)))
  return sums


def all_finite(tree: Any) -> jax.Array:
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


@jax.jit
def _inspect(tree: Any) -> tuple[list[jax.Array], jax.Array]:
  """Checksums and finiteness in one pass over the state (one compiled program per state structure)."""
  return checksums(tree), all_finite(tree)


def content_hash(tree: Any) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes: names which exact weights a run was built from."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f'{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()[:16]


def restore_params(workdir: str, path: str, abstract: Any, step: int | None = None,
                   without: Collection[str] = ()) -> tuple[Any, int]:
  """The subtree `path` ('/'-separated, e.g. 'params/backbone') of another run's checkpoint `step` (default: its
  newest), less its top-level keys `without` where it has them (the projection heads a distillation student trains
  beside its classifier), shaped like `abstract`, as host arrays; returns (tree, step). For restoring a pretrained
  part (a LiT image tower, a teacher, a fine-tuning backbone); the whole state is read on the host, which is fine at
  these sizes.

  Nothing here is collective: in a multi-process run a process can fail to read where the others succeed, and its
  caller has the processes agree on the outcome (the loop's checks before a run, raise_where_any_failed after).
  """
  if not files.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(f'{workdir} has no checkpoints/ to restore {path!r} from; train that run first.')
  manager = _reader(workdir)
  try:
    steps = manager.all_steps()
    if step is None:
      step = manager.latest_step()
      if step is None:
        raise FileNotFoundError(f'{workdir} has no checkpoint to restore {path!r} from; train that run first.')
    elif step not in steps:
      raise FileNotFoundError(f'{workdir} no longer has the checkpoint of step {step} (it has {sorted(steps)}).')
    error = tree = None
    try:
      # Every array whole on this process's first device: the saved run's mesh is irrelevant here (and naming the
      # target sharding keeps orbax from reading, and warning about, the saved one).
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), manager.item_metadata(step).state)
      state, record = _read(epath.Path(files.absolute(workdir)) / 'checkpoints' / str(step),
                            ocp.PyTreeCheckpointHandler(), ocp.args.PyTreeRestore(restore_args=restore_args))
    except MemoryError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (tensorstore's errors are plain Exceptions)
      error = ValueError(f'the checkpoint of step {step} in {workdir} cannot be read ({sharding.error_words(e)}); '
                         'name another step of that run, or train it again.')
      error.__cause__ = e
  finally:
    manager.close()
  if error is None:
    tree = jax.tree.map(np.asarray, state)
    # The saved checksums follow the saving run's tree order; this tree is orbax's rebuilding of it (namedtuples as
    # dicts, so another order): the two are compared as multisets, which any damaged leaf still changes.
    saved = record.get('checksums')
    if saved is not None and sorted(saved) != sorted(host_checksums(tree, record.get('checksum_version', 1))):
      error = ValueError(f'the checkpoint of step {step} in {workdir} is damaged: its arrays do not match the '
                         'checksums saved with them.')
  if error is not None:
    raise error
  for key in path.split('/'):
    if not isinstance(tree, dict) or key not in tree:
      raise ValueError(f'{path!r} is not in the checkpoint of {workdir}: at {key!r} it has '
                       f'{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}.')
    tree = tree[key]
  if without and isinstance(tree, dict):
    tree = {k: v for k, v in tree.items() if k not in without}
  differences = tree_differences(tree, abstract)
  if differences:
    raise ValueError(f'{path!r} of step {step} in {workdir} does not fit this model: {differences}.')
  return tree, step


def _leaf_shapes(tree: Any, dtypes: bool = False) -> dict[str, tuple]:
  """Each leaf's shape (and with `dtypes`, its dtype's name after it) by its path as 'a/b/0/c': the same names for a
  tree and for orbax's rebuilding of it from a checkpoint, where a namedtuple comes back as a dict and a tuple as a
  list. A state that holds no array (optax's EmptyState, MaskedNode; None in orbax's metadata) is a leaf 'empty',
  so that an optimizer step added to a chain is a difference too."""
  def name(path):
    return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)

  def empty(x):
    return x is None or (isinstance(x, tuple) and not x and hasattr(x, '_fields'))

  def describe(x):
    if empty(x):
      return 'empty'
    shape = tuple(getattr(x, 'shape', np.shape(x)))
    dtype = x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype
    return (*shape, np.dtype(dtype).name) if dtypes else shape
  return {name(p): describe(x) for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=empty)[0]}


def tree_differences(found: Any, want: Any, limit: int = 4, *, dtypes: bool = False) -> str:
  """'' if `found` has the structure and leaf shapes (and with `dtypes`, the leaf dtypes) of `want`; else the first
  differing leaves, named."""
  flat_found, flat_want = _leaf_shapes(found, dtypes), _leaf_shapes(want, dtypes)
  lines = [f'{k} is {flat_found[k]}, the model has {flat_want[k]}'
           for k in flat_want if k in flat_found and flat_found[k] != flat_want[k]]
  lines += [f'{k} is missing' for k in flat_want if k not in flat_found]
  lines += [f'{k} is not in the model' for k in flat_found if k not in flat_want]
  return '; '.join(lines[:limit]) + (f' (and {len(lines) - limit} more)' if len(lines) > limit else '')


def state_differences(workdir: str, step: int, abstract_state: Any) -> str:
  """How the training state saved at `step` in `workdir` differs in structure, shapes or dtypes from
  `abstract_state`, read from the checkpoint's metadata alone ('' if it does not, or if its metadata cannot be read:
  then restoring it fails, and the checkpoint counts as damaged). A dtype counts: restoring casts, and the cast
  arrays would not match the checksums saved with them."""
  manager = _reader(workdir)
  try:
    metadata = manager.item_metadata(step).state
  except Exception:  # pylint: disable=broad-except  (damage of any kind: the restore finds and reports it)
    return ''
  finally:
    manager.close()
  return tree_differences(metadata, abstract_state, dtypes=True) if metadata is not None else ''


def saved_record(workdir: str, step: int) -> dict:
  """The JSON record saved with the checkpoint of `step` ({} if it cannot be read), read with no barrier (orbax's
  restore ends in one; the loop's checks before a run must have none)."""
  try:
    record = ocp.JsonCheckpointHandler().restore(
        epath.Path(files.absolute(workdir)) / 'checkpoints' / str(step) / 'record', args=ocp.args.JsonRestore())
    return dict(record or {})
  except Exception:  # pylint: disable=broad-except  (a damaged record is the restore's to report)
    return {}


def _reader(workdir: str) -> ocp.CheckpointManager:
  """A read-only manager of `workdir`'s checkpoints, for reading another run's (or, before a run writes, this run's)
  state, record or metadata without the loop's Checkpointer."""
  _drop_reads_into_closed_loops()
  return ocp.CheckpointManager(os.path.join(files.absolute(workdir), 'checkpoints'),
                               # No root metadata: its save (none when read-only) ends in a barrier across the
                               # processes, and the loop's checks before a run must have none (train.prepare).
                               options=ocp.CheckpointManagerOptions(read_only=True, save_root_metadata=False),
                               item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                                              'record': ocp.JsonCheckpointHandler()})


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# What orbax writes into a step's directory when its save is complete, on every filesystem. On one without atomic
# renames (gs://) a save goes straight into its step's directory, so a save that was killed leaves one without it,
# which orbax deletes when it next opens the directory.
COMMIT_FILE = 'commit_success.txt'


def saved_steps(workdir: str) -> list[int]:
  """The steps of the completed checkpoints in `workdir`/checkpoints (step directories that hold COMMIT_FILE), read
  without orbax."""
  directory = os.path.join(workdir, 'checkpoints')
  if not files.isdir(directory):
    return []
  return sorted(int(d) for d in files.listdir(directory)
                if d.isdigit() and files.exists(os.path.join(directory, d, COMMIT_FILE)))


# Written at the end of a run with config.early_stopping: {step, metric, value} of the selected step.
BEST_FILE = 'best.json'


def selected_step(workdir: str) -> int | None:
  """The step a run selected by config.early_stopping (its best.json), or None."""
  try:
    return int(json.loads(files.read_text(os.path.join(workdir, BEST_FILE)))['step'])
  except FileNotFoundError:
    return None


class Sources:
  """The params a run reads from other runs (a LiT tower, teachers, a pretrained backbone), pinned.

  The first start of a run reads each source's newest checkpoint and records its workdir, step and content hash
  (`recorded`, which the loop writes into config.json). A resumed run gets those records back as `pinned` and reads
  exactly that step; if the source's bytes changed, or that step is gone, it is an error rather than a silently
  different model. With `dry=True` nothing is read: `load` returns the abstract shapes (for checking configs).
  """

  def __init__(self, pinned: dict | None = None, *, dry: bool = False):
    self.pinned = dict(pinned or {})
    self.recorded: dict[str, dict] = {}
    self._dry = dry

  def load(self, name: str, workdir: str, path: str, abstract: Any, step: int | None = None,
           without: Collection[str] = ()) -> Any:
    """The subtree `path` of checkpoint `step` of another run (less its top-level keys `without`: restore_params),
    pinned by the hash of what is read; by default the step that run selected by early stopping, else its newest.
    Where `abstract` is boxed with logical axis names (an init's eval_shape), so is the result: the loop then shards
    it by them."""
    if self._dry:
      return abstract
    boxes, abstract = abstract, nn.unbox(abstract)
    pin = self.pinned.get(name)
    step = pin['step'] if pin else step or selected_step(workdir)
    tree, step = restore_params(workdir, path, abstract, step=step, without=without)
    digest = content_hash(tree)
    if pin and digest != pin['hash']:
      raise ValueError(f'{name}: the checkpoint of step {step} in {workdir} is not the one this run was built from '
                       f'(content hash {digest}, recorded {pin["hash"]}); it was overwritten. Restore that run, or '
                       'start this one in a new --workdir.')
    self.recorded[name] = dict(workdir=files.absolute(workdir), path=path, step=int(step), hash=digest)
    return rebox(boxes, tree)

  def load_file(self, name: str, path: str, read: Callable[[str], Any], abstract: Any) -> Any:
    """`read(path)` of a file source (an imported model such as a GGUF), pinned by the file's sha256; `abstract`
    (the shapes it must have) is what comes back with dry=True, without reading the file."""
    if self._dry:
      return abstract
    digest = file_hash(path)
    pin = self.pinned.get(name)
    if pin and digest != pin['hash']:
      raise ValueError(f'{name}: {path} is not the file this run was built from (sha256 {digest}, recorded '
                       f'{pin["hash"]}). Put that file back, or start this run in a new --workdir.')
    self.recorded[name] = dict(file=os.path.abspath(path), hash=digest)
    return read(path)


def run_config(workdir: str, tasks: Collection[str], what: str) -> dict:
  """The config.json of another run (a teacher, a run to prune), whose task must be one of `tasks`; `what` says
  in errors which runs fit, e.g. 'an image classifier run (configs/distill/fashion_mnist.py:teacher)'."""
  path = os.path.join(workdir, 'config.json')
  if not files.exists(path):
    raise FileNotFoundError(f'{workdir!r} has no config.json; name the workdir of {what}.')
  saved = json.loads(files.read_text(path))
  if saved.get('task') not in tasks:
    raise ValueError(f'{workdir!r} is a {saved.get("task")!r} run; name the workdir of {what}.')
  return saved


def rebox(boxes: Any, values: Any) -> Any:
  """`values` put into the nn.LogicallyPartitioned boxes of `boxes` (same structure; other leaves stay as they
  are)."""
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  return jax.tree.map(lambda box, x: box.replace_boxed(x) if is_box(box) else x, boxes, values, is_leaf=is_box)


def file_hash(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 24), b''):
      digest.update(chunk)
  return digest.hexdigest()[:16]
