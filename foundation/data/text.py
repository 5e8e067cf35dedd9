"""Language-model input pipeline over any TFDS dataset with a string feature, read with `tfds.data_source` + grain.

Training batches are a pure function of the global step, identical whatever the number of processes:

  * the split's records are cut into `num_shards` (K) contiguous blocks; each shard's documents are tokenized and
    concatenated into one token stream, `eos_id` after each document;
  * every global batch is K equal groups of rows; group k comes from shard k. Process p owns the contiguous run of
    shards [p*K/P, (p+1)*K/P), so its rows are a contiguous block of the global batch, and it loads only those shards.
    So each shard, whatever its size, gives 1/K of the training rows: a corpus of few, unequal records (Shakespeare's
    plays) weights its shards unequally per token, one of many small records evenly;
  * shard k serves windows of seq_len + 1 tokens. Epoch e of shard k starts at a random offset in [0, seq_len) and
    visits its non-overlapping windows in a random order, both drawn from np.random.default_rng([seed, k, e]);
    row r of group k in global batch s is the shard's window j = s * (global_batch // K) + r.

So `train_batches(...)` is a grain MapDataset indexed by step: `to_iter_dataset()` prefetches in the background and
its iterator's `get_state()` (a small JSON-able dict) resumes exactly.

Evaluation reads the whole split in order: one token stream cut into windows that predict every token but the first
exactly once; the last global batch is filled with weight-0 rows.

Tokenizers need `encode(str) -> int32 array`, `eos_id` and `pad_id` (see tokenizers.py).
"""

from __future__ import annotations

import functools
import re
from typing import Protocol, Sequence

import grain
import numpy as np

_READ_CHUNK = 1024  # records fetched per data-source call while loading a shard


class Tokenizer(Protocol):
  pad_id: int
  eos_id: int

  def encode(self, text: str) -> np.ndarray:
    ...


def _prepare_command(name: str, data_dir: str) -> str:
  if name == 'teacher_samples':  # written from a trained LM, not by a builder alone (see data/teacher_samples.py)
    return f'python -m foundation.sample_corpus --teacher=RUN --out={data_dir}'
  return f'python -m foundation.data.prepare {name} --data_dir={data_dir}'


def check_prepared(name: str, data_dir: str, splits: Sequence[str]) -> None:
  """Raises FileNotFoundError naming the command that prepares `name` if it or one of `splits` is missing."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (keeps importing this module light)
  command = _prepare_command(name, data_dir or 'DIR')
  if not data_dir:
    raise FileNotFoundError(f'config.data.data_dir is empty: name the TFDS data dir that holds {name!r}. Prepare '
                            f'one with:\n  {command}')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  except tfds.core.registered.DatasetNotFoundError:
    prepared = False
  if not prepared:
    raise FileNotFoundError(f'TFDS dataset {name!r} is not prepared in data_dir {data_dir!r}. Prepare it with:\n'
                            f'  {command}')
  available = set(builder.info.splits)
  # A split spec may slice or add splits: 'train[:90%]+validation'.
  missing = sorted({base for split in splits for base in re.findall(r'(?:^|\+)\s*([^\[+\s]+)', split)}
                   - available)
  if missing:
    raise FileNotFoundError(f'TFDS dataset {name!r} in {data_dir!r} has no split(s) {missing}; it has '
                            f'{sorted(available)}. Prepare a version that has them with:\n  {command}')
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise FileNotFoundError(f'TFDS dataset {name!r} in {data_dir!r} is stored as {builder.info.file_format.value}, '
                            f'but tfds.data_source needs array_record. Move {builder.data_dir} aside and rebuild '
                            f'it with:\n  {command}')


def prepared_version(name: str, data_dir: str) -> str:
  """The version of TFDS dataset `name` that a run reads from `data_dir`: the newest one the code defines."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return str(tfds.builder(name, data_dir=data_dir).info.version)


