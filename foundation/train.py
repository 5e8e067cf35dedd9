"""The one training loop, shared by every method. It knows nothing about any method: a Task supplies the parts.

Read top to bottom: check the config against the machine -> mesh -> task -> workdir -> sharded state (restored if
the workdir has a checkpoint) -> compiled step -> loop (log, evaluate, checkpoint) -> final evaluation.

Exact resume: the step's randomness is `fold_in(seed, step)` and the data iterator's state is saved with the
params, so a run restarted from a checkpoint computes the same numbers as one that never stopped.
"""

import contextlib
import json
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import grain
import numpy as np
import optax

from foundation import checkpoint, metrics, optim, sharding, tasks


def validate(config, num_devices: int) -> None:
  """Every check that needs no data and no compilation, so a bad config fails before anything is written."""
  if config.parallelism not in ('jit', 'pmap'):
    raise ValueError(f'config.parallelism={config.parallelism!r}; choose jit or pmap.')
  data, fsdp, tensor = sharding.mesh_shape(config.mesh, num_devices)
  if config.parallelism == 'pmap' and (fsdp, tensor) != (1, 1):
    raise ValueError('config.parallelism=pmap is data-parallel only: set --config.mesh.fsdp=1 --config.mesh.tensor=1 '
                     '(use parallelism=jit to shard parameters).')
  replicas = data * fsdp
  per_replica = config.global_batch_size * 1.0 / replicas
  if config.global_batch_size % replicas:
    raise ValueError(f'config.global_batch_size={config.global_batch_size} is not divisible by the data-parallel '
                     f'size {replicas} (mesh data={data} x fsdp={fsdp}); use a multiple of {replicas}.')
  if config.global_batch_size % jax.process_count():
    raise ValueError(f'config.global_batch_size={config.global_batch_size} is not divisible by the '
                     f'{jax.process_count()} processes.')
  if per_replica % config.grad_accum_steps:
    raise ValueError(f'config.grad_accum_steps={config.grad_accum_steps} does not divide the {int(per_replica)} '
                     'examples each data-parallel replica gets per step.')
  for name in ('num_train_steps', 'log_every', 'eval_every', 'checkpoint_every', 'grad_accum_steps'):
    if config[name] < 1:
      raise ValueError(f'config.{name}={config[name]} must be at least 1.')
  if config.checkpoint_every % config.log_every:
    raise ValueError(f'config.checkpoint_every={config.checkpoint_every} must be a multiple of config.log_every='
                     f'{config.log_every}, so a resumed run logs the same averages as an uninterrupted one.')


# How a run executes, not what it computes: a resumed run may change these (e.g. move to another mesh).
RUNTIME_FIELDS = ('mesh', 'parallelism', 'prefetch_batches')

# The loop dispatches steps ahead of the device and fetches their metrics once per log interval; it waits for a
# step once this many newer ones are queued behind it. Enough to hide dispatch on any accelerator, and a bound is
# needed on CPU: with several CPU devices sharing one thread pool, an unbounded queue of steps deadlocked in an
# all-reduce ("Expected 2 threads to join the rendezvous", benchmarks/README.md) while 4 queued steps never did.
MAX_STEPS_IN_FLIGHT = 4


