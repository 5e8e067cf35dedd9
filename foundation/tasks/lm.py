"""Next-token language modelling: a Llama-style decoder on any TFDS text dataset.

Evaluation: validation loss in nats per token (`eval/loss`; per byte with the byte tokenizer), perplexity, and
`eval/nats_per_byte` (the same sum of nats over the UTF-8 bytes the predicted tokens stand for: comparable across
tokenizers) over the whole validation split, plus samples from a prompt, written to
`workdir/samples/step_<N>.txt` and printed.
"""

import math
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from foundation import checkpoint, files, losses, optim, sharding
from foundation.data import text
from foundation.data.tokenizers import get_tokenizer
from foundation.evaluate.generate import check_sampling, generate, text_until_eos
from foundation.models import gguf
from foundation.models.transformer import Transformer, TransformerConfig, forward_flops_per_token
from foundation.tasks import EvalContext, Task


def tokenizer_for(name: str):
  """'byte', a tokenizer.json path, or 'gguf:NAME' (the tokenizer of a GGUF file or known name, e.g.
  'gguf:smollm2-135m-instruct', for training on with that model's weights through config.init_from)."""
  return gguf.gguf_header(name[len('gguf:'):])[1] if name.startswith('gguf:') else get_tokenizer(name)


def import_gguf(model_cfg: TransformerConfig):
  """Task.import_params for GGUF files: the file's architecture must be this config's, field by field."""
  def import_params(source, sources, abstract):
    path = gguf.resolve_gguf(source)
    cfg, _ = gguf.gguf_header(path)
    # max_len only sizes the KV cache: no parameter depends on it.
    differing = {k: v for k, v in cfg.items() if k != 'max_len' and getattr(model_cfg, k) != v}
    if differing:
      raise ValueError(f'{source} holds another architecture than config.model; set '
                       + ' '.join(f'--config.model.{k}={v}' for k, v in sorted(differing.items())))
    return sources.load_file('init_from', path, lambda p: gguf.load_gguf(p, scan_layers=model_cfg.scan_layers)[1],
                             abstract)
  return import_params


# The tasks whose runs hold a decoder under params (config.model, config.data.tokenizer).
LM_TASKS = ('lm', 'lm_distill')
# What every evaluation gives, from data.eval_split: nats per token, its exponential, nats per byte of text.
EVAL_METRICS = ('eval/loss', 'eval/perplexity', 'eval/nats_per_byte')


def saved_lm(workdir: str) -> tuple[dict, TransformerConfig]:
  """(config.json, decoder config) of a language-model run."""
  saved = checkpoint.run_config(workdir, LM_TASKS, 'a language-model run (configs/lm/shakespeare.py, ...)')
  return saved, TransformerConfig.from_dict(saved['model'])


