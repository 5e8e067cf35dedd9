"""Text classification with a pretrained language model: zero-shot, in-context, and tuned.

The model scores each class by the log-likelihood of the class's label word after a prompt (the template filled
with the text, chat-wrapped or not, after k demonstrations from the training split); the best-scoring class is the
prediction. The same pass gives the contextually calibrated prediction (Zhao et al. 2021: the prompt's bias measured
on content-free inputs and divided out) and the start of a greedy generation, whose first label word is the
generated answer. The scoring functions are in foundation/evaluate/lm_classify.py; this file brings the data, the
config and the metrics.

`config.tune.method` says what adapts, trained by the loop through `loss` (the cross-entropy of the rank
classification over the classes, the template and label words kept, as in LM-BFF):
  none      nothing: zero-shot or in-context (num_train_steps=0)
  prompt    P soft-prompt vectors before the prompt (Lester et al. 2021); init from label words, vocabulary, uniform
  prefix    P keys and values per layer and KV head (Li & Liang 2021), optionally through an MLP folded away after
  lora      low-rank factors beside the projections `tune.lora_targets` names, merged into the weights to evaluate
  finetune  the LM's own weights (all, or the ones `optim.freeze` leaves), loaded through config.init_from
  head      standard fine-tuning: a linear head on the pooled hidden state instead of the label words
  probe     the probe suite (ridge linear probe, k-NN) on the frozen LM's pooled features; nothing trains
The soft prompt and the prefix are a one-row KV cache in front of the prompt, in training and evaluation alike
(foundation/models/adapters.py). For prompt, prefix and lora the LM is `Task.frozen` (a GGUF file, pinned by its
sha256 in config.json, or a small random model for tests): sharded like trained weights, without optimizer state,
never in the run's checkpoints, so an adapter's checkpoint holds the adapter alone and records its base.
`data.shots_per_class` trains on that many examples per class, drawn by config.seed; the in-context demonstrations
of such a run come from the same examples.

Evaluation, per split of `eval.splits` (metric names: test has no split segment, `validation/`, `ood/tweets/`, ...):
  eval/accuracy, eval/calibrated/accuracy, eval/generate/accuracy, eval/generate/unparseable (the share of answers
  with no label word, counted wrong), eval/pred_share/<word> (the share of predictions of each label; also
  calibrated/pred_share/<word>). For all splits: eval/content_free/p/<word>, the class distribution on the
  content-free inputs, which calibration divides out. With
  in-context demonstrations every metric is the mean over `icl.draws` draws of demonstrations, and the accuracies
  have an `_std` over draws as well. Choose templates and label words on validation: test is reported beside it
  and never used to select anything. Evaluations during training read only `eval.selection_splits` (the first
  `eval.selection_max_examples` of each, 0: all); the run's result (the last step's, or with early stopping the
  best step's, under best/) reads every split whole.

Every process reads and scores every example (the splits are small); the batches are split over the mesh's data
axes. Efficiency on a CPU: examples are sorted by length into a few padded lengths (few compiled shapes); the
shared prefix (chat turn start, demonstrations) runs once per draw into a KV cache that every batch attends to; the
projection onto the vocabulary is computed only where a label token is predicted. Training batches are sorted by
length within windows of `data.sort_window` batches, so they pad little.
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

from foundation import checkpoint, config_base, files, sharding
from foundation.data import text as text_data
from foundation.data.tokenizers import ByteTokenizer
from foundation.evaluate import lm_classify as lmc
from foundation.evaluate import probes
from foundation.evaluate.generate import text_until_eos
from foundation.models import adapters
from foundation.models.gguf import gguf_header, load_gguf, resolve_gguf
from foundation.models.transformer import (Transformer, TransformerConfig, forward_flops_per_token, is_lora_param,
                                           lora_target_names, merge_lora, param_count, stack_layers)
from foundation.tasks import EvalContext, Task
from foundation.tasks.lm import import_gguf, passes_under_freeze

RANDOM_SOURCE = 'random'  # lm.source for a small random Transformer on bytes (tests, smoke runs)
PREFIX_MULTIPLE = 32      # prefix caches are padded to a multiple of this: one compiled shape for all draws
# config.tune.method: how the classifier adapts (see the module docstring).
METHODS = ('none', 'prompt', 'prefix', 'lora', 'finetune', 'head', 'probe')
LM_TRAINED = ('finetune', 'head')  # the LM's own weights train (config.init_from loads them)
TRAIN_SUBSET_DRAW = 2**31 - 1  # the seed stream of the few-shot training subset, apart from demonstration draws


def build(config) -> Task:
  data, prompt, icl, ev, tune = config.data, config.prompt, config.icl, config.eval, config.tune
  _check_fields(config)
  read_splits = list(dict.fromkeys([*ev.splits, *ev.selection_splits]))
  text_data.check_prepared(data.name, data.data_dir, [data.train_split, *read_splits])
  # What demonstrations, training or the probe's fit read from the training split must not be evaluated on.
  for split in read_splits if icl.shots or config.num_train_steps or tune.method == 'probe' else ():
    field = 'config.eval.splits' if split in ev.splits else 'config.eval.selection_splits'
    text_data.check_disjoint(data.name, data.data_dir, {'config.data.train_split': data.train_split, field: split})
  class_names = _class_names(data)
  label_words = tuple(prompt.label_words)
  lmc.check_prompt(prompt.template, label_words, class_names)
  model_cfg, tokenizer = _language_model(config.lm)
  method = _check_method(config, model_cfg)
  if prompt.chat and not hasattr(tokenizer, 'chat_parts'):
    raise ValueError(f'config.prompt.chat: lm.source={config.lm.source!r} has a byte tokenizer, without chat turns.')
  chat_parts = tokenizer.chat_parts() if prompt.chat else None
  head, tail = chat_parts[:2] if chat_parts else ('', '')
  encode = lambda s: np.asarray(tokenizer.encode(s), np.int32)
  body = lambda t: encode(lmc.fill(prompt.template, t) + tail)  # a training row's: never after demonstrations
  start = query_start(config, chat_parts)
  query = lambda t: start + lmc.fill(prompt.template, t) + tail  # an evaluated row's text, after its draw's prefix

  label_ids = [encode(w) for w in label_words]
  if not all(len(ids) for ids in label_ids):
    raise ValueError(f'config.prompt.label_words={label_words!r}: a word encodes to no tokens.')
  label_tokens, label_mask = lmc.pad(label_ids, max(map(len, label_ids)), tokenizer.pad_id, left=False)
  new_tokens = config.generate.max_new_tokens if method not in ('head', 'probe') else 0
  # What early stopping may select by: the accuracies of the selection splits (not every example's, not test).
  accuracies = ['accuracy'] if method in ('head', 'probe') else ['accuracy', 'calibrated/accuracy'] + [
      'generate/accuracy'] * bool(new_tokens)
  selection_metrics = tuple(f'eval/{_split_prefix(split)}{name}' for split in ev.selection_splits
                            for name in accuracies)

  train_texts, train_labels = read_split(data, data.train_split, 0)
  # The training labels a run may read: every training text, or shots_per_class of each class. Training rows and
  # in-context demonstrations both come from them (LM-BFF draws a few-shot run's demonstrations from its training
  # set). Choosing a step reads validation labels besides: eval.selection_max_examples of them.
  if data.shots_per_class and icl.shots > data.shots_per_class * len(class_names):
    raise ValueError(f'config.icl.shots={icl.shots} demonstrations come from the {data.shots_per_class} training '
                     f'examples per class of config.data.shots_per_class, {data.shots_per_class * len(class_names)} '
                     f'in all: lower icl.shots to at most that, or raise shots_per_class.')
  train_picks = (lmc.demonstration_indices(train_labels, data.shots_per_class * len(class_names), len(class_names),
                                           seed=config.seed, draw=TRAIN_SUBSET_DRAW)
                 if data.shots_per_class else np.arange(len(train_labels)))
  train_texts, train_labels = [train_texts[i] for i in train_picks], train_labels[train_picks]
  eval_rows, eval_labels, splits = [], {}, {}
  eval_texts = []
  for split in read_splits:
    texts, labels = read_split(data, split, ev.max_examples)
    eval_texts += texts
    splits[split] = slice(len(eval_rows), len(eval_rows) + len(texts))
    eval_rows += [encode(query(t)) for t in texts]
    eval_labels[split] = labels
  content_free = slice(len(eval_rows), len(eval_rows) + len(config.calibration.content_free))
  eval_rows += [encode(query(t)) for t in config.calibration.content_free]
  empty = [t for t, row in zip([*eval_texts, *config.calibration.content_free], eval_rows) if not len(row)]
  if empty:  # its row would be all padding: the label words scored after a pad token, not after the prompt
    raise ValueError(f'config.prompt.template={prompt.template!r} around the text {empty[0]!r} leaves no token '
                     'to score the label words after: put words around {text}, or leave that text out of '
                     'config.calibration.content_free.')

  # The learned start of every prompt (soft prompt or prefix), before the chat turn and the demonstrations.
  adapter_len = tune.length if method in ('prompt', 'prefix') else 0
  init_ids = jnp.asarray(adapters.init_token_ids(tune.init, adapter_len, model_cfg.vocab_size,
                                                  [ids.tolist() for ids in label_ids], config.seed))
  prefix_texts = demonstration_prefixes(config, train_texts, train_labels, chat_parts)
  prefixes = [encode(p) for p in prefix_texts]
  first_body = query(eval_texts[0])
  head_ids = encode(head)
  _check_context(prefixes, len(head_ids), max(map(len, eval_rows)), label_tokens.shape[1], new_tokens,
                 model_cfg.max_len - adapter_len, icl.shots)
  prefix_slots = lmc.round_up(max(map(len, prefixes)), PREFIX_MULTIPLE) if max(map(len, prefixes)) else 0

  def batches_of(ids: np.ndarray) -> list:
    return [(ids[rows], *lmc.pad([eval_rows[ids[i]] for i in rows], length, tokenizer.pad_id, left=True))
            for rows, length in lmc.length_batches([len(eval_rows[i]) for i in ids], ev.batch_size)]

  # The result's evaluation reads `eval.splits`; one during training only the model-selection splits (their first
  # eval.selection_max_examples, where that is set).
  result = {split: splits[split] for split in ev.splits}
  chosen = lambda split: min(ev.selection_max_examples or len(eval_labels[split]), len(eval_labels[split]))
  selection = {split: slice(splits[split].start, splits[split].start + chosen(split)) for split in ev.selection_splits}
  selection_labels = {split: eval_labels[split][:chosen(split)] for split in ev.selection_splits}
  rows_of = lambda slices: np.concatenate([np.arange(len(eval_rows))[r] for r in [*slices, content_free]])
  eval_batches = {True: batches_of(rows_of(result.values())), False: batches_of(rows_of(selection.values()))}

  # Training rows: the zero-shot prompt (no demonstrations) of each labelled example.
  train_bodies = [body(t) for t in train_texts]
  train_length = lmc.bucket_length(max(map(len, train_bodies)))
  if adapter_len + len(head_ids) + train_length + label_tokens.shape[1] > model_cfg.max_len:
    raise ValueError(f'the longest training prompt ({adapter_len + len(head_ids) + train_length} tokens padded, with '
                     f'{adapter_len} of config.tune.length) does not fit the model\'s context of {model_cfg.max_len} '
                     'tokens.')
  # int32 tokens, a bool mask, row ids, label and index per example; refused here rather than met by the OOM killer.
  batch_bytes = config.global_batch_size * (5 * train_length + 24)
  host_bytes = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  if batch_bytes > host_bytes / 4:
    raise ValueError(f'one batch of config.global_batch_size={config.global_batch_size} needs '
                     f'{batch_bytes / 2**30:.1f} GiB of host memory (of {host_bytes / 2**30:.0f} GiB here); lower it.')
  lora_cfg = (dataclasses.replace(model_cfg, lora_rank=tune.lora_rank, lora_alpha=tune.lora_alpha,
                                  lora_targets=tune.lora_targets) if method == 'lora' else model_cfg)

  @functools.lru_cache(maxsize=None)
  def resized(slots, lora=False):
    """The model with a KV cache of `slots` (max_len only sizes the cache; the context was checked above)."""
    return Transformer(dataclasses.replace(lora_cfg if lora else model_cfg, max_len=max(slots, 1)))

  def boxed_lm_init(rng):
    return resized(model_cfg.max_len, method == 'lora').init(rng, jnp.zeros((1, 1), jnp.int32))['params']

  def frozen(sources):
    if method in LM_TRAINED:
      return {}  # the LM's weights are trainable: config.init_from loads them
    abstract = _abstract_variables(model_cfg)
    if config.lm.source == RANDOM_SOURCE:  # the same weights in either layout, as a GGUF's are
      unrolled = Transformer(dataclasses.replace(model_cfg, scan_layers=False))
      values = nn.unbox(jax.jit(unrolled.init)(jax.random.key(config.seed), jnp.zeros((1, 1), jnp.int32))['params'])
      values = stack_layers(values, model_cfg.num_layers) if model_cfg.scan_layers else values
    else:
      values = sources.load_file('lm', resolve_gguf(config.lm.source),
                                 lambda path: load_gguf(path, scan_layers=model_cfg.scan_layers)[1],
                                 nn.unbox(abstract['params']))
    # Boxed with the model's logical axis names, so the loop shards the frozen model as it would a trained one.
    return {'lm': checkpoint.rebox(abstract['params'], values)}

  soft_prompt = adapters.SoftPrompt(tune.length, model_cfg.embed_dim)
  prefix_module = adapters.Prefix(tune.length, model_cfg.num_layers, model_cfg.num_kv_heads, model_cfg.head_dim,
                                  model_cfg.embed_dim, hidden=tune.prefix_hidden)
  initial = lambda lm: None if tune.init == 'uniform' else (
      jnp.take(lm['embedding'], init_ids, axis=0) if method == 'prompt'
      else adapters.token_kv(resized(adapter_len), lm, init_ids))
  num_classes = len(class_names)

  def init(rng):
    if method in LM_TRAINED:
      params = {'lm': boxed_lm_init(rng)}
      if method == 'head':
        params['head'] = nn.Dense(num_classes, kernel_init=nn.initializers.zeros).init(
            rng, jnp.zeros((1, model_cfg.embed_dim)))['params']
      return params
    if method == 'lora':  # only the low-rank factors train; the base weights come from the frozen model
      return {'lora': _lora_leaves(boxed_lm_init(rng))}
    shapes = jax.ShapeDtypeStruct((adapter_len, model_cfg.embed_dim), jnp.float32) if method == 'prompt' else (
        jax.ShapeDtypeStruct((model_cfg.num_layers, adapter_len, model_cfg.num_kv_heads, model_cfg.head_dim),
                             jnp.float32),) * 2
    no_initial = None if tune.init == 'uniform' else jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    if method == 'prompt':
      return {'prompt': soft_prompt.init(rng, no_initial)['params']}
    if method == 'prefix':
      return {'prefix': prefix_module.init(rng, no_initial)['params']}
    return {}  # zero-shot, in-context, probe: nothing trains

  def language_model(params, frozen_params, *, merged: bool):
    """(the LM's params, whether they carry unmerged LoRA factors). Evaluation merges LoRA into the base weights."""
    if method in LM_TRAINED:
      return params['lm'], False
    lm = frozen_params['lm']
    if method != 'lora':
      return lm, False
    with_lora = _merge_trees(lm, params['lora'])
    return (merge_lora(with_lora, lora_cfg)[0], False) if merged else (with_lora, True)

  def learned_start(params, lm):
    """The one-row cache of the soft prompt or prefix (adapter_len slots), or None."""
    if method == 'prompt':
      return adapters.prompt_cache(resized(adapter_len), lm, soft_prompt.apply({'params': params['prompt']},
                                                                                initial(lm)))
    if method == 'prefix':
      kv = prefix_module.apply({'params': params['prefix']}, initial(lm))
      return adapters.prefix_cache(resized(adapter_len), *kv)
    return None

  def head_scores(params, hidden, mask):
    return nn.Dense(num_classes).apply({'params': params['head']}, lmc.pool(hidden, mask, tune.pooling))

  def loss(params, frozen_params, batch, rng):
    del rng
    lm, lora = language_model(params, frozen_params, merged=False)
    cache = learned_start(params, lm)
    if len(head_ids):
      with nn.logical_axis_rules(()):  # one row: nothing to split over the data axes
        cache = lmc.prefill(resized(len(head_ids), lora), lm, jnp.asarray(head_ids[None]),
                            jnp.ones((1, len(head_ids)), bool), cache)
    tokens, mask = batch['tokens'], batch['mask']
    model = resized(tokens.shape[1] + label_tokens.shape[1] - 1, lora)
    if method == 'head':
      scores = head_scores(params, lmc.read_bodies(model, lm, cache, tokens, mask)[0], mask)
    else:
      scores, _, _ = lmc.class_scores(model, lm, cache, tokens, mask, jnp.asarray(label_tokens),
                                      jnp.asarray(label_mask))
    mean_loss, accuracy = lmc.rank_classification_loss(scores, batch['label'])
    return mean_loss, {'accuracy': accuracy}

  def train_batches(process_index, process_count):
    return grain.MapDataset.range(2**40).map(_TrainRows(
        train_bodies, train_labels, tokenizer.pad_id, seed=config.seed,
        global_batch=config.global_batch_size, sort_window=data.sort_window, process_index=process_index,
        process_count=process_count))

  compiled = {}

  def evaluate(params, frozen_params, step, ctx: EvalContext):
    del step
    if ctx.is_writer and not compiled:  # once per run
      _write_prompts(os.path.join(ctx.workdir, 'prompts.txt'), prefix_texts, first_body, label_words)
    if ctx.mesh not in compiled:
      out = sharding.replicated(ctx.mesh) if ctx.mesh is not None else None
      compiled[ctx.mesh] = (jax.jit(lmc.prefill, static_argnums=0),
                            jax.jit(lmc.score_and_generate, static_argnames=('model', 'max_new_tokens'),
                                    out_shardings=out),
                            jax.jit(lambda model, lm, cache, tokens, mask: lmc.read_bodies(model, lm, cache, tokens,
                                                                                           mask)[0],
                                    static_argnums=0, out_shardings=out),
                            jax.jit(learned_start))
    prefill, score, read, start_of = compiled[ctx.mesh]
    lm, _ = language_model(params, frozen_params, merged=True)
    batches = eval_batches[ctx.final]
    reported, labels = (result, eval_labels) if ctx.final else (selection, selection_labels)
    start = time.perf_counter()
    per_draw = []
    with nn.logical_axis_rules(()):  # the batch's sharding is set on the inputs; XLA propagates it
      learned = start_of(params, lm)

      def shared_start(prefix):
        """The cache every body of a draw reads after: the learned start, then the prefix (chat turn, demos)."""
        if not prefix_slots:
          return learned
        tokens, mask = lmc.pad([prefix], prefix_slots, tokenizer.pad_id, left=False)
        return prefill(resized(prefix_slots), lm, jnp.asarray(tokens), jnp.asarray(mask), learned)

      if method == 'probe':  # one draw: no demonstrations, at most the chat turn's start
        cache = shared_start(prefixes[0])
        features = lambda bodies: _features(read, resized, lm, cache, bodies, tokenizer.pad_id, ev.batch_size,
                                            tune.pooling, ctx.mesh)
        rows = np.concatenate([np.arange(len(eval_rows))[r] for r in reported.values()])
        eval_x = np.zeros((len(eval_rows), model_cfg.embed_dim), np.float32)
        eval_x[rows] = features([eval_rows[i] for i in rows])
        results = _probe_metrics(features(train_bodies), train_labels, eval_x, reported, labels, num_classes)
        per_draw = None
      for prefix in prefixes if per_draw is not None else ():
        cache = shared_start(prefix)
        scores = np.zeros((len(eval_rows), num_classes), np.float64)
        answers = np.full(len(eval_rows), -1)
        for rows, tokens, mask in batches:
          n = len(rows)
          tokens, mask = _fill_batch(tokens, mask, ev.batch_size, tokenizer.pad_id)
          model = resized(lmc.slots_needed(tokens.shape[1], label_tokens.shape[1], new_tokens))
          if method == 'head':
            hidden = read(model, lm, cache, _place(tokens, ctx.mesh), _place(mask, ctx.mesh))
            s, generated = head_scores(params, hidden, jnp.asarray(mask)), None
          else:
            s, generated = score(model, lm, cache, _place(tokens, ctx.mesh), _place(mask, ctx.mesh),
                                 label_tokens, label_mask, max_new_tokens=new_tokens)
          scores[rows] = np.asarray(s)[:n]
          if generated is not None:
            answers[rows] = [lmc.parse_label(text_until_eos(g, tokenizer), label_words)
                             for g in np.asarray(generated)[:n]]
        per_draw.append(_draw_metrics(scores, answers, reported, labels, content_free, label_words,
                                      class_names, generate=bool(new_tokens)))
    seconds = time.perf_counter() - start
    if per_draw is not None:
      results = _over_draws(per_draw, with_std=len(prefixes) > 1)  # a std needs two draws
    results['perf/eval_seconds'] = seconds
    evaluated = len(eval_rows) if method == 'probe' else sum(len(rows) for rows, _, _ in batches)
    results['perf/eval_examples_per_sec'] = evaluated * len(prefixes) / seconds
    return results

  # Model FLOPs of a training example (flops_per_token's convention, attention over the whole context): the blocks
  # run over its body at the mean length it is padded to, over the label tokens fed after it (all but the first, per
  # class; not for the head method), and over its share of what `loss` runs once per call for the whole batch (the
  # global batch, or a microbatch, or a device's share on the pmap path): the template's head and the soft prompt,
  # as a one-row cache that every body reads, and, forward only, the tokens a prefix starts from (init 'labels' or
  # 'vocab' without the MLP). The projection to the vocabulary runs only where a label token is predicted (the head
  # method has none). Counting the soft prompt per example and that projection at every position overstated
  # SmolLM2's FLOPs 1.9x for a 20-vector prompt and 1.4x for fine-tuning (MFU read 113-152% on a Zen 1 core pair).
  # On the first four training batches this count is 0.84x XLA's count of the loss's forward, which adds the norms
  # and softmaxes. A forward pass, plus for training the backward pass through the activations (x2) and, where the
  # LM's weights train, their gradients (x3 in all); under config.optim.freeze, see passes_under_freeze.
  body_length = float(np.mean([lmc.bucket_length(len(b)) for b in train_bodies]))
  label_len = 1 if method == 'head' else label_tokens.shape[1]
  fed_labels = (label_len - 1) * label_tokens.shape[0]
  shared = len(head_ids) + (adapter_len if method == 'prompt' else 0)
  prefix_start = adapter_len if method == 'prefix' and tune.init != 'uniform' else 0
  passes = 1 if method in ('none', 'probe') else 3 if method in LM_TRAINED else 2

  def flops_per_example():
    per_call = config.global_batch_size / config.grad_accum_steps
    per_call /= jax.device_count() if config.parallelism == 'pmap' else 1
    block_passes, vocab_passes = passes, passes
    if method in LM_TRAINED and config.optim.freeze:
      block_passes, vocab_passes = passes_under_freeze(config.optim, init, model_cfg.num_layers, prefix='lm/',
                                                     tied=model_cfg.tie_embeddings)
    context = adapter_len + len(head_ids) + body_length + label_len - 1
    blocks, vocab = forward_flops_per_token(model_cfg, int(context))
    predicted = 0 if method == 'head' else 1 + fed_labels
    return (block_passes * blocks * (body_length + fed_labels + shared / per_call) + vocab_passes * vocab * predicted
            + blocks * prefix_start / per_call)

  return Task(init=init, loss=loss, train_batches=train_batches, evaluate=evaluate, frozen=frozen,
              selection_metrics=selection_metrics,
              import_params=import_gguf(model_cfg) if method in LM_TRAINED else None,
              flops_per_example=flops_per_example, tokens_per_example=int(round(body_length)),
              init_from_fields=_adapter_fields(config))


def _lora_leaves(params: dict) -> dict:
  """The LoRA factors of a params tree, in the same nesting (the rest dropped)."""
  out = {}
  for key, value in params.items():
    if isinstance(value, dict):
      inner = _lora_leaves(value)
      if inner:
        out[key] = inner
    elif is_lora_param(key):
      out[key] = value
  return out


def _merge_trees(base: dict, extra: dict) -> dict:
  """`base` with the leaves of `extra` added at the same paths."""
  out = dict(base)
  for key, value in extra.items():
    out[key] = _merge_trees(base.get(key, {}), value) if isinstance(value, dict) else value
  return out


def _features(read, resized, lm, learned, bodies, pad_id: int, batch_size: int, pooling: str, mesh) -> np.ndarray:
  """Pooled final hidden states [n, embed] of the bodies, batched by length."""
  out = None
  for rows, length in lmc.length_batches([len(b) for b in bodies], batch_size):
    tokens, mask = _fill_batch(*lmc.pad([bodies[i] for i in rows], length, pad_id, left=True), batch_size, pad_id)
    hidden = read(resized(length), lm, learned, _place(tokens, mesh), _place(mask, mesh))
    pooled = np.asarray(lmc.pool(hidden, jnp.asarray(mask), pooling))[:len(rows)]
    out = np.zeros((len(bodies), pooled.shape[1]), np.float32) if out is None else out
    out[rows] = pooled
  return out


def _probe_metrics(train_x, train_y, eval_x, splits, labels, num_classes: int) -> dict:
  """The probe suite (foundation/evaluate/probes.py) of the training features, measured on each split; the ridge
  linear probe (its l2 chosen by leave-one-out on the training features) is the split's accuracy."""
  results = {}
  for split, rows in splits.items():
    suite = probes.probe_suite(train_x, train_y, eval_x[rows], labels[split], num_classes=num_classes,
                               shots=(), seeds=(0, 1, 2))  # few-shot: data.shots_per_class
    at = _split_prefix(split)
    results[f'eval/{at}accuracy'] = suite['linear_probe/accuracy']
    results.update({f'eval/{at}probe/{k}': v for k, v in suite.items()})
  return results


def _check_method(config, model_cfg) -> str:
  """config.tune against config.icl and config.init_from; returns the method."""
  tune = config.tune
  if tune.method not in METHODS:
    raise ValueError(f'config.tune.method={tune.method!r}; choose one of {METHODS}.')
  if tune.method in ('prompt', 'prefix') and (not isinstance(tune.length, int) or tune.length < 1):
    raise ValueError(f'config.tune.length={tune.length!r} must be a whole number of at least 1 for '
                     f'method {tune.method!r}.')
  if tune.method in ('head', 'probe') and config.icl.shots:
    raise ValueError(f'config.tune.method={tune.method!r} classifies features, not label words: set '
                     '--config.icl.shots=0.')
  if tune.method not in ('none', 'probe') and config.num_train_steps and config.icl.shots:
    raise ValueError(f'config.icl.shots={config.icl.shots}: training reads zero-shot prompts, so demonstrations '
                     'would only change the evaluation; set --config.icl.shots=0 to train, or evaluate a trained '
                     'run in context with --config.num_train_steps=0 and its workdir as --config.init_from.source'
                     + (' (and --config.init_from.params_path=params/lm).' if tune.method in LM_TRAINED else '.'))
  if tune.method == 'prefix' and tune.prefix_hidden and tune.init != 'uniform':
    raise ValueError(f'config.tune.init={tune.init!r} does not apply to a prefix trained through the MLP '
                     f'(config.tune.prefix_hidden={tune.prefix_hidden}), which starts from random embeddings: set '
                     '--config.tune.init=uniform.')
  if tune.pooling not in ('last', 'mean'):
    raise ValueError(f'config.tune.pooling={tune.pooling!r}; choose last or mean.')
  if tune.method == 'lora' and (not isinstance(tune.lora_rank, int) or tune.lora_rank < 1):
    raise ValueError(f'config.tune.lora_rank={tune.lora_rank!r} must be a whole number of at least 1.')
  if tune.method == 'lora':
    lora_target_names(dataclasses.replace(model_cfg, lora_rank=tune.lora_rank, lora_alpha=tune.lora_alpha,
                                          lora_targets=tune.lora_targets))  # a regex matching nothing fails here
  trained_lm = tune.method in LM_TRAINED and config.lm.source != RANDOM_SOURCE
  # A trained run's workdir may stand in for the file when nothing trains (evaluating it in context).
  evaluates_a_run = not config.num_train_steps and bool(config.init_from.source) and files.isdir(
      config.init_from.source)
  if trained_lm and not evaluates_a_run and (config.init_from.source != config.lm.source
                                             or config.init_from.target != 'lm'):
    raise ValueError(f'config.tune.method={tune.method!r} trains the LM\'s weights, which start from '
                     f'config.init_from: set --config.init_from.source={config.lm.source} '
                     '--config.init_from.target=lm.')
  return tune.method


def _adapter_fields(config) -> tuple[str, ...]:
  """The config fields, beside the base model, that give a trained adapter its meaning (task.init_from_fields): its
  shape and scale, and the tokens whose embeddings (or keys and values) its saved offset is added to, which
  config.seed draws for 'vocab' and 'labels' inits (so an adapter evaluated in context varies its demonstrations by
  icl.draws, not by seed)."""
  tune = config.tune
  fields = {'prompt': ['tune.init', 'tune.length'], 'prefix': ['tune.init', 'tune.length', 'tune.prefix_hidden'],
            'lora': ['tune.lora_rank', 'tune.lora_alpha', 'tune.lora_targets']}.get(tune.method, [])
  if tune.method in ('prompt', 'prefix') and tune.init != 'uniform':
    fields += ['seed'] + ['prompt.label_words'] * (tune.init == 'labels')
  if fields and config.lm.source == RANDOM_SOURCE:  # the random base model is drawn from the seed
    fields += ['seed', 'lm.random_model']
  return tuple(dict.fromkeys(fields))


def _check_fields(config) -> None:
  icl, ev = config.icl, config.eval
  checks = [('icl.shots', icl.shots, 0), ('icl.draws', icl.draws, 1), ('eval.max_examples', ev.max_examples, 0),
            ('generate.max_new_tokens', config.generate.max_new_tokens, 0),
            ('data.shots_per_class', config.data.shots_per_class, 0), ('data.sort_window', config.data.sort_window, 0),
            ('eval.selection_max_examples', ev.selection_max_examples, 0),
            ('tune.prefix_hidden', config.tune.prefix_hidden, 0)]
  for name, value, least in checks:
    if not config_base.is_whole(value, least):
      raise ValueError(f'config.{name}={value!r} must be a whole number of at least {least}.')
  if not ev.splits or len(set(ev.splits)) != len(ev.splits):
    raise ValueError(f'config.eval.splits={tuple(ev.splits)!r} must name at least one split, each once.')
  if len(set(ev.selection_splits)) != len(ev.selection_splits) or any(map(text_data.reads_test, ev.selection_splits)):
    raise ValueError(f'config.eval.selection_splits={tuple(ev.selection_splits)!r} must name each split once, and '
                     'not test: it is read for the result only.')
  if not all(isinstance(t, str) for t in config.calibration.content_free) or not config.calibration.content_free:
    raise ValueError(f'config.calibration.content_free={config.calibration.content_free!r} must be one or more texts.')


def _class_names(data) -> tuple[str, ...]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  feature = tfds.builder(data.name, data_dir=data.data_dir).info.features[data.label_key]
  if not hasattr(feature, 'names'):
    raise ValueError(f'config.data.label_key={data.label_key!r} of {data.name} is not a class label.')
  return tuple(feature.names)


@functools.lru_cache(maxsize=4)
def _abstract_variables(model_cfg: TransformerConfig) -> dict:
  """The model's variables as shapes, boxed with their logical axes (tracing SmolLM2's init costs ~2 s: once per
  process and config)."""
  return jax.eval_shape(lambda: Transformer(model_cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))


def read_split(data, split: str, limit: int) -> tuple[list[str], np.ndarray]:
  """The split's texts and labels in order; the first `limit` of them when limit > 0."""
  texts, labels = _read_split(data.name, data.data_dir, data.text_key, data.label_key, split, limit)
  return list(texts), labels.copy()


@functools.lru_cache(maxsize=16)
def _read_split(name: str, data_dir: str, text_key: str, label_key: str, split: str, limit: int):
  """Read once per process: decoding the records costs about a second for the movie snippets."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  n = min(limit, len(source)) if limit else len(source)
  records = source.__getitems__(list(range(n)))
  texts = [r[text_key].decode('utf-8') if isinstance(r[text_key], bytes) else r[text_key] for r in records]
  return tuple(texts), np.asarray([r[label_key] for r in records], np.int32)


def query_start(config, chat_parts: tuple[str, str, str] | None = None) -> str:
  """The text that starts every evaluated prompt's own part, after its draw's shared prefix: the separator that
  follows the last demonstration (in a chat, the turn change), or '' without demonstrations."""
  if not config.icl.shots:
    return ''
  return chat_parts[2] if chat_parts else config.icl.separator


def demonstration_prefixes(config, train_texts: list[str], train_labels: np.ndarray,
                           chat_parts: tuple[str, str, str] | None = None) -> list[str]:
  """The shared start of every prompt, one per draw: the draw's demonstrations, joined by icl.separator (the one
  after the last starts the query: `query_start`). One draw of no demonstrations when icl.shots is 0. With the
  tokenizer's `chat_parts` (a chat prompt) the prefix opens the chat and every demonstration is a user turn answered
  by the assistant with the label word, the turns in place of icl.separator."""
  head, tail, separator = chat_parts or ('', '', config.icl.separator)
  prefixes = []
  for draw in range(config.icl.draws if config.icl.shots else 1):
    picks = lmc.demonstration_indices(train_labels, config.icl.shots, len(_class_names(config.data)),
                                      seed=config.seed, draw=draw)
    prefixes.append(lmc.prefix_text(config.prompt.template, config.prompt.label_words, [train_texts[i] for i in picks],
                                    train_labels[picks], separator, head, tail))
  return prefixes


def _language_model(lm) -> tuple[TransformerConfig, object]:
  """The model's config and tokenizer, without reading its weights: a GGUF's header, or the random model's fields."""
  if lm.source != RANDOM_SOURCE:
    cfg, tokenizer = gguf_header(lm.source)
    return TransformerConfig.from_dict({**cfg, 'dtype': lm.dtype, 'matmul_dtype': lm.matmul_dtype,
                                        'scan_layers': lm.scan_layers}), tokenizer
  fields = dict(lm.random_model)
  for name in ('vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'num_kv_heads', 'mlp_dim', 'max_len'):
    value = fields.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'config.lm.random_model.{name}={value!r} must be a whole number of at least 1.')
  cfg = TransformerConfig.from_dict({**fields, 'dtype': lm.dtype, 'matmul_dtype': lm.matmul_dtype,
                                     'scan_layers': lm.scan_layers})
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
  epoch, drawn from (seed, epoch); the global batch is the same for any number of processes.

  Rows are padded per batch to `lmc.bucket_length` of the batch's longest row. With `sort_window` > 0, each
  window of that many consecutive batches of the permutation is sorted by length before it is cut into batches
  (whose order within the window is shuffled again), so a batch holds rows of similar lengths and pads little; a
  handful of padded lengths means a handful of compiled steps. A training set smaller than four windows is not
  sorted: its batches would be the same groups of rows every epoch.
  """

  def __init__(self, bodies, labels, pad_id: int, *, seed: int, global_batch: int, sort_window: int,
               process_index: int, process_count: int):
    if global_batch % process_count:
      raise ValueError(f'global_batch_size={global_batch} is not divisible by the {process_count} processes.')
    self.bodies, self.labels, self.pad_id = bodies, labels, pad_id
    self.global_batch, self.rows = global_batch, global_batch // process_count
    self.first = process_index * self.rows
    window = sort_window * global_batch if len(labels) >= 4 * sort_window * global_batch else 0
    lengths = np.asarray([len(b) for b in bodies])

    def order(epoch):
      rng = np.random.default_rng([seed, epoch])
      permutation = rng.permutation(len(labels))
      if not window:
        return permutation
      out = []
      for start in range(0, len(permutation), window):
        chunk = permutation[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind='stable')]
        batches = [chunk[i:i + global_batch] for i in range(0, len(chunk), global_batch)]
        out += [batches[i] for i in rng.permutation(len(batches))]
      return np.concatenate(out)

    self._order = functools.lru_cache(maxsize=2)(order)

  def _global_rows(self, step: int) -> np.ndarray:
    positions = step * self.global_batch + np.arange(self.global_batch, dtype=np.int64)
    epochs, within = np.divmod(positions, len(self.labels))
    rows = np.empty(self.global_batch, np.int64)
    for epoch in np.unique(epochs):  # a batch spans at most a few epochs
      rows[epochs == epoch] = self._order(int(epoch))[within[epochs == epoch]]
    return rows

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    everyone = self._global_rows(step)  # every process pads to the same length: the global batch's longest row
    length = lmc.bucket_length(max(len(self.bodies[i]) for i in everyone))
    rows = everyone[self.first:self.first + self.rows]
    tokens, mask = lmc.pad([self.bodies[i] for i in rows], length, self.pad_id, left=True)
    positions = step * self.global_batch + self.first + np.arange(self.rows, dtype=np.int64)
    return {'tokens': tokens, 'mask': mask, 'label': self.labels[rows], 'index': positions.astype(np.int32)}


def _write_prompts(path: str, prefixes: list[str], body: str, label_words) -> None:
  """What the model reads, for a person to check: every draw's prefix with the first example's prompt after it."""
  files.write_atomically(path, ''.join(
      f'===== draw {draw}: prefix + first example, then one of the label words {label_words!r}\n{prefix}{body}\n'
      for draw, prefix in enumerate(prefixes)))


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

