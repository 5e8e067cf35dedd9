"""The one sharding layer: mesh, logical-axis rules, and shardings for params, optimizer state and batches.

Models name their axes logically (`embed`, `mlp`, `heads`, ...); the rules table below maps those names onto the
mesh axes ('data', 'fsdp', 'tensor'). Parameters use the plain names; activations use the `act_*` names so that a
weight's `embed` axis can be FSDP-sharded while an activation's embed axis is not.
"""

import logging
import math
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils, multihost_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')  # the batch is split over every axis that is not tensor parallel

DEFAULT_RULES = (
    # parameters
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', None),  # few k/v heads (GQA) rarely divide the tensor axis; they are small anyway
    ('head_dim', None),
    ('layers', None),
    ('norm', None),
    ('patch', None),  # a flattened image patch (patch * patch * channels), the input of the ViT's patch embedding
    ('position', None),  # rows of a learned position-embedding table
    ('conv_h', None),  # convolution kernels are small next to transformer weights: replicated
    ('conv_w', None),
    ('conv_in', None),
    ('conv_out', None),
    ('projection', None),  # the output of an embedding/projection head (contrastive embedding dimension)
    ('classes', None),  # the output of a classifier head
    ('lora_rank', None),  # the low-rank inner dimension of LoRA factors
    # activations
    ('act_batch', BATCH_AXES),
    ('act_length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', None),
    ('act_head_dim', None),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
)


def logical_rules(overrides: dict[str, Any] | None = None) -> tuple:
  """The default table with a config's overrides ({'mlp': None, ...}) applied."""
  overrides = dict(overrides or {})
  unknown = set(overrides) - {name for name, _ in DEFAULT_RULES}
  if unknown:
    raise ValueError(f'config.sharding_rules names unknown logical axes {sorted(unknown)}; '
                     f'known: {[name for name, _ in DEFAULT_RULES]}')
  return tuple((name, overrides.get(name, axes)) for name, axes in DEFAULT_RULES)


