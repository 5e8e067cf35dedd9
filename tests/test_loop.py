"""The loop's parts in-process, on a toy task: weighted means across pmap / accumulation, skipping non-finite
updates, checkpoint checksums, fallback and pruning, pinned frozen sources, metrics files."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from foundation import checkpoint, config_base, files, host, metrics, optim, tasks, train


def toy_config(**fields):
  c = ml_collections.ConfigDict(dict(seed=0, grad_accum_steps=1, optim=dict(skip_nonfinite=0)))
  c.update(fields)
  return c


def toy_task(noise: bool = False) -> tasks.Task:
  """A linear model whose loss is a mean over a varying number of weighted rows (like padded text), with an
  optional per-example noise keyed by the example's global index (like an augmentation)."""
  def loss(params, frozen, batch, rng):
    del frozen
    x = batch['x']
    if noise:
      x = x + 0.1 * jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(rng, i), x.shape[1:]))(batch['index'])
    err = (x @ params['w'] - batch['y']) ** 2
    count = jnp.sum(batch['weight'])
    return jnp.sum(err * batch['weight']) / jnp.maximum(count, 1.0), {'weight': count, 'err_max': jnp.max(err)}
  return tasks.Task(init=lambda rng: {'w': jax.random.normal(rng, (3,))}, loss=loss, train_batches=None)


def toy_batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  weight = (rng.random(n) < 0.6).astype(np.float32)
  weight[:2] = 1.0
  return {'x': rng.normal(size=(n, 3)).astype(np.float32), 'y': rng.normal(size=n).astype(np.float32),
          'weight': weight, 'index': np.arange(100, 100 + n, dtype=np.int32)}


def reference_mean_and_grad(w, batch):
  """numpy: the weighted mean over the whole batch and its gradient."""
  w = np.asarray(w, np.float64)
  x, y, m = (np.asarray(batch[k], np.float64) for k in ('x', 'y', 'weight'))
  r = x @ w - y
  return np.sum(m * r**2) / m.sum(), 2 * (m * r) @ x / m.sum()


def state_for(task, tx):
  params = task.init(jax.random.key(1))
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
          'skipped_updates': jnp.zeros((), jnp.int32)}


@pytest.mark.parametrize('accum', [1, 2, 4])
def test_weighted_mean_is_the_same_on_every_path(accum):
  task, tx = toy_task(), optax.sgd(0.1)
  batch = toy_batch()
  state = state_for(task, tx)
  loss, grad = reference_mean_and_grad(state['params']['w'], batch)
  step = train.make_train_step(task, tx, optax.constant_schedule(0.1), toy_config(grad_accum_steps=accum), None)
  new, out = jax.jit(step)(state, {}, jax.tree.map(jnp.asarray, batch))
  np.testing.assert_allclose(out['train/loss'], loss, rtol=1e-5)
  np.testing.assert_allclose(new['params']['w'], np.asarray(state['params']['w']) - 0.1 * grad, rtol=1e-5)
  # pmap over 8 devices, each a share of 16 / 8 = 2 rows whose weights differ from device to device.
  step = train.make_train_step(task, tx, optax.constant_schedule(0.1), toy_config(), 'batch')
  n = jax.local_device_count()
  stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), state)
  new, out = jax.pmap(step, axis_name='batch', in_axes=(0, None, 0))(
      stacked, {}, jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), batch))
  np.testing.assert_allclose(out['train/loss'][0], loss, rtol=1e-5)
  np.testing.assert_allclose(new['params']['w'][0], np.asarray(state['params']['w']) - 0.1 * grad, rtol=1e-5)


def test_accumulation_keeps_each_examples_randomness():
  task, tx = toy_task(noise=True), optax.sgd(0.1)
  batch = jax.tree.map(jnp.asarray, toy_batch())
  state = state_for(task, tx)
  outs = [jax.jit(train.make_train_step(task, tx, optax.constant_schedule(0.1), toy_config(grad_accum_steps=a),
                                        None))(state, {}, batch)[1]['train/loss'] for a in (1, 2, 4)]
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5)
  np.testing.assert_allclose(outs[2], outs[0], rtol=1e-5)


