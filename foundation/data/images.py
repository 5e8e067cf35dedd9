"""Image-classification / image-text input pipeline over any TFDS dataset with an image and a class label, read with
`tfds.data_source` + grain.

Training batches are a pure function of the global step, identical whatever the number of processes:

  * global example position g (row r of global batch s is g = s * global_batch + r) is example
    order_e[g % n] of the split, epoch e = g // n, order_e = np.random.default_rng([seed, e]).permutation(n);
  * process p owns rows [p * lb, (p + 1) * lb) of every global batch (lb = global_batch // process_count) and reads
    only those records (random access into the array_record files);
  * each row carries its global position as 'index', which keys its on-device augmentation (see augment.py), and,
    when captions are given, one caption of its class chosen by a hash of (seed, g).

So `train_batches(...)` is a grain MapDataset indexed by step: `to_iter_dataset()` prefetches in the background and
its iterator's `get_state()` (a small JSON-able dict) resumes exactly.

Images stay uint8 on the host ([H, W, C]; a Tensor feature without a channel axis gets one); augment.py turns them
into floats on the accelerator.
"""

from __future__ import annotations

import functools
from typing import Sequence

import grain
import numpy as np

from foundation.data.text import Tokenizer
from foundation.data.text import check_prepared

_READ_CHUNK = 1024  # records fetched per data-source call by _read_split


def _data_source(name: str, data_dir: str, split: str, raw: bool = False):
  """The split's records, decoded by TFDS; with `raw`, their serialised bytes (see _Reader)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (keeps importing this module light)
  check_prepared(name, data_dir, [split])
  method = tfds.decode.DeserializeMethod.RAW_BYTES if raw else tfds.decode.DeserializeMethod.DESERIALIZE_AND_DECODE
  return tfds.data_source(name, split=split, data_dir=data_dir, deserialize_method=method)


def num_examples(name: str, data_dir: str, split: str) -> int:
  return len(_data_source(name, data_dir, split))


def class_names(name: str, data_dir: str, label_key: str = 'label', classes: Sequence[int] = ()) -> list[str]:
  """The names of the ClassLabel feature `label_key` of prepared dataset `name`; with `classes` (a class filter,
  see check_classes), the names of those classes in that order: the new label i is classes[i]."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  check_prepared(name, data_dir, [])
  feature = tfds.builder(name, data_dir=data_dir).info.features[label_key]
  if not isinstance(feature, tfds.features.ClassLabel):
    raise ValueError(f'{name}[{label_key!r}] is a {type(feature).__name__}, not a ClassLabel.')
  names = list(feature.names)
  return [names[c] for c in check_classes(classes, len(names))] if classes else names


def check_classes(classes: Sequence[int], num_classes: int) -> tuple[int, ...]:
  """A class filter (config.data.classes): distinct class ids of the dataset, at least two; () keeps every class.
  The filtered data keep only those classes' records, relabelled by position: classes[i] becomes label i."""
  classes = tuple(classes)
  if classes and (len(set(classes)) != len(classes) or len(classes) < 2
                  or not all(isinstance(c, int) and 0 <= c < num_classes for c in classes)):
    raise ValueError(f'config.data.classes={classes} must be at least two distinct class ids in [0, {num_classes}), '
                     'e.g. --config.data.classes="(5, 6, 7, 8, 9)"; () keeps every class.')
  return classes


def _label_map(classes: Sequence[int]) -> np.ndarray | None:
  """old label -> new label (-1 for a class filtered out); None without a filter."""
  if not classes:
    return None
  table = np.full(max(classes) + 1, -1, np.int32)
  table[list(classes)] = np.arange(len(classes), dtype=np.int32)
  return table


