"""End to end through the CLI: every way of running the same config must log the same numbers.

Each comparison reads `metrics.jsonl` of two runs and compares them number by number. Runs are subprocesses, so
each can have its own device count (1 or 8 fake CPU devices) or be two cooperating processes.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, subprocess_env
from foundation import metrics
from foundation.models.transformer import TransformerConfig, flops_per_token
from test_configs import load

SMOKE = 'configs/lm/shakespeare.py:smoke'
# 12 steps, a log line every step, checkpoints at 4, 8, 12. The matmuls in float32: the runs below must agree to
# float32 rounding across meshes, processes and restarts, and with bf16 operands a last-bit difference in an f32
# partial sum can round an operand of the next matmul to a neighbouring bf16 value (2e-4 in the loss after 12 steps
# on a 2x2x2 mesh). test_transformer checks the bf16 matmuls against numpy.
STEPS = ('--config.num_train_steps=12', '--config.log_every=1', '--config.checkpoint_every=4',
         '--config.eval_every=6', '--config.model.matmul_dtype=float32')

# Runs foundation.main, but SIGKILLs itself right after the (asynchronous) save of step KILL_AT_STEP has begun:
# a crash at a known point, possibly in the middle of writing that checkpoint.
KILLING_MAIN = """
import os, signal, sys
from absl import app
from foundation import checkpoint, cli, main
save = checkpoint.Checkpointer.save
def save_then_die(self, step, *args):
  saved = save(self, step, *args)
  if step == int(os.environ['KILL_AT_STEP']):
    os.kill(os.getpid(), signal.SIGKILL)
  return saved
checkpoint.Checkpointer.save = save_then_die
sys.argv[0] = 'foundation.main'
app.run(main.main, flags_parser=cli.parse_flags)
"""


# Runs foundation.main, but sends itself SIGNAL at each step named in SIGNAL_AT_STEPS, as the step is dispatched: a
# preemption (SIGTERM) or a crash (SIGKILL) at a chosen point, through the real signal path.
SIGNALLING_MAIN = """
import os, signal, sys
from absl import app
from foundation import cli, main, train
steps = {int(s) for s in os.environ['SIGNAL_AT_STEPS'].split(',')}
sig = getattr(signal, os.environ['SIGNAL'])
asked = train._StopRequest.__call__
def signal_then_ask(self, step):
  if step in steps:
    os.kill(os.getpid(), sig)
  return asked(self, step)
train._StopRequest.__call__ = signal_then_ask
sys.argv[0] = 'foundation.main'
app.run(main.main, flags_parser=cli.parse_flags)
"""


# Runs foundation.main, but sends itself SIGNAL as its first evaluation begins.
SIGNAL_IN_EVAL_MAIN = """
import os, signal, sys
from absl import app
from foundation import cli, main, tasks
build = tasks.build
def build_then_signal(config):
  task = build(config)
  def evaluate(params, frozen, step, ctx):
    if ctx.final or not os.environ.get('SIGNAL_IN_FINAL_ONLY'):
      os.kill(os.getpid(), getattr(signal, os.environ['SIGNAL']))
    return task.evaluate(params, frozen, step, ctx)
  return task._replace(evaluate=evaluate)
tasks.build = build_then_signal
sys.argv[0] = 'foundation.main'
app.run(main.main, flags_parser=cli.parse_flags)
"""


# Runs foundation.main, but in process 1 of a multi-process run every read of a checkpoint fails: a fault of that
# host's disk.
READ_FAILS_IN_PROCESS_1_MAIN = """
import sys
from absl import app
from foundation import checkpoint, cli, main
def fail(*args):
  raise OSError('a fault of this host (simulated)')
if '--process_id=1' in sys.argv:
  checkpoint._read = fail
sys.argv[0] = 'foundation.main'
app.run(main.main, flags_parser=cli.parse_flags)
"""


def run(workdir, data_dir, *overrides, devices=8, config=SMOKE, kill_at_step=None, process=None, check=True,
        signal_at=None, signal_in_eval=None, signal_in_final_eval=None, read_fails_in_process_1=False):
  env = subprocess_env(devices)
  args = [f'--config={config}', f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *overrides]
  if read_fails_in_process_1:
    cmd = [sys.executable, '-c', READ_FAILS_IN_PROCESS_1_MAIN, *args]
  elif kill_at_step is not None:
    env['KILL_AT_STEP'] = str(kill_at_step)
    cmd = [sys.executable, '-c', KILLING_MAIN, *args]
  elif signal_at is not None:  # (signal name, step)
    env['SIGNAL'], env['SIGNAL_AT_STEPS'] = signal_at[0], str(signal_at[1])
    cmd = [sys.executable, '-c', SIGNALLING_MAIN, *args]
  elif signal_in_eval is not None or signal_in_final_eval is not None:  # a signal name
    env['SIGNAL'] = signal_in_eval or signal_in_final_eval
    if signal_in_final_eval:
      env['SIGNAL_IN_FINAL_ONLY'] = '1'
    cmd = [sys.executable, '-c', SIGNAL_IN_EVAL_MAIN, *args]
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
def reference_workdir(tmp_path_factory, tfds_dir):
  """The uninterrupted run on ONE device: what every other way of running must reproduce."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  run(workdir, tfds_dir, *STEPS, devices=1)
  return workdir


@pytest.fixture(scope='module')
def reference(reference_workdir):
  return logged(reference_workdir)


