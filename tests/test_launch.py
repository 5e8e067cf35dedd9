"""The launchers. launch/gpu.sh's choice of CUDA build, and launch/local.sh's hand-over to it, with a fake
`nvidia-smi`. launch/tpu_vm.py against a fake `gcloud` on PATH: the commands it issues (checked against gcloud's
documented forms), and a run on a fake two-worker slice, on this machine: create -> run (one process per worker,
the two forming one mesh) -> logs -> a preemption (both killed with SIGKILL mid-run) -> recover, whose resumed run
logs the losses of an uninterrupted one.

The fake records every call. `ssh` runs the remote command in each worker's home directory under bash, as the real
one does, except the set-up (uv, the requirements, jax[tpu]: network installs), which is recorded only: the workers'
venv is this repository's. What JAX reads from the metadata server on a real slice (the coordinator, the number of
workers, this worker's index) the fake passes in the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), with 4 CPU devices per worker: JAX's Cloud TPU detection itself needs TPU chips on the PCI bus.
"""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import types

import pytest

from foundation.config_base import load_module
from conftest import REPO, subprocess_env, xla_flags
from test_train import logged

with open(os.path.join(REPO, 'requirements.txt')) as _f:
  JAX_VERSION = [line.split('==')[1].strip() for line in _f if line.startswith('jax==')][0]

WORKERS = 2  # of the fake slice: two processes on this machine
FAKE_GCLOUD = textwrap.dedent(f'''\
    #!{sys.executable}
    import json, os, shutil, socket, subprocess, sys
    root = os.environ['FAKE_GCLOUD_ROOT']
    args = sys.argv[1:]
    with open(os.path.join(root, 'calls.jsonl'), 'a') as f:
      f.write(json.dumps(args) + '\\n')
    flags = dict(a[2:].split('=', 1) for a in args if a.startswith('--') and '=' in a)
    state = os.path.join(root, 'queued_state')
    workers = [os.path.join(root, f'worker_{{i}}') for i in range(int(os.environ['FAKE_WORKERS']))]
    if args[:4] == ['compute', 'tpus', 'queued-resources', 'create']:
      open(state, 'w').write('ACTIVE')
    elif args[:4] == ['compute', 'tpus', 'queued-resources', 'describe']:
      print(open(state).read() if os.path.exists(state) else '')
    elif args[:4] == ['compute', 'tpus', 'queued-resources', 'delete']:
      if os.path.exists(state):
        os.remove(state)
    elif args[:4] == ['compute', 'tpus', 'tpu-vm', 'describe']:
      print(json.dumps({{'networkEndpoints': [{{}} for _ in workers]}}))
    elif args[:4] == ['compute', 'tpus', 'tpu-vm', 'scp']:
      for home in workers:
        shutil.copy(args[4], os.path.join(home, args[5].split(':', 1)[1]))
    elif args[:4] == ['compute', 'tpus', 'tpu-vm', 'ssh']:
      chosen = range(len(workers)) if flags['worker'] == 'all' else [int(flags['worker'])]
      if 'uv venv' in flags['command']:
        sys.exit(0)  # the set-up installs from the network: recorded, not run
      with socket.socket() as s:  # a free port for this start's coordinator
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
      for i in chosen:  # the slice as the metadata server describes it, to each worker
        env = dict(os.environ, HOME=workers[i], JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{{port}}',
                   JAX_NUM_PROCESSES=str(len(workers)), JAX_PROCESS_ID=str(i),
                   XLA_FLAGS=os.environ['FAKE_WORKER_XLA_FLAGS'])
        done = subprocess.run(['bash', '-c', flags['command']], cwd=workers[i], env=env)
        if done.returncode:
          sys.exit(done.returncode)
    ''')