def restore_run(workdir: str, step: int | None = None) -> tuple[dict, TransformerConfig, dict, int]:
  """(config.json, decoder config, params, step) of a language-model run's checkpoint `step`; by default the step
  the run selected by early stopping, else its newest."""
  config, model_cfg = saved_lm(workdir)
  abstract = jax.eval_shape(
      lambda: nn.unbox(Transformer(model_cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params']))
  params, step = checkpoint.restore_params(workdir, 'params', abstract,
                                           step=step if step is not None else checkpoint.selected_step(workdir))
  return config, model_cfg, params, step


def build(config) -> Task:
  data = config.data
  tokenizer = tokenizer_for(data.tokenizer)
  model_cfg = TransformerConfig.from_dict(config.model)
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(f'config.model.vocab_size={model_cfg.vocab_size} is smaller than the {data.tokenizer!r} '
                     f'tokenizer\'s {tokenizer.vocab_size} ids; raise it.')
  if data.seq_len > model_cfg.max_len:
    raise ValueError(f'config.data.seq_len={data.seq_len} exceeds config.model.max_len={model_cfg.max_len}.')
  prompt = tokenizer.encode(config.sample.prompt)
  if config.sample.num_samples:  # checked here, not at the first evaluation after eval_every steps
    if not len(prompt) or config.sample.max_new_tokens < 1:
      raise ValueError(f'config.sample.num_samples={config.sample.num_samples} needs a non-empty config.sample.prompt '
                       f'and config.sample.max_new_tokens >= 1 (it is {config.sample.max_new_tokens}); or set '
                       'num_samples=0.')
    check_sampling(config.sample.temperature, config.sample.top_k, config.sample.top_p, model_cfg.vocab_size,
                   prefix='config.sample.', greedy_option='')
  # The model never sees a position past seq_len in training, and rotary attention does not extrapolate: samples
  # that run past it turn to noise, so they are held to the trained context.
  if config.sample.num_samples and len(prompt) + config.sample.max_new_tokens > data.seq_len:
    raise ValueError(f'the sample prompt ({len(prompt)} tokens) plus config.sample.max_new_tokens='
                     f'{config.sample.max_new_tokens} exceeds the trained context config.data.seq_len={data.seq_len}; '
                     f'lower max_new_tokens to {data.seq_len - len(prompt)} or less.')
  text.check_prepared(data.name, data.data_dir, [data.train_split, data.eval_split])
  # Validation loss chooses steps (early stopping): it must not read what the model trains on.
  text.check_disjoint(data.name, data.data_dir, {'config.data.train_split': data.train_split,
                                                 'config.data.eval_split': data.eval_split})
  model = Transformer(model_cfg)
  source = dict(name=data.name, data_dir=data.data_dir, text_key=data.text_key, tokenizer=tokenizer,
                seq_len=data.seq_len)

  def init(rng):
    return model.init(rng, jnp.zeros((1, data.seq_len), jnp.int32))['params']

  def loss(params, frozen, batch, rng):
    del frozen, rng  # no dropout in this model
    logits = model.apply({'params': params}, batch['inputs'])
    total, count = losses.next_token_xent(logits, batch['targets'], batch['weights'])
    return total / jnp.maximum(count, 1.0), {'weight': count}

  def train_batches(process_index, process_count):
    return text.train_batches(**source, split=data.train_split, global_batch=config.global_batch_size,
                              num_shards=data.num_shards, seed=config.seed, process_index=process_index,
                              process_count=process_count)

  byte_lengths = jnp.asarray(tokenizer.byte_lengths(), jnp.float32)

  @jax.jit
  def eval_sums(params, batch):
    logits = model.apply({'params': params}, batch['inputs'])
    nats, tokens = losses.next_token_xent(logits, batch['targets'], batch['weights'])
    return nats, tokens, jnp.sum(batch['weights'] * byte_lengths[batch['targets']])

  eval_cache = {}

  def evaluate(params, frozen, step, ctx: EvalContext):
    if 'batches' not in eval_cache:  # read once per run, on first use
      eval_cache['batches'] = text.eval_batches(
          **source, split=data.eval_split, global_batch=config.eval.batch_size, max_batches=config.eval.max_batches or None,
          process_index=jax.process_index(), process_count=jax.process_count())
    total = count = num_bytes = 0.0
    for batch in eval_cache['batches']:
      sums = eval_sums(params, sharding.global_batch(batch, ctx.mesh))
      total, count, num_bytes = (a + float(b) for a, b in zip((total, count, num_bytes), sums))
    mean = total / count  # past ~709.8 nats per token (a diverged run) the perplexity is inf, not an OverflowError
    perplexity = math.inf if mean > math.log(sys.float_info.max) else math.exp(mean)  # (a NaN loss stays NaN)
    results = dict(zip(EVAL_METRICS, (mean, perplexity, total / num_bytes)))
    if config.sample.num_samples:
      _write_samples(model, params, tokenizer, prompt, config, step, ctx)
    return results

  def flops_per_example():  # forward and backward (x3) where every weight trains: flops_per_token
    blocks, vocab = forward_flops_per_token(model_cfg, data.seq_len)
    block_passes, vocab_passes = (passes_under_freeze(config.optim, init, model_cfg.num_layers,
                                                      tied=model_cfg.tie_embeddings)
                                  if config.optim.freeze else (3, 3))
    return (block_passes * blocks + vocab_passes * vocab) * data.seq_len

  return Task(init=init, loss=loss, train_batches=train_batches, evaluate=evaluate,
              selection_metrics=() if text.reads_test(data.eval_split) else EVAL_METRICS,
              import_params=import_gguf(model_cfg), flops_per_example=flops_per_example,
              tokens_per_example=data.seq_len)


def passes_under_freeze(optim_cfg, init, num_layers: int, prefix: str = '', tied: bool = True) -> tuple[float, int]:
  """Passes of a training step over a decoder's blocks (their mean) and over its projection to the vocabulary when
  config.optim.freeze holds some of the params that `init` makes (the decoder's under `prefix`). Frozen weights get
  no gradient work (train.make_train_step): every block runs forward, the blocks from the lowest trained one up the
  backward pass too, the ones below it their input's gradient when the input embedding trains. The projection runs
  its input's gradient when anything below it trains, and its weight's when that (the embedding if `tied`, else
  lm_head) trains. Scanned blocks train all together."""
  params = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
  trained = [name for name, frozen in zip(jax.tree.leaves(optim.param_names(params)),
                                          jax.tree.leaves(optim.frozen_mask(optim_cfg, params))) if not frozen]
  trains = lambda *starts: any(name.startswith(tuple(prefix + s for s in starts)) for name in trained)
  head = 'embedding' if tied else 'lm_head'
  vocab_passes = 1 + any(not name.startswith(prefix + 'lm_head') for name in trained) + trains(head)
  if trains('layers/'):
    return 3.0, vocab_passes
  lowest = next((i for i in range(num_layers) if trains(f'layers_{i}/')), num_layers)
  # From the lowest trained block up, XLA's count of the lowered step shows the full backward pass; below it, the
  # input's gradient alone when the embedding trains.
  below = 2 if trains('embedding') else 1
  return (lowest * below + 3 * (num_layers - lowest)) / num_layers, vocab_passes


def _write_samples(model, params, tokenizer, prompt, config, step: int, ctx: EvalContext) -> None:
  sample = config.sample
  prompts = jnp.asarray(np.tile(prompt[None], (sample.num_samples, 1)), jnp.int32)
  # A handful of sample rows does not divide the data axes, so sampling runs without activation constraints.
  with nn.logical_axis_rules(()):
    tokens = generate(model, params, prompts, max_new_tokens=sample.max_new_tokens,
                      rng=jax.random.fold_in(jax.random.key(config.seed + 1), step), temperature=sample.temperature,
                      top_k=sample.top_k, top_p=sample.top_p)
  if not ctx.is_writer:
    return
  texts = [config.sample.prompt + text_until_eos(np.asarray(row), tokenizer) for row in jax.device_get(tokens)]
  files.makedirs(os.path.join(ctx.workdir, 'samples'))
  files.write_atomically(os.path.join(ctx.workdir, 'samples', f'step_{step:06d}.txt'),
                         '\n\n=====\n\n'.join(texts) + '\n')
  print(f'\n--- sample at step {step} ---\n{texts[0]}\n---', flush=True)
