r"""Transfer to handwritten digits (a new domain and new classes) with few labels: mnist5k (5,000 MNIST digits, 60/20/20
stratified splits) or --config.data.name=sklearn_digits (1,797 8x8 digits at 28x28), from an encoder pretrained on
Fashion-MNIST.

  python -m foundation.main --config=configs/transfer/digits.py:finetune --workdir=workdirs/transfer/digits_10 \
      --config.init_from.source=workdirs/classify_fashion_mnist --config.data.shots_per_class=10

Variants, label budgets and metrics as configs/transfer/fashion.py; validation and test are the builder's own splits.
"""

import ml_collections

from foundation import config_base

FASHION = 'configs/transfer/fashion.py'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_base.load(FASHION, arg)
  c.data.update(name='mnist5k', train_split='train', validation_split='validation', eval_split='test')
  c.augment.flip = False  # a mirrored digit is another glyph (or none); crops still shift and scale
  return c


VARIANTS = config_base.load_module(FASHION).VARIANTS
