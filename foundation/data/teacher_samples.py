"""TFDS builder `teacher_samples`: text sampled from a trained language model, for sequence-level distillation.

`python -m foundation.sample_corpus` writes the documents as JSON lines (`{"text": ...}`) into `<data_dir>/samples/`
(one file per split: `train.jsonl` the teacher's samples, `validation.jsonl` a verbatim copy of the teacher's own
validation text) and builds this dataset from them into the same data dir. A student then trains on it like on any
text dataset (`--config.data.name=teacher_samples --config.data.data_dir=<data_dir>`), with whatever tokenizer it
has, and is evaluated on the real validation text.
"""

from __future__ import annotations

import json
import os

import tensorflow_datasets as tfds

SAMPLES_DIR = 'samples'  # below the data dir: the JSON lines this builder reads


class TeacherSamples(tfds.core.GeneratorBasedBuilder):
  """Documents sampled from a language model, plus the validation text it was evaluated on."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Samples from one teacher run; the validation split copied from its dataset.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Write the samples with: python -m foundation.sample_corpus --teacher=RUN --out=DIR'

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                 features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
                                 disable_shuffling=True)  # records in the order written

  def _split_generators(self, dl_manager):
    directory = str(dl_manager.manual_dir)
    return {name[:-len('.jsonl')]: self._generate_examples(os.path.join(directory, name))
            for name in sorted(os.listdir(directory)) if name.endswith('.jsonl')}

  def _generate_examples(self, path):
    with open(path, encoding='utf-8') as f:
      for index, line in enumerate(f):
        yield index, {'text': json.loads(line)['text']}


def build(data_dir: str) -> tfds.core.DatasetBuilder:
  """Builds `teacher_samples` in `data_dir` from the JSON lines in `data_dir/samples/`."""
  builder = tfds.builder('teacher_samples', data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.path.join(data_dir, SAMPLES_DIR)))
  return builder