def relabel(labels: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(positions of the records whose label is in `classes`, their new labels); every record without a filter."""
  table = _label_map(classes)
  if table is None:
    return np.arange(len(labels)), labels
  new = np.where(labels < len(table), table[np.minimum(labels, len(table) - 1)], -1)
  keep = np.flatnonzero(new >= 0)
  return keep, new[keep].astype(np.int32)


@functools.lru_cache(maxsize=8)
def split_labels(name: str, data_dir: str, split: str, label_key: str = 'label') -> np.ndarray:
  """int32 [N], read-only: every record's label, in stored order. Read once per process."""
  labels, = _read_split(name, data_dir, split, (label_key,))
  labels = labels.astype(np.int32)
  labels.setflags(write=False)
  return labels


def few_shot_subset(labels: np.ndarray, shots_per_class: int, seed: int, class_ids: Sequence[int]) -> np.ndarray:
  """Sorted positions of `shots_per_class` records of each class of `class_ids` in `labels` (0: all records); a
  class with fewer records (none, in a cut-down split) is an error. Class c's records are ordered by
  np.random.default_rng([seed, c]) and the first `shots_per_class` taken, so the draw depends on the seed alone
  (not on the run), and the subsets of one seed nest: the 1-shot set is inside the 10-shot set."""
  if shots_per_class < 0:
    raise ValueError(f'config.data.shots_per_class={shots_per_class} must be >= 0 (0: every training example).')
  if shots_per_class == 0:
    return np.arange(len(labels))
  if seed < 0:
    raise ValueError(f'config.seed={seed} draws the few-shot examples and must be >= 0.')
  chosen = []
  for c in class_ids:
    ids = np.flatnonzero(labels == c)
    if len(ids) < shots_per_class:
      raise ValueError(f'config.data.shots_per_class={shots_per_class}, but class {c} has only {len(ids)} training '
                       'examples; ' + ('lower it.' if len(ids) else 'train on a split that has every class.'))
    chosen.append(ids[np.random.default_rng([seed, int(c)]).permutation(len(ids))[:shots_per_class]])
  return np.sort(np.concatenate(chosen))


def training_records(*, name: str, data_dir: str, split: str, classes: Sequence[int] = (), shots_per_class: int = 0,
                     seed: int = 0, label_key: str = 'label') -> np.ndarray | None:
  """The record ids a run trains on under a class filter and a label budget (None: all of the split): the records
  of `classes`, then `shots_per_class` of each, drawn by `seed` (few_shot_subset) and keyed by the dataset's own
  class ids, so a class filter keeps the draw of each of its classes. The filter is checked (check_classes)."""
  if not classes and not shots_per_class:
    return None
  num_classes = len(class_names(name, data_dir, label_key))
  if classes:
    check_classes(classes, num_classes)
  labels = split_labels(name, data_dir, split, label_key)
  keep, _ = relabel(labels, classes)
  # Drawn by the dataset's class ids, each class of the task's.
  return keep[few_shot_subset(labels[keep], shots_per_class, seed, classes or range(num_classes))]


def check_image_shape(name: str, data_dir: str, image_shape, image_key: str = 'image') -> tuple[int, int, int]:
  """config.data.image_shape against the dataset's own (height, width, channels): a model built for another shape
  would fail only when the first batch reaches it. An image stored without a channel axis has one, as the batches
  give it (`_channels`)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  shape = tuple(tfds.builder(name, data_dir=data_dir).info.features[image_key].shape)
  shape = shape + (1,) if len(shape) == 2 else shape
  if tuple(image_shape) != shape:
    raise ValueError(f'config.data.image_shape={tuple(image_shape)!r} but {name} holds images of shape {shape}; '
                     f'set --config.data.image_shape="{shape}".')
  return shape


def _num_classes(name: str, data_dir: str, label_key: str) -> int | None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  feature = tfds.builder(name, data_dir=data_dir).info.features[label_key]
  return feature.num_classes if isinstance(feature, tfds.features.ClassLabel) else None


class _Reader:
  """Features `keys` of a split's records, read by record id and stacked per feature.

  When every one of them is stored as a plain list of integers (a ClassLabel; an integer Tensor of a fixed shape
  without encoding, as this codebase's builders store images), the serialised tf.train.Examples are parsed here and
  TFDS's per-record conversion to numpy is skipped: Fashion-MNIST's 60,000 training records take ~3 s instead of
  ~9 s. Anything else (an encoded Image, a string) is decoded by TFDS."""

  def __init__(self, name: str, data_dir: str, split: str, keys: Sequence[str]):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    check_prepared(name, data_dir, [split])
    features = tfds.builder(name, data_dir=data_dir).info.features
    self.stored = {key: features[key].get_serialized_info() for key in keys}
    self.raw = all(isinstance(info, tfds.features.TensorInfo) and np.issubdtype(info.np_dtype, np.integer)
                   and info.np_dtype != np.uint64  # stored bit-cast to int64
                   and None not in info.shape and not info.optional for info in self.stored.values())
    self.source = _data_source(name, data_dir, split, self.raw)

  def __len__(self) -> int:
    return len(self.source)

  def __call__(self, ids: Sequence[int]) -> list[np.ndarray]:
    records = self.source.__getitems__(list(ids))
    if not self.raw:
      return [np.stack([np.asarray(record[key]) for record in records]) for key in self.stored]
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
    records = [tf_example_pb2.Example.FromString(record).features.feature for record in records]
    return [np.array([record[key].int64_list.value for record in records], info.np_dtype).reshape(
        len(records), *info.shape) for key, info in self.stored.items()]


def _channels(images: np.ndarray, image_key: str) -> np.ndarray:
  if images.dtype != np.uint8:
    raise ValueError(f'Feature {image_key!r} holds {images.dtype} images; this pipeline expects uint8.')
  return images[..., None] if images.ndim == 3 else images  # [N, H, W] -> [N, H, W, 1]


def _read_split(name: str, data_dir: str, split: str, keys: Sequence[str], n: int | None = None
                ) -> list[np.ndarray]:
  """Features `keys` of the first `n` records of `split` (all: None), each stacked over the records in stored order
  (see _Reader)."""
  reader = _Reader(name, data_dir, split, keys)
  if not len(reader) or n is not None and n < 1:
    raise ValueError(f'{name}/{split} in {data_dir} has no examples to load (max_examples={n}).')
  n = len(reader) if n is None else min(n, len(reader))
  chunks = [reader(range(start, min(n, start + _READ_CHUNK))) for start in range(0, n, _READ_CHUNK)]
  return [np.concatenate(column) for column in zip(*chunks)]


def load_split(*, name: str, data_dir: str, split: str, image_key: str = 'image', label_key: str = 'label',
               max_examples: int | None = None, classes: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
  """The first `max_examples` (all by default) records of `split` in stored order: (images uint8 [N, H, W, C],
  labels int32 [N]); with a class filter, those of them whose class is in `classes`, relabelled (check_classes).
  Everything is held in host memory: for probes and evaluation on small sets. The arrays are the caller's own."""
  images, labels = _decoded_split(name, data_dir, split, image_key, label_key, max_examples)
  keep, labels = relabel(labels, classes)
  return images[keep], labels.copy()


@functools.lru_cache(maxsize=4)
def _decoded_split(name: str, data_dir: str, split: str, image_key: str, label_key: str,
                   max_examples: int | None) -> tuple[np.ndarray, np.ndarray]:
  """load_split's records, read once per process and read-only: Fashion-MNIST's 60,000 take seconds, and a run can
  read a split several times (a distillation's transfer set and its evaluation, a probe)."""
  images, labels = _read_split(name, data_dir, split, (image_key, label_key), max_examples)
  images, labels = _channels(images, image_key), labels.astype(np.int32)
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def caption_hash(seed: int, positions: np.ndarray) -> np.ndarray:
  """uint64 hash of (seed, global position): splitmix64's finalizer over both; a pure, vectorised function."""
  with np.errstate(over='ignore'):
    x = np.asarray(positions, np.uint64) + np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15)
    for _ in range(2):  # two rounds so that nearby (seed, position) pairs decorrelate
      x = x + np.uint64(0x9E3779B97F4A7C15)
      x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
      x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
      x = x ^ (x >> np.uint64(31))
  return x


def tokenize_captions(captions: Sequence[Sequence[str]], tokenizer: Tokenizer, text_len: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens int32 [num_classes, max_captions, text_len], mask float32 [same], counts int32 [num_classes]): caption j
  of class c is its tokenizer ids truncated to text_len, then eos if it fits, then pad_id (mask 0)."""
  if text_len < 1:
    raise ValueError(f'text_len={text_len} must be positive when captions are given.')
  if not captions or any(not class_captions for class_captions in captions):
    raise ValueError('Every class needs at least one caption.')
  counts = np.array([len(class_captions) for class_captions in captions], np.int32)
  tokens = np.full([len(captions), counts.max(), text_len], tokenizer.pad_id, np.int32)
  mask = np.zeros(tokens.shape, np.float32)
  for c, class_captions in enumerate(captions):
    for j, caption in enumerate(class_captions):
      ids = np.concatenate([np.asarray(tokenizer.encode(caption), np.int32)[:text_len],
                            np.array([tokenizer.eos_id], np.int32)])[:text_len]
      tokens[c, j, :len(ids)] = ids
      mask[c, j, :len(ids)] = 1
  return tokens, mask, counts


class _TrainBatch:
  """Global step -> this process's rows of global batch `step`."""

  def __init__(self, reader: _Reader, *, seed: int, global_batch: int, first_row: int, rows: int, image_key: str,
               captions: tuple[np.ndarray, np.ndarray, np.ndarray] | None, subset: np.ndarray | None,
               label_map: np.ndarray | None):
    self.reader, self.seed, self.global_batch, self.first_row, self.rows = reader, seed, global_batch, first_row, rows
    self.image_key = image_key
    self.captions = captions
    self.subset, self.label_map = subset, label_map
    self.num_records = len(reader) if subset is None else len(subset)
    self._order = functools.lru_cache(maxsize=2)(self._order_uncached)

  def _order_uncached(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_records)

  def records(self, positions: np.ndarray) -> np.ndarray:
    """Record ids at global example positions."""
    epochs, offsets = np.divmod(positions, self.num_records)
    ids = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs):
      at = epochs == epoch
      ids[at] = self._order(int(epoch))[offsets[at]]
    return ids if self.subset is None else self.subset[ids]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    positions = step * self.global_batch + self.first_row + np.arange(self.rows, dtype=np.int64)
    images, labels = self.reader(self.records(positions).tolist())
    labels = labels.astype(np.int32) if self.label_map is None else self.label_map[labels]
    batch = {'image': _channels(images, self.image_key), 'label': labels,
             # int32 wraps after 2**31 examples; it only keys augmentation, so a wrap merely repeats keys.
             'index': positions.astype(np.int32)}
    if self.captions is not None:
      tokens, mask, counts = self.captions
      if labels.min() < 0 or labels.max() >= len(counts):
        raise ValueError(f'Label {labels.max()} has no captions: captions cover {len(counts)} classes.')
      choice = (caption_hash(self.seed, positions) % counts[labels].astype(np.uint64)).astype(np.int64)
      batch['text'], batch['text_mask'] = tokens[labels, choice], mask[labels, choice]
    return batch


