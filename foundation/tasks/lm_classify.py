"""Text classification with a pretrained language model: zero-shot and in-context (few-shot) rank classification.

The model scores each class by the log-likelihood of the class's label word after a prompt (the template filled
with the text, chat-wrapped or not, after k demonstrations from the training split); the best-scoring class is the
prediction. The same pass gives the contextually calibrated prediction (Zhao et al. 2021: the prompt's bias measured
on content-free inputs and divided out) and the start of a greedy generation, whose first label word is the
generated answer. The scoring functions are in foundation/evaluate/lm_classify.py; this file brings the data, the
config and the metrics.

The language model is frozen (`Task.frozen`: a GGUF file, pinned by its sha256 in config.json, or a small random
model for tests); the trainable params are empty, and `loss` is the cross-entropy of the rank classification over a
training batch, for methods that will tune something through it (soft prompts, adapters). With
`num_train_steps=0` the run only evaluates.

Evaluation, per split of `eval.splits` (metric names: test has no split segment, `validation/`, `ood/tweets/`, ...):
  eval/accuracy, eval/calibrated/accuracy, eval/generate/accuracy, eval/generate/unparseable (the share of answers
  with no label word, counted wrong), eval/pred_share/<word> (the share of predictions of each label; also
  calibrated/pred_share/<word>). For all splits: eval/content_free/p/<word>, the class distribution on the
  content-free inputs, which calibration divides out. With
  in-context demonstrations every metric is the mean over `icl.draws` draws of demonstrations, and the accuracies
  have an `_std` over draws as well. Choose templates and label words on validation: test is reported beside it
  and never used to select anything.

Every process reads and scores every example (the splits are small); the batches are split over the mesh's data
axes. Efficiency on a CPU: examples are sorted by length into a few padded lengths (few compiled shapes); the
shared prefix (chat turn start, demonstrations) runs once per draw into a KV cache that every batch attends to; the
projection onto the vocabulary is computed only where a label token is predicted.
"""

import dataclasses
import functools
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import grain
import numpy as np

from foundation import sharding
from foundation.data import text as text_data
from foundation.data.tokenizers import ByteTokenizer
from foundation.evaluate import lm_classify as lmc
from foundation.models.gguf import gguf_header, load_gguf, resolve_gguf
from foundation.models.transformer import Transformer, TransformerConfig, flops_per_token, param_count
from foundation.tasks import EvalContext, Task

RANDOM_SOURCE = 'random'  # lm.source for a small random Transformer on bytes (tests, smoke runs)
PREFIX_MULTIPLE = 32      # prefix caches are padded to a multiple of this: one compiled shape for all draws


