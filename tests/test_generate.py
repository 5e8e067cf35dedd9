"""Sampling filters against numpy, and generation against decoding by full recomputation (no cache)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foundation.data.tokenizers import ByteTokenizer
from foundation.evaluate.generate import generate, sample_logits, text_until_eos, top_k_mask, top_p_mask
from foundation.models.transformer import Transformer, TransformerConfig

TINY = TransformerConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                         max_len=16, init_std=0.25)
PROMPT_LEN, NEW = 5, 7

# Distinct values, so that the numpy references need no tie-breaking rule.
LOGITS = np.array([[2.0, -1.0, 0.5, 3.0, 0.0, -2.0, 1.0, 1.5],
                   [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                   [5.0, -5.0, 0.0, 1.0, -1.0, 2.0, -2.0, 3.0]], np.float32)


def np_top_k_keep(logits, k):
  return np.stack([np.isin(np.arange(len(row)), np.argsort(-row)[:k]) for row in logits])


def np_top_p_keep(logits, p):
  keep = np.zeros(logits.shape, bool)
  for r, row in enumerate(logits):
    probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    total = 0.0
    for i in np.argsort(-row):  # add the most likely tokens until their mass reaches p
      keep[r, i] = True
      total += probs[i]
      if total >= p:
        break
  return keep


@pytest.mark.parametrize('k', [1, 3, 8])
def test_top_k_mask(k):
  masked = np.asarray(top_k_mask(jnp.asarray(LOGITS), k))
  keep = np_top_k_keep(LOGITS, k)
  np.testing.assert_array_equal(np.isfinite(masked), keep)
  np.testing.assert_array_equal(masked[keep], LOGITS[keep])


@pytest.mark.parametrize('p', [0.05, 0.3, 0.6, 0.9, 0.999])
def test_top_p_mask(p):
  masked = np.asarray(top_p_mask(jnp.asarray(LOGITS), p))
  keep = np_top_p_keep(LOGITS, p)
  np.testing.assert_array_equal(np.isfinite(masked), keep)
  np.testing.assert_array_equal(masked[keep], LOGITS[keep])


def test_sampling_frequencies_follow_filtered_distribution():
  temperature, k, p = 0.7, 5, 0.8
  draws = jax.jit(jax.vmap(lambda key: sample_logits(jnp.asarray(LOGITS), key, temperature=temperature, top_k=k,
                                                     top_p=p)))(jax.random.split(jax.random.key(0), 20000))
  scaled = LOGITS / temperature
  keep = np_top_k_keep(scaled, k) & np_top_p_keep(np.where(np_top_k_keep(scaled, k), scaled, -np.inf), p)
  expected = np.where(keep, np.exp(scaled - scaled.max(-1, keepdims=True)), 0.0)
  expected /= expected.sum(-1, keepdims=True)
  for row in range(len(LOGITS)):
    frequencies = np.bincount(np.asarray(draws[:, row]), minlength=LOGITS.shape[1]) / len(draws)
    np.testing.assert_allclose(frequencies, expected[row], atol=0.015)  # ~4 standard errors at 20k draws


def test_greedy_and_cold_sampling_are_argmax():
  key = jax.random.key(0)
  np.testing.assert_array_equal(sample_logits(jnp.asarray(LOGITS), key, greedy=True), LOGITS.argmax(-1))
  np.testing.assert_array_equal(sample_logits(jnp.asarray(LOGITS), key, temperature=1e-3), LOGITS.argmax(-1))


@pytest.fixture(scope='module', params=[False, True], ids=['loop', 'scan'])
def model_params_prompt(request):
  model = Transformer(dataclasses.replace(TINY, scan_layers=request.param))
  prompt = jax.random.randint(jax.random.key(1), (2, PROMPT_LEN), 0, TINY.vocab_size)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), prompt)['params'])
  return model, params, prompt


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens):
  return model.apply({'params': params}, tokens)


def full_forward_logits(model, params, sequence):
  """Logits at every position by a fresh full forward (no cache); padded to max_len so one compile serves all."""
  padded = jnp.zeros((sequence.shape[0], model.config.max_len), jnp.int32).at[:, :sequence.shape[1]].set(sequence)
  return _forward(model, params, padded)[:, :sequence.shape[1]]


def test_greedy_matches_recomputation(model_params_prompt):
  model, params, prompt = model_params_prompt
  generated = generate(model, params, prompt, max_new_tokens=NEW, rng=jax.random.key(0), greedy=True)
  assert generated.shape == (2, NEW)
  sequence = prompt
  for _ in range(NEW):  # causal: logits at the last real position ignore the zero padding after it
    next_token = jnp.argmax(full_forward_logits(model, params, sequence)[:, -1], axis=-1)
    sequence = jnp.concatenate([sequence, next_token[:, None]], axis=1)
  np.testing.assert_array_equal(generated, sequence[:, PROMPT_LEN:])


def test_sampling_is_reproducible_and_respects_top_k(model_params_prompt):
  model, params, prompt = model_params_prompt
  k = 3

  def sample(seed):
    return generate(model, params, prompt, max_new_tokens=NEW, rng=jax.random.key(seed), temperature=1.5, top_k=k)

  first = sample(0)
  np.testing.assert_array_equal(first, sample(0))
  assert not np.array_equal(first, sample(1))
  # Every sampled token must be among the k most likely under a full recomputation of its prefix.
  sequence = jnp.concatenate([prompt, first], axis=1)
  logits = full_forward_logits(model, params, sequence)[:, PROMPT_LEN - 1:-1]
  top = np.argsort(-np.asarray(logits), axis=-1)[..., :k]
  assert np.all((top == np.asarray(first)[..., None]).any(-1))


def test_top_k_one_is_greedy(model_params_prompt):
  model, params, prompt = model_params_prompt
  np.testing.assert_array_equal(
      generate(model, params, prompt, max_new_tokens=NEW, rng=jax.random.key(3), top_k=1),
      generate(model, params, prompt, max_new_tokens=NEW, rng=jax.random.key(4), greedy=True))


def test_rejects_generation_past_max_len(model_params_prompt):
  model, params, prompt = model_params_prompt
  with pytest.raises(ValueError, match='max_len'):
    generate(model, params, prompt, max_new_tokens=TINY.max_len - PROMPT_LEN + 1, rng=jax.random.key(0))
  with pytest.raises(ValueError, match='greedy=True'):
    generate(model, params, prompt, max_new_tokens=2, rng=jax.random.key(0), temperature=0.0)


def test_generated_text_ends_at_the_first_end_of_text():
  tokenizer = ByteTokenizer()
  ids = np.concatenate([tokenizer.encode('end of doc.'), [tokenizer.eos_id], tokenizer.encode('New doc')])
  assert tokenizer.decode(ids) == 'end of doc.New doc'  # decoding alone loses the boundary
  assert text_until_eos(ids, tokenizer) == 'end of doc.'
  assert text_until_eos(tokenizer.encode('no end'), tokenizer) == 'no end'


# ----- the sampling command (foundation/sample.py) -----------------------------------------------------------------

def test_sampling_a_workdir_reads_its_selected_step_and_continues_greedily(tmp_path):
  """A run's checkpoint (two steps, early stopping chose the first), sampled greedily through the command's function:
  the continuation is the full forwards' argmax at every step, with the chosen step's params. Settings that cannot
  work are refused with one line."""
  import json
  from foundation import checkpoint
  from foundation.data.tokenizers import ByteTokenizer
  from foundation.sample import sample_workdir

  model_cfg = dict(vocab_size=264, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=32,
                   init_std=0.5, scan_layers=True)
  model = Transformer(TransformerConfig.from_dict(model_cfg))
  params = {step: nn.unbox(model.init(jax.random.key(step), jnp.zeros((1, 1), jnp.int32))['params'])
            for step in (3, 5)}
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps({'task': 'lm', 'model': model_cfg,
                                                 'data': {'tokenizer': 'byte', 'seq_len': 24}}))
  (workdir / checkpoint.BEST_FILE).write_text(json.dumps({'step': 3}))
  saver = checkpoint.Checkpointer(str(workdir / 'checkpoints'), async_save=False)
  for step, p in params.items():
    saver.save(step, {'step': np.int32(step), 'params': p}, {})
  saver.close()

  samples, step = sample_workdir(str(workdir), 'To be', max_new_tokens=8, greedy=True)
  sequence = jnp.asarray(ByteTokenizer().encode('To be'), jnp.int32)[None]
  for _ in range(8):
    next_token = jnp.argmax(model.apply({'params': params[3]}, sequence)[:, -1], axis=-1)
    sequence = jnp.concatenate([sequence, next_token[:, None]], axis=1)
  assert step == 3 and samples == [ByteTokenizer().decode(np.asarray(sequence[0]))]
  assert sample_workdir(str(workdir), 'To be', max_new_tokens=8, greedy=True, step=5)[1] == 5
  several, _ = sample_workdir(str(workdir), 'To be', max_new_tokens=8, num_samples=3, temperature=2.0, seed=1)
  assert len(several) == 3 and all(s.startswith('To be') for s in several) and len(set(several)) > 1
  for settings, message in (({'max_new_tokens': 20}, 'exceeds the 24 tokens the model was trained on'),
                            ({'temperature': 0.0}, 'must be positive'), ({'num_samples': 0}, 'at least 1'),
                            ({'top_k': 10**6}, r'--top_k=1000000 must be between 0 \(off\) and the vocabulary')):
    with pytest.raises(ValueError, match=message):
      sample_workdir(str(workdir), 'To be', **settings)
