r"""One-shot pruning of a trained image classifier or decoder LM by Optimal Brain Surgeon, or by magnitude.

  python -m foundation.compress --workdir=RUN --method=obs --sparsity=0.5 [--pattern=2:4] --out=PRUNED

Every weight matrix of RUN's reported checkpoint (the step early stopping selected, else the newest) is pruned
layer by layer: the convolution and dense kernels of an image classifier, or the query, key, value, out, gate, up
and down projections of every decoder layer (not the embedding). The calibration data are the first
--calibration_examples images or token sequences of RUN's training split, unaugmented: X holds a layer's inputs
(a conv's im2col patches), H = 2 X X^T / n + lambda I with lambda = --damp times the mean of H's diagonal, and each
output row w of the kernel loses its weights by the OBS rule of Hassibi & Stork: remove the q that minimises
w_q^2 / [H^-1]_qq, move the remaining weights of the row by -w_q / [H^-1]_qq * H^-1[:, q], and take q out of H^-1.
So every row keeps the same share of its weights (`sparsity` of them are zero, to the nearest weight, and at
least one weight kept), and with --pattern=2:4 every four consecutive input weights of a row keep two. --rounds > 1
removes a row's weights in that many batches (see obs_prune). Magnitude pruning zeroes the smallest |w| of each row
under the same constraints, without updating the rest. Under N:M, a layer whose input size is not a multiple of M
(the first conv of a grayscale image: 9 inputs) stays dense, as N:M hardware kernels leave it; compress.json says
so.

PRUNED is a workdir holding RUN's config.json, one checkpoint of the pruned params (at RUN's step) and
compress.json (what was done, the sparsity and the relative output error ||WX - W'X||^2 / ||WX||^2 of every
layer). Evaluate it, or fine-tune or distil from it, through `--config.init_from.source=PRUNED` (with
`--config.num_train_steps=0`: evaluation only), or name it as a teacher. A distilled student's CRD and hint
projections (distill.AUXILIARY_HEADS) are not kept: load its pruned classifier into a config without them.
"""

import argparse
import json
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from foundation import checkpoint, files
from foundation.data import augment, images, text
from foundation.models.transformer import Transformer
from foundation.tasks import distill, lm

METHODS = ('obs', 'magnitude')


def parse_pattern(pattern: str) -> tuple[int, int] | None:
  """'' -> None (unstructured); 'N:M' -> (N, M): at most N of every M consecutive input weights stay non-zero."""
  if not pattern:
    return None
  try:
    keep, group = (int(p) for p in pattern.split(':'))
  except ValueError:
    raise ValueError(f'--pattern={pattern!r}; write it as N:M, e.g. 2:4.') from None
  if not 0 < keep < group:
    raise ValueError(f'--pattern={pattern!r} must keep 0 < N < M weights of every M.')
  return keep, group


