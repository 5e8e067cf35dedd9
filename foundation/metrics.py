"""Where numbers go: metrics.jsonl + TensorBoard, a live progress line, and throughput / MFU.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step; on resume the lines past the
restored step are dropped, because the resumed run recomputes exactly those steps.
"""

import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets, matched against `device.device_kind`.
PEAK_FLOPS_BF16 = (
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),   # v5e reports itself as "TPU v5 lite"
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v6 lite', 918e12),   # v6e (Trillium)
    ('TPU v6e', 918e12),
    ('A100', 312e12),
    ('H100', 989e12),
    ('H200', 989e12),
)


def measure_cpu_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
  """Best-of-n FLOP/s of a jitted f32 matmul on the default device: the CPU's practical peak."""
  x = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def cpu_peak_flops(cache_path: str = os.path.expanduser('~/.cache/foundation/cpu_peak_flops.json')) -> float:
  """Measured once per machine (a second or two) and cached; delete the file to measure again."""
  key = f'{os.cpu_count()}cpus'
  try:
    with open(cache_path) as f:
      return float(json.load(f)[key])
  except (OSError, KeyError, ValueError):
    pass
  flops = measure_cpu_matmul_flops()
  try:
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    with open(cache_path, 'w') as f:
      json.dump({key: flops}, f)
  except OSError:
    pass
  return flops


def peak_flops(devices: Sequence[jax.Device]) -> float | None:
  """Peak FLOP/s of all `devices` together; None where unknown (MFU is then not reported)."""
  kind = devices[0].device_kind
  if devices[0].platform == 'cpu':
    # Fake CPU devices share the same cores, so the machine's peak is the peak of all of them together.
    return cpu_peak_flops()
  for name, flops in PEAK_FLOPS_BF16:
    if name.lower() in kind.lower():
      return flops * len(devices)
  return None


class MetricWriter:
  """metrics.jsonl and TensorBoard events in the workdir (process 0 only)."""

  def __init__(self, workdir: str, *, enabled: bool, resume_step: int | None):
    self._enabled = enabled
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not enabled:
      return
    if resume_step is not None and os.path.exists(self._path):
      with open(self._path) as f:
        kept = [line for line in f if json.loads(line)['step'] <= resume_step]
      with open(self._path, 'w') as f:
        f.writelines(kept)
    elif os.path.exists(self._path):
      os.remove(self._path)  # no checkpoint: the run starts over, and so do its metrics
    from tensorboardX import SummaryWriter  # imported late: only the writing process needs it
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self._enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and not isinstance(v, str)}
    with open(self._path, 'a') as f:
      f.write(json.dumps({'step': int(step), **scalars}) + '\n')
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Progress:
  """One live line: step, loss, throughput, MFU, ETA. Rewritten in place on a terminal, a line per log otherwise."""

  def __init__(self, total_steps: int, *, enabled: bool):
    self._total = total_steps
    self._enabled = enabled
    self._tty = sys.stdout.isatty()

  def update(self, step: int, metrics: dict[str, float], seconds_per_step: float) -> None:
    if not self._enabled:
      return
    parts = [f'step {step}/{self._total}']
    for key, label, fmt in (('train/loss', 'loss', '.4f'), ('perf/tokens_per_sec', 'tok/s', ',.0f'),
                            ('perf/examples_per_sec', 'ex/s', ',.0f'), ('perf/mfu', 'MFU', '.1%')):
      if key in metrics:
        parts.append(f'{label} {metrics[key]:{fmt}}')
    eta = (self._total - step) * seconds_per_step
    parts.append(f'ETA {int(eta // 60)}m{int(eta % 60):02d}s')
    line = ' | '.join(parts)
    print(('\r' + line + '\033[K') if self._tty else line, end='' if self._tty else '\n', flush=True)

  def message(self, text: str) -> None:
    if self._enabled:
      print(('\n' if self._tty else '') + text, flush=True)