@pytest.fixture(scope='module')
def reference_8(tmp_path_factory, tfds_dir):
  """The uninterrupted run on 8 devices (data parallel): the same program, so interruptions must not change a bit."""
  workdir = str(tmp_path_factory.mktemp('reference_8'))
  run(workdir, tfds_dir, *STEPS)
  return logged(workdir)


def test_reference_run_learns_and_writes_its_outputs(reference, reference_workdir):
  losses = [reference[s]['train/loss'] for s in sorted(reference) if 'train/loss' in reference[s]]
  assert len(losses) == 12
  assert losses[-1] < losses[0] - 0.5  # byte LM from ln(320)=5.77 nats: the first steps drop it fast
  assert np.isclose(reference[12]['eval/perplexity'], np.exp(reference[12]['eval/loss']), rtol=1e-5)
  # Every byte-tokenizer target but padding (weight 0) is one byte or the document break, counted as one.
  assert np.isclose(reference[12]['eval/nats_per_byte'], reference[12]['eval/loss'], rtol=1e-6)
  # The footprint: 12 steps of the model's FLOPs; the machine's power (one device here) over the logged hours.
  config = load(SMOKE.split(':')[0]).get_config('smoke')
  per_token = flops_per_token(TransformerConfig.from_dict(config.model), config.data.seq_len)
  assert reference[12]['compute/model_flops'] == pytest.approx(12 * config.global_batch_size * config.data.seq_len
                                                               * per_token)
  assert reference[12]['compute/energy_kwh'] == pytest.approx(
      metrics.CPU_WATTS_PER_CORE * os.cpu_count() * reference[12]['compute/device_hours'] / 1000 * 1.1)
  assert reference[12]['compute/co2e_kg'] == pytest.approx(reference[12]['compute/energy_kwh'] * 0.4)
  # perf/train_s: a clock that runs through set-up and the steps (the first step's wait included) and stops for
  # evaluation and checkpoints, so it ends below the process's wall time that the footprint counts.
  train_s = [reference[s]['perf/train_s'] for s in range(1, 13)]
  assert all(later > earlier for earlier, later in zip(train_s, train_s[1:]))
  assert train_s[0] >= reference[1]['perf/first_step_s']
  assert train_s[-1] < reference[12]['compute/device_hours'] * 3600
  # A sample from the prompt at every evaluation: the prompt, then at most max_new_tokens bytes, each decoded to at
  # most one character.
  evaluated = [s for s in sorted(reference) if 'eval/loss' in reference[s]]
  assert evaluated == [6, 12]
  written = sorted(os.listdir(os.path.join(reference_workdir, 'samples')))
  assert written == [f'step_{s:06d}.txt' for s in evaluated]
  for name in written:
    with open(os.path.join(reference_workdir, 'samples', name)) as f:
      samples = f.read()[:-1].split('\n\n=====\n\n')
    assert len(samples) == config.sample.num_samples
    assert all(s.startswith(config.sample.prompt) for s in samples)
    assert all(len(s) - len(config.sample.prompt) <= config.sample.max_new_tokens for s in samples)


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


