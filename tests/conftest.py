"""Test setup: 8 fake CPU devices (so every sharding path runs), a persistent compilation cache, this codebase's
offline datasets built once per session into a temporary TFDS data dir, and the slowest modules scheduled first."""

import fcntl
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(REPO, '.jax_cache')
# The tests check numbers, not speed, and compiling is most of a cold suite's time: LLVM compiles their programs at
# -O0, which takes a third less time, and XLA's CPU backend emits its elementwise fusions without the MLIR fusion
# emitters, which halves what is left (a smoke step: 5.1 s -> 2.0 s; every comparison is between runs made with these
# same flags, or against a numpy reference within a tolerance).
FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true',
                '--xla_cpu_use_fusion_emitters=false')


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for `devices` fake CPU devices, the suite's compile flags and any other flags the caller set."""
  theirs = [f for f in os.environ.get('XLA_FLAGS', '').split()
            if 'device_count' not in f and f.split('=')[0] not in {g.split('=')[0] for g in FAST_COMPILE}]
  return ' '.join([*theirs, *FAST_COMPILE, f'--xla_force_host_platform_device_count={devices}'])


def subprocess_env(devices: int = 8, **extra: str) -> dict:
  """The environment of a run the test starts as a subprocess: `devices` fake CPU devices on the suite's compile
  flags and compilation cache."""
  return dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1', **extra)


os.environ['XLA_FLAGS'] = xla_flags(8)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# MFU's denominator: measuring the CPU's matmul peak takes ~5 s in every run, and a loaded machine (a test suite)
# never caches it. The tests compare losses, not MFU, so they give it a fixed value (subprocesses inherit it).
os.environ.setdefault('FOUNDATION_CPU_PEAK_FLOPS', '2e11')

from foundation import host  # noqa: E402

host.keep_freed_memory()  # as foundation.main does: XLA's CPU buffers reuse warm pages (foundation/host.py)

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update('jax_compilation_cache_dir', CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """A TFDS data dir holding every dataset of foundation/data/prepare.py's table, built from installed packages
  once per test session: the first pytest-xdist worker builds it, under a lock, for all of them."""
  from foundation.data.prepare import FOUNDATION_BUILDERS
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # the session's directory, shared by its workers
  data_dir = root / 'tfds'
  with open(root / 'tfds.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (data_dir / 'complete').exists():
      # One process per dataset, all at once: every worker waits for this lock, and one process building the five
      # in turn takes 37 s on 2 cores (Fashion-MNIST alone 18 s).
      command = lambda name: [sys.executable, '-m', 'foundation.data.prepare', name, f'--data_dir={data_dir}']
      builds = {name: subprocess.Popen(command(name), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True) for name in FOUNDATION_BUILDERS}
      try:
        for name, build in builds.items():
          output, _ = build.communicate(timeout=300)
          assert build.returncode == 0, f'building {name} failed:\n{output[-3000:]}'
      finally:  # one failed or timed out: the others do not outlive the session
        for build in builds.values():
          build.kill()
      (data_dir / 'complete').touch()
  return str(data_dir)


# launch/test.sh runs one pytest-xdist worker more than there are cores, each taking whole files (module fixtures
# such as test_train's reference runs are computed once). A long file handed out last would run alone at the end, so
# the end-to-end files go first; the rest keep their order.
SLOW_FIRST = ('test_train.py', 'test_configs.py', 'test_config_variants.py', 'test_tasks_vision.py', 'test_sweep.py',
              'test_loop.py')


def pytest_collection_modifyitems(items):
  rank = lambda item: SLOW_FIRST.index(item.path.name) if item.path.name in SLOW_FIRST else len(SLOW_FIRST)
  items.sort(key=rank)  # stable: tests keep their order within a file
