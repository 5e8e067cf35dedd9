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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/lm/shakespeare.py'
VARIANT = 'baby'
ROWS = ('foundation_dp', 'foundation_glibc_malloc', 'foundation_1dev', 'torch_llama', 'torch_gpt')


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference (runs in a subprocess: `--torch_worker`). Nothing above this section imports torch.
# ----------------------------------------------------------------------------------------------------------------

def torch_benchmark(model_name: str, *, vocab_size: int, num_layers: int, embed_dim: int, num_heads: int,
                    mlp_dim: int, seq_len: int, batch_size: int, steps: int, warmup_steps: int, log_every: int,
                    threads: int, lr: float, weight_decay: float, seed: int = 0) -> dict:
  """Trains `model_name` ('llama' or 'gpt') on random byte windows; returns tokens/s (median over intervals)."""
  import numpy as np
  import torch
  import torch.nn as nn
  import torch.nn.functional as F

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

  def step():
    x, y = get_batch()
    logits = model(x)
    loss = F.cross_entropy(logits.view(-1, vocab_size), y.view(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()  # a sync point, as foundation's metrics fetch

  model.train()
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


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------

def nproc() -> int:
  try:
    return len(os.sched_getaffinity(0))  # what `nproc` prints, and what launch/local.sh uses
  except AttributeError:
    return os.cpu_count() or 1


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def baby_config():
  """The sizes of configs/lm/shakespeare.py:baby, so the PyTorch rows follow the config if it changes."""
  spec = importlib.util.spec_from_file_location('shakespeare_config', os.path.join(REPO, CONFIG))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(VARIANT)


def run_foundation(args, *, label: str, xla_flags: str | None, steps: int, log_every: int,
                   glibc_malloc: bool = False) -> dict:
  workdir = tempfile.mkdtemp(prefix='lm_throughput_')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  env.pop('FOUNDATION_DEFAULT_MALLOC', None)
  if xla_flags:
    env['XLA_FLAGS'] = xla_flags
  if glibc_malloc:
    env['FOUNDATION_DEFAULT_MALLOC'] = '1'
  big = log_every * 10**6  # no evaluation or checkpoint inside the timed steps (the last step does both, untimed)
  cmd = [args.python, '-m', 'foundation.main', f'--config={CONFIG}:{VARIANT}', f'--workdir={workdir}',
         f'--config.data.data_dir={args.data_dir}', f'--config.num_train_steps={steps + log_every}',
         f'--config.log_every={log_every}', f'--config.eval_every={big}', f'--config.checkpoint_every={big}',
         '--config.sample.num_samples=0', '--config.eval.max_batches=1']
  print(f'[{label}] XLA_FLAGS={xla_flags or "(unset)"}: {" ".join(cmd)}', file=sys.stderr, flush=True)
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
      raise RuntimeError(f'{label} failed (exit {proc.returncode}); last output:\n{proc.stdout[-3000:]}')
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f if line.strip()]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
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


def run_torch(args, *, label: str, model: str, cfg, threads: int, steps: int, log_every: int) -> dict:
  m = cfg.model
  worker = dict(model_name=model, vocab_size=m.vocab_size, num_layers=m.num_layers, embed_dim=m.embed_dim,
                num_heads=m.num_heads, mlp_dim=m.mlp_dim, seq_len=cfg.data.seq_len,
                batch_size=cfg.global_batch_size, steps=steps, warmup_steps=args.torch_warmup_steps,
                log_every=log_every, threads=threads, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
  cmd = [args.torch_python, os.path.abspath(__file__), '--torch_worker', json.dumps(worker)]
  print(f'[{label}] {args.torch_python} ... --torch_worker (threads={threads})', file=sys.stderr, flush=True)
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if proc.returncode:
    raise RuntimeError(f'{label} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result['wall_s'] = time.perf_counter() - start
  return result


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
  parser.add_argument('--python', default=sys.executable, help='interpreter with the project\'s packages')
  parser.add_argument('--torch_python', default=sys.executable, help='interpreter with torch')
  parser.add_argument('--rows', default=','.join(ROWS), help=f'comma-separated subset of {",".join(ROWS)}')
  parser.add_argument('--json', default=None, help='also write the results here')
  parser.add_argument('--torch_worker', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.torch_worker is not None:
    print(json.dumps(torch_benchmark(**json.loads(args.torch_worker))))
    return

  rows = [r.strip() for r in args.rows.split(',') if r.strip()]
  if set(rows) - set(ROWS):
    parser.error(f'unknown rows {sorted(set(rows) - set(ROWS))}; choose from {",".join(ROWS)}')
  log_every = args.log_every or max(1, min(50, args.steps // 3))
  steps = math.ceil(args.steps / log_every) * log_every
  if args.torch_warmup_steps is None:
    args.torch_warmup_steps = log_every
  n = nproc()
  cfg = baby_config()
  m = cfg.model
  machine = {'nproc': n, 'cpu_model': cpu_model(), 'date': datetime.datetime.now().astimezone().isoformat(
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
  specs = {
      'foundation_1dev': ('foundation, 1 CPU device',
                          lambda label: run_foundation(args, label=label, xla_flags=None, steps=steps,
                                                       log_every=log_every)),
      'foundation_glibc_malloc': (f'foundation, {n} devices, glibc malloc defaults',
                                  lambda label: run_foundation(args, label=label, xla_flags=dp_flags, steps=steps,
                                                               log_every=log_every, glibc_malloc=True)),
      'foundation_dp': (f'foundation, {n} devices, data parallel (launch/local.sh)',
                        lambda label: run_foundation(args, label=label, xla_flags=dp_flags, steps=steps,
                                                     log_every=log_every)),
      'torch_llama': (f'PyTorch Llama-style, {n} threads',
                      lambda label: run_torch(args, label=label, model='llama', cfg=cfg, threads=n, steps=steps,
                                              log_every=log_every)),
      'torch_gpt': (f'PyTorch nanoGPT-style, {n} threads',
                    lambda label: run_torch(args, label=label, model='gpt', cfg=cfg, threads=n, steps=steps,
                                            log_every=log_every)),
  }
  runs = {key: [] for key in rows}
  for round_ in range(args.rounds):
    for key in rows:  # sequential: never two runs at once
      label, fn = specs[key]
      runs[key].append(fn(label))
      print(f'[{label}] round {round_ + 1}/{args.rounds}: {runs[key][-1]["tokens_per_sec"]:,.0f} tokens/s',
            file=sys.stderr, flush=True)
  results = []
  for key in rows:
    intervals = [x for run in runs[key] for x in run['intervals_tokens_per_sec']]
    mfu = [run['mfu'] for run in runs[key] if run.get('mfu') is not None]
    results.append({'row': key, 'implementation': specs[key][0], 'tokens_per_sec': statistics.median(intervals),
                    'intervals_tokens_per_sec': intervals, 'mfu': statistics.median(mfu) if mfu else None,
                    'runs': runs[key]})

  torch_best = max((r['tokens_per_sec'] for r in results if r['row'].startswith('torch')), default=None)
  for r in results:
    r['ratio_to_fastest_torch'] = r['tokens_per_sec'] / torch_best if torch_best else None

  width = max(len('implementation'), *(len(r['implementation']) for r in results)) if results else 14
  print()
  print(f'LM training throughput, {CONFIG}:{VARIANT} ({m.num_layers} layers, {m.num_heads} heads, width '
        f'{m.embed_dim}, SwiGLU {m.mlp_dim}, context {cfg.data.seq_len}, batch {cfg.global_batch_size}, vocab '
        f'{m.vocab_size}, f32); median over {args.rounds} rounds x {steps // log_every} intervals of {log_every} steps')
  print(f'machine: {n} cores ({machine["cpu_model"]}), {machine["date"]}, load average at start '
        f'{machine["loadavg_at_start"]:.2f}, torch {torch_version or "not run"}')
  print()
  # The interval range is there to spot noise: on a busy machine it is wide (and PyTorch's OpenMP threads slow
  # down far more than XLA's when a core is taken), and the ratios mean little.
  print(f'| {"implementation":<{width}} | {"tokens/s":>9} | ratio to fastest PyTorch | {"intervals min-max":>17} |')
  print(f'|{"-" * (width + 2)}|{"-" * 10}:|{"-" * 25}:|{"-" * 18}:|')
  for r in results:
    ratio = f'{r["ratio_to_fastest_torch"]:.2f}x' if r['ratio_to_fastest_torch'] else 'n/a'
    spread = f'{min(r["intervals_tokens_per_sec"]):,.0f}-{max(r["intervals_tokens_per_sec"]):,.0f}'
    print(f'| {r["implementation"]:<{width}} | {r["tokens_per_sec"]:>9,.0f} | {ratio:>24} | {spread:>17} |')

  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'machine': machine, 'setup': setup, 'results': results}, f, indent=1)
    print(f'\nwrote {args.json}')


if __name__ == '__main__':
  main()
