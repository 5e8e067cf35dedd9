r"""Compile time of the LM training step against depth, with the layers unrolled and scanned, side by side.

  python benchmarks/compile_time.py [--depths=4,16] [--variant=baby] [--data_dir=$TFDS_DATA_DIR]

For each depth and layout it builds the config (configs/lm/shakespeare.py:VARIANT with model.num_layers and
model.scan_layers set), runs the loop's own checks (`train.prepare`, dry), and times `jax.jit(step).lower(...)` and
`.compile()` of the real training step (forward, backward, AdamW) on this machine's default device, in a fresh
process each (no compilation cache). An unrolled stack is one copy of the block per layer in the program; a
scanned one is a single copy in a loop, so its compile time should not grow with depth.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def measure(variant: str, layers: int, scan: bool, data_dir: str) -> dict:
  """In this process: seconds to lower and to compile one training step."""
  import jax  # pylint: disable=import-outside-toplevel
  from foundation import config_base, train  # pylint: disable=import-outside-toplevel
  config = config_base.load('configs/lm/shakespeare.py', variant)
  config.model.update(num_layers=layers, scan_layers=scan)
  config.data.data_dir = data_dir
  with tempfile.TemporaryDirectory() as workdir:
    prepared = train.prepare(config, workdir, dry=True)
  task = prepared.task
  step = train.make_train_step(task, prepared.tx, prepared.schedule, config, axis_name=None)
  state = jax.eval_shape(lambda rng: train._init_state(task, prepared.tx, rng), jax.random.key(0))  # pylint: disable=protected-access
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), task.train_batches(0, 1)[0])
  start = time.perf_counter()
  lowered = jax.jit(step).lower(state, {}, batch)
  lowered_at = time.perf_counter()
  lowered.compile()
  return {'layers': layers, 'scan': scan, 'lower_s': lowered_at - start,
          'compile_s': time.perf_counter() - lowered_at}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--depths', default='4,16')
  parser.add_argument('--variant', default='baby')
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR',
                                                           os.path.expanduser('~/tensorflow_datasets')))
  parser.add_argument('--one', help=argparse.SUPPRESS)  # internal: "layers,scan" measured in this process
  args = parser.parse_args()
  if args.one:
    layers, scan = args.one.split(',')
    print(json.dumps(measure(args.variant, int(layers), scan == 'True', args.data_dir)))
    return
  rows = []
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  for layers in [int(d) for d in args.depths.split(',')]:
    for scan in (False, True):
      out = subprocess.run([sys.executable, __file__, f'--one={layers},{scan}', f'--variant={args.variant}',
                            f'--data_dir={args.data_dir}'], cwd=REPO, env=env, capture_output=True, text=True,
                           check=True)
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  print(f'configs/lm/shakespeare.py:{args.variant}, training step, {os.cpu_count()} cores, '
        f'{time.strftime("%Y-%m-%d")}\n')
  print('| layers | layout | lower (s) | compile (s) |\n|---:|---|---:|---:|')
  for row in rows:
    print(f'| {row["layers"]} | {"scanned" if row["scan"] else "unrolled"} | {row["lower_s"]:.2f} | '
          f'{row["compile_s"]:.2f} |')


if __name__ == '__main__':
  main()
