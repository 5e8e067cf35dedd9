r"""Training throughput of the issue's "baby" LM, foundation against PyTorch, side by side on this machine.

  python benchmarks/lm_throughput.py --data_dir=$TFDS_DATA_DIR [--torch_python=/path/to/venv/bin/python] \
      [--steps=300] [--rounds=3] [--json=results.json]

Rows, run one after another (never two at once), each in its own process:
  foundation, N devices       `python -m foundation.main --config=configs/lm/shakespeare.py:baby` with
                              XLA_FLAGS="--xla_force_host_platform_device_count=N": one CPU device per core, data
                              parallel (what launch/local.sh does on CPU).
  foundation, glibc malloc    the same with FOUNDATION_DEFAULT_MALLOC=1: glibc's default allocator settings, i.e.
                              without foundation/host.py's tuning, to show what that buys.
  foundation, 1 device        one CPU device whose ops use XLA's intra-op threads over all cores.
  PyTorch Llama-style         a reference of the same size written below (RMSNorm, RoPE, SwiGLU, causal SDPA,
                              tied embeddings, AdamW), torch.set_num_threads(N).
  PyTorch nanoGPT-style       nanoGPT's GPT at the same width/depth (LayerNorm, GELU MLP 4x, learned positions).

The machine's speed drifts (shared cores), so the rows run in --rounds interleaved rounds (A B C A B C ...) and each
row's tokens/s is the median of all its timed intervals over the rounds. A foundation interval's tokens/s is
`perf/tokens_per_sec` from the run's metrics.jsonl (the first interval holds compilation and is not timed). A
PyTorch row is timed the same way: warm-up steps, then intervals of --log_every steps. The PyTorch rows run only if
`import torch` works in --torch_python (default: this interpreter); torch is not a dependency of the project.
"""

import argparse
import atexit
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the config files import `foundation`
from foundation import host  # noqa: E402  (jax-free: the PyTorch worker imports this file too)
CONFIG = 'configs/lm/shakespeare.py'
VARIANT = 'baby'
ROWS = ('foundation_1dev', 'foundation_dp', 'foundation_f32', 'foundation_glibc_malloc', 'torch_llama',
        'torch_llama_bf16', 'torch_gpt')
TARGET_ROWS = 'foundation_1dev,torch_llama'  # the default rows of --to_target


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference (runs in a subprocess: `--torch_worker`). Nothing above this section imports torch.
# ----------------------------------------------------------------------------------------------------------------