def build(config) -> Task:
  data, prompt, icl, ev = config.data, config.prompt, config.icl, config.eval
  _check_fields(config)
  text_data.check_prepared(data.name, data.data_dir, [data.train_split, *ev.splits])
  class_names = _class_names(data)
  label_words = tuple(prompt.label_words)
  lmc.check_prompt(prompt.template, label_words, class_names)
  model_cfg, tokenizer = _language_model(config.lm)
  if prompt.chat and not hasattr(tokenizer, 'chat_parts'):
    raise ValueError(f'config.prompt.chat: lm.source={config.lm.source!r} has a byte tokenizer, without chat turns.')
  head, tail = tokenizer.chat_parts() if prompt.chat else ('', '')
  encode = lambda s: np.asarray(tokenizer.encode(s), np.int32)
  body = lambda t: encode(lmc.fill(prompt.template, t) + tail)

  label_ids = [encode(w) for w in label_words]
  if not all(len(ids) for ids in label_ids):
    raise ValueError(f'config.prompt.label_words={label_words!r}: a word encodes to no tokens.')
  label_tokens, label_mask = lmc.pad(label_ids, max(map(len, label_ids)), tokenizer.pad_id, left=False)
  new_tokens = config.generate.max_new_tokens

  train_texts, train_labels = read_split(data, data.train_split, 0)
  eval_rows, eval_labels, splits = [], {}, {}
  eval_texts = []
  for split in ev.splits:
    texts, labels = read_split(data, split, ev.max_examples)
    eval_texts += texts
    splits[split] = slice(len(eval_rows), len(eval_rows) + len(texts))
    eval_rows += [body(t) for t in texts]
    eval_labels[split] = labels
  content_free = slice(len(eval_rows), len(eval_rows) + len(config.calibration.content_free))
  eval_rows += [body(t) for t in config.calibration.content_free]

  prefix_texts = demonstration_prefixes(config, train_texts, train_labels, head)
  prefixes = [encode(p) for p in prefix_texts]
  first_body = lmc.fill(prompt.template, eval_texts[0]) + tail
  head_ids = encode(head)
  _check_context(prefixes, len(head_ids), max(map(len, eval_rows)), label_tokens.shape[1], new_tokens,
                 model_cfg.max_len, icl.shots)
  prefix_slots = lmc.round_up(max(map(len, prefixes)), PREFIX_MULTIPLE) if max(map(len, prefixes)) else 0
  eval_batches = [(rows, *lmc.pad([eval_rows[i] for i in rows], length, tokenizer.pad_id, left=True))
                  for rows, length in lmc.length_batches([len(r) for r in eval_rows], ev.batch_size)]

  # Training rows for `loss`: the zero-shot prompt (no demonstrations) of every training text.
  train_bodies = [body(t) for t in train_texts]
  train_length = lmc.bucket_length(max(map(len, train_bodies)))
  if len(head_ids) + train_length + label_tokens.shape[1] > model_cfg.max_len:
    raise ValueError(f'the longest training prompt ({len(head_ids) + train_length} tokens padded) does not fit the '
                     f'model\'s context of {model_cfg.max_len} tokens.')
  train_tokens, train_mask = lmc.pad(train_bodies, train_length, tokenizer.pad_id, left=True)

  @functools.lru_cache(maxsize=None)
  def resized(slots):
    """The model with a KV cache of `slots` (max_len only sizes the cache; the context was checked above)."""
    return Transformer(dataclasses.replace(model_cfg, max_len=max(slots, 1)))

  train_model = resized(len(head_ids) + train_length + label_tokens.shape[1] - 1)
  head_model = resized(len(head_ids))

  def frozen(sources):
    if config.lm.source == RANDOM_SOURCE:
      model = Transformer(model_cfg)
      return nn.unbox(jax.jit(model.init)(jax.random.key(config.seed), jnp.zeros((1, 1), jnp.int32))['params'])
    return sources.load_file('lm', resolve_gguf(config.lm.source), lambda path: load_gguf(path)[1])

  def init(rng):
    del rng
    return {}  # the language model is frozen; tuning methods add their params here

  def loss(params, lm_params, batch, rng):
    del params, rng
    cache = None
    if len(head_ids):
      with nn.logical_axis_rules(()):  # one row: nothing to split over the data axes
        cache = lmc.prefill(head_model, lm_params, jnp.asarray(head_ids[None]), jnp.ones((1, len(head_ids)), bool))
    scores, _, _ = lmc.class_scores(train_model, lm_params, cache, batch['tokens'], batch['mask'],
                                    jnp.asarray(label_tokens), jnp.asarray(label_mask))
    mean_loss, accuracy = lmc.rank_classification_loss(scores, batch['label'])
    return mean_loss, {'accuracy': accuracy}

  def train_batches(process_index, process_count):
    return grain.MapDataset.range(2**40).map(_TrainRows(
        train_tokens, train_mask, train_labels, seed=config.seed, global_batch=config.global_batch_size,
        process_index=process_index, process_count=process_count))

  compiled = {}

  def evaluate(params, lm_params, step, ctx: EvalContext):
    del params, step
    if ctx.is_writer and not compiled:  # once per run
      _write_prompts(os.path.join(ctx.workdir, 'prompts.txt'), prefix_texts, first_body, label_words)
    if ctx.mesh not in compiled:
      out = sharding.replicated(ctx.mesh) if ctx.mesh is not None else None
      compiled[ctx.mesh] = (jax.jit(lmc.prefill, static_argnums=0),
                            jax.jit(lmc.score_and_generate, static_argnames=('model', 'max_new_tokens'),
                                    out_shardings=out))
    prefill, score = compiled[ctx.mesh]
    start = time.perf_counter()
    per_draw = []
    with nn.logical_axis_rules(()):  # the batch's sharding is set on the inputs; XLA propagates it
      for prefix in prefixes:
        cache = None
        if prefix_slots:
          tokens, mask = lmc.pad([prefix], prefix_slots, tokenizer.pad_id, left=False)
          cache = prefill(resized(prefix_slots), lm_params, jnp.asarray(tokens), jnp.asarray(mask))
        scores = np.zeros((len(eval_rows), len(class_names)), np.float64)
        answers = np.full(len(eval_rows), -1)
        for rows, tokens, mask in eval_batches:
          n = len(rows)
          tokens, mask = _fill_batch(tokens, mask, ev.batch_size, tokenizer.pad_id)
          model = resized(lmc.slots_needed(prefix_slots, tokens.shape[1], label_tokens.shape[1], new_tokens))
          s, generated = score(model, lm_params, cache, _place(tokens, ctx.mesh), _place(mask, ctx.mesh),
                               label_tokens, label_mask, max_new_tokens=new_tokens)
          scores[rows] = np.asarray(s)[:n]
          if generated is not None:
            answers[rows] = [lmc.parse_label(_until_eos(g, tokenizer), label_words) for g in np.asarray(generated)[:n]]
        per_draw.append(_draw_metrics(scores, answers, splits, eval_labels, content_free, label_words,
                                      class_names, generate=bool(new_tokens)))
    seconds = time.perf_counter() - start
    results = _over_draws(per_draw, with_std=len(prefixes) > 1)  # a std needs two draws
    results['perf/eval_seconds'] = seconds
    results['perf/eval_examples_per_sec'] = len(eval_rows) * len(prefixes) / seconds
    return results

  forward_flops = flops_per_token(model_cfg, train_length) / 3 * train_length  # frozen: forward only, no backward
  return Task(init=init, loss=loss, train_batches=train_batches, evaluate=evaluate, frozen=frozen,
              flops_per_example=forward_flops, tokens_per_example=train_length)


