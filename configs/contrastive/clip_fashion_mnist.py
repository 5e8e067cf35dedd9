r"""CLIP / SigLIP on Fashion-MNIST images paired with SYNTHETIC captions (class-name templates and WordNet glosses,
e.g. "a sandal: a shoe consisting of a sole fastened by straps to the foot."). No real image-caption pairs ship
offline; these captions describe the class, not the individual image.

Default (CPU, under 15 minutes on 2 cores, evaluations included):
  python -m foundation.main --config=configs/contrastive/clip_fashion_mnist.py --workdir=workdirs/clip
Variants:
  :smoke   seconds, for tests
  :siglip  the pairwise sigmoid loss with a learnable bias, instead of CLIP's softmax
  :lit     locked-image tuning: the image tower is restored from another run's checkpoint and frozen, without a head
           (its features are the embedding space); only the text side trains. It locks the SimCLR default's run in
           workdirs/simclr; name another run (its encoder must have the same config) with
           --config.lock_image_tower.workdir=DIR
"""

import math
import os

import ml_collections

from foundation import config_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_base.loop('clip', num_train_steps=800, global_batch_size=256, eval_every=800, eval_at_start=True,
                       checkpoint_every=400)

  c.data = dict(name='fashion_mnist_offline',
                data_dir=os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets')),
                train_split='train', eval_split='test', image_shape=(28, 28, 1),
                classes=())  # a class filter, e.g. (0, 1, 2, 3, 4): a source run on those classes only
  c.text = dict(tokenizer='byte', max_len=80)
  c.model = dict(
      image_encoder='cnn',
      # The SimCLR default's encoder: every method's image features are probed on the same architecture, and
      # :lit can lock a SimCLR run's tower without overrides.
      image=config_base.fashion_cnn(),
      # Causal, so right padding never reaches the pooled last token.
      text=dict(vocab_size=320, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=4, mlp_dim=128, max_len=80),
      embed_dim=64,
      loss='clip',
  )
  c.lock_image_tower = None  # LiT: dict(workdir=..., params_path='params/backbone')
  c.augment = dict(crop_scale=(0.5, 1.0), flip=True, brightness=0.2, contrast=0.2, blur_prob=0.0, noise_std=0.0)
  c.optim = config_base.optimizer(lr=2e-3, b2=0.98, eps=1e-6, weight_decay_exclude=('norm|bias|scale|logit',),
                                  grad_clip=1.0)
  c.optim.param_max = (f'^logit_scale$={math.log(100.0)}',)  # CLIP's bound: a scale of at most 100, after each update
  c.eval = dict(name='CLIP image tower', probe='ridge', shots=(1, 5, 10, 25, 60), fewshot_seeds=3, batch_size=1000,
                max_train_examples=0, max_test_examples=0, compare={}, retrieval_examples=1000)

  return config_base.apply_variants(c, arg, VARIANTS, __file__)


def smoke(c):
  config_base.smoke_loop(c, steps=4, batch=16)
  c.model.image.widths = (8, 16)
  c.model.text.update(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=2, mlp_dim=64)
  c.model.embed_dim = _cnn_features(c.model.image) if not c.model.get('image_head', True) else 16
  c.eval.update(shots=(1, 5), fewshot_seeds=1, batch_size=200, max_train_examples=400, max_test_examples=200,
                retrieval_examples=64)


def siglip(c):
  c.model.loss = 'siglip'
  del c.optim['param_max']  # SigLIP does not bound its scale (and its runs' config.json has no such field)
  c.eval.name = 'SigLIP image tower'


def lit(c):
  # The SimCLR default's encoder (as above); a locked run with another one is refused with the overrides to set.
  c.lock_image_tower = dict(workdir='workdirs/simclr', params_path='params/backbone')
  # The locked tower has no head: its features (512: a 2x2 grid of 128 channels) are the embedding space.
  c.model.image_head = False
  c.model.embed_dim = _cnn_features(c.model.image)
  c.eval.name = 'LiT (locked image tower)'


def _cnn_features(image) -> int:
  """The size of the CNN's features: its last width at each cell of the pooling grid."""
  return image.widths[-1] * image.pool_grid ** 2


VARIANTS = {'smoke': smoke, 'siglip': siglip, 'lit': lit}
