r"""Sequence-level distillation (Kim & Rush 2016): a text corpus sampled from a trained decoder LM, as a TFDS dataset
that any student trains on, whatever its tokenizer.

  python -m foundation.sample_corpus --teacher=RUN --out=DATA_DIR [--tokens=2000000] [--temperature=1.0]
  python -m foundation.main --config=configs/distill/shakespeare.py:seqkd --workdir=STUDENT \
      --config.data.data_dir=DATA_DIR

The teacher (an `lm` or `lm_distill` run, at the step it reports) continues prompts cut from its own training split:
each row starts from the first seq_len - chunk tokens of a training window drawn by --seed, then generates --chunk
tokens at a time, every chunk conditioned on the last seq_len - chunk tokens, so the teacher never attends past the
context it was trained on (rotary attention does not extrapolate), until the row holds --tokens_per_row generated
tokens. Only generated tokens are kept: they are cut at the teacher's document breaks (eos) and decoded, one record
per piece, into the `train` split. The `validation` split is the teacher's validation text, copied verbatim, so a
student is evaluated on real text; `eval/nats_per_byte` compares students with different tokenizers.

DATA_DIR gets `samples/*.jsonl` (the text), the built `teacher_samples` dataset and `teacher_samples.json` (the
teacher's path, step and content hash, the settings, and the corpus size). It must not exist yet.
"""

import argparse
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from foundation import checkpoint
from foundation.data import teacher_samples, text
from foundation.evaluate.generate import check_sampling, generate
from foundation.models.transformer import Transformer
from foundation.tasks import lm


