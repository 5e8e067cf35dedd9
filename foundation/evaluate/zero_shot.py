"""Zero-shot classification and image-text retrieval from a two-tower model's embeddings.

Functions take embeddings already computed (numpy or jax arrays) and compare them by cosine similarity, so any
image-text model is measured the same way and nothing here knows about towers or tokenizers.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Similarities decide rankings: keep them in full float32 even where the backend's default matmul is bfloat16.
_PRECISION = jax.lax.Precision.HIGHEST


def _l2_normalise(x):
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(text_emb_per_prompt) -> jax.Array:
  """[num_classes, num_prompts, dim] text embeddings of each class under each prompt template -> [num_classes, dim].

  CLIP's prompt ensembling: normalise every prompt's embedding, average over prompts, normalise again, so each
  template counts equally whatever the norm the text tower gives it.
  """
  text_emb_per_prompt = jnp.asarray(text_emb_per_prompt)
  if text_emb_per_prompt.ndim != 3:
    raise ValueError(f'need [num_classes, num_prompts, dim]; got shape {text_emb_per_prompt.shape}.')
  return _l2_normalise(jnp.mean(_l2_normalise(text_emb_per_prompt), axis=1))


def zero_shot_accuracy(image_emb, class_emb, labels) -> float:
  """Fraction of images whose most cosine-similar class embedding is their label's (lowest index on a tie)."""
  scores = jnp.dot(_l2_normalise(image_emb), _l2_normalise(class_emb).T, precision=_PRECISION)
  return float(np.mean(np.asarray(jnp.argmax(scores, axis=1)) == np.asarray(labels)))


def retrieval_recall(image_emb, text_emb, ks=(1, 5), *, labels=None, batch_size: int = 1024) -> dict[str, float]:
  """Recall@k both ways for aligned pairs (image i belongs with text i), by cosine similarity.

  Keys 'image_to_text_recall_at_{k}' (fraction of images whose own text is among their k most similar texts) and
  'text_to_image_recall_at_{k}'. A tie with the true partner counts against it: the partner's rank is the number
  of OTHER candidates at least as similar, so a collapsed encoder (all embeddings equal) scores 0, not 1. Queries
  go through in batches, so memory is O(batch_size * N).

  labels [N]: where captions describe a class rather than one image (synthetic captions repeat within a class), a
  retrieved item is relevant when its label equals the query's: a hit is a relevant item among the top k.
  """
  image_emb, text_emb = _l2_normalise(image_emb), _l2_normalise(text_emb)
  if image_emb.shape != text_emb.shape:
    raise ValueError(f'aligned pairs need equal shapes; got images {image_emb.shape}, texts {text_emb.shape}.')
  results = {}
  for direction, queries, candidates in (('image_to_text', image_emb, text_emb),
                                         ('text_to_image', text_emb, image_emb)):
    if labels is None:
      ranks = _partner_ranks(queries, candidates, batch_size)
    else:
      ranks = _first_relevant_ranks(np.asarray(queries), np.asarray(candidates), np.asarray(labels), batch_size)
    for k in ks:
      results[f'{direction}_recall_at_{k}'] = float(np.mean(ranks < k))
  return results


def _first_relevant_ranks(queries, candidates, labels, batch_size: int) -> np.ndarray:
  """For each query, the rank (0 = most similar) of the most similar candidate sharing its label: the number of
  candidates of other labels at least as similar (a tie counts against it, as for partners)."""
  ranks = []
  for start in range(0, len(queries), batch_size):
    similarities = queries[start:start + batch_size] @ candidates.T
    relevant = labels[start:start + batch_size, None] == labels[None, :]
    best = np.where(relevant, similarities, -np.inf).max(axis=1, keepdims=True)
    ranks.append(np.sum(~relevant & (similarities >= best), axis=1))
  return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def _partner_ranks(queries, candidates, batch_size: int) -> np.ndarray:
  """For each query i, how many candidates other than candidate i are at least as similar to it as candidate i."""
  num = queries.shape[0]
  padded = jnp.pad(queries, ((0, -num % batch_size), (0, 0)))  # one shape, one compilation
  ranks = [_partner_ranks_batch(padded[start:start + batch_size], candidates, start)
           for start in range(0, num, batch_size)]
  return np.concatenate([np.asarray(r) for r in ranks])[:num] if ranks else np.zeros(0, np.int32)


@jax.jit
def _partner_ranks_batch(queries, candidates, start):
  similarities = jnp.dot(queries, candidates.T, precision=_PRECISION)
  partner = start + jnp.arange(queries.shape[0])
  # Padding rows past the end read a clamped partner; their ranks are cut off by the caller.
  partner_similarity = jnp.take_along_axis(similarities, jnp.minimum(partner, candidates.shape[0] - 1)[:, None],
                                           axis=1)
  return jnp.sum(similarities >= partner_similarity, axis=1) - 1
