"""The host machine: its CPU's features (read without importing jax), and the process's memory allocator, tuned
once at start-up for XLA's CPU runtime.

XLA on CPU allocates each execution's temporary and output buffers with malloc and frees them when it ends. glibc
serves blocks of more than 128 KiB with a fresh mmap and returns them with munmap, so every training step touches
new pages and pays a page fault for each 4 KiB it writes: 1.6 M faults in a 40-step run of the `:baby` LM on this
2-core machine, a third of its step time. So: no mmap for blocks, no trimming of the heap's free top, and one arena
(a thread's own arena is capped at 64 MiB, and larger blocks fall back to mmap again). Later steps then reuse warm
pages: 12x fewer faults, steps 1.3-1.6x faster on CPU (benchmarks/README.md). On GPU or TPU hosts the host
allocator is off the hot path, and keeping freed memory would only hold host RAM that the input pipeline needs, so
it is applied only where JAX will compute on the CPU.

The cost: memory freed by the process is kept for its reuse instead of going back to the OS (as with jemalloc or
tcmalloc). Set FOUNDATION_DEFAULT_MALLOC=1 to leave glibc's defaults alone.
"""

import ctypes
import ctypes.util
import functools
import importlib.util
import os
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's malloc.h
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def computes_on_cpu() -> bool:
  """Whether JAX will run on the CPU, decided before jax is imported (importing it would start its allocators):
  JAX_PLATFORMS says so, or no accelerator (TPU or NVIDIA device node, or JAX's TPU/CUDA plugin) is present."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  accelerator_nodes = ('/dev/accel0', '/dev/vfio/0', '/dev/nvidia0', '/dev/nvidiactl')
  if any(os.path.exists(node) for node in accelerator_nodes):
    return False
  return not any(importlib.util.find_spec(name) for name in ('libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin'))


def keep_freed_memory() -> bool:
  """Makes glibc malloc reuse freed memory rather than unmap it; True if applied (glibc and CPU only, else a no-op)."""
  if (os.environ.get('FOUNDATION_DEFAULT_MALLOC') == '1' or platform.libc_ver()[0] != 'glibc'
      or not computes_on_cpu()):
    return False
  libc = ctypes.CDLL(ctypes.util.find_library('c'))
  # mallopt returns 1 on success. The trim threshold is an int: 1 GiB of free heap top is kept at most.
  return all(libc.mallopt(param, value) == 1
             for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_ARENA_MAX, 1)))


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
  """The first processor's fields in /proc/cpuinfo (Linux); empty where that is unreadable."""
  fields = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if not line.strip():
          break
        key, _, value = line.partition(':')
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  return fields


def cpu_flags() -> frozenset[str]:
  """The CPU's feature flags from /proc/cpuinfo (Linux); empty where that is unreadable."""
  return frozenset(_cpuinfo().get('flags', '').split())


def slow_bf16_matmuls() -> bool:
  """Whether this CPU is known to lack bf16 dot-product instructions (AVX512_BF16, AMX): XLA's own bf16 dot then
  runs at 0.6x float32's speed (a Zen 1 EPYC, benchmarks/README.md), so the transformer widens bf16-rounded operands
  to float32 before multiplying (models/transformer.py, low_precision_dot). False where the flags are unknown."""
  flags = cpu_flags()
  return bool(flags) and not flags & {'avx512_bf16', 'amx_bf16'}


def cpu_description() -> str:
  """The host CPU in a few words, for the start of a run's log, so that a timing can be traced to its machine (a VM
  may wake up on another host): model name, family, and its widest vector / bf16 instructions."""
  info, flags = _cpuinfo(), cpu_flags()
  widest = next((name for name in ('amx_bf16', 'avx512_bf16', 'avx512f', 'avx2') if name in flags), 'no AVX2')
  model = info.get('model name') or platform.processor() or 'unknown CPU'
  return f'{model}, family {info.get("cpu family", "?")}, {widest}'
