r"""Ahead-of-time plan: compile a config's real train step for a TPU slice (or this machine's devices) here, and
report what one step needs per chip before a run is launched.

  python -m foundation.plan --config=configs/lm/shakespeare.py:large --topology=v5e:4x4
  python -m foundation.plan --config=configs/lm/shakespeare.py:large --topology=v5p:2x2x4 --config.mesh.fsdp=-1 \
      --config.mesh.data=1
  python -m foundation.plan --config=configs/lm/shakespeare.py:large --gpu=h100:8     # or a100, h200; h100:2x8
  python -m foundation.plan --config=configs/lm/shakespeare.py:smoke     # this machine's devices

It prints per-device memory (arguments, outputs, aliased donations, temporaries) against the chip's HBM, the model's
FLOPs and XLA's FLOPs per step, the bytes of every collective, and a roofline projection of the step time and MFU at
the chip's peak. A step that does not fit is reported as such, with the first of these changes that does, each
compiled to check it: the parameters sharded over every chip (fsdp), rematerialised blocks, gradient accumulation.

TPU topologies need XLA's TPU compiler, libtpu, installed apart from the environment (so that nothing else loads
it): `.venv/bin/pip install --no-deps --target .venv/tpu-compiler -r requirements-plan.txt`; NVIDIA GPUs need XLA's
CUDA compiler (the jax CUDA plugin and nvcc): `... --target .venv/gpu-compiler -r requirements-plan-gpu.txt`.
Nothing runs on a TPU or a GPU; the compiler runs on this CPU (a 1B-parameter step for 256 chips compiles in about
a minute). XLA's GPU compiler gives no FLOP or byte counts: there the projection uses the model's FLOPs alone, and
the memory limit is what JAX's allocator takes by default, 75% of the GPU's memory (--hbm_gib overrides). The
config's dataset must be prepared (one batch gives the step's input shapes); its other runs (teachers, pretrained
weights) need not exist: their config.json suffices, as for a dry check. `python -m foundation.main --dry_run`
plans this machine's devices without training.

Exit status: 0 when the step fits (or a proposal does), 1 when nothing fits, 2 for a flag or config that cannot run.
"""

import dataclasses
import importlib
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

from absl import app, flags