def test_skip_nonfinite_keeps_the_state_and_spends_its_budget():
  schedule = optax.linear_schedule(0.1, 0.0, 10)
  task, tx = toy_task(), optax.adam(schedule)
  step = jax.jit(train.make_train_step(task, tx, schedule, toy_config(optim=dict(skip_nonfinite=1)), None))
  good, bad = toy_batch(seed=0), toy_batch(seed=1)
  bad['x'][3, 1] = np.nan
  state = state_for(task, tx)
  state, _ = step(state, {}, jax.tree.map(jnp.asarray, good))
  before = jax.tree.map(np.asarray, state)
  state, out = step(state, {}, jax.tree.map(jnp.asarray, bad))
  assert bool(out['update_skipped']) and int(out['train/skipped_updates']) == 1
  for a, b in zip(jax.tree.leaves(before['params']) + jax.tree.leaves(before['opt_state']),
                  jax.tree.leaves(state['params']) + jax.tree.leaves(state['opt_state'])):
    np.testing.assert_array_equal(a, b)  # bitwise: the bad update was not applied
  assert int(state['step']) == 2
  state, out = step(state, {}, jax.tree.map(jnp.asarray, bad))  # the budget is spent: applied, and reported
  assert not bool(out['update_skipped']) and int(out['train/skipped_updates']) == 1
  # Its learning rate is the optimizer's: the schedule at its own count, which the skipped update did not advance
  # (one good update before this one: count 1 when it ran, 2 after).
  counts = {int(v) for _, v in optax.tree_utils.tree_get_all_with_path(state['opt_state'], 'count')}
  assert float(out['train/lr']) == float(schedule(1)) and counts == {2}
  assert not np.isfinite(np.asarray(state['params']['w'])).all()


def test_frozen_parameters_get_no_gradient_work_and_the_grad_norm_is_of_what_trains():
  """Three stacked layers, the bottom two frozen: the update and train/grad_norm are those of the top layer alone
  (numpy), and the compiled step does no backward work below it (XLA's FLOP count: the frozen step costs little
  more than the forward pass, the unfrozen one about three times it)."""
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(64, 128)).astype(np.float32), rng.normal(size=64).astype(np.float32)
  params = {f'w{i}': jnp.asarray(rng.normal(size=(128, 128)).astype(np.float32) / 12) for i in (1, 2)}
  params['w3'] = jnp.asarray(rng.normal(size=128).astype(np.float32) / 12)

  def loss(p, frozen, batch, rng):
    del frozen, rng
    h = jnp.tanh(jnp.tanh(batch['x'] @ p['w1']) @ p['w2'])
    return jnp.mean((h @ p['w3'] - batch['y']) ** 2), {}
  task = tasks.Task(init=None, loss=loss, train_batches=None)
  batch = {'x': jnp.asarray(x), 'y': jnp.asarray(y)}
  flops = {}
  for freeze in ((), ('^w[12]$',)):
    config = toy_config(optim=config_base.optimizer(name='sgd', lr=0.1, b1=0.0, weight_decay=0.0, warmup_steps=0,
                                                    schedule='constant', freeze=freeze,
                                                    weight_decay_exclude=()))
    tx, _ = optim.make_optimizer(config.optim, params, 10)
    state = train._state_of(params, tx)  # pylint: disable=protected-access
    step = jax.jit(train.make_train_step(task, tx, optax.constant_schedule(0.1), config, None))
    new, out = step(state, {}, batch)
    flops[freeze] = metrics.xla_cost(step.lower(state, {}, batch).compile())['flops']
    if freeze:
      h = np.tanh(np.tanh(x.astype(np.float64) @ np.asarray(params['w1'])) @ np.asarray(params['w2']))
      grad = 2 * (h @ np.asarray(params['w3']) - y) @ h / len(y)
      np.testing.assert_allclose(out['train/grad_norm'], np.linalg.norm(grad), rtol=1e-5)
      np.testing.assert_allclose(new['params']['w3'], np.asarray(params['w3']) - 0.1 * grad, rtol=1e-5, atol=1e-7)
      for name in ('w1', 'w2'):
        np.testing.assert_array_equal(new['params'][name], params[name])
  forward = 2 * 2 * 64 * 128 * 128  # the two 128 x 128 matmuls
  assert flops[()] > 2.5 * forward and flops[('^w[12]$',)] < 1.3 * forward, flops


def test_checksums_see_any_flipped_bit_or_swap_and_ignore_the_mesh():
  x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
  base = int(checkpoint.checksums({'x': x})[0])
  assert checkpoint.host_checksums({'x': x}) == [base]
  # Every bit of every element: 48 x 32 flips, each a different array, so the host version (numpy) checks them.
  for at in range(x.size):
    for bit in range(32):
      flipped = x.copy()
      flipped.reshape(-1).view(np.uint32)[at] ^= np.uint32(1 << bit)
      assert checkpoint.host_checksums({'x': flipped}) != [base], (at, bit)
  flipped = x.copy()
  flipped[0, 1] = -flipped[0, 1]  # a sign flip at an odd position: version 1's even weight there missed it
  assert int(checkpoint.checksums({'x': flipped})[0]) != base
  assert int(checkpoint.checksums({'x': flipped}, version=1)[0]) == int(checkpoint.checksums({'x': x}, version=1)[0])
  swapped = x.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  assert int(checkpoint.checksums({'x': swapped})[0]) != base
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), ('a', 'b'))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('a', 'b')))
  assert int(checkpoint.checksums({'x': sharded})[0]) == base
  mixed = {'h': jnp.ones(5, jnp.bfloat16), 'i': jnp.int32(7), 'b': jnp.array([True, False])}
  assert len(checkpoint.checksums(mixed)) == 3


