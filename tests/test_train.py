"""End to end through the CLI: every way of running the same config must log the same numbers.

Each comparison reads `metrics.jsonl` of two runs and compares them number by number. Runs are subprocesses, so
each can have its own device count (1 or 8 fake CPU devices) or be two cooperating processes.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import CACHE_DIR, REPO

SMOKE = 'configs/lm/shakespeare.py:smoke'
# 12 steps, a log line every step, checkpoints at 4, 8, 12.
STEPS = ('--config.num_train_steps=12', '--config.log_every=1', '--config.checkpoint_every=4',
         '--config.eval_every=6')

# Runs foundation.main, but SIGKILLs itself right after the (asynchronous) save of step KILL_AT_STEP has begun:
# a crash at a known point, possibly in the middle of writing that checkpoint.
KILLING_MAIN = """
import os, signal, sys
from absl import app
from foundation import checkpoint, main
save = checkpoint.Checkpointer.save
def save_then_die(self, step, *args):
  save(self, step, *args)
  if step == int(os.environ['KILL_AT_STEP']):
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save_then_die
sys.argv[0] = 'foundation.main'
app.run(main.main)
"""


def run(workdir, data_dir, *overrides, devices=8, config=SMOKE, kill_at_step=None, process=None, check=True):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
  args = [f'--config={config}', f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *overrides]
  if kill_at_step is not None:
    env['KILL_AT_STEP'] = str(kill_at_step)
    cmd = [sys.executable, '-c', KILLING_MAIN, *args]
  else:
    cmd = [sys.executable, '-m', 'foundation.main', *args]
  if process is not None:  # (coordinator port, number of processes, this process's id): start, don't wait
    port, num, pid = process
    cmd += [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={num}', f'--process_id={pid}']
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  if check and result.returncode != 0:
    raise AssertionError(f'{" ".join(cmd[-len(args):])} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
  return result


def logged(workdir) -> dict[int, dict]:
  """step -> every metric logged at that step (train and eval lines merged)."""
  by_step = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      by_step.setdefault(record.pop('step'), {}).update(record)
  return by_step


def assert_same_numbers(a, b, keys=('train/loss', 'train/grad_norm', 'eval/loss'), rtol=5e-5):
  assert sorted(a) == sorted(b), f'logged steps differ: {sorted(a)} vs {sorted(b)}'
  compared = 0
  for step in a:
    for key in keys:
      if key in a[step] or key in b[step]:
        np.testing.assert_allclose(a[step][key], b[step][key], rtol=rtol, err_msg=f'{key} at step {step}')
        compared += 1
  assert compared >= len(a), 'nothing was compared'


@pytest.fixture(scope='module')
def reference(tmp_path_factory, tfds_dir):
  """The uninterrupted run on ONE device: what every other way of running must reproduce."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  run(workdir, tfds_dir, *STEPS, devices=1)
  return logged(workdir)


@pytest.fixture(scope='module')
def reference_8(tmp_path_factory, tfds_dir):
  """The uninterrupted run on 8 devices (data parallel): the same program, so interruptions must not change a bit."""
  workdir = str(tmp_path_factory.mktemp('reference_8'))
  run(workdir, tfds_dir, *STEPS)
  return logged(workdir)


def test_reference_run_learns_and_writes_its_outputs(reference, tmp_path_factory):
  losses = [reference[s]['train/loss'] for s in sorted(reference) if 'train/loss' in reference[s]]
  assert len(losses) == 12
  assert losses[-1] < losses[0] - 0.5  # byte LM from ln(320)=5.77 nats: the first steps drop it fast
  assert np.isclose(reference[12]['eval/perplexity'], np.exp(reference[12]['eval/loss']), rtol=1e-5)


def test_sharded_mesh_equals_one_device(reference, tmp_path, tfds_dir):
  run(tmp_path, tfds_dir, *STEPS, '--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2')
  assert_same_numbers(logged(tmp_path), reference)


def test_pmap_equals_one_device(reference, tmp_path, tfds_dir):
  run(tmp_path, tfds_dir, *STEPS, '--config.parallelism=pmap')
  assert_same_numbers(logged(tmp_path), reference)


