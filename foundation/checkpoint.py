"""Checkpoints with orbax: the train state (sharded arrays) plus the data iterator's state, saved together.

Saves are asynchronous (training goes on while the arrays are written) and atomic (orbax writes to a temporary
directory and renames it when complete), so a kill -9 mid-save leaves the previous checkpoint as the latest one.
Restoring takes an abstract target carrying the *current* shardings, so a run saved on one mesh resumes on another.
"""

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                             create=True),
        item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """abstract_state: ShapeDtypeStructs with the target shardings (jax.eval_shape + shardings)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                   data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(workdir: str, path: str, abstract: Any) -> Any:
  """The subtree `path` ('/'-separated, e.g. 'params/backbone') of the latest checkpoint in another run's workdir,
  shaped like `abstract`, as host arrays. For restoring a pretrained part (a LiT image tower, a fine-tuning
  backbone); the whole state is read on the host, which is fine for the encoder sizes this is used with.
  """
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                                  item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                                                 'data': ocp.JsonCheckpointHandler()})
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'{workdir} has no checkpoint to restore {path!r} from; train that run first.')
  metadata = manager.item_metadata(step).state
  # Every array whole on this process's first device: the saved run's mesh is irrelevant here (and naming the
  # target sharding keeps orbax from reading, and warning about, the saved one).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), metadata)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=restore_args)))
  manager.close()
  tree = jax.tree.map(np.asarray, state.state)
  for key in path.split('/'):
    if key not in tree:
      raise ValueError(f'{path!r} is not in the checkpoint of {workdir}: at {key!r} it has {sorted(tree)}.')
    tree = tree[key]
  want = jax.tree.structure(abstract)
  if jax.tree.structure(tree) != want or any(
      np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(abstract))):
    raise ValueError(f'{path!r} in {workdir} does not match this model: restore a checkpoint of the same encoder.')
  return tree


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