def _write_config(config, workdir: str) -> None:
  """Writes config.json; a workdir holding a different run's config is refused rather than overwritten."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, 'config.json')
  resolved = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    changed = sorted(k for k in set(previous) | set(resolved)
                     if previous.get(k) != resolved.get(k) and k not in RUNTIME_FIELDS)
    if changed:
      raise ValueError(f'{workdir} holds a run with a different config (differs in: {", ".join(changed)}). '
                       'Rerun with the same config to resume it, or pick a new --workdir.')
  with open(path, 'w') as f:
    json.dump(resolved, f, indent=2, sort_keys=True)


def _split_microbatches(batch: Any, n: int) -> Any:
  # Microbatch i takes every n-th row, so each device keeps its own rows and no data moves between devices.
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


def make_train_step(task: tasks.Task, tx: optax.GradientTransformation, schedule, config, axis_name: str | None):
  """(state, frozen, batch) -> (state, metrics). `axis_name` is set on the pmap path, where devices average."""
  base_rng = jax.random.key(config.seed)

  def step(state, frozen, batch):
    rng = jax.random.fold_in(base_rng, state['step'])
    grad_fn = jax.value_and_grad(task.loss, has_aux=True)
    if config.grad_accum_steps == 1:
      (loss, aux), grads = grad_fn(state['params'], frozen, batch, rng)
    else:
      def accumulate(carry, micro):
        i, micro_batch = micro
        (loss, aux), grads = grad_fn(state['params'], frozen, micro_batch, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None
      micro = _split_microbatches(batch, config.grad_accum_steps)
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          grad_fn, state['params'], frozen, jax.tree.map(lambda x: x[0], micro), rng))
      (loss, aux, grads), _ = jax.lax.scan(accumulate, ((zeros[0][0]), zeros[0][1], zeros[1]),
                                           (jnp.arange(config.grad_accum_steps), micro))
      loss, aux, grads = jax.tree.map(lambda x: x / config.grad_accum_steps, (loss, aux, grads))
    if axis_name:
      loss, aux, grads = jax.lax.pmean((loss, aux, grads), axis_name)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    out = {'train/loss': loss, 'train/grad_norm': optim.global_norm(grads), 'train/lr': schedule(state['step']),
           **{f'train/{k}': v for k, v in aux.items()}}
    return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, out

  return step


def _state_shardings(abstract_params, tx, mesh: jax.sharding.Mesh, rules) -> Any:
  params = sharding.param_shardings(abstract_params, mesh, rules)
  unboxed = nn.unbox(abstract_params)
  opt = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, unboxed), params,
                              transform_non_params=lambda _: sharding.replicated(mesh))
  return {'step': sharding.replicated(mesh), 'params': params, 'opt_state': opt}


class _Jit:
  """The sharded path: one jit over the mesh; the state is already in its global, checkpointable layout."""

  def __init__(self, step_fn, mesh, rules, shardings):
    self.mesh, self.rules = mesh, rules
    self.step = jax.jit(step_fn, in_shardings=(shardings, None, sharding.batch_sharding(mesh)),
                        out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))

  def place(self, local_batch):
    return sharding.global_batch(local_batch, self.mesh)

  def to_devices(self, state):
    return state

  def to_global(self, tree):
    return tree

  def first(self, tree):
    return tree

  @contextlib.contextmanager
  def context(self):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
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


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the last logged metrics."""
  if '://' in workdir:
    raise ValueError(f'--workdir={workdir}: the workdir must be a filesystem path (metrics.jsonl is appended to). On '
                     'a TPU pod slice, mount a bucket on every worker (gcsfuse) and pass the mount point; '
                     'data_dir may be a gs:// path.')
  validate(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.get('sharding_rules'))
  if config.parallelism == 'pmap':
    rules = tuple((name, None) for name, _ in rules)  # pmap replicates everything
  task = tasks.build(config)  # checks that its data is prepared before anything is written
  if task.batch_coupled_loss and (config.parallelism == 'pmap' or config.grad_accum_steps > 1):
    raise ValueError(f'config.task={config.task!r} contrasts every example with the whole global batch, but '
                     f'parallelism={config.parallelism!r} with grad_accum_steps={config.grad_accum_steps} would '
                     'compute its loss on a slice of it: set --config.parallelism=jit --config.grad_accum_steps=1.')
  is_writer = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  _write_config(config, workdir)

  # State, created directly sharded: no device ever holds a full copy of sharded params.
  abstract_params = jax.eval_shape(task.init, jax.random.key(config.seed))
  tx, schedule = optim.make_optimizer(config.optim, nn.unbox(abstract_params), config.num_train_steps)
  shardings = _state_shardings(abstract_params, tx, mesh, rules)

  def init_state(rng):
    params = nn.unbox(task.init(rng))
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}

  ckpt = checkpoint.Checkpointer(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                                 max_to_keep=config.max_checkpoints)
  start = ckpt.latest_step()
  data_iter = iter(task.train_batches(jax.process_index(), jax.process_count()).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=config.prefetch_batches)))
  if start is None:
    state = jax.jit(init_state, out_shardings=shardings)(jax.random.key(config.seed))
    start = 0
  else:
    abstract_state = checkpoint.abstract_with_shardings(jax.eval_shape(init_state, jax.random.key(0)), shardings)
    state, data_state = ckpt.restore(start, abstract_state)
    data_iter.set_state(data_state)
  # Frozen params (teachers, locked towers) are placed once, replicated; they are never optimized nor saved.
  frozen = jax.device_put(task.frozen(), sharding.replicated(mesh)) if task.frozen else {}

  writer = metrics.MetricWriter(workdir, enabled=is_writer, resume_step=start if start else None)
  progress = metrics.Progress(config.num_train_steps, enabled=is_writer)
  if start:
    progress.message(f'Resuming from the checkpoint at step {start} in {workdir}.')
  peak = metrics.peak_flops(jax.devices())

  if config.parallelism == 'pmap':
    runner = _Pmap(make_train_step(task, tx, schedule, config, axis_name='batch'), mesh)
  else:
    runner = _Jit(make_train_step(task, tx, schedule, config, axis_name=None), mesh, rules, shardings)
  state = runner.to_devices(state)
  eval_ctx = tasks.EvalContext(mesh=mesh, workdir=workdir, is_writer=is_writer)

  def evaluate(step) -> dict:
    if task.evaluate is None:
      return {}
    with runner.context():
      results = task.evaluate(runner.to_global(state['params']), frozen, step, eval_ctx)
    writer.write(step, results)
    progress.message(f'eval @ {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in sorted(results.items())))
    return results

  def check_finite(pending: list[tuple[int, dict]]) -> list[dict]:
    fetched = jax.device_get([runner.first(m) for _, m in pending])
    for (step, _), m in zip(pending, fetched):
      if not math.isfinite(m['train/loss']):
        saved = ckpt.latest_step()
        raise FloatingPointError(
            f'train/loss is {m["train/loss"]} at step {step}. Stopped without saving; the last good checkpoint '
            f'is {"step " + str(saved) if saved is not None else "none"} in {workdir}/checkpoints. Lower '
            '--config.optim.lr or raise warmup_steps, then rerun (it resumes from that checkpoint).')
    return fetched

  last = {}
  try:
    if start == 0 and config.eval_at_start:
      last.update(evaluate(0))
    pending: list[tuple[int, dict]] = []
    timed = False
    interval_start, interval_steps = time.perf_counter(), 0
    with runner.context():
      for step in range(start + 1, config.num_train_steps + 1):  # `step` counts completed steps
        state, step_metrics = runner.step(state, frozen, runner.place(next(data_iter)))
        pending.append((step, step_metrics))
        if len(pending) > MAX_STEPS_IN_FLIGHT:
          jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1][1])
        interval_steps += 1
        is_last = step == config.num_train_steps
        if step % config.log_every == 0 or is_last:
          fetched = check_finite(pending)
          elapsed = time.perf_counter() - interval_start
          logged = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
          logged['train/lr'] = float(fetched[-1]['train/lr'])
          if timed:  # the first interval after a (re)start includes compilation: not a throughput figure
            logged.update(_throughput(elapsed / interval_steps, task, config, peak))
          timed = True
          writer.write(step, logged)
          progress.update(step, logged, elapsed / interval_steps)
          last.update(logged)
          pending.clear()
          interval_start, interval_steps = time.perf_counter(), 0
        if step % config.eval_every == 0 or is_last:
          last.update(evaluate(step))
          interval_start, interval_steps = time.perf_counter(), 0
        if step % config.checkpoint_every == 0 or is_last:
          ckpt.save(step, runner.to_global(state), data_iter.get_state())
          interval_start, interval_steps = time.perf_counter(), 0
  finally:  # an error must not leave an async save half-written
    ckpt.close()
    writer.close()
  return last


def _throughput(step_time: float, task: tasks.Task, config, peak: float | None) -> dict[str, float]:
  out = {'perf/step_time_s': step_time, 'perf/examples_per_sec': config.global_batch_size / step_time}
  if task.tokens_per_example:
    out['perf/tokens_per_sec'] = config.global_batch_size * task.tokens_per_example / step_time
  if peak and task.flops_per_example:
    out['perf/mfu'] = config.global_batch_size * task.flops_per_example / step_time / peak
  return out
