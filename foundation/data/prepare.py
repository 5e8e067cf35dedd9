"""Builds a TFDS dataset as array_record into a data dir, so pipelines can read it with `tfds.data_source`.

  python -m foundation.data.prepare shakespeare_plays [fashion_mnist_offline ...] --data_dir=DIR

Any TFDS name works (`mnist`, `c4/en:3.0.1`, ...) where its builder can run here; the offline corpora of this
codebase are registered below. Building an already built dataset only prints its statistics.
"""

from __future__ import annotations

import argparse
import importlib
import time

# Builders of this codebase, by TFDS name -> module that registers them (imported only when asked for).
FOUNDATION_BUILDERS = {
    'shakespeare_plays': 'foundation.data.shakespeare',
    'fashion_mnist_offline': 'foundation.data.fashion_mnist',
    'movie_sentiment': 'foundation.data.movie_sentiment',
    'mnist5k': 'foundation.data.digits',
    'sklearn_digits': 'foundation.data.digits',
}

_MAX_EXAMPLES_TO_COUNT_CHARACTERS = 100_000


def builder(name: str, data_dir: str):
  """The array_record builder of `name` in `data_dir`. A build there in another format (TFDS's default, tfrecord)
  is refused with one line: TFDS will not build a second format into the same directory."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  base_name = name.split(':')[0].split('/')[0]
  if base_name in FOUNDATION_BUILDERS:
    importlib.import_module(FOUNDATION_BUILDERS[base_name])
  existing = tfds.builder(name, data_dir=data_dir)
  if existing.is_prepared() and existing.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise SystemExit(f'error: {name} in {data_dir} is stored as {existing.info.file_format.value} '
                     f'({existing.data_dir}), and this codebase reads array_record: move that directory aside, or '
                     'name another --data_dir, and run this command again.')
  return tfds.builder(name, data_dir=data_dir, file_format='array_record')


def prepare(name: str, data_dir: str) -> dict[str, dict[str, int]]:
  """Builds `name` into `data_dir` unless built; prints and returns {split: {'examples': n, 'characters': c}}."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  b = builder(name, data_dir)
  if b.is_prepared():
    print(f'{name} is already prepared in {b.data_dir}; nothing to do.')
  else:
    start = time.time()
    b.download_and_prepare()
    print(f'Prepared {name} in {time.time() - start:.1f} s into {b.data_dir}')
  text_keys = [key for key, feature in b.info.features.items() if isinstance(feature, tfds.features.Text)]
  stats = {}
  for split, info in sorted(b.info.splits.items()):
    stats[split] = {'examples': info.num_examples}
    line = f'  {split}: {info.num_examples} examples'
    if text_keys and info.num_examples <= _MAX_EXAMPLES_TO_COUNT_CHARACTERS:
      source = tfds.data_source(name, split=split, data_dir=data_dir)
      for key in text_keys:
        chars = sum(len(source[i][key].decode('utf-8')) for i in range(len(source)))
        stats[split][f'{key}_characters'] = chars
        line += f', {chars} characters of {key!r}'
    print(line)
  return stats


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('names', nargs='+', help='TFDS dataset names, e.g. shakespeare_plays')
  parser.add_argument('--data_dir', required=True, help='where TFDS datasets live (local dir or gs://...)')
  args = parser.parse_args(argv)
  for name in args.names:
    prepare(name, args.data_dir)


if __name__ == '__main__':
  main()