def check_disjoint(name: str, data_dir: str, splits: dict[str, str]) -> None:
  """Raises ValueError when two of `splits` ({config field: split spec}, prepared ones) share examples: 'train' and
  'train[50000:]' do, 'train[:50000]' and 'train[50000:]' do not."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  infos = tfds.builder(name, data_dir=data_dir).info.splits
  ranges = {field: [(a.splitname, a.from_ or 0, infos[a.splitname].num_examples if a.to is None else a.to)
                    for a in tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos)]
            for field, spec in splits.items() if spec}
  fields = list(ranges)
  for i, first in enumerate(fields):
    for second in fields[i + 1:]:
      shared = sum(max(0, min(b, d) - max(a, c)) for base, a, b in ranges[first] for other, c, d in ranges[second]
                   if base == other)
      if shared:
        raise ValueError(f'{first}={splits[first]!r} and {second}={splits[second]!r} share {shared:,} examples of '
                         f'{name}: choose splits apart from each other (e.g. train[:50000] and train[50000:]).')


def reads_test(spec: str) -> bool:
  """Whether a split spec reads any of the test split ('test', 'test[:400]', 'train[:10]+test')."""
  return any(part.split('[')[0].strip() == 'test' for part in spec.split('+'))


def _data_source(name: str, data_dir: str, split: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  check_prepared(name, data_dir, [split])
  return tfds.data_source(name, split=split, data_dir=data_dir)


def read_texts(name: str, data_dir: str, split: str, text_key: str) -> list[str]:
  """Every record's text of a split, in order."""
  source = _data_source(name, data_dir, split)
  return [_text(record[text_key]) for record in source.__getitems__(list(range(len(source))))]


def _text(value: str | bytes) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else value


def _token_stream(source, start: int, stop: int, text_key: str, tokenizer: Tokenizer) -> np.ndarray:
  """Records [start, stop) tokenized and concatenated, `eos_id` after each document."""
  eos = np.array([tokenizer.eos_id], np.int32)
  pieces = []
  for chunk_start in range(start, stop, _READ_CHUNK):
    for record in source.__getitems__(list(range(chunk_start, min(stop, chunk_start + _READ_CHUNK)))):
      pieces += [np.asarray(tokenizer.encode(_text(record[text_key])), np.int32), eos]
  return np.concatenate(pieces) if pieces else np.zeros([0], np.int32)


class _ShardWindows:
  """The windows shard k serves: window j is a pure function of (seed, k, j)."""

  def __init__(self, tokens: np.ndarray, *, seed: int, shard: int, seq_len: int):
    self.tokens, self.seed, self.shard, self.seq_len = tokens, seed, shard, seq_len
    # Windows per epoch, the same for every epoch: whatever offset in [0, seq_len) is drawn, they fit.
    self.windows_per_epoch = (len(tokens) - (seq_len - 1)) // (seq_len + 1)
    self._epoch = functools.lru_cache(maxsize=2)(self._epoch_uncached)

  def _epoch_uncached(self, epoch: int) -> tuple[int, np.ndarray]:
    rng = np.random.default_rng([self.seed, self.shard, epoch])
    offset = int(rng.integers(self.seq_len))
    return offset, rng.permutation(self.windows_per_epoch)

  def starts(self, js: np.ndarray) -> np.ndarray:
    """Start positions in the token stream of windows `js`."""
    epochs, positions = np.divmod(js, self.windows_per_epoch)
    starts = np.empty(len(js), np.int64)
    for epoch in np.unique(epochs):
      offset, order = self._epoch(int(epoch))
      at = epochs == epoch
      starts[at] = offset + order[positions[at]] * (self.seq_len + 1)
    return starts

  def windows(self, js: np.ndarray) -> np.ndarray:
    """[len(js), seq_len + 1] int32."""
    return self.tokens[self.starts(js)[:, None] + np.arange(self.seq_len + 1)]


class _TrainBatch:
  """Global step -> this process's rows of global batch `step`."""

  def __init__(self, shards: list[_ShardWindows], rows_per_shard: int):
    self.shards, self.rows_per_shard = shards, rows_per_shard

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    js = step * self.rows_per_shard + np.arange(self.rows_per_shard, dtype=np.int64)
    windows = np.concatenate([shard.windows(js) for shard in self.shards])
    return {'inputs': windows[:, :-1], 'targets': windows[:, 1:],
            'weights': np.ones(windows[:, 1:].shape, np.float32)}


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count}).')


