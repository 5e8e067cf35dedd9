r"""Distilling the Shakespeare LM: the LM config's 4-layer decoder as teacher, a 2-layer, half-width student.

  python -m foundation.main --config=configs/distill/shakespeare.py:teacher --workdir=workdirs/distill/lm_teacher
  python -m foundation.main --config=configs/distill/shakespeare.py:student --workdir=workdirs/distill/lm_student
  python -m foundation.main --config=configs/distill/shakespeare.py:kd --workdir=workdirs/distill/lm_kd \
      --config.teachers=workdirs/distill/lm_teacher
Sequence-level distillation trains the student on text sampled from the teacher (any tokenizer):
  python -m foundation.sample_corpus --teacher=workdirs/distill/lm_teacher --out=workdirs/distill/lm_teacher_text
  python -m foundation.main --config=configs/distill/shakespeare.py:seqkd,bpe --workdir=workdirs/distill/lm_seqkd_bpe \
      --config.data.data_dir=workdirs/distill/lm_teacher_text
Variants: :teacher (configs/lm/shakespeare.py's model and budget), :student (the small decoder alone), :kd (token-
level soft targets; --config.distill.top_k=K keeps the teacher's top K logits only), :seqkd (the student on the
teacher's samples, dataset `teacher_samples`; name its data dir), :bpe (the student with SmolLM2's byte-level BPE,
49,152 ids, instead of bytes: token-level KD from the byte teacher is then refused), :smoke (with any other).
The student runs share steps and evaluation: the validation plays, eval/nats_per_byte (eval/loss is per token).
"""

import ml_collections

from foundation import config_base

LM_CONFIG = 'configs/lm/shakespeare.py'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_base.load(LM_CONFIG)
  c.task = 'lm_distill'
  c.model.update(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=192)
  c.optim.update(schedule='cosine', end_lr_fraction=0.1)  # the schedule the README's distillation rows ran with
  c.num_train_steps = 1000
  c.eval_every = 500
  c.teachers = ''  # comma-separated workdirs of trained LMs with this tokenizer
  c.distill = dict(temperature=1.0, alpha=0.0, top_k=0)
  return config_base.apply_variants(c, arg, VARIANTS, __file__)


def teacher(c):
  lm = config_base.load(LM_CONFIG)
  c.model = lm.model
  c.update(num_train_steps=lm.num_train_steps, eval_every=lm.eval_every)


def student(c):
  del c  # the defaults: the small decoder on the next tokens alone


def kd(c):
  c.distill.update(alpha=0.5, temperature=1.0)


def seqkd(c):
  c.data.name = 'teacher_samples'
  c.data.data_dir = ''  # the --out of python -m foundation.sample_corpus


def bpe(c):
  c.data.tokenizer = 'gguf:smollm2-135m-instruct'
  c.model.vocab_size = 49152


def smoke(c):
  small = config_base.load(LM_CONFIG, 'smoke')
  teacher_sized = c.model.embed_dim == config_base.load(LM_CONFIG).model.embed_dim
  vocab_size = c.model.vocab_size
  c.model = small.model
  c.model.vocab_size = vocab_size  # the tokenizer's (:bpe)
  if not teacher_sized:
    c.model.update(embed_dim=16, mlp_dim=32)  # half the smoke teacher's width
  for field in ('num_train_steps', 'global_batch_size', 'log_every', 'eval_every', 'checkpoint_every'):
    c[field] = small[field]
  c.data.seq_len, c.eval, c.sample = small.data.seq_len, small.eval, small.sample


VARIANTS = {'teacher': teacher, 'student': student, 'kd': kd, 'seqkd': seqkd, 'bpe': bpe, 'smoke': smoke}
