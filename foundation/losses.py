"""Losses as pure functions on arrays. Every reduction is explicit so callers can combine shards exactly."""

import jax
import jax.numpy as jnp
import optax


def next_token_xent(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed token cross-entropy (nats) and the summed weights, so mean = sum / count over any set of batches.

  logits [..., vocab] (computed in float32 here whatever the model's dtype), integer targets [...], weights [...]
  (0 for padding).
  """
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weights = weights.astype(jnp.float32)
  return jnp.sum(per_token * weights), jnp.sum(weights)
