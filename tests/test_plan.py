"""foundation.plan: the train step compiled ahead of time for a TPU slice this machine does not have (XLA's TPU
compiler, libtpu from requirements-plan.txt, which launch/test.sh installs), its memory and collectives against
closed forms, a proposal for a step that does not fit, and --dry_run of foundation.main on the local devices."""

import json
import os
import subprocess
import sys

import collections

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO, subprocess_env
from foundation import metrics, plan, tasks, train
from foundation.models.transformer import Transformer, TransformerConfig
from test_configs import load

SMOKE = 'configs/lm/shakespeare.py:smoke'

# Hand-written HLO: an all-reduce at the top level; a loop of 5 iterations whose body gathers asynchronously (the
# start's result is (operand, output)), reduce-scatters and permutes (its start's result ends with two contexts).
HLO = """HloModule m

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %v = f32[4]{0} get-tuple-element(%p), index=1
  %ag = (f32[4]{0}, f32[16]{0:T(256)}) all-gather-start(%v), dimensions={0}
  %agd = f32[16]{0} all-gather-done(%ag)
  %rs = bf16[8]{0} reduce-scatter(%w), dimensions={0}, to_apply=%add
  %cp = (f32[32]{0}, f32[32]{0}, u32[], u32[]) collective-permute-start(%u), source_target_pairs={{0,1},{1,0}}
  ROOT %t = (s32[], f32[4]) tuple(%i, %v)
}

ENTRY %main (a: f32[10,10]) -> f32[10,10] {
  %a = f32[10,10]{1,0} parameter(0)
  %ar = f32[10,10]{1,0:T(8,128)} all-reduce(%a), channel_id=1, to_apply=%add
  %w = (s32[], f32[4]) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[10,10]{1,0} copy(%ar)
}
"""


# As XLA's GPU compiler writes loops: the condition's bound inside a fusion it calls, and the count annotated on the
# while (here 7, disagreeing with the fused constant on purpose: the annotation wins); a second loop has no
# annotation, so the fused compare's constant (3) counts.
GPU_HLO = """HloModule g

%fused_compare (i: s32[]) -> pred[] {
  %i = s32[] parameter(0)
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%fused_compare.2 (i: s32[]) -> pred[] {
  %i = s32[] parameter(0)
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %c = pred[] fusion(%i), kind=kLoop, calls=%fused_compare
}

%cond.2 (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %c = pred[] fusion(%i), kind=kLoop, calls=%fused_compare.2
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %g = bf16[64]{0} all-reduce-start(%v), channel_id=1, to_apply=%add
  ROOT %t = (s32[], f32[4]) tuple(%i, %v)
}

ENTRY %main (a: f32[10,10]) -> f32[10,10] {
  %w = (s32[], f32[4]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
  %w2 = (s32[], f32[4]) while(%t1), condition=%cond.2, body=%body
  ROOT %r = f32[10,10]{1,0} copy(%a)
}
"""


def test_collective_bytes_count_loop_bodies_once_per_iteration():
  assert plan.collective_bytes(HLO) == {'all-reduce': 10 * 10 * 4, 'all-gather': 5 * 16 * 4,
                                        'reduce-scatter': 5 * 8 * 2, 'all-to-all': 0, 'collective-permute': 5 * 32 * 4}
  assert plan.collective_bytes(GPU_HLO)['all-reduce'] == (7 + 3) * 64 * 2


