"""Where the test suite's time goes: JAX's tracing, lowering and XLA compile time, summed over every process the
suite starts (pytest workers and the runs they launch), by phase and by compiled function.

  python benchmarks/suite_profile.py                 # the whole suite (bash launch/test.sh)
  python benchmarks/suite_profile.py -- -k sharding  # arguments after -- go to pytest, as launch/test.sh's do

Each process gets a `sitecustomize` (through PYTHONPATH, which the tests pass on to their subprocesses) that listens
to jax.monitoring's duration events and appends its totals to one file at exit; processes killed by a test's
SIGKILL report nothing. For a cold-cache figure, as a fresh clone sees it, move `.jax_cache` aside first.
"""

import collections
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LISTENER = '''
import atexit, collections, os
_totals = collections.defaultdict(lambda: [0, 0.0])

def _listen(event, duration, **kwargs):
  total = _totals[(event, kwargs.get('fun_name', ''))]
  total[0] += 1
  total[1] += duration

def _write():
  with open({out!r}, 'a') as f:
    f.writelines(f'{{e}}\\t{{n}}\\t{{c}}\\t{{t:.4f}}\\n' for (e, n), (c, t) in _totals.items())

try:
  from jax._src import monitoring
except ImportError:
  pass
else:
  monitoring.register_event_duration_secs_listener(_listen)
  atexit.register(_write)
'''

# jax reports backend_compile_duration on a persistent-cache hit too, the read included: the compile phase is
# "compiled or loaded", and the cache reads are a part of it, not a phase of their own.
COMPILE = 'XLA compile or cache load'
PHASES = {'/jax/core/compile/jaxpr_trace_duration': 'tracing',
          '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lowering',
          '/jax/core/compile/backend_compile_duration': COMPILE,
          '/jax/compilation_cache/cache_retrieval_time_sec': '  of which cache reads'}


def summarize(path: str, top: int = 25) -> str:
  phase_total, phase_count = collections.Counter(), collections.Counter()
  by_function = collections.defaultdict(lambda: [0, 0.0])
  with open(path) as f:
    for line in f:
      event, name, count, seconds = line.rstrip('\n').split('\t')
      if event not in PHASES:
        continue
      phase_total[PHASES[event]] += float(seconds)
      phase_count[PHASES[event]] += int(count)
      if PHASES[event] in ('tracing', 'lowering', COMPILE):
        entry = by_function[re.sub(r'^jit\((.*)\)$', r'\1', name)]
        entry[0] += int(count) if PHASES[event] == COMPILE else 0
        entry[1] += float(seconds)
  lines = [f'{phase:26s} {phase_total[phase]:8.1f} s over {phase_count[phase]:6d} events' for phase in PHASES.values()]
  lines.append(f'\nfunctions by tracing + lowering + compile-or-load seconds (top {top}; compiles and loads '
               'counted):')
  for name, (compiles, seconds) in sorted(by_function.items(), key=lambda kv: -kv[1][1])[:top]:
    lines.append(f'{seconds:8.1f} s {compiles:6d}  {name}')
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  pytest_args = argv[argv.index('--') + 1:] if '--' in argv else []
  with tempfile.TemporaryDirectory() as directory:
    out = os.path.join(directory, 'events.tsv')
    with open(os.path.join(directory, 'sitecustomize.py'), 'w') as f:
      f.write(LISTENER.format(out=out))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [directory, os.environ.get('PYTHONPATH')])))
    status = subprocess.call(['bash', 'launch/test.sh', *pytest_args], cwd=REPO, env=env)
    print(summarize(out) if os.path.exists(out) else 'no process reported compile events')
  return status


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
