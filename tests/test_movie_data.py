"""movie_sentiment: the built splits against the ground-truth files parsed here with plain Python, not the builder."""

import html
import io
import itertools
import re
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from foundation.data import movie_sentiment

MOVIE_SPLITS = ('train', 'validation', 'test')
OOD_SPLITS = {'ood_tweets': 'tweets_GroundTruth.txt', 'ood_amazon': 'amazonReviewSnippets_GroundTruth.txt'}
# (negative, positive) per split of the fixed hash-ordered cut; a change here means the splits moved.
CLASS_COUNTS = {'train': (3844, 3724), 'validation': (508, 492), 'test': (974, 1026),
                'ood_tweets': (1299, 2897), 'ood_amazon': (1481, 2126)}


def raw_file(name):
  """{id: (rating, text)} of one ground-truth file, zeros included, straight from the nested archives."""
  with tarfile.open(movie_sentiment.sdist_dir() / movie_sentiment.SDIST_NAME) as outer:
    inner = outer.extractfile('vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz').read()
  with tarfile.open(fileobj=io.BytesIO(inner)) as archive:
    lines = archive.extractfile(f'hutto_ICWSM_2014/{name}').read().decode('utf-8').split('\r\n')
  rows = [line.split('\t') for line in lines]
  assert all(len(row) == 3 for row in rows)
  table = {row[0]: (float(row[1]), html.unescape(row[2]).strip()) for row in rows}
  assert len(table) == len(rows)  # ids are unique within a file
  return table


def words(text):
  """Same sentence up to case and punctuation (a text of punctuation only stays itself)."""
  return re.sub(r'[^0-9a-z]+', ' ', text.lower()).strip() or text


@pytest.fixture(scope='module')
def raw(tfds_dir):  # tfds_dir first: building the dataset fetches the archive
  return {'movie': raw_file('movieReviewSnippets_GroundTruth.txt')} | {
      split: raw_file(name) for split, name in OOD_SPLITS.items()}


@pytest.fixture(scope='module')
def built(tfds_dir):
  """{split: list of records} as a pipeline reads them."""
  splits = {}
  for split in (*MOVIE_SPLITS, *OOD_SPLITS):
    source = tfds.data_source('movie_sentiment', split=split, data_dir=tfds_dir)
    splits[split] = [{key: value.decode('utf-8') if isinstance(value, bytes) else value for key, value in r.items()}
                     for r in source.__getitems__(range(len(source)))]
  return splits


def test_raw_files_hold_the_snippets_the_paper_describes(raw):
  def signs(table):
    ratings = np.array([rating for rating, _ in table.values()])
    return len(ratings), int((ratings < 0).sum()), int((ratings > 0).sum()), int((ratings == 0).sum())
  assert signs(raw['movie']) == (10605, 5326, 5242, 37)
  assert signs(raw['ood_tweets']) == (4200, 1299, 2897, 4)
  assert signs(raw['ood_amazon']) == (3708, 1482, 2128, 98)


def test_every_record_is_its_raw_snippet_labelled_by_the_sign_of_its_rating(raw, built):
  for split, records in built.items():
    table = raw['movie' if split in MOVIE_SPLITS else split]
    for record in records:
      rating, text = table[record['id']]
      assert record['text'] == text
      assert record['rating'] == np.float32(rating) != 0
      assert record['label'] == int(rating > 0)
    labels = [record['label'] for record in records]
    independent = [int(table[record['id']][0] > 0) for record in records]
    assert (labels.count(0), labels.count(1)) == (independent.count(0), independent.count(1)) == CLASS_COUNTS[split]


def test_movie_splits_partition_the_nonzero_snippets_in_fixed_sizes(raw, built):
  sizes = {split: len(built[split]) for split in MOVIE_SPLITS}
  assert sizes == {'train': 7568, 'validation': movie_sentiment.VALIDATION_SIZE, 'test': movie_sentiment.TEST_SIZE}
  ids = [record['id'] for split in MOVIE_SPLITS for record in built[split]]
  assert sorted(ids) == sorted(i for i, (rating, _) in raw['movie'].items() if rating != 0)


def test_ood_splits_are_their_files_nonzero_snippets_minus_texts_seen_before(raw, built):
  seen = {words(text) for rating, text in raw['movie'].values() if rating}
  for split in OOD_SPLITS:
    expected = [i for i, (rating, text) in raw[split].items() if rating and words(text) not in seen]
    assert [record['id'] for record in built[split]] == expected  # file order
    seen |= {words(raw[split][i][1]) for i in expected}
  assert len(built['ood_tweets']) == 4196
  dropped = {i for i, (rating, _) in raw['ood_amazon'].items() if rating} - {r['id'] for r in built['ood_amazon']}
  assert dropped == {'34_6', '33_2', '297_9'}  # "don't waste your money." is a movie snippet, 'wow!'/'wow.' a tweet


def test_no_two_splits_share_a_text(built):
  for (a, records_a), (b, records_b) in itertools.combinations(built.items(), 2):
    assert not {words(r['text']) for r in records_a} & {words(r['text']) for r in records_b}, (a, b)
  # The movie file repeats two sentences (ids 10324/10341 and 10505/10559): each pair lands in one split.
  split_of = {r['id']: split for split in MOVIE_SPLITS for r in built[split]}
  assert split_of['10324'] == split_of['10341'] and split_of['10505'] == split_of['10559']


def test_a_corrupt_archive_or_a_failed_download_fails_with_the_fix(tmp_path, monkeypatch):
  monkeypatch.setenv(movie_sentiment.SDIST_DIR_ENV, str(tmp_path))
  monkeypatch.setattr(movie_sentiment, '_download_command', lambda d: [sys.executable, '-c', 'raise SystemExit(1)'])
  with pytest.raises(FileNotFoundError, match='python -m pip download --no-deps --no-binary :all: vaderSentiment'):
    movie_sentiment.sdist_path()
  assert list(tmp_path.iterdir()) == []  # no staging directory left behind
  (tmp_path / movie_sentiment.SDIST_NAME).write_bytes(b'not the archive')
  with pytest.raises(ValueError, match='delete it to fetch it again'):
    movie_sentiment.sdist_path()
