r"""Transfer to Fashion-MNIST with few labels: a new linear head on an encoder pretrained by another run of this
codebase, against the same network trained from random init on the same labels.

  python -m foundation.main --config=configs/contrastive/simclr_fashion_mnist.py --workdir=workdirs/simclr
  python -m foundation.main --config=configs/transfer/fashion.py:finetune --workdir=workdirs/transfer/simclr_10 \
      --config.init_from.source=workdirs/simclr --config.data.shots_per_class=10 --config.seed=0
  python -m foundation.main --config=configs/transfer/fashion.py:scratch --workdir=workdirs/transfer/scratch_10 \
      --config.data.shots_per_class=10 --config.seed=0

The label budget is --config.data.shots_per_class (0: every label), drawn by --config.seed alone (the same images
for every method at one seed; the subsets of one seed nest). New classes: --config.data.classes='(5,6,7,8,9)' here
and the source run trained on --config.data.classes='(0,1,2,3,4)'. Splits: train = the first 50,000 training images,
validation = the other 10,000 (every choice, and the step kept, are made on it), test = the test split, read once.
Variants: :scratch (random init), :probe (the pretrained encoder frozen, the head alone), :finetune_top (the top
stage and the head train), :finetune (everything; the encoder at a tenth of the head's learning rate), :smoke.
Runs from a pretrained encoder report forgetting: a ridge probe on the source run's own task with the encoder
before and after (eval/forgetting/source_probe_before, eval/forgetting/source_probe).
"""

import ml_collections

from foundation import config_base

CLASSIFY_CONFIG = 'configs/classify/fashion_mnist.py'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_base.load(CLASSIFY_CONFIG)  # its encoder, augmentation and optimizer: "the same network"
  c.update(num_train_steps=500, global_batch_size=64, eval_every=50, log_every=50, checkpoint_every=500)
  c.data.update(train_split='train[:50000]', validation_split='train[50000:]', eval_split='test',
                shots_per_class=10)
  c.eval.update(name='transfer', representation=False, batch_size=1000)
  c.early_stopping = dict(metric='eval/validation/accuracy', mode='max', patience=0)
  c.init_from.update(params_path='params/backbone', target='backbone')
  return config_base.apply_variants(c, arg, VARIANTS, __file__)


def scratch(c):
  c.init_from.source = ''


def _pretrained(c):
  c.eval.source_probe_examples = 10000


def probe(c):
  _pretrained(c)
  c.optim.freeze = ('^backbone/',)


def finetune_top(c):
  _pretrained(c)
  c.optim.freeze = ('^backbone/(stem|stage0|stage1)',)  # the top stage (stage2 of the CNN) and the head train


def finetune(c):
  _pretrained(c)
  c.optim.lr_scale = ('^backbone/=0.1',)


def smoke(c):
  classify_smoke = config_base.load(CLASSIFY_CONFIG, 'smoke')
  c.model = classify_smoke.model
  config_base.smoke_loop(c, steps=4, batch=16)
  c.data.shots_per_class = 2
  c.eval.update(batch_size=400, source_probe_examples=min(c.eval.source_probe_examples, 400))


VARIANTS = {'scratch': scratch, 'probe': probe, 'finetune_top': finetune_top, 'finetune': finetune, 'smoke': smoke}
