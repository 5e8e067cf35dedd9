"""How good is an image encoder's representation? Features of the train and test splits, then the probe suite.

Any task with an image encoder evaluates through this (SimCLR, CLIP's image tower, the supervised baseline, and
later fine-tuning and distillation), so all their numbers are measured the same way. Each evaluation also writes
`results.md` and `fewshot.png` to the workdir, comparing this run's encoder with its own random init (the step-0
evaluation), raw pixels, and the evaluation any other run named in `config.eval.compare` reports (its selected step,
else its last).
"""

import json
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from foundation import config_base, files, sharding
from foundation.data import images as image_data
from foundation.data import text as text_data
from foundation.evaluate import probes, report


def encoder_features(encode: Callable, params: Any, images: np.ndarray, mesh, batch_size: int) -> np.ndarray:
  """encode(params, images uint8 [B, H, W, C]) -> [B, D] over the mesh, batch by batch; every process gets all rows."""
  rows = batch_size // jax.process_count()
  first = jax.process_index() * rows
  features = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    real = len(chunk)
    if real < batch_size:  # pad to one shape, so the forward compiles once
      chunk = np.concatenate([chunk, np.zeros((batch_size - real, *chunk.shape[1:]), chunk.dtype)])
    out = encode(params, sharding.global_batch(chunk[first:first + rows], mesh))
    features.append(np.asarray(multihost_utils.process_allgather(out, tiled=True))[:real])
  return np.concatenate(features)


def _columns(shots) -> list[str]:
  return ['linear_probe/accuracy', *[f'fewshot_{k}shot/accuracy' for k in shots], 'knn/accuracy']


def _read_evals(workdir: str, prefix: str = 'eval/') -> dict[int, dict]:
  """step -> eval metrics (without `prefix`) logged in a workdir's metrics.jsonl."""
  path = os.path.join(workdir, 'metrics.jsonl')
  evals = {}
  if files.exists(path):
    for line in files.read_text(path).splitlines():
      record = json.loads(line)
      found = {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}
      if found:
        evals.setdefault(record['step'], {}).update(found)
  return evals


def reported_evaluation(workdir: str, key: str = 'linear_probe/accuracy') -> dict | None:
  """The evaluation a finished run reports (without 'eval/'), among those holding `key`: the step its early stopping
  selected (logged as best/eval/...), else its last; None if it logged none."""
  for prefix in ('best/eval/', 'eval/'):
    evals = [m for _, m in sorted(_read_evals(workdir, prefix).items()) if key in m]
    if evals:
      return evals[-1]
  return None


class RepresentationEval:
  """Call with (encode, params, step, ctx) -> {'eval/...': value}; loads the data once, on first use.

  `start` names what the encoder is at step 0 in the results table: its random init, unless the run starts from
  trained weights (a locked or restored encoder).
  """

  def __init__(self, config, start: str = 'random init'):
    e = config.eval  # checked here, at build, not at the first evaluation (for some runs, after training)
    if e.probe not in probes.PROBES:
      raise ValueError(f'config.eval.probe={e.probe!r}; choose one of {sorted(probes.PROBES)}.')
    if not all(config_base.is_whole(s, 1) for s in e.shots):
      raise ValueError(f'config.eval.shots={tuple(e.shots)!r} must be whole numbers of at least 1 (labels per class).')
    if not config_base.is_whole(e.fewshot_seeds, 1):
      raise ValueError(f'config.eval.fewshot_seeds={e.fewshot_seeds!r} must be a whole number of at least 1.')
    self._start = start
    self._data_cfg = config.data
    self._cfg = config.eval
    self._name = config.eval.name
    self._data = None

  @property
  def selection_metrics(self) -> tuple[str, ...]:
    """The probes' accuracies that early stopping may select a step by: none while they read the test split (every
    evaluation probes data.eval_split, so a step chosen by one that reads test would be chosen on test)."""
    if text_data.reads_test(self._data_cfg.eval_split):
      return ()
    return tuple(f'eval/{k}' for k in _columns(self._cfg.shots))

  def _load(self):
    d, e = self._data_cfg, self._cfg
    classes = d.get('classes', ())  # the task's class filter (classify, simclr, clip)
    train_x, train_y = image_data.load_split(name=d.name, data_dir=d.data_dir, split=d.train_split,
                                             max_examples=e.max_train_examples or None, classes=classes)
    test_x, test_y = image_data.load_split(name=d.name, data_dir=d.data_dir, split=d.eval_split,
                                           max_examples=e.max_test_examples or None, classes=classes)
    self._data = train_x, train_y, test_x, test_y
    self._num_classes = len(image_data.class_names(d.name, d.data_dir, classes=classes))

  def _probe(self, train_f, test_f) -> dict[str, float]:
    _, train_y, _, test_y = self._data
    return probes.probe_suite(train_f, train_y, test_f, test_y, num_classes=self._num_classes,
                              shots=tuple(self._cfg.shots), seeds=tuple(range(self._cfg.fewshot_seeds)),
                              probe=self._cfg.probe)

  def __call__(self, encode: Callable, params: Any, step: int, ctx) -> dict[str, float]:
    if self._data is None:
      self._load()
    train_x, _, test_x, _ = self._data
    batch = self._cfg.batch_size
    results = {f'eval/{k}': v for k, v in self._probe(encoder_features(encode, params, train_x, ctx.mesh, batch),
                                                      encoder_features(encode, params, test_x, ctx.mesh, batch))
               .items()}
    earlier = _read_evals(ctx.workdir) if ctx.is_writer else {}
    if not any('raw_pixels/linear_probe/accuracy' in m for m in earlier.values()):
      flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0
      results.update({f'eval/raw_pixels/{k}': v for k, v in self._probe(flat(train_x), flat(test_x)).items()})
    if ctx.is_writer:
      self._write_report(earlier, {k[5:]: v for k, v in results.items()}, step, ctx.workdir)
    return results

  def _write_report(self, earlier: dict[int, dict], current: dict, step: int, workdir: str) -> None:
    rows = {f'{self._name} (step {step})': current}
    if 0 in earlier and step != 0:
      rows[f'{self._name} at step 0 ({self._start})'] = earlier[0]
    raw = next((m for m in [current, *earlier.values()] if 'raw_pixels/linear_probe/accuracy' in m), None)
    if raw:
      rows['raw pixels'] = {k[len('raw_pixels/'):]: v for k, v in raw.items() if k.startswith('raw_pixels/')}
    for name, other in sorted(dict(self._cfg.compare).items()):
      reported = reported_evaluation(other)
      if reported:
        rows[name] = reported
    columns = _columns(self._cfg.shots)
    files.write_atomically(os.path.join(workdir, 'results.md'),
                           f'Linear-probe accuracy ({self._cfg.probe} probe) on {self._data_cfg.name} '
                           f'{self._data_cfg.eval_split}; few-shot = k labels per class, mean of '
                           f'{self._cfg.fewshot_seeds} draws.\n\n' + report.results_table(rows, columns) + '\n')
    all_labels = len(self._data[1]) // self._num_classes
    curves = {name: {**{k: m[f'fewshot_{k}shot/accuracy'] for k in self._cfg.shots if f'fewshot_{k}shot/accuracy' in m},
                     all_labels: m['linear_probe/accuracy']}
              for name, m in rows.items() if 'linear_probe/accuracy' in m}
    report.plot_fewshot(curves, os.path.join(workdir, 'fewshot.png'),
                        f'{self._data_cfg.name}: probe accuracy vs labels per class')
