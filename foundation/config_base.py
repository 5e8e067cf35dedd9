"""What every config file shares: the loop's fields with their defaults, the optimizer's fields, and variants that
combine (`--config=configs/x.py:vit,smoke` applies `vit`, then `smoke`).

A config file builds its ConfigDict from `loop(...)` and `optimizer(...)`, adds its task's fields, and ends with
`apply_variants(c, arg, VARIANTS, __file__)`, where VARIANTS maps each variant's name to a function that edits the
config in place. Tests enumerate VARIANTS, so every variant of every config is built and checked.
"""

import importlib.util
import os
from typing import Callable, Mapping

import ml_collections


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of another config file (`path` relative to the repository root): a config that extends
  another (a distillation of the LM config) starts from its definition instead of a copy."""
  return load_module(path).get_config(arg)


def load_module(path: str):
  """The module of a config file (`path` relative to the repository root), e.g. for its VARIANTS."""
  spec = importlib.util.spec_from_file_location(path.replace('/', '.')[:-3], os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def loop(task: str, **fields) -> ml_collections.ConfigDict:
  """The fields `foundation/train.py` reads, with defaults; `fields` overrides any of them."""
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 0
  c.parallelism = 'jit'                     # 'jit' (mesh sharding) or 'pmap' (data parallel only)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # -1: all remaining devices
  c.num_train_steps = 1000                  # 0: evaluate only (zero-shot), nothing is trained or saved
  c.global_batch_size = 128
  c.grad_accum_steps = 1
  c.log_every = 50
  c.eval_every = 1000
  c.eval_at_start = False
  c.checkpoint_every = 500
  c.max_checkpoints = 2                     # kept on disk, besides the newest one whose own loss was finite
  c.prefetch_batches = 4
  c.restore_step = 0                        # 0: resume from the newest readable checkpoint; N: from step N
  # Initialise (part of) the trainable params from pretrained weights at the first start (a resume reads its own
  # checkpoint): source = a workdir (its checkpoint `step`, 0 = the step it reports: the one its early stopping
  # selected, else the newest; subtree `params_path`) or a weight file the task imports (e.g. a GGUF name); target =
  # where it lands in the params ('' = all of them, 'backbone', ...).
  c.init_from = dict(source='', step=0, params_path='params', target='')
  # Select the step to report by a validation metric ('' = the last step): every evaluation that improves `metric`
  # (`mode` max or min) is checkpointed and kept; after `patience` evaluations without improvement the run stops
  # (0 = never). At the end the selected step is restored and evaluated once more as the result: best/<metric>.
  c.early_stopping = dict(metric='', mode='max', patience=0)
  c.profile_steps = ()                      # (first, last): a jax.profiler trace of those steps in WORKDIR/profile
  # The footprint a run reports at its end (compute/... in metrics.jsonl): power per device (0: foundation/metrics.py's
  # table for the device kind), the data centre's power usage effectiveness, and the grid's carbon intensity (a
  # world-average-like default: set your region's).
  c.energy = dict(device_watts=0.0, pue=1.1, grid_gco2e_per_kwh=400.0)
  for name, value in fields.items():
    if name not in c:
      raise ValueError(f'loop() has no field {name!r}; known: {sorted(c)}')
    c[name] = value
  return c


# Fashion-MNIST's splits with a held-out validation set (the last 10,000 training images), and their small slices
# for `:smoke` variants.
FASHION_SPLITS = dict(train_split='train[:50000]', validation_split='train[50000:]', eval_split='test')
FASHION_SMOKE_SPLITS = dict(validation_split='train[50000:50400]', eval_split='test[:400]')


# The image encoders of the 28x28 grayscale configs (Fashion-MNIST, digits), defined once: "the same encoder" in a
# comparison (SimCLR against supervised, a locked tower, a fine-tuned backbone, a distillation teacher) is then true
# by construction. Each call returns fresh dicts.
def fashion_cnn(**changes) -> dict:
  """The residual CNN: three stages (32, 64, 128), stride-2 stem, LayerNorm, 2x2 pooled features (512 values)."""
  return dict(dict(widths=(32, 64, 128), blocks_per_stage=1, stem_stride=2, norm='layer', pool_grid=2), **changes)


def fashion_vit(**changes) -> dict:
  """The ViT: 4x4 patches of 28x28x1, 4 layers of width 128, mean pooling."""
  return dict(dict(image_size=28, patch_size=4, num_channels=1, embed_dim=128, num_layers=4, num_heads=4,
                   mlp_dim=256, pool='mean'), **changes)


def is_whole(value, least: int) -> bool:
  """Whether a config value is a whole number (not a bool, which Python counts as one) of at least `least`."""
  return isinstance(value, int) and not isinstance(value, bool) and value >= least


def below_top_stage(num_stages: int) -> str:
  """The optim.freeze regex of a classifier's `backbone` CNN of `num_stages` stages: its stem and every stage but
  its last, so that the top stage and the head train (`:finetune_top`); the stem's norm, `stem_norm`, is the stem's.
  From 11 stages on each stage's name ends in its `_`, so that stage1 does not also freeze stage10; below that
  'stage1' names one stage, spelled as the runs recorded before, whose config.json must still match."""
  end = '_' if num_stages > 10 else ''
  return f'^backbone/({"|".join(["stem", *(f"stage{i}{end}" for i in range(num_stages - 1))])})'


def smoke_loop(c: ml_collections.ConfigDict, *, steps: int, batch: int, checkpoint_every: int = 2) -> None:
  """The loop of a `:smoke` variant: a few steps of a small batch, logged every 2, evaluated at the end."""
  c.update(num_train_steps=steps, global_batch_size=batch, log_every=2, eval_every=steps,
           checkpoint_every=checkpoint_every)


def optimizer(**fields) -> dict:
  """`config.optim`: AdamW (or SGD), warmup + decay, weight-decay exclusion and freezing by regex on names."""
  c = dict(
      name='adamw',
      lr=1e-3,
      schedule='cosine',
      warmup_steps=100,
      end_lr_fraction=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=1e-4,
      weight_decay_exclude=('norm', 'bias', 'scale'),  # regexes on parameter names
      grad_clip=0.0,                                   # 0: no clipping by global norm
      freeze=(),                                       # regexes: matching parameters get no updates
      lr_scale=(),                                     # 'REGEX=FACTOR' entries: a learning rate times FACTOR
      # regexes: entries of matching parameters that are exactly zero get no updates, so fine-tuning a pruned
      # checkpoint (foundation.compress) keeps its sparsity pattern; e.g. ('kernel',).
      keep_zeros=(),
      # How many updates with a non-finite loss or gradient may be skipped (the params and optimizer state stay as
      # they were) before the run stops; 0 stops at the first. Skips are counted in `train/skipped_updates`.
      skip_nonfinite=0,
  )
  unknown = set(fields) - set(c)
  if unknown:
    raise ValueError(f'optimizer() has no fields {sorted(unknown)}; known: {sorted(c)}')
  c.update(fields)
  return c


def apply_variants(c: ml_collections.ConfigDict, arg: str | None,
                   variants: Mapping[str, Callable[[ml_collections.ConfigDict], None]],
                   path: str) -> ml_collections.ConfigDict:
  """Applies the comma-separated variants of `arg` in order; an unknown name is an error listing the known ones."""
  for name in (arg or '').split(','):
    name = name.strip()
    if not name:
      continue
    if name not in variants:
      raise ValueError(f'unknown variant {name!r} of {os.path.relpath(path)}; choose from {", ".join(variants)} '
                       '(combine them with commas, e.g. :vit,smoke).')
    variants[name](c)
  return c