def mesh_shape(mesh_cfg: dict[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves config.mesh ({'data': -1, 'fsdp': 1, 'tensor': 1}) against the device count; -1 takes the rest."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by '
                       f'{known}; pick sizes whose product divides the device count.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))} multiplies to {math.prod(sizes)} but there are '
                     f'{num_devices} devices; make the sizes multiply to {num_devices} (or set one to -1).')
  return tuple(sizes)


def num_slices(devices: Sequence[jax.Device]) -> int:
  """How many TPU slices the devices span (joined over the data-center network); 1 off TPU, where a GPU host's
  devices carry a slice_index of their own that is no slice."""
  if devices[0].platform != 'tpu':
    return 1
  return len({getattr(d, 'slice_index', 0) for d in devices})


def make_mesh(mesh_cfg: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: with Explicit axes (jax.make_mesh's default) a tensor-parallel matmul is a type error.
  slices = num_slices(devices)
  if devices[0].platform == 'cpu':  # no interconnect topology to follow: plain order
    device_array = np.asarray(devices).reshape(shape)
  elif slices > 1:  # multislice: data over the slices (DCN), the rest within each
    if shape[0] % slices:
      raise ValueError(f'config.mesh {dict(zip(MESH_AXES, shape))} on {slices} slices: the data axis must be a '
                       f'multiple of {slices}, so that fsdp and tensor stay within a slice.')
    device_array = _on_topology(mesh_utils.create_hybrid_device_mesh, (shape[0] // slices, *shape[1:]),
                                (slices, 1, 1), devices)
  else:  # TPU/GPU: an order that follows the physical links
    device_array = _on_topology(mesh_utils.create_device_mesh, shape, devices)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _on_topology(create, shape, *args) -> np.ndarray:
  """`create(shape, *args)`; a shape whose axes cut the chips' physical axes is placed anyway (a warning says so)."""
  try:
    return create(shape, *args)
  except NotImplementedError:  # e.g. tensor 8 on a 4x4 slice: no physical axis of that size
    pass
  try:
    device_array = create(shape, *args, allow_split_physical_axes=True)
  except (NotImplementedError, ValueError) as e:
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, shape))} cannot be laid out on these chips '
                     f'({str(e).splitlines()[0][:200]}); choose sizes that are products of their sides.') from None
  logging.warning('config.mesh %s does not follow the physical axes of these chips; its axes split them, so some '
                  'collectives travel further. Sizes that are products of the sides avoid this.',
                  dict(zip(MESH_AXES, shape)))
  return device_array


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, where: str) -> P:
  """Drops mesh axes from dimensions they do not divide, so odd sizes replicate instead of failing to compile."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    if names and dim % size:
      logging.warning('%s: dimension %d is not divisible by mesh axes %s (size %d); replicating it.',
                      where, dim, names, size)
      names = ()
    fitted.append(names[0] if len(names) == 1 else (names or None))
  return P(*fitted)


def param_shardings(abstract_params: Any, mesh: Mesh, rules: tuple) -> Any:
  """NamedShardings for a tree of (possibly nn.Partitioned-boxed) abstract params, via the logical rules."""
  logical_specs = nn.get_partition_spec(abstract_params)
  unboxed = nn.unbox(abstract_params)

  def one(path, spec, leaf):
    mesh_spec = nn.logical_to_mesh_axes(spec, rules) if spec is not None else P()
    return NamedSharding(mesh, _fit_spec(mesh_spec, leaf.shape, mesh, jax.tree_util.keystr(path)))

  return jax.tree.map_with_path(one, logical_specs, unboxed, is_leaf=lambda x: isinstance(x, P) or x is None)


def warn_replicated(params: Any, mesh: Mesh, top: int = 5) -> list[str]:
  """On a mesh that shards parameters (fsdp or tensor > 1), warns once, listing the largest parameters that the rules
  leave whole on every device (e.g. convolution kernels, which map to no mesh axis); returns those lines."""
  if mesh.shape['fsdp'] * mesh.shape['tensor'] == 1:
    return []
  whole = [(x.size, jax.tree_util.keystr(path), x.shape) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
           if x.size > 1 and all(s is None for s in x.sharding.spec)]
  lines = [f'{name} {shape}' for _, name, shape in sorted(whole, reverse=True)[:top]]
  if whole:
    total = sum(n for n, _, _ in whole)
    all_params = sum(x.size for x in jax.tree.leaves(params))
    logging.warning('The sharding rules leave %d parameters (%.0f%% of all) replicated on every device of the '
                    'fsdp=%d x tensor=%d mesh; the largest: %s. Map their logical axes in config.sharding_rules to '
                    'shard them.', total, 100 * total / all_params, mesh.shape['fsdp'], mesh.shape['tensor'],
                    ', '.join(lines))
  return lines


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Builds global arrays from this process's rows (a contiguous block of the global batch)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def gather_texts(text: str) -> list[str]:
  """Every process's `text` (without trailing spaces), by process index. A collective: every process calls it at
  the same point."""
  data = text.encode()
  longest = int(np.max(multihost_utils.process_allgather(np.int32(len(data)))))
  if not longest:
    return [''] * jax.process_count()
  rows = np.asarray(multihost_utils.process_allgather(np.frombuffer(data.ljust(longest), np.uint8)))
  return [bytes(row).decode(errors='replace').rstrip() for row in rows]


def error_words(error: Exception, limit: int = 160) -> str:
  """An error's type and message on one line, the message cut to `limit` characters: what a warning quotes, and
  what a process tells the others of its failure."""
  text = ' '.join(str(error).split())
  return f'{type(error).__name__}: ' + (text if len(text) <= limit else text[:limit] + '...')


def raise_where_any_failed(error: Exception | None, others: Callable[[list[tuple[int, str]]], Exception]) -> None:
  """All processes raise or none does: `error` where a process has one, and where it has none but another process
  has, others(failed), `failed` listing (process index, its error's type and first words). For work each process
  does on its own (the checks before a run, reading a checkpoint) where one can fail and the others succeed: they
  would otherwise go on to a collective that the failing process never joins. A collective itself: every process
  calls it at the same point, with no other collective between the work and it."""
  if jax.process_count() > 1:
    words = error_words(error) if error is not None else ''
    failed = [(process, words) for process, words in enumerate(gather_texts(words)) if words]
    if error is None and failed:
      error = others(failed)
  if error is not None:
    raise error


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Joins the processes of a multi-host run into one JAX runtime, before anything touches a device.

  Explicit flags (GPU clusters without SLURM, local tests) are passed through. Otherwise JAX's own cluster
  detection does it, where there is a cluster to detect: on a Cloud TPU VM (TPU chips on this host's PCI bus;
  JAX then reads the worker list and this worker's number from the metadata server, so every worker of a pod
  slice, created plainly or through queued resources, joins one mesh, and a single-host VM forms a mesh of one
  process), under GKE / multislice (TPU_WORKER_HOSTNAMES, MEGASCALE_COORDINATOR_ADDRESS) and in a SLURM job step
  of several tasks. Elsewhere (one host, no flags) nothing is initialised.

  The flags' environment form, for schedulers that give each task variables rather than arguments: with no flags,
  JAX_PROCESS_ID set means JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID stand for them.
  """
  env = os.environ
  if not coordinator_address and env.get('JAX_PROCESS_ID'):
    coordinator_address = env.get('JAX_COORDINATOR_ADDRESS')
    num_processes, process_id = _env_int('JAX_NUM_PROCESSES'), _env_int('JAX_PROCESS_ID')
    if not coordinator_address:
      raise ValueError('JAX_PROCESS_ID is set without JAX_COORDINATOR_ADDRESS (HOST:PORT of process 0); set both '
                       'and JAX_NUM_PROCESSES, or neither.')
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError('--coordinator_address needs --num_processes and --process_id as well.')
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif cluster_detected():
    jax.distributed.initialize()


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} is not an integer.') from None


def cluster_detected() -> bool:
  """Whether jax.distributed.initialize() without arguments has a multi-process environment to join."""
  env = os.environ
  if env.get('JAX_PLATFORMS', '').lower() == 'cpu':
    return False
  if env.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0 or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return True
  if int(env.get('SLURM_NTASKS', '1') or 1) > 1 and 'SLURM_STEP_NODELIST' in env:
    return True
  return _tpu_chips_on_this_host() > 0


def _tpu_chips_on_this_host() -> int:
  # JAX's own test, the one its Cloud TPU start-up uses: Google TPU devices on the PCI bus.
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  return hardware_utils.num_available_tpu_chips_and_device_id()[0]
