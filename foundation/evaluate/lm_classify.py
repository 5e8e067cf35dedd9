"""Classification with a language model: rank classification by the likelihood of label words, in-context
demonstrations, contextual calibration, and reading a label word out of generated text.

Pure functions: prompts as text and ids in, scores as arrays out. The task (foundation/tasks/lm_classify.py) brings
the data, the config and the metrics.

A prompt is three parts, each encoded on its own and then concatenated:

  prefix  shared by every example of a draw: the start of the chat turn (system turn + user turn start) when the
          prompt is chat-wrapped, then the k demonstrations (the template filled with a training text and followed
          by its label word, then the separator). It runs through the model once and every example attends to its
          KV cache;
  body    the template filled with the example's text (+ the end of the user turn and the start of the assistant's
          when chat-wrapped);
  label   one class's label word: its log-likelihood after prefix + body is the class's score, summed over its
          tokens when it has several.

Encoding the parts separately gives every example the same prefix tokens, so one cache serves them all, and scores
every label on the same body tokens (a label glued to the body could merge with its last characters). The naive
references in the tests concatenate these same ids.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from foundation.evaluate.generate import continue_from_cache
from foundation.models.transformer import Transformer, init_cache

Array = jax.Array

# Zhao et al. (2021)'s content-free inputs: the prompt's class distribution on them measures its bias.
CONTENT_FREE = ('N/A', '', '[MASK]')


# ----- prompts as text --------------------------------------------------------------------------------------------

def check_prompt(template: str, label_words: Sequence[str], class_names: Sequence[str]) -> None:
  """Raises ValueError with one line for a template without its `{text}` slot or label words that do not name the
  classes one to one (in class order)."""
  if '{text}' not in template:
    raise ValueError(f'config.prompt.template={template!r} has no {{text}} slot for the example\'s text.')
  if len(label_words) != len(class_names):
    raise ValueError(f'config.prompt.label_words has {len(label_words)} words for {len(class_names)} classes; give one '
                     f'per class, in class order {tuple(class_names)}.')
  keys = [word.strip().casefold() for word in label_words]
  if not all(keys) or len(set(keys)) != len(keys):
    raise ValueError(f'config.prompt.label_words={tuple(label_words)!r}: each needs a visible word, and no two may '
                     'be the same (ignoring case and surrounding spaces): a generated answer could not tell them apart.')


def fill(template: str, text: str) -> str:
  """The template with `text` in its `{text}` slot (str.replace, not format: texts and templates may hold braces)."""
  return template.replace('{text}', text)


def demonstration_indices(labels: np.ndarray, shots: int, num_classes: int, *, seed: int, draw: int) -> np.ndarray:
  """Indices of `shots` training examples: shots // num_classes of every class (the remainder from classes picked at
  random), without repeats, in random order. A pure function of (labels, seed, draw): numpy's PCG64 stream for a
  seed sequence is fixed, so every process and every later run draws the same demonstrations."""
  labels = np.asarray(labels)
  rng = np.random.default_rng([seed, draw])
  per_class = np.full(num_classes, shots // num_classes)
  per_class[rng.choice(num_classes, shots % num_classes, replace=False)] += 1
  picks = []
  for c, n in enumerate(per_class):
    pool = np.flatnonzero(labels == c)
    if n > len(pool):
      raise ValueError(f'{shots} shots need {n} demonstrations of class {c}, but the training split has {len(pool)}.')
    picks.append(rng.choice(pool, n, replace=False))
  return rng.permutation(np.concatenate(picks)).astype(np.int64)


def prefix_text(template: str, label_words: Sequence[str], texts: Sequence[str], labels: Sequence[int],
                separator: str, head: str = '', tail: str = '') -> str:
  """`head` (the chat turn's start, or '') then the demonstrations, each a filled template, `tail` and label word,
  joined by `separator`. In a chat, tail ends the user's turn and starts the assistant's, and the separator ends the
  assistant's reply and starts the next user turn: every demonstration is an exchange, as the query will be.

  The separator after the last demonstration starts the query's own tokens instead (see `query_start` in
  tasks/lm_classify.py): a BPE tokenizer encodes whitespace at the end of a text otherwise than before a word
  (SmolLM2: '\n\n' is one token at the end, two before 'Movie'), and the query must follow the tokens that the
  demonstrations follow."""
  return head + separator.join(fill(template, t) + tail + label_words[y] for t, y in zip(texts, labels))


# ----- scores -----------------------------------------------------------------------------------------------------

def pad(sequences: Sequence[np.ndarray], length: int, pad_id: int, *, left: bool) -> tuple[np.ndarray, np.ndarray]:
  """int32 [n, length] ids and bool [n, length] mask (True on real tokens), padded on the left or the right."""
  tokens = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), bool)
  for row, seq in enumerate(sequences):
    if len(seq) > length:
      raise ValueError(f'a sequence of {len(seq)} tokens does not fit in {length}.')
    at = slice(length - len(seq), length) if left else slice(0, len(seq))
    tokens[row, at], mask[row, at] = seq, True
  return tokens, mask


def bucket_length(n: int) -> int:
  """The padded length of a batch whose longest row has n tokens: 16, 24, 32, 48, 64, 96, ... (steps of x1.5 and
  x4/3), so a length distribution needs few compiled shapes and wastes at most a third of a row's compute."""
  length = 16
  while length < n:
    length = length * 3 // 2 if (length & (length - 1)) == 0 else length * 4 // 3
  return length


