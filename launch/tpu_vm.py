r"""Runs a config on a Cloud TPU VM, one host or a pod slice, through the gcloud CLI.

  python launch/tpu_vm.py create --name=lm --zone=us-west4-a --accelerator=v5litepod-16 [--spot | --reserved]
      [--valid_until=24h] [--project=P] [--direct]
  python launch/tpu_vm.py run --name=lm --zone=us-west4-a configs/lm/shakespeare.py:large gs://my-bucket/runs/lm \
      --config.data.data_dir=gs://my-bucket/tensorflow_datasets [--commit=HEAD] [--bucket=my-bucket]
  python launch/tpu_vm.py status|logs|stop|delete --name=lm --zone=us-west4-a
  python launch/tpu_vm.py recover --name=lm --zone=us-west4-a    # after a preemption: re-create, resume the run

create   asks for the slice through queued resources (spot, reserved or on-demand; --valid_until gives up on a
         request not granted in time), or directly with --direct, with the runtime image of the accelerator's
         generation (v4, v5e, v5p, v6e); it waits until the slice is ready.
run      stops any earlier run and frees the TPU, ships the code at a commit (git archive: no .venv, .git or
         workdirs), sets up every worker (a Python 3.11 venv by uv outside the code directory, the pinned
         requirements, jax[tpu] at the jax version that commit pins, the datasets), then starts the run detached
         on every worker (it survives a dropped connection), each writing ~/foundation-logs/run.log and, when it
         ends, its exit status. Every worker runs the same command; JAX joins them into one mesh
         (foundation/sharding.py). The workdir must be shared: a gs:// URL (orbax writes checkpoints there
         itself, the rest goes through gcsfs), a path on a gcsfuse mount of --bucket (mounted on every worker,
         with --rename-dir-limit so orbax can finalise checkpoints by renaming) or a Filestore share; a relative
         path is refused.
status   the slice's state and, per worker, whether the run is alive or how it ended.
logs     the last lines of every worker's log, naming the workers whose run failed (--lines=N).
stop     SIGTERM to every worker's run: it saves a checkpoint at the next step and exits.
delete   the slice (and its queued resource).
recover  after a preemption (or any loss of the slice): deletes what is left, creates the slice again as it was
         created, and reruns the last `run`, which resumes from the workdir's latest checkpoint.

What create and run were given is kept in ~/.config/foundation/tpu/NAME.json ($FOUNDATION_TPU_STATE overrides the
directory), which recover reads. Overrides reach the workers exactly as typed: each argument is quoted for the
remote shell once.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The TPU VM image of each generation (Cloud TPU docs, "TPU software versions").
RUNTIMES = (('v4', 'tpu-ubuntu2204-base'), ('v5litepod', 'v2-alpha-tpuv5-lite'), ('v5e', 'v2-alpha-tpuv5-lite'),
            ('v5p', 'v2-alpha-tpuv5'), ('v6e', 'v2-alpha-tpuv6e'))
CODE, VENV, LOGS = '~/foundation', '~/foundation-venv', '~/foundation-logs'
PYTHON = '3.11'


def runtime_version(accelerator: str) -> str:
  for prefix, runtime in RUNTIMES:
    if re.fullmatch(rf'{prefix}-\d+', accelerator):
      return runtime
  raise SystemExit(f'error: --accelerator={accelerator!r}: expected v4-N, v5litepod-N (v5e), v5p-N or v6e-N.')


def _state_path(name: str) -> str:
  directory = os.environ.get('FOUNDATION_TPU_STATE', os.path.expanduser('~/.config/foundation/tpu'))
  return os.path.join(directory, f'{name}.json')


def _load_state(name: str) -> dict:
  try:
    with open(_state_path(name)) as f:
      return json.load(f)
  except FileNotFoundError:
    return {}


def _save_state(name: str, **fields) -> None:
  state = {**_load_state(name), **fields}
  os.makedirs(os.path.dirname(_state_path(name)), exist_ok=True)
  with open(_state_path(name), 'w') as f:
    json.dump(state, f, indent=1)


class Gcloud:
  """The gcloud commands this launcher uses, for one slice."""

  def __init__(self, name: str, zone: str, project: str | None):
    self.name, self.zone, self.project = name, zone, project
    self.common = [f'--zone={zone}'] + ([f'--project={project}'] if project else [])

  def __call__(self, *args: str, capture: bool = False, check: bool = True) -> str:
    result = subprocess.run(['gcloud', *args, *self.common], text=True, check=False,
                            stdout=subprocess.PIPE if capture else None)
    if check and result.returncode:
      raise SystemExit(f'error: gcloud {" ".join(args[:4])} ... failed with exit status {result.returncode}.')
    return result.stdout or ''

  def ssh(self, command: str, worker: str = 'all', capture: bool = False, check: bool = True) -> str:
    return self('compute', 'tpus', 'tpu-vm', 'ssh', self.name, f'--worker={worker}', f'--command={command}',
                capture=capture, check=check)

  def queued_state(self) -> str:
    out = self('compute', 'tpus', 'queued-resources', 'describe', self.name, '--format=value(state.state)',
               capture=True, check=False)
    return out.strip()

  def num_workers(self) -> int:
    node = json.loads(self('compute', 'tpus', 'tpu-vm', 'describe', self.name, '--format=json', capture=True))
    return len(node.get('networkEndpoints', [])) or 1


def create(g: Gcloud, args) -> None:
  runtime = runtime_version(args.accelerator)
  if args.direct:
    g('compute', 'tpus', 'tpu-vm', 'create', g.name, f'--accelerator-type={args.accelerator}',
      f'--version={runtime}', *(['--spot'] if args.spot else []), *(['--reserved'] if args.reserved else []))
  else:
    extra = (['--spot'] if args.spot else []) + (['--reserved'] if args.reserved else []) + (
        [f'--valid-until-duration={args.valid_until}'] if args.valid_until else [])
    g('compute', 'tpus', 'queued-resources', 'create', g.name, f'--node-id={g.name}',
      f'--accelerator-type={args.accelerator}', f'--runtime-version={runtime}', *extra)
    _wait_active(g, args.poll_seconds)
  _save_state(g.name, zone=g.zone, project=g.project, create=dict(
      accelerator=args.accelerator, spot=args.spot, reserved=args.reserved, valid_until=args.valid_until,
      direct=args.direct))


def _wait_active(g: Gcloud, poll_seconds: float, failures_allowed: int = 5) -> None:
  failures = 0
  while True:
    state = g.queued_state()
    if state == 'ACTIVE':
      return
    failures = failures + 1 if not state else 0  # describe failed: a deleted resource, another project, expired auth
    if failures > failures_allowed:
      raise SystemExit(f'error: `gcloud compute tpus queued-resources describe {g.name}` failed {failures} times in a '
                       'row; check the name, --project and `gcloud auth login`.')
    if state in ('FAILED', 'SUSPENDED'):
      raise SystemExit(f'error: the queued resource {g.name} is {state}; `delete`, then `create` again (or '
                       '`recover`).')
    print(f'[tpu_vm] {g.name}: {state or "requested"}; waiting', flush=True)
    time.sleep(poll_seconds)


def setup_command(jax_version: str) -> str:
  """Run on every worker: Python 3.11 by uv (the TPU images ship 3.10), a venv outside the code directory so a
  new commit keeps it, the pinned requirements (launch/setup.sh), gcsfs for gs:// workdirs and jax[tpu] at the
  pinned version."""
  return ' && '.join([
      'export PATH="$HOME/.local/bin:$PATH"',
      '(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)',
      f'(test -x {VENV}/bin/python || (uv python install {PYTHON} && uv venv --seed --python {PYTHON} {VENV}))',
      f'cd {CODE}', 'bash launch/setup.sh',
      f'.venv/bin/python -m pip install --quiet -r requirements-gcs.txt "jax[tpu]=={jax_version}"',
  ])


# A run is `$HOME/foundation/.venv/bin/python -m foundation.main ...`: the pattern matches that process only, not
# the shell that runs a pkill or pgrep with it (the brackets), nor other users' or directories' runs.
PYTHON_BIN = '$HOME/foundation/.venv/bin/python'
RUN_PATTERN = '"$HOME/foundation/.venv/bin/[p]ython -m foundation.main"'


def stop_command(signal: str = 'TERM') -> str:
  """Run on every worker before a start: stop an earlier run (or a crashed one's orphans) and anything else holding
  the TPU, which would make the next run fail to start."""
  return (f'(pkill -{signal} -f {RUN_PATTERN}; for _ in $(seq 120); do pgrep -f {RUN_PATTERN} >/dev/null || break; '
          f'sleep 1; done; pkill -KILL -f {RUN_PATTERN}; sudo -n fuser -k -9 /dev/accel* /dev/vfio/[0-9]* 2>/dev/null; '
          'true)')


def start_command(argv: list[str], bucket: str | None) -> str:
  """Run on every worker: mount the bucket, start the run detached (it outlives the ssh session), its output in
  ~/foundation-logs/run.log and its exit status in ~/foundation-logs/exit_status when it ends."""
  main = ' '.join([PYTHON_BIN, '-m', 'foundation.main', *(shlex.quote(a) for a in argv)])
  detached = f'cd {CODE} && {main}; echo $? > {LOGS}/exit_status'
  steps = [f'mkdir -p {LOGS}', f'rm -f {LOGS}/exit_status']
  if bucket:
    # Mounted by an earlier run, the directory is the user's FUSE mount, which even root may not chown: test first;
    # another bucket mounted there is unmounted first.
    quoted = shlex.quote(bucket)
    steps.append(f'([ "$(findmnt -no SOURCE /mnt/bucket 2>/dev/null)" = {quoted} ] || ('
                 '{ ! mountpoint -q /mnt/bucket || fusermount -u /mnt/bucket; } && sudo mkdir -p /mnt/bucket && '
                 f'sudo chown "$USER" /mnt/bucket && gcsfuse --implicit-dirs --rename-dir-limit=200000 {quoted} '
                 '/mnt/bucket))')
  steps.append(f'{{ setsid nohup bash -c {shlex.quote(detached)} > {LOGS}/run.log 2>&1 < /dev/null & }}')
  return ' && '.join(steps)


def ship(g: Gcloud, sha: str) -> None:
  """The code at commit `sha` (a git archive: tracked files only) unpacked fresh in ~/foundation on every worker."""
  with tempfile.TemporaryDirectory() as tmp:
    archive = os.path.join(tmp, 'foundation.tar.gz')
    subprocess.run(['git', '-C', REPO, 'archive', '--format=tar.gz', f'--output={archive}', sha], check=True)
    g('compute', 'tpus', 'tpu-vm', 'scp', archive, f'{g.name}:foundation.tar.gz', '--worker=all')
  g.ssh(f'rm -rf {CODE} && mkdir -p {CODE} && tar -xzf ~/foundation.tar.gz -C {CODE} && '
        f'echo {sha} > {CODE}/COMMIT && ln -sfn {VENV} {CODE}/.venv')


def run(g: Gcloud, args, argv: list[str]) -> None:
  git = lambda *a: subprocess.run(['git', '-C', REPO, *a], capture_output=True, text=True, check=True).stdout
  sha = git('rev-parse', args.commit).strip()
  # The jax that commit pins (a recover ships the recorded commit, whatever this checkout pins today).
  jax_version = re.search(r'^jax==(\S+)', git('show', f'{sha}:requirements.txt'), re.MULTILINE).group(1)
  g.ssh(stop_command())  # before its code and packages are replaced under it: its last save runs on its own code
  ship(g, sha)
  g.ssh(setup_command(jax_version))
  g.ssh(start_command(argv, args.bucket))
  _save_state(g.name, zone=g.zone, project=g.project,
              run=dict(argv=argv, commit=sha, bucket=args.bucket))
  print(f'[tpu_vm] started on every worker of {g.name} at {sha[:10]}; `logs` and `status` follow it.')


def worker_report(g: Gcloud, worker: int, lines: int) -> tuple[str, str]:
  """(state, log tail) of one worker: running, finished, failed (exit status N) or not started."""
  out = g.ssh(f'if pgrep -f {RUN_PATTERN} >/dev/null; then echo STATE running; '
              f'elif [ -f {LOGS}/exit_status ]; then echo STATE exit $(cat {LOGS}/exit_status); '
              f'else echo STATE none; fi; tail -n {lines} {LOGS}/run.log 2>/dev/null', worker=str(worker),
              capture=True, check=False)
  first, _, tail = out.partition('\n')
  words = first.split()
  if words[1:2] == ['running']:
    state = 'running'
  elif words[1:2] == ['exit']:
    state = 'finished' if words[2:3] == ['0'] else f'failed (exit status {" ".join(words[2:]) or "?"})'
  else:
    state = 'not started'
  return state, tail


def logs(g: Gcloud, lines: int) -> int:
  failed = []
  for worker in range(g.num_workers()):
    state, tail = worker_report(g, worker, lines)
    print(f'===== worker {worker}: {state}\n{tail}', flush=True)
    if state.startswith('failed'):
      failed.append(worker)
  if failed:
    print(f'[tpu_vm] failed: worker(s) {failed}', file=sys.stderr)
  return 1 if failed else 0


def status(g: Gcloud) -> None:
  print(f'{g.name}: {g.queued_state() or "(no queued resource)"}')
  for worker in range(g.num_workers()):
    print(f'worker {worker}: {worker_report(g, worker, 0)[0]}')


def delete(g: Gcloud, direct: bool, check: bool = True) -> None:
  if direct:
    g('compute', 'tpus', 'tpu-vm', 'delete', g.name, '--quiet', check=check)
  else:
    g('compute', 'tpus', 'queued-resources', 'delete', g.name, '--force', '--quiet', check=check)


def recover(g: Gcloud, args) -> None:
  state = _load_state(g.name)
  if 'create' not in state or 'run' not in state:
    raise SystemExit(f'error: {_state_path(g.name)} does not record a create and a run of {g.name}; use create '
                     'and run.')
  created, ran = state['create'], state['run']
  delete(g, created['direct'], check=False)  # gone already when an earlier recover failed after deleting it
  create(g, argparse.Namespace(**created, poll_seconds=args.poll_seconds))
  run(g, argparse.Namespace(commit=ran['commit'], bucket=ran['bucket']), ran['argv'])


def parse(argv: list[str]):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('command', choices=('create', 'run', 'status', 'logs', 'stop', 'delete', 'recover'))
  parser.add_argument('--name', required=True)
  parser.add_argument('--zone', required=True)
  parser.add_argument('--project')
  parser.add_argument('--accelerator', help='create: v4-N, v5litepod-N, v5p-N or v6e-N')
  parser.add_argument('--spot', action='store_true')
  parser.add_argument('--reserved', action='store_true')
  parser.add_argument('--valid_until', help='create: give up on a queued request not granted within this (e.g. 6h)')
  parser.add_argument('--direct', action='store_true', help='create without queued resources')
  parser.add_argument('--commit', default='HEAD', help='run: the commit to ship')
  parser.add_argument('--bucket', help='run: a GCS bucket to mount at /mnt/bucket on every worker (gcsfuse)')
  parser.add_argument('--lines', type=int, default=20, help='logs: lines per worker')
  parser.add_argument('--poll_seconds', type=float, default=30.0)
  args, rest = parser.parse_known_args(argv)
  if args.command == 'run':
    if len(rest) < 2 or rest[0].startswith('-') or rest[1].startswith('-'):
      parser.error('run needs CONFIG[:variant] WORKDIR, then --config.field=value overrides.')
    if any(not a.startswith('--config.') for a in rest[2:]):
      parser.error(f'run passes on --config.field=value overrides only; got {rest[2:]}.')
    workdir = rest[1]
    if not (workdir.startswith('gs://') or os.path.isabs(workdir)):
      parser.error(f'WORKDIR {workdir!r}: give a gs:// URL or an absolute path such as /mnt/bucket/runs/NAME (with '
                   '--bucket); a relative one lands in ~/foundation, which the next run replaces.')
    if (workdir == '/mnt/bucket' or workdir.startswith('/mnt/bucket/')) and not args.bucket:
      parser.error(f'WORKDIR {workdir!r} is on /mnt/bucket: name its bucket with --bucket, so that `recover` on new '
                   'workers mounts it again.')
  elif rest:
    parser.error(f'unexpected arguments {rest}.')
  if args.command == 'create' and not args.accelerator:
    parser.error('create needs --accelerator (e.g. v5litepod-16).')
  if args.spot and args.reserved:
    parser.error('--spot and --reserved exclude each other.')
  return args, rest


def main(argv: list[str]) -> int:
  args, rest = parse(argv)
  g = Gcloud(args.name, args.zone, args.project or _load_state(args.name).get('project'))
  if args.command == 'create':
    create(g, args)
  elif args.command == 'run':
    run(g, args, [f'--config={rest[0]}', f'--workdir={rest[1]}', *rest[2:]])
  elif args.command == 'status':
    status(g)
  elif args.command == 'logs':
    return logs(g, args.lines)
  elif args.command == 'stop':
    g.ssh(f'pkill -TERM -f {RUN_PATTERN} || true')
  elif args.command == 'delete':
    delete(g, bool(_load_state(g.name).get('create', {}).get('direct')))
  elif args.command == 'recover':
    recover(g, args)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
