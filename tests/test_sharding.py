"""The sharding layer: mesh validation, parameters really sharded, and sharded math equal to one device's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from foundation import losses, optim, sharding, train
from foundation.models.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        max_len=16)


def loss_fn(model):
  def loss(params, batch):
    logits = model.apply({'params': params}, batch['inputs'])
    total, count = losses.next_token_xent(logits, batch['targets'], batch['weights'])
    return total / count
  return loss


def test_mesh_shape_resolves_and_rejects():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2, 'tensor': 1}, 8) == (4, 2, 1)
  with pytest.raises(ValueError, match='multiplies to 4 but there are 8 devices'):
    sharding.mesh_shape({'data': 2, 'fsdp': 2, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match='not divisible by 3'):
    sharding.mesh_shape({'data': -1, 'fsdp': 3, 'tensor': 1}, 8)
  with pytest.raises(ValueError, match='at most one axis may be -1'):
    sharding.mesh_shape({'data': -1, 'fsdp': -1, 'tensor': 1}, 8)


def test_unknown_logical_axis_override_is_an_error():
  with pytest.raises(ValueError, match='unknown logical axes'):
    sharding.logical_rules({'mpl': None})


@pytest.mark.parametrize('scan_layers', [False, True])
def test_params_and_adam_state_are_created_sharded(scan_layers):
  cfg = TransformerConfig(**{**CFG.__dict__, 'scan_layers': scan_layers})
  model = Transformer(cfg)
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  rules = sharding.logical_rules()
  init = lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))['params']
  abstract = jax.eval_shape(init, jax.random.key(0))
  tx, _ = optim.make_optimizer(_optim_cfg(), nn.unbox(abstract), 10)
  shardings = train._state_shardings(abstract, tx, mesh, rules)
  params = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings['params'])(jax.random.key(0))
  opt_state = jax.jit(tx.init, out_shardings=shardings['opt_state'])(params)

  prefix = (cfg.num_layers,) if scan_layers else ()
  up = params['layers']['mlp']['up'] if scan_layers else params['layers_0']['mlp']['up']
  assert up.shape == prefix + (32, 64)
  # embed (32) split over fsdp=2, mlp (64) over tensor=2: each device holds a quarter.
  assert {s.data.shape for s in up.addressable_shards} == {prefix + (16, 32)}
  embedding = params['embedding']  # (vocab 64 -> tensor, embed 32 -> fsdp)
  assert {s.data.shape for s in embedding.addressable_shards} == {(32, 16)}
  adam_mu = opt_state[1][0].mu['embedding']  # chain(clip, adamw) -> adamw's ScaleByAdamState
  assert {s.data.shape for s in adam_mu.addressable_shards} == {(32, 16)}


def _optim_cfg():
  import ml_collections
  from foundation import config_base
  return ml_collections.ConfigDict(config_base.optimizer(schedule='constant', warmup_steps=0, b2=0.95,
                                                         weight_decay=0.1, weight_decay_exclude=('norm',),
                                                         grad_clip=1.0))


def test_parameters_left_whole_on_a_sharding_mesh_are_named(caplog):
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1})
  put = lambda shape, spec: jax.device_put(jnp.zeros(shape), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*spec)))
  params = {'conv': {'kernel': put((3, 3, 64, 128), ())}, 'dense': {'kernel': put((512, 10), ('fsdp',))},
            'norm': {'scale': put((64,), ())}}
  lines = sharding.warn_replicated(params, mesh)
  assert lines == ["['conv']['kernel'] (3, 3, 64, 128)", "['norm']['scale'] (64,)"]
  assert 'replicated on every device' in caplog.text and 'sharding_rules' in caplog.text
  assert sharding.warn_replicated(params, sharding.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1})) == []


@pytest.mark.parametrize('mesh_cfg', [{'data': 8, 'fsdp': 1, 'tensor': 1}, {'data': 2, 'fsdp': 2, 'tensor': 2},
                                      {'data': 1, 'fsdp': 2, 'tensor': 4}])
def test_sharded_loss_and_grads_equal_one_device(mesh_cfg):
  model = Transformer(CFG)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, size=(8, 9))
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': np.ones((8, 8), np.float32)}
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  one_device = jax.devices()[0]
  want_loss, want_grads = jax.jit(jax.value_and_grad(loss_fn(model)))(
      jax.device_put(params, one_device), jax.device_put(batch, one_device))

  mesh = sharding.make_mesh(mesh_cfg)
  rules = sharding.logical_rules()
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  param_shardings = sharding.param_shardings(abstract, mesh, rules)
  sharded_params = jax.device_put(params, param_shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    loss, grads = jax.jit(jax.value_and_grad(loss_fn(model)), out_shardings=(None, param_shardings))(
        sharded_params, sharding.global_batch(batch, mesh))
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7),
               grads, want_grads)
  assert grads['layers_0']['mlp']['gate'].sharding.spec == param_shardings['layers_0']['mlp']['gate'].spec


@pytest.mark.parametrize('env, chips, expected', [
    ({}, 0, None),                                                    # one host: nothing to join
    ({}, 4, ()),                                                      # a Cloud TPU VM: JAX reads the metadata
    ({'JAX_PLATFORMS': 'cpu'}, 4, None),                              # forced onto the CPU
    ({'TPU_WORKER_HOSTNAMES': 'a,b'}, 0, ()),                         # GKE
    ({'MEGASCALE_COORDINATOR_ADDRESS': '10.0.0.2'}, 0, ()),           # multislice
    ({'SLURM_NTASKS': '4', 'SLURM_STEP_NODELIST': 'n[1-4]'}, 0, ()),  # a SLURM step of four tasks
    ({'SLURM_NTASKS': '1', 'SLURM_STEP_NODELIST': 'n1'}, 0, None),    # one SLURM task
])
def test_distributed_initialisation_is_left_to_jax_where_it_detects_a_cluster(monkeypatch, env, chips, expected):
  for name in ('JAX_PLATFORMS', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS', 'SLURM_NTASKS',
               'SLURM_STEP_NODELIST'):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setattr(sharding, '_tpu_chips_on_this_host', lambda: chips)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(tuple(sorted(kwargs.items()))))
  sharding.initialize_distributed(None, None, None)
  assert calls == ([] if expected is None else [expected])
  calls.clear()  # explicit flags always win, passed through as given
  sharding.initialize_distributed('10.0.0.1:1234', 2, 1)
  assert calls == [(('coordinator_address', '10.0.0.1:1234'), ('num_processes', 2), ('process_id', 1))]
  with pytest.raises(ValueError, match='needs --num_processes and --process_id'):
    sharding.initialize_distributed('10.0.0.1:1234', None, None)


def test_this_machine_has_no_tpu_chips():
  assert sharding._tpu_chips_on_this_host() == 0  # pylint: disable=protected-access  (JAX's PCI scan runs here)


def test_the_multi_host_flags_may_come_from_the_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(tuple(sorted(kwargs.items()))))
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  sharding.initialize_distributed(None, None, None)
  assert calls == [(('coordinator_address', '10.0.0.1:1234'), ('num_processes', 2), ('process_id', 1))]
  sharding.initialize_distributed('10.0.0.9:99', 4, 3)  # flags win over the environment
  assert calls[-1] == (('coordinator_address', '10.0.0.9:99'), ('num_processes', 4), ('process_id', 3))
  monkeypatch.setenv('JAX_PROCESS_ID', 'one')
  with pytest.raises(ValueError, match=r"^JAX_PROCESS_ID='one' is not an integer\.$"):
    sharding.initialize_distributed(None, None, None)
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS')
  with pytest.raises(ValueError, match='JAX_PROCESS_ID is set without JAX_COORDINATOR_ADDRESS'):
    sharding.initialize_distributed(None, None, None)
  assert len(calls) == 2