def length_batches(lengths: Sequence[int], batch_size: int) -> list[tuple[np.ndarray, int]]:
  """Row indices sorted by length, cut into batches of batch_size, each with its padded length (`bucket_length`)."""
  lengths = np.asarray(lengths)
  order = np.argsort(lengths, kind='stable')
  return [(order[i:i + batch_size], bucket_length(int(lengths[order[i:i + batch_size]].max())))
          for i in range(0, len(order), batch_size)]


def vocab_log_probs(model: Transformer, params, hidden: Array) -> Array:
  """log p over the vocabulary from final hidden states [..., embed] (the model's own output projection). Applied
  only where a prediction is scored, not at every position of the prompt."""
  head = params['embedding'].T if model.config.tie_embeddings else params['lm_head']
  logits = jnp.einsum('...e,ev->...v', hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
  return jax.nn.log_softmax(logits, axis=-1)


def prefill(model: Transformer, params, tokens: Array, mask: Array, start: dict | None = None) -> dict:
  """The KV cache of a shared prefix: tokens and mask [1, length] (right-padded: the cache keeps the mask, so its
  padding is never attended to), after `start` when given (a one-row cache: a learned soft prompt or prefix).
  `model.config.max_len` holds length."""
  _, mutated = model.apply({'params': params, 'cache': extend_cache(start, model, tokens.shape[0])}, tokens,
                           mask=mask, decode=True, return_hidden=True, mutable=['cache'])
  return mutated['cache']


def extend_cache(prefix_cache: dict | None, model: Transformer, batch: int) -> dict:
  """An empty cache of `model` (its max_len slots) for `batch` rows, after a prefix cache of one row that every row
  attends to: the prefix's keys, values and mask (its shared part first, when it has one, then its own slots) become
  the new cache's shared prefix, held once rather than copied per row (see `Transformer`)."""
  target = init_cache(model, batch)
  if prefix_cache is None:
    return target
  if prefix_cache['mask'].shape[0] != 1:
    raise ValueError(f'a shared prefix is one row; this cache has {prefix_cache["mask"].shape[0]}.')

  def joined(name, tree):
    own = tree[name[len('shared_'):]]
    return own if name not in tree else jnp.concatenate([tree[name], own], axis=-3 if name != 'shared_mask' else -1)

  target['shared_mask'] = joined('shared_mask', prefix_cache)
  for layer, target_layer in target.items():
    if isinstance(target_layer, dict):
      attention, source = target_layer['attention'], prefix_cache[layer]['attention']
      for name in ('shared_key', 'shared_value'):
        attention[name] = joined(name, source).astype(attention['key'].dtype)
  return target


def read_bodies(model: Transformer, params, prefix_cache: dict | None, tokens: Array,
                mask: Array) -> tuple[Array, dict]:
  """The final hidden states [batch, length, embed] of the bodies (tokens, mask LEFT-padded) after the prefix
  cache, and the cache after them. `model.config.max_len` holds length (+ what follows)."""
  hidden, mutated = model.apply({'params': params, 'cache': extend_cache(prefix_cache, model, tokens.shape[0])},
                                tokens, mask=mask, decode=True, return_hidden=True, mutable=['cache'])
  return hidden, mutated['cache']


def pool(hidden: Array, mask: Array, how: str) -> Array:
  """Features of left-padded bodies [batch, embed]: the last token's hidden state ('last'; it has read the whole
  body) or the mean over the body's real tokens ('mean')."""
  if how == 'last':
    return hidden[:, -1]
  weights = mask.astype(hidden.dtype)[..., None]
  return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def class_scores(model: Transformer, params, prefix_cache: dict | None, tokens: Array, mask: Array,
                 label_tokens: Array, label_mask: Array) -> tuple[Array, Array, dict]:
  """Log-likelihood of every class's label tokens after prefix + body.

  tokens, mask: the bodies [batch, length], LEFT-padded, so every body ends in the last column and the labels
  follow it directly; label_tokens, label_mask: [classes, label_len], right-padded. `model.config.max_len` must hold
  length + label_len - 1 (the prefix is the cache's shared part).

  Returns (scores [batch, classes], log p over the vocabulary after the body [batch, vocab] (the first label token's
  distribution, and greedy generation's first step), the cache after the body). One pass over the bodies; a label of
  several tokens adds a pass of label_len - 1 tokens per class that reads the bodies from the cache.
  """
  batch = tokens.shape[0]
  hidden, cache = read_bodies(model, params, prefix_cache, tokens, mask)
  first = vocab_log_probs(model, params, hidden[:, -1])
  scores = first[:, label_tokens[:, 0]]
  if label_tokens.shape[1] > 1:
    rest = []
    for c in range(label_tokens.shape[0]):
      feed = jnp.broadcast_to(label_tokens[c, :-1], (batch, label_tokens.shape[1] - 1))
      feed_mask = jnp.broadcast_to(label_mask[c, :-1], feed.shape)
      h, _ = model.apply({'params': params, 'cache': cache}, feed, mask=feed_mask, decode=True, return_hidden=True,
                         mutable=['cache'])
      targets = jnp.broadcast_to(label_tokens[c, 1:, None], (*feed.shape, 1))  # each label token predicts the next
      log_probs = jnp.take_along_axis(vocab_log_probs(model, params, h), targets, axis=-1)[..., 0]
      rest.append(jnp.sum(log_probs * label_mask[c, 1:], axis=1))
    scores = scores + jnp.stack(rest, axis=1)
  return scores, first, cache


def score_and_generate(model: Transformer, params, prefix_cache: dict | None, tokens: Array, mask: Array,
                       label_tokens: Array, label_mask: Array, *, max_new_tokens: int) -> tuple[Array, Array | None]:
  """`class_scores`, then greedy generation of max_new_tokens from the same cache (None when 0): the scoring pass
  is generation's prefill. The cache (model.config.max_len) needs max_new_tokens - 1 slots after the bodies."""
  scores, first, cache = class_scores(model, params, prefix_cache, tokens, mask, label_tokens, label_mask)
  if not max_new_tokens:
    return scores, None
  return scores, continue_from_cache(model, params, cache, first, max_new_tokens=max_new_tokens,
                                     rng=jax.random.key(0), greedy=True)


def rank_classification_loss(scores: Array, labels: Array) -> tuple[Array, Array]:
  """(mean cross-entropy of the classes' softmax over their scores, accuracy): what tuning trains through."""
  log_probs = jax.nn.log_softmax(scores, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  return jnp.mean(nll), jnp.mean((jnp.argmax(scores, axis=-1) == labels).astype(jnp.float32))


# ----- calibration and answers ------------------------------------------------------------------------------------

def calibrate(scores: np.ndarray, content_free_scores: np.ndarray) -> np.ndarray:
  """Contextual calibration (Zhao et al. 2021, W = diag(p_cf)^-1, b = 0) as log-scores [n, classes].

  p_cf is the mean over the content-free inputs of their class distribution (softmax over the label scores, i.e.
  p(label) renormalised over the labels); the calibrated distribution is p ⊙ p_cf^-1, renormalised, whose log is
  log p(label) - log p_cf(label) up to a per-example constant. Returned renormalised (a log-softmax).
  """
  scores = np.asarray(scores, np.float64)
  return _log_softmax(_log_softmax(scores) - np.log(content_free_distribution(content_free_scores)))


def content_free_distribution(content_free_scores: np.ndarray) -> np.ndarray:
  """p_cf [classes]: the mean over content-free inputs of their class distribution (their label scores
  renormalised over the labels). Uniform for an unbiased prompt."""
  return np.mean(_softmax(np.asarray(content_free_scores, np.float64)), axis=0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def _softmax(x: np.ndarray) -> np.ndarray:
  return np.exp(_log_softmax(x))


def parse_label(text: str, label_words: Sequence[str]) -> int:
  """The class whose label word (stripped, any case, as a whole word) occurs first in `text`; -1 if none does."""
  words = [w.strip() for w in label_words]
  pattern = _answer_pattern(tuple(words))
  match = pattern.search(text)
  if match is None:
    return -1
  return [w.casefold() for w in words].index(match.group(0).casefold())


@functools.lru_cache(maxsize=8)
def _answer_pattern(words: tuple[str, ...]) -> re.Pattern:
  # Longest first, so that of two words at the same place the longer one ('not good' before 'not') wins.
  alternatives = '|'.join(re.escape(w) for w in sorted(words, key=len, reverse=True))
  return re.compile(rf'(?<!\w)(?:{alternatives})(?!\w)', re.IGNORECASE)


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1, as the sweep tables use; 0 for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def slots_needed(body_length: int, label_length: int, max_new_tokens: int) -> int:
  """KV-cache slots of one scoring call after its shared prefix: the bodies, then the longer of the label's extra
  tokens and generation's."""
  return body_length + max(label_length - 1, max_new_tokens - 1, 0)


def round_up(n: int, multiple: int) -> int:
  return multiple * math.ceil(n / multiple)