def test_gradient_accumulation_equals_one_big_step(reference, tmp_path, tfds_dir):
  run(tmp_path, tfds_dir, *STEPS, '--config.grad_accum_steps=2', '--config.mesh.data=2',
      '--config.mesh.fsdp=2', '--config.mesh.tensor=2')
  assert_same_numbers(logged(tmp_path), reference)


def test_kill_9_then_rerun_resumes_exactly(reference_8, tmp_path, tfds_dir):
  # Killed just after the save of step 8 began: orbax had finished step 4 before starting it, so the rerun resumes
  # from 4 (or from 8, if that save happened to complete) and recomputes the rest.
  killed = run(tmp_path, tfds_dir, *STEPS, kill_at_step=8, check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  resumed = run(tmp_path, tfds_dir, *STEPS)
  assert 'Resuming from the checkpoint at step' in resumed.stdout
  assert_same_numbers(logged(tmp_path), reference_8, rtol=1e-6)


def test_resume_onto_a_different_mesh(reference, tmp_path, tfds_dir):
  run(tmp_path, tfds_dir, *STEPS, '--config.mesh.fsdp=8', '--config.mesh.data=1', kill_at_step=8,
      check=False)
  resumed = run(tmp_path, tfds_dir, *STEPS, '--config.mesh.tensor=2', '--config.mesh.data=2', devices=4)
  assert 'Resuming from the checkpoint at step' in resumed.stdout
  assert_same_numbers(logged(tmp_path), reference)


def test_two_processes_equal_one(reference_8, tmp_path, tfds_dir):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = [run(tmp_path, tfds_dir, *STEPS, devices=4, process=(port, 2, i)) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=180)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  assert 'step 12/12' in outputs[0] and 'step 12/12' not in outputs[1]  # only process 0 reports
  assert_same_numbers(logged(tmp_path), reference_8, rtol=1e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tfds_dir):
  result = run(tmp_path, tfds_dir, *STEPS, '--config.optim.lr=1e30', '--config.optim.warmup_steps=0',
               '--config.checkpoint_every=1', check=False)
  assert result.returncode != 0
  message = result.stderr.strip().splitlines()[-1]
  assert 'train/loss is nan at step' in message or 'train/loss is inf at step' in message, message
  bad_step = int(message.split(' at step ')[1].split('.')[0])
  saved = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert saved and max(saved) == bad_step - 1
  assert all(np.isfinite(v['train/loss']) for v in logged(tmp_path).values() if 'train/loss' in v)


@pytest.mark.parametrize('overrides, message', [
    (('--config.optim.lrr=1',), 'Did you mean'),
    (('--config.global_batch_size=abc',), 'global_batch_size'),
    (('--config.mesh.data=3',), 'multiplies to 3 but there are 8 devices'),
    (('--config.global_batch_size=12',), 'not divisible by the data-parallel size 8'),
    (('--config.data.data_dir=/nonexistent/tfds',), 'python -m foundation.data.prepare shakespeare_plays'),
    (('--config.parallelism=pmap', '--config.mesh.tensor=2'), 'data-parallel only'),
    (('--config.checkpoint_every=3', '--config.log_every=2'), 'multiple of config.log_every'),
    (('--config.sample.max_new_tokens=40',), 'exceeds the trained context config.data.seq_len=32'),
])
def test_bad_input_fails_early_and_writes_nothing(tmp_path, tfds_dir, overrides, message):
  workdir = tmp_path / 'run'
  result = run(workdir, tfds_dir, *overrides, check=False)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-3000:]
  assert not workdir.exists()


def test_a_workdir_with_another_config_is_refused_and_kept(tmp_path, tfds_dir):
  run(tmp_path, tfds_dir, '--config.num_train_steps=4')
  before = (tmp_path / 'metrics.jsonl').read_text()
  result = run(tmp_path, tfds_dir, '--config.num_train_steps=4', '--config.optim.lr=1e-4', check=False)
  assert result.returncode != 0 and 'different config (differs in: optim)' in result.stderr
  assert (tmp_path / 'metrics.jsonl').read_text() == before


def test_a_url_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  from foundation import train
  from test_configs import load
  monkeypatch.chdir(tmp_path)  # where os.makedirs('gs://...') would have made a local 'gs:' directory
  with pytest.raises(ValueError, match='must be a filesystem path'):
    train.train_and_evaluate(load('configs/lm/shakespeare.py').get_config('smoke'), 'gs://bucket/run')
  assert not os.listdir(tmp_path)