@pytest.fixture
def fake_cloud(tmp_path, tfds_dir, monkeypatch):
  root = tmp_path / 'cloud'
  (root / 'bin').mkdir(parents=True)
  gcloud = root / 'bin' / 'gcloud'
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(0o755)
  for worker in range(WORKERS):
    home = root / f'worker_{worker}'
    home.mkdir()
    (home / 'foundation-venv').symlink_to(os.path.join(REPO, '.venv'))  # the venv the set-up would have built
  env = subprocess_env(PATH=f'{root / "bin"}:{os.environ["PATH"]}', FAKE_GCLOUD_ROOT=str(root),
                       FAKE_WORKERS=str(WORKERS), FAKE_WORKER_XLA_FLAGS=xla_flags(8 // WORKERS),
                       FOUNDATION_TPU_STATE=str(root / 'state'), TFDS_DATA_DIR=tfds_dir)
  return root, env


def launcher(env, *args, check=True):
  result = subprocess.run([sys.executable, os.path.join(REPO, 'launch', 'tpu_vm.py'), *args, '--name=lm',
                           '--zone=us-west4-a', '--poll_seconds=0'], env=env, capture_output=True, text=True,
                          timeout=300)
  if check and result.returncode:
    raise AssertionError(f'{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
  return result


def calls(root):
  with open(root / 'calls.jsonl') as f:
    return [json.loads(line) for line in f]


def wait_for(predicate, what, seconds=240):
  deadline = time.time() + seconds
  while not predicate():
    if time.time() > deadline:
      raise AssertionError(f'timed out waiting for {what}')
    time.sleep(0.2)


def test_create_issues_queued_resource_requests_of_the_documented_form(fake_cloud):
  root, env = fake_cloud
  launcher(env, 'create', '--accelerator=v5litepod-16', '--spot', '--valid_until=6h', '--project=p1')
  create, describe = calls(root)[:2]
  assert create == ['compute', 'tpus', 'queued-resources', 'create', 'lm', '--node-id=lm',
                    '--accelerator-type=v5litepod-16', '--runtime-version=v2-alpha-tpuv5-lite', '--spot',
                    '--valid-until-duration=6h', '--zone=us-west4-a', '--project=p1']
  assert describe[:5] == ['compute', 'tpus', 'queued-resources', 'describe', 'lm']
  launcher(env, 'delete')
  assert calls(root)[-1] == ['compute', 'tpus', 'queued-resources', 'delete', 'lm', '--force', '--quiet',
                             '--zone=us-west4-a', '--project=p1']
  for accelerator, runtime in [('v4-32', 'tpu-ubuntu2204-base'), ('v5p-8', 'v2-alpha-tpuv5'),
                               ('v6e-8', 'v2-alpha-tpuv6e')]:
    launcher(env, 'create', f'--accelerator={accelerator}', '--reserved', '--direct')
    assert calls(root)[-1] == ['compute', 'tpus', 'tpu-vm', 'create', 'lm', f'--accelerator-type={accelerator}',
                               f'--version={runtime}', '--reserved', '--zone=us-west4-a', '--project=p1']
  bad = launcher(env, 'create', '--accelerator=v3-8', check=False)
  assert bad.returncode and "expected v4-N, v5litepod-N (v5e), v5p-N or v6e-N" in bad.stderr


def test_run_logs_preemption_and_recover_resume_the_run_exactly(fake_cloud, tmp_path):
  root, env = fake_cloud
  workdir = str(tmp_path / 'run')
  # Parentheses, quotes and a space: the override must reach the worker's command line exactly as typed.
  override = '--config.optim.weight_decay_exclude=("norm", \'scale\', "embedding|final norm")'
  config = ['configs/lm/shakespeare.py:smoke', '--config.num_train_steps=30', '--config.checkpoint_every=2',
            '--config.eval_every=30']
  launcher(env, 'create', '--accelerator=v5litepod-8')
  launcher(env, 'run', config[0], workdir, *config[1:], override)
  made = calls(root)
  # A run still going is stopped before its code and packages are replaced under it.
  vm_calls = [c for c in made if c[:3] == ['compute', 'tpus', 'tpu-vm']]
  order = ['stop' if c[3] == 'ssh' and 'pkill' in c[6] else c[3] for c in vm_calls]
  assert order.index('stop') < order.index('scp'), order
  scp = [c for c in made if c[3] == 'scp'][0]
  assert scp[4].endswith('foundation.tar.gz') and scp[5:7] == ['lm:foundation.tar.gz', '--worker=all']
  setup = [c for c in made if c[3] == 'ssh' and 'uv venv' in c[6]][0]
  assert '--python 3.11' in setup[6] and f'"jax[tpu]=={JAX_VERSION}"' in setup[6]
  homes = [root / f'worker_{i}' for i in range(WORKERS)]
  head = subprocess.run(['git', '-C', REPO, 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()
  for home in homes:
    assert (home / 'foundation' / 'COMMIT').read_text().strip() == head
    assert not (home / 'foundation' / '.git').exists() and (home / 'foundation' / 'foundation' / 'train.py').exists()

  # The preemption: every worker SIGKILLed once a checkpoint exists, mid-run (14 more checkpoints to go: far more
  # than the poll).
  checkpoints = tmp_path / 'run' / 'checkpoints'
  statuses = [home / 'foundation-logs' / 'exit_status' for home in homes]
  wait_for(lambda: any(s.exists() for s in statuses)
           or checkpoints.is_dir() and any(d.isdigit() for d in os.listdir(checkpoints)), 'a checkpoint')
  assert not any(s.exists() for s in statuses), [(h / 'foundation-logs' / 'run.log').read_text()[-3000:] for h in homes]
  subprocess.run(['pkill', '-KILL', '-f', f'{root}/worker_[0-9]+/foundation/.venv/bin/python -m foundation.main'],
                 check=True)
  wait_for(lambda: all(s.exists() for s in statuses), 'the killed runs to end')
  logs = launcher(env, 'logs', check=False)
  assert logs.returncode == 1 and all(f'===== worker {i}: failed (exit status' in logs.stdout for i in range(WORKERS))
  assert f'failed: worker(s) {list(range(WORKERS))}' in logs.stderr
  killed_at = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())
  assert killed_at < 30

  before = len(calls(root))
  launcher(env, 'recover')
  again = [c[:4] for c in calls(root)[before:]]
  assert again[:2] == [['compute', 'tpus', 'queued-resources', 'delete'],
                       ['compute', 'tpus', 'queued-resources', 'create']]
  wait_for(lambda: all(s.exists() for s in statuses), 'the resumed run to finish')
  logs = launcher(env, 'logs')
  assert all(f'===== worker {i}: finished' in logs.stdout for i in range(WORKERS))
  run_log = (homes[0] / 'foundation-logs' / 'run.log').read_text()
  assert f'Resuming from the checkpoint at step {killed_at}' in run_log and '2 process(es)' in run_log, run_log[-3000:]
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['optim']['weight_decay_exclude'] == ['norm', 'scale', 'embedding|final norm']

  # The uninterrupted reference: the same two processes, started here, saving only at their end.
  reference = str(tmp_path / 'reference')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  outputs = [open(tmp_path / f'reference_{i}.log', 'w') for i in range(WORKERS)]
  procs = [subprocess.Popen([sys.executable, '-m', 'foundation.main', f'--config={config[0]}',
                             f'--workdir={reference}', *config[1:], '--config.checkpoint_every=30', override],
                            cwd=REPO, env=dict(env, XLA_FLAGS=xla_flags(8 // WORKERS), JAX_PROCESS_ID=str(i),
                                               JAX_NUM_PROCESSES=str(WORKERS),
                                               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}'),
                            stdout=log, stderr=subprocess.STDOUT) for i, log in enumerate(outputs)]
  try:
    for p, log in zip(procs, outputs):
      assert p.wait(timeout=240) == 0, open(log.name).read()[-3000:]
  finally:
    for p, log in zip(procs, outputs):
      p.kill()
      log.close()
  ours, theirs = logged(workdir), logged(reference)
  losses = lambda run: {s: m['train/loss'] for s, m in run.items() if 'train/loss' in m}
  assert losses(ours) == losses(theirs)
  assert sum('train/loss' in m for m in ours.values()) == 15


def test_run_and_recover_refuse_what_they_cannot_do(fake_cloud):
  root, env = fake_cloud
  result = launcher(env, 'run', 'configs/lm/shakespeare.py', 'wd', '--verbose', check=False)
  assert result.returncode == 2 and 'passes on --config.field=value overrides only' in result.stderr
  result = launcher(env, 'run', 'configs/lm/shakespeare.py', 'workdirs/lm', check=False)
  assert result.returncode == 2 and "WORKDIR 'workdirs/lm': give a gs:// URL or an absolute path" in result.stderr
  result = launcher(env, 'run', 'configs/lm/shakespeare.py', '/mnt/bucket/runs/lm', check=False)
  assert result.returncode == 2 and 'name its bucket with --bucket' in result.stderr
  result = launcher(env, 'recover', check=False)
  assert result.returncode and 'does not record a create and a run of lm' in result.stderr
  assert not os.path.exists(root / 'calls.jsonl')  # refused before any gcloud call


def test_waiting_for_a_queued_resource_gives_up_when_describe_keeps_failing(capsys):
  tpu_vm = load_module('launch/tpu_vm.py')
  states = iter(['WAITING_FOR_RESOURCES', '', '', 'PROVISIONING'] + [''] * 6)
  with pytest.raises(SystemExit, match='describe lm` failed 6 times in a row; check the name, --project'):
    tpu_vm._wait_active(types.SimpleNamespace(name='lm', queued_state=lambda: next(states)), 0)
  assert capsys.readouterr().out.count('PROVISIONING; waiting') == 1  # two failures, then a state: counted afresh


def test_the_run_command_quotes_every_argument_once():
  sys.path.insert(0, os.path.join(REPO, 'launch'))
  import tpu_vm  # pylint: disable=import-outside-toplevel
  argv = ['--config=c.py:smoke', '--workdir=/mnt/bucket/a b', '--config.x=("a", \'b\')']
  command = tpu_vm.start_command(argv, bucket=None)
  inner = shlex.split(command.split('bash -c ', 1)[1])[0]  # what the detached bash runs
  assert shlex.split(inner.split(' && ', 1)[1].split(';')[0]) == ['$HOME/foundation/.venv/bin/python', '-m',
                                                                  'foundation.main', *argv]


DRIVER_NOT_LOADED = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."


@pytest.mark.parametrize('banner, extra', [('CUDA Version: 12.4', 'cuda12'), ('CUDA Version: 13.0', 'cuda13'),
                                           ('CUDA Version: 11.8', None), ('', None), (None, None),
                                           (DRIVER_NOT_LOADED, None)])
def test_gpu_launcher_installs_the_cuda_build_the_driver_supports(tmp_path, banner, extra):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  if banner is not None:
    smi = bin_dir / 'nvidia-smi'
    smi.write_text(f'#!/bin/sh\necho "{banner}"\nexit 9\n' if banner == DRIVER_NOT_LOADED else
                   f'#!/bin/sh\necho "| NVIDIA-SMI 580.0   Driver Version: 580.0   {banner} |"\n')
    smi.chmod(0o755)
  env = dict(os.environ, PATH=f'{bin_dir}:/usr/bin:/bin', DRY_RUN='1')
  bad_extra = subprocess.run(['bash', os.path.join(REPO, 'launch', 'gpu.sh'), 'c.py', 'wd'],
                             env=dict(env, CUDA_EXTRA='cuda11'), capture_output=True, text=True, check=False)
  assert bad_extra.returncode == 2 and 'CUDA_EXTRA=cuda11; choose cuda12 or cuda13' in bad_extra.stderr
  override = "--config.optim.freeze=('layers_[01]/', 'a b')"
  result = subprocess.run(['bash', os.path.join(REPO, 'launch', 'gpu.sh'), 'configs/lm/shakespeare.py:large', 'wd',
                           override], env=env, capture_output=True, text=True, check=False)
  if extra is None:
    assert result.returncode == 2 and result.stderr.startswith('error: ') and not result.stdout, result.stderr
    return
  install, run = [shlex.split(line) for line in result.stdout.splitlines()]
  assert install == ['.venv/bin/python', '-m', 'pip', 'install', '--quiet', f'jax[{extra}]=={JAX_VERSION}']
  assert run == ['.venv/bin/python', '-m', 'foundation.main', '--config=configs/lm/shakespeare.py:large',
                 '--workdir=wd', override]
  if extra == 'cuda12':
    # One task per host in a SLURM step drives every GPU the host gives it (JAX alone would give it only the one
    # numbered by SLURM_LOCALID); a second task on the host is refused.
    slurm = dict(env, SLURM_LOCALID='0', CUDA_VISIBLE_DEVICES='3,5,6')
    result = subprocess.run(['bash', os.path.join(REPO, 'launch', 'gpu.sh'), 'c.py', 'wd'], env=slurm,
                            capture_output=True, text=True, check=False)
    assert shlex.split(result.stdout.splitlines()[1])[:3] == ['env', 'JAX_LOCAL_DEVICE_IDS=0,1,2', '.venv/bin/python']
    second = subprocess.run(['bash', os.path.join(REPO, 'launch', 'gpu.sh'), 'c.py', 'wd'],
                            env=dict(slurm, SLURM_LOCALID='1'), capture_output=True, text=True, check=False)
    assert second.returncode == 2 and 'srun --ntasks-per-node=1' in second.stderr, second.stderr
  # An override where the workdir goes is refused, not taken for a workdir.
  misplaced = subprocess.run(['bash', os.path.join(REPO, 'launch', 'gpu.sh'), 'configs/lm/shakespeare.py:large',
                              override], env=env, capture_output=True, text=True, check=False)
  assert misplaced.returncode == 2 and 'is in the place of CONFIG or WORKDIR' in misplaced.stderr
  # launch/local.sh hands a host with a driver to gpu.sh, its default workdir named after the config and variants.
  # (Run from a copy holding the two launchers alone: were the hand-over broken, no set-up or job could start.)
  copy = tmp_path / 'checkout'
  (copy / 'launch').mkdir(parents=True)
  for name in ('launch/local.sh', 'launch/gpu.sh', 'requirements.txt'):
    shutil.copy(os.path.join(REPO, name), copy / name)
  local = lambda *args: subprocess.run(['bash', copy / 'launch' / 'local.sh', *args], env=env,
                                       capture_output=True, text=True, check=False)
  handed = local('configs/lm/shakespeare.py:large,smoke')
  assert shlex.split(handed.stdout.splitlines()[1]) == [
      '.venv/bin/python', '-m', 'foundation.main', '--config=configs/lm/shakespeare.py:large,smoke',
      '--workdir=workdirs/shakespeare_large_smoke'], handed.stderr
  refused = local('configs/lm/shakespeare.py', override)
  assert refused.returncode == 2 and 'is in the place of CONFIG or WORKDIR' in refused.stderr and not refused.stdout


# ----- SkyPilot (launch/sky) ------------------------------------------------------------------------------------

# The keys SkyPilot 0.14.1's task schema allows (sky/utils/schemas.py: the task, one resources entry, job_recovery,
# accelerator_args). SkyPilot itself is not a dependency (about 40 packages); its own loader was run on these files
# by hand (README).
SKY_TASK_KEYS = {'name', 'workdir', 'event_callback', 'num_nodes', 'resources', 'file_mounts', 'service', 'pool',
                 'setup', 'run', 'envs', 'secrets', 'volumes', 'volume_mounts'}
SKY_RESOURCES_KEYS = {'cloud', 'region', 'zone', 'infra', 'cpus', 'memory', 'accelerators', 'instance_type',
                      'use_spot', 'job_recovery', 'volumes', 'disk_size', 'disk_tier', 'network_tier', 'ports',
                      'labels', 'accelerator_args', 'image_id', 'priority'}
SKY_RECOVERY_KEYS = {'strategy', 'max_restarts_on_errors', 'recover_on_exit_codes'}
SKY_ACCELERATOR_ARGS = {'runtime_version', 'tpu_name', 'tpu_vm', 'gcp_queued_resource'}


@pytest.mark.parametrize('kind', ['tpu', 'gpu'])
def test_skypilot_yaml_is_a_valid_task_that_runs_the_job_script(kind):
  import yaml
  with open(os.path.join(REPO, 'launch', 'sky', f'{kind}.yaml')) as f:
    task = yaml.safe_load(f)
  assert set(task) <= SKY_TASK_KEYS and set(task['resources']) <= SKY_RESOURCES_KEYS
  assert set(task['resources']['job_recovery']) <= SKY_RECOVERY_KEYS and task['resources']['use_spot'] is True
  assert set(task['resources'].get('accelerator_args', {})) <= SKY_ACCELERATOR_ARGS
  # BUCKET is null: SkyPilot refuses a launch that does not set it; the others have defaults.
  assert task['envs'] == {'CONFIG': task['envs']['CONFIG'], 'RUN': 'runs/lm', 'BUCKET': None, 'ARGS': ''}
  assert task['setup'] == f'bash launch/sky/job.sh setup {kind}' and task['run'] == f'bash launch/sky/job.sh run {kind}'
  assert ('tpu-' in task['resources']['accelerators']) == (kind == 'tpu')
  # The bucket is mounted by SkyPilot where job.sh writes the run (its --workdir=/mnt/bucket/$RUN).
  assert task['file_mounts'] == {'/mnt/bucket': {'source': 'gs://${BUCKET}', 'mode': 'MOUNT'}}
  config_path, _, variant = task['envs']['CONFIG'].partition(':')
  assert variant in load_module(os.path.join(REPO, config_path)).VARIANTS


def sky_job(*args, **env):
  result = subprocess.run(['bash', os.path.join(REPO, 'launch', 'sky', 'job.sh'), *args], capture_output=True,
                          text=True, env={'PATH': os.environ['PATH'], 'HOME': os.environ['HOME'], 'DRY_RUN': '1', **env})
  return result.returncode, [shlex.split(line) for line in result.stdout.splitlines()], result.stderr


def test_skypilot_job_script_runs_one_job_over_nodes_with_the_overrides_intact():
  """What each node runs: on GPU nodes the coordinator flags from SkyPilot's environment (the first node's IP, this
  node's rank), on a TPU slice foundation.main alone; ARGS split as the shell would, quotes and parentheses kept."""
  env = dict(RUN='runs/lm', CONFIG='configs/lm/shakespeare.py:large',
             ARGS='--config.optim.freeze="(\'layers_0/\', \'a b\')" --config.seed=3')
  override = "--config.optim.freeze=('layers_0/', 'a b')"
  status, lines, _ = sky_job('run', 'gpu', SKYPILOT_NUM_NODES='2', SKYPILOT_NODE_RANK='1',
                             SKYPILOT_NODE_IPS='10.0.0.7\n10.0.0.9', **env)
  assert status == 0 and lines == [['bash', 'launch/gpu.sh', 'configs/lm/shakespeare.py:large', '/mnt/bucket/runs/lm',
                                    override, '--config.seed=3', '--coordinator_address=10.0.0.7:8476',
                                    '--num_processes=2', '--process_id=1']]
  status, lines, _ = sky_job('run', 'tpu', SKYPILOT_NUM_NODES='1', **env)
  assert status == 0 and lines == [['.venv/bin/python', '-m', 'foundation.main', '--config=configs/lm/shakespeare.py:large',
                                    '--workdir=/mnt/bucket/runs/lm', override, '--config.seed=3']]
  status, lines, _ = sky_job('setup', 'tpu')
  assert status == 0 and lines[-1][-1].startswith('jax[tpu]==')
  status, _, error = sky_job('run', 'tpu', **{**env, 'RUN': ''})
  assert status != 0 and 'set RUN' in error
  # ARGS are words, not commands: a command substitution stays text, an unclosed quote is refused.
  status, lines, _ = sky_job('run', 'tpu', **{**env, 'ARGS': '--config.name=$(id) `id`'})
  assert status == 0 and lines[0][-2:] == ['--config.name=$(id)', '`id`']
  status, _, error = sky_job('run', 'tpu', **{**env, 'ARGS': "--config.name='x"})
  assert status != 0 and 'ARGS is not a list of shell words' in error