def run_plan(tmp_path, tfds_dir, *args, module='foundation.plan'):
  out = tmp_path / f'plan{len(list(tmp_path.glob("plan*.json")))}.json'
  result = subprocess.run([sys.executable, '-m', module, f'--config={SMOKE}', f'--config.data.data_dir={tfds_dir}',
                           *args, *([f'--json={out}'] if module == 'foundation.plan' else [])],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  numbers = json.loads(out.read_text()) if out.exists() else None
  return result, numbers


@pytest.fixture(scope='module')
def smoke_params():
  cfg = TransformerConfig.from_dict(load('configs/lm/shakespeare.py').get_config('smoke').model)
  shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  return count(shapes['params']), count(shapes['params']['embedding'])


def test_plan_for_nvidia_gpus_with_xla_s_cuda_compiler(tmp_path, tfds_dir, smoke_params):
  params, embedding = smoke_params
  # Scanned layers: the gradients are all-reduced in the loop's body, once per layer.
  result, numbers = run_plan(tmp_path, tfds_dir, '--gpu=h100:8', '--config.model.scan_layers=true')
  assert result.returncode == 0, result.stderr[-3000:]
  p = numbers['plan']
  assert p['devices'] == 8 and p['device_kind'] == 'NVIDIA H100 80GB HBM3'
  assert p['mesh'] == {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert p['memory_limit'] == 0.75 * 81559 * 2**20  # JAX's default share of an H100's 81,559 MiB
  assert 12 * params <= p['state_bytes'] <= 12 * params + 64
  assert 4 * params <= p['collectives']['all-reduce'] <= 4 * (params + embedding) + 1024
  assert p['fits'] and p['xla_flops'] is None and 'XLA: not counted by this compiler' in result.stdout
  assert p['projection']['step_s'] > 0 and p['peak_flops'] == 989e12

  result, numbers = run_plan(tmp_path, tfds_dir, '--gpu=a100:2x4')  # two hosts of four
  assert result.returncode == 0, result.stderr[-3000:]
  assert numbers['plan']['devices'] == 8 and numbers['plan']['device_kind'] == 'NVIDIA A100-SXM4-80GB'
  result, _ = run_plan(tmp_path, tfds_dir, '--gpu=v100:8')
  assert result.returncode == 2 and "expected KIND:N or KIND:HOSTSxN with KIND one of ['a100', 'h100', 'h200']" in (
      result.stderr)


def test_plan_for_a_tpu_slice_and_a_proposal_when_it_does_not_fit(tmp_path, tfds_dir, smoke_params):
  params, embedding = smoke_params
  result, numbers = run_plan(tmp_path, tfds_dir, '--topology=v5e:2x2')
  assert result.returncode == 0, result.stderr[-3000:]
  p = numbers['plan']
  assert p['devices'] == 4 and 'v5' in p['device_kind'] and p['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  for line in ('memory per device', 'FLOPs per device per step', 'collectives per device per step',
               'projected step'):
    assert line in result.stdout
  # Data parallel: every device holds the f32 params and Adam's two moments (plus the step counters), and the
  # gradient of every param is all-reduced (the tied embedding's two uses, lookup and output projection, may be
  # reduced apart), plus the loss and a few scalars.
  assert 12 * params <= p['state_bytes'] <= 12 * params + 64
  assert 4 * params <= p['collectives']['all-reduce'] <= 4 * (params + embedding) + 1024
  assert p['fits'] and p['memory_limit'] == plan.CHIPS['v5e'].hbm_bytes and p['model_flops'] > 0

  # A limit below the data-parallel step: sharding the state over the 4 chips (fsdp) is proposed, compiled, fits.
  limit = 0.8 * p['bytes_per_device'] / 2**30
  result, numbers = run_plan(tmp_path, tfds_dir, '--topology=v5e:2x2', f'--hbm_gib={limit}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'DOES NOT FIT' in result.stdout and 'proposal: add --config.mesh.data=1 --config.mesh.fsdp=-1' in result.stdout
  assert not numbers['plan']['fits'] and numbers['proposed']['fits']
  assert numbers['proposal']['mesh.fsdp'] == -1 and numbers['proposed']['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert numbers['proposed']['state_bytes'] < p['state_bytes'] / 2
  # The proposal, given on the command line, is the plan it printed.
  flags = [f'--config.{k}={v}' for k, v in numbers['proposal'].items()]
  result, again = run_plan(tmp_path, tfds_dir, '--topology=v5e:2x2', f'--hbm_gib={limit}', *flags)
  assert result.returncode == 0 and again['plan']['fits']
  assert again['plan']['bytes_per_device'] == numbers['proposed']['bytes_per_device']

  # Two slices joined over the data-centre network: one mesh over both.
  result, two = run_plan(tmp_path, tfds_dir, '--topology=v5e:2x2', '--num_slices=2')
  assert result.returncode == 0 and two['plan']['devices'] == 8 and two['plan']['mesh']['data'] == 8

  # Bad input: one line, status 2.
  for flags, message in [(('--topology=v5e:2x2x2',), 'v5e slices have 2 dimensions'),
                         (('--topology=v7x:2x2',), 'GENERATION one of'),
                         (('--topology=v5e:2x2', '--hbm_gib=-1'), 'a memory of 0 GiB'),
                         (('--num_slices=2',), 'joins slices of a --topology'),
                         (('--topology=v5e:2x2', '--gpu=h100:8'), 'plan for one of them at a time'),
                         (('--gpu=h100:16',), 'holds at most 8 GPUs; name the hosts as KIND:HOSTSxN, e.g. h100:2x8.'),
                         (('--gpu=h200:2x12',), 'name the hosts as KIND:HOSTSxN, e.g. h200:4x6.')]:
    result, _ = run_plan(tmp_path, tfds_dir, *flags)
    assert result.returncode == 2 and message in result.stderr, (flags, result.stderr[-2000:])
    assert len(result.stderr.strip().splitlines()) == 1
  # A --json that cannot be written is refused before anything compiles.
  result = subprocess.run([sys.executable, '-m', 'foundation.plan', f'--config={SMOKE}', '--topology=v5e:2x2',
                           '--json=/nonexistent/plan.json'], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 2 and result.stderr == (
      'error: --json=/nonexistent/plan.json: /nonexistent is not a directory this process can write to.\n')


@pytest.mark.parametrize('mesh, sharded', [((2, -1, 1), False), ((-1, 2, 1), False), ((1, -1, 1), True),
                                           ((1, 8, 1), True), ((1, 4, 2), True), ((2, 2, 2), False)])
def test_the_first_proposal_shards_the_state_over_every_device_unless_it_is(mesh, sharded):
  config = load('configs/lm/shakespeare.py').get_config('smoke')
  config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  first = plan.proposals(config, jax.devices())[0]
  assert (first.get('mesh.fsdp') != -1) == sharded, first
  assert first.get('mesh.tensor', mesh[2]) == mesh[2]  # tensor parallelism shards the state too: it stays


def test_every_proposal_is_a_config_that_would_run():
  # Tensor 2 on 4 devices gives 2 replicas for a batch of 2: a proposal of tensor 1 (4 replicas) would not divide
  # it, nor would microbatches of its one row per replica.
  config = load('configs/lm/shakespeare.py').get_config('smoke')
  config.mesh.update(data=2, fsdp=1, tensor=2)
  config.update(global_batch_size=2)
  config.eval.batch_size = 2
  out = plan.proposals(config, jax.devices()[:4])
  assert out[0] == {'mesh.data': 1, 'mesh.fsdp': -1, 'mesh.tensor': 2}
  assert not any('grad_accum_steps' in changes for changes in out)
  for changes in out:
    train.validate(plan.with_changes(config, changes), 4, 1)


def test_dry_run_plans_the_local_devices_and_writes_nothing(tmp_path, tfds_dir):
  result, _ = run_plan(tmp_path, tfds_dir, '--dry_run', f'--workdir={tmp_path / "run"}', module='foundation.main')
  assert result.returncode == 0, result.stderr[-3000:]
  assert "this machine: 8 x cpu, mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in result.stdout
  assert 'memory per device' in result.stdout and 'fits' in result.stdout
  assert not (tmp_path / 'run').exists()


def test_footprint_is_flops_hours_and_the_power_table():
  Device = collections.namedtuple('Device', 'platform device_kind')
  cfg = ml_collections.ConfigDict(dict(device_watts=0.0, pue=1.2, grid_gco2e_per_kwh=500.0))
  v4 = [Device('tpu', 'TPU v4')] * 4
  assert metrics.footprint(v4, 1800, 1e15, cfg) == pytest.approx({
      'compute/model_flops': 1e15, 'compute/device_hours': 2.0,
      'compute/energy_kwh': 4 * 170 * 0.5 / 1000 * 1.2, 'compute/co2e_kg': 4 * 170 * 0.5 / 1000 * 1.2 * 0.5})
  v5e = [Device('tpu', 'TPU v5 lite')] * 8
  assert set(metrics.footprint(v5e, 3600, 1.0, cfg)) == {'compute/model_flops', 'compute/device_hours'}  # unknown
  cfg.device_watts = 200.0
  assert metrics.footprint(v5e, 3600, 1.0, cfg)['compute/energy_kwh'] == pytest.approx(8 * 200 / 1000 * 1.2)
  cpus = [Device('cpu', 'cpu')] * 8  # fake devices share the machine's cores: its power, not 8 devices'
  cfg.device_watts = 0.0
  assert metrics.footprint(cpus, 3600, 1.0, cfg)['compute/energy_kwh'] == pytest.approx(
      metrics.CPU_WATTS_PER_CORE * os.cpu_count() / 1000 * 1.2)
  # The H100's PCIe and NVL boards are not the SXM part: their own data-sheet peaks and powers.
  for kind, peak, watts in [('NVIDIA H100 80GB HBM3', 989e12, 700), ('NVIDIA H100 PCIe', 756e12, 350),
                            ('NVIDIA H100 NVL', 835e12, 400)]:
    gpus = [Device('gpu', kind)] * 2
    assert (metrics.peak_flops(gpus), metrics.device_watts(gpus)) == (2 * peak, 2 * watts), kind


def test_a_compiler_without_memory_figures_is_not_reported_as_fitting(tfds_dir, monkeypatch):
  """No memory analysis would read as 0 bytes per device, which always fits: the plan refuses to say instead."""
  config = load('configs/lm/shakespeare.py').get_config('smoke')
  config.data.data_dir = tfds_dir
  monkeypatch.setattr(jax.stages.Compiled, 'memory_analysis', lambda self: None)
  with pytest.raises(ValueError, match='gives no memory analysis of the step'):
    plan.plan(config, jax.devices())


# Meshes on TPU devices (the TPU compiler's topologies, no chips): the slice of each device along the data axis, a
# multislice mesh whose data axis does not cover the slices, and a shape that cuts a slice's physical axes.
MESH_ON_TPU = """
import sys
from foundation import plan, sharding
if sys.argv[1] == 'slices':
  devices = plan.tpu_devices('v5e:2x2', 2)
  mesh = sharding.make_mesh({'data': 2, 'fsdp': -1, 'tensor': 1}, devices)
  print([sorted({d.slice_index for d in row.flat}) for row in mesh.devices])
  try:
    sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1}, devices)
  except ValueError as e:
    print(e)
else:
  print(dict(sharding.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 8}, plan.tpu_devices('v5e:4x4')).shape))
"""


def test_a_multislice_mesh_keeps_fsdp_within_a_slice_and_any_shape_a_slice_can_hold_is_placed():
  outputs = {}
  for case in ('slices', 'split'):
    result = subprocess.run([sys.executable, '-c', MESH_ON_TPU, case], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs[case] = result
  lines = outputs['slices'].stdout.splitlines()
  assert lines[0] == '[[0], [1]]'  # each data row is one slice: fsdp's collectives stay on the slice's own links
  assert lines[1] == ("config.mesh {'data': 1, 'fsdp': 8, 'tensor': 1} on 2 slices: the data axis must be a "
                      'multiple of 2, so that fsdp and tensor stay within a slice.')
  # tensor 8 on a 4x4 slice has no physical axis of its size: placed across two, with a warning.
  assert outputs['split'].stdout.strip() == "{'data': 1, 'fsdp': 2, 'tensor': 8}"
  assert 'does not follow the physical axes of these chips' in outputs['split'].stderr


def test_a_plan_checks_the_data_against_the_hosts_of_the_slice(tmp_path, tfds_dir):
  # One shard feeds this one process, but a v4:2x2x2 slice has 2 hosts, each of which reads whole shards: the
  # run there would be refused, so the plan is.
  config = load('configs/lm/shakespeare.py').get_config('smoke')
  config.data.update(data_dir=tfds_dir, num_shards=1)
  assert len(tasks.build(config).train_batches(0, 1)[0]['inputs']) == config.global_batch_size
  result, _ = run_plan(tmp_path, tfds_dir, '--topology=v4:2x2x2', '--config.data.num_shards=1')
  assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
      'error: num_shards=1 must be divisible by process_count=2: each process reads whole shards, the same number '
      'each.'), result.stderr[-3000:]


def test_forward_flops_counts_each_matmul_and_warns_of_a_loop_it_counts_once(capsys):
  x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
  assert metrics.forward_flops(lambda a: a @ a @ a @ a, x) == 3 * 2 * 8**3  # three 8x8x8 matmuls, by hand
  assert 'WARNING' not in capsys.readouterr().err
  scanned = metrics.forward_flops(lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=3)[0], x)
  assert scanned == pytest.approx(2 * 8**3, abs=8)  # the body once (and its counter): scanned layers, a warning
  assert 'whose body XLA counts once' in capsys.readouterr().err
