"""Autoregressive sampling from a `Transformer` with its KV cache.

The prompt is prefilled in one call; then one token per step in a compiled `fori_loop` over a fixed-size cache, so
the whole generation is a single jitted program. Sampling order (as in Hugging Face): temperature, then top-k, then
top-p, then a categorical draw.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from foundation.models.transformer import Transformer, init_cache

Array = jax.Array


def top_k_mask(logits: Array, k: int) -> Array:
  """Sets every logit below the k-th largest (along the last axis) to -inf; ties with the k-th are kept."""
  kth_largest = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits >= kth_largest, logits, -jnp.inf)


def top_p_mask(logits: Array, p: float) -> Array:
  """Nucleus filter: keeps the smallest set of most likely tokens whose probability reaches p, -inf elsewhere.

  A token is kept when the probability of the tokens ranked above it is below p, so the most likely token always
  survives; tokens tied with the last kept one are kept too.
  """
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  smallest_kept = jnp.min(jnp.where(mass_above < p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= smallest_kept, logits, -jnp.inf)


def sample_logits(logits: Array, rng: Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  greedy: bool = False) -> Array:
  """float [..., vocab] -> int [...]; `top_k=0` and `top_p=1.0` switch those filters off."""
  if greedy:
    return jnp.argmax(logits, axis=-1)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    logits = top_k_mask(logits, top_k)
  if top_p < 1.0:
    logits = top_p_mask(logits, top_p)
  return jax.random.categorical(rng, logits, axis=-1)


def check_sampling(temperature: float, top_k: int, top_p: float, vocab_size: int, *, greedy: bool = False,
                   prefix: str = '', greedy_option: str = 'greedy=True') -> None:
  """Raises ValueError naming the setting (`prefix` + its name: '--' on a command line, 'config.sample.' in a
  config) that `generate` cannot sample with; `greedy_option` ('' where there is none) decodes by argmax."""
  if not greedy and not temperature > 0:
    raise ValueError(f'{prefix}temperature={temperature} must be positive'
                     + (f'; {greedy_option} decodes by argmax.' if greedy_option else '.'))
  if not 0 <= top_k <= vocab_size:
    raise ValueError(f'{prefix}top_k={top_k} must be between 0 (off) and the vocabulary size, {vocab_size}.')
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f'{prefix}top_p={top_p} must be in (0, 1] (1: off).')


def generate(model: Transformer, params, prompt_tokens: Array, *, max_new_tokens: int, rng: Array,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False) -> Array:
  """Continues each prompt (int [batch, prompt_len], all the same length) by max_new_tokens sampled tokens.

  Returns int [batch, max_new_tokens]. Recompiles for a new shape or new sampling settings, not for new params,
  prompts or rng.
  """
  cfg = model.config
  prompt_len = prompt_tokens.shape[1]
  if prompt_len < 1 or max_new_tokens < 1:
    raise ValueError(f'need a non-empty prompt and max_new_tokens >= 1; got prompt_len {prompt_len}, '
                     f'max_new_tokens {max_new_tokens}.')
  if prompt_len + max_new_tokens > cfg.max_len:
    raise ValueError(f'prompt_len {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model max_len '
                     f'{cfg.max_len}, the size of its KV cache; shorten the prompt or generate fewer tokens.')
  check_sampling(temperature, top_k, top_p, cfg.vocab_size, greedy=greedy)
  return _generate(model, params, prompt_tokens, rng, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, greedy=greedy)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'greedy'))
def _generate(model, params, prompt_tokens, rng, *, max_new_tokens, temperature, top_k, top_p, greedy):
  logits, mutated = model.apply({'params': params, 'cache': init_cache(model, prompt_tokens.shape[0])},
                                prompt_tokens, decode=True, mutable=['cache'])
  return continue_from_cache(model, params, mutated['cache'], logits[:, -1], max_new_tokens=max_new_tokens,
                             rng=rng, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)


def continue_from_cache(model: Transformer, params, cache: dict, last_logits: Array, *, max_new_tokens: int,
                        rng: Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        greedy: bool = False) -> Array:
  """The sampling loop after a prefill: `cache` holds the prompts (padded ones with their mask) and `last_logits`
  [batch, vocab] is the prediction at their last position. Returns int [batch, max_new_tokens]; for use inside a
  jitted function, by callers that prefill themselves (e.g. reusing a scoring pass). The cache needs
  max_new_tokens - 1 free slots."""
  batch = last_logits.shape[0]
  rngs = jax.random.split(rng, max_new_tokens)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(sample(last_logits, rngs[0]))

  def body(i, carry):
    out, cache = carry
    previous = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
    logits, mutated = model.apply({'params': params, 'cache': cache}, previous, decode=True, mutable=['cache'])
    return out.at[:, i].set(sample(logits[:, -1], rngs[i])), mutated['cache']

  out, _ = jax.lax.fori_loop(1, max_new_tokens, body, (out, cache))
  return out


def text_until_eos(ids: np.ndarray, tokenizer) -> str:
  """Generated ids as text, up to the first end of text: the model ended its document (or, in a chat, its turn)
  there, and a tokenizer's decode would drop that token and run on into what the model invents after it."""
  ends = np.flatnonzero(np.asarray(ids) == tokenizer.eos_id)
  return tokenizer.decode(ids[:ends[0]] if len(ends) else ids)
