"""Soft prompts, prefixes and LoRA against a numpy decoder that inserts them by hand.

The numpy reference runs one example at a time with no cache and no padding: a soft prompt is P input vectors in
front of the token embeddings (positions 0..P-1, the text after them); a prefix is P extra keys and values in front
of every layer's own (not rotated), the text at positions P, P+1, ... The code under test holds either as a one-row
KV cache that left-padded batches of several lengths attend to (`foundation/models/adapters.py`), under
grouped-query attention and rotary positions, scanned and unscanned. LoRA is checked against the numpy decoder run
with W + alpha/rank * A B written into its weights.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foundation.evaluate import lm_classify as lmc
from foundation.models import adapters
from foundation.models.transformer import (Transformer, TransformerConfig, is_lora_param, lora_target_names,
                                           merge_lora, stack_layers)
from test_transformer import np_rms_norm, np_rope

TINY = TransformerConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                         max_len=64, init_std=0.25)
P = 3
BODIES = [np.array([5, 9, 2, 7, 1]), np.array([3, 8]), np.array([4, 4, 6, 10, 11, 12, 13])]
LABELS = np.array([[20, 21], [30, 0]])  # two classes; the second label is one token (padded)
LABEL_MASK = np.array([[True, True], [True, False]])


def np_log_probs(params, cfg, x, prefix_kv=None):
  """log p(next token) [length, vocab] of input vectors x [length, embed] (float64), after per-layer prefix keys and
  values (prefix_kv: layer -> (keys, values) [P, kv_heads, head_dim]) when given; positions start after them."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  group = cfg.num_heads // cfg.num_kv_heads
  length = len(x)
  offset = 0 if prefix_kv is None else len(prefix_kv[0][0])
  positions = offset + np.arange(length, dtype=np.float64)
  visible = np.concatenate([np.ones((length, offset), bool), np.tril(np.ones((length, length), bool))], axis=1)
  for layer in range(cfg.num_layers):
    lp = p[f'layers_{layer}']
    h = np_rms_norm(x, lp['attention_norm']['scale'], cfg.norm_eps)
    attn = np.zeros_like(x)
    for head in range(cfg.num_heads):
      kv = head // group
      q = np_rope(h @ lp['attention']['query'][:, head], positions, cfg.rope_base)
      k = np_rope(h @ lp['attention']['key'][:, kv], positions, cfg.rope_base)
      v = h @ lp['attention']['value'][:, kv]
      if prefix_kv is not None:
        k = np.concatenate([np.asarray(prefix_kv[layer][0][:, kv], np.float64), k])
        v = np.concatenate([np.asarray(prefix_kv[layer][1][:, kv], np.float64), v])
      scores = np.where(visible, q @ k.T / np.sqrt(cfg.head_dim), -np.inf)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      attn += (weights / weights.sum(-1, keepdims=True) @ v) @ lp['attention']['out'][head]
    x = x + attn
    h = np_rms_norm(x, lp['mlp_norm']['scale'], cfg.norm_eps)
    gate = h @ lp['mlp']['gate']
    x = x + (gate / (1 + np.exp(-gate)) * (h @ lp['mlp']['up'])) @ lp['mlp']['down']
  logits = np_rms_norm(x, p['final_norm']['scale'], cfg.norm_eps) @ p['embedding'].T
  logits -= logits.max(-1, keepdims=True)
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def np_scores(params, cfg, body, *, prompt=None, prefix_kv=None):
  """Each class's summed label log-prob after [soft prompt +] body, one full numpy forward per class."""
  embedding = np.asarray(params['embedding'], np.float64)
  out = []
  for label, mask in zip(LABELS, LABEL_MASK):
    label = label[mask]
    x = embedding[np.concatenate([body, label[:-1]])]
    if prompt is not None:
      x = np.concatenate([np.asarray(prompt, np.float64), x])
    log_probs = np_log_probs(params, cfg, x, prefix_kv)[len(x) - len(label):]
    out.append(log_probs[np.arange(len(label)), label].sum())
  return np.array(out)