def train_batches(*, name: str, data_dir: str, split: str, image_key: str = 'image', label_key: str = 'label',
                  global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                  captions: Sequence[Sequence[str]] | None = None, tokenizer: Tokenizer | None = None,
                  text_len: int = 0, subset: np.ndarray | None = None, classes: Sequence[int] = ()
                  ) -> grain.MapDataset:
  """Item s is this process's rows of global batch s (see module docstring), lb = global_batch // process_count:
  {'image': uint8 [lb, H, W, C], 'label': int32 [lb], 'index': int32 [lb] (global example positions)} and, when
  `captions` (one list of strings per class) is given, 'text': int32 [lb, text_len] (tokenizer ids of one caption of
  the example's class: truncated to text_len, eos appended when it fits, then pad_id) and 'text_mask': float32
  [lb, text_len] (1 on ids and eos, 0 on padding).

  With `subset` (record ids, e.g. from `class_balanced_subset` or `training_records`), the epochs run over those
  records only; with `classes` (a class filter: `subset` must then hold only records of those classes, as
  `training_records` gives), labels are relabelled, classes[i] -> i.
  Records are read when an item is asked for; the returned dataset is endless (2**40 steps).
  """
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f'global_batch={global_batch} must be a positive multiple of process_count={process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count}).')
  reader = _Reader(name, data_dir, split, (image_key, label_key))
  caption_table = None
  if captions is not None:
    if tokenizer is None:
      raise ValueError('captions need a tokenizer (and text_len).')
    num_classes = _num_classes(name, data_dir, label_key)
    num_classes = len(classes) if classes else num_classes
    if num_classes is not None and num_classes != len(captions):
      raise ValueError(f'captions cover {len(captions)} classes but {name}[{label_key!r}] has {num_classes}.')
    caption_table = tokenize_captions(captions, tokenizer, text_len)
  if len(reader) < 1:
    raise ValueError(f'{name}/{split} in {data_dir} has no examples.')
  if classes and subset is None:
    raise ValueError('a class filter needs the records of those classes as `subset` (images.training_records).')
  available = len(reader) if subset is None else len(subset)
  if global_batch > available:
    raise ValueError(f'config.global_batch_size={global_batch} is larger than the {available} training examples of '
                     f'{name}/{split}{" in the class filter and label budget" if subset is not None else ""}: lower '
                     f'it to at most {available}.')
  rows = global_batch // process_count
  return grain.MapDataset.range(2**40).map(_TrainBatch(
      reader, seed=seed, global_batch=global_batch, first_row=process_index * rows, rows=rows, image_key=image_key,
      captions=caption_table, subset=None if subset is None else np.asarray(subset, np.int64),
      label_map=_label_map(classes)))