def _check_fields(config) -> None:
  icl, ev = config.icl, config.eval
  whole = lambda v, least: isinstance(v, int) and not isinstance(v, bool) and v >= least
  checks = [('icl.shots', icl.shots, 0), ('icl.draws', icl.draws, 1), ('eval.max_examples', ev.max_examples, 0),
            ('generate.max_new_tokens', config.generate.max_new_tokens, 0)]
  for name, value, least in checks:
    if not whole(value, least):
      raise ValueError(f'config.{name}={value!r} must be a whole number of at least {least}.')
  if not ev.splits or len(set(ev.splits)) != len(ev.splits):
    raise ValueError(f'config.eval.splits={tuple(ev.splits)!r} must name at least one split, each once.')
  if not all(isinstance(t, str) for t in config.calibration.content_free) or not config.calibration.content_free:
    raise ValueError(f'config.calibration.content_free={config.calibration.content_free!r} must be one or more texts.')


def _class_names(data) -> tuple[str, ...]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  feature = tfds.builder(data.name, data_dir=data.data_dir).info.features[data.label_key]
  if not hasattr(feature, 'names'):
    raise ValueError(f'config.data.label_key={data.label_key!r} of {data.name} is not a class label.')
  return tuple(feature.names)


def read_split(data, split: str, limit: int) -> tuple[list[str], np.ndarray]:
  """The split's texts and labels in order; the first `limit` of them when limit > 0."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source(data.name, split=split, data_dir=data.data_dir)
  n = min(limit, len(source)) if limit else len(source)
  records = source.__getitems__(list(range(n)))
  texts = [r[data.text_key].decode('utf-8') if isinstance(r[data.text_key], bytes) else r[data.text_key]
           for r in records]
  return texts, np.asarray([r[data.label_key] for r in records], np.int32)


def demonstration_prefixes(config, train_texts: list[str], train_labels: np.ndarray, head: str) -> list[str]:
  """The shared start of every prompt, one per draw: `head` (the chat turn's start, or ''), then the draw's
  demonstrations. One draw of no demonstrations when icl.shots is 0."""
  prefixes = []
  for draw in range(config.icl.draws if config.icl.shots else 1):
    picks = lmc.demonstration_indices(train_labels, config.icl.shots, len(_class_names(config.data)),
                                      seed=config.seed, draw=draw)
    prefixes.append(lmc.prefix_text(config.prompt.template, config.prompt.label_words, [train_texts[i] for i in picks],
                                    train_labels[picks], config.icl.separator, head))
  return prefixes


def _language_model(lm) -> tuple[TransformerConfig, object]:
  """The model's config and tokenizer, without reading its weights: a GGUF's header, or the random model's fields."""
  if lm.source != RANDOM_SOURCE:
    cfg, tokenizer = gguf_header(lm.source)
    return TransformerConfig.from_dict({**cfg, 'dtype': lm.dtype}), tokenizer
  fields = dict(lm.random_model)
  for name in ('vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'num_kv_heads', 'mlp_dim', 'max_len'):
    value = fields.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'config.lm.random_model.{name}={value!r} must be a whole number of at least 1.')
  cfg = TransformerConfig.from_dict({**fields, 'dtype': lm.dtype})
  tokenizer = ByteTokenizer()
  if cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(f'config.lm.random_model.vocab_size={cfg.vocab_size} is below the byte tokenizer\'s '
                     f'{tokenizer.vocab_size} ids.')
  if param_count(cfg) > 10**8:
    raise ValueError(f'config.lm.random_model has {param_count(cfg):,} params; the random model is for tests, keep it '
                     'under 100 M.')
  return cfg, tokenizer


def _check_context(prefixes, head_length: int, longest: int, label_length: int, new_tokens: int, context: int,
                   shots: int) -> None:
  """The longest prompt of any draw, its label and its generated answer must fit the model's context."""
  after = max(label_length, new_tokens)
  worst = max(range(len(prefixes)), key=lambda d: len(prefixes[d]))
  total = len(prefixes[worst]) + longest + after
  if total <= context:
    return
  room = context - head_length - longest - after
  if not shots or room < 0:
    raise ValueError(f'the longest prompt ({len(prefixes[worst]) + longest} tokens) plus {after} label or generated '
                     f'tokens exceeds the model\'s context of {context} tokens.')
  per_shot = (len(prefixes[worst]) - head_length) / shots
  raise ValueError(f'config.icl.shots={shots}: draw {worst}\'s {len(prefixes[worst])}-token prefix + the longest '
                   f'text\'s {longest} tokens + {after} label or generated tokens = {total} exceeds the model\'s '
                   f'context of {context} tokens; about {max(int(room // per_shot), 0)} shots fit.')


class _TrainRows:
  """Global step -> this process's rows of global batch `step`: a fresh permutation of the training rows every
  epoch, drawn from (seed, epoch); the global batch is the same for any number of processes."""

  def __init__(self, tokens, mask, labels, *, seed: int, global_batch: int, process_index: int, process_count: int):
    if global_batch % process_count:
      raise ValueError(f'global_batch_size={global_batch} is not divisible by the {process_count} processes.')
    self.tokens, self.mask, self.labels, self.seed = tokens, mask, labels, seed
    self.global_batch, self.rows = global_batch, global_batch // process_count
    self.first = process_index * self.rows
    self._order = functools.lru_cache(maxsize=2)(lambda epoch: np.random.default_rng([seed, epoch]).permutation(
        len(labels)))

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    positions = step * self.global_batch + self.first + np.arange(self.rows, dtype=np.int64)
    epochs, within = np.divmod(positions, len(self.labels))
    rows = np.empty(self.rows, np.int64)
    for epoch in np.unique(epochs):  # a batch spans at most a few epochs
      rows[epochs == epoch] = self._order(int(epoch))[within[epochs == epoch]]
    return {'tokens': self.tokens[rows], 'mask': self.mask[rows], 'label': self.labels[rows],
            'index': positions.astype(np.int32)}


def _write_prompts(path: str, prefixes: list[str], body: str, label_words) -> None:
  """What the model reads, for a person to check: every draw's prefix with the first example's prompt after it."""
  with open(path, 'w') as f:
    for draw, prefix in enumerate(prefixes):
      f.write(f'===== draw {draw}: prefix + first example, then one of the label words {label_words!r}\n')
      f.write(prefix + body + '\n')


def _fill_batch(tokens: np.ndarray, mask: np.ndarray, batch_size: int, pad_id: int):
  """The last batch of a split, topped up with all-padding rows to the compiled batch size."""
  missing = batch_size - len(tokens)
  if not missing:
    return tokens, mask
  return (np.concatenate([tokens, np.full((missing, tokens.shape[1]), pad_id, tokens.dtype)]),
          np.concatenate([mask, np.zeros((missing, mask.shape[1]), bool)]))


def _place(x: np.ndarray, mesh):
  """A global array split over the mesh's data axes, built from the full host array every process holds."""
  if mesh is None:
    return jnp.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding.batch_sharding(mesh), lambda index: x[index])