# libtpu is installed apart from the environment's packages (launch/test.sh; README), so that runs on this machine
# never load the TPU runtime; tpu_devices alone points JAX at it:
#   pip install --no-deps --target .venv/tpu-compiler -r requirements-plan.txt
TPU_COMPILER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.venv', 'tpu-compiler')
# The same for XLA's CUDA compiler (the jax CUDA plugin, nvcc): pip install ... --target .venv/gpu-compiler
#   -r requirements-plan-gpu.txt
GPU_COMPILER_DIR = os.path.join(os.path.dirname(TPU_COMPILER_DIR), 'gpu-compiler')

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's memory and bandwidths, as Cloud TPU's system-architecture pages give them (GPUs: from
  Gpu). Peak FLOP/s come from foundation.metrics.PEAK_FLOPS_BF16, which MFU uses everywhere."""
  hbm_bytes: float             # what a program may use
  hbm_bytes_per_s: float
  ici_bytes_per_s: float       # bidirectional, per chip (GPUs: NVLink, or the network between hosts)
  dims: int                    # 2: a 2-D torus (v5e, v6e); 3: 3-D (v4, v5p); 0: GPUs
  chip_config: str = 'default'


CHIPS = {
    'v4': Chip(32 * GiB, 1200e9, 270e9, 3, 'megacore'),  # ICI: the pod's 1.1 PB/s all-reduce bandwidth / 4096 chips
    'v5e': Chip(15.75 * GiB, 819e9, 400e9, 2),  # 16 GiB, of which the compiler lets a program use 15.75
    'v5p': Chip(95 * GiB, 2765e9, 1200e9, 3),
    'v6e': Chip(32 * GiB, 1638e9, 800e9, 2),
}
# TPU_ACCELERATOR_TYPE as a Cloud TPU VM sets it (v4 and v5p count TensorCores, two per chip).
ACCELERATOR_TYPE = {'v4': lambda chips: f'v4-{2 * chips}', 'v5e': lambda chips: f'v5litepod-{chips}',
                    'v5p': lambda chips: f'v5p-{2 * chips}', 'v6e': lambda chips: f'v6e-{chips}'}


@dataclasses.dataclass(frozen=True)
class Gpu:
  """An NVIDIA GPU (SXM) as XLA's compiler describes it (GpuTargetConfigProto: what cudaGetDeviceProperties
  reports on that GPU) and as the projection needs it."""
  name: str                    # the device kind a run on it reports
  compute_capability: tuple[int, int]
  sms: int
  shared_bytes_per_sm: int
  shared_bytes_per_block_optin: int
  l2_bytes: int
  memory_bytes: int
  memory_bytes_per_s: float
  clock_ghz: float
  nvlink_bytes_per_s: float    # bidirectional, per GPU

  def target_config(self) -> str:
    return '\n'.join([
        'gpu_device_info {', '  threads_per_block_limit: 1024', '  threads_per_warp: 32',
        '  shared_memory_per_block: 49152', f'  shared_memory_per_core: {self.shared_bytes_per_sm}',
        '  threads_per_core_limit: 2048', f'  core_count: {self.sms}', '  fpus_per_core: 128',
        '  block_dim_limit_x: 2147483647', '  block_dim_limit_y: 65535', '  block_dim_limit_z: 65535',
        f'  memory_bandwidth: {int(self.memory_bytes_per_s)}', f'  l2_cache_size: {self.l2_bytes}',
        f'  clock_rate_ghz: {self.clock_ghz}', f'  device_memory_size: {self.memory_bytes}',
        f'  shared_memory_per_block_optin: {self.shared_bytes_per_block_optin}',
        f'  cuda_compute_capability {{ major: {self.compute_capability[0]} minor: {self.compute_capability[1]} }}',
        '  registers_per_core_limit: 65536', '  registers_per_block_limit: 65536', '}', 'platform_name: "CUDA"',
        'dnn_version_info { major: 9 minor: 8 }', f'device_description_str: "{self.name}"'])


GPUS = {
    'a100': Gpu('NVIDIA A100-SXM4-80GB', (8, 0), 108, 167936, 166912, 40 * 2**20, 80 * GiB, 2039e9, 1.41, 600e9),
    'h100': Gpu('NVIDIA H100 80GB HBM3', (9, 0), 132, 233472, 232448, 50 * 2**20, 81559 * 2**20, 3352e9, 1.98, 900e9),
    'h200': Gpu('NVIDIA H200', (9, 0), 132, 233472, 232448, 50 * 2**20, 143771 * 2**20, 4800e9, 1.98, 900e9),
}
GPUS_PER_HOST = 8
GPU_NIC_BYTES_PER_S = 100e9  # between hosts: one 400 Gb/s NIC per GPU, both directions (DGX H100 / H200)
JAX_GPU_MEMORY_FRACTION = 0.75  # what JAX's allocator takes by default (XLA_PYTHON_CLIENT_MEM_FRACTION)


def gpu_devices(spec: str) -> tuple[list, Chip]:
  """The devices of NVIDIA GPUs named like 'h100:8' (one host) or 'h100:2x8' (hosts x GPUs per host), for compiling
  only, and their figures for the projection."""
  kind, hosts, per_host = _gpu_spec(spec)
  gpu = GPUS[kind]
  if os.path.isdir(GPU_COMPILER_DIR) and GPU_COMPILER_DIR not in sys.path:
    sys.path.append(GPU_COMPILER_DIR)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  make = lambda: topologies.get_topology_desc(kind, 'cuda', target_config=gpu.target_config(),
                                              topology=f'1x{hosts}x{per_host}')
  try:
    try:
      description = make()
    except NotImplementedError:  # JAX looked for plugins before the compiler's directory was on the path
      importlib.import_module('jax_plugins.xla_cuda12').initialize()
      description = make()
  except (ImportError, NotImplementedError) as e:
    raise ValueError('planning for a GPU needs XLA\'s CUDA compiler: pip install --no-deps --target '
                     '.venv/gpu-compiler -r requirements-plan-gpu.txt') from e
  link = gpu.nvlink_bytes_per_s if hosts == 1 else GPU_NIC_BYTES_PER_S
  return list(description.devices), Chip(JAX_GPU_MEMORY_FRACTION * gpu.memory_bytes, gpu.memory_bytes_per_s, link,
                                         dims=0)


COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2,
                'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8, 'c64': 8, 'c128': 16}


def _gpu_spec(spec: str) -> tuple[str, int, int]:
  """(kind, hosts, GPUs per host) of a --gpu like 'h100:8' or 'h100:2x8'."""
  kind, _, count = spec.partition(':')
  shape = [int(n) for n in count.split('x')] if re.fullmatch(r'\d+(x\d+)?', count) else []
  if kind not in GPUS or not shape or 0 in shape:
    raise ValueError(f'--gpu={spec!r}: expected KIND:N or KIND:HOSTSxN with KIND one of {sorted(GPUS)}, e.g. '
                     'h100:8 or h100:2x8.')
  hosts, per_host = shape if len(shape) == 2 else (1, shape[0])
  if per_host > GPUS_PER_HOST:  # the NVLink domain the projection assumes within a host
    split = next(h for h in range(-(-per_host // GPUS_PER_HOST), per_host + 1) if per_host % h == 0)
    raise ValueError(f'--gpu={spec!r}: an {kind.upper()} host (HGX / DGX) holds at most {GPUS_PER_HOST} GPUs; name '
                     f'the hosts as KIND:HOSTSxN, e.g. {kind}:{hosts * split}x{per_host // split}.')
  return kind, hosts, per_host


def _topology(topology: str) -> tuple[str, list[int]]:
  """(generation, chips along each dimension) of a --topology like 'v5e:4x4' or 'v5p:2x2x4'."""
  generation, _, shape = topology.partition(':')
  if generation not in CHIPS or not re.fullmatch(r'\d+(x\d+)+', shape):
    raise ValueError(f'--topology={topology!r}: expected GENERATION:AxB[xC] with GENERATION one of {sorted(CHIPS)}, '
                     'e.g. v5e:4x4 or v5p:2x2x4.')
  dims = [int(d) for d in shape.split('x')]
  if len(dims) != CHIPS[generation].dims:
    raise ValueError(f'--topology={topology!r}: {generation} slices have {CHIPS[generation].dims} dimensions, e.g. '
                     f'{generation}:{"x".join(["2"] * CHIPS[generation].dims)}.')
  return generation, dims


def check_target(topology: str = '', num_slices: int = 1, hbm_gib: float = 0.0, gpu: str = '') -> None:
  """What to plan for, checked without importing jax: a refused flag costs no seconds of start-up."""
  if hbm_gib < 0 or num_slices < 1:
    raise ValueError(f'--hbm_gib={hbm_gib} and --num_slices={num_slices}: give a memory of 0 GiB (the chip\'s) or more, '
                     'and 1 slice or more.')
  if num_slices != 1 and not topology:
    raise ValueError(f'--num_slices={num_slices} joins slices of a --topology; name one, e.g. --topology=v5e:4x4.')
  if topology and gpu:
    raise ValueError(f'--topology={topology} and --gpu={gpu}: plan for one of them at a time.')
  if topology:
    _topology(topology)
  if gpu:
    _gpu_spec(gpu)


def tpu_devices(topology: str, num_slices: int = 1) -> list:
  """The devices of a TPU slice named like 'v5e:4x4' (chips, as gcloud's --accelerator-type counts them for v5e and
  v6e; v4 and v5p give three dimensions), for compiling only."""
  generation, dims = _topology(topology)
  chip = CHIPS[generation]
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')  # not on a Cloud TPU VM: do not ask its metadata server
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', ACCELERATOR_TYPE[generation](math.prod(dims)))
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # compiling only: other plans may run beside this one
  if os.path.isdir(TPU_COMPILER_DIR) and TPU_COMPILER_DIR not in sys.path:
    sys.path.append(TPU_COMPILER_DIR)
  dims3 = (dims + [1])[:3]
  # A torus where the slice spans the pod's side (v5e, v6e: 16 chips) or, in 3-D, is whole 4x4x4 cubes.
  wrap = tuple(d == 16 for d in dims3) if chip.dims == 2 else (all(d % 4 == 0 for d in dims3),) * 3
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    description = topologies.get_topology_desc(
        platform='tpu', topology_name=topology, chip_config_name=chip.chip_config,
        chips_per_host_bounds=tuple(min(d, b) for d, b in zip(dims3, (2, 2, 1))), num_slices=num_slices, wrap=wrap)
  except Exception as e:  # pylint: disable=broad-except  (no libtpu, or a shape the compiler refuses)
    if any(m in str(e).lower() for m in ('not found', 'unknown backend', 'not installed')):
      raise ValueError('planning for a TPU needs XLA\'s TPU compiler: pip install --no-deps --target '
                       '.venv/tpu-compiler -r requirements-plan.txt') from e
    raise ValueError(f'--topology={topology!r}: {str(e).splitlines()[0]}') from e
  return list(description.devices)


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes each kind of collective produces per device per step, from the compiled (per-device) HLO: the result
  shapes of every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute (their -start halves
  where XLA made them asynchronous), times the trip count of the loops they sit in (a scanned layer stack's
  gradients are reduced once per layer; the count is the one XLA annotated on the loop, else the constant its
  condition compares with: _trip_count)."""
  computations, current, entry = {}, None, None
  for line in hlo_text.splitlines():
    header = re.match(r'^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if header:
      current = header.group(2)
      computations[current] = []
      entry = current if header.group(1) else entry
    elif line.startswith('}'):
      current = None
    elif current:
      computations[current].append(line)
  pattern = re.compile(r'=\s*(.+?)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
  totals = dict.fromkeys(COLLECTIVES, 0)

  def visit(name: str, times: int, depth: int = 0):
    for line in computations.get(name, ()):
      match = pattern.search(line)
      if match:
        shapes = re.findall(r'(\w+)\[([\d,]*)\]', match.group(1))
        if match.group(3):  # an async start: its result ends with scalar contexts (a permute's u32[] pair)
          while len(shapes) > 1 and not shapes[-1][1]:
            shapes.pop()
        if match.group(3) and len(shapes) > 1 and match.group(2) != 'all-reduce':
          shapes = shapes[len(shapes) // 2:]  # an async start's result is (operands, outputs): count the outputs
        totals[match.group(2)] += times * sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(',')
                                                                                       if d) for dtype, dims in shapes)
      loop = re.search(r'\swhile\(.*condition=%?([\w.\-]+), body=%?([\w.\-]+)', line)
      if loop and depth < 8:
        visit(loop.group(2), times * _trip_count(line, loop.group(1), computations), depth + 1)
      for called in re.findall(r'(?:calls|branch_computations)=\{?%?([\w.\-]+)', line):
        if depth < 8:
          visit(called, times, depth + 1)

  if entry:
    visit(entry, 1)
  return totals


def _trip_count(while_line: str, condition: str, computations: dict[str, list[str]]) -> int:
  """A loop's iterations: the count XLA annotated on it (GPU), else the one integer constant its condition (or a
  fusion it calls: GPU) compares with; 1 if neither is found."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
  if known:
    return int(known.group(1))
  lines = list(computations.get(condition, ()))
  for called in re.findall(r'calls=%?([\w.\-]+)', '\n'.join(lines)):
    lines += computations.get(called, ())
  bounds = re.findall(r's32\[\][^=]*constant\((\d+)\)', '\n'.join(lines))
  return int(bounds[0]) if len(bounds) == 1 else 1


@dataclasses.dataclass
class Plan:
  devices: int
  device_kind: str
  mesh: dict
  compile_s: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  state_bytes: int            # params and optimizer state alone, per device
  memory_limit: float
  model_flops: float          # per device per step (the task's analytic count; 0 where it has none)
  xla_flops: float | None     # per device per step, as XLA counts them (a scanned layer stack counts once); None
  bytes_accessed: float | None  # where the compiler counts nothing (XLA's GPU compiler)
  collectives: dict
  peak_flops: float | None    # per device
  chip: Chip | None
  num_train_steps: int = 0
  refused: str = ''               # the compiler's own out-of-memory refusal, where it refused the program
  footprint: dict | None = None  # a full run at the projected step time (metrics.footprint), where projected

  @property
  def bytes_per_device(self) -> int:
    """What the step holds at its peak: its inputs, its outputs less the donated inputs they reuse, and its
    temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def fits(self) -> bool:
    return not self.refused and self.bytes_per_device <= self.memory_limit

  def summary(self) -> dict[str, Any]:
    """Every number of the report, for scripts (--json)."""
    fields = {k: v for k, v in dataclasses.asdict(self).items() if k != 'chip'}
    return {**fields, 'bytes_per_device': self.bytes_per_device, 'fits': self.fits, 'projection': self.projection()}

  def projection(self) -> dict[str, float] | None:
    """A roofline estimate of one step (s): compute at the chip's peak, HBM traffic at its bandwidth, and
    collectives at its ICI bandwidth without overlap; MFU = model FLOPs / (step time x peak)."""
    if not self.peak_flops or not self.chip or self.refused:  # no chip figures (this machine's devices), or no program
      return None
    compute = max(self.model_flops, self.xla_flops or 0.0) / self.peak_flops
    memory = (self.bytes_accessed or 0.0) / self.chip.hbm_bytes_per_s
    # A ring all-reduce moves its bytes about twice (reduce-scatter, then all-gather); the others about once.
    moved = sum(v * (2 if k == 'all-reduce' else 1) for k, v in self.collectives.items())
    network = moved / self.chip.ici_bytes_per_s
    step = max(compute, memory) + network
    return dict(step_s=step, compute_s=compute, hbm_s=memory, ici_s=network,
                mfu=self.model_flops / (step * self.peak_flops) if step else 0.0)


def plan(config, devices: list, *, memory_limit: float | None = None, chip: Chip | None = None) -> Plan:
  """Compiles `config`'s train step for `devices` (a TPU topology's, GPUs', or this machine's) and measures it."""
  from foundation import metrics, train  # pylint: disable=g-import-not-at-top
  if config.parallelism != 'jit':
    raise train.ConfigError(f'config.parallelism={config.parallelism!r}: the plan compiles the sharded (jit) step; '
                            'set --config.parallelism=jit.')
  with tempfile.TemporaryDirectory() as workdir:  # prepare writes nothing; it only needs a path to look at
    prepared = train.prepare(config, os.path.join(workdir, 'run'), dry=True, devices=devices)
  started = time.perf_counter()
  lowered = train.lower_train_step(prepared, config)
  try:
    compiled, refused = lowered.compile(), ''
  except Exception as e:  # pylint: disable=broad-except  (XLA's TPU compiler refuses a program larger than HBM)
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    compiled, refused = None, str(e).strip().splitlines()[0]
  compile_s = time.perf_counter() - started
  memory = compiled.memory_analysis() if compiled else None
  if compiled and memory is None:  # without its figures 'fits' would read a footprint of 0 bytes
    raise ValueError(f'XLA\'s compiler for {devices[0].device_kind} gives no memory analysis of the step, so this '
                     'plan cannot say whether it fits.')
  cost = metrics.xla_cost(compiled) if compiled else {}
  counted = cost is not None  # XLA's GPU compiler gives no cost analysis
  cost = cost or {}
  peak = metrics.peak_flops(devices) if chip else None  # the projection needs a chip's figures
  if memory_limit is None:
    memory_limit = chip.hbm_bytes if chip else train.device_memory(devices)[0]
  size = lambda field: getattr(memory, field) if memory else 0
  result = Plan(
      devices=len(devices), device_kind=devices[0].device_kind, mesh=dict(prepared.mesh.shape), compile_s=compile_s,
      argument_bytes=size('argument_size_in_bytes'), output_bytes=size('output_size_in_bytes'),
      alias_bytes=size('alias_size_in_bytes'), temp_bytes=size('temp_size_in_bytes'),
      state_bytes=prepared.state_bytes_per_device, memory_limit=memory_limit,
      model_flops=prepared.task.flops_per_example() * config.global_batch_size / len(devices),
      xla_flops=float(cost.get('flops', 0.0)) if counted else None,
      bytes_accessed=float(cost.get('bytes accessed', 0.0)) if counted else None,
      collectives=collective_bytes(compiled.as_text()) if compiled else dict.fromkeys(COLLECTIVES, 0),
      peak_flops=peak / len(devices) if peak else None, chip=chip, num_train_steps=config.num_train_steps,
      refused=refused)
  projected = result.projection()
  if projected:
    result.footprint = metrics.footprint(devices, projected['step_s'] * config.num_train_steps,
                                         result.model_flops * len(devices) * config.num_train_steps, config.energy)
  return result


def proposals(config, devices: list) -> list[dict[str, Any]]:
  """Config changes that lower memory per device, each adding to the last one that a run on `devices` would take
  (`train.validate` for their hosts): the parameters and optimizer state sharded over every device of a slice (the
  tensor axis kept, the data axis across slices), rematerialised blocks (models that have them), then 2, 4 and 8
  microbatches."""
  from foundation import sharding, train  # pylint: disable=g-import-not-at-top
  num_devices, processes = len(devices), len({d.process_index for d in devices})
  slices = sharding.num_slices(devices)

  def runs(changes):
    try:
      train.validate(with_changes(config, changes), num_devices, processes)
    except ValueError:
      return False
    return True

  current = sharding.mesh_shape(config.mesh, num_devices)
  changes, out = {}, []
  sharded = {'mesh.data': slices, 'mesh.fsdp': -1, 'mesh.tensor': current[2]}
  if runs(sharded) and sharding.mesh_shape(with_changes(config, sharded).mesh, num_devices) != current:
    changes = sharded
    out.append(dict(changes))
  if config.get('model', {}).get('remat', 'full') != 'full':
    changes = {**changes, 'model.remat': 'full'}
    out.append(dict(changes))
  for k in (2, 4, 8):
    if runs(candidate := {**changes, 'grad_accum_steps': config.grad_accum_steps * k}):
      out.append(candidate)
  return out


def with_changes(config, changes: dict[str, Any]):
  new = config.copy_and_resolve_references()
  new.update_from_flattened_dict(changes)
  return new


def flags_of(changes: dict[str, Any]) -> str:
  return ' '.join(f'--config.{k}={v}' for k, v in changes.items())


def _bytes(b: float) -> str:
  return f'{b / GiB:,.2f} GiB' if abs(b) >= GiB else f'{b / 2**20:,.1f} MiB'


def _seconds(s: float) -> str:
  return f'{s * 1e3:,.1f} ms' if s >= 1e-3 else f'{s * 1e6:,.1f} us'


def report(p: Plan, what: str) -> str:
  from foundation import metrics  # pylint: disable=g-import-not-at-top
  mem = _bytes
  if p.refused:
    return (f'{what}: {p.devices} x {p.device_kind}, mesh {p.mesh}: DOES NOT FIT: the compiler refused the train step '
            f'(params + optimizer state {mem(p.state_bytes)} per device): {p.refused}')
  lines = [
      f'{what}: {p.devices} x {p.device_kind}, mesh {p.mesh}; the train step compiled in {p.compile_s:.1f} s',
      f'memory per device: arguments {mem(p.argument_bytes)} (params + optimizer state {mem(p.state_bytes)}), '
      f'outputs {mem(p.output_bytes)}, donated {mem(p.alias_bytes)}, temporaries {mem(p.temp_bytes)} -> '
      f'{mem(p.bytes_per_device)} of {mem(p.memory_limit)}'
      + (' (JAX\'s default share of the GPU\'s memory)'
         if p.chip and not p.chip.dims and p.memory_limit == p.chip.hbm_bytes else '') + ': '
      + ('fits' if p.fits else f'DOES NOT FIT (by {mem(p.bytes_per_device - p.memory_limit)})'),
      f'FLOPs per device per step: model {p.model_flops:.3g}, '
      + (f'XLA {p.xla_flops:.3g} (XLA counts a scanned layer stack once)' if p.xla_flops is not None else
         'XLA: not counted by this compiler (the projection uses the model\'s FLOPs and no HBM traffic)'),
      'collectives per device per step: ' + (', '.join(f'{k} {mem(v)}' for k, v in p.collectives.items() if v)
                                                 or 'none'),
  ]
  projected = p.projection()
  if projected:
    lines.append(f'projected step (roofline, collectives not overlapped): {_seconds(projected["step_s"])} (compute '
                 f'{_seconds(projected["compute_s"])}, HBM '
                 f'{_seconds(projected["hbm_s"]) if p.bytes_accessed is not None else "not counted"}, ICI '
                 f'{_seconds(projected["ici_s"])}) -> MFU at most {projected["mfu"]:.0%} at {p.peak_flops / 1e12:,.3g} '
                 'TFLOP/s per device')
  if p.footprint:
    lines.append(f'a full run of {p.num_train_steps:,} steps at that speed: {metrics.footprint_text(p.footprint)}'
                 + (' (config.energy)' if 'compute/energy_kwh' in p.footprint else
                    ', energy unknown for this chip: set --config.energy.device_watts'))
  return '\n'.join(lines)


def run(config, topology: str = '', num_slices: int = 1, hbm_gib: float = 0.0, propose: bool = True,
        say=print, gpu: str = '') -> tuple[Plan, dict | None, Plan | None]:
  """Plans `config` for a TPU `topology` or NVIDIA `gpu`s (neither: the local devices), prints the report and, if
  the step does not fit, the first proposal that does. Returns (the plan, the fitting changes or None, the plan with
  them or None)."""
  import jax  # pylint: disable=g-import-not-at-top
  check_target(topology, num_slices, hbm_gib, gpu)
  if topology:
    devices, chip = tpu_devices(topology, num_slices), CHIPS[topology.split(':')[0]]
    where = topology + (f' x {num_slices} slices' if num_slices > 1 else '')
  elif gpu:
    (devices, chip), where = gpu_devices(gpu), gpu
  else:
    devices, chip, where = jax.devices(), None, 'this machine'
  limit = hbm_gib * GiB if hbm_gib else None
  result = plan(config, devices, memory_limit=limit, chip=chip)
  say(report(result, where))
  if result.fits or not propose:
    return result, None, None
  from foundation import train  # pylint: disable=g-import-not-at-top
  for changes in proposals(config, devices):
    try:
      candidate = plan(with_changes(config, changes), devices, memory_limit=limit, chip=chip)
    except train.ConfigError as e:
      say(f'  with {flags_of(changes)}: not a config that runs here ({e})')
      continue
    say(f'  with {flags_of(changes)}: ' + (f'refused by the compiler ({candidate.refused})' if candidate.refused else
                                          f'{_bytes(candidate.bytes_per_device)} per device')
        + (', fits' if candidate.fits else ''))
    if candidate.fits:
      say(f'proposal: add {flags_of(changes)}\n' + report(candidate, where + ' with the proposal'))
      return result, changes, candidate
  say('no proposal fits: use more chips (--topology), a smaller model or a smaller global batch.')
  return result, None, None


def _define_flags():
  """The plan's own flags, beside foundation.main's --config (defined when this runs as a program only)."""
  flags.DEFINE_string('topology', '', 'A TPU slice, e.g. v5e:2x2, v5e:16x16, v4:2x2x2, v5p:4x4x4, v6e:8x8 (empty: '
                      'this machine\'s devices).')
  flags.DEFINE_string('gpu', '', 'NVIDIA GPUs, KIND:N on one host or KIND:HOSTSxN, KIND one of a100, h100, h200 '
                      '(SXM), e.g. h100:8 or h100:2x8.')
  flags.DEFINE_integer('num_slices', 1, 'Slices of --topology joined over the data-center network (multislice).')
  flags.DEFINE_float('hbm_gib', 0.0, 'Memory per device to plan for, in GiB (0: the chip\'s HBM; less leaves '
                     'headroom).')
  flags.DEFINE_bool('propose', True, 'When the step does not fit, compile changes until one fits.')
  flags.DEFINE_string('json', '', 'Also write the numbers to this file: {"plan": ..., "proposal": {field: value} or '
                      'null, "proposed": the plan with the proposal or null}.')


def main(argv):
  from foundation import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; config fields are set with --config.name=value.', 2)
  if cli.CONFIG.value is None:
    cli.fail('--config=configs/....py[:variant] is needed.', 2)
  f = flags.FLAGS
  try:
    check_target(f.topology, f.num_slices, f.hbm_gib, f.gpu)
  except ValueError as e:
    cli.fail(str(e), 2)
  json_dir = os.path.dirname(os.path.abspath(f.json)) if f.json else ''
  if json_dir and not (os.path.isdir(json_dir) and os.access(json_dir, os.W_OK)):
    cli.fail(f'--json={f.json}: {json_dir} is not a directory this process can write to.', 2)
  from foundation import train  # pylint: disable=g-import-not-at-top  (jax: seconds)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  try:
    result, proposal, proposed = run(cli.CONFIG.value, f.topology, f.num_slices, f.hbm_gib, f.propose, gpu=f.gpu)
  except (train.ConfigError, ValueError) as e:
    cli.fail(str(e), 2)
  if f.json:
    with open(f.json, 'w') as out:
      json.dump({'plan': result.summary(), 'proposal': proposal, 'proposed': proposed and proposed.summary()}, out,
                indent=1)
  sys.exit(0 if result.fits or proposal else 1)


if __name__ == '__main__':
  from foundation import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