def _state(scale):
  return {'w': jnp.arange(1000.0).reshape(10, 100) * scale, 'step': jnp.int32(scale)}


def _abstract():
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), _state(1))


def test_an_unreadable_or_damaged_checkpoint_falls_back_to_the_previous(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {'data': {'step': step}})
  ckpt.wait()
  # Step 3: every data file's bytes overwritten. Step 2: the saved checksums no longer match (as after bytes of the
  # array data changed in place, which orbax itself reads without complaint).
  for root, _, files in os.walk(tmp_path / 'checkpoints' / '3' / 'state'):
    for name in files:
      if os.sep + 'd' in root:
        path = os.path.join(root, name)
        data = bytearray(open(path, 'rb').read())
        open(path, 'wb').write(bytes(b ^ 0x5A for b in data))
  record_path = tmp_path / 'checkpoints' / '2' / 'record' / 'metadata'
  record = json.loads(record_path.read_text())
  record['checksums'][0] ^= 1
  record_path.write_text(json.dumps(record))
  warnings = []
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  step, state, record = ckpt.restore_newest_readable(_abstract(), warn=warnings.append)
  assert step == 1 and record['data'] == {'step': 1}
  np.testing.assert_array_equal(state['w'], np.asarray(_state(1)['w']))
  assert len(warnings) == 2 and 'step 3' in warnings[0] and 'resuming from step 1' in warnings[0]
  assert 'step 2' in warnings[1] and 'checksums' in warnings[1] and 'resuming from step 1' in warnings[1]
  assert sorted(os.listdir(tmp_path / 'checkpoints_unreadable')) == ['2', '3']  # moved aside, not deleted
  assert ckpt.steps() == [1]
  ckpt.save(2, _state(5), {'data': {}})  # the resumed run can write those steps again
  ckpt.close()


def test_a_checkpoint_saved_with_version_1_checksums_still_restores(tmp_path):
  """Checkpoints written before the checksums' weights were made odd carry no checksum_version: they are checked
  with the weights they were saved with, by the loop and by init_from's reader."""
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  ckpt.save(1, _state(1), {'data': {}})
  ckpt.close()
  record_path = tmp_path / 'checkpoints' / '1' / 'record' / 'metadata'
  record = json.loads(record_path.read_text())
  assert record.pop('checksum_version') == 2
  positions = [np.arange(np.size(x), dtype=np.uint64) for x in jax.tree.leaves(_state(1))]
  record['checksums'] = [int(np.sum(np.asarray(x).reshape(-1).view(np.uint32).astype(np.uint64)
                                    * ((p * 2654435761 + 1) % 2**32)) % 2**32)
                         for x, p in zip(jax.tree.leaves(_state(1)), positions)]  # version 1, in numpy
  record_path.write_text(json.dumps(record))
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  assert ckpt.restore_newest_readable(_abstract(), warn=print)[0] == 1
  ckpt.close()
  tree, step = checkpoint.restore_params(str(tmp_path), 'w', _abstract()['w'])
  assert step == 1
  np.testing.assert_array_equal(tree, np.asarray(_state(1)['w']))


def test_a_state_in_another_dtype_is_a_difference_read_from_the_metadata(tmp_path):
  """--allow_config_change=model with another param_dtype builds a state orbax would restore cast, whose checksums
  then differ: the resume check must name the dtype before anything is written, not take the checkpoints for
  damaged."""
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  ckpt.save(1, _state(1), {'data': {}})
  ckpt.close()
  assert checkpoint.state_differences(str(tmp_path), 1, _abstract()) == ''
  other = {**_abstract(), 'w': jax.ShapeDtypeStruct((10, 100), jnp.bfloat16)}
  want = "w is (10, 100, 'float32'), the model has (10, 100, 'bfloat16')"
  assert checkpoint.state_differences(str(tmp_path), 1, other) == want
  # init_from casts on purpose: a shapes-only comparison stays the default.
  assert checkpoint.tree_differences(_state(1), other) == ''


def test_checkpoints_of_which_none_restores_are_left_in_place(tmp_path):
  """A fault that no checkpoint survives (here: the state asked for in another dtype, so every checksum differs;
  as well memory, or a lost connection) moves none of them aside: a rerun must not start the run again from step 0
  over its metrics."""
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  for step in (1, 2):
    ckpt.save(step, _state(step), {'data': {'step': step}})
  other = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float16 if x.dtype == jnp.float32 else x.dtype,
                                                      sharding=x.sharding), _abstract())
  warnings = []
  with pytest.raises(ValueError, match=r'no checkpoint in .* can be read \(steps \[2, 1\]; step 2: .*left in place'):
    ckpt.restore_newest_readable(other, warn=warnings.append)
  assert not warnings and ckpt.steps() == [1, 2] and not (tmp_path / 'checkpoints_unreadable').exists()
  with pytest.raises(ValueError, match='restore_step=1: the checkpoint of that step in .* cannot be read'):
    ckpt.restore_newest_readable(other, step=1, warn=warnings.append)
  assert ckpt.restore_newest_readable(_abstract(), warn=warnings.append)[0] == 2 and not warnings
  ckpt.close()