def class_balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Sorted record ids of a class-balanced `fraction` of a split whose labels are `labels`: round(fraction * N)
  // num_classes records of every class, drawn without replacement by `seed` alone (so every run that names the same
  fraction and seed trains on the same examples, whatever its own seed)."""
  check_fraction(fraction, len(labels), len(np.unique(labels)))
  if fraction == 1:
    return np.arange(len(labels))
  classes = np.unique(labels)
  per_class = int(round(fraction * len(labels))) // len(classes)
  counts = np.bincount(labels)[classes]
  if per_class < 1 or per_class > counts.min():
    raise ValueError(f'train_fraction={fraction} gives {per_class} examples per class, but the rarest class has '
                     f'{counts.min()} and every class needs at least 1; choose another fraction.')
  rng = np.random.default_rng(seed)
  return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]))


def check_fraction(fraction: float, num_records: int, num_classes: int) -> None:
  """A train_fraction that leaves every class at least one example (checked before the labels are read)."""
  if not 0 < fraction <= 1:
    raise ValueError(f'train_fraction={fraction} must be in (0, 1].')
  if fraction < 1 and int(round(fraction * num_records)) // num_classes < 1:
    raise ValueError(f'train_fraction={fraction} of {num_records} examples leaves no example of some of the '
                     f'{num_classes} classes; choose a larger fraction.')
