"""Where numbers go: metrics.jsonl + TensorBoard, a live progress line, and throughput / MFU.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step; on resume the lines past the
restored step are dropped, because the resumed run recomputes exactly those steps.
"""

import hashlib
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from foundation import files, host

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
    ('H100 PCIe', 756e12),     # matched before the SXM part's plain 'H100'
    ('H100 NVL', 835e12),
    ('H100', 989e12),
    ('H200', 989e12),
)


def measure_matmul_flops(devices: Sequence[jax.Device], dtype: str = 'float32', total_flops: float = 1.5e11) -> float:
  """FLOP/s of matmuls running on all `devices` at once, best of three: the machine's practical peak. The operands
  are `dtype` and the accumulation float32 (bfloat16 runs at twice float32's rate on CPUs with AVX-512 BF16).

  Each device multiplies its own square matrix, sized so the whole measurement is ~total_flops: long enough to
  span several CPU-quota periods of a container, where a 50 ms burst can overstate the sustained rate.
  """
  n = len(devices)
  size = max(256, int(round((total_flops / (2 * n)) ** (1 / 3) / 256)) * 256)
  mesh = jax.sharding.Mesh(np.asarray(devices), ('d',))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d'))
  x = jax.jit(lambda: jnp.ones((n, size, size), dtype), out_shardings=spec)()
  matmul = jax.jit(lambda a: jnp.einsum('nij,njk->nik', a, a, preferred_element_type=jnp.float32),
                   out_shardings=spec)
  matmul(x).block_until_ready()
  best = float('inf')
  for _ in range(3):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return n * 2 * size**3 / best


