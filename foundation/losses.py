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


# ---- contrastive losses ------------------------------------------------------------------------------------------
# Each takes the GLOBAL batch. Under jax.jit with the batch sharded over devices, `a @ b.T` is still the product over
# the whole global batch (XLA gathers what it needs), so every example's negatives come from every device -- no
# explicit all_gather is needed, and the value and gradients equal a single-device run on the same batch. (Inside
# shard_map/pmap, where arrays are per-device, all_gather the embeddings before calling these.)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float | jax.Array) -> jax.Array:
  """SimCLR's NT-Xent: mean over the 2N views of -log softmax(cos / temperature) at the view's partner.

  z1, z2 [N, D]: two augmented views of the same N examples (row i of z1 pairs with row i of z2), normalised here.
  For each of the 2N anchors the positive is its other view and the negatives are the remaining 2N - 2 views of
  the global batch (the anchor itself is excluded from the softmax).
  """
  n = z1.shape[0]
  z = _l2_normalize(jnp.concatenate([z1, z2], axis=0))
  logits = z @ z.T / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)  # an anchor is not its own negative
  partner = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, partner))


def clip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
  """CLIP's symmetric InfoNCE over the global batch: the mean of the image->text and text->image cross-entropies,
  the positive of row i being column i.

  image_emb, text_emb [N, D]: expected L2-normalised (the model normalises; this does not). logits =
  scale * image @ text.T with scale = exp(logit_scale). CLIP bounds the scale at 100 by clipping the parameter after
  each update (the CLIP config's optim.param_max), not here: a bound in the loss would leave no gradient above it,
  and a scale that once crossed it could never come back down.
  """
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  logits = scale * (image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T)
  labels = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return 0.5 * (jnp.mean(image_to_text) + jnp.mean(text_to_image))


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                logit_bias: jax.Array) -> jax.Array:
  """SigLIP's pairwise sigmoid loss over the global batch: -sum_ij log sigmoid(y_ij * (scale * <img_i, txt_j> + bias))
  / N with y = +1 on the diagonal and -1 elsewhere, scale = exp(logit_scale) (not clamped).

  image_emb, text_emb [N, D]: expected L2-normalised (the model normalises; this does not). Computed here as one
  global N x N matrix; SigLIP's chunked device-to-device scheme saves memory but gives the same number.
  """
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  logits = scale * (image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T) + logit_bias
  n = logits.shape[0]
  labels = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n


# ---- distillation ------------------------------------------------------------------------------------------------


def teacher_probs(teacher_logits: jax.Array, temperature: float, top_k: int = 0) -> jax.Array:
  """[num_teachers, ..., C] logits -> [..., C]: each teacher's softmax at `temperature`, averaged in probability
  space (an ensemble is one teacher whose soft targets are its members' mean; one teacher is an ensemble of one).
  top_k > 0 keeps each teacher's k largest logits only (the others get probability 0), as when only a teacher's
  top-k logits were stored."""
  logits = teacher_logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)


def soft_target_loss(student_logits: jax.Array, targets: jax.Array, temperature: float,
                     weights: jax.Array | None = None) -> jax.Array:
  """Hinton et al.'s soft-target term T^2 * KL(targets || softmax(student / T)), the (weighted) mean over items.

  `targets` [..., C] are probabilities already softened at T (`teacher_probs`); `weights` [...] (e.g. 0 on padded
  tokens) default to 1. The T^2 keeps the gradient's size independent of T, so the term mixes with the hard-label
  cross-entropy at a fixed ratio (their section 2); as T grows, the gradient with respect to student logits z
  (teacher logits v) approaches ((z - mean z) - (v - mean v)) / (C * batch), logit matching (section 2.1).
  """
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  plogp = jnp.where(targets > 0, targets * jnp.log(jnp.where(targets > 0, targets, 1.0)), 0.0)
  return temperature ** 2 * _mean(jnp.sum(plogp - targets * log_q, axis=-1), weights)


def distillation_loss(student_logits: jax.Array, targets: jax.Array, labels: jax.Array, temperature: float,
                      alpha: float, weights: jax.Array | None = None) -> jax.Array:
  """alpha * T^2 * KL(targets || student_T) + (1 - alpha) * cross-entropy(student at T=1, labels), (weighted) means
  over items (examples, or tokens with `weights` 0 on padding)."""
  hard = optax.softmax_cross_entropy_with_integer_labels(student_logits.astype(jnp.float32), labels)
  return alpha * soft_target_loss(student_logits, targets, temperature, weights) + (1 - alpha) * _mean(hard, weights)


def _mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
  if weights is None:
    return jnp.mean(values)
  weights = weights.astype(jnp.float32)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def crd_loss(student_emb: jax.Array, teacher_emb: jax.Array, temperature: float) -> jax.Array:
  """Contrastive representation distillation with in-batch negatives (Tian et al. 2020, the InfoNCE form of their
  bound): the student embedding of example i must pick the teacher embedding of i among the global batch's, and
  the other way round. Embeddings [N, D] are L2-normalised here; logits are cosines / temperature."""
  return clip_loss(_l2_normalize(student_emb), _l2_normalize(teacher_emb), -jnp.log(temperature))
