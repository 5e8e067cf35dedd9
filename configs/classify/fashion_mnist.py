r"""Supervised baseline on Fashion-MNIST: the same encoder as the SimCLR config, trained on the labels.

Default (CPU, about 12 minutes on 2 cores, evaluations included):
  python -m foundation.main --config=configs/classify/fashion_mnist.py --workdir=workdirs/classify_fashion_mnist
Variants: :smoke (seconds, for tests), :vit (the ViT encoder).
"""

import os

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = 'classify'
  c.seed = 0
  c.parallelism = 'jit'
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.num_train_steps = 1500
  c.global_batch_size = 128
  c.grad_accum_steps = 1
  c.log_every = 50
  c.eval_every = 1500
  c.eval_at_start = False
  c.checkpoint_every = 500
  c.max_checkpoints = 2
  c.prefetch_batches = 4

  c.data = dict(name='fashion_mnist_offline',
                data_dir=os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets')),
                train_split='train', eval_split='test', image_shape=(28, 28, 1))
  c.model = dict(
      encoder='cnn',
      cnn=dict(widths=(32, 64, 128), blocks_per_stage=1, stem_stride=2, norm='layer', pool_grid=2),
      vit=dict(image_size=28, patch_size=4, num_channels=1, embed_dim=128, num_layers=4, num_heads=4, mlp_dim=256,
               pool='mean'),
  )
  # Light augmentation: labels do the teaching here.
  c.augment = dict(crop_scale=(0.7, 1.0), flip=True, brightness=0.0, contrast=0.0, blur_prob=0.0, noise_std=0.0)
  c.optim = dict(name='adamw', lr=2e-3, schedule='cosine', warmup_steps=100, end_lr_fraction=0.0, b1=0.9, b2=0.999,
                 eps=1e-8, weight_decay=1e-4, weight_decay_exclude=('norm', 'bias', 'scale'), grad_clip=0.0, freeze=())
  c.eval = dict(name='supervised', probe='logistic', shots=(1, 5, 10, 25, 60), fewshot_seeds=3, batch_size=1000,
                max_train_examples=0, max_test_examples=0, compare={})

  if arg == 'smoke':
    c.num_train_steps = 4
    c.global_batch_size = 16
    c.log_every = 2
    c.eval_every = 4
    c.checkpoint_every = 2
    c.model.cnn.widths = (8, 16)
    c.eval.update(probe='ridge', shots=(1, 5), fewshot_seeds=1, batch_size=200, max_train_examples=400,
                  max_test_examples=200)
  elif arg == 'vit':
    c.model.encoder = 'vit'
    c.eval.name = 'supervised (ViT)'
  elif arg:
    raise ValueError(f'unknown variant {arg!r} of configs/classify/fashion_mnist.py; choose smoke or vit.')
  return c