def cpu_peak_flops(devices: Sequence[jax.Device], dtype: str = 'float32',
                   cache_path: str = os.path.expanduser('~/.cache/foundation/cpu_peak_flops.json')) -> float:
  """The CPU's matmul peak for MFU, for matmuls with `dtype` operands: $FOUNDATION_CPU_PEAK_FLOPS if set, else
  measured once per machine, layout and dtype.

  Cached only when measured on a quiet machine, so a measurement taken under load does not understate MFU for good.
  """
  if os.environ.get('FOUNDATION_CPU_PEAK_FLOPS'):
    return float(os.environ['FOUNDATION_CPU_PEAK_FLOPS'])
  # A VM can move to another host between runs: the key names the CPU's features, not only its count.
  features = hashlib.sha256(' '.join(sorted(host.cpu_flags())).encode()).hexdigest()[:8]
  key = (f'{os.cpu_count()} cpus (flags {features}), {len(devices)} devices, {dtype}, '
         f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")}')
  try:
    with open(cache_path) as f:
      return float(json.load(f)[key])
  except (OSError, KeyError, ValueError):
    pass
  quiet = os.getloadavg()[0] < 0.5 * os.cpu_count()
  flops = measure_matmul_flops(devices, dtype)
  if quiet and jax.process_count() == 1:
    try:
      cached = {}
      if os.path.exists(cache_path):
        with open(cache_path) as f:
          cached = json.load(f)
      os.makedirs(os.path.dirname(cache_path), exist_ok=True)
      with open(cache_path, 'w') as f:
        json.dump({**cached, key: flops}, f, indent=1)
    except (OSError, ValueError):
      pass
  return flops


def peak_flops(devices: Sequence[jax.Device], matmul_dtype: str = 'float32') -> float | None:
  """Peak FLOP/s of all `devices` together; None where unknown (MFU is then not reported). On CPU, the measured
  peak of matmuls in `matmul_dtype` (what the model's matmuls run in); an accelerator's is its bf16 data-sheet peak,
  whatever the model computes in (the usual MFU convention)."""
  if devices[0].platform == 'cpu':
    # CPU devices (real or --xla_force_host_platform_device_count fakes) share the machine's cores.
    return cpu_peak_flops(jax.local_devices(), matmul_dtype)
  kind = devices[0].device_kind.lower()
  for name, flops in PEAK_FLOPS_BF16:
    if name.lower() in kind:
      return flops * len(devices)
  return None


# Power per device in watts, for the energy estimate: TPU v4's measured mean (Cloud TPU's v4 page: 90/170/192 W
# min/mean/max) and NVIDIA's board TDPs (SXM unless named). Google publishes no power figures for v5e, v5p or v6e:
# there, set config.energy.device_watts, or no energy is reported.
DEVICE_WATTS = (('TPU v4', 170.0), ('A100', 400.0), ('H100 PCIe', 350.0), ('H100 NVL', 400.0), ('H100', 700.0),
                ('H200', 700.0))
# CPU devices share the machine's cores: its power is the cores' share of the package TDP (an AMD EPYC 9654, this
# machine's Zen 4 family: 360 W over 96 cores).
CPU_WATTS_PER_CORE = 360.0 / 96


def device_watts(devices: Sequence[jax.Device], watts_per_device: float = 0.0) -> float:
  """The power of all `devices` together (W): `watts_per_device` if set, else the tables above; 0 if unknown."""
  if watts_per_device:
    return watts_per_device * len(devices)
  if devices[0].platform == 'cpu':
    return CPU_WATTS_PER_CORE * (os.cpu_count() or 1)
  kind = devices[0].device_kind.lower()
  return next((w * len(devices) for name, w in DEVICE_WATTS if name.lower() in kind), 0.0)


def footprint(devices: Sequence[jax.Device], seconds: float, model_flops: float, energy_cfg) -> dict[str, float]:
  """Model FLOPs, device-hours, and where the power is known the energy (kWh, times the data centre's PUE) and
  its emissions (kg CO2e at the grid's intensity) of `seconds` on `devices`."""
  hours = seconds / 3600
  out = {'compute/model_flops': model_flops, 'compute/device_hours': len(devices) * hours}
  watts = device_watts(devices, energy_cfg.device_watts)
  if watts:
    kwh = watts * hours / 1000 * energy_cfg.pue
    out |= {'compute/energy_kwh': kwh, 'compute/co2e_kg': kwh * energy_cfg.grid_gco2e_per_kwh / 1000}
  return out


def footprint_text(footprint: dict[str, float]) -> str:
  text = f'{footprint["compute/model_flops"]:.3g} model FLOPs, {footprint["compute/device_hours"]:,.3g} device-hours'
  if 'compute/energy_kwh' in footprint:
    text += f', ~{footprint["compute/energy_kwh"]:,.3g} kWh, ~{footprint["compute/co2e_kg"]:,.3g} kg CO2e'
  return text


def forward_flops(fn, *args) -> float:
  """FLOPs of one call of fn(*args) as XLA counts them (args may be ShapeDtypeStructs); lowers, runs nothing.

  For models without an analytic count (convolutions): training FLOPs ~ 3x this. XLA counts a loop's body once
  (a scanned layer stack: `scan_layers`), so a program with a loop is counted short, and a warning says so.
  """
  lowered = jax.jit(fn).lower(*args)  # the HLO before compiling: the same count
  if 'stablehlo.while' in lowered.as_text():
    print('WARNING: the model has a loop (scanned layers?), whose body XLA counts once: its FLOPs, MFU and '
          'footprint read low by about the loop\'s length; set scan_layers=False for a true count.', file=sys.stderr)
  return float(xla_cost(lowered).get('flops', 0.0))


def xla_cost(stage) -> dict | None:
  """XLA's cost analysis of a lowered or compiled program as one dict ('flops', 'bytes accessed', ...); None where
  the backend gives none (XLA's GPU compiler). Some jaxlib versions wrap it in a list of one dict per program."""
  cost = stage.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


class MetricWriter:
  """metrics.jsonl and TensorBoard events in the workdir (process 0 only).

  On resume, the records past the restored step are dropped (the resumed run recomputes exactly those steps), and
  so are the `best/...` values at that step (the evaluation of the selected step, which the resumed run writes
  again where it ends): the kept ones are rewritten atomically, so no metric repeats at a step in metrics.jsonl.
  TensorBoard's events past the restored step are purged (a rerun's `best/...` at that step is a second point
  there). Each record is then appended as one whole line.
  """

  def __init__(self, workdir: str, *, enabled: bool, resume_step: int | None, warn=print):
    self._enabled = enabled
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not enabled:
      return
    if resume_step is not None and files.exists(self._path):
      kept = []
      for r in files.read_records(self._path, warn=warn):
        if r['step'] == resume_step:
          r = {k: v for k, v in r.items() if not k.startswith('best/')}
        if r['step'] < resume_step or (r['step'] == resume_step and len(r) > 1):
          kept.append(r)
      files.write_atomically(self._path, ''.join(json.dumps(r) + '\n' for r in kept))
    elif files.exists(self._path):
      files.remove(self._path)  # no checkpoint: the run starts over, and so do its metrics
    from tensorboardX import SummaryWriter  # imported late: only the writing process needs it
    from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
    record_writer.register_writer_factory('gs', _ObjectStoreEvents)
    # An event file per start, named by the step it starts from: tensorboardX names files by the second, and a
    # resume within that second would otherwise overwrite the previous start's events. Its purge step makes
    # TensorBoard drop the earlier files' events from that step on: a fresh start (no checkpoint) drops them all.
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), filename_suffix=f'.from_step_{resume_step or 0}',
                             purge_step=resume_step + 1 if resume_step is not None else 0)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self._enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and not isinstance(v, str)}
    files.append(self._path, json.dumps({'step': int(step), **scalars}) + '\n')
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _ObjectStoreEvents:
  """tensorboardX's writer of an event file at a gs:// URL, through foundation.files (tensorboardX's own needs
  google-cloud-storage): the events are kept in memory and the whole object is rewritten at every flush, so the
  bucket holds every flushed event while the run goes on."""

  def __init__(self, path: str):
    self._path, self._data = path, bytearray()

  @classmethod
  def open(cls, path: str) -> '_ObjectStoreEvents':
    return cls(path)

  @staticmethod
  def directory_check(path: str) -> None:
    del path  # an object store has no directories to create

  def write(self, data: bytes) -> None:
    self._data += data

  def flush(self) -> None:
    files.write_atomically(self._path, bytes(self._data))

  def close(self) -> None:
    self.flush()


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
