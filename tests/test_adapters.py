"""Soft prompts and prefixes against a numpy decoder that inserts them by hand.

The numpy reference runs one example at a time with no cache and no padding: a soft prompt is P input vectors in
front of the token embeddings (positions 0..P-1, the text after them); a prefix is P extra keys and values in front
of every layer's own (not rotated), the text at positions P, P+1, ... The code under test holds either as a one-row
KV cache that left-padded batches of several lengths attend to (`foundation/models/adapters.py`), under
grouped-query attention and rotary positions, scanned and unscanned.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foundation.evaluate import lm_classify as lmc
from foundation.models import adapters
from foundation.models.transformer import Transformer, TransformerConfig
from test_transformer import np_rms_norm, np_rope, stack_layers

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
  model = Transformer(dataclasses.replace(cfg, max_len=lmc.slots_needed(P, 8, LABELS.shape[1], 0)))
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
