"""TFDS builder `fashion_mnist_offline`: Fashion-MNIST from the files of the Debian package `dataset-fashion-mnist`.

60,000 train and 10,000 test 28x28 grayscale images of 10 clothing classes, stored in the order of the IDX files
(record i of a split is image i of its file). `fashion_mnist` is TFDS's own builder, which downloads; this one reads
/usr/share/datasets/fashion-mnist and stores `image` as a uint8 Tensor (tfds.features.Image would need TensorFlow).

Build it with `python -m foundation.data.prepare fashion_mnist_offline --data_dir=DIR` (~10 s).
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
               'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
SPLIT_FILES = {'train': 'train', 'test': 't10k'}  # split -> prefix of its two IDX files

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
               0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


def read_idx(path: str) -> np.ndarray:
  """An IDX file (optionally gzipped): magic 0 0 <dtype code> <ndim>, ndim big-endian uint32 sizes, then data."""
  with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
    data = f.read()
  if data[:2] != b'\0\0' or data[2] not in _IDX_DTYPES:
    raise ValueError(f'{path} is not an IDX file (magic {data[:4]!r}).')
  ndim = data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
  array = np.frombuffer(data, _IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
  if array.size != np.prod(shape):
    raise ValueError(f'{path}: header says shape {shape} but holds {array.size} values.')
  return array.reshape(shape).astype(array.dtype.newbyteorder('='))


def split_files(split: str, directory: str | None = None) -> tuple[str, str]:
  directory = directory or FASHION_MNIST_DIR
  prefix = SPLIT_FILES[split]
  paths = (os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'),
           os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'))
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} is missing. fashion_mnist_offline reads the files of a Debian package: '
                              f'apt-get update && apt-get install dataset-fashion-mnist')
  return paths


def load_arrays(split: str, directory: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels uint8 [N]) of `split` as the IDX files hold them."""
  images_path, labels_path = split_files(split, directory)
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28) or labels.max() >= len(CLASS_NAMES):
    raise ValueError(f'Unexpected Fashion-MNIST {split} arrays: images {images.shape}, labels {labels.shape}.')
  return images, labels


class FashionMnistOffline(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from local IDX files, records in file order."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: Debian dataset-fashion-mnist IDX files, in file order.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
        license='MIT',
        # Records are stored sorted by their integer key, i.e. in IDX file order, instead of by a hash of the key.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is on disk
    for split in SPLIT_FILES:
      split_files(split)  # fail before writing anything
    return {split: self._generate_examples(split) for split in SPLIT_FILES}

  def _generate_examples(self, split):
    images, labels = load_arrays(split)
    for i in range(len(labels)):
      yield i, {'image': images[i, :, :, None], 'label': int(labels[i])}
