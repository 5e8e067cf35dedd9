r"""Byte-level Llama-style LM pretrained on Shakespeare's plays (TFDS `shakespeare_plays`, built offline).

Default (the README's main job, CPU-sized: about 9 minutes on a 2-core Zen 4 VM):
  python -m foundation.main --config=configs/lm/shakespeare.py --workdir=workdirs/shakespeare
Variants:
  :smoke  seconds, for tests            --config=configs/lm/shakespeare.py:smoke
  :baby   the size of the nanoGPT comparison in benchmarks/lm_throughput.py (4 layers, width 128, context 64, batch 12)
  :large  one GPU or a TPU VM host, or a slice (bf16, ~85 M params, context 1024; not run on CPU)
Variants combine with commas (:large,smoke). Any field can be overridden, e.g. --config.optim.lr=1e-3 --config.mesh.fsdp=2 --config.parallelism=pmap.
"""

import os

import ml_collections

from foundation import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_base.loop('lm', num_train_steps=4500, global_batch_size=16, eval_every=4500, prefetch_batches=8)
  c.data = dict(
      name='shakespeare_plays',
      data_dir=os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets')),
      train_split='train',
      eval_split='validation',
      text_key='text',
      tokenizer='byte',
      seq_len=128,
      num_shards=8,   # contiguous blocks of documents; each process reads only its own blocks
  )
  c.model = dict(
      vocab_size=320,  # 259 byte-tokenizer ids, padded
      # Sized for the 10-minute CPU budget: at equal tokens a width-192 model was no better early on and ran at
      # 0.55x the tokens/s, so the budget goes to tokens (README, Results).
      num_layers=4,
      embed_dim=128,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=384,
      max_len=512,
      rope_base=10000.0,
      tie_embeddings=True,
      dtype='float32',
      param_dtype='float32',
      matmul_dtype='bfloat16',  # bf16 operands, f32 accumulation: AVX-512 BF16 runs the step 1.2x faster
      scan_layers=False,
      remat='none',
  )
  # Linear decay to zero: below a cosine to 10% of the peak at 3,000 steps by 0.014 nats/byte (two seeds) on training
  # plays held out of training, where it was chosen, and by 0.023 on validation (docs/lm_pretraining.md).
  c.optim = config_base.optimizer(lr=6e-3, warmup_steps=100, schedule='linear', end_lr_fraction=0.0, b2=0.95,
                                  weight_decay=0.1, weight_decay_exclude=('norm', 'embed'), grad_clip=1.0)
  c.eval = dict(batch_size=64, max_batches=0)  # 0: the whole validation split
  c.sample = dict(prompt='ROMEO:\n', num_samples=2, max_new_tokens=120, temperature=0.8, top_k=0, top_p=0.95)
  return config_base.apply_variants(c, arg, VARIANTS, __file__)


def smoke(c):
  config_base.smoke_loop(c, steps=6, batch=8, checkpoint_every=4)
  c.data.seq_len = 32
  c.model.update(num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=64)
  c.eval.update(batch_size=8, max_batches=2)
  c.sample.update(num_samples=1, max_new_tokens=8)
  c.optim.update(lr=1e-2, warmup_steps=2)


def baby(c):
  c.global_batch_size = 12
  c.num_train_steps = 2000
  c.eval_every = 2000
  c.data.seq_len = 64
  c.data.num_shards = 4
  c.model.update(num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=4, mlp_dim=384, max_len=512)
  # The schedule of the benchmark's figures (benchmarks/README.md), which its PyTorch rows replay.
  c.optim.update(lr=1e-3, warmup_steps=100, schedule='cosine', end_lr_fraction=0.1)
  c.sample.max_new_tokens = 56


def large(c):
  c.global_batch_size = 64
  c.num_train_steps = 20000
  c.eval_every = 2000
  c.checkpoint_every = 1000
  c.data.seq_len = 1024
  c.model.update(num_layers=12, embed_dim=768, num_heads=12, num_kv_heads=4, mlp_dim=2048, max_len=1024,
                 dtype='bfloat16', scan_layers=True, remat='projections')  # 'dots' would keep 3 GiB of f32
  # attention scores per layer (64 x 12 x 1024 x 1024) for the backward pass; these are recomputed instead.
  c.optim.update(lr=6e-4, warmup_steps=1000)
  c.eval.update(batch_size=64, max_batches=20)
  c.sample.max_new_tokens = 500


VARIANTS = {'smoke': smoke, 'baby': baby, 'large': large}