def _until_eos(ids: np.ndarray, tokenizer) -> str:
  ends = np.flatnonzero(ids == tokenizer.eos_id)
  return tokenizer.decode(ids[:ends[0]] if len(ends) else ids)


def _split_prefix(split: str) -> str:
  """Where a split's metrics live: test at the top (eval/accuracy), ood_tweets under eval/ood/tweets/, ..."""
  if split == 'test':
    return ''
  return split.replace('_', '/', 1) + '/' if split.startswith('ood_') else split + '/'


def _draw_metrics(scores, answers, splits, labels, content_free, label_words, class_names, *, generate: bool):
  calibrated = lmc.calibrate(scores, scores[content_free])
  words = [w.strip() or name for w, name in zip(label_words, class_names)]
  # The prompt's bias that calibration divides out: when it is far from uniform, calibration moves many predictions.
  metrics = {f'eval/content_free/p/{word}': float(p) for word, p in
             zip(words, lmc.content_free_distribution(scores[content_free]))}
  for split, rows in splits.items():
    at, y = _split_prefix(split), labels[split]
    predicted, predicted_calibrated = scores[rows].argmax(1), calibrated[rows].argmax(1)
    metrics[f'eval/{at}accuracy'] = float(np.mean(predicted == y))
    metrics[f'eval/{at}calibrated/accuracy'] = float(np.mean(predicted_calibrated == y))
    for c, word in enumerate(words):
      metrics[f'eval/{at}pred_share/{word}'] = float(np.mean(predicted == c))
      metrics[f'eval/{at}calibrated/pred_share/{word}'] = float(np.mean(predicted_calibrated == c))
    if generate:
      metrics[f'eval/{at}generate/accuracy'] = float(np.mean(answers[rows] == y))
      metrics[f'eval/{at}generate/unparseable'] = float(np.mean(answers[rows] == -1))
  return metrics


def _over_draws(per_draw: list[dict], *, with_std: bool) -> dict:
  results = {}
  for key in per_draw[0]:
    mean, std = lmc.mean_and_std([m[key] for m in per_draw])
    results[key] = mean
    if with_std and key.endswith('accuracy'):
      results[key + '_std'] = std
  return results

