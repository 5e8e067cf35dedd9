"""The seam between the one training loop and the methods: a task is a small value of pure functions.

`config.task = 'lm'` names the module `foundation.tasks.lm`, whose `build(config) -> Task` returns it. The loop
never looks inside a task, and a new method is a new module here plus configs.
"""

import dataclasses
import importlib
from typing import Any, Callable, NamedTuple

import jax
from jax.sharding import Mesh


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What an evaluator may use besides the params: the mesh to place its batches on and where to write files."""
  mesh: Mesh | None        # None on the pmap path
  workdir: str
  is_writer: bool          # process 0: the one that writes files and prints
  final: bool = False      # the evaluation whose numbers are the run's result


class Task(NamedTuple):
  # rng -> trainable params; leaves may be boxed with logical axis names (nn.with_logical_partitioning).
  init: Callable[[jax.Array], Any]
  # (params, frozen, batch, rng) -> (scalar mean loss, {name: scalar}); batch is the global batch (or a device's
  # share on the pmap path, or a microbatch under gradient accumulation). Where the mean is over a varying number
  # of items (tokens of padded rows), aux['weight'] holds that number and the loop weights the shares' means by it,
  # so every path computes the same mean. rng is the step's key, the same on every device and microbatch: key
  # per-example randomness by the example's global position (batch['index']), not by where it sits.
  loss: Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]
  # (process_index, process_count) -> a sequence indexed by step whose item s is this process's rows of global
  # batch s (grain MapDataset, so its iterator state is checkpointed for exact resume).
  train_batches: Callable[[int, int], Any]
  # (params, frozen, step, EvalContext) -> {metric name: scalar}; called on every process.
  evaluate: Callable[[Any, Any, int, EvalContext], dict] | None = None
  # The metrics every evaluation before the final one gives, none of them read from the test split: what
  # config.early_stopping.metric may name, checked before the run writes anything. None: not declared (the first
  # evaluation checks the name).
  selection_metrics: tuple[str, ...] | None = None
  # (checkpoint.Sources) -> params that are used but never optimized nor checkpointed with the trainable state
  # (teachers, locked towers, backbones). Read other runs through `sources.load(...)`, which pins them.
  frozen: Callable[[Any], Any] | None = None
  # (source, checkpoint.Sources, abstract params it replaces) -> params imported from a weight file (a GGUF name or
  # path) for config.init_from; the task resolves the name and reads the file through `sources.load_file`, which
  # pins it (and, checking a config dry, reads nothing).
  import_params: Callable[[str, Any, Any], Any] | None = None
  # () -> training model FLOPs per example, for MFU and the footprint; called once a run starts training (counting
  # a model's FLOPs traces it: a dry check of the config need not pay for that).
  flops_per_example: Callable[[], float] = lambda: 0.0
  # True when the loss couples the examples of a batch (contrastive negatives): the loop then refuses the pmap path
  # and gradient accumulation, which would compute it on a device's share or a microbatch instead.
  batch_coupled_loss: bool = False
  tokens_per_example: int = 0      # for tokens/s; 0 when examples are not token sequences
  # Dotted config fields that a run started from another run's workdir (config.init_from) must share with that run,
  # because its params mean something only with them (an adapter's initial tokens, LoRA's scale); checked when
  # init_from is applied, a fresh start.
  init_from_fields: tuple[str, ...] = ()


def build(config) -> Task:
  try:
    module = importlib.import_module(f'foundation.tasks.{config.task}')
  except ModuleNotFoundError as e:
    if e.name != f'foundation.tasks.{config.task}':
      raise
    raise ValueError(f'config.task={config.task!r} has no module foundation/tasks/{config.task}.py') from None
  return module.build(config)
