"""Data: byte tokenizer, the Shakespeare builder, and the LM pipeline against naive numpy references."""

import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from foundation.data import prepare
from foundation.data import shakespeare
from foundation.data import text
from foundation.data import tokenizers

TOKENIZER = tokenizers.ByteTokenizer()
ALPHABET = list('abcdefghij klmnop\n.,') + ['é', '✓', '𝄞']


def _documents():
  rng = np.random.default_rng(0)
  return [''.join(rng.choice(ALPHABET, size=rng.integers(20, 200))) for _ in range(40)]


DOCUMENTS = {'train': _documents(), 'validation': _documents()[:7]}


class TinyTextCorpus(tfds.core.GeneratorBasedBuilder):
  """Known strings, stored in generation order."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(docs) for split, docs in DOCUMENTS.items()}

  def _generate_examples(self, docs):
    for i, doc in enumerate(docs):
      yield i, {'text': doc}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  TinyTextCorpus(data_dir=path, file_format='array_record').download_and_prepare()
  return path


def naive_stream(docs):
  ids = []
  for doc in docs:
    ids += list(doc.encode('utf-8')) + [TOKENIZER.eos_id]
  return np.array(ids)


def train(data_dir, **overrides):
  kwargs = dict(name='tiny_text_corpus', data_dir=data_dir, split='train', text_key='text', tokenizer=TOKENIZER,
                seq_len=8, global_batch=8, num_shards=4, seed=3)
  return text.train_batches(**(kwargs | overrides))


def evaluate(data_dir, **overrides):
  kwargs = dict(name='tiny_text_corpus', data_dir=data_dir, split='validation', text_key='text', tokenizer=TOKENIZER,
                seq_len=8, global_batch=4)
  return text.eval_batches(**(kwargs | overrides))


# Tokenizer.

def test_byte_tokenizer_round_trips_unicode():
  s = 'héllo, wörld ✓ 𝄞\n— end'
  ids = TOKENIZER.encode(s)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, list(s.encode('utf-8')))
  assert TOKENIZER.decode(ids) == s
  specials = [TOKENIZER.bos_id, *ids[:3], TOKENIZER.pad_id, *ids[3:], TOKENIZER.eos_id]
  assert TOKENIZER.decode(specials) == s
  assert TOKENIZER.decode(ids[:-5]).endswith('\ufffd')  # cut inside a 3-byte character
  assert (TOKENIZER.pad_id, TOKENIZER.bos_id, TOKENIZER.eos_id, TOKENIZER.vocab_size) == (256, 257, 258, 259)
  np.testing.assert_array_equal(TOKENIZER.byte_lengths()[specials], [0, 1, 1, 1, 0, *[1] * (len(ids) - 3), 1])


def test_get_tokenizer():
  assert isinstance(tokenizers.get_tokenizer('byte'), tokenizers.ByteTokenizer)
  with pytest.raises(ValueError, match="valid choices: \\['byte'\\]"):
    tokenizers.get_tokenizer('bpe')


# Training batches.

def reference_window_start(stream_len, *, seed, shard, j, seq_len):
  """The spec, written out: epochs of shuffled non-overlapping windows at a random offset in [0, seq_len)."""
  per_epoch = (stream_len - seq_len + 1) // (seq_len + 1)
  epoch, i = divmod(j, per_epoch)
  rng = np.random.default_rng([seed, shard, epoch])
  offset = rng.integers(seq_len)
  return offset + rng.permutation(per_epoch)[i] * (seq_len + 1)


def test_train_windows_are_slices_of_each_shards_stream(data_dir):
  docs, seq_len, num_shards, global_batch, seed = DOCUMENTS['train'], 8, 4, 8, 3
  ds = train(data_dir)
  rows = global_batch // num_shards
  n = len(docs)
  streams = [naive_stream(docs[k * n // num_shards:(k + 1) * n // num_shards]) for k in range(num_shards)]
  per_epoch = [(len(s) - seq_len + 1) // (seq_len + 1) for s in streams]
  steps = 2 * max(per_epoch) // rows + 1  # more than two epochs of every shard
  starts = [[] for _ in range(num_shards)]
  for step in range(steps):
    batch = ds[step]
    assert batch['inputs'].shape == batch['targets'].shape == batch['weights'].shape == (global_batch, seq_len)
    assert batch['inputs'].dtype == batch['targets'].dtype == np.int32 and batch['weights'].dtype == np.float32
    np.testing.assert_array_equal(batch['targets'][:, :-1], batch['inputs'][:, 1:])
    np.testing.assert_array_equal(batch['weights'], 1.0)
    windows = np.concatenate([batch['inputs'], batch['targets'][:, -1:]], axis=1)
    for k in range(num_shards):
      for r in range(rows):
        start = reference_window_start(len(streams[k]), seed=seed, shard=k, j=step * rows + r, seq_len=seq_len)
        np.testing.assert_array_equal(windows[k * rows + r], streams[k][start:start + seq_len + 1])
        starts[k].append(start)
  for k in range(num_shards):  # each epoch visits every window of one tiling exactly once; tilings differ
    m = per_epoch[k]
    epochs = [np.sort(starts[k][e * m:(e + 1) * m]) for e in range(2)]
    for epoch_starts in epochs:
      np.testing.assert_array_equal(epoch_starts, epoch_starts[0] + (seq_len + 1) * np.arange(m))
      assert 0 <= epoch_starts[0] < seq_len
  assert len({tuple(starts[k][:per_epoch[k]]) for k in range(num_shards)}) == num_shards


def test_train_rows_do_not_depend_on_process_count_and_processes_read_only_their_shards(data_dir, monkeypatch):
  single = train(data_dir, num_shards=8, global_batch=16)
  reads = []
  token_stream = text._token_stream
  monkeypatch.setattr(text, '_token_stream', lambda source, start, stop, *a: (
      reads.append((start, stop)), token_stream(source, start, stop, *a))[1])
  n = len(DOCUMENTS['train'])
  for process_count in (2, 4):
    parts = []
    for p in range(process_count):
      reads.clear()
      parts.append(train(data_dir, num_shards=8, global_batch=16, process_index=p, process_count=process_count))
      shards = range(p * 8 // process_count, (p + 1) * 8 // process_count)
      assert reads == [(k * n // 8, (k + 1) * n // 8) for k in shards]
    for step in (0, 1, 7, 100, 12345):
      for key, value in single[step].items():
        np.testing.assert_array_equal(np.concatenate([part[step][key] for part in parts]), value)


def test_train_iterator_resumes_exactly_from_its_json_state(data_dir):
  ds = train(data_dir)
  options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=3)
  uninterrupted = iter(ds.to_iter_dataset(options))
  expected = [next(uninterrupted) for _ in range(12)]
  first = iter(ds.to_iter_dataset(options))
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  resumed = iter(ds.to_iter_dataset(options))
  resumed.set_state(state)
  for step in range(5, 12):
    got = next(resumed)
    for key in expected[step]:
      np.testing.assert_array_equal(got[key], expected[step][key])
      np.testing.assert_array_equal(got[key], ds[step][key])


# Evaluation batches.

def test_eval_batches_predict_every_token_of_the_split_once(data_dir):
  stream = naive_stream(DOCUMENTS['validation'])
  seq_len, global_batch = 8, 4
  batches = evaluate(data_dir)
  num_windows = -(-(len(stream) - 1) // seq_len)
  assert len(batches) == -(-num_windows // global_batch)
  assert num_windows % global_batch  # so the last batch has filler rows
  for batch in batches:
    assert batch['inputs'].shape == batch['targets'].shape == batch['weights'].shape == (global_batch, seq_len)
  weights = np.concatenate([b['weights'] for b in batches]).reshape(-1)
  inputs = np.concatenate([b['inputs'] for b in batches]).reshape(-1)
  targets = np.concatenate([b['targets'] for b in batches]).reshape(-1)
  assert weights.sum() == len(stream) - 1
  np.testing.assert_array_equal(weights, np.arange(len(weights)) < len(stream) - 1)
  np.testing.assert_array_equal(targets[weights == 1], stream[1:])
  np.testing.assert_array_equal(inputs[weights == 1], stream[:-1])
  assert (batches[-1]['weights'][-1] == 0).all()

  parts = [evaluate(data_dir, process_index=p, process_count=2) for p in range(2)]
  for b, batch in enumerate(batches):
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([parts[0][b][key], parts[1][b][key]]), batch[key])
  limited = evaluate(data_dir, max_batches=2)
  assert len(limited) == 2
  np.testing.assert_array_equal(limited[1]['targets'], batches[1]['targets'])


# Errors.

def test_missing_dataset_or_split_names_the_prepare_command(tmp_path, data_dir):
  with pytest.raises(FileNotFoundError, match=f'python -m foundation.data.prepare not_here --data_dir={tmp_path}'):
    text.check_prepared('not_here', str(tmp_path), ['train'])
  with pytest.raises(FileNotFoundError, match='python -m foundation.data.prepare tiny_text_corpus'):
    train(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"no split\(s\) \['test'\]"):
    text.check_prepared('tiny_text_corpus', data_dir, ['train[:50%]+test'])
  text.check_prepared('tiny_text_corpus', data_dir, ['train[:50%]+validation'])


def test_a_tfrecord_build_is_refused_with_a_way_out(tmp_path):
  """TFDS builds tfrecord by default, and will not build array_record into the same directory: the read check and
  the prepare command each say to move that build aside, and the prepare command does not fail with a traceback."""
  built = TinyTextCorpus(data_dir=str(tmp_path), file_format='array_record')
  built.download_and_prepare()
  info = os.path.join(built.data_dir, 'dataset_info.json')  # marked as a tfrecord build (writing one needs TF)
  with open(info) as f:
    fields = json.load(f)
  with open(info, 'w') as f:
    json.dump({**fields, 'fileFormat': 'tfrecord'}, f)
  with pytest.raises(FileNotFoundError, match=r"stored as tfrecord, but .* array_record\. Move .*tiny_text_corpus"):
    text.check_prepared('tiny_text_corpus', str(tmp_path), ['train'])
  with pytest.raises(SystemExit, match=r'stored as tfrecord \(.*tiny_text_corpus.*\).*move that directory aside'):
    prepare.main(['tiny_text_corpus', f'--data_dir={tmp_path}'])


def test_bad_batch_shard_and_process_counts_are_clear_errors(data_dir):
  with pytest.raises(ValueError, match='global_batch=6 must be a positive multiple of num_shards=4'):
    train(data_dir, global_batch=6)
  with pytest.raises(ValueError, match='num_shards=4 must be divisible by process_count=3'):
    train(data_dir, process_count=3)
  with pytest.raises(ValueError, match='too short for one training window.*Reduce num_shards or seq_len'):
    train(data_dir, seq_len=1000)


def test_importing_the_pipeline_does_not_import_tensorflow_or_tfds():
  code = 'import sys, foundation.data.text; print(sorted({"tensorflow", "tensorflow_datasets"} & set(sys.modules)))'
  assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout == '[]\n'


# Shakespeare.

def test_strip_markdown():
  markdown = ('# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post. Enter to him\nBERNARDO_\n\n'
              '**BERNARDO**  \nWho\'s there?  \nStand\\--ho!\n\n\n**FRANCISCO**  \n__\\[Aside]_  \nNay, answer me.\n')
  assert shakespeare.strip_markdown(markdown) == (
      "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nFRANCISCO at his post. Enter to him\nBERNARDO\n\n"
      "BERNARDO:\nWho's there?\nStand--ho!\n\nFRANCISCO:\n[Aside]\nNay, answer me.\n")


def test_shakespeare_builder_splits_the_corpus_at_90_percent(tmp_path):
  plays = shakespeare.load_plays()
  corpus = ''.join(play_text for _, play_text in plays)
  assert len(plays) == 38 and [name for name, _ in plays] == sorted(name for name, _ in plays)
  assert not set('#*_\\') & set(corpus) and '  \n' not in corpus
  stats = prepare.prepare('shakespeare_plays', str(tmp_path))
  read = {split: [tfds.data_source('shakespeare_plays', split=split, data_dir=str(tmp_path))[i]
                  for i in range(stats[split]['examples'])] for split in ('train', 'validation')}
  texts = {split: [r['text'].decode('utf-8') for r in records] for split, records in read.items()}
  names = {split: [r['play'].decode('utf-8') for r in records] for split, records in read.items()}
  assert ''.join(texts['train'] + texts['validation']) == corpus
  cut = int(0.9 * len(corpus))
  assert sum(map(len, texts['train'])) == cut
  # One example per play; only the play containing the cut is in both splits.
  start_of_play = np.cumsum([0] + [len(t) for _, t in plays])
  straddling = [name for (name, _), lo, hi in zip(plays, start_of_play, start_of_play[1:]) if lo < cut < hi]
  assert len(straddling) == 1
  assert names['train'][-1] == names['validation'][0] == straddling[0]
  assert names['train'] + names['validation'][1:] == [name for name, _ in plays]
  assert stats['train']['text_characters'] == cut
  assert prepare.prepare('shakespeare_plays', str(tmp_path)) == stats  # a second call is a no-op
