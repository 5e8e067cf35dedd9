"""Synthetic captions for class-labelled images: prompt templates, plus WordNet glosses where WordNet is installed.

No package here carries real image-caption pairs, so a class-labelled image is captioned with one of its class's
captions: templates ("a black and white photo of a sandal.") and, from the Debian package `wordnet-base`, a
definition ("a sandal: a shoe consisting of a sole fastened by straps to the foot."). Zero-shot classification
embeds other templates (held out, ensembled), none of them a training caption: with captions made from class names,
"zero-shot" here means naming a class in a phrasing the text tower never saw paired with an image, not recognising
a concept never named in training.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Sequence

WORDNET_DIR = '/usr/share/wordnet'

# `{a}` is the class name with its article ('an ankle boot'), `{name}` the bare name.
TEMPLATES = (  # training captions
    'a photo of {a}.',
    'a black and white photo of {a}.',
    'a low resolution photo of {a}.',
    '{a} on a plain background.',
    'a blurry photo of {a}.',
)
ZERO_SHOT_TEMPLATES = (  # classification only, never a training caption
    'a close-up photo of {a}.',
    'a grayscale picture of {a}.',
    'a small photo of the {name}.',
    'a cropped photo of the {name}.',
    'an image of {a}.',
)
GLOSS_TEMPLATES = ('{a}: {gloss}.',)

# Readable class name -> the WordNet noun whose gloss describes it, where the name itself is not the right word.
# Other names are looked up as they are ('sandal'), with spaces as underscores ('ankle_boot' is not in WordNet,
# hence 'boot').
WORDNET_WORDS = {
    'ankle boot': 'boot',
}

_ARTICLE_AN = re.compile(r'^[aeiou]', re.IGNORECASE)


def readable_name(class_name: str) -> str:
  """A ClassLabel name as a prompt says it: 'T-shirt/top' -> 't-shirt', 'Ankle boot' -> 'ankle boot',
  'aquarium_fish' -> 'aquarium fish'."""
  name = class_name.split('/')[0].replace('_', ' ').strip()
  return ' '.join(name.split()).lower()


def with_article(name: str) -> str:
  return ('an ' if _ARTICLE_AN.match(name) else 'a ') + name


def _gloss_definition(gloss: str) -> str:
  """WordNet's gloss without its quoted usage examples or a leading '(usually in the plural)'-style remark."""
  definition = gloss.split('; "')[0].split(';')[0].strip()
  definition = re.sub(r'^\([^)]*\)\s*', '', definition)
  return definition.rstrip('.').strip()


def _wordnet_offsets(word: str, wordnet_dir: str) -> list[int]:
  """Synset offsets of noun `word` in WordNet's sense order (most frequent sense first), from index.noun."""
  lemma = word.lower().replace(' ', '_')
  with open(os.path.join(wordnet_dir, 'index.noun'), encoding='utf-8') as f:
    for line in f:
      if line.startswith(lemma + ' '):
        fields = line.split()
        synset_count = int(fields[2])
        return [int(offset) for offset in fields[-synset_count:]]
  return []


@functools.lru_cache(maxsize=None)
def wordnet_gloss(word: str, wordnet_dir: str = WORDNET_DIR) -> str | None:
  """The definition of the first WordNet noun sense of `word`, or None if WordNet or the word is missing.

  data.noun lines read `offset lex_filenum ss_type w_cnt (word lex_id)*w_cnt p_cnt ... | gloss`, and `offset` is the
  line's byte position in data.noun, so the senses index.noun lists are read by seeking. Senses are taken in
  index.noun's order because data.noun's own order puts e.g. coat=pelage and boot=kick before the garments.
  """
  data_path = os.path.join(wordnet_dir, 'data.noun')
  if not os.path.exists(data_path) or not os.path.exists(os.path.join(wordnet_dir, 'index.noun')):
    return None
  lemma = word.lower().replace(' ', '_')
  with open(data_path, 'rb') as f:
    for offset in _wordnet_offsets(word, wordnet_dir):
      f.seek(offset)
      line = f.readline().decode('utf-8')
      head, _, gloss = line.partition(' | ')
      fields = head.split()
      if int(fields[0]) != offset:
        raise ValueError(f'{data_path} does not match its index.noun: no synset at byte {offset}.')
      words = [fields[4 + 2 * i].lower() for i in range(int(fields[3], 16))]
      if lemma in words:
        return _gloss_definition(gloss)
  return None


def _format(template: str, name: str, **fields) -> str:
  return template.format(a=with_article(name), name=name, **fields)


def zero_shot_prompts(class_names: Sequence[str]) -> list[list[str]]:
  """For each class, the held-out templates: embed and average them for a zero-shot classifier."""
  return [[_format(t, readable_name(c)) for t in ZERO_SHOT_TEMPLATES] for c in class_names]


def class_prompts(class_names: Sequence[str], wordnet_dir: str = WORDNET_DIR) -> list[list[str]]:
  """For each class, the captions an image of it may get in training: the templates, then the gloss captions if
  WordNet knows the class."""
  prompts = [[_format(t, readable_name(c)) for t in TEMPLATES] for c in class_names]
  for class_prompts_, class_name in zip(prompts, class_names):
    name = readable_name(class_name)
    gloss = wordnet_gloss(WORDNET_WORDS.get(name, name), wordnet_dir)
    if gloss is None and ' ' in name:  # 'ankle boot' -> 'boot'
      gloss = wordnet_gloss(name.split()[-1], wordnet_dir)
    if gloss:
      class_prompts_ += [_format(t, name, gloss=gloss) for t in GLOSS_TEMPLATES]
  return prompts
