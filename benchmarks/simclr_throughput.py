r"""Training throughput of SimCLR's default step, foundation against PyTorch, side by side on this machine.

  python benchmarks/simclr_throughput.py [--torch_python=/path/to/venv/bin/python] [--steps=60] [--rounds=3]

What is timed is one training step of `configs/contrastive/simclr_fashion_mnist.py` as configured: a batch of 256
28x28 grayscale images, two augmented views of each made in the step (random resized crop to 28x28 with area
scale (0.4, 1), horizontal flip, brightness and contrast +-40%, Gaussian blur with probability 0.2, noise of std
0.05, clip), the residual CNN 32/64/128 (stride-2 stem, per-pixel LayerNorm, 2x2 grid pooling to 512 features),
the projection MLP 512-256-128, NT-Xent at temperature 0.5 over the 512 views, and AdamW. Rows, one process each,
never two at once:
  foundation, N devices   `python -m foundation.main --config=configs/contrastive/simclr_fashion_mnist.py` with one
                          CPU device per core (what launch/local.sh does), data parallel
  foundation, 1 device    the same on one CPU device (XLA's intra-op threads over all cores)
  PyTorch                 the same model, loss, optimizer and augmentations written below in PyTorch (eager,
                          torch.set_num_threads(N), channels-last), augmenting the batch on the CPU in the step
                          as foundation does; real Fashion-MNIST images are not needed for speed, so it draws
                          random uint8 images
examples/s is the median over timed intervals of --log_every steps (foundation: `perf/examples_per_sec` from
metrics.jsonl; the first interval holds compilation and is not counted; PyTorch: after one interval of warm-up).
The rows run in --rounds interleaved rounds, as in lm_throughput.py. Differences a reader should know: the crop
here resamples with grid_sample (bilinear, no antialiasing), foundation's with an antialiased scale-and-translate;
the blur is a 3x3 Gaussian in both.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import lm_throughput  # the shared runner, core count and torch probe (benchmarks/ is sys.path[0] here)
from foundation import host  # on sys.path once lm_throughput is imported

REPO = lm_throughput.REPO
CONFIG = 'configs/contrastive/simclr_fashion_mnist.py'
ROWS = ('foundation_dp', 'foundation_1dev', 'torch')


def torch_benchmark(*, batch_size: int, widths: list, head_hidden: int, head_out: int, temperature: float,
                    lr: float, weight_decay: float, crop_scale: list, brightness: float, contrast: float,
                    blur_prob: float, noise_std: float, steps: int, warmup_steps: int, log_every: int,
                    threads: int, seed: int = 0) -> dict:
  """The PyTorch SimCLR step on random uint8 images; returns examples/s (median over intervals)."""
  import math

  import torch
  import torch.nn as nn
  import torch.nn.functional as F

  torch.set_num_threads(threads)
  torch.manual_seed(seed)

  class PixelNorm(nn.Module):  # LayerNorm over channels at every pixel, as foundation's norm='layer'
    def __init__(self, channels):
      super().__init__()
      self.norm = nn.LayerNorm(channels)

    def forward(self, x):
      return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

  def conv(cin, cout, kernel, stride):
    return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1, self.norm1 = conv(cin, cout, 3, stride), PixelNorm(cout)
      self.conv2, self.norm2 = conv(cout, cout, 3, 1), PixelNorm(cout)
      self.shortcut = (nn.Sequential(conv(cin, cout, 1, stride), PixelNorm(cout))
                       if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
      y = F.relu(self.norm1(self.conv1(x)))
      return F.relu(self.shortcut(x) + self.norm2(self.conv2(y)))

  class Encoder(nn.Module):
    def __init__(self):
      super().__init__()
      self.stem, self.stem_norm = conv(1, widths[0], 3, 2), PixelNorm(widths[0])
      blocks, cin = [], widths[0]
      for stage, width in enumerate(widths):
        blocks.append(Block(cin, width, 2 if stage else 1))
        cin = width
      self.blocks = nn.Sequential(*blocks)
      self.head = nn.Sequential(nn.Linear(widths[-1] * 4, head_hidden), nn.ReLU(), nn.Linear(head_hidden, head_out))

    def forward(self, x):
      x = self.blocks(F.relu(self.stem_norm(self.stem(x))))
      return self.head(F.adaptive_avg_pool2d(x, 2).flatten(1))  # the 2x2 grid of the final 4x4 map

  model = Encoder().to(memory_format=torch.channels_last)
  decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
  no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
  optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                                 {'params': no_decay, 'weight_decay': 0.0}], lr=lr)
  gauss_offsets = torch.arange(-1, 2, dtype=torch.float32)

  def augment(images):  # [B, 1, H, W] float in [0, 1] -> one augmented view of each
    b, _, h, w = images.shape
    area = torch.empty(b).uniform_(*crop_scale)
    aspect = torch.exp(torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3)))
    box_w, box_h = torch.sqrt(area * aspect).clamp(max=1.0), torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(b) * (1 - box_w) + box_w / 2) * 2 - 1
    cy = (torch.rand(b) * (1 - box_h) + box_h / 2) * 2 - 1
    flip = torch.where(torch.rand(b) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = box_w * flip, cx, box_h, cy
    grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)
    x = F.grid_sample(images, grid, mode='bilinear', padding_mode='border', align_corners=False)
    x = (x * torch.empty(b, 1, 1, 1).uniform_(1 - brightness, 1 + brightness)).clamp(0, 1)
    c = torch.empty(b, 1, 1, 1).uniform_(1 - contrast, 1 + contrast)
    x = (c * x + (1 - c) * x.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
    sigma = torch.empty(b).uniform_(0.1, 2.0)
    kernel = torch.exp(-0.5 * (gauss_offsets[None] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # [B, 3], separable, one per image (groups = images)
    rows = F.conv2d(F.pad(x.transpose(0, 1), (1, 1, 0, 0), mode='reflect'), kernel[:, None, None, :], groups=b)
    blurred = F.conv2d(F.pad(rows, (0, 0, 1, 1), mode='reflect'), kernel[:, None, :, None], groups=b).transpose(0, 1)
    x = torch.where((torch.rand(b) < blur_prob)[:, None, None, None], blurred, x)
    return (x + noise_std * torch.randn_like(x)).clamp(0, 1)

  def nt_xent(z):
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    logits = (z @ z.T / temperature).fill_diagonal_(float('-inf'))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, partner)

  raw = torch.randint(0, 256, (batch_size, 1, 28, 28), dtype=torch.uint8)

  def step():
    images = raw.float() / 255.0
    views = torch.cat([augment(images), augment(images)]).contiguous(memory_format=torch.channels_last)
    loss = nt_xent(model(views))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()

  for _ in range(warmup_steps):
    step()
  intervals = []
  for _ in range(steps // log_every):
    start = time.perf_counter()
    for _ in range(log_every):
      step()
    intervals.append(batch_size * log_every / (time.perf_counter() - start))
  return {'examples_per_sec': statistics.median(intervals), 'intervals': intervals,
          'num_params': sum(p.numel() for p in model.parameters()), 'torch_version': torch.__version__}


def run_foundation(args, *, devices: int, steps: int, log_every: int) -> dict:
  big = 10**9  # no evaluation or checkpoint inside the timed steps
  records = lm_throughput.foundation_records(args.python, f'foundation, {devices} device(s)', [
      f'--config={CONFIG}', f'--config.num_train_steps={steps + log_every}', f'--config.log_every={log_every}',
      f'--config.eval_every={big}', f'--config.checkpoint_every={big}', '--config.eval_at_start=False',
      '--config.eval.max_train_examples=1000', '--config.eval.max_test_examples=500', '--config.eval.probe=ridge'],
      xla_flags=f'--xla_force_host_platform_device_count={devices}' if devices > 1 else None)
  intervals = [r['perf/examples_per_sec'] for r in records if 'perf/examples_per_sec' in r]
  return {'examples_per_sec': statistics.median(intervals), 'intervals': intervals}


def run_torch(args, cfg, *, steps: int, log_every: int, threads: int) -> dict:
  worker = dict(batch_size=cfg.global_batch_size, widths=list(cfg.model.cnn.widths), head_hidden=cfg.model.head_hidden,
                head_out=cfg.model.head_out, temperature=cfg.temperature, lr=cfg.optim.lr,
                weight_decay=cfg.optim.weight_decay, crop_scale=list(cfg.augment.crop_scale),
                brightness=cfg.augment.brightness, contrast=cfg.augment.contrast, blur_prob=cfg.augment.blur_prob,
                noise_std=cfg.augment.noise_std, steps=steps, warmup_steps=log_every, log_every=log_every,
                threads=threads)
  cmd = [args.torch_python, os.path.abspath(__file__), '--torch_worker', json.dumps(worker)]
  proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if proc.returncode:
    raise RuntimeError(f'PyTorch failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=60, help='timed training steps per row and round')
  parser.add_argument('--rounds', type=int, default=3, help='interleaved rounds over the rows')
  parser.add_argument('--log_every', type=int, default=None, help='steps per timed interval (default: steps // 3)')
  lm_throughput.add_runner_arguments(parser)
  parser.add_argument('--rows', default=','.join(ROWS), help=f'comma-separated subset of {",".join(ROWS)}')
  args = parser.parse_args()
  if args.torch_worker is not None:
    print(json.dumps(torch_benchmark(**json.loads(args.torch_worker))))
    return

  rows = [r.strip() for r in args.rows.split(',') if r.strip()]
  if set(rows) - set(ROWS):
    parser.error(f'unknown rows {sorted(set(rows) - set(ROWS))}; choose from {",".join(ROWS)}')
  log_every = args.log_every or max(1, args.steps // 3)
  steps = -(-args.steps // log_every) * log_every
  n = lm_throughput.nproc()
  cfg = lm_throughput.load_config(CONFIG)
  torch_version = lm_throughput.torch_available(args.torch_python) if 'torch' in rows else None
  if 'torch' in rows and torch_version is None:
    print(f'note: `import torch` fails in {args.torch_python}; skipping the PyTorch row.', file=sys.stderr)
    rows.remove('torch')
  labels = {'foundation_dp': f'foundation, {n} devices, data parallel (launch/local.sh)',
            'foundation_1dev': 'foundation, 1 CPU device', 'torch': f'PyTorch, {n} threads, channels-last'}
  runners = {'foundation_dp': lambda: run_foundation(args, devices=n, steps=steps, log_every=log_every),
             'foundation_1dev': lambda: run_foundation(args, devices=1, steps=steps, log_every=log_every),
             'torch': lambda: run_torch(args, cfg, steps=steps, log_every=log_every, threads=n)}
  machine = {'nproc': n, 'cpu_model': host.cpu_description(), 'loadavg_at_start': os.getloadavg()[0],
             'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'), 'torch': torch_version}
  if machine['loadavg_at_start'] > 0.5 * n:
    print(f'warning: load average {machine["loadavg_at_start"]:.2f} on {n} cores; the machine is not quiet.',
          file=sys.stderr)
  runs = {key: [] for key in rows}
  for round_ in range(args.rounds):
    for key in rows:
      runs[key].append(runners[key]())
      print(f'[{labels[key]}] round {round_ + 1}/{args.rounds}: {runs[key][-1]["examples_per_sec"]:,.0f} examples/s',
            file=sys.stderr, flush=True)
  results = [{'row': key, 'implementation': labels[key], 'runs': runs[key],
              'examples_per_sec': statistics.median(x for run in runs[key] for x in run['intervals'])} for key in rows]
  torch_figure = next((r['examples_per_sec'] for r in results if r['row'] == 'torch'), None)
  width = max(len(labels[key]) for key in rows)
  print(f'\nSimCLR training step, {CONFIG} (batch {cfg.global_batch_size}, two views, CNN {tuple(cfg.model.cnn.widths)}); '
        f'median over {args.rounds} rounds x {steps // log_every} intervals of {log_every} steps')
  print(f'machine: {n} cores ({machine["cpu_model"]}), {machine["date"]}, load average at start '
        f'{machine["loadavg_at_start"]:.2f}, torch {torch_version or "not run"}\n')
  print(f'| {"implementation":<{width}} | examples/s | ratio to PyTorch | intervals min-max |')
  print(f'|{"-" * (width + 2)}|-----------:|-----------------:|------------------:|')
  for r in results:
    ratio = f'{r["examples_per_sec"] / torch_figure:.2f}x' if torch_figure else 'n/a'
    values = [x for run in r['runs'] for x in run['intervals']]
    print(f'| {r["implementation"]:<{width}} | {r["examples_per_sec"]:>10,.0f} | {ratio:>16} | '
          f'{min(values):>8,.0f}-{max(values):,.0f} |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'machine': machine, 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