def _removable(pruned: np.ndarray, pattern: tuple[int, int] | None) -> np.ndarray:
  """[rows, d] bool: weights that may still be removed (not yet removed; their group not full under N:M)."""
  if pattern is None:
    return ~pruned
  keep, group = pattern
  rows, d = pruned.shape
  full = pruned.reshape(rows, d // group, group).sum(-1) >= group - keep
  return ~pruned & ~np.repeat(full, group, axis=1)


def _num_removed(d: int, sparsity: float, pattern: tuple[int, int] | None) -> int:
  """Weights each row of d inputs loses: the nearest whole share (halves up, the same rule for every layer), but
  never the whole row, which would silence the output (--sparsity is below 1)."""
  if pattern is None:
    return min(int(round(sparsity * d, 9) + 0.5), d - 1)  # 0.35 * 90 is 31.4999...: 32, as 0.35 * 10 gives 4
  keep, group = pattern
  if d % group:
    raise ValueError(f'a layer with {d} inputs cannot be pruned {keep}:{group}; its input size is not a multiple '
                     f'of {group}.')
  return d // group * (group - keep)


def obs_prune(w: np.ndarray, hessian: np.ndarray, sparsity: float, pattern: tuple[int, int] | None = None,
              damp: float = 0.01, rounds: int = 32, rows_at_once: int = 32) -> np.ndarray:
  """w [d, out] (a flax kernel flattened to inputs x outputs), hessian [d, d] = 2 X X^T / n: the row-wise OBS
  pruning of every output column of w (module docstring).

  Each row removes its budget in `rounds` rounds; a round removes the row's lowest-saliency weights at once (at
  most one per N:M group) with the exact OBS update for a set S: w -= H^-1[:, S] H^-1[S, S]^-1 w_S, and the same
  downdate of H^-1. With as many rounds as weights to remove this is the one-at-a-time rule of Hassibi & Stork; a
  few dozen rounds make it matrix products (a conv with 1,152 inputs takes seconds instead of minutes) and choose
  nearly the same weights. Rows go `rows_at_once` at a time, each with its own copy of H^-1 (they remove different
  weights), which bounds the memory to rows_at_once * d^2 doubles.
  """
  d = w.shape[0]
  h_inv = np.linalg.inv(hessian.astype(np.float64) + damp * np.mean(np.diag(hessian)) * np.eye(d))
  count = _num_removed(d, sparsity, pattern)
  rows = w.T.astype(np.float64)
  out = np.concatenate([_obs_rows(rows[i:i + rows_at_once], h_inv, count, pattern, max(1, rounds))
                        for i in range(0, len(rows), rows_at_once)])
  return out.T.astype(w.dtype)


def _obs_rows(rows: np.ndarray, h_inv: np.ndarray, count: int, pattern: tuple[int, int] | None,
              rounds: int) -> np.ndarray:
  rows = rows.copy()
  n, d = rows.shape
  group = pattern[1] if pattern else 1  # unstructured: every weight is its own group
  inverse = np.repeat(h_inv[None], n, 0)
  pruned = np.zeros(rows.shape, bool)
  per_round = -(-count // rounds)
  removed = 0
  while removed < count:
    diagonal = np.diagonal(inverse, axis1=1, axis2=2)  # 0 at removed weights, which are masked out
    with np.errstate(divide='ignore', invalid='ignore'):
      saliency = np.where(_removable(pruned, pattern), rows ** 2 / diagonal, np.inf).reshape(n, d // group, group)
    within, best = np.argmin(saliency, -1), np.min(saliency, -1)           # each group's cheapest weight
    m = min(per_round, count - removed, int(np.isfinite(best).sum(1).min()))
    groups = np.argsort(best, axis=1, kind='stable')[:, :m]                # [n, m] the cheapest groups
    chosen = groups * group + np.take_along_axis(within, groups, 1)       # [n, m] weight indices
    columns = np.take_along_axis(inverse, chosen[:, None, :], 2)           # [n, d, m] H^-1[:, S]
    pivot = np.take_along_axis(columns, chosen[:, :, None], 1)             # [n, m, m] H^-1[S, S]
    solved = np.linalg.solve(pivot, np.concatenate(
        [np.take_along_axis(rows, chosen, 1)[:, :, None], columns.swapaxes(1, 2)], 2))  # [n, m, 1 + d]
    rows -= np.einsum('ndm,nm->nd', columns, solved[:, :, 0])
    inverse -= columns @ solved[:, :, 1:]
    np.put_along_axis(pruned, chosen, True, 1)
    rows[pruned] = 0.0  # exactly zero (the update leaves rounding residue on removed weights)
    removed += m
  return rows


def magnitude_prune(w: np.ndarray, sparsity: float, pattern: tuple[int, int] | None = None) -> np.ndarray:
  """The same per-row budget (and N:M groups) as obs_prune, removing the smallest |w| and moving nothing else."""
  rows = w.T.copy()
  d = rows.shape[1]
  if pattern is None:
    order = np.argsort(np.abs(rows), axis=1, kind='stable')[:, :_num_removed(d, sparsity, pattern)]
    np.put_along_axis(rows, order, 0, axis=1)
  else:
    keep, group = pattern
    _num_removed(d, sparsity, pattern)
    grouped = rows.reshape(rows.shape[0], d // group, group)
    order = np.argsort(np.abs(grouped), axis=2, kind='stable')[..., :group - keep]
    np.put_along_axis(grouped, order, 0, axis=2)
    rows = grouped.reshape(rows.shape)
  return rows.T


def layer_inputs(model: nn.Module, params, x: jax.Array) -> dict[tuple[str, ...], np.ndarray]:
  """{params path of a weight matrix: its inputs [n, d] on input x}, d in the order of the weight flattened to
  [d, out]: Conv and Dense kernels (a conv's inputs are its im2col patches: kernel row, kernel column, input
  channel) and the decoder's projections (query, key, value, out, gate, up, down of every layer)."""
  found = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == '__call__' and isinstance(module, (nn.Conv, nn.Dense)):
      inputs = args[0]
      if isinstance(module, nn.Conv):
        inputs = _patches(module, inputs)
      found[(*module.path, 'kernel')] = np.asarray(inputs.reshape(-1, inputs.shape[-1]), np.float32)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _, sown = model.apply({'params': params}, x, mutable=['projection_inputs'])
  for path, value in jax.tree_util.tree_flatten_with_path(sown.get('projection_inputs', {}))[0]:
    keys = tuple(k.key for k in path if hasattr(k, 'key'))  # module path and weight name; drop sow's tuple index
    found[keys] = np.asarray(value, np.float32)
  return found


def _patches(conv: nn.Conv, x: jax.Array) -> jax.Array:
  """[N, H', W', kh * kw * C]: the windows the conv multiplies by its kernel, in the kernel's (kh, kw, C) order."""
  if (conv.feature_group_count != 1 or conv.input_dilation not in (None, 1)
          or conv.kernel_dilation not in (None, 1) or conv.padding != 'SAME'):
    raise ValueError(f'{"/".join(conv.path)}: only plain (ungrouped, undilated, SAME-padded) convolutions are pruned.')
  kernel = tuple(conv.kernel_size)
  strides = conv.strides if isinstance(conv.strides, (tuple, list)) else (conv.strides or 1,) * len(kernel)
  patches = jax.lax.conv_general_dilated_patches(
      x.astype(jnp.float32), kernel, tuple(strides), 'SAME', dimension_numbers=('NHWC', 'OIHW', 'NHWC'))
  c = x.shape[-1]
  # conv_general_dilated_patches orders the patch features (C, kh, kw): reorder to the kernel's (kh, kw, C).
  return patches.reshape(*patches.shape[:-1], c, -1).swapaxes(-1, -2).reshape(*patches.shape[:-1], -1)


def prune_model(model: nn.Module, params, calibration: np.ndarray, *, method: str, sparsity: float,
                pattern: tuple[int, int] | None, damp: float, rounds: int) -> tuple[dict, dict]:
  """(pruned params, {layer: {'sparsity', 'relative_error'}}); every layer's inputs come from the unpruned model."""
  inputs = layer_inputs(model, params, jnp.asarray(calibration))
  pruned = jax.tree.map(np.array, params)
  report = {}
  for path, x in inputs.items():
    node = pruned
    for key in path[:-1]:
      node = node[key]
    kernel = node[path[-1]]
    w = kernel.reshape(x.shape[1], -1)
    if pattern and len(w) % pattern[1]:
      # The first conv of a grayscale image has 9 inputs: N:M kernels leave such layers dense, and so does this.
      report['/'.join(path)] = {'sparsity': float(np.mean(w == 0)), 'relative_error': 0.0,
                                'skipped': f'{len(w)} inputs are not a multiple of {pattern[1]}'}
      continue
    if method == 'obs':
      new = obs_prune(w, 2 * (x.T.astype(np.float64) @ x) / len(x), sparsity, pattern, damp, rounds)
    else:
      new = magnitude_prune(w, sparsity, pattern)
    node[path[-1]] = new.reshape(kernel.shape)
    before, after = x @ w, x @ new
    scale = np.sum(before ** 2)  # 0 for a layer whose output is zero (a zero-initialised head): nothing to lose
    report['/'.join(path)] = {'sparsity': float(np.mean(new == 0)),
                              'relative_error': float(np.sum((before - after) ** 2) / scale) if scale else 0.0}
  return pruned, report


def _saved_model(workdir: str, data_dir: str | None) -> tuple[dict, nn.Module, jax.Array]:
  """(config.json, model, one example input) of an image classifier or decoder LM run."""
  task = checkpoint.run_config(workdir, (*lm.LM_TASKS, 'classify', 'distill'),
                               'an image classifier or language-model run')['task']
  if task in lm.LM_TASKS:
    saved, model_cfg = lm.saved_lm(workdir)
    if model_cfg.lora_rank:
      raise ValueError(f'{workdir} trains LoRA factors beside its weights, which pruning the weights alone would '
                       'leave dense: prune a run without LoRA (--config.model.lora_rank=0).')
    model, example = Transformer(model_cfg), jnp.zeros((1, saved['data']['seq_len']), jnp.int32)
    scan_field = 'model.scan_layers' if model_cfg.scan_layers else None
  else:
    saved, model = distill.saved_classifier(workdir, data_dir)
    example = jnp.zeros((1, *saved['data']['image_shape']), jnp.float32)
    kind = saved['model']['encoder']
    scan_field = f'model.{kind}.scan_layers' if saved['model'][kind].get('scan_layers') else None
  if scan_field:
    raise ValueError(f'{workdir} scans its blocks (one stacked tree); pruning reads each layer\'s inputs from the '
                     f'unrolled model: retrain with --config.{scan_field}=False.')
  return saved, model, example


def _calibration(saved: dict, data_dir: str, n: int) -> jax.Array:
  """n examples of the run's training split, unaugmented: the first n images as floats, or n token sequences, the
  windows of the run's first training batch of ceil(n / num_shards) rows per shard (its seed), taken in turn from
  every shard."""
  data = saved['data']
  if saved['task'] in lm.LM_TASKS:
    shards = data['num_shards']
    batch = text.train_batches(name=data['name'], data_dir=data_dir, split=data['train_split'],
                               text_key=data['text_key'], tokenizer=lm.tokenizer_for(data['tokenizer']),
                               seq_len=data['seq_len'], global_batch=-(-n // shards) * shards, num_shards=shards,
                               seed=saved['seed'])[0]
    # The batch holds each shard's rows together: interleaved, a first n that is no multiple of num_shards still
    # reads every shard.
    inputs = batch['inputs'].reshape(shards, -1, data['seq_len']).swapaxes(0, 1).reshape(-1, data['seq_len'])
    return jnp.asarray(inputs[:n])
  x, _ = images.load_split(name=data['name'], data_dir=data_dir, split=data['train_split'], max_examples=n)
  return augment.to_float(jnp.asarray(x))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='a trained image classifier or decoder LM run')
  parser.add_argument('--method', choices=METHODS, default='obs')
  parser.add_argument('--sparsity', type=float, default=0.5, help='share of each row\'s weights set to zero')
  parser.add_argument('--pattern', default='', help='N:M structured sparsity, e.g. 2:4 (overrides --sparsity)')
  parser.add_argument('--out', required=True, help='new workdir for the pruned checkpoint')
  parser.add_argument('--calibration_examples', type=int, default=1024, help='images, or token sequences')
  parser.add_argument('--damp', type=float, default=0.01, help='lambda as a share of the mean of diag(H)')
  parser.add_argument('--rounds', type=int, default=32, help='OBS removes each row\'s weights in this many batches')
  parser.add_argument('--data_dir', default='', help='TFDS data dir (default: the one RUN was trained with)')
  args = parser.parse_args(argv)
  args.out = files.absolute(args.out)  # orbax writes to absolute paths only
  try:
    pattern = parse_pattern(args.pattern)
    if not 0 <= args.sparsity < 1:
      raise ValueError(f'--sparsity={args.sparsity} must be in [0, 1).')
    if args.calibration_examples < 1 or args.damp <= 0 or args.rounds < 1:
      # Without damping, a layer input that is always zero (a dead ReLU channel) makes H singular.
      raise ValueError('--calibration_examples, --rounds and --damp must be positive.')
    if '://' in args.out:
      raise ValueError(f'--out={args.out}: compress writes a local directory; copy it to the bucket afterwards.')
    if os.path.exists(args.out):
      raise ValueError(f'--out={args.out} exists; name a new directory (nothing there is overwritten).')
    saved, model, example = _saved_model(args.workdir, args.data_dir or None)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), example))['params']
    # The step the run reports: the one early stopping selected, else the newest.
    params, step = checkpoint.restore_params(args.workdir, 'params', abstract,
                                             step=checkpoint.selected_step(args.workdir),
                                             without=distill.AUXILIARY_HEADS)
    try:
      x = _calibration(saved, args.data_dir or saved['data']['data_dir'], args.calibration_examples)
    except ValueError as e:  # the text pipeline's refusal names its own batch, not this flag
      raise ValueError(f'--calibration_examples={args.calibration_examples}: {e}') from e
  except (ValueError, FileNotFoundError) as e:
    print(f'foundation.compress: {e}', file=sys.stderr)
    return 2
  pruned, report = prune_model(model, params, x, method=args.method,
                               sparsity=args.sparsity, pattern=pattern, damp=args.damp, rounds=args.rounds)
  nonzero = sum(int(np.count_nonzero(v)) for v in jax.tree.leaves(pruned))
  summary = dict(source=os.path.abspath(args.workdir), step=step, method=args.method,
                 sparsity=1 - pattern[0] / pattern[1] if pattern else args.sparsity,  # what each row is asked for
                 pattern=args.pattern, calibration_examples=len(x), damp=args.damp, rounds=args.rounds,
                 nonzero_params=nonzero, total_params=sum(int(v.size) for v in jax.tree.leaves(pruned)),
                 layers=report)
  # Written beside --out and renamed into place at the end: a failed write leaves no half-made workdir behind.
  writing = f'{args.out}.writing-{os.getpid()}'
  try:
    os.makedirs(writing)
    for name, content in (('config.json', saved), ('compress.json', summary)):
      with open(os.path.join(writing, name), 'w') as f:
        json.dump(content, f, indent=2)
    ckpt = checkpoint.Checkpointer(os.path.join(writing, 'checkpoints'), async_save=False)
    ckpt.save(step, {'params': pruned}, {'pruned_from': os.path.abspath(args.workdir)})
    ckpt.close()
    os.rename(writing, args.out)
  except BaseException:
    shutil.rmtree(writing, ignore_errors=True)
    raise
  for name, layer in report.items():
    print(f'{name}: sparsity {layer["sparsity"]:.3f}, relative output error {layer["relative_error"]:.4f}')
  print(f'{nonzero:,} of {summary["total_params"]:,} params non-zero; wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
