"""Contrastive losses against loop-based numpy versions, closed-form limits, and an 8-device sharded batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from foundation import losses, optim
from test_configs import load


def np_log_softmax_at(row, index):
  row = row.astype(np.float64)
  m = row.max()
  return row[index] - (m + np.log(np.sum(np.exp(row - m))))


def np_normalize(x):
  x = x.astype(np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def naive_nt_xent(z1, z2, temperature):
  n = len(z1)
  views = np_normalize(np.concatenate([z1, z2]))
  total = 0.0
  for a in range(2 * n):
    positive = (a + n) % (2 * n)
    others = [b for b in range(2 * n) if b != a]  # the positive and the 2N - 2 negatives
    sims = np.array([views[a] @ views[b] / temperature for b in others])
    total -= np_log_softmax_at(sims, others.index(positive))
  return total / (2 * n)


def naive_clip(img, txt, logit_scale):
  n = len(img)
  scale = np.exp(logit_scale)
  logits = np.array([[scale * float(img[i] @ txt[j]) for j in range(n)] for i in range(n)])
  i2t = -np.mean([np_log_softmax_at(logits[i], i) for i in range(n)])
  t2i = -np.mean([np_log_softmax_at(logits[:, j], j) for j in range(n)])
  return (i2t + t2i) / 2


def naive_siglip(img, txt, logit_scale, logit_bias):
  n = len(img)
  total = 0.0
  for i in range(n):
    for j in range(n):
      label = 1.0 if i == j else -1.0
      z = label * (np.exp(logit_scale) * float(img[i].astype(np.float64) @ txt[j]) + logit_bias)
      total += np.log1p(np.exp(-z))  # -log sigmoid(z)
  return total / n


def random_embeddings(n=16, d=8, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)


@pytest.mark.parametrize('temperature', [0.1, 0.5, 2.0])
def test_nt_xent_matches_numpy(temperature):
  z1, z2 = random_embeddings()
  z1 *= 3.0  # unnormalised inputs: the loss normalises
  np.testing.assert_allclose(float(losses.nt_xent(z1, z2, temperature)), naive_nt_xent(z1, z2, temperature),
                             rtol=1e-5)


@pytest.mark.parametrize('logit_scale', [0.0, np.log(1 / 0.07), np.log(300.0)])  # not clamped: the optimizer bounds it
def test_clip_loss_matches_numpy(logit_scale):
  img, txt = map(np_normalize, random_embeddings(seed=1))
  img, txt = img.astype(np.float32), txt.astype(np.float32)
  got = losses.clip_loss(img, txt, jnp.float32(logit_scale))
  np.testing.assert_allclose(float(got), naive_clip(img, txt, logit_scale), rtol=1e-5)


def test_clip_logit_scale_is_bounded_by_the_optimizer_and_comes_back_down():
  """The loss takes exp(logit_scale) as it is (numpy at a scale of 300); the CLIP config's optimizer clips the
  parameter at log(100) after each update, and a gradient that asks for a smaller scale moves it back below."""
  img, txt = map(np_normalize, random_embeddings(seed=2))
  np.testing.assert_allclose(float(losses.clip_loss(img.astype(np.float32), txt.astype(np.float32),
                                                    jnp.float32(np.log(300.0)))),
                             naive_clip(img, txt, np.log(300.0)), rtol=1e-5)
  config = load('configs/contrastive/clip_fashion_mnist.py').get_config()
  # Another parameter starts at the same value and is pushed up all along: the bound must not hold it.
  params = {'logit_scale': jnp.float32(np.log(100.0) - 1e-3), 'text_projection': jnp.full(3, np.log(100.0) - 1e-3)}
  tx, _ = optim.make_optimizer(config.optim, params, 1000)
  state = tx.init(params)

  def steps(sign, n):
    nonlocal params, state
    for _ in range(n):
      grads = {'logit_scale': jnp.float32(sign), 'text_projection': -jnp.ones(3)}
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return float(params['logit_scale'])

  assert abs(steps(-1.0, 200) - np.log(100.0)) < 1e-6  # pushed up: held at the bound
  assert steps(+1.0, 200) < np.log(100.0) - 0.05  # pushed down: it comes back
  assert float(params['text_projection'][0]) > np.log(100.0) + 0.05  # the bound touches no other parameter


@pytest.mark.parametrize('logit_scale,logit_bias', [(np.log(10.0), -10.0), (1.0, 0.5), (0.0, 2.0)])
def test_siglip_loss_matches_numpy(logit_scale, logit_bias):
  img, txt = map(np_normalize, random_embeddings(seed=3))
  img, txt = img.astype(np.float32), txt.astype(np.float32)
  got = losses.siglip_loss(img, txt, jnp.float32(logit_scale), jnp.float32(logit_bias))
  np.testing.assert_allclose(float(got), naive_siglip(img, txt, logit_scale, logit_bias), rtol=1e-5)


def test_perfect_alignment_gives_zero_loss():
  z, _ = random_embeddings(n=8, d=32, seed=4)
  z = np_normalize(z).astype(np.float32)  # random unit vectors in 32 dims are far from each other
  assert float(losses.nt_xent(z, z, 0.01)) < 1e-6
  eye = np.eye(8, 16, dtype=np.float32)  # identity-aligned, mutually orthogonal embeddings
  assert float(losses.clip_loss(eye, eye, jnp.float32(np.log(100.0)))) < 1e-6
  assert float(losses.siglip_loss(eye, eye, jnp.float32(np.log(100.0)), jnp.float32(-50.0))) < 1e-6
  # ... and misaligned pairs are penalised: chance level log(N) for CLIP with uninformative logits.
  np.testing.assert_allclose(float(losses.clip_loss(eye, eye, jnp.float32(-30.0))), np.log(8), rtol=1e-5)


def _mesh():
  return Mesh(np.array(jax.devices()).reshape(8), ('data',))


@pytest.mark.parametrize('name', ['nt_xent', 'clip', 'siglip'])
def test_sharded_global_batch_equals_single_device(name):
  """The batch split over 8 devices gives the single-device value and gradients: negatives cross devices."""
  assert jax.device_count() == 8
  a, b = (np_normalize(x).astype(np.float32) for x in random_embeddings(n=16, d=8, seed=5))  # 2 rows per device
  scale, bias = jnp.float32(np.log(10.0)), jnp.float32(-3.0)
  fn = {
      'nt_xent': lambda a, b, s, c: losses.nt_xent(a, b, jnp.exp(-s)),
      'clip': lambda a, b, s, c: losses.clip_loss(a, b, s),
      'siglip': lambda a, b, s, c: losses.siglip_loss(a, b, s, c),
  }[name]
  value_and_grad = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))

  single = jax.jit(value_and_grad)(*jax.device_put((a, b, scale, bias), jax.devices()[0]))
  mesh = _mesh()
  rows, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  args = (jax.device_put(a, rows), jax.device_put(b, rows), jax.device_put(scale, replicated),
          jax.device_put(bias, replicated))
  sharded = jax.jit(value_and_grad, in_shardings=(rows, rows, replicated, replicated))(*args)
  assert len(sharded[1][0].sharding.device_set) == 8

  # A per-device loss (each device's rows only) differs: the test would catch negatives staying local.
  local = np.mean([float(fn(a[i:i + 2], b[i:i + 2], scale, bias)) for i in range(0, 16, 2)])
  assert abs(local - float(single[0])) > 1e-2

  np.testing.assert_allclose(float(sharded[0]), float(single[0]), rtol=1e-5)
  for got, want in zip(sharded[1], single[1]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
