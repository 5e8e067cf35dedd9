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

Prompts on a frozen model (foundation/tasks/visual_prompt.py), named by --config.prompt.source=DIR instead of
init_from (nothing of it trains or is saved): :vpt_shallow and :vpt_deep (10 prompt tokens and a linear head on a
ViT run, e.g. configs/contrastive/simclr_fashion_mnist.py:vit), :padding (a border 4 pixels wide) and :patch (a 4x4
square in the top-left corner) on a CLIP run's zero-shot classifier or a supervised run's head; new class i is
scored as source class i unless --config.prompt.class_map='(...)' says otherwise.
"""

import ml_collections

from foundation import config_base

CLASSIFY_CONFIG = 'configs/classify/fashion_mnist.py'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_base.load(CLASSIFY_CONFIG)  # its encoder, augmentation and optimizer: "the same network"
  c.update(num_train_steps=500, global_batch_size=64, eval_every=50, log_every=50, checkpoint_every=500)
  c.data.update(**config_base.FASHION_SPLITS, shots_per_class=10)
  c.eval.update(name='transfer', representation=False, batch_size=1000)
  c.early_stopping = dict(metric='eval/validation/accuracy', mode='max', patience=0)
  c.init_from.update(params_path='params/backbone', target='backbone')
  c.finetune_top_stages = 0  # :finetune_top: the CNN stage count its freeze was made for (the task checks it)
  return config_base.apply_variants(c, arg, VARIANTS, __file__)


def scratch(c):
  c.init_from.source = ''


def _pretrained(c):
  c.eval.source_probe_examples = 10000


def probe(c):
  _pretrained(c)
  c.optim.freeze = ('^backbone/',)


def _freeze_below_top_stage(c):
  """Made for the CNN's widths as they are now, and recorded: other --config.model.cnn.widths on the command line
  (applied after the variants) are refused by the task (foundation/tasks/classify.py), with the freeze that fits."""
  c.finetune_top_stages = len(c.model.cnn.widths)
  c.optim.freeze = (config_base.below_top_stage(c.finetune_top_stages),)


def finetune_top(c):
  _pretrained(c)
  _freeze_below_top_stage(c)


def finetune(c):
  _pretrained(c)
  c.optim.lr_scale = ('^backbone/=0.1',)


def _prompt(c, method: str, lr: float):
  c.task = 'visual_prompt'
  del c.model  # the frozen run's architecture is read from its config.json
  c.init_from.update(source='', params_path='params', target='')
  c.prompt = dict(method=method, source='', tokens=10, width=4, patch_size=4, patch_at=(0, 0), class_map=())
  c.optim.update(lr=lr, weight_decay=0.0, weight_decay_exclude=())
  c.eval_at_start = method in ('padding', 'patch')  # step 0 is the frozen classifier without a prompt


def vpt_shallow(c):
  _prompt(c, 'vpt_shallow', lr=1e-2)


def vpt_deep(c):
  _prompt(c, 'vpt_deep', lr=1e-2)


def padding(c):
  _prompt(c, 'padding', lr=1e-2)


def patch(c):
  _prompt(c, 'patch', lr=1e-2)


def smoke(c):
  if c.task != 'visual_prompt':
    c.model = config_base.load(CLASSIFY_CONFIG, 'smoke').model
    if c.finetune_top_stages:  # :finetune_top, on the smaller CNN too
      _freeze_below_top_stage(c)
  config_base.smoke_loop(c, steps=4, batch=16)
  c.data.update(shots_per_class=2, **config_base.FASHION_SMOKE_SPLITS)
  c.eval.update(batch_size=400, source_probe_examples=min(c.eval.source_probe_examples, 400))


VARIANTS = {'scratch': scratch, 'probe': probe, 'finetune_top': finetune_top, 'finetune': finetune,
            'vpt_shallow': vpt_shallow, 'vpt_deep': vpt_deep, 'padding': padding, 'patch': patch, 'smoke': smoke}