def train_batches(*, name: str, data_dir: str, split: str, text_key: str, tokenizer: Tokenizer, seq_len: int,
                  global_batch: int, num_shards: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Item s is this process's rows of global batch s (see module docstring), as
  {'inputs', 'targets': int32 [global_batch // process_count, seq_len], 'weights': float32 [same]}.

  Loads (reads and tokenizes) only this process's shards, now; the returned dataset is endless (2**40 steps).
  """
  if seq_len < 1:
    raise ValueError(f'seq_len={seq_len} must be positive.')
  if num_shards < 1 or global_batch % num_shards:
    raise ValueError(f'global_batch={global_batch} must be a positive multiple of num_shards={num_shards}: each '
                     f'shard fills an equal group of rows of every global batch.')
  if num_shards % process_count:
    raise ValueError(f'num_shards={num_shards} must be divisible by process_count={process_count}: each process '
                     f'reads whole shards, the same number each.')
  _check_process(process_index, process_count)

  source = _data_source(name, data_dir, split)
  num_records = len(source)
  shards_per_process = num_shards // process_count
  shards = []
  for k in range(process_index * shards_per_process, (process_index + 1) * shards_per_process):
    start, stop = k * num_records // num_shards, (k + 1) * num_records // num_shards
    shard = _ShardWindows(_token_stream(source, start, stop, text_key, tokenizer),
                          seed=seed, shard=k, seq_len=seq_len)
    if shard.windows_per_epoch < 1:
      raise ValueError(
          f'Shard {k} of {num_shards} of {name}/{split} (records [{start}, {stop}) of {num_records}) has '
          f'{len(shard.tokens)} tokens: too short for one training window, which needs 2 * seq_len = {2 * seq_len} '
          f'tokens (seq_len + 1 plus a random start offset of up to seq_len - 1). Reduce num_shards or seq_len.')
    if global_batch // num_shards > shard.windows_per_epoch:
      raise ValueError(f'global_batch={global_batch} asks each of the {num_shards} shards for '
                       f'{global_batch // num_shards} windows a step, more than shard {k} of {name}/{split} holds '
                       f'({shard.windows_per_epoch}); lower the batch or seq_len.')
    shards.append(shard)
  return grain.MapDataset.range(2**40).map(_TrainBatch(shards, global_batch // num_shards))


def eval_batches(*, name: str, data_dir: str, split: str, text_key: str, tokenizer: Tokenizer, seq_len: int,
                 global_batch: int, process_index: int = 0, process_count: int = 1,
                 max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
  """The whole split in order, cut into windows, batched; this process's rows of each global batch.

  The split's token stream t[0..n) is cut so that window i has inputs t[i*L : i*L+L] and targets shifted by one:
  every token but the first is a target exactly once (sum of all weights = n - 1). Positions past the end and the
  rows that fill the last global batch hold `pad_id` with weight 0.
  """
  if global_batch % process_count:
    raise ValueError(f'global_batch={global_batch} must be divisible by process_count={process_count}.')
  _check_process(process_index, process_count)
  source = _data_source(name, data_dir, split)
  tokens = _token_stream(source, 0, len(source), text_key, tokenizer)
  num_targets = max(len(tokens) - 1, 0)
  num_windows = -(-num_targets // seq_len)
  num_batches = -(-num_windows // global_batch)
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  num_rows = num_batches * global_batch
  padded = np.full([num_rows * seq_len + 1], tokenizer.pad_id, np.int32)
  used = min(len(tokens), len(padded))
  padded[:used] = tokens[:used]
  starts = np.arange(num_rows)[:, None] * seq_len + np.arange(seq_len)
  inputs, targets = padded[starts], padded[starts + 1]
  weights = (starts + 1 < len(tokens)).astype(np.float32)

  rows = global_batch // process_count
  local = slice(process_index * rows, (process_index + 1) * rows)
  batches = []
  for b in range(num_batches):
    at = slice(b * global_batch, (b + 1) * global_batch)
    batches.append({'inputs': inputs[at][local], 'targets': targets[at][local], 'weights': weights[at][local]})
  return batches