def sample_rows(model: Transformer, params, prompts: np.ndarray, *, tokens_per_row: int, chunk: int,
                rng: jax.Array, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """int [rows, tokens_per_row]: each prompt (int [rows, context]) continued chunk by chunk, every chunk
  conditioned on the last `context` tokens (the prompt at first, then what was generated)."""
  context = jnp.asarray(prompts, jnp.int32)
  width = context.shape[1]
  pieces = []
  for i in range(-(-tokens_per_row // chunk)):
    new = generate(model, params, context, max_new_tokens=chunk, rng=jax.random.fold_in(rng, i),
                   temperature=temperature, top_k=top_k, top_p=top_p)
    pieces.append(np.asarray(new))
    context = jnp.concatenate([context, new], axis=1)[:, -width:]
  return np.concatenate(pieces, axis=1)[:, :tokens_per_row]


def documents(rows: np.ndarray, tokenizer) -> list[str]:
  """Each row cut at eos into pieces, decoded; empty pieces dropped."""
  out = []
  for row in rows:
    breaks = np.flatnonzero(row == tokenizer.eos_id)
    for piece in np.split(row, breaks):
      piece = piece[piece != tokenizer.eos_id]
      if len(piece):
        decoded = tokenizer.decode(piece)
        if decoded:
          out.append(decoded)
  return out


def _write_jsonl(path: str, texts: list[str]) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    for t in texts:
      f.write(json.dumps({'text': t}) + '\n')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--teacher', required=True, help='a trained decoder LM run (workdir)')
  parser.add_argument('--out', required=True, help='new TFDS data dir for the `teacher_samples` dataset')
  parser.add_argument('--tokens', type=int, default=2_000_000, help='generated tokens in all (teacher tokens)')
  parser.add_argument('--tokens_per_row', type=int, default=1024, help='tokens one prompt is continued by')
  parser.add_argument('--chunk', type=int, default=0, help='tokens per generation call (default: seq_len // 2)')
  parser.add_argument('--batch', type=int, default=256, help='rows generated at once')
  parser.add_argument('--temperature', type=float, default=1.0, help='1.0 samples the teacher\'s distribution')
  parser.add_argument('--top_k', type=int, default=0)
  parser.add_argument('--top_p', type=float, default=1.0)
  parser.add_argument('--seed', type=int, default=0, help='draws the prompts and the samples')
  parser.add_argument('--data_dir', default='', help='the teacher\'s TFDS data dir (default: the one it used)')
  args = parser.parse_args(argv)
  try:
    if os.path.exists(args.out):
      raise ValueError(f'--out={args.out} exists; name a new directory (nothing there is overwritten).')
    saved, model_cfg = lm.saved_lm(args.teacher)
    data = saved['data']
    seq_len, chunk = data['seq_len'], args.chunk or data['seq_len'] // 2
    if not 0 < chunk < seq_len:
      raise ValueError(f'--chunk={chunk} must be in [1, seq_len={seq_len}): the rest of the context is the prompt.')
    if min(args.tokens, args.tokens_per_row, args.batch) < 1:
      raise ValueError('--tokens, --tokens_per_row and --batch must be positive.')
    if args.batch % data['num_shards']:
      raise ValueError(f'--batch={args.batch} must be a multiple of the teacher\'s data.num_shards='
                       f'{data["num_shards"]} (prompts are windows of its training pipeline).')
    check_sampling(args.temperature, args.top_k, args.top_p, model_cfg.vocab_size, prefix='--', greedy_option='')
    data_dir = args.data_dir or data['data_dir']
    text.check_prepared(data['name'], data_dir, [data['train_split'], data['eval_split']])
    tokenizer = lm.tokenizer_for(data['tokenizer'])
    try:  # the prompts: windows of the teacher's training pipeline (checks the shards against --batch)
      prompts = text.train_batches(name=data['name'], data_dir=data_dir, split=data['train_split'],
                                   text_key=data['text_key'], tokenizer=tokenizer, seq_len=seq_len,
                                   global_batch=args.batch, num_shards=data['num_shards'], seed=args.seed)
    except ValueError as e:  # the pipeline's refusal names its own batch, not this flag
      raise ValueError(f'--batch={args.batch}: {e}') from e
  except (ValueError, FileNotFoundError) as e:
    print(f'foundation.sample_corpus: {e}', file=sys.stderr)
    return 2
  model = Transformer(model_cfg)
  _, _, params, step = lm.restore_run(args.teacher)
  start, train_texts, generated = time.time(), [], 0
  rounds = -(-args.tokens // (args.batch * args.tokens_per_row))
  with nn.logical_axis_rules(()):  # one device, no activation constraints (as the LM task's samples)
    for r in range(rounds):
      rows = sample_rows(model, params, prompts[r]['inputs'][:, :seq_len - chunk], tokens_per_row=args.tokens_per_row,
                         chunk=chunk, rng=jax.random.fold_in(jax.random.key(args.seed), r),
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
      # The last round keeps what --tokens still asks for: whole rows, then the start of one more.
      keep = min(rows.size, args.tokens - generated)
      full, part = divmod(keep, args.tokens_per_row)
      train_texts += documents(rows[:full], tokenizer) + (documents(rows[full:full + 1, :part], tokenizer)
                                                          if part else [])
      generated += keep
      print(f'round {r + 1}/{rounds}: {generated:,} tokens, {len(train_texts):,} documents, '
            f'{time.time() - start:.0f} s', flush=True)
  os.makedirs(os.path.join(args.out, teacher_samples.SAMPLES_DIR))
  _write_jsonl(os.path.join(args.out, teacher_samples.SAMPLES_DIR, 'train.jsonl'), train_texts)
  _write_jsonl(os.path.join(args.out, teacher_samples.SAMPLES_DIR, 'validation.jsonl'),
               text.read_texts(data['name'], data_dir, data['eval_split'], data['text_key']))
  teacher_samples.build(args.out)
  summary = dict(teacher=os.path.abspath(args.teacher), step=step, params_hash=checkpoint.content_hash(params),
                 tokenizer=data['tokenizer'], dataset=data['name'], validation_split=data['eval_split'],
                 tokens=generated, documents=len(train_texts),
                 bytes=sum(len(t.encode('utf-8')) for t in train_texts), seconds=round(time.time() - start, 1),
                 **{k: getattr(args, k) for k in ('tokens_per_row', 'batch', 'temperature', 'top_k', 'top_p', 'seed')},
                 chunk=chunk)
  with open(os.path.join(args.out, 'teacher_samples.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  print(f'{generated:,} tokens from {args.teacher} (step {step}) as {len(train_texts):,} documents; '
        f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
