"""Adapters of a frozen `Transformer` that act through its KV cache: soft prompts and prefix tuning.

Both give every example the same learned start, held as a one-row KV cache of P slots that the example's tokens
attend to, exactly like a shared text prefix (`evaluate/lm_classify.py` puts a chat turn's start or in-context
demonstrations there too, after it):

- soft prompt (Lester et al. 2021): P learned input embeddings run through the frozen model; their keys and values
  at every layer follow from them, at positions 0..P-1;
- prefix (Li & Liang 2021): P learned keys and values at every layer directly, per KV head under grouped-query
  attention. They are not rotated: a free key vector already is whatever rotation of itself RoPE would make it.
  Optionally reparameterised as Li & Liang train it (P embeddings through a two-layer tanh MLP that outputs every
  layer's keys and values); `fold_prefix` turns that into the plain keys and values after training.

Either way the text after the adapter starts at position P, in training and in evaluation alike, because both read
the same cache.

Initialisation from the vocabulary (Lester et al.'s best; for prefixes, the keys and values the model computes for
those tokens, as Li & Liang initialise from real words) stores the learned values as an offset from their initial
values, which are computed from the frozen model inside the step: the initialiser then needs no copy of the frozen
weights, the optimisation is the same (Adam and SGD see the same gradients), and weight decay pulls the adapter back
towards its initial text rather than towards zero.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from foundation.models.transformer import Transformer, init_cache

Array = jax.Array

PROMPT_INITS = ('vocab', 'labels', 'uniform')


def init_token_ids(kind: str, length: int, vocab_size: int, label_ids: list[list[int]], seed: int) -> np.ndarray:
  """Tokens whose embeddings (or keys and values) an adapter starts from: `length` ids sampled from the vocabulary
  ('vocab'), or the label words' tokens first, cycled over the classes, then sampled ids ('labels', Lester et al.'s
  class-label init). Empty for 'uniform' (random values, no tokens)."""
  if kind not in PROMPT_INITS:
    raise ValueError(f'adapter init {kind!r}; choose one of {PROMPT_INITS}.')
  if kind == 'uniform':
    return np.zeros((0,), np.int32)
  # Skip the lowest ids: byte-level BPE vocabularies put special and control tokens there.
  sampled = np.random.default_rng([seed, 7]).integers(min(256, vocab_size // 2), vocab_size, length)
  if kind == 'labels':
    words = [t for ids in label_ids for t in ids]
    sampled[:min(len(words), length)] = words[:length]
  return sampled.astype(np.int32)


class SoftPrompt(nn.Module):
  """P prompt embeddings: the initial tokens' embeddings (from the frozen table, passed in) + a learned offset, or
  uniform values in [-0.5, 0.5] when there are no initial tokens."""
  length: int
  embed_dim: int

  @nn.compact
  def __call__(self, initial: Array | None) -> Array:
    if initial is None:
      return self.param('embeddings', _uniform(0.5), (self.length, self.embed_dim))
    return jax.lax.stop_gradient(initial) + self.param('offset', nn.initializers.zeros, (self.length,
                                                                                          self.embed_dim))


def _uniform(scale: float):
  return lambda rng, shape, dtype=jnp.float32: jax.random.uniform(rng, shape, dtype, -scale, scale)


class Prefix(nn.Module):
  """Every layer's P prefix keys and values, [layers, P, kv_heads, head_dim] each.

  Direct: the initial tokens' keys and values (passed in) + a learned offset, or N(0, 1) values without initial
  tokens. Reparameterised (`hidden` > 0): P learned embeddings -> Dense(hidden) -> tanh -> Dense(all layers' keys
  and values), as Li & Liang train it (the direct form is unstable for them); `fold_prefix` removes the MLP.
  """
  length: int
  num_layers: int
  num_kv_heads: int
  head_dim: int
  embed_dim: int
  hidden: int = 0

  @nn.compact
  def __call__(self, initial: tuple[Array, Array] | None) -> tuple[Array, Array]:
    shape = (self.num_layers, self.length, self.num_kv_heads, self.head_dim)
    if self.hidden:
      x = self.param('embeddings', nn.initializers.normal(1.0), (self.length, self.embed_dim))
      x = jnp.tanh(nn.Dense(self.hidden, name='mlp_in')(x))
      kv = nn.Dense(2 * self.num_layers * self.num_kv_heads * self.head_dim, name='mlp_out')(x)
      kv = kv.reshape(self.length, 2, self.num_layers, self.num_kv_heads, self.head_dim)
      return jnp.moveaxis(kv[:, 0], 0, 1), jnp.moveaxis(kv[:, 1], 0, 1)
    if initial is None:
      return (self.param('key', nn.initializers.normal(1.0), shape),
              self.param('value', nn.initializers.normal(1.0), shape))
    keys, values = jax.lax.stop_gradient(initial)
    return (keys + self.param('key_offset', nn.initializers.zeros, shape),
            values + self.param('value_offset', nn.initializers.zeros, shape))


def fold_prefix(module: Prefix, params, initial) -> dict:
  """The params of a direct prefix (`hidden=0`, no initial tokens) with the same keys and values: what inference
  keeps once the reparameterising MLP (or the initial values + offset) has done its job."""
  keys, values = module.apply({'params': params}, initial)
  return {'key': keys, 'value': values}


def token_kv(model: Transformer, lm_params, ids: Array) -> tuple[Array, Array]:
  """Every layer's keys and values [layers, P, kv_heads, head_dim] for the tokens `ids` [P] at positions 0..P-1:
  what the frozen model would cache for them (the start of a prefix initialised from real words)."""
  cache = _cache_of(model, lm_params, ids[None], None)
  keys, values = _cache_kv(cache, model.config)
  return keys[:, 0], values[:, 0]


def prompt_cache(model: Transformer, lm_params, embeddings: Array) -> dict:
  """The one-row KV cache (of `model`, max_len >= P) after the soft prompt `embeddings` [P, embed]."""
  return _cache_of(model, lm_params, jnp.zeros((1, 0), jnp.int32), embeddings[None])


def prefix_cache(model: Transformer, keys: Array, values: Array) -> dict:
  """The one-row KV cache (of `model`) holding the prefix keys and values [layers, P, kv_heads, head_dim]."""
  cfg, length = model.config, keys.shape[1]
  cache = init_cache(model, 1)
  if cfg.scan_layers:  # one stacked entry [layers, batch, slots, kv, d]
    attention = cache['layers']['attention']
    cache['layers'] = {'attention': {
        'key': attention['key'].at[:, 0, :length].set(keys.astype(attention['key'].dtype)),
        'value': attention['value'].at[:, 0, :length].set(values.astype(attention['value'].dtype))}}
  else:
    for i in range(cfg.num_layers):
      attention = cache[f'layers_{i}']['attention']
      cache[f'layers_{i}'] = {'attention': {
          'key': attention['key'].at[0, :length].set(keys[i].astype(attention['key'].dtype)),
          'value': attention['value'].at[0, :length].set(values[i].astype(attention['value'].dtype))}}
  cache['index'] = jnp.asarray(length, cache['index'].dtype)
  cache['mask'] = cache['mask'].at[:, :length].set(True)
  return cache


def _cache_of(model: Transformer, lm_params, tokens: Array, prefix_embeddings: Array | None) -> dict:
  _, mutated = model.apply({'params': lm_params, 'cache': init_cache(model, tokens.shape[0])}, tokens,
                           prefix_embeddings=prefix_embeddings, decode=True, return_hidden=True, mutable=['cache'])
  return mutated['cache']


def _cache_kv(cache: dict, cfg) -> tuple[Array, Array]:
  """Keys and values of every layer from a cache: [layers, batch, slots, kv, d] each."""
  if cfg.scan_layers:
    attention = cache['layers']['attention']
    return attention['key'], attention['value']
  layers = [cache[f'layers_{i}']['attention'] for i in range(cfg.num_layers)]
  return jnp.stack([a['key'] for a in layers]), jnp.stack([a['value'] for a in layers])

