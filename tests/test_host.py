"""The allocator tuning of foundation/host.py: freed blocks are reused instead of unmapped and faulted in again."""

import os
import platform
import subprocess
import sys

import pytest

from conftest import REPO

# Allocates, writes and frees a 64 MiB block 20 times (above the 32 MiB up to which glibc's dynamic mmap threshold
# adapts, like XLA's larger temporary buffers); prints the page faults that took.
_CHURN = '''
import resource, sys
import numpy as np
from foundation import host
if sys.argv[1] == 'tuned':
  assert host.keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
  np.ones(1 << 24, np.float32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


def _faults(mode: str) -> int:
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop('FOUNDATION_DEFAULT_MALLOC', None)
  out = subprocess.run([sys.executable, '-c', _CHURN, mode], env=env, capture_output=True, text=True, check=True,
                       timeout=60)
  return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='the tuning is for glibc malloc only')
def test_freed_blocks_are_reused_without_new_page_faults():
  default, tuned = _faults('default'), _faults('tuned')
  # glibc unmaps each block, so every round faults its pages in anew: at least one fault per 2 MiB even with
  # transparent huge pages (16384 per round with 4 KiB pages).
  assert default >= 20 * 32
  assert tuned < default / 5


def test_the_environment_variable_leaves_malloc_alone(monkeypatch):
  from foundation import host
  monkeypatch.setenv('FOUNDATION_DEFAULT_MALLOC', '1')
  assert not host.keep_freed_memory()


@pytest.mark.parametrize('platforms, applied', [('cpu', True), ('cuda', False), ('tpu', False), ('cuda,cpu', False)])
def test_memory_tuning_only_where_jax_computes_on_the_cpu(monkeypatch, platforms, applied):
  from foundation import host
  monkeypatch.delenv('FOUNDATION_DEFAULT_MALLOC', raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  assert host.computes_on_cpu() == applied
  if not applied:
    assert not host.keep_freed_memory()