def two_processes(workdir, data_dir, *overrides, overrides_1=(), timeout=180, **how):
  """Runs the config as two cooperating processes of 4 devices each (process 1 also gets `overrides_1`; `how`: as
  for run); returns their exit codes and outputs."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = [run(workdir, data_dir, *overrides, *(overrides_1 if i else ()), devices=4, process=(port, 2, i), **how)
           for i in range(2)]
  try:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [p.returncode for p in procs], outputs


# The state sharded over both processes' devices (fsdp over all 8): each process writes and reads only its shards.
TWO_PROCESSES = (*STEPS, '--config.mesh.fsdp=8', '--config.mesh.data=1', '--config.max_checkpoints=3')


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory, tfds_dir):
  """The uninterrupted run as two cooperating processes: (workdir, exit codes, outputs)."""
  workdir = tmp_path_factory.mktemp('two_processes')
  codes, outputs = two_processes(workdir, tfds_dir, *TWO_PROCESSES)
  return workdir, codes, outputs


def test_two_processes_equal_one(two_process_run, reference):
  workdir, codes, outputs = two_process_run
  assert codes == [0, 0], outputs
  assert 'step 12/12' in outputs[0] and 'step 12/12' not in outputs[1]  # only process 0 reports
  assert_same_numbers(logged(workdir), reference)


def test_a_checkpoint_one_process_cannot_read_is_passed_over_by_every_process(two_process_run, reference, tmp_path,
                                                                               tfds_dir):
  # Process 1's files of step 12 are damaged, so process 0 reads that step and process 1 cannot; both must go on to
  # step 8 together (not hang in a collective that process 1 never joins, nor pair process 0's step 12 with process
  # 1's step 8).
  assert two_process_run[1] == [0, 0] and saved_steps(two_process_run[0]) == [4, 8, 12], two_process_run[2]
  workdir = tmp_path / 'run'
  shutil.copytree(two_process_run[0], workdir)
  damaged = workdir / 'checkpoints' / '12' / 'state' / 'ocdbt.process_1' / 'd'
  assert damaged.is_dir() and os.listdir(damaged), os.listdir(damaged.parent.parent)
  for name in os.listdir(damaged):
    data = (damaged / name).read_bytes()
    (damaged / name).write_bytes(bytes(b ^ 0x5A for b in data))
  codes, outputs = two_processes(workdir, tfds_dir, *TWO_PROCESSES, timeout=120)
  assert codes == [0, 0], outputs
  assert ('the checkpoint of step 12' in outputs[0] and 'process 1 could not read its part of it' in outputs[0]
          and 'Resuming from the checkpoint at step 8' in outputs[0]), outputs[0][-3000:]
  assert saved_steps(workdir, 'checkpoints_unreadable') == [12]
  assert_same_numbers(logged(workdir), reference)


def saved_steps(workdir, directory='checkpoints'):
  path = os.path.join(workdir, directory)
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def test_nonfinite_loss_keeps_a_good_checkpoint_and_the_advice_works(tmp_path, tfds_dir):
  # The learning rate warms up to 1e30: a few updates in, the params blow up. Checkpoints every step, one kept.
  steps = ('--config.num_train_steps=12', '--config.log_every=1', '--config.checkpoint_every=1',
           '--config.eval_every=12', '--config.max_checkpoints=1')
  result = run(tmp_path, tfds_dir, *steps, '--config.optim.lr=1e30', '--config.optim.warmup_steps=3', check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith('error: train/loss is') and 'Traceback' not in result.stderr, result.stderr[-3000:]
  bad = int(message.split(' at step ')[1].split(';')[0])
  kept = saved_steps(tmp_path)
  # The kept checkpoint's own loss (computed one step later, with its params) was finite; the later ones, whose
  # params produced the non-finite numbers, were moved aside, not deleted.
  assert kept and max(kept) == bad - 2, (kept, bad)
  assert saved_steps(tmp_path, 'checkpoints_nonfinite') == [bad - 1]
  by_step = logged(tmp_path)
  assert np.isfinite(by_step[max(kept) + 1]['train/loss']) and np.isfinite(by_step[max(kept) + 1]['train/grad_norm'])
  # The way forward the message names: the same workdir, a lower learning rate, accepted explicitly.
  assert '--allow_config_change=optim --config.optim.lr=' in message
  refused = run(tmp_path, tfds_dir, *steps, '--config.optim.lr=1e-3', check=False)
  assert refused.returncode == 2 and '--allow_config_change=optim' in refused.stderr
  resumed = run(tmp_path, tfds_dir, *steps, '--config.optim.lr=1e-3', '--allow_config_change=optim')
  assert f'Resuming from the checkpoint at step {max(kept)}' in resumed.stdout
  by_step = logged(tmp_path)
  trained = sorted(s for s in by_step if s > 0)  # step 0 holds the parameter counts
  assert trained == list(range(1, 13)) and all(np.isfinite(by_step[s]['train/loss']) for s in trained)
  history = [json.loads(line) for line in (tmp_path / 'config_history.jsonl').read_text().splitlines()]
  assert history[-1]['changes']['optim.lr'] == [1e30, 1e-3] and history[-1]['resumed_from_step'] == max(kept)


BAD_INPUT = [
    (('--config.optim.lrr=1',), '--config.optim.lrr is not a field of the config; did you mean "lr"?'),
    (('--config.global_batch_size=abc',), 'global_batch_size'),
    (('--config.mesh.data=3',), 'multiplies to 3 but there are 8 devices'),
    (('--config.global_batch_size=12',), 'not divisible by the data-parallel size 8'),
    (('--config.data.data_dir=/nonexistent/tfds',), 'python -m foundation.data.prepare shakespeare_plays'),
    (('--config.parallelism=pmap', '--config.mesh.tensor=2'), 'data-parallel only'),
    (('--config.checkpoint_every=3', '--config.log_every=2'), 'multiple of config.log_every'),
    (('--config.sample.max_new_tokens=40',), 'exceeds the trained context config.data.seq_len=32'),
    (('--config.sample.top_p=0',), 'config.sample.top_p=0.0 must be in (0, 1]'),
    (('--config.sample.prompt=',), 'needs a non-empty config.sample.prompt and config.sample.max_new_tokens >= 1'),
    (('--config.sample.max_new_tokens=0',), 'config.sample.max_new_tokens >= 1 (it is 0)'),
    (('--config.optim.freeze=("no_such_param",)',), "pattern 'no_such_param' matches no parameter"),
    (('--config.optim.weight_decay_exclude=("nope",)',), "pattern 'nope' matches no parameter"),
    (('--config.optim.name=adamz',), "config.optim.name='adamz'; choose adamw or sgd"),
    (('--config.optim.schedule=cosin',), "config.optim.schedule='cosin'"),
    (('--config.data.num_shards=3',), 'must be a positive multiple of num_shards=3'),
    (('--config.model.num_heads=3',), 'embed_dim 32 is not divisible by num_heads 3'),
    (('--config.eval.batch_size=4',), 'config.eval.batch_size=4 must be a positive multiple'),
    (('--config.zzz=1',), "'zzz' is not a field of the config"),
    (('--eval_step=3',), '--eval_step=3 names the checkpoint that --eval_only evaluates: add --eval_only'),
    (('--eval_only', '--dry_run'), '--eval_only and --dry_run are two modes'),
    (('--config=configs/lm/shakespear.py',), "the --config file does not load: [Errno 2] No such file or directory: "
                                             "'configs/lm/shakespear.py'"),
    (('--config.restore_step=-1',), 'config.restore_step=-1'),
    (('--config.restore_step=4',), 'config.restore_step=4: '),  # a new workdir has no checkpoint to go back to
    (('--config.data.eval_split=train[:10]',), "train_split='train' and config.data.eval_split='train[:10]' share 10"),
]

# foundation.main's command line (flag parsing, then main) once per JSON argv list in argv[1], in one process: the
# cases below pay for importing jax once, not once each. Prints [[exit status, stderr], ...].
COMMAND_LINES_MAIN = """
import contextlib, io, json, sys, traceback
from absl import flags
from foundation import cli, main
results = []
for argv in json.loads(sys.argv[1]):
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:  # the previous config's override flags
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  sys.argv = ['foundation.main', *argv]  # where ml_collections reads the overrides
  stderr, status = io.StringIO(), 0
  with contextlib.redirect_stderr(stderr):
    try:
      main.main(cli.parse_flags(sys.argv))
    except SystemExit as e:
      status = e.code
    except Exception:  # pylint: disable=broad-except  (what app.run would show as a traceback)
      traceback.print_exc()
      status = 'uncaught'
  results.append([status, stderr.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope='module')
def bad_input_results(tmp_path_factory, tfds_dir):
  """{overrides: (exit status, stderr, workdir)} of every BAD_INPUT case, each in a workdir of its own."""
  root = tmp_path_factory.mktemp('bad_input')
  workdirs = [root / f'case{i}' / 'run' for i in range(len(BAD_INPUT))]
  argvs = [[f'--config={SMOKE}', f'--workdir={w}', f'--config.data.data_dir={tfds_dir}', *overrides]
           for w, (overrides, _) in zip(workdirs, BAD_INPUT)]
  result = subprocess.run([sys.executable, '-c', COMMAND_LINES_MAIN, json.dumps(argvs)], cwd=REPO,
                          env=subprocess_env(8), capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  outcomes = json.loads(result.stdout.strip().splitlines()[-1])
  return {overrides: (*outcome, w) for (overrides, _), outcome, w in zip(BAD_INPUT, outcomes, workdirs)}


@pytest.mark.parametrize('overrides, message', BAD_INPUT)
def test_bad_input_fails_early_and_writes_nothing(bad_input_results, overrides, message):
  status, stderr, workdir = bad_input_results[overrides]
  assert status == 2, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1 and message in lines[0], stderr[-3000:]
  assert 'Traceback' not in stderr
  assert not workdir.exists()


def test_a_workdir_with_another_config_is_refused_and_kept(tmp_path, tfds_dir):
  run(tmp_path, tfds_dir, '--config.num_train_steps=4')
  before = (tmp_path / 'metrics.jsonl').read_text()
  listing = os.listdir(tmp_path)
  result = run(tmp_path, tfds_dir, '--config.num_train_steps=4', '--config.optim.lr=1e-4', check=False)
  assert result.returncode == 2 and "different config (optim.lr: 0.01 -> 0.0001)" in result.stderr, result.stderr
  assert (tmp_path / 'metrics.jsonl').read_text() == before
  # A dry run checks the change as the run would: accepted with --allow_config_change, and still writes nothing.
  dry = run(tmp_path, tfds_dir, '--config.num_train_steps=4', '--config.optim.lr=1e-4', '--allow_config_change=optim',
            '--dry_run', devices=1)
  assert 'memory per device' in dry.stdout and sorted(os.listdir(tmp_path)) == sorted(listing)
  # Where the data lives is not part of what is computed: a run moved to another machine resumes.
  moved = tmp_path.parent / 'moved_tfds'
  os.symlink(tfds_dir, moved)
  rerun = run(tmp_path, str(moved), '--config.num_train_steps=4')
  assert rerun.returncode == 0 and (tmp_path / 'metrics.jsonl').read_text() == before
  # An accepted change that alters the training state (frozen embeddings have no optimizer state) cannot resume:
  # refused before anything is written, and no checkpoint is taken for damaged and set aside.
  from foundation import train
  steps = saved_steps(tmp_path)
  config = _smoke_config(tfds_dir, num_train_steps=4)
  config.optim.freeze = ('embed',)
  with pytest.raises(train.ConfigError, match=rf'the checkpoint of step {steps[-1]} .* holds another training state '
                                              r'than this config builds \(opt_state/.*init_from.source='):
    train.prepare(config, str(tmp_path), allow_config_change=('optim',))
  assert saved_steps(tmp_path) == steps and sorted(os.listdir(tmp_path)) == sorted(listing)
  # The dataset's version is recorded; a resume onto another version (a builder changed since) is refused.
  from foundation.data.shakespeare import ShakespearePlays
  record = json.loads((tmp_path / 'config.json').read_text())
  assert record['data_version'] == str(ShakespearePlays.VERSION)
  (tmp_path / 'config.json').write_text(json.dumps({**record, 'data_version': '0.9.0'}))
  config = _smoke_config(tfds_dir, num_train_steps=4)
  with pytest.raises(train.ConfigError, match=rf'read version 0.9.0 of shakespeare_plays, but .* now gives version '
                                              rf'{ShakespearePlays.VERSION}, .* --allow_config_change=data\.$'):
    train.prepare(config, str(tmp_path))
  accepted = train.prepare(config, str(tmp_path), allow_config_change=('data',))
  assert accepted.changes == {'data.version': ['0.9.0', str(ShakespearePlays.VERSION)]}
  # A field added to the code after the run (its config.json lacks it): a resume names it; an evaluation of the
  # saved checkpoint leaves it out (a field that changed the model would change the checkpoint's structure).
  del record['sample']
  (tmp_path / 'config.json').write_text(json.dumps(record))
  with pytest.raises(train.ConfigError, match=r'different config \(sample\.'):
    train.prepare(config, str(tmp_path))
  assert train.prepare(config, str(tmp_path), resume=False).changes == {}
  assert saved_steps(tmp_path) == steps and sorted(os.listdir(tmp_path)) == sorted(listing)


def test_a_workdir_url_that_cannot_be_written_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  import fsspec
  from foundation import train
  from test_configs import load
  monkeypatch.chdir(tmp_path)  # where os.makedirs('s3://...') would make a local 's3:' directory
  config = load('configs/lm/shakespeare.py').get_config('smoke')
  with pytest.raises(train.ConfigError, match='only object store foundation writes runs to is gs://'):
    train.train_and_evaluate(config, 's3://bucket/run')
  monkeypatch.setattr(fsspec, 'get_filesystem_class', lambda _: (_ for _ in ()).throw(ImportError('no gcsfs')))
  for run in (train.train_and_evaluate, train.evaluate_checkpoint):
    with pytest.raises(train.ConfigError, match='requirements-gcs.txt'):
      run(config, 'gs://bucket/run')
  assert not os.listdir(tmp_path)


# 13 steps on 2 devices, a log line every 3 steps (so a stop can cut an interval short), checkpoints every 6.
STEPS_2 = ('--config.num_train_steps=13', '--config.log_every=3', '--config.checkpoint_every=6',
           '--config.eval_every=13')


@pytest.fixture(scope='module')
def reference_2(tmp_path_factory, tfds_dir):
  workdir = str(tmp_path_factory.mktemp('reference_2'))
  run(workdir, tfds_dir, *STEPS_2, devices=2)
  return logged(workdir)


def test_sigterm_saves_the_step_it_was_on_then_kill_9_anywhere_resumes_exactly(reference_2, tmp_path, tfds_dir):
  # SIGTERM mid-interval: the run finishes that step, saves it, exits 0; then SIGKILLs at random steps (the rerun
  # resumes from whatever was saved last); every logged number equals the uninterrupted run's, bit for bit.
  stopped = run(tmp_path, tfds_dir, *STEPS_2, devices=2, signal_at=('SIGTERM', 4))
  assert 'Stopped by SIGTERM after step 4; saved its checkpoint' in stopped.stdout, stopped.stdout[-2000:]
  assert saved_steps(tmp_path) == [4]
  rng = random.Random(0)
  at = 4
  for _ in range(2):
    at = rng.randint(at + 1, 12)
    killed = run(tmp_path, tfds_dir, *STEPS_2, devices=2, signal_at=('SIGKILL', at), check=False)
    assert killed.returncode == -signal.SIGKILL, (at, killed.stderr[-2000:])
  resumed = run(tmp_path, tfds_dir, *STEPS_2, devices=2)
  assert 'Resuming from the checkpoint at step' in resumed.stdout
  assert_same_numbers(logged(tmp_path), reference_2, rtol=0)  # the cut interval's average included


def test_sigterm_stops_an_evaluation_only_run_at_once(tmp_path, tfds_dir):
  """A run that takes no step has nothing to save: SIGTERM ends it during its evaluation, unfinished (it was
  swallowed until the evaluation ended, and the run then reported itself finished)."""
  stopped = run(tmp_path, tfds_dir, '--config.num_train_steps=0', devices=1, signal_in_eval='SIGTERM', check=False)
  assert stopped.returncode == -signal.SIGTERM, stopped.stdout[-2000:]
  assert not (tmp_path / 'finished.json').exists()


def test_sigterm_in_the_selected_step_s_evaluation_stops_at_once_and_the_rerun_evaluates_it(tmp_path, tfds_dir):
  """With early stopping the result is an evaluation of the selected step after the last save: a signal there
  (a preemption during a many-minute test evaluation) stops the run at once, unfinished; the rerun trains nothing
  and evaluates."""
  flags = ('--config.num_train_steps=4', '--config.eval_every=2', '--config.checkpoint_every=2',
           '--config.log_every=2', '--config.early_stopping.metric=eval/loss', '--config.early_stopping.mode=min')
  stopped = run(tmp_path, tfds_dir, *flags, devices=1, signal_in_final_eval='SIGTERM', check=False)
  assert stopped.returncode == -signal.SIGTERM, stopped.stdout[-2000:]
  assert not (tmp_path / 'finished.json').exists() and saved_steps(tmp_path)[-1] == 4
  rerun = run(tmp_path, tfds_dir, *flags, devices=1)
  assert 'Resuming from the checkpoint at step 4' in rerun.stdout and (tmp_path / 'finished.json').exists()
  assert 'best/eval/loss' in logged(tmp_path)[4]


def test_damaged_files_resume_with_a_warning_and_the_right_numbers(reference_8, tmp_path, tfds_dir):
  run(tmp_path, tfds_dir, *STEPS, '--config.max_checkpoints=3')
  assert saved_steps(tmp_path) == [4, 8, 12]
  for root, _, files in os.walk(tmp_path / 'checkpoints' / '12' / 'state'):  # the newest: bytes overwritten
    for name in files:
      if os.sep + 'd' in root:
        path = os.path.join(root, name)
        data = bytearray(open(path, 'rb').read())
        open(path, 'wb').write(bytes(b ^ 0x5A for b in data))
  stale = tmp_path / 'checkpoints' / '12.orbax-checkpoint-tmp-1234'  # what a save killed mid-write leaves
  stale.mkdir()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:  # a write cut short by a crash
    f.write('{"step": 13, "train/lo')
  evaluated = run(tmp_path, tfds_dir, *STEPS, '--config.max_checkpoints=3', '--eval_only', '--eval_step=12',
                  devices=1, check=False)
  assert evaluated.returncode == 2, evaluated.stderr[-3000:]
  assert 'error: the checkpoint of step 12' in evaluated.stderr and 'cannot be read' in evaluated.stderr
  resumed = run(tmp_path, tfds_dir, *STEPS, '--config.max_checkpoints=3')
  out = resumed.stdout
  assert 'the checkpoint of step 12' in out and 'cannot be read' in out and 'resuming from step 8' in out, out[-3000:]
  assert 'dropped the last line' in out and 'Resuming from the checkpoint at step 8' in out
  # Reads of step 12's other arrays were still in flight when orbax gave up on it; they complete into its closed
  # event loop, which says nothing about the run: no traceback for them.
  assert 'Event loop is closed' not in resumed.stderr and 'never retrieved' not in resumed.stderr, \
      resumed.stderr[-3000:]
  assert not stale.exists() and saved_steps(tmp_path, 'checkpoints_unreadable') == [12]
  assert_same_numbers(logged(tmp_path), reference_8, rtol=1e-6)


def test_restore_step_resumes_from_an_older_checkpoint_and_keeps_the_newer(reference_8, tmp_path, tfds_dir):
  run(tmp_path, tfds_dir, *STEPS, '--config.max_checkpoints=3')
  assert saved_steps(tmp_path) == [4, 8, 12]
  resumed = run(tmp_path, tfds_dir, *STEPS, '--config.max_checkpoints=3', '--config.restore_step=4')
  assert 'Resuming from the checkpoint at step 4' in resumed.stdout
  assert saved_steps(tmp_path, 'checkpoints_superseded') == [8, 12]
  assert_same_numbers(logged(tmp_path), reference_8, rtol=1e-6)
  # The same command again (a preempted job requeued as it was launched) resumes that run, not step 4 again.
  again = run(tmp_path, tfds_dir, *STEPS, '--config.max_checkpoints=3', '--config.restore_step=4')
  assert 'was applied by an earlier run' in again.stdout and 'Resuming from the checkpoint at step 12' in again.stdout
  assert sorted(os.listdir(tmp_path / 'checkpoints_superseded')) == ['12', '8'], again.stdout[-3000:]
  assert_same_numbers(logged(tmp_path), reference_8, rtol=1e-6)


def test_a_run_trained_on_drops_its_selected_step_and_one_whose_checkpoint_is_gone(tmp_path, tfds_dir):
  """Early stopping by a metric that never improves after step 2 (eval loss, maximised): every later checkpoint's
  record names step 2 as the best. With step 2's checkpoint gone (a non-finite stop can set aside the checkpoint
  that a resumed one's record names), a resumed run selects again rather than failing to restore it at the end; a
  run that trains on from a finished one drops best.json, which named a step of the run as it was."""
  selecting = ('--config.early_stopping.metric=eval/loss', '--config.early_stopping.mode=max', '--config.eval_every=2',
               '--config.checkpoint_every=2', '--config.max_checkpoints=1', '--config.model.matmul_dtype=float32')
  run(tmp_path, tfds_dir, '--config.num_train_steps=6', *selecting)
  assert json.loads((tmp_path / 'best.json').read_text())['step'] == 2
  assert saved_steps(tmp_path)[0] == 2 and saved_steps(tmp_path)[-1] == 6
  shutil.rmtree(tmp_path / 'checkpoints' / '2')
  longer = ('--config.num_train_steps=10', '--allow_config_change=num_train_steps', *selecting)
  killed = run(tmp_path, tfds_dir, *longer, kill_at_step=8, check=False)
  assert killed.returncode != 0 and 'the checkpoint of the best step so far (2) is gone' in killed.stdout
  assert not (tmp_path / 'best.json').exists() and not (tmp_path / 'finished.json').exists()
  run(tmp_path, tfds_dir, *longer)
  evaluated = logged(tmp_path)
  best = max((s for s in (8, 10)), key=lambda s: evaluated[s]['eval/loss'])
  assert json.loads((tmp_path / 'best.json').read_text())['step'] == best == evaluated[10]['best/step']
  assert evaluated[10]['best/eval/loss'] == evaluated[best]['eval/loss']


def test_a_tensor_axis_across_processes_is_refused(tfds_dir, monkeypatch):
  """Each process feeds its own rows of the batch; where the tensor axis spans processes, two of them would feed
  one data shard."""
  from foundation import train
  config = _smoke_config(tfds_dir)
  config.mesh.update(data=-1, fsdp=1, tensor=8)
  train.validate(config, 8)  # one process: fine
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(ValueError, match=r'1 data-parallel replicas \(data=1 x fsdp=1\) for 2 processes'):
    train.validate(config, 8)
  config.mesh.tensor = 4
  train.validate(config, 8)  # 2 replicas, one per process


def test_a_process_that_refuses_the_config_stops_every_process(tmp_path, tfds_dir):
  # Process 1 alone gets a freeze pattern that matches nothing: both exit 2 at once, nothing is written, no hang.
  workdir = tmp_path / 'run'
  codes, outputs = two_processes(workdir, tfds_dir, overrides_1=('--config.optim.freeze=("nomatch",)',), timeout=120)
  assert codes == [2, 2], outputs
  assert 'process(es) [1] refused this run' in outputs[0] and "pattern 'nomatch' matches no parameter" in outputs[1]
  assert not workdir.exists()


def test_a_source_one_process_cannot_read_refuses_the_run_on_every_process(tmp_path, tfds_dir):
  # init_from reads the source on every process, among the checks before a run, which have no collective until
  # they agree: where process 1 alone cannot read it (its host's fault), or alone refuses the config before the
  # others read it, every process refuses the run with one line and exits; none waits in a barrier. And where the
  # processes read different steps of it (as when the source saves a checkpoint between their reads), they refuse the
  # run rather than start from different weights.
  run(tmp_path / 'source', tfds_dir, '--config.num_train_steps=2', '--config.checkpoint_every=1',
      '--config.log_every=1', devices=1)
  workdir = tmp_path / 'run'
  source = f'--config.init_from.source={tmp_path / "source"}'
  codes, outputs = two_processes(workdir, tfds_dir, source, read_fails_in_process_1=True, timeout=120)
  assert codes == [2, 2], outputs
  assert 'process(es) [1] refused this run' in outputs[0], outputs[0][-3000:]
  assert 'cannot be read (OSError: a fault of this host (simulated))' in outputs[1], outputs[1][-3000:]
  codes, outputs = two_processes(workdir, tfds_dir, source, overrides_1=('--config.optim.freeze=("nomatch",)',),
                                 timeout=120)
  assert codes == [2, 2], outputs
  assert 'process(es) [1] refused this run' in outputs[0] and "pattern 'nomatch' matches no parameter" in outputs[1]
  codes, outputs = two_processes(workdir, tfds_dir, source, overrides_1=('--config.init_from.step=1',), timeout=120)
  assert codes == [2, 2], outputs
  for output in outputs:
    assert 'process 1 would not run what process 0 runs' in output and 'frozen_sources.init_from.step: 2 vs 1' in output
  assert not workdir.exists()


def test_processes_agree_on_the_run_up_to_what_each_host_may_spell_its_own_way(monkeypatch):
  # Each process's record as prepare builds it, with the other process's gathered beside it (the collective is
  # exercised by the two-process tests): paths as each host spells them, a longer short hash of the same commit, an
  # unknown commit, a per-host data dir and a NaN agree; another step of a source, or another learning rate, does not.
  from foundation import sharding, train
  def record(**changes):
    base = {'optim': {'learning_rate': 0.1, 'clip': float('nan')}, 'data': {'data_dir': '/a'},
            'foundation_version': {'checkpoint_format': 3, 'commit': 'abc1234'},
            'frozen_sources': {'init_from': {'workdir': '/home/a/run', 'path': 'params', 'step': 2, 'hash': 'f00'}}}
    for dotted, value in changes.items():
      *parents, last = dotted.split('__')
      node = base
      for key in parents:
        node = node[key]
      node[last] = value
    return base
  def sent_by(record):  # what a process sends: its own record, prepared by the same function
    sent = []
    monkeypatch.setattr(sharding, 'gather_texts', lambda text: sent.append(text) or [text])
    train._check_processes_agree(record)
    return sent[0]
  def agree(mine, theirs):
    theirs = sent_by(theirs)
    monkeypatch.setattr(sharding, 'gather_texts', lambda text: [text, theirs])
    train._check_processes_agree(mine)
  agree(record(), record(frozen_sources__init_from__workdir='/mnt/b/run', data__data_dir='/b',
                         foundation_version__commit='abc1234d'))
  agree(record(foundation_version__commit='unknown'), record(foundation_version__commit='9999999'))
  with pytest.raises(train.ConfigError, match=r'process 1 would not run what process 0 runs '
                                              r'\(frozen_sources.init_from.step: 2 vs 1\)'):
    agree(record(), record(frozen_sources__init_from__step=1))
  with pytest.raises(train.ConfigError, match=r'\(foundation_version.commit: .abc1234. vs .9999999., '
                                              r'optim.learning_rate: 0.1 vs 0.2\)'):
    agree(record(), record(optim__learning_rate=0.2, foundation_version__commit='9999999'))


def test_a_workdir_of_another_checkpoint_format_is_refused_with_the_versions(tmp_path, tfds_dir):
  from foundation import train
  from test_configs import load
  config = load('configs/lm/shakespeare.py').get_config('smoke')
  config.data.data_dir = tfds_dir
  (tmp_path / 'config.json').write_text(json.dumps({**json.loads(config.to_json_best_effort()),
                                                    'foundation_version': {'checkpoint_format': 1,
                                                                           'commit': 'abc1234'}}))
  with pytest.raises(train.ConfigError, match='written by foundation abc1234 with checkpoint format 1'):
    train.prepare(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['config.json']
  # Format 2 (version-1 checksums) is still read: its checkpoints are checked with the weights they were saved with.
  (tmp_path / 'config.json').write_text(json.dumps({**json.loads(config.to_json_best_effort()),
                                                    'foundation_version': {'checkpoint_format': 2,
                                                                           'commit': 'abc1234'}}))
  train.prepare(config, str(tmp_path), dry=True)


def _smoke_config(tfds_dir, **fields):
  from test_configs import load
  config = load('configs/lm/shakespeare.py').get_config('smoke')
  config.data.data_dir = tfds_dir
  config.update(fields)
  return config


def test_a_diverged_lm_evaluates_to_an_infinite_perplexity_not_a_crash(tmp_path, tfds_dir):
  """Past ~709.8 nats per token exp() overflows a float: the perplexity is inf, and the loss is still logged."""
  import flax.linen as nn
  from foundation import sharding, tasks
  config = _smoke_config(tfds_dir)
  config.eval.max_batches, config.sample.num_samples = 1, 0
  task = tasks.build(config)
  params = nn.unbox(task.init(jax.random.key(0)))
  huge = jax.tree_util.tree_map_with_path(  # the output projection x 1e4: logits of ~1e4, a loss in the thousands
      lambda path, x: x * 1e4 if any(getattr(k, 'key', '') in ('embedding', 'lm_head') for k in path) else x, params)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  results = task.evaluate(huge, {}, 0, tasks.EvalContext(mesh=mesh, workdir=str(tmp_path), is_writer=True))
  assert results['eval/loss'] > 710 and results['eval/perplexity'] == float('inf')
  assert np.isfinite(results['eval/nats_per_byte'])


def test_init_from_a_workdir_pins_it_and_a_resume_does_not_read_it_again(tmp_path, tfds_dir):
  from foundation import train
  source = tmp_path / 'source'
  train.train_and_evaluate(_smoke_config(tfds_dir), str(source))
  # Step 0 of the new run evaluates exactly the source's final params: the same eval loss.
  config = _smoke_config(tfds_dir, eval_at_start=True)
  config.init_from.source = str(source)
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  np.testing.assert_allclose(logged(tmp_path / 'run')[0]['eval/loss'], logged(source)[6]['eval/loss'], rtol=1e-6)
  pin = json.loads((tmp_path / 'run' / 'config.json').read_text())['frozen_sources']['init_from']
  assert pin['step'] == 6 and pin['path'] == 'params'
  # The source is gone; the run goes on from its own checkpoint and keeps the record of what it started from.
  os.rename(source, tmp_path / 'elsewhere')
  config.num_train_steps = 8
  train.train_and_evaluate(config, str(tmp_path / 'run'), allow_config_change=('num_train_steps',))
  assert 8 in logged(tmp_path / 'run')
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['frozen_sources']['init_from'] == pin
  # A subtree that does not fit where it is put is refused, naming the leaves, before anything is written.
  config = _smoke_config(tfds_dir)
  config.init_from.update(source=str(tmp_path / 'run'), params_path='params/layers_0', target='layers_1/mlp')
  with pytest.raises(train.ConfigError, match="does not fit"):
    train.prepare(config, str(tmp_path / 'refused'))
  assert not (tmp_path / 'refused').exists()


def test_restoring_params_from_a_damaged_checkpoint_is_refused(tmp_path):
  """What init_from, teachers and --eval_only read checks the checksums saved beside the arrays, as a resume does:
  orbax reads flipped bytes without complaint."""
  import optax
  from foundation import checkpoint, train
  weights = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
  params = {'w': jax.numpy.asarray(weights), 'b': jax.numpy.ones((8,))}
  saver = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  saver.save(6, train._state_of(params, optax.adamw(1e-3)), {'data': {}})  # pylint: disable=protected-access
  saver.close()
  abstract = jax.eval_shape(lambda: params)
  tree, step = checkpoint.restore_params(str(tmp_path), 'params', abstract)
  assert step == 6 and np.array_equal(tree['w'], weights)
  # The host's checksums are the devices' (what a save records), for every dtype a state holds.
  leaves = {'f32': weights, 'bf16': weights[:3].astype(jax.numpy.bfloat16), 'i32': np.arange(-5, 70, dtype=np.int32),
            'bool': weights[0] > 0, 'scalar': np.float32(2.5), 'u8': np.arange(300).astype(np.uint8).reshape(3, 100)}
  assert checkpoint.host_checksums(leaves) == [int(c) for c in jax.device_get(checkpoint.checksums(leaves))]
  damaged = 0
  for root, _, names in os.walk(tmp_path / 'checkpoints' / '6' / 'state'):
    for name in names:
      path = os.path.join(root, name)
      if os.sep + 'd' in root and os.path.getsize(path) > 10_000:  # the array data, not its metadata
        data = bytearray(open(path, 'rb').read())
        data[len(data) // 2] ^= 0xFF
        open(path, 'wb').write(bytes(data))
        damaged += 1
  assert damaged
  with pytest.raises(ValueError, match='step 6 .* is damaged: its arrays do not match the checksums'):
    checkpoint.restore_params(str(tmp_path), 'params', abstract)
  # Bytes that no longer decompress: tensorstore's own error, as one line that a run's checks report.
  for root, _, names in os.walk(tmp_path / 'checkpoints' / '6' / 'state'):
    for name in names:
      if os.path.basename(root) == 'd':
        path = os.path.join(root, name)
        data = open(path, 'rb').read()
        open(path, 'wb').write(bytes(b ^ 0x5A for b in data))
  with pytest.raises(ValueError, match=r'the checkpoint of step 6 in .* cannot be read \(.*\); name another step'):
    checkpoint.restore_params(str(tmp_path), 'params', abstract)


def test_init_from_a_gguf_file_and_another_architecture_is_refused(tmp_path, tfds_dir):
  from foundation import train
  from foundation.models.gguf import load_gguf
  from test_gguf import TINY, TOKENS, write_tiny_gguf
  path = write_tiny_gguf(str(tmp_path / 'tiny.gguf'))
  config = _smoke_config(tfds_dir)
  config.data.tokenizer = f'gguf:{path}'
  config.model.update(vocab_size=len(TOKENS), num_layers=TINY['layers'], embed_dim=TINY['embed'],
                      num_heads=TINY['heads'], num_kv_heads=TINY['kv_heads'], mlp_dim=TINY['mlp'],
                      rope_base=TINY['rope_base'], norm_eps=TINY['eps'])
  config.init_from.source = path
  target, tree = train.prepare(config, str(tmp_path / 'run')).init_params
  assert target == ''
  jax.tree.map(np.testing.assert_array_equal, tree, load_gguf(path)[1])
  config.model.mlp_dim = 64
  with pytest.raises(train.ConfigError, match=f'--config.model.mlp_dim={TINY["mlp"]}'):
    train.prepare(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