def batched_scores(cfg, params, cache):
  """The task's path: a left-padded batch of every body after the adapter's cache, labels scored from the cache."""
  tokens, mask = lmc.pad(BODIES, 8, 0, left=True)
  model = Transformer(dataclasses.replace(cfg, max_len=lmc.slots_needed(8, LABELS.shape[1], 0)))
  scores, _, _ = jax.jit(lmc.class_scores, static_argnums=0)(model, params, cache, tokens, mask, LABELS, LABEL_MASK)
  return np.asarray(scores)


@pytest.fixture(scope='module')
def base():
  return nn.unbox(jax.jit(Transformer(TINY).init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params'])


def for_layout(params, scan):
  cfg = dataclasses.replace(TINY, scan_layers=scan)
  return cfg, (stack_layers(params, TINY.num_layers) if scan else params)


@pytest.mark.parametrize('scan', [False, True], ids=['unscanned', 'scanned'])
def test_soft_prompt_is_input_vectors_before_the_text(base, scan):
  cfg, params = for_layout(base, scan)
  prompt = jax.random.normal(jax.random.key(1), (P, TINY.embed_dim))
  cache = jax.jit(adapters.prompt_cache, static_argnums=0)(Transformer(dataclasses.replace(cfg, max_len=P)), params,
                                                           prompt)
  expected = np.stack([np_scores(base, TINY, body, prompt=prompt) for body in BODIES])
  np.testing.assert_allclose(batched_scores(cfg, params, cache), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('scan', [False, True], ids=['unscanned', 'scanned'])
def test_prefix_is_unrotated_keys_and_values_before_every_layers_own(base, scan):
  cfg, params = for_layout(base, scan)
  shape = (TINY.num_layers, P, TINY.num_kv_heads, TINY.head_dim)
  keys, values = (jax.random.normal(k, shape) for k in jax.random.split(jax.random.key(2)))
  cache = adapters.prefix_cache(Transformer(dataclasses.replace(cfg, max_len=P)), keys, values)
  expected = np.stack([np_scores(base, TINY, body, prefix_kv=[(keys[i], values[i]) for i in range(TINY.num_layers)])
                       for body in BODIES])
  np.testing.assert_allclose(batched_scores(cfg, params, cache), expected, rtol=1e-4, atol=1e-4)


def test_soft_prompt_gradient_through_the_shared_cache_equals_the_full_forwards(base):
  """What tuning trains through: the gradient with respect to the soft prompt of the label log-likelihoods read
  through the shared one-row cache, against the same sum from full forwards with the prompt as input vectors (no
  cache; rows padded on the right, which a causal model's earlier positions never see)."""
  prompt = jax.random.normal(jax.random.key(4), (P, TINY.embed_dim))

  def through_cache(prompt):
    cache = adapters.prompt_cache(Transformer(dataclasses.replace(TINY, max_len=P)), base, prompt)
    tokens, mask = lmc.pad(BODIES, 8, 0, left=True)
    resized = Transformer(dataclasses.replace(TINY, max_len=lmc.slots_needed(8, LABELS.shape[1], 0)))
    return jnp.sum(lmc.class_scores(resized, base, cache, tokens, mask, LABELS, LABEL_MASK)[0])

  def full_forwards(prompt):
    total = 0.0
    for label, mask in zip(LABELS, LABEL_MASK):
      label = label[mask]
      tokens, _ = lmc.pad([np.concatenate([body, label[:-1]]) for body in BODIES], 10, 0, left=False)
      prompts = jnp.broadcast_to(prompt, (len(BODIES), *prompt.shape))
      log_probs = jax.nn.log_softmax(Transformer(TINY).apply({'params': base}, tokens, prefix_embeddings=prompts))
      for row, body in enumerate(BODIES):
        at = P + len(body) - 1 + np.arange(len(label))  # the positions that predict the label's tokens
        total += jnp.sum(log_probs[row, at, label])
    return total

  (value, grad), (expected, expected_grad) = (jax.jit(jax.value_and_grad(f))(prompt)
                                              for f in (through_cache, full_forwards))
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_prefix_from_tokens_is_what_the_model_caches_for_them(base):
  """A prefix initialised from tokens gives the scores of those tokens written as text before the body."""
  ids = jnp.array([17, 3, 40])
  keys, values = adapters.token_kv(Transformer(dataclasses.replace(TINY, max_len=P)), base, ids)
  cache = adapters.prefix_cache(Transformer(dataclasses.replace(TINY, max_len=P)), keys, values)
  expected = np.stack([np_scores(base, TINY, np.concatenate([ids, body])) for body in BODIES])
  np.testing.assert_allclose(batched_scores(TINY, base, cache), expected, rtol=1e-4, atol=1e-4)


def test_reparameterised_prefix_folds_to_the_same_scores(base):
  mlp = adapters.Prefix(P, TINY.num_layers, TINY.num_kv_heads, TINY.head_dim, TINY.embed_dim, hidden=16)
  mlp_params = mlp.init(jax.random.key(3), None)['params']
  direct = adapters.Prefix(P, TINY.num_layers, TINY.num_kv_heads, TINY.head_dim, TINY.embed_dim)
  folded = adapters.fold_prefix(mlp, mlp_params, None)
  assert set(folded) == set(direct.init(jax.random.key(0), None)['params'])  # a direct prefix's own params
  model = Transformer(dataclasses.replace(TINY, max_len=P))
  through_mlp = batched_scores(TINY, base, adapters.prefix_cache(model, *mlp.apply({'params': mlp_params}, None)))
  through_folded = batched_scores(TINY, base, adapters.prefix_cache(model, *direct.apply({'params': folded}, None)))
  np.testing.assert_array_equal(through_folded, through_mlp)
  assert np.abs(through_mlp - batched_scores(TINY, base, None)[:, :]).max() > 1e-3  # the prefix changes the scores


def test_offset_parameterisation_starts_at_the_initial_values_and_trains_like_the_values():
  """An adapter stored as (frozen initial values + learned offset) has the gradient of the values themselves."""
  initial = jax.random.normal(jax.random.key(4), (P, TINY.embed_dim))
  prompt = adapters.SoftPrompt(P, TINY.embed_dim)
  params = prompt.init(jax.random.key(0), initial)['params']
  np.testing.assert_array_equal(prompt.apply({'params': params}, initial), initial)
  target = jax.random.normal(jax.random.key(5), (P, TINY.embed_dim))
  loss = lambda x: jnp.sum(jnp.sin(x) * target)
  by_offset = jax.grad(lambda p: loss(prompt.apply({'params': p}, initial)))(params)['offset']
  np.testing.assert_allclose(by_offset, jax.grad(loss)(initial), rtol=1e-6)


def test_init_tokens():
  labels = [[7, 8], [9]]
  assert adapters.init_token_ids('uniform', 5, 100, labels, 0).shape == (0,)
  ids = adapters.init_token_ids('labels', 5, 1000, labels, 0)
  assert ids[:3].tolist() == [7, 8, 9] and len(ids) == 5 and (ids[3:] >= 256).all()
  np.testing.assert_array_equal(adapters.init_token_ids('vocab', 5, 1000, labels, 3),
                                adapters.init_token_ids('vocab', 5, 1000, labels, 3))
  with pytest.raises(ValueError, match='choose one of'):
    adapters.init_token_ids('zeros', 5, 100, labels, 0)


# ---- LoRA ---------------------------------------------------------------------------------------------------------

LORA = dataclasses.replace(TINY, lora_rank=3, lora_alpha=6.0, lora_targets='attention/(query|out)|layers_1/mlp/down')


def lora_params(base, cfg, seed=6):
  """base's weights plus LoRA factors of cfg, with B drawn at random (it starts at zero) so the update is visible."""
  init = nn.unbox(Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))['params'])
  flat = {'/'.join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(init)}
  rng = np.random.default_rng(seed)
  out = jax.tree.map(np.asarray, base)
  for name, value in flat.items():
    if is_lora_param(name):
      *where, leaf = name.split('/')
      node = out
      for part in where:
        node = node[part]
      node[leaf] = np.asarray(value) if leaf.endswith('_a') else rng.normal(size=value.shape).astype(np.float32)
  return out


def np_merged(params, cfg):
  """numpy: every targeted weight W [*in, *out] becomes W + alpha/rank * (A [*in, r] contracted with B [r, *out])."""
  merged = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  for path in lora_target_names(cfg):
    layer, module, name = path.split('/')
    node = merged[layer][module]
    a, b = node.pop(f'{name}_lora_a'), node.pop(f'{name}_lora_b')
    node[name] = node[name] + cfg.lora_alpha / cfg.lora_rank * np.tensordot(a, b, axes=1)
  return merged


def np_body_log_probs(params, cfg, body):
  return np_log_probs(params, cfg, np.asarray(params['embedding'], np.float64)[body])


def test_lora_targets_only_the_named_projections():
  assert lora_target_names(LORA) == ['layers_0/attention/query', 'layers_0/attention/out',
                                     'layers_1/attention/query', 'layers_1/attention/out', 'layers_1/mlp/down']
  params = nn.unbox(Transformer(LORA).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params'])
  names = ['/'.join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert sorted(n.rsplit('_lora_', 1)[0] for n in names if is_lora_param(n)) == sorted(
      [t for t in lora_target_names(LORA) for _ in 'ab'])
  shapes = {n: v.shape for n, v in zip(names, jax.tree.leaves(params))}
  assert shapes['layers_0/attention/out_lora_a'] == (TINY.num_heads, TINY.head_dim, 3)
  assert shapes['layers_0/attention/out_lora_b'] == (3, TINY.embed_dim)
  assert not np.any(params['layers_1']['mlp']['down_lora_b'])  # B starts at zero
  with pytest.raises(ValueError, match="matches no projection; paths look like 'layers_0/attention/query'"):
    dataclasses.replace(TINY, lora_rank=2, lora_targets='attn/q')


def test_lora_with_zero_b_is_the_base_model(base):
  params = lora_params(base, LORA)
  for layer in ('layers_0', 'layers_1'):
    for module in params[layer].values():
      for name in list(module):
        if name.endswith('_lora_b'):
          module[name] = np.zeros_like(module[name])
  tokens = jnp.asarray(BODIES[2][None])
  np.testing.assert_array_equal(Transformer(LORA).apply({'params': params}, tokens),
                                Transformer(TINY).apply({'params': base}, tokens))


@pytest.mark.parametrize('scan', [False, True], ids=['unscanned', 'scanned'])
def test_lora_unmerged_and_merged_equal_the_numpy_decoder_with_updated_weights(base, scan):
  # A scanned stack has one set of weights for every layer, so its targets name no single layer.
  lora = dataclasses.replace(LORA, lora_targets='attention/(query|out)|mlp/down') if scan else LORA
  params = lora_params(base, lora)
  expected = np_body_log_probs(np_merged(params, lora), TINY, BODIES[2])
  cfg = dataclasses.replace(lora, scan_layers=scan)
  layout = stack_layers(params, TINY.num_layers) if scan else params
  tokens = jnp.asarray(BODIES[2][None])
  unmerged = jax.nn.log_softmax(Transformer(cfg).apply({'params': layout}, tokens)[0])
  np.testing.assert_allclose(unmerged, expected, rtol=1e-4, atol=1e-4)
  merged, plain_cfg = merge_lora(layout, cfg)
  assert plain_cfg.lora_rank == 0 and not any(is_lora_param('/'.join(k.key for k in path))
                                              for path, _ in jax.tree_util.tree_leaves_with_path(merged))
  np.testing.assert_allclose(jax.nn.log_softmax(Transformer(plain_cfg).apply({'params': merged}, tokens)[0]),
                             unmerged, rtol=1e-5, atol=1e-5)
  assert np.abs(unmerged - np_body_log_probs(base, TINY, BODIES[2])).max() > 1e-2  # the factors change the model


def test_lora_gradients_reach_b_first():
  """With B = 0, the loss's gradient with respect to A is zero and with respect to B is not (Hu et al. 2021)."""
  params = nn.unbox(Transformer(LORA).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params'])
  tokens = jnp.asarray(BODIES[2][None])
  grads = jax.grad(lambda p: jnp.mean(Transformer(LORA).apply({'params': p}, tokens) ** 2))(params)
  attention = grads['layers_0']['attention']
  assert not np.any(attention['query_lora_a']) and np.any(attention['query_lora_b'])
