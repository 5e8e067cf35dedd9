r"""Supervised baseline on Fashion-MNIST: the same encoder as the SimCLR config, trained on the labels.

Default (CPU, about 12 minutes on 2 cores, evaluations included):
  python -m foundation.main --config=configs/classify/fashion_mnist.py --workdir=workdirs/classify_fashion_mnist
Variants: :smoke (seconds, for tests), :vit (the ViT encoder).
"""

import os

import ml_collections

from foundation import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_base.loop('classify', num_train_steps=1500, global_batch_size=128, eval_every=1500)

  c.data = dict(name='fashion_mnist_offline',
                data_dir=os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets')),
                train_split='train', eval_split='test', image_shape=(28, 28, 1),
                validation_split='',  # '': eval/accuracy (test) at every evaluation
                classes=(), shots_per_class=0)  # a class filter, e.g. (0, 1, 2, 3, 4); 0 shots: every label
  c.model = dict(
      encoder='cnn',
      cnn=config_base.fashion_cnn(),
      vit=config_base.fashion_vit(),
  )
  # Light augmentation: labels do the teaching here.
  c.augment = dict(crop_scale=(0.7, 1.0), flip=True, brightness=0.0, contrast=0.0, blur_prob=0.0, noise_std=0.0)
  c.optim = config_base.optimizer(lr=2e-3)
  c.eval = dict(name='supervised', probe='logistic', shots=(1, 5, 10, 25, 60), fewshot_seeds=3, batch_size=1000,
                max_train_examples=0, max_test_examples=0, compare={},
                representation=True,  # the probe suite on the encoder's features
                source_probe_examples=0)  # > 0: forgetting of an init_from encoder on its source task

  return config_base.apply_variants(c, arg, VARIANTS, __file__)


def smoke(c):
  config_base.smoke_loop(c, steps=4, batch=16)
  c.model.cnn.widths = (8, 16)
  c.data.eval_split = config_base.FASHION_SMOKE_SPLITS['eval_split']
  c.eval.update(probe='ridge', shots=(1, 5), fewshot_seeds=1, batch_size=200, max_train_examples=400,
                max_test_examples=200)


def vit(c):
  c.model.encoder = 'vit'
  c.eval.name = 'supervised (ViT)'


VARIANTS = {'smoke': smoke, 'vit': vit}
