import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from foundation import optim


def optim_config(**overrides):
  c = ml_collections.ConfigDict(dict(
      name='adamw', lr=0.1, schedule='cosine', warmup_steps=10, end_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.5, weight_decay_exclude=('norm',), grad_clip=0.0, freeze=()))
  c.update(overrides)
  return c


def params():
  return {'layer': {'kernel': jnp.ones((3, 2)), 'norm': {'scale': jnp.ones((2,))}}, 'head': jnp.ones((2,))}


def test_schedule_warmup_then_cosine_closed_form():
  schedule = optim.learning_rate_schedule(optim_config(), total_steps=110)
  for step in (0, 5, 10):
    np.testing.assert_allclose(schedule(step), 0.1 * step / 10, rtol=1e-6)
  for step in (10, 35, 60, 110):
    progress = (step - 10) / 100
    want = 0.1 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))
    np.testing.assert_allclose(schedule(step), want, rtol=1e-5)


def test_weight_decay_mask_skips_excluded_names():
  # With zero gradients AdamW's only update is decay: -lr * wd * param on decayed leaves, 0 on excluded ones.
  cfg = optim_config(schedule='constant', warmup_steps=0)
  tx, _ = optim.make_optimizer(cfg, params(), total_steps=10)
  p = params()
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
  np.testing.assert_allclose(updates['layer']['kernel'], -0.1 * 0.5 * np.ones((3, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates['head'], -0.05 * np.ones(2), rtol=1e-6)
  np.testing.assert_array_equal(updates['layer']['norm']['scale'], 0.0)


def test_freeze_by_regex_gives_zero_updates_and_no_state():
  cfg = optim_config(schedule='constant', warmup_steps=0, freeze=('^layer/',))
  tx, _ = optim.make_optimizer(cfg, params(), total_steps=10)
  p = params()
  grads = jax.tree.map(jnp.ones_like, p)
  state = tx.init(p)
  updates, _ = tx.update(grads, state, p)
  np.testing.assert_array_equal(updates['layer']['kernel'], 0.0)
  np.testing.assert_array_equal(updates['layer']['norm']['scale'], 0.0)
  assert np.all(np.asarray(updates['head']) < 0)
  moment_sizes = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, 'size') and x.ndim > 0)
  assert moment_sizes == 2 * 2  # Adam's two moments for `head` only


def test_clipping_bounds_the_global_norm():
  cfg = optim_config(name='sgd', b1=0.0, schedule='constant', warmup_steps=0, weight_decay=0.0, grad_clip=1.0, lr=1.0)
  tx, _ = optim.make_optimizer(cfg, params(), total_steps=10)
  p = params()
  grads = jax.tree.map(lambda x: 10 * jnp.ones_like(x), p)
  updates, _ = tx.update(grads, tx.init(p), p)
  np.testing.assert_allclose(float(optim.global_norm(updates)), 1.0, rtol=1e-5)


@pytest.mark.parametrize('freeze', [(), ('norm',)])
def test_keep_zeros_leaves_the_zero_entries_of_matching_params_at_zero(freeze):
  """Also beside a freeze, including of a parameter keep_zeros names (fine-tuning part of a pruned model)."""
  cfg = optim_config(schedule='constant', warmup_steps=0, keep_zeros=('kernel', 'scale'), freeze=freeze)
  p = params()
  p['layer']['kernel'] = jnp.array([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
  p['head'] = jnp.array([0.0, 1.0])  # a zero outside the pattern trains as usual
  tx, _ = optim.make_optimizer(cfg, p, total_steps=10)
  state = tx.init(p)
  for _ in range(3):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, p), state, p)
    p = jax.tree.map(jnp.add, p, updates)
  kernel = np.asarray(p['layer']['kernel'])
  np.testing.assert_array_equal(kernel == 0, [[True, False], [False, True], [True, False]])
  assert np.all(kernel[kernel != 0] < [1.0, 2.0, 3.0])  # the others moved against the gradient
  assert p['head'][0] < 0
  assert np.all(p['layer']['norm']['scale'] == 1.0) == bool(freeze)


def test_keep_zeros_clips_the_sparse_model_s_gradient():
  """SGD at lr 1 with grad_clip 1: the pruned weight's gradient (10) must not count in the clipped norm, so the
  surviving weight moves by its whole gradient (1), not by 1/sqrt(101) of it."""
  cfg = optim_config(name='sgd', lr=1.0, b1=0.0, weight_decay=0.0, schedule='constant', warmup_steps=0,
                     grad_clip=1.0, keep_zeros=('w',), weight_decay_exclude=())
  p = {'w': jnp.array([0.0, 1.0])}
  tx, _ = optim.make_optimizer(cfg, p, total_steps=10)
  updates, _ = tx.update({'w': jnp.array([10.0, 1.0])}, tx.init(p), p)
  np.testing.assert_allclose(updates['w'], [0.0, -1.0], rtol=1e-6)


def test_lr_scale_is_a_learning_rate_per_parameter_group():
  """Three AdamW steps with lr_scale 'layer=0.1' equal three steps of a plain AdamW at a tenth of the learning rate
  on the 'layer' params (weight decay included), and of the plain one elsewhere."""
  def three_steps(cfg):
    p = params()
    tx, _ = optim.make_optimizer(cfg, p, total_steps=10)
    state = tx.init(p)
    for i in range(3):
      grads = jax.tree.map(lambda x: (i + 1.0) * jnp.cos(jnp.arange(x.size).reshape(x.shape) + i), p)
      updates, state = tx.update(grads, state, p)
      p = jax.tree.map(jnp.add, p, updates)
    return p
  scaled = three_steps(optim_config(lr_scale=('^layer/=0.1',)))
  slow, plain = three_steps(optim_config(lr=0.01)), three_steps(optim_config())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), scaled['layer'], slow['layer'])
  np.testing.assert_allclose(scaled['head'], plain['head'], rtol=1e-6)
  for bad in ('layer', 'layer=0', 'layer=x', '=2'):
    with pytest.raises(ValueError, match='must read REGEX=FACTOR'):
      optim.make_optimizer(optim_config(lr_scale=(bad,)), params(), total_steps=10)


@pytest.mark.parametrize('field', ['freeze', 'weight_decay_exclude', 'keep_zeros', 'lr_scale'])
def test_a_pattern_that_matches_nothing_is_an_error(field):
  with pytest.raises(ValueError, match='matches no parameter'):
    optim.make_optimizer(optim_config(**{field: ('lyaer=0.5' if field == 'lr_scale' else 'lyaer',)}), params(),
                         total_steps=10)