def test_one_process_saves_replicated_arrays_without_compiling_slices_of_them(tmp_path, caplog):
  """Orbax's replica-parallel save cuts each replicated array into one slice per device, each slice a program
  compiled at the first save, so that several hosts share the writes; one process writes every slice itself, so
  its first save compiles nothing (the checksum program aside), and what it wrote reads back exactly."""
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ('data',)), jax.sharding.PartitionSpec())
  state = {f'w{i}': jax.device_put(jnp.arange(64.0 * i).reshape(8, -1), replicated) for i in (1, 2, 3)}
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  checkpoint._inspect(state)  # the checksums' program, compiled before counting
  with caplog.at_level(logging.WARNING), jax.log_compiles(True):
    ckpt.save(1, state, {'data': {}})
  compiled = [r.getMessage() for r in caplog.records if 'Finished XLA compilation' in r.getMessage()]
  assert not compiled, compiled
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
  step, restored, _ = ckpt.restore_newest_readable(abstract, warn=print)
  assert step == 1
  for name in state:
    np.testing.assert_array_equal(restored[name], np.arange(64.0 * int(name[1])).reshape(8, -1))
  ckpt.close()


def test_restore_step_and_pruning_keep_what_they_must(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  for step in (1, 2, 3, 4):
    ckpt.save(step, _state(step), {'data': {}})
  ckpt.wait()
  ckpt.prune(keep=1, protect={2})  # 2 is the newest confirmed good: kept, and so is the newest; older ones go
  assert ckpt.steps() == [2, 4]
  step, state, _ = ckpt.restore_newest_readable(_abstract(), step=2, warn=print)
  assert step == 2 and int(state['step']) == 2
  with pytest.raises(ValueError, match='restore_step=7: there is no checkpoint of that step'):
    ckpt.restore_newest_readable(_abstract(), step=7, warn=print)
  ckpt.close()


def test_frozen_sources_are_pinned_by_step_and_hash(tmp_path):
  other = tmp_path / 'other'
  ckpt = checkpoint.Checkpointer(str(other / 'checkpoints'))
  ckpt.save(5, {'params': {'tower': {'w': jnp.ones(4)}}}, {'data': {}})
  ckpt.close()
  abstract = {'w': jax.ShapeDtypeStruct((4,), jnp.float32)}
  first = checkpoint.Sources()
  np.testing.assert_array_equal(first.load('tower', str(other), 'params/tower', abstract)['w'], np.ones(4))
  pin = first.recorded['tower']
  assert pin['step'] == 5 and pin['hash'] == checkpoint.content_hash({'w': np.ones(4, np.float32)})
  # The other run trains on: a resumed run still reads step 5, not the newest.
  ckpt = checkpoint.Checkpointer(str(other / 'checkpoints'))
  ckpt.save(6, {'params': {'tower': {'w': jnp.zeros(4)}}}, {'data': {}})
  ckpt.close()
  np.testing.assert_array_equal(checkpoint.Sources(first.recorded).load('tower', str(other), 'params/tower',
                                                                        abstract)['w'], np.ones(4))
  changed = dict(first.recorded, tower=dict(pin, hash='0' * 16))
  with pytest.raises(ValueError, match='is not the one this run was built from'):
    checkpoint.Sources(changed).load('tower', str(other), 'params/tower', abstract)
  gone = dict(first.recorded, tower=dict(pin, step=3))
  with pytest.raises(FileNotFoundError, match='no longer has the checkpoint of step 3'):
    checkpoint.Sources(gone).load('tower', str(other), 'params/tower', abstract)
  assert checkpoint.Sources(dry=True).load('tower', str(tmp_path / 'missing'), 'params/tower', abstract) is abstract


def test_metrics_drop_a_truncated_last_line_only(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
  warnings = []
  assert [r['step'] for r in files.read_records(str(path), warn=warnings.append)] == [1, 2]
  assert len(warnings) == 1 and 'cut short' in warnings[0]
  writer = metrics.MetricWriter(str(tmp_path), enabled=True, resume_step=1, warn=warnings.append)
  writer.write(2, {'a': 5.0})
  writer.close()
  assert [json.loads(line) for line in path.read_text().splitlines()] == [{'step': 1, 'a': 1.0},
                                                                          {'step': 2, 'a': 5.0}]
  path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match='line 2 is not JSON'):
    files.read_records(str(path))


def test_cpu_peak_is_measured_again_on_a_cpu_with_other_features(tmp_path, monkeypatch):
  """The measured matmul peak (MFU's denominator) is cached per machine; a VM that wakes up on another host (other
  CPU flags, same core count) measures its own rather than reading the last host's."""
  measured = []
  monkeypatch.delenv('FOUNDATION_CPU_PEAK_FLOPS', raising=False)
  monkeypatch.setattr(metrics, 'measure_matmul_flops', lambda devices, dtype: measured.append(dtype) or len(measured))
  monkeypatch.setattr(os, 'getloadavg', lambda: (0.0, 0.0, 0.0))  # quiet: the measurement is cached
  cache = str(tmp_path / 'peak.json')
  monkeypatch.setattr(host, 'cpu_flags', lambda: frozenset({'avx2', 'avx512f', 'avx512_bf16'}))
  assert metrics.cpu_peak_flops(jax.devices(), 'bfloat16', cache) == 1
  assert metrics.cpu_peak_flops(jax.devices(), 'bfloat16', cache) == 1  # read back, not measured
  assert not host.slow_bf16_matmuls() and host.cpu_description().endswith(', avx512_bf16')  # the log's host
  monkeypatch.setattr(host, 'cpu_flags', lambda: frozenset({'avx2'}))
  assert metrics.cpu_peak_flops(jax.devices(), 'bfloat16', cache) == 2 and measured == ['bfloat16'] * 2
  assert host.slow_bf16_matmuls() and host.cpu_description().endswith(', avx2')
  monkeypatch.setattr(host, 'cpu_flags', frozenset)  # unknown flags (no /proc/cpuinfo): no claim either way
  assert not host.slow_bf16_matmuls()


def descending_task(calls: list) -> tasks.Task:
  """SGD (lr 0.1, no momentum) on (w - 1)^2 from w = 0: w_t = 1 - 0.8^t in closed form. Its validation score
  -(w - 0.5)^2 peaks at step 3 (w = 0.488) and falls after; the test score is another target, read only as a
  result. Each evaluation is logged in `calls` as (step, final, w)."""
  import grain

  def evaluate(params, frozen, step, ctx):
    w = float(np.asarray(params['w'])[0])
    calls.append((step, ctx.final, w))
    return {'eval/validation/score': -(w - 0.5)**2, 'eval/test/score': -(w - 0.45)**2}

  return tasks.Task(init=lambda rng: {'w': jnp.zeros((1,))},
                    loss=lambda params, frozen, batch, rng: (jnp.mean((params['w'] - 1.0 + batch['x'])**2), {}),
                    train_batches=lambda index, count: grain.MapDataset.range(10**6).map(
                        lambda i: {'x': np.zeros((8, 1), np.float32)}),
                    evaluate=evaluate)


def descending_config(**fields):
  from foundation import config_base
  c = config_base.loop('descending', num_train_steps=20, global_batch_size=8, log_every=1, eval_every=1,
                       checkpoint_every=100, max_checkpoints=1, prefetch_batches=0)
  c.optim = config_base.optimizer(name='sgd', lr=0.1, schedule='constant', warmup_steps=0, b1=0.0, weight_decay=0.0,
                                      weight_decay_exclude=())
  c.early_stopping = dict(metric='eval/validation/score', mode='max', patience=3)
  c.update_from_flattened_dict(fields)
  return c


def closed_form(step):
  return 1 - 0.8**step


@pytest.fixture
def descending(monkeypatch):
  calls = []
  monkeypatch.setattr(tasks, 'build', lambda config: descending_task(calls))
  return calls


def scores(w):
  return {'eval/validation/score': -(w - 0.5)**2, 'eval/test/score': -(w - 0.45)**2}


def test_early_stopping_keeps_and_reports_the_best_step_and_a_rerun_trains_no_further(descending, tmp_path):
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(descending_config(), workdir)
  # Steps 4, 5, 6 do not improve on 3: patience 3 stops the run after step 6; step 3 is restored and evaluated.
  assert [(s, f) for s, f, _ in descending] == [(s, False) for s in range(1, 7)] + [(3, True)]
  np.testing.assert_allclose([w for _, _, w in descending], [closed_form(s) for s in range(1, 7)] + [closed_form(3)],
                             rtol=1e-6)
  expected = {f'best/{k}': v for k, v in scores(closed_form(3)).items()}
  assert {k: results[k] for k in expected} == pytest.approx(expected, rel=1e-5)
  assert results['best/step'] == 3
  with open(os.path.join(workdir, checkpoint.BEST_FILE)) as f:
    best = json.load(f)
  assert best['step'] == 3 and best['value'] == pytest.approx(scores(closed_form(3))['eval/validation/score'])
  last = files.read_records(os.path.join(workdir, 'metrics.jsonl'))[-1]
  assert last['step'] == 6 and last['best/step'] == 3
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert 3 in ckpt.steps() and max(ckpt.steps()) == 6  # max_checkpoints=1 prunes the others, never the best
  ckpt.close()
  with open(os.path.join(workdir, files.FINISHED_FILE)) as f:  # finished (what a sweep counts), though at step 6
    assert json.load(f) == {'step': 6, 'stopped_early': True}

  descending.clear()  # the same command again: the run is finished, it only reports the best step again
  again = train.train_and_evaluate(descending_config(), workdir)
  assert [(s, f) for s, f, _ in descending] == [(3, True)]
  assert {k: again[k] for k in expected} == pytest.approx(expected, rel=1e-5)
  records = files.read_records(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in records if 'best/step' in r] == [6]  # reported again in place, not a second time
  assert [r['step'] for r in records if 'eval/validation/score' in r] == list(range(1, 7))

  descending.clear()  # --eval_only: the selected step by default, or a named one, as a final evaluation
  listed = sorted(os.listdir(workdir))
  only = train.evaluate_checkpoint(descending_config(), workdir)
  assert only == {k[len('best/'):]: again[k] for k in expected}  # exactly the run's reported numbers
  assert train.evaluate_checkpoint(descending_config(), workdir, step=6) == pytest.approx(
      scores(closed_form(6)), rel=1e-5)
  assert [(s, f) for s, f, _ in descending] == [(3, True), (6, True)]
  with open(os.path.join(workdir, train.EVAL_ONLY_DIR, 'step_3.json')) as f:
    assert json.load(f) == {'step': 3, **only}
  assert sorted(os.listdir(workdir)) == sorted(listed + [train.EVAL_ONLY_DIR])
  with pytest.raises(train.ConfigError, match=r'no checkpoint of step 5 \(it has \[3, 6\]\)'):
    train.evaluate_checkpoint(descending_config(), workdir, step=5)
  with pytest.raises(train.ConfigError, match='different config'):
    train.evaluate_checkpoint(descending_config(**{'optim.lr': 0.5}), workdir)

  descending.clear()  # a run initialised from this workdir reads the best step, not the newest
  train.train_and_evaluate(descending_config(num_train_steps=0, **{'init_from.source': workdir}),
                           str(tmp_path / 'eval'))
  assert len(descending) == 1 and descending[0][:2] == (0, True)
  assert descending[0][2] == pytest.approx(closed_form(3), rel=1e-6)


def test_an_early_stopped_run_given_more_patience_trains_on(descending, tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(descending_config(), workdir)  # patience 3: stops after step 6, best step 3
  descending.clear()
  train.train_and_evaluate(descending_config(**{'early_stopping.patience': 10}), workdir,
                           allow_config_change=('early_stopping',))
  # Patience 10 from the best step 3: steps 7 to 13 train and evaluate, on from where the run stopped; step 3 is
  # still the best, and is reported again.
  assert [(s, f) for s, f, _ in descending] == [(s, False) for s in range(7, 14)] + [(3, True)]
  np.testing.assert_allclose([w for _, _, w in descending[:-1]], [closed_form(s) for s in range(7, 14)], rtol=1e-6)
  with open(os.path.join(workdir, files.FINISHED_FILE)) as f:
    assert json.load(f) == {'step': 13, 'stopped_early': True}
  records = files.read_records(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in records if 'best/step' in r] == [13]


def test_a_run_stopped_before_the_best_is_known_resumes_to_the_same_selection(descending, tmp_path, monkeypatch):
  whole = train.train_and_evaluate(descending_config(), str(tmp_path / 'whole'))
  asked = train._StopRequest.__call__
  monkeypatch.setattr(train._StopRequest, '__call__', lambda self, step: step == 4 or asked(self, step))
  workdir = str(tmp_path / 'cut')
  train.train_and_evaluate(descending_config(), workdir)  # a preemption after step 4: best so far is 3
  assert not os.path.exists(os.path.join(workdir, files.FINISHED_FILE))
  monkeypatch.setattr(train._StopRequest, '__call__', asked)
  descending.clear()
  resumed = train.train_and_evaluate(descending_config(), workdir)
  assert [(s, f) for s, f, _ in descending] == [(5, False), (6, False), (3, True)]
  assert os.path.exists(os.path.join(workdir, files.FINISHED_FILE))
  assert {k: v for k, v in resumed.items() if k.startswith('best/')} == {
      k: v for k, v in whole.items() if k.startswith('best/')}


def test_the_model_before_training_is_a_candidate_when_it_is_evaluated(descending, tmp_path, monkeypatch):
  """With eval_at_start, step 0 (the model as initialised or loaded: a frozen classifier without its prompt) competes
  like any trained step. SGD at lr 1.1 overshoots: w_t = 1 - (-1.2)^t, so the validation score -(w - 0.5)^2 is
  -0.25 at step 0 and lower at every later step; without the step-0 evaluation, step 2 is the best trained step."""
  w = lambda step: 1 - (-1.2)**step
  config = lambda **fields: descending_config(**{'optim.lr': 1.1, 'eval_at_start': True, **fields})
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config(), workdir)
  # Steps 1-3 do not improve on step 0: patience 3 stops the run after step 3; step 0 is restored and evaluated.
  assert [(s, f) for s, f, _ in descending] == [(s, False) for s in range(4)] + [(0, True)]
  np.testing.assert_allclose([x for _, _, x in descending], [w(s) for s in range(4)] + [0.0], rtol=1e-6, atol=1e-7)
  expected = {f'best/{k}': v for k, v in scores(0.0).items()}
  assert {k: results[k] for k in expected} == pytest.approx(expected, rel=1e-6) and results['best/step'] == 0
  with open(os.path.join(workdir, checkpoint.BEST_FILE)) as f:
    assert json.load(f)['step'] == 0
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ckpt.steps() == [0, 3]  # max_checkpoints=1 keeps the newest, and the best
  ckpt.quarantine([3], 'test')  # as if killed before step 3 was saved (steps 1 and 2 never were): step 0 is newest
  ckpt.close()
  descending.clear()  # resumed from step 0's checkpoint (w = 0, where a fresh init would now give 5): the same run
  task = tasks.build(None)
  monkeypatch.setattr(tasks, 'build', lambda config: task._replace(init=lambda rng: {'w': jnp.full((1,), 5.0)}))
  assert train.train_and_evaluate(config(), workdir)['best/step'] == 0
  assert [(s, f) for s, f, _ in descending] == [(s, False) for s in range(4)] + [(0, True)]
  np.testing.assert_allclose([x for _, _, x in descending], [w(s) for s in range(4)] + [0.0], rtol=1e-6, atol=1e-7)
  records = files.read_records(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in records if 'eval/validation/score' in r] == [0, 1, 2, 3]  # logged once each
  monkeypatch.setattr(tasks, 'build', lambda config: task)  # w starts at 0 again
  descending.clear()  # --eval_only reads the selected step 0, not the newest
  assert train.evaluate_checkpoint(config(), workdir) == pytest.approx(scores(0.0), rel=1e-6)
  assert [(s, f) for s, f, _ in descending] == [(0, True)]

  descending.clear()  # without the step-0 evaluation the trained steps compete alone: step 2 (w = -0.44)
  results = train.train_and_evaluate(config(eval_at_start=False), str(tmp_path / 'trained_only'))
  assert [s for s, _, _ in descending] == [1, 2, 3, 4, 5, 2] and results['best/step'] == 2
  assert {k: results[k] for k in expected} == pytest.approx(
      {f'best/{k}': v for k, v in scores(w(2)).items()}, rel=1e-5)


def test_without_early_stopping_the_last_evaluation_is_the_final_one(descending, tmp_path):
  train.train_and_evaluate(descending_config(num_train_steps=3, **{'early_stopping.metric': ''}),
                           str(tmp_path / 'run'))
  assert [(s, f) for s, f, _ in descending] == [(1, False), (2, False), (3, True)]


@pytest.mark.parametrize('fields, message', [
    ({'early_stopping.metric': 'validation/score'}, "must name an evaluation metric, such as 'eval/"),
    ({'early_stopping.mode': 'best'}, 'choose max'),
    ({'early_stopping.patience': -1}, 'must be a whole number of evaluations'),
])
def test_bad_early_stopping_is_one_line_before_anything_is_written(descending, tmp_path, fields, message):
  with pytest.raises(train.ConfigError, match=message) as error:
    train.train_and_evaluate(descending_config(**fields), str(tmp_path / 'run'))
  assert '\n' not in str(error.value) and not (tmp_path / 'run').exists()


def test_an_early_stopping_metric_the_evaluation_does_not_write_is_named(descending, tmp_path):
  with pytest.raises(ValueError, match="'eval/validation/acc' is not among .* eval/validation/score") as error:
    train.train_and_evaluate(descending_config(**{'early_stopping.metric': 'eval/validation/acc'}),
                             str(tmp_path / 'run'))
  assert not isinstance(error.value, train.ConfigError)  # its message would say that nothing was written


def test_under_freeze_adam_moments_are_sharded_like_their_params_and_frozen_leaves_have_none():
  """On a 2x2x2 mesh, with the bottom block frozen: each moment of a trained leaf has the sharding the rules give
  its param (compared with sharding.param_shardings, not with the code under test), frozen leaves get no moments,
  and the counters are replicated."""
  import flax.linen as nn
  from foundation import config_base, optim, sharding
  from foundation.models.transformer import Transformer, TransformerConfig
  model = Transformer(TransformerConfig(vocab_size=64, num_layers=2, embed_dim=16, num_heads=4, num_kv_heads=2,
                                        mlp_dim=32, max_len=16))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  rules = sharding.logical_rules()
  cfg = ml_collections.ConfigDict(config_base.optimizer(freeze=('^layers_0/',), weight_decay_exclude=('norm',)))
  tx, _ = optim.make_optimizer(cfg, nn.unbox(abstract), 10)
  shardings = train._state_shardings(abstract, tx, mesh, rules)
  expected = {'/'.join(str(k.key) for k in path): s for path, s in jax.tree_util.tree_flatten_with_path(
      sharding.param_shardings(abstract, mesh, rules))[0]}
  assert any(not s.is_fully_replicated for s in expected.values())  # the rules do split something here
  moments = {}
  for path, s in jax.tree_util.tree_flatten_with_path(shardings['opt_state'])[0]:
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    name = '/'.join(keys[next((i for i, k in enumerate(keys) if k in ('layers_0', 'layers_1', 'embedding',
                                                                     'final_norm')), len(keys)):])
    if name:
      moments.setdefault(name, []).append(s)
    else:
      assert s.is_fully_replicated  # counts
  assert not any(name.startswith('layers_0/') for name in moments)
  trained = {name for name in expected if not name.startswith('layers_0/')}
  assert set(moments) == trained
  for name in trained:
    assert moments[name] == [expected[name]] * 2, name  # Adam's mu and nu


def test_profile_steps_write_a_trace_and_bad_ones_are_refused(descending, tmp_path, capsys):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(descending_config(profile_steps=(2, 3), num_train_steps=4), str(workdir))
  out = capsys.readouterr().out
  # The header counts the state the loop holds: one float32 param, its SGD state is empty; the summary the steps.
  assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1} (jit) | params 1 trainable of 1 |" in out
  assert 'Done at step 4 (4 steps in' in out and 'Profile of steps 2-3' in out and 'First step done' in out
  first = [r for r in files.read_records(str(workdir / 'metrics.jsonl')) if 'perf/first_step_s' in r]
  assert [r['step'] for r in first] == [1] and first[0]['perf/first_step_s'] > 0  # with the first log line
  traces = list((workdir / train.PROFILE_DIR).rglob('*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  for bad in [(3, 2), (0, 1), (2, 5), (2,)]:
    with pytest.raises(train.ConfigError, match='config.profile_steps'):
      train.prepare(descending_config(profile_steps=bad, num_train_steps=4), str(tmp_path / 'bad'))


def test_the_run_compiles_the_step_prepare_traced_and_jits_other_batch_shapes(monkeypatch, tmp_path):
  """The jit path traces the train step once per run: `prepare` traces it for the first batch's shapes and the run
  compiles that trace. A batch of other shapes (tasks that pad a batch to its longest example) goes through jit,
  traced once per shape, with the same numbers: here every other batch is wider, and the loss does not depend on
  the width, so w follows the closed form."""
  import grain
  traces, calls = [], []
  task = descending_task(calls)

  def loss(params, frozen, batch, rng):
    traces.append(batch['x'].shape)  # runs when the step is traced, not when it runs
    return task.loss(params, frozen, batch, rng)

  batches = lambda index, count: grain.MapDataset.range(10**6).map(lambda i: {'x': np.zeros((8, 1 + i % 2),
                                                                                            np.float32)})
  monkeypatch.setattr(tasks, 'build', lambda config: task._replace(loss=loss, train_batches=batches))
  train.train_and_evaluate(descending_config(num_train_steps=5, **{'early_stopping.metric': ''}),
                           str(tmp_path / 'run'))
  assert traces == [(8, 1), (8, 2)]
  assert [s for s, _, _ in calls] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose(calls[-1][2], closed_form(5), rtol=1e-6)


def test_an_optimizer_step_that_holds_no_array_is_a_difference_of_the_state(tmp_path):
  """optim.param_max adds a masked step with an empty state to the chain: no array more, but orbax cannot restore
  the old state into the new structure. The resume check must name it, not take the checkpoints for damaged."""
  params = {'w': jnp.ones(3)}
  two = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  three = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3), optax.masked(optax.scale(2.0), {'w': True}))
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  ckpt.save(1, {'params': params, 'opt_state': two.init(params)}, {'data': {}})
  ckpt.close()
  abstract = lambda tx: jax.eval_shape(lambda: {'params': params, 'opt_state': tx.init(params)})
  assert checkpoint.state_differences(str(tmp_path), 1, abstract(two)) == ''
  assert checkpoint.state_differences(str(tmp_path), 1, abstract(three)) == 'opt_state/2/inner_state is missing'
