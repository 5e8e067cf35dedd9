"""Command line: python -m foundation.sample --workdir=DIR --prompt='ROMEO:' [--step=N] [--max_new_tokens=200]
    [--num_samples=1] [--temperature=0.8] [--top_k=0] [--top_p=1.0] [--greedy] [--seed=0]

Continues a prompt with a language-model run's params (by default the step the run selected by early stopping,
else its newest checkpoint) and prints each sample, the prompt first. The run's config.json says which model and
tokenizer. The prompt and its continuation must fit the context the model was trained on (config.data.seq_len):
rotary attention past it turns to noise.
"""

import argparse
import sys


def sample_workdir(workdir: str, prompt: str, *, step: int | None = None, max_new_tokens: int = 200,
                   num_samples: int = 1, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
                   greedy: bool = False, seed: int = 0) -> tuple[list[str], int]:
  """(the samples, prompt included; the checkpoint step they come from). Raises ValueError with one line for
  settings that cannot work, before the checkpoint is read."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np

  from foundation.evaluate.generate import check_sampling, generate, text_until_eos
  from foundation.models.transformer import Transformer
  from foundation.tasks.lm import restore_run, saved_lm, tokenizer_for

  if num_samples < 1 or max_new_tokens < 1:
    raise ValueError(f'--num_samples={num_samples} and --max_new_tokens={max_new_tokens} must be at least 1.')
  config, model_cfg = saved_lm(workdir)  # the prompt is checked against the run's config before its checkpoint is read
  check_sampling(temperature, top_k, top_p, model_cfg.vocab_size, greedy=greedy, prefix='--', greedy_option='--greedy')
  tokenizer = tokenizer_for(config['data']['tokenizer'])
  ids = np.asarray(tokenizer.encode(prompt), np.int32)
  context = min(config['data'].get('seq_len') or model_cfg.max_len, model_cfg.max_len)
  if not len(ids):
    raise ValueError('--prompt encodes to no tokens; give some text.')
  if len(ids) + max_new_tokens > context:
    raise ValueError(f'the prompt ({len(ids)} tokens) plus --max_new_tokens={max_new_tokens} exceeds the '
                     f'{context} tokens the model was trained on; lower --max_new_tokens to '
                     f'{max(context - len(ids), 0)} or shorten the prompt.')
  _, _, params, step = restore_run(workdir, step)
  # The KV cache holds exactly the prompt and the new tokens.
  model = Transformer(dataclasses.replace(model_cfg, max_len=len(ids) + max_new_tokens))
  rows = 1 if greedy else num_samples
  tokens = generate(model, jax.tree.map(jnp.asarray, params), jnp.asarray(np.tile(ids, (rows, 1))),
                    max_new_tokens=max_new_tokens, rng=jax.random.key(seed), temperature=temperature, top_k=top_k,
                    top_p=top_p, greedy=greedy)
  return [prompt + text_until_eos(np.asarray(row), tokenizer) for row in jax.device_get(tokens)], step


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m foundation.sample', description=__doc__.split('\n\n')[1])
  parser.add_argument('--workdir', required=True, help='workdir of a language-model run (config.json, checkpoints/)')
  parser.add_argument('--prompt', required=True, help='text to continue')
  parser.add_argument('--step', type=int, help='checkpoint step; default the selected step, else the newest')
  parser.add_argument('--max_new_tokens', type=int, default=200, help='tokens to generate after the prompt')
  parser.add_argument('--num_samples', type=int, default=1, help='independent samples of the same prompt')
  parser.add_argument('--temperature', type=float, default=0.8, help='softmax temperature (> 0)')
  parser.add_argument('--top_k', type=int, default=0, help='sample from the k likeliest tokens only; 0: all')
  parser.add_argument('--top_p', type=float, default=1.0,
                      help='sample from the smallest set of tokens holding this much probability; 1: all')
  parser.add_argument('--greedy', action='store_true', help='the likeliest token at every step (one sample)')
  parser.add_argument('--seed', type=int, default=0, help='sampling seed')
  args = parser.parse_args(argv)
  try:
    samples, step = sample_workdir(args.workdir, args.prompt, step=args.step, max_new_tokens=args.max_new_tokens,
                                   num_samples=args.num_samples, temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, greedy=args.greedy, seed=args.seed)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'# {args.workdir}, step {step}', flush=True)
  print('\n\n=====\n\n'.join(samples))
  return 0


if __name__ == '__main__':
  sys.exit(main())