def torch_benchmark(model_name: str, *, vocab_size: int, num_layers: int, embed_dim: int, num_heads: int,
                    mlp_dim: int, seq_len: int, batch_size: int, steps: int, warmup_steps: int, log_every: int,
                    threads: int, lr: float, weight_decay: float, seed: int = 0, autocast: bool = False,
                    data: str | None = None, target: float | None = None, eval_every: int = 0) -> dict:
  """Trains `model_name` ('llama' or 'gpt'); returns tokens/s (median over intervals).

  autocast: matmuls in bfloat16 under torch.autocast (float32 master weights and optimizer), as the mixed-precision
  rows of foundation. data: an .npz from `write_target_data` (foundation's own training batches, learning rates,
  validation batches): the time-to-target mode, which trains on exactly those batches at those learning rates and
  evaluates every `eval_every` steps, until validation nats/byte <= `target` or the batches run out. Otherwise
  random byte windows at the constant `lr`.
  """
  import torch
  import torch.nn as nn
  import torch.nn.functional as F

  started = time.perf_counter()
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  head_dim = embed_dim // num_heads

  def rms_norm():
    if hasattr(nn, 'RMSNorm'):
      return nn.RMSNorm(embed_dim, eps=1e-5)
    raise RuntimeError('torch.nn.RMSNorm needs torch >= 2.4')

  class LlamaBlock(nn.Module):
    def __init__(self):
      super().__init__()
      self.attention_norm, self.mlp_norm = rms_norm(), rms_norm()
      self.wq = nn.Linear(embed_dim, embed_dim, bias=False)
      self.wk = nn.Linear(embed_dim, embed_dim, bias=False)
      self.wv = nn.Linear(embed_dim, embed_dim, bias=False)
      self.wo = nn.Linear(embed_dim, embed_dim, bias=False)
      self.gate = nn.Linear(embed_dim, mlp_dim, bias=False)
      self.up = nn.Linear(embed_dim, mlp_dim, bias=False)
      self.down = nn.Linear(mlp_dim, embed_dim, bias=False)

    def forward(self, x, cos, sin):
      b, t, _ = x.shape
      h = self.attention_norm(x)
      q, k, v = (w(h).view(b, t, num_heads, head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
      q, k = rope(q, cos, sin), rope(k, cos, sin)
      a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.wo(a.transpose(1, 2).reshape(b, t, embed_dim))
      h = self.mlp_norm(x)
      return x + self.down(F.silu(self.gate(h)) * self.up(h))

  def rope(x, cos, sin):  # rotate-half layout, as foundation/models/transformer.py
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

  class Llama(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(vocab_size, embed_dim)
      self.layers = nn.ModuleList(LlamaBlock() for _ in range(num_layers))
      self.norm = rms_norm()
      self.head = nn.Linear(embed_dim, vocab_size, bias=False)
      self.head.weight = self.embed.weight  # tied
      inv_freq = 10000.0 ** (-torch.arange(head_dim // 2, dtype=torch.float32) / (head_dim // 2))
      angle = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv_freq
      self.register_buffer('cos', angle.cos(), persistent=False)
      self.register_buffer('sin', angle.sin(), persistent=False)

    def forward(self, idx):
      t = idx.shape[1]
      x = self.embed(idx)
      for layer in self.layers:
        x = layer(x, self.cos[:t], self.sin[:t])
      return self.head(self.norm(x))

  class GPTBlock(nn.Module):  # nanoGPT's Block with bias=False, dropout=0
    def __init__(self):
      super().__init__()
      self.ln_1, self.ln_2 = nn.LayerNorm(embed_dim, bias=False), nn.LayerNorm(embed_dim, bias=False)
      self.c_attn = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
      self.c_proj = nn.Linear(embed_dim, embed_dim, bias=False)
      self.c_fc = nn.Linear(embed_dim, 4 * embed_dim, bias=False)
      self.mlp_proj = nn.Linear(4 * embed_dim, embed_dim, bias=False)

    def forward(self, x):
      b, t, _ = x.shape
      q, k, v = self.c_attn(self.ln_1(x)).split(embed_dim, dim=2)
      q, k, v = (z.view(b, t, num_heads, head_dim).transpose(1, 2) for z in (q, k, v))
      a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.c_proj(a.transpose(1, 2).reshape(b, t, embed_dim))
      return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte = nn.Embedding(vocab_size, embed_dim)
      self.wpe = nn.Embedding(seq_len, embed_dim)
      self.h = nn.ModuleList(GPTBlock() for _ in range(num_layers))
      self.ln_f = nn.LayerNorm(embed_dim, bias=False)
      self.lm_head = nn.Linear(embed_dim, vocab_size, bias=False)
      self.lm_head.weight = self.wte.weight  # tied

    def forward(self, idx):
      pos = torch.arange(idx.shape[1], device=idx.device)
      x = self.wte(idx) + self.wpe(pos)
      for block in self.h:
        x = block(x)
      return self.lm_head(self.ln_f(x))

  model = {'llama': Llama, 'gpt': GPT}[model_name]()
  for name, p in model.named_parameters():  # GPT-2 style init, as foundation
    if p.dim() >= 2:
      std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(('wo.weight', 'down.weight', 'proj.weight')) else 0.02
      nn.init.normal_(p, std=std)
  n_params = sum(p.numel() for p in model.parameters())
  # Weight decay on matrices only (nanoGPT); the Llama row also spares the embedding, as foundation's config does.
  decay = [p for n, p in model.named_parameters()
           if p.dim() >= 2 and not (model_name == 'llama' and n.startswith('embed'))]
  no_decay = [p for p in model.parameters() if all(p is not q for q in decay)]
  optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                                 {'params': no_decay, 'weight_decay': 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)

  rng = np.random.default_rng(seed)
  corpus = torch.from_numpy(rng.integers(0, 256, size=1 << 20, dtype=np.int64))

  def get_batch():  # random windows of a byte buffer, as nanoGPT's get_batch
    starts = torch.randint(len(corpus) - seq_len - 1, (batch_size,))
    x = torch.stack([corpus[i:i + seq_len] for i in starts])
    y = torch.stack([corpus[i + 1:i + 1 + seq_len] for i in starts])
    return x, y

  def logits_of(x):
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
      return model(x).float()

  def step(x=None, y=None):
    if x is None:
      x, y = get_batch()
    loss = F.cross_entropy(logits_of(x).view(-1, vocab_size), y.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()  # a sync point, as foundation's metrics fetch

  model.train()
  if data is not None:
    return train_to_target(np.load(data), step, logits_of, optimizer, target, eval_every, started=started)
  for _ in range(warmup_steps):
    loss = step()
  intervals = []
  for _ in range(steps // log_every):
    start = time.perf_counter()
    for _ in range(log_every):
      loss = step()
    intervals.append(batch_size * seq_len * log_every / (time.perf_counter() - start))
  return {'tokens_per_sec': statistics.median(intervals), 'intervals_tokens_per_sec': intervals,
          'final_loss': loss, 'num_params': n_params, 'torch_version': torch.__version__,
          'torch_threads': torch.get_num_threads()}


def train_to_target(arrays, step, logits_of, optimizer, target: float, eval_every: int, *, started: float) -> dict:
  """The time-to-target loop of the PyTorch rows: foundation's batches and learning rates, step by step."""
  import torch
  import torch.nn.functional as F

  inputs, targets, lrs = (torch.from_numpy(arrays[k]).long() if k != 'lrs' else arrays[k]
                          for k in ('inputs', 'targets', 'lrs'))
  evals = [(torch.from_numpy(x).long(), torch.from_numpy(y).long(), torch.from_numpy(w).float(),
            torch.from_numpy(b).float()) for x, y, w, b in zip(arrays['eval_inputs'], arrays['eval_targets'],
                                                                arrays['eval_weights'], arrays['eval_bytes'])]
  paused, curve = 0.0, []
  for i in range(len(inputs)):
    for group in optimizer.param_groups:
      group['lr'] = float(lrs[i])  # optax applies schedule(i) at update i
    step(inputs[i], targets[i])
    if (i + 1) % eval_every and i + 1 < len(inputs):
      continue
    began = time.perf_counter()
    with torch.no_grad():
      nats = num_bytes = 0.0
      for x, y, w, b in evals:
        xent = F.cross_entropy(logits_of(x).flatten(0, 1), y.flatten(), reduction='none')
        nats += float((xent * w.flatten()).sum())
        num_bytes += float((w * b).sum())
    train_s = began - started - paused
    paused += time.perf_counter() - began
    curve.append({'step': i + 1, 'nats_per_byte': nats / num_bytes, 'train_s': train_s})
    if nats / num_bytes <= target:
      break
  return {'curve': curve, 'torch_version': torch.__version__, 'torch_threads': torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------

def nproc() -> int:
  try:
    return len(os.sched_getaffinity(0))  # what `nproc` prints, and what launch/local.sh uses
  except AttributeError:
    return os.cpu_count() or 1


def load_config(path: str, variant: str | None = None):
  """The config file `path` (relative to the repo) with `variant`: the PyTorch rows follow it if it changes."""
  spec = importlib.util.spec_from_file_location('benchmarked_config', os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def add_runner_arguments(parser: argparse.ArgumentParser) -> None:
  """The interpreters, the JSON output and the hidden PyTorch worker entry, shared by the benchmarks here."""
  parser.add_argument('--python', default=sys.executable, help='interpreter with the project\'s packages')
  parser.add_argument('--torch_python', default=sys.executable, help='interpreter with torch')
  parser.add_argument('--json', default=None, help='also write the results here')
  parser.add_argument('--torch_worker', default=None, help=argparse.SUPPRESS)


def foundation_records(python: str, label: str, overrides: list, *, xla_flags: str | None = None,
                       glibc_malloc: bool = False, cache_dir: str | None = None) -> list[dict]:
  """Runs `python -m foundation.main` in a fresh workdir on the CPU; returns its metrics.jsonl records. Without
  `cache_dir` the run compiles everything (no persistent compilation cache); with it, it reads and fills that one."""
  workdir = tempfile.mkdtemp(prefix='foundation_benchmark_')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  if cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  else:
    env['FOUNDATION_COMPILATION_CACHE'] = '0'
  env.pop('FOUNDATION_DEFAULT_MALLOC', None)
  if xla_flags:
    env['XLA_FLAGS'] = xla_flags
  if glibc_malloc:
    env['FOUNDATION_DEFAULT_MALLOC'] = '1'
  cmd = [python, '-m', 'foundation.main', f'--workdir={workdir}', *overrides]
  print(f'[{label}] XLA_FLAGS={xla_flags or "(unset)"}: {" ".join(cmd)}', file=sys.stderr, flush=True)
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
      raise RuntimeError(f'{label} failed (exit {proc.returncode}); last output:\n{proc.stdout[-3000:]}')
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return [json.loads(line) for line in f if line.strip()]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def run_foundation(args, *, label: str, xla_flags: str | None, steps: int, log_every: int,
                   glibc_malloc: bool = False, extra: tuple = ()) -> dict:
  big = log_every * 10**6  # no evaluation or checkpoint inside the timed steps (the last step does both, untimed)
  if args.to_target is None:
    schedule = [f'--config.num_train_steps={steps + log_every}', f'--config.log_every={log_every}',
                f'--config.eval_every={big}', '--config.eval.max_batches=1']
  else:  # the config's own schedule, evaluated as the PyTorch rows are
    schedule = [f'--config.log_every={args.eval_every}', f'--config.eval_every={args.eval_every}',
                f'--config.eval.max_batches={args.eval_batches}']
  start = time.perf_counter()
  records = foundation_records(args.python, label, [
      f'--config={CONFIG}:{VARIANT}', f'--config.data.data_dir={args.data_dir}', *schedule,
      f'--config.checkpoint_every={big}', '--config.sample.num_samples=0', *extra],
      xla_flags=xla_flags, glibc_malloc=glibc_malloc, cache_dir=args.cache_dir)
  if args.to_target is not None:
    curve = [{'step': r['step'], 'nats_per_byte': r['eval/nats_per_byte'], 'train_s': r['perf/train_s']}
             for r in records if 'eval/nats_per_byte' in r and r['step'] > 0]
    return {'curve': curve, 'wall_s': time.perf_counter() - start, 'xla_flags': xla_flags}
  intervals = [r['perf/tokens_per_sec'] for r in records if 'perf/tokens_per_sec' in r]
  if not intervals:
    raise RuntimeError(f'{label}: no perf/tokens_per_sec in metrics.jsonl ({len(records)} records)')
  mfu = [r['perf/mfu'] for r in records if 'perf/mfu' in r]
  losses = [r['train/loss'] for r in records if 'train/loss' in r]
  return {'tokens_per_sec': statistics.median(intervals), 'intervals_tokens_per_sec': intervals,
          'mfu': statistics.median(mfu) if mfu else None, 'final_loss': losses[-1] if losses else None,
          'wall_s': time.perf_counter() - start, 'xla_flags': xla_flags}


def torch_available(python: str) -> str | None:
  """torch's version in `python`, or None."""
  try:
    out = subprocess.run([python, '-c', 'import torch; print(torch.__version__)'], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, timeout=300)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def write_target_data(args, cfg, path: str) -> None:
  """The time-to-target mode's data, for the PyTorch rows: the batches foundation's loop trains the config on, in
  order, the learning rate of every step, and the first --eval_batches validation batches with each target's bytes."""
  from foundation import optim  # pylint: disable=import-outside-toplevel
  from foundation.data import text  # pylint: disable=import-outside-toplevel
  from foundation.tasks import lm  # pylint: disable=import-outside-toplevel

  tokenizer = lm.tokenizer_for(cfg.data.tokenizer)
  source = dict(name=cfg.data.name, data_dir=args.data_dir, text_key=cfg.data.text_key, tokenizer=tokenizer,
                seq_len=cfg.data.seq_len)
  train = text.train_batches(**source, split=cfg.data.train_split, global_batch=cfg.global_batch_size,
                             num_shards=cfg.data.num_shards, seed=cfg.seed)
  batches = [train[i] for i in range(cfg.num_train_steps)]
  if any(float(b['weights'].min()) < 1 for b in batches):
    raise RuntimeError('training windows with padding: the PyTorch rows take every target as real.')
  evals = text.eval_batches(**source, split=cfg.data.eval_split, global_batch=cfg.eval.batch_size,
                            max_batches=args.eval_batches)
  schedule = optim.learning_rate_schedule(cfg.optim, cfg.num_train_steps)
  byte_lengths = np.asarray(tokenizer.byte_lengths(), np.float32)
  np.savez(path, inputs=np.stack([b['inputs'] for b in batches]),
           targets=np.stack([b['targets'] for b in batches]),
           lrs=np.asarray([float(schedule(i)) for i in range(cfg.num_train_steps)], np.float64),
           eval_inputs=np.stack([b['inputs'] for b in evals]), eval_targets=np.stack([b['targets'] for b in evals]),
           eval_weights=np.stack([b['weights'] for b in evals]),
           eval_bytes=np.stack([byte_lengths[b['targets']] for b in evals]))


def run_torch(args, *, label: str, model: str, cfg, threads: int, steps: int, log_every: int,
              autocast: bool = False) -> dict:
  m = cfg.model
  worker = dict(model_name=model, vocab_size=m.vocab_size, num_layers=m.num_layers, embed_dim=m.embed_dim,
                num_heads=m.num_heads, mlp_dim=m.mlp_dim, seq_len=cfg.data.seq_len,
                batch_size=cfg.global_batch_size, steps=steps, warmup_steps=args.torch_warmup_steps,
                log_every=log_every, threads=threads, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                autocast=autocast)
  if args.to_target is not None:
    worker.update(data=args.target_data, target=args.to_target, eval_every=args.eval_every)
  cmd = [args.torch_python, os.path.abspath(__file__), '--torch_worker', json.dumps(worker)]
  print(f'[{label}] {args.torch_python} ... --torch_worker (threads={threads})', file=sys.stderr, flush=True)
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if proc.returncode:
    raise RuntimeError(f'{label} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result['wall_s'] = time.perf_counter() - start
  return result


def throughput_table(rows, specs, runs, width, rounds, intervals_per_run, log_every) -> list[dict]:
  results = []
  for key in rows:
    intervals = [x for run in runs[key] for x in run['intervals_tokens_per_sec']]
    mfu = [run['mfu'] for run in runs[key] if run.get('mfu') is not None]
    results.append({'row': key, 'implementation': specs[key], 'tokens_per_sec': statistics.median(intervals),
                    'intervals_tokens_per_sec': intervals, 'mfu': statistics.median(mfu) if mfu else None,
                    'runs': runs[key]})
  torch_best = max((r['tokens_per_sec'] for r in results if r['row'].startswith('torch')), default=None)
  for r in results:
    r['ratio_to_fastest_torch'] = r['tokens_per_sec'] / torch_best if torch_best else None
  print(f'Training throughput: median over {rounds} rounds x {intervals_per_run} intervals of {log_every} steps')
  # The interval range is there to spot noise: on a busy machine it is wide (and PyTorch's OpenMP threads slow
  # down far more than XLA's when a core is taken), and the ratios mean little.
  print(f'| {"implementation":<{width}} | {"tokens/s":>9} | ratio to fastest PyTorch | {"intervals min-max":>17} |')
  print(f'|{"-" * (width + 2)}|{"-" * 10}:|{"-" * 25}:|{"-" * 18}:|')
  for r in results:
    ratio = f'{r["ratio_to_fastest_torch"]:.2f}x' if r['ratio_to_fastest_torch'] else 'n/a'
    spread = f'{min(r["intervals_tokens_per_sec"]):,.0f}-{max(r["intervals_tokens_per_sec"]):,.0f}'
    print(f'| {r["implementation"]:<{width}} | {r["tokens_per_sec"]:>9,.0f} | {ratio:>24} | {spread:>17} |')
  return results


def first_at_target(curve: list[dict], target: float) -> dict:
  """The first evaluation at or below `target` ({'step', 'nats_per_byte', 'train_s'}); {} if none reached it."""
  return next((point for point in curve if point['nats_per_byte'] <= target), {})


def target_table(rows, specs, runs, width, target, eval_every, eval_batches, cfg) -> list[dict]:
  results = []
  for key in rows:
    reached_at = [first_at_target(run['curve'], target) for run in runs[key]]
    times = [point.get('train_s') for point in reached_at]
    steps = [point.get('step') for point in reached_at]
    reached = [t for t in times if t is not None]
    results.append({'row': key, 'implementation': specs[key], 'seconds_to_target': statistics.median(reached)
                    if len(reached) == len(times) else None, 'runs': runs[key], 'steps_to_target': steps,
                    'best_nats_per_byte': min(p['nats_per_byte'] for run in runs[key] for p in run['curve'])})
  reference = next((r['seconds_to_target'] for r in results if r['row'] == 'torch_llama'), None)
  for r in results:
    r['ratio_to_torch_llama'] = r['seconds_to_target'] / reference if reference and r['seconds_to_target'] else None
  print(f'Time to validation {target} nats/byte: the batches and learning rates of {cfg.num_train_steps} steps of '
        f'the config, evaluated every {eval_every} steps on {eval_batches} x {cfg.eval.batch_size} validation '
        'windows; seconds of training (set-up and compilation included, evaluation left out), median over rounds')
  print(f'| {"implementation":<{width}} | steps to target | seconds to target | ratio to PyTorch Llama | best seen |')
  print(f'|{"-" * (width + 2)}|{"-" * 16}:|{"-" * 18}:|{"-" * 23}:|{"-" * 10}:|')
  for r in results:
    seconds = f'{r["seconds_to_target"]:.1f}' if r['seconds_to_target'] else 'not reached'
    ratio = f'{r["ratio_to_torch_llama"]:.2f}x' if r['ratio_to_torch_llama'] else 'n/a'
    steps = '/'.join(str(s) if s else '-' for s in r['steps_to_target'])
    print(f'| {r["implementation"]:<{width}} | {steps:>15} | {seconds:>17} | {ratio:>22} | '
          f'{r["best_nats_per_byte"]:>9.3f} |')
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR',
                                                           os.path.expanduser('~/tensorflow_datasets')),
                      help='TFDS data dir holding shakespeare_plays (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)')
  parser.add_argument('--steps', type=int, default=300, help='timed training steps per row and round')
  parser.add_argument('--rounds', type=int, default=3, help='interleaved rounds over the rows')
  parser.add_argument('--log_every', type=int, default=None,
                      help='steps per timed interval (default: min(50, steps // 3)); tokens/s is the median interval')
  parser.add_argument('--torch_warmup_steps', type=int, default=None,
                      help='untimed PyTorch steps first (default: one interval, as foundation\'s compile interval)')
  add_runner_arguments(parser)
  parser.add_argument('--rows', default=None, help=f'comma-separated subset of {",".join(ROWS)} (default: all; '
                      f'{TARGET_ROWS} with --to_target)')
  parser.add_argument('--to_target', type=float, default=None,
                      help='time-to-target mode: wall time of training until validation nats/byte <= this, on the '
                           'same batches at the same learning rates (the config\'s own schedule) for every row')
  parser.add_argument('--eval_every', type=int, default=100, help='--to_target: steps between evaluations')
  parser.add_argument('--eval_batches', type=int, default=32,
                      help='--to_target: validation batches (of the config\'s eval batch size) per evaluation')
  parser.add_argument('--compilation_cache', choices=('cold', 'warm'), default='cold',
                      help='cold: every foundation run compiles its programs; warm: the runs share one persistent '
                           'cache, new for this invocation (the first round compiles, the later ones load)')
  args = parser.parse_args()
  args.cache_dir = tempfile.mkdtemp(prefix='foundation_benchmark_cache_') if args.compilation_cache == 'warm' else None
  if args.cache_dir:
    atexit.register(shutil.rmtree, args.cache_dir, True)

  if args.torch_worker is not None:
    print(json.dumps(torch_benchmark(**json.loads(args.torch_worker))))
    return

  rows = [r.strip() for r in (args.rows or (TARGET_ROWS if args.to_target is not None else ','.join(ROWS))).split(
      ',') if r.strip()]
  if set(rows) - set(ROWS):
    parser.error(f'unknown rows {sorted(set(rows) - set(ROWS))}; choose from {",".join(ROWS)}')
  log_every = args.log_every or max(1, min(50, args.steps // 3))
  steps = math.ceil(args.steps / log_every) * log_every
  if args.torch_warmup_steps is None:
    args.torch_warmup_steps = log_every
  n = nproc()
  cfg = load_config(CONFIG, VARIANT)
  m = cfg.model
  machine = {'nproc': n, 'cpu_model': host.cpu_description(), 'date': datetime.datetime.now().astimezone().isoformat(
      timespec='seconds'), 'loadavg_at_start': os.getloadavg()[0], 'python': platform.python_version()}
  setup = {'config': f'{CONFIG}:{VARIANT}', 'num_layers': m.num_layers, 'num_heads': m.num_heads,
           'embed_dim': m.embed_dim, 'mlp_dim': m.mlp_dim, 'vocab_size': m.vocab_size,
           'seq_len': cfg.data.seq_len, 'batch_size': cfg.global_batch_size, 'timed_steps': steps,
           'log_every': log_every, 'rounds': args.rounds}
  if machine['loadavg_at_start'] > 0.5 * n:
    print(f'warning: load average {machine["loadavg_at_start"]:.2f} on {n} cores; the machine is not quiet, '
          'numbers will be low and noisy.', file=sys.stderr)

  torch_version = None
  if any(r.startswith('torch') for r in rows):
    torch_version = torch_available(args.torch_python)
    if torch_version is None:
      print(f'note: `import torch` fails in {args.torch_python}; skipping the PyTorch rows '
            '(pass --torch_python=/path/to/python-with-torch).', file=sys.stderr)
      rows = [r for r in rows if not r.startswith('torch')]
  machine['torch'] = torch_version

  dp_flags = f'--xla_force_host_platform_device_count={n}'
  f32 = ('--config.model.matmul_dtype=float32',)
  if args.to_target is not None:
    args.target_data = os.path.join(tempfile.mkdtemp(prefix='lm_target_'), 'data.npz')
    write_target_data(args, cfg, args.target_data)

  def foundation_row(label, xla_flags, **kw):
    return lambda label=label: run_foundation(args, label=label, xla_flags=xla_flags, steps=steps,
                                              log_every=log_every, **kw)

  def torch_row(label, model, **kw):
    return lambda label=label: run_torch(args, label=label, model=model, cfg=cfg, threads=n, steps=steps,
                                         log_every=log_every, **kw)

  matmuls = f'{m.matmul_dtype} matmuls' if m.get('matmul_dtype') else 'f32'
  specs = {
      'foundation_1dev': f'foundation, 1 CPU device, {matmuls}',
      'foundation_dp': f'foundation, {n} devices, data parallel (launch/local.sh), {matmuls}',
      'foundation_f32': 'foundation, 1 CPU device, f32 matmuls',
      'foundation_glibc_malloc': f'foundation, 1 CPU device, {matmuls}, glibc malloc defaults',
      'torch_llama': f'PyTorch Llama-style, {n} threads, f32',
      'torch_llama_bf16': f'PyTorch Llama-style, {n} threads, bf16 autocast',
      'torch_gpt': f'PyTorch nanoGPT-style, {n} threads, f32',
  }
  runners = {
      'foundation_1dev': foundation_row(specs['foundation_1dev'], None),
      'foundation_dp': foundation_row(specs['foundation_dp'], dp_flags),
      'foundation_f32': foundation_row(specs['foundation_f32'], None, extra=f32),
      'foundation_glibc_malloc': foundation_row(specs['foundation_glibc_malloc'], None, glibc_malloc=True),
      'torch_llama': torch_row(specs['torch_llama'], 'llama'),
      'torch_llama_bf16': torch_row(specs['torch_llama_bf16'], 'llama', autocast=True),
      'torch_gpt': torch_row(specs['torch_gpt'], 'gpt'),
  }
  runs = {key: [] for key in rows}
  for round_ in range(args.rounds):
    for key in rows:  # sequential: never two runs at once
      runs[key].append(runners[key]())
      run = runs[key][-1]
      figure = (f'{run["tokens_per_sec"]:,.0f} tokens/s' if args.to_target is None else
                f'{first_at_target(run["curve"], args.to_target).get("train_s")} s to target')
      print(f'[{specs[key]}] round {round_ + 1}/{args.rounds}: {figure}', file=sys.stderr, flush=True)
  width = max(len('implementation'), *(len(specs[key]) for key in rows))
  print()
  print(f'{CONFIG}:{VARIANT} ({m.num_layers} layers, {m.num_heads} heads, width {m.embed_dim}, SwiGLU {m.mlp_dim}, '
        f'context {cfg.data.seq_len}, batch {cfg.global_batch_size}, vocab {m.vocab_size})')
  print(f'machine: {n} cores ({machine["cpu_model"]}), {machine["date"]}, load average at start '
        f'{machine["loadavg_at_start"]:.2f}, torch {torch_version or "not run"}')
  print()
  if args.to_target is None:
    results = throughput_table(rows, specs, runs, width, args.rounds, steps // log_every, log_every)
  else:
    results = target_table(rows, specs, runs, width, args.to_target, args.eval_every, args.eval_batches, cfg)

  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'machine': machine, 'setup': setup, 'to_target': args.to_target, 'results': results}, f, indent=1)
    print(f'\nwrote {args.json}')


if __name__ == '__main__':
  main()
